"""Samples aggregated into a profile: unique stacks with weights.

A :class:`Profile` is what every view (collapsed, HTML, pprof, top) reads.
It is built from a :class:`~asprof.jfr.reader.Recording` by
:func:`build_profile` (``Recording.samples``), with async-profiler's
converter semantics:

========== ======================================================= =========
kind       events                                                  weight
========== ======================================================= =========
cpu        ``jdk.ExecutionSample`` in state ``STATE_DEFAULT``       1 sample
wall       ``profiler.WallClockSample`` (and legacy ExecutionSample  ``samples``
           in another state)
nativemem  ``profiler.Malloc``                                      ``size`` bytes
leaks      ``profiler.Malloc`` whose address is not freed later     ``size`` bytes
alloc      ``jdk.ObjectAllocationSample`` (Python, issue #16)       ``weight`` bytes
live       ``profiler.LiveObject``, newest snapshot per process     bytes
========== ======================================================= =========

Stacks can be replaced per sample by another source with the ``stack_hook``
argument (the seam for joining in Python-level stacks later).
"""
from __future__ import annotations

import re
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Optional,
    Pattern,
    Sequence,
    Set,
    Tuple,
    Union,
)

from asprof.jfr import _parser
from asprof.jfr.model import Frame, Thread

if TYPE_CHECKING:  # pragma: no cover
    from asprof.jfr.chunk import Chunk
    from asprof.jfr.chunk import RecordingLike as Recording

__all__ = ["Profile", "FrameKey", "build_profile", "KINDS", "TimeSpec"]

KINDS = ("cpu", "wall", "nativemem", "leaks", "alloc", "live")  # alloc, live: issue #16 (jfr/allocations.py)
_SAMPLE_KINDS = (_parser.KIND_EXEC, _parser.KIND_WALL)
_MEM_KINDS = (_parser.KIND_MALLOC, _parser.KIND_FREE)


def _kinds_for(kind: str) -> Tuple[int, ...]:
    """Which sample events a profile kind needs decoded."""
    return _MEM_KINDS if kind in ("nativemem", "leaks") else _SAMPLE_KINDS


#: (native memory kind, Python allocation kind (issue #16), count) -> the unit of a profile
_UNITS = {(True, False, False): "bytes", (True, False, True): "samples", (False, True, False): "bytes",
          (False, True, True): "objects", (False, False, False): "samples", (False, False, True): "samples"}
_KIND_CODE = {"cpu": _parser.KIND_EXEC, "wall": _parser.KIND_WALL, "nativemem": _parser.KIND_MALLOC}

#: A frame of a profile: (display name, frame type). Thread frames use ``THREAD``.
FrameKey = Tuple[str, int]
THREAD = 100  # frame type of the synthetic per-thread root frames
LABEL = 101  # frame type of the synthetic per-label root frames (issue #15: by_label)

if TYPE_CHECKING:  # pragma: no cover
    from datetime import datetime, timedelta

TimeSpec = Union[None, "datetime", "timedelta", int, float]
#: ``stack_hook(chunk, thread_key, ticks, frames)`` may return replacement frames (leaf first).
StackHook = Callable[["Chunk", int, int, Sequence[Frame]], Optional[Sequence[Frame]]]


