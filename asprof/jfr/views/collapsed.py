"""Folded ("collapsed") stacks: one line per unique stack, ``root;...;leaf weight``.

Frame names follow async-profiler's converter (``jfrconv``): the method name
alone for native, C++ and kernel frames, kernel frames suffixed ``_[k]``,
Java frames ``Class.method`` suffixed ``_[j]`` (JIT), ``_[i]`` (inlined),
``_[0]`` (interpreted) or ``_[1]`` (C1), so the output diffs cleanly against
``jfrconv --output collapsed``. Lines are sorted.
"""
from __future__ import annotations

from typing import IO, Iterator, List, Tuple

from asprof.jfr.model import FRAME_SUFFIX, FrameType
from asprof.jfr.profile import THREAD, Profile
from asprof.jfr.views.tree import Node, build_tree

__all__ = ["to_collapsed", "write_collapsed", "collapsed_lines"]


def _suffix(t: int) -> str:
    if t == THREAD:
        return ""
    try:
        return FRAME_SUFFIX[FrameType(t)]
    except ValueError:
        return ""


def collapsed_lines(profile: Profile) -> Iterator[Tuple[str, int]]:
    """(folded stack, weight) pairs in sorted order."""
    root = build_tree(profile)
    out: List[Tuple[str, int]] = []
    # iterative DFS over (node, depth), the names from the root in ``parts``: a line is joined only
    # where a stack ends, so a deep stack costs its length, not its length squared (a prefix
    # string per level took 18 s for one stack of 200,000 frames)
    parts: List[str] = []
    stack: List[Tuple[Node, int]] = [(c, 0) for c in root.children.values()]
    while stack:
        node, depth = stack.pop()
        del parts[depth:]
        parts.append(node.name + _suffix(node.display_type()))
        if node.self > 0:
            out.append((";".join(parts), node.self))
        if node.children:
            stack.extend((c, depth + 1) for c in node.children.values())
    out.sort()
    return iter(out)


def to_collapsed(profile: Profile) -> str:
    """The profile as folded stacks (text, one ``stack weight`` per line)."""
    return "".join(f"{s} {w}\n" for s, w in collapsed_lines(profile))


def write_collapsed(profile: Profile, out: IO[str]) -> None:
    for s, w in collapsed_lines(profile):
        out.write(f"{s} {w}\n")
