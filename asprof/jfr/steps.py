"""Long asyncio event-loop steps and the stacks sampled during them (issue #15).

The offline side of :mod:`asprof.context.steps` (the Rust agent's ``longpolls`` decoder, for
asyncio): the ``asprof.Step`` events of a recording (:mod:`asprof.jfr.labels`) at least
``min_ns`` long, each with the CPU and wall-clock samples its thread took between its start
and end (stacks as :func:`asprof.jfr.profile.build_profile` shows them: Python frames joined
in).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from asprof.jfr import _parser
from asprof.jfr.labels import LabelPairs, context_of
from asprof.jfr.model import Frame

if TYPE_CHECKING:  # pragma: no cover
    from asprof.jfr.chunk import Chunk
    from asprof.jfr.chunk import RecordingLike as Recording

__all__ = ["LongStep", "long_steps"]


@dataclass
class LongStep:
    """A step of at least the threshold: ``stacks`` maps (kind, frames leaf first) to samples."""

    tid: int
    thread: str
    start_ns: int
    duration_ns: int
    name: str
    labels: LabelPairs
    recorded_samples: int
    stacks: Dict[Tuple[str, Tuple[str, ...]], int] = field(default_factory=dict)

    @property
    def end_ns(self) -> int:
        return self.start_ns + self.duration_ns

    @property
    def samples(self) -> int:
        return sum(self.stacks.values())


def long_steps(rec: "Recording", min_ns: int, python: str = "mixed") -> Tuple[List[LongStep], int]:
    """The steps of ``rec`` lasting at least ``min_ns``, in time order, with their samples; and
    how many steps the recording holds in all."""
    if python not in ("mixed", "python", "native"):
        raise ValueError(f"python must be 'mixed', 'python' or 'native', got {python!r}")
    everything = context_of(rec).steps()
    chosen = [s for s in everything if s.step.duration_ns >= min_ns]
    out = [LongStep(s.step.tid, "", s.step.start_ns, s.step.duration_ns, s.step.name, s.labels, s.step.samples)
           for s in chosen]
    if not out:
        return out, len(everything)
    by_tid: Dict[int, List[int]] = {}
    for i, st in enumerate(out):
        by_tid.setdefault(st.tid, []).append(i)
    starts = {tid: [out[i].start_ns for i in idx] for tid, idx in by_tid.items()}
    hook = None
    if python != "native":
        from asprof.jfr.pystacks import python_stack_hook

        hook = python_stack_hook(rec, mode=python)
    for c in rec.chunks:
        _scan_chunk(c, out, by_tid, starts, hook)
    return out, len(everything)


def _scan_chunk(c: "Chunk", out: List[LongStep], by_tid: Dict[int, List[int]], starts: Dict[int, List[int]],
                hook: Optional[object]) -> None:
    lo64, hi64 = -(1 << 63), (1 << 63) - 1
    for kind, code in (("cpu", _parser.KIND_EXEC), ("wall", _parser.KIND_WALL)):
        cols = c.columns_of((_parser.KIND_EXEC, _parser.KIND_WALL))
        states = _cpu_states(c) if kind == "cpu" else None
        rows = _parser.select_rows(cols, code, states, lo64, hi64, set(by_tid) | _thread_keys(c, by_tid))
        for r in rows:
            tkey, ticks = cols.thread[r], cols.time[r]
            th = c.thread(tkey)
            tid = th.tid if th is not None else tkey
            idx = by_tid.get(tid)
            if idx is None:
                continue
            t = c.ticks_to_nanos(ticks)
            k = bisect.bisect_right(starts[tid], t) - 1
            if k < 0:
                continue
            st = out[idx[k]]
            if t > st.end_ns:
                continue
            if not st.thread and th is not None:
                st.thread = th.name
            st2 = c.stack_trace(cols.stack[r])
            frames: Sequence[Frame] = st2.frames if st2 is not None else ()
            if hook is not None:
                repl = hook(c, tkey, ticks, frames)  # type: ignore[operator]
                if repl is not None:
                    frames = repl
            key = (kind, tuple(f.name for f in frames))
            w = cols.value[r] if kind == "wall" and cols.value[r] > 0 else 1
            st.stacks[key] = st.stacks.get(key, 0) + w


def _thread_keys(c: "Chunk", by_tid: Dict[int, List[int]]) -> set[int]:
    """Thread pool keys of the chunk whose OS thread id has steps."""
    return {t.key for t in c.threads if t.tid in by_tid}


def _cpu_states(c: "Chunk") -> Optional[set[int]]:
    from asprof.jfr.profile import _cpu_states as states

    return states(c)
