"""Python allocation sampling and the live heap (issue #16), for either engine.

:class:`AllocSampler` drives the C module ``asprof.engines._alloc`` (``csrc/alloc``): allocator
hooks that sample about one allocation every ``python_alloc`` bytes, each with its Python stack,
and keep the sampled blocks that are still allocated (the live set). Every report it writes one
self-contained JFR chunk (:mod:`asprof.jfrio.writer`) with

- ``jdk.ObjectAllocationSample`` (startTime, eventThread, stackTrace, objectClass, weight) per
  sampled allocation, ``weight`` = the bytes the sample stands for
  (``size / (1 - exp(-size / interval))``), ``objectClass`` = the allocator domain
  (``PyObject_Malloc``, ``PyMem_Malloc``, ``PyMem_RawMalloc``);
- ``profiler.LiveObject`` (startTime = the report's end, eventThread, stackTrace, objectClass,
  allocationSize = the same weight, allocationTime) per sampled block still allocated then;
- ``jdk.ActiveSetting``: ``allocInterval``, ``liveCap``, ``lostSamples``, ``liveOverflow``,
  ``pid`` (the reader takes the newest live snapshot per process).

:class:`AllocEngine` wraps the engine that records CPU and wall samples: each recording it hands
over gets the chunk appended (a JFR file may hold several chunks; every reader reads them all).
Where the sampler cannot run (no frame walker for this interpreter, free-threaded build, the C
extension not built) it is off with one log line and the wrapped engine runs alone.
"""
from __future__ import annotations

import array
import logging
import os
import struct
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from asprof import osthreads
from asprof.engines.base import Engine, TickResult

if TYPE_CHECKING:
    from asprof.jfrio.writer import ChunkWriter
    from asprof.options import ProfilerOptions

__all__ = ["AllocSampler", "AllocEngine", "unavailable_reason", "DOMAINS", "wrap"]

logger = logging.getLogger("asprof")

#: objectClass of each allocator domain (index = the C module's domain number).
DOMAINS = ("PyMem_RawMalloc", "PyMem_Malloc", "PyObject_Malloc")
#: Seconds between two takes of the C module's samples (its buffer holds 65536).
COLLECT_EVERY = 2.0
MAX_FRAMES = 128
LIVE_CAP = 65536
#: Allocation samples held for one report at most (~200 bytes each); more are counted as lost.
MAX_PENDING = 200_000
#: The allocation chunk's metadata id: not the one of the chunk it follows (see ChunkWriter).
METADATA_ID = 0x7FFF0016
#: ... and pool keys no async-profiler chunk uses (its ids are far below; jfrconv reads keys as 32-bit ints).
KEY_BASE = 1 << 30
_RECORD = struct.Struct("<QQQdIiBBxx")

Frames = Tuple[Tuple[str, str, int], ...]  # (module, qualname, line), leaf first


def unavailable_reason() -> Optional[str]:
    """Why Python allocation sampling cannot run here, or None when it can."""
    import sysconfig

    if sys.implementation.name != "cpython":
        return f"it needs CPython (this is {sys.implementation.name})"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "the free-threaded build is not supported"
    if not sys.platform.startswith("linux"):
        return f"it runs on Linux only (this is {sys.platform})"
    try:
        from asprof.engines import _alloc
    except ImportError as e:
        return (f"its C extension asprof.engines._alloc is not built for Python "
                f"{sys.version_info[0]}.{sys.version_info[1]} (it needs the Python frame walker: {e})")
    if _alloc.python_frames_off is not None:  # pf_layout_check at import: its start() refuses too
        return f"its frame walker cannot read this interpreter's frames: {_alloc.python_frames_off}"
    return None


