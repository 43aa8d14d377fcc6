"""The built-in sampling engine (issue #11): asprof's own C sampler (``asprof.engines._builtin``,
``csrc/builtin``) behind the :class:`~asprof.engines.base.Engine` protocol.

It records CPU samples (per-thread CPU-clock timers, else ``ITIMER_PROF``) and wall-clock
samples of every thread, each with the thread's Python stack and the native leaf frame. Every
tick, on the agent thread, :class:`BuiltinEngine` takes the batch recorded since the previous
tick and writes it as one self-contained JFR chunk with :mod:`asprof.jfrio.writer` (the same
event types as async-profiler: ``jdk.ExecutionSample``, ``profiler.WallClockSample``, thread
names, ``jdk.ActiveSetting`` with ``engine = builtin``, the CPU mode and the intervals).

What it does not do: native memory, native stacks beyond the leaf frame, kernel frames. Asked
for explicitly (``engine="builtin"``) with such options it refuses to start; picked by ``auto``
it says in one log line what it leaves out.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from asprof import osthreads
from asprof.context.report import label_ids_of
from asprof.engines.base import Engine, TickResult
from asprof.errors import ProfilerError

if TYPE_CHECKING:
    from asprof.jfrio.writer import ChunkWriter
    from asprof.options import ProfilerOptions

__all__ = ["BuiltinEngine", "available", "unavailable_reason", "unsupported_options", "NAME"]

logger = logging.getLogger("asprof")

NAME = "builtin"
_MAX_FRAMES = 128
#: Seconds between two takes of the C module's samples within a report (its buffers are fixed).
COLLECT_EVERY = 5.0
_KNOWN_THREADS = 4096


def unavailable_reason() -> Optional[str]:
    """Why the built-in engine cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"the built-in engine runs on Linux only (this is {sys.platform})"
    from asprof.pyframes import free_threaded

    if free_threaded():  # issue #14: not built there (setup.py); its module state relies on the GIL
        return "it is not supported on a free-threaded CPython build yet (async-profiler is)"
    try:
        from asprof.engines import _builtin  # noqa: F401
    except ImportError as e:
        return f"its C extension asprof.engines._builtin is not built ({e})"
    return None


def available() -> bool:
    return unavailable_reason() is None


def unsupported_options(options: "ProfilerOptions") -> List[str]:
    """The options (set to other than their defaults) this engine cannot honour."""
    out = []
    if options.native_mem is not None:
        out.append(f"native_mem={options.native_mem!r} (native memory sampling needs async-profiler)")
    if options.force_native_mem:
        out.append("force_native_mem=True (native memory sampling needs async-profiler)")
    if options.cstack != "dwarf":
        out.append(f"cstack={options.cstack!r} (the built-in engine records the native leaf frame only)")
    if not options.all_user:
        out.append("all_user=False (the built-in engine records no kernel frames)")
    return out


class _Names:
    """Module names from code filenames (via ``sys.modules``) and thread names from thread ids,
    computed on the agent thread at each tick."""

    def __init__(self) -> None:
        self._modules_seen = -1
        self._by_file: Dict[str, str] = {}
        self._cache: Dict[str, str] = {}
        self._roots: List[str] = []
        self._known: Dict[int, str] = {}

    def _refresh(self) -> None:
        mods = sys.modules
        if len(mods) == self._modules_seen:
            return
        by_file: Dict[str, str] = {}
        for name, mod in list(mods.items()):
            f = getattr(mod, "__file__", None)
            if isinstance(f, str):
                by_file.setdefault(f, name)
                if not os.path.isabs(f):
                    by_file.setdefault(os.path.abspath(f), name)
        self._by_file = by_file
        self._cache = {}
        self._roots = sorted({os.path.abspath(p) for p in sys.path if isinstance(p, str) and p},
                             key=len, reverse=True)
        self._modules_seen = len(mods)

    def module(self, filename: str) -> str:
        """The dotted module name of the code in ``filename`` (``"<string>"`` stays as is)."""
        got = self._cache.get(filename)
        if got is not None:
            return got
        name = self._by_file.get(filename)
        if name is None:
            name = self._guess(filename)
        self._cache[filename] = name
        return name

    def _guess(self, filename: str) -> str:
        if not filename or filename.startswith("<"):
            return filename or "<unknown>"
        path = filename
        for root in self._roots:
            if path.startswith(root + os.sep):
                path = path[len(root) + 1:]
                break
        else:
            path = os.path.basename(path)
        for suffix in (".py", ".pyc", ".pyw"):
            if path.endswith(suffix):
                path = path[: -len(suffix)]
                break
        parts = [p for p in path.split(os.sep) if p]
        if len(parts) > 1 and parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts) or filename

    def threads(self) -> Dict[int, str]:
        """Thread id -> name: the threads alive now, then those seen before (a thread that ended
        after its last sample keeps its name in the report; at most :data:`_KNOWN_THREADS`)."""
        now: Dict[int, str] = {}
        for t in threading.enumerate():
            nid = getattr(t, "native_id", None)
            if nid is not None:
                now[nid] = t.name
        known = self._known
        known.update(now)
        while len(known) > _KNOWN_THREADS:
            del known[next(iter(known))]
        out = dict(known)
        out.update(now)
        return out


