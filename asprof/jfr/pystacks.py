"""Python stacks in async-profiler samples: decoding and the mixed-stack join (issue #5).

``asprof._pyframes`` records, for every CPU and wall-clock sample async-profiler takes on a
thread running Python, that thread's Python stack, and writes it into the same JFR recording as
``profiler.UserEvent`` events:

=================== ====================================================================
type                data (Latin-1 string of bytes; varints are LEB128)
=================== ====================================================================
``asprof.PyCode``   version 1, then per code object: id, first line, globals id,
                    qualified name, file name (strings: varint length + UTF-8)
``asprof.PyStack``  version 1, then per stack: id, truncated flag, entry count, entries
                    leaf first: ``0`` = boundary between two eval-loop calls, ``1`` =
                    unknown code, else code id + 2 followed by the line
``asprof.PySample`` version 1, then per sample: tid, sample_counter (0 = none), CPU
                    ticks, CLOCK_MONOTONIC ns, stack id
``asprof.PyModule`` version 1, then per module: globals id, module name
``asprof.PyStats``  JSON counters of the recording (what was emitted)
=================== ====================================================================

:class:`PythonStacks` decodes them; :meth:`PythonStacks.stack_hook` joins them to the samples
(by ``(tid, startTime) == (tid, sample_counter)`` on async-profiler 4.5+, by timestamp before)
and rewrites each sample's stack: every native ``_PyEval_EvalFrameDefault`` frame is replaced
by the Python frames that eval-loop call was running (``mixed``), or only the Python frames are
kept (``python``). Samples without a Python stack keep their native frames.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from asprof.jfr.model import Frame, FrameType
from asprof.jfrio.decode import leb_string as _string
from asprof.jfrio.decode import uleb128 as _varint

if TYPE_CHECKING:  # pragma: no cover
    from asprof.jfr.chunk import Chunk
    from asprof.jfr.chunk import RecordingLike as Recording

__all__ = [
    "PythonStacks",
    "PyFrame",
    "PyStack",
    "JoinStats",
    "python_stack_hook",
    "stacks_of",
    "EVAL_FRAME",
]

log = logging.getLogger("asprof")

#: Native frames that run Python code: one per eval-loop call.
EVAL_FRAME = re.compile(r"^_PyEval_EvalFrameDefault(?:\..*)?$")
#: How far after async-profiler's timestamp ours may be for a timestamp join.
TIMESTAMP_WINDOW_NS = 2_000_000


@dataclass(frozen=True)
class PyCode:
    id: int
    firstlineno: int
    globals_id: int
    qualname: str
    filename: str


@dataclass(frozen=True)
class PyFrame:
    """One Python frame: ``module.qualname (file:line)``."""

    module: str
    qualname: str
    filename: str
    line: int
    firstlineno: int

    def display(self, lines: str = "definition") -> str:
        line = self.line if lines == "current" else self.firstlineno
        name = f"{self.module}.{self.qualname}" if self.module else self.qualname
        return f"{name} ({_short_file(self.filename, self.module)}:{line})"


@dataclass(frozen=True)
class PyStack:
    """A Python stack, leaf first, split into eval-loop calls: ``groups[0]`` are the frames run
    by the innermost ``_PyEval_EvalFrameDefault``. ``truncated``: frames beyond the depth limit
    (at the root side) are missing."""

    groups: Tuple[Tuple[PyFrame, ...], ...]
    truncated: bool

    @property
    def frames(self) -> Tuple[PyFrame, ...]:
        return tuple(f for g in self.groups for f in g)


@dataclass
class JoinStats:
    """How the samples of a profile were matched with Python stacks."""

    exact: int = 0
    timestamp: int = 0
    carried: int = 0
    unmatched_python_threads: int = 0
    no_python: int = 0

    @property
    def with_python(self) -> int:
        return self.exact + self.timestamp + self.carried

    @property
    def rate(self) -> float:
        """Share of the samples on threads that ran Python that carry a Python stack."""
        n = self.with_python + self.unmatched_python_threads
        return self.with_python / n if n else 1.0


def _short_file(filename: str, module: str) -> str:
    base = os.path.basename(filename)
    if base == "__init__.py":
        parent = os.path.basename(os.path.dirname(filename))
        return f"{parent}/{base}" if parent else base
    return base or filename


def _module_from_file(filename: str) -> str:
    """A module name guessed from a file name (when the module map has no entry)."""
    if not filename or filename.startswith("<"):
        return ""
    base = os.path.basename(filename)
    stem = base[:-3] if base.endswith(".py") else base
    if stem == "__init__":
        stem = os.path.basename(os.path.dirname(filename)) or stem
    return stem


@dataclass
class _Source:
    """What one recording file (a self-contained set of definitions) holds."""

    codes: Dict[int, PyCode] = field(default_factory=dict)
    modules: Dict[int, str] = field(default_factory=dict)
    raw_stacks: Dict[int, Tuple[bool, List[Tuple[int, int]]]] = field(default_factory=dict)
    stacks: Dict[int, Optional[PyStack]] = field(default_factory=dict)
    exact: Dict[Tuple[int, int], int] = field(default_factory=dict)
    by_time_tsc: Dict[int, List[Tuple[int, int]]] = field(default_factory=dict)
    by_time_mono: Dict[int, List[Tuple[int, int]]] = field(default_factory=dict)
    threads: Set[int] = field(default_factory=set)
    stats: List[Dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    bad_events: int = 0


class PythonStacks:
    """The Python stacks of a recording, ready to be joined with its samples."""

    def __init__(self) -> None:
        self._sources: Dict[str, _Source] = {}

    # -- decoding -------------------------------------------------------------------------

    @classmethod
    def from_recording(cls, rec: "Recording") -> "PythonStacks":
        self = cls()
        for chunk in rec.chunks:
            self.add_chunk(chunk)
        for src in self._sources.values():
            for lst in list(src.by_time_tsc.values()) + list(src.by_time_mono.values()):
                lst.sort()
        return self

    def _source(self, chunk: "Chunk") -> _Source:
        key = getattr(chunk, "source", "")
        src = self._sources.get(key)
        if src is None:
            src = self._sources[key] = _Source()
        return src

    def add_chunk(self, chunk: "Chunk") -> None:
        src = self._source(chunk)
        for ev in chunk.events(["profiler.UserEvent"]):
            etype = ev.get("type")
            if not isinstance(etype, str) or not etype.startswith("asprof.Py"):
                continue
            data = ev.get("data")
            if not isinstance(data, str):
                continue
            try:
                payload = data.encode("latin-1")
                self._decode(src, etype, payload)
            except (IndexError, UnicodeError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
                src.bad_events += 1
        if src.bad_events:
            log.debug("asprof: %d malformed Python stack events in %s", src.bad_events, getattr(chunk, "source", "?"))

    def _decode(self, src: _Source, etype: str, b: bytes) -> None:
        if etype == "asprof.PyStats":
            src.stats.append(json.loads(b.decode("utf-8")))
            return
        if not b or b[0] != 1:
            src.bad_events += 1
            return
        i, n = 1, len(b)
        if etype == "asprof.PyCode":
            while i < n:
                cid, i = _varint(b, i)
                first, i = _varint(b, i)
                gid, i = _varint(b, i)
                qn, i = _string(b, i)
                fn, i = _string(b, i)
                src.codes[cid] = PyCode(cid, first, gid, qn, fn)
        elif etype == "asprof.PyStack":
            while i < n:
                sid, i = _varint(b, i)
                trunc, i = _varint(b, i)
                count, i = _varint(b, i)
                entries: List[Tuple[int, int]] = []
                for _ in range(count):
                    v, i = _varint(b, i)
                    if v >= 2:
                        line, i = _varint(b, i)
                        entries.append((v - 2, line))
                    else:
                        entries.append((-1 - v, 0))  # -1 boundary, -2 unknown code
                src.raw_stacks[sid] = (bool(trunc), entries)
        elif etype == "asprof.PySample":
            while i < n:
                tid, i = _varint(b, i)
                counter, i = _varint(b, i)
                tsc, i = _varint(b, i)
                mono, i = _varint(b, i)
                sid, i = _varint(b, i)
                src.samples += 1
                src.threads.add(tid)
                if counter:
                    src.exact[(tid, counter)] = sid
                src.by_time_tsc.setdefault(tid, []).append((tsc, sid))
                src.by_time_mono.setdefault(tid, []).append((mono, sid))
        elif etype == "asprof.PyModule":
            while i < n:
                gid, i = _varint(b, i)
                name, i = _string(b, i)
                src.modules[gid] = name

    def _stack(self, src: _Source, sid: int) -> Optional[PyStack]:
        if sid in src.stacks:
            return src.stacks[sid]
        raw = src.raw_stacks.get(sid)
        out: Optional[PyStack] = None
        if raw is not None:
            trunc, entries = raw
            groups: List[Tuple[PyFrame, ...]] = []
            cur: List[PyFrame] = []
            for cid, line in entries:
                if cid == -1:
                    groups.append(tuple(cur))
                    cur = []
                    continue
                code = src.codes.get(cid) if cid >= 0 else None
                if code is None:
                    cur.append(PyFrame("", "<unknown>", "", 0, 0))
                    continue
                module = src.modules.get(code.globals_id) or _module_from_file(code.filename)
                cur.append(PyFrame(module, code.qualname, code.filename, line, code.firstlineno))
            if cur:
                groups.append(tuple(cur))
            out = PyStack(tuple(groups), trunc)
        src.stacks[sid] = out
        return out

    # -- summary --------------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return not any(s.samples for s in self._sources.values())

    @property
    def sample_count(self) -> int:
        """Python stack samples found in the recording (compare with ``emitted``)."""
        return sum(s.samples for s in self._sources.values())

    @property
    def emitted(self) -> int:
        """Samples the agent reports having emitted (from its per-recording stats events)."""
        return sum(int(st.get("samples", 0)) for s in self._sources.values() for st in s.stats)

    @property
    def stats(self) -> List[Dict[str, Any]]:
        return [st for s in self._sources.values() for st in s.stats]

    def python_threads(self) -> Set[int]:
        return {t for s in self._sources.values() for t in s.threads}

    # -- the join -------------------------------------------------------------------------

    def lookup(self, chunk: "Chunk", tid: int, ticks: int, clock: Optional[str] = None) -> Tuple[Optional[PyStack], str]:
        """The Python stack of the sample of thread ``tid`` at ``ticks``: (stack, how)."""
        src = self._sources.get(getattr(chunk, "source", ""))
        if src is None:
            return None, "none"
        sid = src.exact.get((tid, ticks))
        if sid is not None:
            return self._stack(src, sid), "exact"
        got = self._time_join(src, chunk, tid, ticks, clock)
        if got is not None:
            return self._stack(src, got[1]), "timestamp"
        return None, "none"

    @staticmethod
    def _time_join(src: _Source, chunk: "Chunk", tid: int, ticks: int, clock: Optional[str]) -> Optional[Tuple[int, int]]:
        """(time, stack id) of our record a sample without an exact key joins: the first of its
        thread at most :data:`TIMESTAMP_WINDOW_NS` after it."""
        series = (src.by_time_mono if clock == "monotonic" else src.by_time_tsc).get(tid)
        if series:
            window = TIMESTAMP_WINDOW_NS
            tps = getattr(chunk, "ticks_per_second", None) or getattr(chunk, "frequency", None)
            if clock != "monotonic" and tps:
                window = int(window * tps / 1e9)
            k = bisect.bisect_left(series, (ticks, -1))
            if k < len(series) and 0 <= series[k][0] - ticks <= window:
                return series[k]
        return None

    def joined_time(self, chunk: "Chunk", tid: int, ticks: int, clock: Optional[str] = None) -> Optional[int]:
        """The timestamp (tsc, or monotonic ns) of the capture record the sample of thread ``tid``
        at ``ticks`` joins by timestamp; None when it has an exact key or joins none. A label
        record (issue #15) of that sample has this very timestamp."""
        src = self._sources.get(getattr(chunk, "source", ""))
        if src is None or src.exact:
            return None
        got = self._time_join(src, chunk, tid, ticks, clock)
        return got[0] if got is not None else None

    def stack_hook(self, rec: "Recording", mode: str = "mixed", lines: str = "definition",
                   stats: Optional[JoinStats] = None) -> Callable[["Chunk", int, int, Sequence[Frame]], Optional[Sequence[Frame]]]:
        """A ``stack_hook`` for :func:`asprof.jfr.profile.build_profile`.

        ``mode``: ``mixed`` (native frames with each eval-loop frame replaced by its Python
        frames) or ``python`` (Python frames only). ``lines``: ``definition`` (the function's
        first line, frames aggregate per function) or ``current`` (the line being run).
        """
        if mode not in ("mixed", "python"):
            raise ValueError(f"mode must be 'mixed' or 'python', got {mode!r}")
        if lines not in ("definition", "current"):
            raise ValueError(f"lines must be 'definition' or 'current', got {lines!r}")
        ftype = FrameType.PYTHON
        clock = rec.setting("clock")
        st = stats if stats is not None else JoinStats()
        threads = self.python_threads()
        carry: Dict[Tuple[str, int, Tuple[str, ...]], PyStack] = {}
        frame_cache: Dict[PyFrame, Frame] = {}
        truncated_frame = Frame("[truncated Python stack]", "[truncated Python stack]", "", ftype)

        def pyframe(f: PyFrame) -> Frame:
            fr = frame_cache.get(f)
            if fr is None:
                name = f.display(lines)
                fr = frame_cache[f] = Frame(name, f.qualname, f.module, ftype,
                                            f.line if lines == "current" else f.firstlineno)
            return fr

        def hook(chunk: "Chunk", tid: int, ticks: int, frames: Sequence[Frame]) -> Optional[Sequence[Frame]]:
            stack, how = self.lookup(chunk, tid, ticks, clock)
            native_key = (getattr(chunk, "source", ""), tid, tuple(f.name for f in frames))
            if stack is not None:
                carry[native_key] = stack
                if how == "exact":
                    st.exact += 1
                else:
                    st.timestamp += 1
            else:
                stack = carry.get(native_key)
                if stack is not None:
                    st.carried += 1
                elif tid in threads and any(EVAL_FRAME.match(f.name) for f in frames):
                    st.unmatched_python_threads += 1
                    return None
                else:
                    st.no_python += 1
                    return None
            return transform(frames, stack, mode, pyframe, truncated_frame)

        return hook


def transform(native: Sequence[Frame], stack: PyStack, mode: str,
              pyframe: Callable[[PyFrame], Frame], truncated_frame: Frame) -> List[Frame]:
    """Native frames (leaf first) + a Python stack -> the mixed or Python-only stack (leaf first)."""
    out: List["Frame"] = []
    if mode == "python":
        out.extend(pyframe(f) for f in stack.frames)
        if stack.truncated:
            out.append(truncated_frame)
        return out if out else list(native)
    groups = list(stack.groups)
    gi = 0
    for f in native:
        if EVAL_FRAME.match(f.name) and gi < len(groups):
            g = groups[gi]
            gi += 1
            if g:
                out.extend(pyframe(p) for p in g)
                continue
        out.append(f)
    # Python frames of eval-loop calls whose native frames are missing (native stack truncated
    # at its root side): keep them, outermost last.
    for g in groups[gi:]:
        out.extend(pyframe(p) for p in g)
    if stack.truncated:
        out.append(truncated_frame)
    return out


def stacks_of(rec: "Recording") -> "PythonStacks":
    """The decoded Python stacks of a recording (decoded once, kept on the recording)."""
    ps = getattr(rec, "_asprof_pystacks", None)
    if ps is None:
        ps = PythonStacks.from_recording(rec)
        try:
            setattr(rec, "_asprof_pystacks", ps)  # noqa: B010 - not an attribute of RecordingLike
        except AttributeError:  # pragma: no cover - a recording type with __slots__
            pass
    return ps


def python_stack_hook(rec: "Recording", mode: str = "mixed", lines: str = "definition",
                      stats: Optional[JoinStats] = None) -> Optional[Callable[..., Optional[Sequence["Frame"]]]]:
    """The stack hook for a recording, or None when it has no Python stacks.

    ``mode`` is ``mixed``, ``python`` or ``native`` (None but for inlined files). Files
    rewritten with their Python frames inline (issue #12, :mod:`asprof.jfrio.inline`: the
    side events were joined into the stacks and left out) are not joined again: ``mixed``
    keeps their stacks, ``python`` keeps their Python frames, ``native`` puts one
    ``_PyEval_EvalFrameDefault`` frame back in place of each run of Python frames."""
    inline = inline_sources(rec)
    base = None
    if mode != "native":
        ps = stacks_of(rec)
        if not ps.empty:
            base = ps.stack_hook(rec, mode=mode, lines=lines, stats=stats)
    if not inline or mode == "mixed":
        return base

    def hook(chunk: "Chunk", tid: int, ticks: int, frames: Sequence[Frame]) -> Optional[Sequence[Frame]]:
        if getattr(chunk, "source", "") in inline:
            return inline_view(frames, mode)
        return base(chunk, tid, ticks, frames) if base is not None else None

    return hook


_TRUNCATED = "[truncated Python stack]"
#: The frame that stands for an eval-loop call in the native view of an inlined file.
_EVAL = Frame("_PyEval_EvalFrameDefault", "_PyEval_EvalFrameDefault", "", FrameType.NATIVE)


def inline_sources(rec: "Recording") -> Set[str]:
    """The files of ``rec`` rewritten with their Python frames inline (issue #12)."""
    from asprof.jfrio.inline import SETTING

    out: Set[str] = set()
    for chunk in rec.chunks:
        if any(s.name == SETTING and s.value == "true" for s in chunk.settings):
            out.add(getattr(chunk, "source", ""))
    return out


def inline_view(frames: Sequence[Frame], mode: str) -> Optional[List[Frame]]:
    """A stack of an inlined file (leaf first) seen ``python``-only (its Python frames; None,
    i.e. unchanged, when it has none) or ``native`` (each run of Python frames one eval-loop
    frame again; exact but where the native stack was cut at its root side, whose Python
    frames the join keeps at the root: one more eval-loop frame there)."""
    py = FrameType.PYTHON
    if mode == "python":
        out = [f for f in frames if f.type == py]
        return out or None
    out = []
    for f in frames:
        if f.type == py and f.method == _TRUNCATED:
            continue  # the mark of a Python stack cut by the capture's depth limit
        if f.type == py:
            if not out or out[-1] is not _EVAL:
                out.append(_EVAL)
        else:
            out.append(f)
    return out