class AllocSampler:
    """The C hooks, a collector thread (``asprof-alloc``) and the live set's stacks."""

    def __init__(self, interval: int, live_cap: int = LIVE_CAP) -> None:
        from asprof.engines import _alloc
        from asprof.engines.builtin import _Names

        self._mod = _alloc
        self.interval = int(interval)
        self.live_cap = live_cap
        self._names = _Names()
        self._lock = osthreads.Lock()
        self._running = False
        self._orphan = False
        # pending allocation samples of the report being built: (ticks, tid, frames, domain, weight)
        self._pending: List[Tuple[int, int, Optional[Frames], int, float]] = []
        self._live: Dict[int, Tuple[int, int, Optional[Frames], int, float]] = {}  # serial -> sample
        self._frames: Dict[Frames, Frames] = {}  # interned stacks
        self._lost = 0
        self._lost_total = 0
        self._overflow_seen = 0
        self._frees_seen = -1
        self._unpruned = True  # entries added since the last prune may be of blocks freed before it
        self._wake = osthreads.Event()
        self._thread: Optional[Any] = None  # osthreads: a real OS thread even under gevent
        self._start_pair: Tuple[int, int] = (0, 0)

    # -- life-cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Installs the hooks and starts the collector; raises RuntimeError/OSError/ValueError."""
        from asprof.jfrio.writer import clock_pair

        with self._lock:
            self._mod.start(self.interval, MAX_FRAMES, self.live_cap)
            self._start_pair = clock_pair()
            self._running = True
            self._wake.clear()
            try:
                self._thread = osthreads.Thread(self._loop, "asprof-alloc")
                self._thread.start()
            except Exception:
                self._running = False
                self._thread = None
                self._mod.stop()
                raise
        logger.debug("Python allocation sampling on: every %d bytes on average", self.interval)

    def stop(self, final: bool = True) -> Optional[bytes]:
        """Stops sampling (hooks removed, or left as pass-throughs when wrapped since) and returns
        the last chunk (``final``)."""
        with self._lock:
            if not self._running or self._orphan:
                return None
            data = self._report(stopping=True) if final else None
            self._running = False
            left = self._mod.stop()
        if left:
            logger.info("Python allocation sampling stopped; %d allocator hook(s) stay as pass-throughs "
                        "(another allocator hook was installed on top of ours)", left)
        self._join()
        return data

    def close(self) -> None:
        try:
            with self._lock:
                if self._running and not self._orphan:
                    self._running = False
                    self._mod.stop()
                self._pending = []
                self._live = {}
            self._join()
        except Exception:  # noqa: BLE001 - must not raise
            logger.debug("stopping Python allocation sampling failed", exc_info=True)

    def before_fork(self) -> None:
        self._lock.acquire()

    def after_fork_in_parent(self) -> None:
        self._lock.release()

    def after_fork_in_child(self) -> None:
        # the C module's atfork handler emptied its state; the child's agent starts its own sampler
        self._orphan = True
        self._lock = osthreads.Lock()
        self._pending = []
        self._live = {}
        self._frames = {}

    def memory_bytes(self) -> int:
        try:
            held = int(self._mod.stats().get("memory_bytes", 0))
        except Exception:  # noqa: BLE001
            held = 0
        return held + 200 * (len(self._live) + len(self._pending))

    def stats(self) -> Dict[str, int]:
        out = dict(self._mod.stats())
        out["live_tracked"] = len(self._live)
        out["lost_total"] = self._lost_total
        return out

    # -- collecting -------------------------------------------------------------------------

    def _loop(self) -> None:
        from asprof.engines.builtin import _name_thread

        _name_thread("asprof-alloc")
        while not self._wake.wait(COLLECT_EVERY):
            try:
                with self._lock:
                    if not self._running or self._orphan:
                        return
                    self._collect()
            except Exception:  # noqa: BLE001 - the next collect or report tries again
                logger.error("collecting Python allocation samples failed", exc_info=True)

    def _join(self) -> None:
        self._wake.set()
        t, self._thread = self._thread, None
        if t is not None and not osthreads.is_current(t):
            t.join(5.0)

    def _collect(self) -> None:
        """Takes the C module's batch (lock held)."""
        codes, stacks, data, lost = self._mod.collect()
        self._lost += int(lost)
        names = self._names
        names._refresh()
        code_names = [(names.module(fn), qual or name) for name, qual, fn, _first in codes]
        first = [f for _n, _q, _fn, f in codes]
        resolved: List[Optional[Frames]] = []
        for pairs, _truncated in stacks:
            fr = tuple((code_names[pairs[i]][0], code_names[pairs[i]][1], pairs[i + 1] or first[pairs[i]])
                       for i in range(0, len(pairs) - 1, 2))
            resolved.append(self._frames.setdefault(fr, fr))
        pending = self._pending
        live = self._live
        room = MAX_PENDING - len(pending)
        for t, serial, _size, weight, tid, sid, domain, is_live in _RECORD.iter_unpack(data):
            sfr = resolved[sid] if 0 <= sid < len(resolved) else None
            rec = (t, tid, sfr, domain, weight)
            if room > 0:
                pending.append(rec)
                room -= 1
            else:
                self._lost += 1  # the report's share of memory is full: counted, said at the report
            if is_live:
                live[serial] = rec
        self._prune()

    def _prune(self) -> None:
        """Drops the live entries of blocks freed since (lock held): only when the C module saw
        a sampled block freed since the last time (the scan reads the whole table)."""
        frees = int(self._mod.stats().get("frees_tracked", 0))
        if frees == self._frees_seen and not self._unpruned:
            return
        self._frees_seen = frees
        self._unpruned = False
        serials = array.array("Q")
        serials.frombytes(self._mod.live())
        alive = set(serials)
        live = self._live
        for serial in [s for s in live if s not in alive]:
            del live[serial]
        if len(self._frames) > 4 * (len(live) + 1024):  # stacks no longer referred to
            keep = {rec[2] for rec in live.values() if rec[2] is not None}
            keep.update(rec[2] for rec in self._pending if rec[2] is not None)
            self._frames = {f: f for f in keep}

    # -- reports ----------------------------------------------------------------------------

    def report(self) -> Optional[bytes]:
        """The chunk of the report ending now (None when not running)."""
        with self._lock:
            if not self._running or self._orphan:
                return None
            return self._report(stopping=False)

    def _report(self, stopping: bool) -> Optional[bytes]:
        """A self-contained chunk from the previous report's end to now (lock held)."""
        from asprof.jfrio.writer import ChunkWriter, clock_pair

        start = self._start_pair
        w = ChunkWriter(start[0], start[1], metadata_id=METADATA_ID, key_base=KEY_BASE)
        end = clock_pair()
        if not self._add(w, end):
            return None
        try:
            return w.finish(end_ticks=end[1])
        except Exception as e:  # noqa: BLE001 - a bad report must not stop profiling
            logger.error("could not write the Python allocation report: %r", e)
            return None

    def add_to(self, w: "ChunkWriter", end: Tuple[int, int]) -> None:
        """Adds the report ending at ``end`` to another engine's chunk (the built-in engine's
        ``report_hook``)."""
        with self._lock:
            if self._running and not self._orphan:
                self._add(w, end)

    def _add(self, w: "ChunkWriter", end: Tuple[int, int]) -> bool:
        """Collects and writes the allocation samples and the live set into ``w`` (lock held).
        False when they could not be written (counted as lost, logged)."""
        try:
            self._collect()
        except Exception:  # noqa: BLE001 - the samples stay for the next report
            logger.error("collecting Python allocation samples failed", exc_info=True)
        self._start_pair = end
        pending, self._pending = self._pending, []
        lost, self._lost = self._lost, 0
        try:
            self._write(w, end, pending, lost)
        except Exception as e:  # noqa: BLE001 - a bad report must not stop profiling
            self._lost_total += len(pending) + lost
            logger.error("could not write the Python allocation report (%d samples lost): %r", len(pending), e)
            return False
        if lost:
            self._lost_total += lost
            logger.warning("Python allocation sampling lost %d samples since the last report (its buffers were full)", lost)
        return True

    def _write(self, w: "ChunkWriter", end: Tuple[int, int],
               pending: Sequence[Tuple[int, int, Optional[Frames], int, float]], lost: int) -> None:
        from asprof.jfrio.writer import FRAME_PYTHON, varint

        stack_keys: Dict[Optional[Frames], int] = {}

        def stack(fr: Optional[Frames]) -> int:
            k = stack_keys.get(fr)
            if k is None:
                if fr is None:
                    k = w.stack([(w.python_method("[no Python frames]", "[no Python frames]"), 0, FRAME_PYTHON)])
                else:
                    k = w.stack([(w.python_method(m, q), line, FRAME_PYTHON) for m, q, line in fr],
                                truncated=len(fr) >= MAX_FRAMES)
                stack_keys[fr] = k
            return k

        classes = [w.klass(d) for d in DOMAINS]
        threads = self._names.threads()
        # the profiler's own threads (asprof-agent, asprof-alloc, reporters) are not the application
        own = {tid for tid, name in threads.items() if name.startswith("asprof-")}
        if own:
            pending = [p for p in pending if p[1] not in own]
        # the writer's fast path (sample: startTime, thread, stackTrace, one pool key, then the other
        # fields encoded): the same bytes as event() for these types, a third of its time
        al_type, lo_type = "jdk.ObjectAllocationSample", "profiler.LiveObject"
        put = w.sample
        for t, tid, fr, domain, weight in pending:  # ..., objectClass, weight
            put(al_type, t, tid, stack(fr), classes[domain], varint(max(1, round(weight))))
        for t, tid, fr, domain, weight in list(self._live.values()):  # ..., allocationSize, allocationTime
            put(lo_type, end[1], tid, stack(fr), classes[domain], varint(max(1, round(weight))) + varint(t))
        stats = self._mod.stats()
        overflow = int(stats.get("live_overflow", 0))
        new_overflow, self._overflow_seen = overflow - self._overflow_seen, overflow
        if new_overflow > 0:
            logger.warning("the Python live set is full (%d blocks): %d sampled allocations were not followed "
                           "to their free since the last report", self.live_cap, new_overflow)
        al, lo = "jdk.ObjectAllocationSample", "profiler.LiveObject"
        for owner, key, value in (
            (al, "enabled", "true"), (al, "allocInterval", str(self.interval)), (al, "lostSamples", str(lost)),
            (lo, "enabled", "true"), (lo, "allocInterval", str(self.interval)), (lo, "liveCap", str(self.live_cap)),
            (lo, "liveOverflow", str(max(0, new_overflow))), (lo, "pid", str(os.getpid())),
        ):
            w.setting(owner, key, value)
        for tid in w.unnamed_threads():
            w.thread(tid, threads.get(tid) or f"[tid={tid}]")


