"""The hottest frames: self weight (the frame is the leaf) and total weight
(the frame is anywhere on the stack, counted once per stack)."""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

from asprof.jfr.profile import THREAD, Profile

__all__ = ["TopEntry", "top", "format_top", "format_by_label", "split_by_label"]


class TopEntry(NamedTuple):
    name: str
    self: int
    total: int
    self_pct: float
    total_pct: float


def top(profile: Profile, n: Optional[int] = 20, by: str = "self") -> List[TopEntry]:
    """The ``n`` frames with the most ``self`` (or ``total``) weight."""
    if by not in ("self", "total"):
        raise ValueError("by must be 'self' or 'total'")
    self_w: Dict[str, int] = {}
    total_w: Dict[str, int] = {}
    grand = 0
    frames = profile.frames
    for stack, (w, _c) in profile.stacks.items():
        grand += w
        names = [frames[f][0] for f in stack if frames[f][1] != THREAD]
        if names:
            leaf = names[-1]
            self_w[leaf] = self_w.get(leaf, 0) + w
        for name in set(names):
            total_w[name] = total_w.get(name, 0) + w
    entries = [
        TopEntry(name, self_w.get(name, 0), t,
                 100.0 * self_w.get(name, 0) / grand if grand else 0.0,
                 100.0 * t / grand if grand else 0.0)
        for name, t in total_w.items()
    ]
    key = (lambda e: (-e.self, -e.total, e.name)) if by == "self" else (lambda e: (-e.total, -e.self, e.name))
    entries.sort(key=key)
    return entries if n is None else entries[:n]


def _fmt(v: int, unit: str) -> str:
    if unit == "bytes":
        x = float(v)
        for u in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(x) < 1024 or u == "TiB":
                return f"{x:.0f} {u}" if u == "B" else f"{x:.1f} {u}"
            x /= 1024
    return str(v)


def format_top(profile: Profile, n: Optional[int] = 20, by: str = "self", width: int = 100) -> str:
    """A text table of :func:`top` for the terminal."""
    rows = top(profile, n, by)
    unit = profile.unit
    head: Tuple[str, ...] = ("self", "self%", "total", "total%", "frame")
    lines = [f"{head[0]:>12} {head[1]:>7} {head[2]:>12} {head[3]:>7}  {head[4]}"]
    name_w = max(20, width - 43)
    for e in rows:
        name = e.name if len(e.name) <= name_w else e.name[: name_w - 1] + "\u2026"
        lines.append(f"{_fmt(e.self, unit):>12} {e.self_pct:6.2f}% {_fmt(e.total, unit):>12} "
                     f"{e.total_pct:6.2f}%  {name}")
    what = unit if unit in ("bytes", "objects") else "samples"
    lines.append(f"total: {_fmt(profile.total, unit)} {what if unit != 'bytes' else ''}".rstrip()
                 + (f" in ~{profile.total_count} objects (estimated from samples)"  # issue #16
                    if profile.kind in ("alloc", "live") else f" in {profile.total_count} events")
                 + f", {len(profile.stacks)} unique stacks")
    return "\n".join(lines) + "\n"


def split_by_label(profile: Profile) -> List[Tuple[str, Profile]]:
    """Issue #15: a profile built with ``by_label`` split per label value (its root frames
    ``[key=value]``), heaviest first; each part without that root frame."""
    from asprof.jfr.profile import LABEL

    parts: Dict[str, Profile] = {}
    frames = profile.frames
    for stack, (w, c) in profile.stacks.items():
        if stack and frames[stack[0]][1] == LABEL:
            name, rest = frames[stack[0]][0], stack[1:]
        else:
            name, rest = "[<none>]", stack
        part = parts.get(name)
        if part is None:
            part = parts[name] = Profile(profile.kind, profile.unit, profile.interval_ns, profile.start_nanos,
                                         profile.end_nanos, profile.source, profile.by_thread)
            part.frames = profile.frames
        part.add(rest, w, c)
    return sorted(parts.items(), key=lambda kv: (-kv[1].total, kv[0]))


def format_by_label(profile: Profile, key: str, n: Optional[int] = 5, by: str = "self", width: int = 100) -> str:
    """Issue #15: the share of each value of label ``key`` (a profile built with ``by_label``),
    then the hottest frames of each."""
    parts = split_by_label(profile)
    grand = profile.total
    unit = profile.unit
    lines = [f"{unit:>12} {'%':>7}  {key}"]
    for name, part in parts:
        value = name[len(key) + 2:-1] if name.startswith(f"[{key}=") else name[1:-1]
        pct = 100.0 * part.total / grand if grand else 0.0
        lines.append(f"{_fmt(part.total, unit):>12} {pct:6.2f}%  {value}")
    lines.append(f"total: {_fmt(grand, unit)} {unit if unit != 'bytes' else ''}".rstrip())
    if n != 0:
        for name, part in parts:
            lines.append("")
            lines.append(f"{name}:")
            lines.append(format_top(part, n, by, width).rstrip("\n"))
    return "\n".join(lines) + "\n"