def _native_name(symbol: str, library: str) -> str:
    """A symbol as is; a program counter ``dladdr`` could not name (``?``; ``0x...`` before)
    becomes one frame per library, ``[libz.so.1]`` (``[unknown]`` without one), so that its
    samples add up."""
    if symbol != "?" and not symbol.startswith("0x"):
        return symbol
    return f"[{library.rpartition('/')[2]}]" if library else "[unknown]"


def _comm(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


class BuiltinEngine(Engine):
    """The built-in engine. ``explicit``: the user asked for it (unsupported options are an
    error) rather than ``auto`` picking it (they are left out, with one log line).

    Between ticks a collector thread (``asprof-collect``) takes what the C module recorded every
    :data:`COLLECT_EVERY` seconds and adds it to the report being built, so the module's fixed
    buffers never fill up within a long reporting interval; a tick adds the rest and finishes
    the report."""

    name = NAME

    def __init__(self, options: "ProfilerOptions", *, explicit: bool = True) -> None:
        why = unavailable_reason()
        if why is not None:
            raise ProfilerError(f"the built-in engine is not available: {why}")
        from asprof.engines import _builtin

        self._mod = _builtin
        self.options = options
        if not _builtin.python_frames:  # issue #14: free-threaded, a version the walker does not know
            from asprof.pyframes import unsupported_reason

            why = unsupported_reason() or _builtin.python_frames_off or "its frame walker is not built"
            logger.info("the built-in engine records no Python stacks here (native leaf frames only): %s", why)
        bad = unsupported_options(options)
        if bad and explicit:
            raise ProfilerError("the built-in engine (engine='builtin') cannot honour "
                                + "; ".join(bad) + ". Use engine='async-profiler' or leave these options out.")
        if bad:
            logger.info("the built-in engine leaves out: %s", "; ".join(bad))
        self._cpu_ns = options.cpu_interval_ns
        self._wall_ns = 0 if options.wall_interval is None else max(1, round(options.wall_interval * 1e9))
        self._lock = osthreads.Lock()  # collects, ticks, stop and fork (real locks even under gevent)
        self._names = _Names()
        self._running = False
        self._orphan = False  # this object belongs to the parent of a forked child
        self.cpu_mode = "off"
        self._writer: Optional["ChunkWriter"] = None  # the report being built
        self._lost = 0  # samples lost in the report being built
        self._lost_total = 0
        self._last_size = 0
        self._wake = osthreads.Event()
        self._collector: Optional[Any] = None
        #: issue #16: called with (writer, end) before each report is finished (the Python allocation
        #: samples go into the same chunk); an error is logged and the report goes on without them.
        self.report_hook: Optional[Callable[["ChunkWriter", Tuple[int, int]], None]] = None
        from asprof.context.report import ContextEvents  # issue #15: labels and asyncio steps

        self._context = ContextEvents(getattr(options, "asyncio_steps", True),
                                      self._wall_ns or 1_000_000_000, getattr(options, "otel_span_ids", False))
        from asprof.engines.signals import Conflicts  # issue #13: SIGPROF held by another handler

        self._conflicts = Conflicts()
        self._reinstalled = 0  # the C module's handler_reinstalled at the last look
        self._itimer_taken = 0  # and its itimer_taken

    # -- Engine -------------------------------------------------------------------------

    def start(self) -> None:
        from asprof.jfrio.writer import clock_pair

        with self._lock:
            if self._running:
                raise ProfilerError("the built-in engine is already running")
            pair = clock_pair()
            self._check_signal_at_start()
            try:
                self.cpu_mode = self._mod.start(self._cpu_ns, self._wall_ns, _MAX_FRAMES, "auto")
            except (RuntimeError, OSError, ValueError) as e:
                raise ProfilerError(f"the built-in engine could not start: {e}") from e
            _sampling_with(True)  # issue #13: signal.signal(SIGPROF, SIG_DFL) cannot end the process
            try:
                self._writer = self._new_writer(pair)
                self._lost = 0
                self._wake.clear()
                self._collector = osthreads.Thread(self._collect_loop, "asprof-collect")
                self._running = True
                self._collector.start()
                self._context.start()
            except Exception as e:  # e.g. no thread can be started: leave nothing running
                self._running = False
                self._collector = None
                self._mod.stop()
                _sampling_with(False)
                raise ProfilerError(f"the built-in engine could not start: {e}") from e
        logger.debug("built-in engine started: cpu %s every %d ns, wall every %d ns",
                     self.cpu_mode, self._cpu_ns, self._wall_ns)

    def tick(self) -> TickResult:
        with self._lock:
            if not self._running or self._orphan:
                return TickResult(None)
            return TickResult(self._report(restart=True))

    def stop(self) -> Optional[bytes]:
        with self._lock:
            if not self._running or self._orphan:
                return None
            self._running = False
            self._mod.stop()
            _sampling_with(False)
            self._context.stop()
            data = self._report(restart=False)
        self._join_collector()
        return data

    def close(self) -> None:
        try:
            with self._lock:
                if self._running and not self._orphan:
                    self._running = False
                    self._mod.stop()
                    _sampling_with(False)
                    self._context.stop()
                self._writer = None
            self._join_collector()
        except Exception:  # noqa: BLE001 - must not raise
            logger.debug("stopping the built-in engine failed", exc_info=True)

    def before_fork(self) -> bool:
        self._lock.acquire()  # no report is half written when the process forks
        return True  # the child's module is reset by its own atfork handler: it can start afresh

    def after_fork_in_parent(self) -> None:
        self._lock.release()

    def after_fork_in_child(self) -> None:
        self._orphan = True  # the child's agent starts its own engine; no collector thread here
        self._lock = osthreads.Lock()
        self._writer = None

    def memory_bytes(self) -> Optional[int]:
        try:
            held = int(self._mod.stats().get("memory_bytes", 0))
        except Exception:  # noqa: BLE001
            held = 0
        w = self._writer
        return held + self._last_size + (w.size_estimate() if w is not None else 0)

    def signal_conflicts(self) -> int:
        return self._conflicts.count

    # -- signal ownership (issue #13; see engines/signals.py) ------------------------------

    def _check_signal_at_start(self) -> None:
        """A SIGPROF handler of the application's found at start: ours goes in front of it."""
        from asprof.engines.signals import foreign_at_start

        try:
            st = self._mod.stats()
            self._reinstalled = int(st.get("handler_reinstalled", 0))
            self._itimer_taken = int(st.get("itimer_taken", 0))
            who = foreign_at_start(signal.SIGPROF)
        except Exception:  # noqa: BLE001 - profiling starts anyway
            return
        if who is not None:
            self._conflicts.report(signal.SIGPROF, f"SIGPROF already has a handler that is not asprof's ({who}): "
                                   "the built-in engine goes in front of it and passes it every SIGPROF that is "
                                   "not its own (the application's setitimer, kill, ...)")

    def _check_takeover(self) -> None:
        """The sampler put our handler back in front since the last look: say who took SIGPROF."""
        from asprof.engines.signals import address_owner

        try:
            st = self._mod.stats()
            n = int(st.get("handler_reinstalled", 0))
            timer = int(st.get("itimer_taken", 0))
            if n <= self._reinstalled and timer <= self._itimer_taken:
                return
            took_handler, took_timer = n > self._reinstalled, timer > self._itimer_taken
            self._reinstalled, self._itimer_taken = n, timer
            who = address_owner(int(st.get("foreign_handler", 0)), signal.SIGPROF)
        except Exception:  # noqa: BLE001 - never stop a report for this
            return
        parts = []
        if took_handler:
            parts.append(f"SIGPROF was taken over by {who} while profiling: the built-in engine put its handler "
                         "back in front and passes the signals that are not its own on to that handler")
        if took_timer:
            parts.append("the application re-armed ITIMER_PROF, which this engine samples with here (there is "
                         "one per process): its ticks are now both the CPU samples (at the application's "
                         "interval) and the application's own, passed on to its handler; the engine arms its "
                         "own again when the application disarms it")
        self._conflicts.report(signal.SIGPROF, "; ".join(parts))

    def cpu_seconds_elsewhere(self) -> float:
        """The signal handler's time on the application's threads (the C module measures it)."""
        try:
            return int(self._mod.stats().get("handler_ns", 0)) / 1e9
        except Exception:  # noqa: BLE001
            return 0.0

    # -- collecting -----------------------------------------------------------------------

    def _collect_loop(self) -> None:
        _name_thread("asprof-collect")
        while not self._wake.wait(COLLECT_EVERY):
            try:
                with self._lock:
                    if not self._running or self._orphan or self._writer is None:
                        return
                    self._add_or_log(self._writer, self._mod.collect(), label_ids_of(self._mod))
            except Exception:  # noqa: BLE001 - the next collect or tick tries again
                logger.error("collecting the built-in engine's samples failed", exc_info=True)

    def _join_collector(self) -> None:
        self._wake.set()
        t, self._collector = self._collector, None
        if t is not None and not osthreads.is_current(t):
            t.join(5.0)

    def _report(self, restart: bool) -> Optional[bytes]:
        """Adds what is left, finishes the report and (``restart``) opens the next (lock held)."""
        from asprof.jfrio.writer import clock_pair

        w = self._writer
        end = clock_pair()
        self._check_takeover()  # issue #13
        batch = self._mod.collect()
        labels = label_ids_of(self._mod)
        self._writer = self._new_writer(end) if restart else None
        if w is None:
            return None
        self._add_or_log(w, batch, labels)
        lost, self._lost = self._lost, 0
        if lost:
            self._lost_total += lost
            logger.warning("the built-in engine lost %d samples since the last report (its buffers were full)", lost)
        hook = self.report_hook
        if hook is not None:
            try:
                hook(w, end)
            except Exception:  # noqa: BLE001 - the CPU and wall samples are reported anyway
                logger.error("adding the Python allocation samples to the report failed", exc_info=True)
        try:
            data = self._finish(w, end, lost)
        except Exception as e:  # noqa: BLE001 - a bad report must not stop profiling
            logger.error("the built-in engine could not write its report (%d samples lost): %r", w.samples, e)
            return None
        self._last_size = len(data)
        return data

    def write_chunk(self, start: Tuple[int, int], end: Tuple[int, int],
                    codes: Sequence[Tuple[str, str, str, int]], natives: Sequence[Tuple[str, str]],
                    stacks: Sequence[Tuple[int, ...]], samples: bytes, lost: int) -> bytes:
        """One self-contained JFR chunk for one batch of ``_builtin.collect()`` (for tests)."""
        w = self._new_writer(start)
        self._add(w, (list(codes), list(natives), list(stacks), samples, 0))
        return self._finish(w, end, lost)

    def _add_or_log(self, w: "ChunkWriter", batch: Tuple[Sequence[Tuple[str, str, str, int]],
                                                       Sequence[Tuple[str, str]], Sequence[Tuple[int, ...]],
                                                       bytes, int],
                    label_ids: Sequence[int] = ()) -> None:
        """:meth:`_add`; a batch that cannot be written is counted and said, never silently lost."""
        try:
            self._add(w, batch, label_ids)
        except Exception as e:  # noqa: BLE001 - one bad batch must not stop profiling
            n = len(batch[3]) // 20
            self._lost += n
            logger.error("the built-in engine could not write a batch of %d samples (counted as lost): %r", n, e)

    def _new_writer(self, start: Tuple[int, int]) -> "ChunkWriter":
        from asprof.jfrio.writer import ChunkWriter

        w = ChunkWriter(start[0], start[1])
        w.recording_info("asprof")
        w.system_info()
        return w

    def _add(self, w: "ChunkWriter", batch: Tuple[Sequence[Tuple[str, str, str, int]], Sequence[Tuple[str, str]],
                                               Sequence[Tuple[int, ...]], bytes, int],
             label_ids: Sequence[int] = ()) -> None:
        """Adds a batch of ``_builtin.collect()`` to ``w`` (ids are local to the batch) and names
        its threads now, while they still run. ``label_ids``: ``_builtin.batch_labels()`` of that
        collect (issue #15)."""
        from asprof.jfrio.writer import FRAME_NATIVE, FRAME_PYTHON

        codes, natives, stacks, samples, lost = batch
        self._lost += lost
        names = self._names
        names._refresh()
        code_keys = [w.python_method(names.module(fn), qual or name) for name, qual, fn, _first in codes]
        first_lines = [first for _n, _q, _f, first in codes]
        native_keys = [w.native_method(lib or "", _native_name(sym, lib)) for sym, lib in natives]
        stack_keys = []
        for pairs in stacks:
            frames = []
            for i in range(0, len(pairs) - 1, 2):
                ref, line = pairs[i], pairs[i + 1]
                if ref >= 0:
                    frames.append((code_keys[ref], line or first_lines[ref], FRAME_PYTHON))
                else:
                    frames.append((native_keys[-ref - 1], 0, FRAME_NATIVE))
            stack_keys.append(w.stack(frames, truncated=len(frames) >= _MAX_FRAMES))
        threads = names.threads()
        # the profiler's own Python threads (asprof-agent, asprof-collect, reporters' asprof-*) are
        # not the application's: left out, as the C sampler leaves out asprof-sampler
        own = {tid for tid, name in threads.items() if name.startswith("asprof-")}
        encode = getattr(self._mod, "encode", None)
        if encode is not None:  # the same events, encoded in C (a module built before it: in Python)
            w.add_encoded(*encode(samples, stack_keys, own))
        else:
            w.samples_from(samples, stack_keys, own)
        if label_ids:
            self._context.write_sample_labels(w, samples, label_ids, own)
        unnamed = w.unnamed_threads()
        if unnamed:
            for tid in unnamed:
                w.thread(tid, threads.get(tid) or _comm(tid) or f"[tid={tid}]")

    def _finish(self, w: "ChunkWriter", end: Tuple[int, int], lost: int) -> bytes:
        version = getattr(sys.modules.get("asprof"), "__version__", "unknown")  # not imported: a cycle
        rec, ex = "jdk.ActiveRecording", "jdk.ExecutionSample"
        for owner, key, value in (
            (rec, "version", f"asprof {version}"), (rec, "engine", NAME), (rec, "cpuMode", self.cpu_mode),
            (rec, "cstack", "no"), (rec, "clock", "monotonic"), (rec, "event", "cpu"),
            (rec, "pythonFrames", "true" if self._mod.python_frames else "false"),
            (rec, "lostSamples", str(lost)),
            (rec, "signalConflicts", str(self._conflicts.count)),  # issue #13
            (ex, "enabled", "true"), (ex, "interval", str(self._cpu_ns)), (ex, "alluser", "true"),
            (ex, "wall", str(self._wall_ns)),
        ):
            w.setting(owner, key, value)
        try:
            self._context.write_report_end(w)  # issue #15: label-set definitions, asyncio steps
        except Exception:  # noqa: BLE001 - the samples are written without them
            logger.error("the built-in engine could not write label and step events", exc_info=True)
        return w.finish(end_ticks=end[1])


def _sampling_with(on: bool) -> None:
    """issue #13: the built-in engine samples with SIGPROF (engines/signals.py wraps signal.signal)."""
    from asprof.engines import _builtin
    from asprof.engines.signals import not_sampling_with, sampling_with

    try:
        (sampling_with if on else not_sampling_with)([int(signal.SIGPROF)], _builtin.recheck)
    except Exception:  # noqa: BLE001 - profiling goes on
        logger.debug("signal.signal could not be wrapped", exc_info=True)


def _name_thread(name: str) -> None:
    """The OS name of the calling thread (what /proc shows and the overhead guard counts)."""
    if osthreads.main_thread_native():
        return  # never rename the process
    try:
        from asprof._native import set_thread_name

        set_thread_name(name)
        return
    except Exception:  # noqa: BLE001 - not built: prctl through ctypes
        pass
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:  # noqa: BLE001 - a name is a nicety
        pass