class AllocEngine(Engine):
    """Wraps the engine that records CPU and wall samples and appends the allocation chunk to
    every recording it hands over (or hands the chunk over alone when it has none)."""

    def __init__(self, inner: Engine, sampler: AllocSampler) -> None:
        self.inner = inner
        self.sampler: Optional[AllocSampler] = sampler
        self.name: str = getattr(inner, "name", "async-profiler")
        # the built-in engine writes its own chunk: the samples go into it (one chunk per report)
        self._hooked = hasattr(inner, "report_hook")

    def __getattr__(self, item: str) -> Any:  # the wrapped engine's other attributes (cpu_mode, ...)
        if item == "inner":
            raise AttributeError(item)
        return getattr(self.inner, item)

    def start(self) -> None:
        s = self.sampler
        if s is not None:
            try:
                s.start()
            except Exception as e:  # noqa: BLE001 - CPU and wall profiling go on without it
                logger.warning("Python allocation sampling could not start (profiling goes on without it): %s", e)
                s = self.sampler = None
        if s is not None and self._hooked:
            hooked: Any = self.inner
            hooked.report_hook = s.add_to
        try:
            self.inner.start()
        except BaseException:
            if s is not None:
                s.close()
            raise

    def tick(self) -> TickResult:
        r = self.inner.tick()
        s = self.sampler
        if s is None or self._hooked:
            return r
        chunk = s.report()
        if not chunk:
            return r
        return TickResult((r.recording or b"") + chunk, r.restart_error)

    def stop(self) -> Optional[bytes]:
        data = self.inner.stop()  # the built-in engine's last report calls the hook
        s = self.sampler
        chunk = s.stop(final=not self._hooked) if s is not None else None
        if not chunk:
            return data
        return (data or b"") + chunk

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            if self.sampler is not None:
                self.sampler.close()

    def before_fork(self) -> bool:
        ok = self.inner.before_fork()
        if self.sampler is not None:
            self.sampler.before_fork()
        return ok

    def after_fork_in_parent(self) -> None:
        if self.sampler is not None:
            self.sampler.after_fork_in_parent()
        self.inner.after_fork_in_parent()

    def after_fork_in_child(self) -> None:
        if self.sampler is not None:
            self.sampler.after_fork_in_child()
        self.inner.after_fork_in_child()

    def memory_bytes(self) -> Optional[int]:
        m = self.inner.memory_bytes()
        if self.sampler is None:
            return m
        return (m or 0) + self.sampler.memory_bytes()

    def cpu_seconds_elsewhere(self) -> float:
        return self.inner.cpu_seconds_elsewhere()


def wrap(engine: Engine, options: "ProfilerOptions") -> Engine:
    """``engine`` with Python allocation sampling when ``options.python_alloc`` asks for it and
    it can run here (else ``engine`` itself, with one log line saying why)."""
    interval = getattr(options, "python_alloc", None)
    if interval is None:
        return engine
    why = unavailable_reason()
    if why is not None:
        logger.warning("Python allocation sampling is off: %s", why)
        return engine
    return AllocEngine(engine, AllocSampler(int(interval), LIVE_CAP))