class Profile:
    """Unique stacks (root first, as frame ids) -> ``[weight, count]``.

    ``frames[i]`` is the ``(name, type)`` of frame id ``i``. ``unit`` is
    ``samples`` (cpu, wall) or ``bytes`` (nativemem, leaks); ``count`` is the
    number of events. ``interval_ns`` is the sampling interval when known, so
    that ``weight * interval_ns`` is time.
    """

    def __init__(self, kind: str, unit: str, interval_ns: Optional[int] = None, start_nanos: int = 0,
                 end_nanos: int = 0, source: str = "", by_thread: bool = False) -> None:
        self.kind = kind
        self.unit = unit
        self.frames: List[FrameKey] = []
        self.stacks: Dict[Tuple[int, ...], List[int]] = {}
        self.interval_ns = interval_ns
        self.start_nanos = start_nanos
        self.end_nanos = end_nanos
        self.source = source
        self.by_thread = by_thread
        self._index: Dict[FrameKey, int] = {}
        self._frame_caches: Dict[int, Dict[Any, int]] = {}  # per chunk: (method, type) -> frame id
        #: issue #15 (``with_labels``): (stack, label pairs) -> [weight, count]
        self.labelled: Dict[Tuple[Tuple[int, ...], Tuple[Tuple[str, str], ...]], List[int]] = {}

    def __repr__(self) -> str:
        return f"<Profile {self.kind}: {len(self.stacks)} stacks, total {self.total} {self.unit}>"

    def intern(self, name: str, ftype: int) -> int:
        key = (name, ftype)
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.frames)
            self.frames.append(key)
        return i

    def add(self, stack: Tuple[int, ...], weight: int, count: int) -> None:
        e = self.stacks.get(stack)
        if e is None:
            self.stacks[stack] = [weight, count]
        else:
            e[0] += weight
            e[1] += count

    @property
    def total(self) -> int:
        return sum(e[0] for e in self.stacks.values())

    @property
    def total_count(self) -> int:
        return sum(e[1] for e in self.stacks.values())

    def __len__(self) -> int:
        return len(self.stacks)

    def items(self) -> Iterable[Tuple[List[FrameKey], int]]:
        """(frames root first, weight) per unique stack."""
        fr = self.frames
        for stack, (w, _c) in self.stacks.items():
            yield [fr[i] for i in stack], w

    def describe_value(self) -> str:
        if self.unit in ("bytes", "objects"):
            return self.unit
        return "samples"


def _to_nanos(spec: TimeSpec, rec_start: int, rec_end: int) -> Optional[int]:
    if spec is None:
        return None
    from datetime import datetime, timedelta, timezone  # lazily: keeps the command's start-up short

    if isinstance(spec, datetime):
        if spec.tzinfo is None:
            spec = spec.astimezone()
        delta = spec - datetime(1970, 1, 1, tzinfo=timezone.utc)
        return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    if isinstance(spec, timedelta):
        ns = int(spec.total_seconds() * 1e9)
    elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
        ns = int(spec * 1e9)
    else:
        raise TypeError(f"unsupported time specification {spec!r}")
    return rec_end + ns if ns < 0 else rec_start + ns


