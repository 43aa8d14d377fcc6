"""Python allocation profiles (issue #16): ``alloc`` and ``live``.

========== ==================================================== ====================================
kind       events                                               weight
========== ==================================================== ====================================
alloc      ``jdk.ObjectAllocationSample``                       ``weight``: the bytes each sample
                                                                stands for
live       ``profiler.LiveObject`` of the newest snapshot of    ``allocationSize`` (asprof writes
           each process (a report holds the sampled blocks      the same estimate as ``weight``)
           still allocated when it was written)
========== ==================================================== ====================================

The count of a stack is the estimated number of objects: asprof samples an allocation of ``s``
bytes with probability ``p = 1 - exp(-s / interval)`` and writes ``weight = s / p``; with the
recording's ``allocInterval`` setting ``s`` is recovered from the weight (the weight is an
increasing function of ``s``) and the sample stands for ``1 / p = weight / s`` objects. Without
the setting (another producer's events) every event counts 1.

Several reports of one process each hold a snapshot of the live set: summing them would count
a block once per report, so ``live`` takes, per process (the chunk's ``pid`` setting, else its
source file), the newest snapshot that ends within ``start``/``end``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from asprof.jfr.chunk import Chunk
    from asprof.jfr.chunk import RecordingLike as Recording

__all__ = ["ALLOC_KINDS", "alloc_aggregates", "size_of_weight"]

ALLOC_KINDS = ("alloc", "live")
_EVENT = {"alloc": "jdk.ObjectAllocationSample", "live": "profiler.LiveObject"}
_VALUE = {"alloc": "weight", "live": "allocationSize"}


def size_of_weight(weight: float, interval: float) -> float:
    """The allocation size ``s`` whose sampling weight ``s / (1 - exp(-s / interval))`` is
    ``weight`` (at least 1 byte)."""
    if interval <= 0 or weight <= interval:
        return 1.0
    lo, hi = 0.0, float(weight)
    for _ in range(64):
        mid = (lo + hi) / 2
        w = interval if mid == 0 else mid / -math.expm1(-mid / interval)
        if w < weight:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-3:
            break
    return max(1.0, (lo + hi) / 2)


def _setting(c: "Chunk", name: str, owner: Optional[str] = None) -> Optional[str]:
    oid = None
    if owner is not None:
        t = c.types.get(owner)
        oid = int(t.id) if t is not None else None
    value = None
    for s in c.settings:
        if s.name == name and (oid is None or s.event_id == oid):
            value = s.value
    return value


def _interval(c: "Chunk") -> Optional[float]:
    v = _setting(c, "allocInterval")
    try:
        n = float(v) if v is not None else 0.0
    except ValueError:
        return None
    return n if n > 0 else None


def _ref_key(v: Any) -> int:
    k = getattr(v, "key", v)
    return k if isinstance(k, int) and not isinstance(k, bool) else 0


Aggregates = Dict[Tuple[int, int], List[float]]  # (stack key, thread key or 0) -> [bytes, objects]


def alloc_aggregates(rec: "Recording", kind: str, t0n: Optional[int], t1n: Optional[int],
                     thread_keys: Callable[["Chunk"], Optional[Set[int]]],
                     by_thread: bool) -> Iterator[Tuple["Chunk", Aggregates]]:
    """Per chunk, the bytes and estimated objects of each (stack, thread) of the ``alloc`` or
    ``live`` events in the time range (``live``: the newest snapshot per process, see above)."""
    if kind not in ALLOC_KINDS:
        raise ValueError(f"unknown allocation profile kind {kind!r}")
    etype, vname = _EVENT[kind], _VALUE[kind]
    chunks = [c for c in rec.chunks if c.counts.get(etype, (0, 0))[0]]
    if kind == "live":
        chunks = _newest_snapshots(chunks, t0n, t1n)
    for c in chunks:
        interval = _interval(c)
        tkeys = thread_keys(c)
        a = None if t0n is None or kind == "live" else c.nanos_to_ticks(t0n)
        b = None if t1n is None or kind == "live" else c.nanos_to_ticks(t1n)
        agg: Aggregates = {}
        sizes: Dict[int, float] = {}
        for ev in c.events([etype]):
            raw = ev.raw
            t = raw.get("startTime")
            if isinstance(t, int) and ((a is not None and t < a) or (b is not None and t > b)):
                continue
            tkey = _ref_key(raw.get("eventThread"))
            if tkeys is not None and tkey not in tkeys:
                continue
            w = raw.get(vname)
            if not isinstance(w, int) or isinstance(w, bool) or w <= 0:
                continue
            if interval is None:
                objs = 1.0
            else:
                s = sizes.get(w)
                if s is None:
                    s = sizes[w] = size_of_weight(w, interval)
                objs = w / s
            key = (_ref_key(raw.get("stackTrace")), tkey if by_thread else 0)
            e = agg.get(key)
            if e is None:
                agg[key] = [float(w), objs]
            else:
                e[0] += w
                e[1] += objs
        yield c, agg


def _newest_snapshots(chunks: List["Chunk"], t0n: Optional[int], t1n: Optional[int]) -> List["Chunk"]:
    """Per process, the newest chunk with live objects whose snapshot time is within the range."""
    best: Dict[str, Tuple[int, "Chunk"]] = {}
    for c in chunks:
        at = c.end_nanos
        if (t0n is not None and at < t0n) or (t1n is not None and at > t1n):
            continue
        pid = _setting(c, "pid", "profiler.LiveObject")
        proc = f"pid {pid}" if pid else c.source
        cur = best.get(proc)
        if cur is None or at >= cur[0]:
            best[proc] = (at, c)
    return [c for _at, c in sorted(best.values(), key=lambda x: x[0])]
