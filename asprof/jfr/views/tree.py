"""A call tree built from a profile's stacks (shared by the collapsed and HTML views).

Java frames of different compilation types (interpreted, JIT, inlined, C1)
share one node, as in async-profiler's converter; the node's displayed type
is decided by which type holds the majority of its weight.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from asprof.jfr.model import FrameType
from asprof.jfr.profile import Profile

__all__ = ["Node", "build_tree"]

_JAVA = (int(FrameType.INTERPRETED), int(FrameType.INLINED), int(FrameType.C1_COMPILED))


class Node:
    __slots__ = ("name", "type", "total", "self", "children", "interp", "inl", "c1")

    def __init__(self, name: str, ftype: int) -> None:
        self.name = name
        self.type = ftype
        self.total = 0
        self.self = 0
        self.children: Dict[Tuple[str, int], "Node"] = {}
        self.interp = 0
        self.inl = 0
        self.c1 = 0

    def display_type(self) -> int:
        t = self.total
        if t > 0:
            if self.inl * 3 >= t:
                return int(FrameType.INLINED)
            if self.c1 * 2 >= t:
                return int(FrameType.C1_COMPILED)
            if self.interp * 2 >= t:
                return int(FrameType.INTERPRETED)
        return self.type

    def sorted_children(self) -> List["Node"]:
        return sorted(self.children.values(), key=lambda n: (n.name, n.type))


def build_tree(profile: Profile, min_weight: int = 0) -> Node:
    """The call tree of ``profile``; ``root.total`` is the profile's total weight."""
    root = Node("all", int(FrameType.NATIVE))
    frames = profile.frames
    # frame id -> (child key, type) once, to keep the inner loop cheap
    keys: List[Tuple[Tuple[str, int], int]] = []
    for name, ftype in frames:
        norm = int(FrameType.JIT_COMPILED) if ftype in _JAVA else ftype
        keys.append(((name, norm), ftype))
    for stack, (w, _c) in profile.stacks.items():
        if w <= min_weight and min_weight:
            continue
        node = root
        node.total += w
        for fid in stack:
            key, ftype = keys[fid]
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = Node(key[0], key[1])
            child.total += w
            if ftype != key[1]:
                if ftype == _JAVA[0]:
                    child.interp += w
                elif ftype == _JAVA[1]:
                    child.inl += w
                else:
                    child.c1 += w
            node = child
        node.self += w
    return root


def depth(root: Node) -> int:
    best = 0
    stack: List[Tuple[Node, int]] = [(root, 0)]
    while stack:
        n, d = stack.pop()
        if d > best:
            best = d
        for c in n.children.values():
            stack.append((c, d + 1))
    return best


def find(root: Node, path: List[str]) -> Optional[Node]:
    node: Optional[Node] = root
    for p in path:
        if node is None:
            return None
        node = next((c for c in node.children.values() if c.name == p), None)
    return node