def _compile(patterns: Union[None, str, Pattern[str], Iterable[Union[str, Pattern[str]]]]) -> List[Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(p if isinstance(p, re.Pattern) else re.compile(p))
        except re.error as e:
            raise ValueError(f"invalid regular expression {p!r}: {e}") from None
    return out


def _thread_matcher(threads: Union[None, str, int, Iterable[Union[str, int]]]) -> Optional[Callable[[Thread], bool]]:
    if threads is None:
        return None
    if isinstance(threads, (str, int)):
        threads = [threads]
    ids: Set[int] = set()
    names: Set[str] = set()
    pats: List[Pattern[str]] = []
    for t in threads:
        if isinstance(t, int):
            ids.add(t)
        elif isinstance(t, str) and t.isdigit():
            ids.add(int(t))
            names.add(t)
        else:
            names.add(str(t))
            try:
                pats.append(re.compile(str(t)))
            except re.error:
                pass

    def match(th: Thread) -> bool:
        if th.key in ids or th.os_thread_id in ids:
            return True
        for n in (th.name, th.os_name, th.java_name, th.label):
            if n is not None and (n in names or any(p.fullmatch(n) for p in pats)):
                return True
        return False

    return match


def _cpu_states(chunk: "Chunk") -> Optional[Set[int]]:
    pool = chunk.pool("jdk.types.ThreadState")
    default = {k for k, v in pool.items() if v == "STATE_DEFAULT"}
    # JDK recordings have no STATE_DEFAULT: there every ExecutionSample is CPU.
    return default if default else None


def _interval_ns(rec: "Recording", kind: str) -> Optional[int]:
    name = "interval" if kind == "cpu" else "wall" if kind == "wall" else None
    if name is None:
        return None
    v = rec.setting(name)
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        return None
    if n == 0:
        return 10_000_000 if kind == "cpu" else 50_000_000
    return n


def _auto_kind(rec: "Recording") -> str:
    counts = rec.counts
    for kind, etype in (("cpu", "jdk.ExecutionSample"), ("wall", "profiler.WallClockSample"),
                        ("nativemem", "profiler.Malloc"), ("alloc", "jdk.ObjectAllocationSample")):
        if counts.get(etype, (0, 0))[0]:
            return kind
    return "cpu"


def build_profile(
    rec: "Recording",
    kind: str = "cpu",
    *,
    threads: Union[None, str, int, Iterable[Union[str, int]]] = None,
    start: TimeSpec = None,
    end: TimeSpec = None,
    include: Any = None,
    exclude: Any = None,
    by_thread: bool = False,
    count: bool = False,
    tail: float = 0.1,
    stack_hook: Optional[StackHook] = None,
    python: str = "mixed",
    where: Optional[Dict[str, str]] = None,
    by_label: Optional[str] = None,
    with_labels: bool = False,
) -> Profile:
    """Aggregate the samples of ``rec`` into a :class:`Profile`.

    * ``kind``: ``cpu``, ``wall``, ``nativemem``, ``leaks``, ``alloc``, ``live``
      (Python allocations and the live heap: :mod:`asprof.jfr.allocations`) or ``auto``
      (the first of cpu, wall, nativemem, alloc that has events).
    * ``threads``: keep samples of these threads (names, regexes matched on
      the whole name, or OS thread ids).
    * ``by_thread``: put a ``[name tid=N]`` frame at the root of each stack.
    * ``start``/``end``: time range; a ``datetime`` is absolute, a number of
      seconds or a ``timedelta`` is an offset from the recording's start
      (negative: from its end).
    * ``include``/``exclude``: regexes (or lists of them) that must match a
      whole frame name (as in async-profiler's converter): keep only stacks
      with a frame matching ``include``, drop stacks with a frame matching
      ``exclude``.
    * ``count``: weigh every event 1 (number of samples / allocations); for
      ``alloc`` and ``live``, the estimated number of objects.
    * ``tail`` (leaks): ignore allocations made in the last ``tail`` fraction
      of the recording, too young to call leaks (async-profiler's default 0.1).
    * ``stack_hook``: called per sample with ``(chunk, thread key, ticks,
      frames)``; a non-None result replaces the sample's frames (leaf first).
    * ``python`` (issue #5): for recordings carrying Python stacks (asprof's
      ``asprof.Py*`` user events), CPU and wall samples get ``mixed`` stacks
      (each ``_PyEval_EvalFrameDefault`` replaced by its Python frames, the
      default), ``python`` (Python frames only) or ``native`` (unchanged).
    * issue #15, request labels (``asprof.labels``): ``where`` keeps the samples whose
      labels have these values (``{"endpoint": "/checkout"}``; an empty value: the label is
      absent); ``by_label`` puts a ``[key=value]`` frame at the root of each stack;
      ``with_labels`` also fills ``Profile.labelled`` (stack, label pairs) for pprof.
    """
    if kind == "auto":
        kind = _auto_kind(rec)
    if kind not in KINDS:
        raise ValueError(f"unknown profile kind {kind!r} (expected one of {', '.join(KINDS)})")
    if not 0.0 <= tail <= 1.0:
        raise ValueError("tail must be between 0 and 1")
    # ---- issue #5: Python frames (asprof/jfr/pystacks.py) ----
    if python not in ("mixed", "python", "native"):
        raise ValueError(f"python must be 'mixed', 'python' or 'native', got {python!r}")
    if stack_hook is None and kind in ("cpu", "wall"):  # native: for inlined files (issue #12)
        from asprof.jfr.pystacks import python_stack_hook

        stack_hook = python_stack_hook(rec, mode=python)
    # ---- end of issue #5 ----
    # ---- issue #15: request labels (asprof/jfr/labels.py) ----
    labels = _Labels.make(rec, where, by_label, with_labels)
    # ---- end of issue #15 ----
    inc = _compile(include)
    exc = _compile(exclude)
    tmatch = _thread_matcher(threads)
    rs, re_ = rec.start_nanos, rec.end_nanos
    t0n = _to_nanos(start, rs, re_)
    t1n = _to_nanos(end, rs, re_)
    unit = _UNITS[(kind in ("nativemem", "leaks"), kind in ("alloc", "live"), count)]
    prof = Profile(kind=kind, unit=unit, interval_ns=_interval_ns(rec, kind), source=rec.source,
                   start_nanos=rs, end_nanos=re_, by_thread=by_thread)
    lo64, hi64 = -(1 << 63), (1 << 63) - 1

    def chunk_range(c: "Chunk") -> Tuple[int, int]:
        a = lo64 if t0n is None else max(lo64, min(hi64, c.nanos_to_ticks(t0n)))
        b = hi64 if t1n is None else max(lo64, min(hi64, c.nanos_to_ticks(t1n)))
        return a, b

    def thread_keys(c: "Chunk") -> Optional[Set[int]]:
        if tmatch is None:
            return None
        return {t.key for t in c.threads if tmatch(t)}

    match_cache: Dict[int, Tuple[bool, bool]] = {}

    def keep(stack: Tuple[int, ...]) -> bool:
        if not inc and not exc:
            return True
        any_inc = False
        for fid in stack:
            m = match_cache.get(fid)
            if m is None:
                name = prof.frames[fid][0]
                m = (any(p.fullmatch(name) for p in inc), any(p.fullmatch(name) for p in exc))
                match_cache[fid] = m
            if m[1]:
                return False
            any_inc = any_inc or m[0]
        return any_inc or not inc

    def emit(c: "Chunk", agg: Dict[Any, List[int]], stack_cache: Dict[int, Tuple[int, ...]]) -> None:
        for key, (w, n) in agg.items():
            if by_thread:
                skey, tkey = key
            else:
                skey, tkey = key, 0
            frames = stack_cache.get(skey)
            if frames is None:
                frames = _stack_ids(prof, c, skey)
                stack_cache[skey] = frames
            if by_thread:
                frames = (prof.intern(c.thread(tkey).label, THREAD),) + frames
            if keep(frames):
                prof.add(frames, w, n)

    if kind in ("alloc", "live"):  # issue #16: Python allocations and the live heap
        return _alloc_profile(prof, rec, (t0n, t1n), thread_keys, keep, by_thread, count)

    if kind == "leaks":
        lm = _parser.LeakMap()
        lo: Optional[int] = None
        hi: Optional[int] = None
        for ci, c in enumerate(rec.chunks):
            a, b = chunk_range(c)
            r = lm.add_chunk(c.columns_of(_MEM_KINDS), ci, a, b, thread_keys(c))
            if r is not None:
                ln, hn = c.ticks_to_nanos(r[0]), c.ticks_to_nanos(r[1])
                lo = ln if lo is None else min(lo, ln)
                hi = hn if hi is None else max(hi, hn)
        if lo is None or hi is None:
            return prof
        cutoff = hi - int((hi - lo) * tail)  # exact integers: nanos overflow a double's precision
        live = lm.live()
        for ci in sorted(live):
            c = rec.chunks[ci]
            tcut = c.nanos_to_ticks(cutoff)
            rows = _array_q(sorted(row for row, ticks in live[ci] if ticks <= tcut))
            if len(rows):
                _collect(prof, c, rows, by_thread, count, stack_hook, emit, _MEM_KINDS, labels)
        return prof

    code = _KIND_CODE[kind]
    for c in rec.chunks:
        a, b = chunk_range(c)
        if stack_hook is None and labels is None:
            agg = _parser.aggregate_select(c.columns_of(_kinds_for(kind)), code, _cpu_states(c), a, b, thread_keys(c), by_thread, count)
            emit(c, agg, {})
            continue
        rows = _parser.select_rows(c.columns_of(_kinds_for(kind)), code, _cpu_states(c), a, b, thread_keys(c))
        if len(rows):
            _collect(prof, c, rows, by_thread, count, stack_hook, emit, _kinds_for(kind), labels)
    return prof


def _alloc_profile(prof: Profile, rec: "Recording", span: Tuple[Optional[int], Optional[int]],
                   thread_keys: Callable[["Chunk"], Optional[Set[int]]], keep: Callable[[Tuple[int, ...]], bool],
                   by_thread: bool, count: bool) -> Profile:
    """``alloc`` and ``live`` (issue #16): bytes (or, ``count``, objects) per stack."""
    from asprof.jfr.allocations import alloc_aggregates

    for c, agg in alloc_aggregates(rec, prof.kind, span[0], span[1], thread_keys, by_thread):
        cache: Dict[int, Tuple[int, ...]] = {}
        for (skey, tkey), (nbytes, objs) in agg.items():
            fids = cache.get(skey)
            if fids is None:
                fids = cache[skey] = _stack_ids(prof, c, skey)
            if by_thread:
                fids = (prof.intern(c.thread(tkey).label, THREAD),) + fids
            if keep(fids):
                n = max(1, round(objs))
                prof.add(fids, n if count else round(nbytes), n)
    return prof


def _array_q(values: List[int]) -> Any:
    import array

    return array.array("q", values)


class _Labels:
    """Issue #15: the label of each sample (``where`` filter, ``by_label`` root frame,
    ``with_labels`` for pprof's sample labels)."""

    def __init__(self, rec: "Recording", where: Dict[str, str], by_label: Optional[str], keep: bool) -> None:
        from asprof.jfr.labels import context_of

        self.data = context_of(rec)
        self.clock = rec.setting("clock")
        self.where = tuple(where.items())
        self.by = by_label
        self.keep = keep

    def of(self, c: "Chunk", tkey: int, ticks: int) -> Optional[Tuple[Tuple[str, str], ...]]:
        return self.data.lookup(c, tkey, ticks, self.clock)

    @classmethod
    def make(cls, rec: "Recording", where: Optional[Dict[str, str]], by_label: Optional[str],
             keep: bool) -> Optional["_Labels"]:
        return cls(rec, where or {}, by_label, keep) if where or by_label or keep else None

    def matches(self, pairs: Optional[Tuple[Tuple[str, str], ...]]) -> bool:
        if not self.where:
            return True
        d = dict(pairs or ())
        return all(d.get(k) == v or (v == "" and k not in d) for k, v in self.where)

    def root(self, prof: Profile, pairs: Optional[Tuple[Tuple[str, str], ...]]) -> int:
        value = dict(pairs or ()).get(self.by or "")
        return prof.intern(f"[{self.by}={value}]" if value is not None else f"[{self.by}=<none>]", LABEL)


def _collect(prof: Profile, c: "Chunk", rows: Any, by_thread: bool, count: bool,
             stack_hook: Optional[StackHook],
             emit: Callable[["Chunk", Dict[Any, List[int]], Dict[int, Tuple[int, ...]]], None],
             kinds: Tuple[int, ...], labels: Optional[_Labels] = None) -> None:
    cols = c.columns_of(kinds)
    if stack_hook is None and labels is None:
        agg = _parser.aggregate(cols, rows, by_thread, count)
        emit(c, agg, {})
        return
    stack_cache: Dict[int, Tuple[int, ...]] = {}
    for r in rows:
        skey, tkey, ticks = cols.stack[r], cols.thread[r], cols.time[r]
        pairs = None
        if labels is not None:
            pairs = labels.of(c, tkey, ticks)
            if not labels.matches(pairs):
                continue
        if stack_hook is not None:
            st = c.stack_trace(skey)
            frames: Sequence[Frame] = st.frames if st is not None else ()
            repl = stack_hook(c, tkey, ticks, frames)
            if repl is not None:
                frames = repl
            ids = tuple(prof.intern(f.name, int(f.type)) for f in reversed(frames))
        else:
            got = stack_cache.get(skey)
            if got is None:
                got = stack_cache[skey] = _stack_ids(prof, c, skey)
            ids = got
        if by_thread:
            ids = (prof.intern(c.thread(tkey).label, THREAD),) + ids
        if labels is not None and labels.by:
            ids = (labels.root(prof, pairs),) + ids
        w = 1 if count else cols.value[r]
        prof.add(ids, w, 1)
        if labels is not None and labels.keep:
            lk = (ids, pairs or ())
            e = prof.labelled.get(lk)
            if e is None:
                prof.labelled[lk] = [w, 1]
            else:
                e[0] += w
                e[1] += 1


def _stack_ids(prof: Profile, c: "Chunk", skey: int) -> Tuple[int, ...]:
    """Frame ids of a chunk's stack trace, root first."""
    stacks = c.stacks
    idx = stacks.index.get(skey)
    if idx is None:
        return ()
    a, b = stacks.starts[idx], stacks.starts[idx + 1]
    meth, ftp = stacks.method, stacks.ftype
    cache = _frame_cache(prof, c)
    out = []
    for k in range(b - 1, a - 1, -1):
        m, ft = meth[k], ftp[k]
        key = (m << 8) | ft if 0 <= ft < 256 and m >= 0 else (m, ft)
        fid = cache.get(key)
        if fid is None:
            display, _m, _o, ftype = c.method(m, ft)
            fid = cache[key] = prof.intern(display, int(ftype))
        out.append(fid)
    return tuple(out)


def _frame_cache(prof: Profile, c: "Chunk") -> Dict[Any, int]:
    """(method key, frame type key) -> frame id of ``prof``, per chunk."""
    cache = prof._frame_caches.get(id(c))
    if cache is None:
        cache = prof._frame_caches[id(c)] = {}
    return cache
