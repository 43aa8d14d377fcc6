"""The async-profiler engine: async-profiler loaded through the native core.

``load_library`` finds and loads ``libasyncProfiler.so``; ``NativeEngine``
drives one recording session (start, rotate, stop) for the agent loop.
async-profiler's own log lines are routed to ``logging.getLogger("asprof")``.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, FrozenSet, List, Optional, Tuple

from asprof import osthreads
from asprof.autostart.values import library_from_environment
from asprof.engines.base import Engine, TickResult
from asprof.errors import LibraryNotFoundError, ProfilerError, UnsupportedVersionError
from asprof.options import ProfilerOptions

if TYPE_CHECKING:
    from asprof._native import Library

__all__ = ["LibraryInfo", "load_library", "NativeEngine", "nativemem_hazard"]

logger = logging.getLogger("asprof")
_async_profiler_log = logging.getLogger("asprof.async-profiler")
# async-profiler's own messages (e.g. a perf_event_open warning for a thread that
# just exited) are detail: shown where the application configured logging, never
# printed to stderr by logging's last-resort handler when it did not.
_async_profiler_log.addHandler(logging.NullHandler())

SONAME = "libasyncProfiler.so"
_SEARCHED = "dynamic linker search"
# A full rotation (stop, swap, start) at least this often, and after a chunk whose constant
# pool reached this size: it empties async-profiler's stack trace storage.
FULL_ROTATION_AGE_S = 600.0
FULL_ROTATION_POOL_BYTES = 8 << 20
MIN_VERSION = (3, 0)
_BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib", SONAME)
# Compiled on first use (re caches them): this module is imported by every start().
_LOG_LINE = r"^\[(TRACE|DEBUG|INFO|WARN|ERROR)\]\s?(.*)$"
_BENIGN = r"for TID \d+ failed: No such process"
_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
}


class LibraryInfo:
    """A loaded async-profiler: where it is, its version and optional features (read-only).

    A plain class rather than a frozen dataclass: making a dataclass costs milliseconds at
    import, and this module is imported by every ``start()``."""

    __slots__ = ("path", "version", "version_tuple", "capabilities")
    path: str
    version: str
    version_tuple: Tuple[int, ...]
    capabilities: FrozenSet[str]

    def __init__(self, path: str, version: str, version_tuple: Tuple[int, ...], capabilities: FrozenSet[str]) -> None:
        for name, value in (("path", path), ("version", version), ("version_tuple", version_tuple),
                            ("capabilities", capabilities)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"LibraryInfo is read-only: cannot assign to {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"LibraryInfo is read-only: cannot delete {name!r}")

    def _key(self) -> Tuple[str, str, Tuple[int, ...], FrozenSet[str]]:
        return (self.path, self.version, self.version_tuple, self.capabilities)

    def __eq__(self, other: object) -> bool:
        return self._key() == other._key() if isinstance(other, LibraryInfo) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"LibraryInfo(path={self.path!r}, version={self.version!r}, version_tuple={self.version_tuple!r}, "
                f"capabilities={self.capabilities!r})")

    @property
    def has_thread_local_data(self) -> bool:
        """``asprof_get_thread_local_data`` (4.0+): per-thread sample counter."""
        return "thread_local_data" in self.capabilities

    @property
    def has_user_events(self) -> bool:
        """``asprof_register_jfr_event``/``asprof_emit_jfr_event`` (4.1+)."""
        return "user_events" in self.capabilities


_lock = osthreads.Lock()  # real locks even under gevent/eventlet monkey-patching
_loaded: Dict[str, Tuple["Library", LibraryInfo]] = {}


def forward_log(text: str) -> None:
    """Sends async-profiler's log text to the ``asprof.async-profiler`` logger."""
    for line in text.replace("\x00", "").splitlines():
        line = line.rstrip()
        if not line:
            continue
        m = re.match(_LOG_LINE, line)
        if m:
            level = _LEVELS[m.group(1)]
            if level == logging.WARNING and re.search(_BENIGN, m.group(2)):
                level = logging.DEBUG  # a thread that exited while async-profiler attached to it
            _async_profiler_log.log(level, "%s", m.group(2))
        else:
            _async_profiler_log.info("%s", line)


def async_profiler_loglevel() -> str:
    """async-profiler's loglevel matching the ``asprof`` logger's level."""
    level = logging.getLogger("asprof.async-profiler").getEffectiveLevel()
    if level <= logging.DEBUG:
        return "debug"
    if level <= logging.INFO:
        return "info"
    return "warn"


def _parse_version(text: str) -> Tuple[int, ...]:
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return ()
    return tuple(int(g) for g in m.groups() if g is not None)


def _candidates(path: Optional[str]) -> List[Tuple[str, str]]:
    """(label, absolute path to dlopen) in discovery order.

    Only absolute paths are ever given to dlopen: the linker's own search of a bare
    soname would look in the working directory for an empty or relative entry of
    ``LD_LIBRARY_PATH``, so that search is done here (``linker_search``). A relative
    ``ASPROF_LIB`` is returned as given, for :func:`load_library` to refuse."""
    out: List[Tuple[str, str]] = []
    if path is not None:
        out.append(("library_path argument", os.path.abspath(os.fspath(path))))
        return out  # an explicit path is the only place looked at
    try:
        env = library_from_environment()
    except ValueError:
        return [("ASPROF_LIB", os.environ.get("ASPROF_LIB", "").strip())]
    if env is not None:
        out.append(("ASPROF_LIB", env))
        return out
    out.append(("bundled copy", _BUNDLED))
    from asprof.engines.linker_search import search  # only when nothing was named

    out += [(_SEARCHED, p) for p in search(SONAME)]
    return out


def load_library(path: Optional[str] = None) -> Tuple["Library", LibraryInfo]:
    """Finds, loads and initialises async-profiler; returns (native handle, info).

    Discovery, first hit wins: ``path`` → ``$ASPROF_LIB`` → the copy bundled
    in the package (``asprof/lib/``) → ``libasyncProfiler.so`` where the
    dynamic linker would look (absolute ``LD_LIBRARY_PATH`` entries, ``/etc/ld.so.cache``,
    system directories; resolved here, never the working directory). Raises :class:`LibraryNotFoundError` listing every
    place tried, or :class:`UnsupportedVersionError`.
    """
    from asprof import _native

    tried: List[Tuple[str, str]] = []
    with _lock:
        candidates = _candidates(path)
        for label, target in candidates:
            where = f"{label} ({target})"
            searched = label == _SEARCHED
            if not os.path.isabs(target):
                tried.append((where, "not an absolute path: refused (it would be looked up in the working "
                                     "directory); give the full path of libasyncProfiler.so"))
                continue
            if not searched and not os.path.exists(target):
                tried.append((where, "no such file"))
                continue
            try:
                lib = _native.Library.open(target)
            except OSError as e:
                tried.append((where, str(e)))
                if not searched:
                    break  # the file is there but unusable: do not silently pick another one
                continue  # the linker would skip a wrong-class library too
            cached = _loaded.get(lib.path)
            if cached is not None:
                return cached
            lib.init()
            err, out, log = lib.execute("version", async_profiler_loglevel())
            forward_log(log)
            lib.release_log()
            version = out.strip() if err is None else ""
            vt = _parse_version(version)
            if vt and vt < MIN_VERSION:
                raise UnsupportedVersionError(
                    f"async-profiler {version} at {lib.path} is too old: asprof needs "
                    f"{MIN_VERSION[0]}.{MIN_VERSION[1]} or later. Install a newer release."
                )
            caps = set()
            if lib.has_thread_local_data:
                caps.add("thread_local_data")
            if lib.has_user_events:
                caps.add("user_events")
            info = LibraryInfo(lib.path, version or "unknown", vt, frozenset(caps))
            logger.debug("loaded async-profiler %s from %s (%s)", info.version, info.path,
                         ", ".join(sorted(caps)) or "no optional features")
            _loaded[lib.path] = (lib, info)
            return lib, info
        if path is None and candidates and candidates[0][0] == "bundled copy" and \
                not any(label == _SEARCHED for label, _ in candidates):
            tried.append((f"{_SEARCHED} ({SONAME})", "not in LD_LIBRARY_PATH's absolute entries, "
                          "/etc/ld.so.cache or the system directories (never the current directory)"))
    raise LibraryNotFoundError(tried)


def _largest_pool(data: bytes) -> int:
    from asprof.engines.settings_chunk import largest_pool  # imported by the agent thread, not at start

    return largest_pool(data)


def nativemem_hazard() -> Optional[str]:
    """Why native memory sampling would crash this interpreter, or None.

    async-profiler's ``nativemem`` patches malloc/free in every loaded object.
    When libpython is linked into the interpreter's executable (Debian's
    ``/usr/bin/python3``, for instance) instead of being loaded as
    ``libpython3.X.so``, its ``free`` hook recurses without end and the
    process dies with SIGSEGV (seen with async-profiler 4.5).
    """
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    if re.search(r"/libpython\d+\.\d+[a-z]*\.so", maps):
        return None
    return (
        f"this Python interpreter ({sys.executable}) has libpython linked into its executable "
        "rather than loaded from libpython3.X.so; async-profiler's native memory hooks crash "
        "such processes (SIGSEGV from unbounded recursion in its free hook)"
    )


class NativeEngine(Engine):
    """async-profiler through the native core: rotation by dump, and the dual-file full rotation."""

    def __init__(self, options: ProfilerOptions, library_path: Optional[str] = None) -> None:
        from asprof import _native

        if options.native_mem is not None and not options.force_native_mem:
            reason = nativemem_hazard()
            if reason is not None:
                raise ProfilerError(
                    f"native memory sampling refused: {reason}. Use an interpreter that loads "
                    "libpython as a shared library (e.g. a pyenv or python.org build), or pass "
                    "ProfilerOptions(force_native_mem=True) to try anyway."
                )
        self.options = options
        self.library_path = library_path
        self._lib, self.info = load_library(library_path)
        self._session = _native.Session(self._lib, options.start_command(), async_profiler_loglevel())
        # Serializes the agent thread's ticks with the forking thread's pause/resume.
        self._lock = osthreads.Lock()
        self._paused = False
        # Rotation state (see _open_recording).
        self._dump = True
        self._head: Optional[bytes] = None
        self._settings: Optional[bytes] = None
        self._settings_source: Optional[bytes] = None  # the first chunk, read at the first tick
        self._started_at = time.monotonic()
        self._full_due = False
        self._notes: List[str] = []
        # issue #5: Python frames in every sample (asprof/pyframes, csrc/pyframes).
        self._pyframes = None
        if getattr(options, "python_frames", False):
            from asprof.pyframes import attach_capture

            self._pyframes = attach_capture(self.info)
        # issue #13: the profiling signals async-profiler samples with, watched (engines/signals.py).
        from asprof.engines.signals import AsyncProfilerSignals

        self._signals = AsyncProfilerSignals(self.info.path, options.wall_interval is not None)
        if self._pyframes is not None:  # issue #15: labels and asyncio steps ride on the capture
            self._pyframes.enable_context(getattr(options, "asyncio_steps", True),
                                          (options.wall_interval_ms or 1000) * 1_000_000,
                                          getattr(options, "otel_span_ids", False))
        elif getattr(options, "asyncio_steps", False):
            logger.info("asprof: labels in samples and asyncio step events need the Python-frame capture "
                        "(python_frames), which is off here")
        # issue #12: each report rewritten with its Python frames inline (asprof/jfrio/inline.py)
        self._inline = self._pyframes is not None and bool(getattr(options, "python_frames_inline", False))
        self._inline_fn: Optional[Callable[[bytes], bytes]] = None

    def start(self) -> None:
        logs: List[str] = []
        try:
            with self._lock:
                err, log = self._session.start()
                logs.append(log)
                if err is not None:
                    raise ProfilerError(f"async-profiler could not start: {err}")
                self._open_recording(logs)
        finally:
            self._forward(logs)

    # -- rotation -----------------------------------------------------------------------
    # A tick is normally a dump: async-profiler finishes the current JFR chunk and opens
    # the next one in the same file without ever stopping, so no sample is lost at the
    # boundary and the tick is short. The chunks after a recording's first carry no
    # settings: every report after the first is prefixed with the settings chunk (see
    # asprof/engines/settings_chunk.py). A full rotation (stop, swap files, start) is kept for
    # what dump cannot do: async-profiler repeats every stack trace it has seen since the
    # start in each chunk, and keeps them in memory, until it is restarted.

    def _open_recording(self, logs: List[str]) -> None:
        """After a full start (lock held): take the recording's first chunk at once, while
        it is small, to keep its settings for the reports that follow. It is read at the
        first tick, on the agent thread (:meth:`_read_settings`): start-up does not wait."""
        self._started_at = time.monotonic()
        self._full_due = False
        self._head = self._settings = self._settings_source = None
        self._signals.after_start()  # issue #13: its handlers are in place now
        if not self._dump:
            return
        data, err, log = self._session.dump()
        logs.append(log)
        if err is not None:
            self._disable_dump(err)
            return
        self._head = self._settings_source = data  # handed over with the next report, samples included

    def _read_settings(self) -> None:
        """The settings chunk of the recording's first chunk, once (lock held)."""
        data, self._settings_source = self._settings_source, None
        if data is None:
            return
        from asprof.engines.settings_chunk import ChunkError, settings_chunk  # agent thread: not at start

        try:
            self._settings = settings_chunk(data)
        except ChunkError as e:
            self._disable_dump(f"its first chunk could not be read ({e})")
        except Exception as e:  # noqa: BLE001 - a surprise here must not stop profiling
            self._disable_dump(f"its first chunk could not be read ({e!r})")

    def _disable_dump(self, why: str) -> None:
        self._dump = False
        self._notes.append(f"rotating by stopping and restarting async-profiler: {why}")

    def _forward(self, logs: List[str]) -> None:
        """Logs gathered under the lock, emitted after it: a handler may do anything."""
        forward_log("".join(logs))
        notes, self._notes = self._notes, []
        for note in notes:
            logger.debug("asprof: %s", note)

    def _with_settings(self, data: Optional[bytes]) -> Optional[bytes]:
        """Prefix a report with the recording's first chunk (once) or its settings chunk."""
        head, self._head = self._head, None
        if head is not None:
            return head + (data or b"")
        if data and self._settings is not None:
            from asprof.engines.settings_chunk import with_settings

            return with_settings(self._settings, data)
        return data

    def _full_rotation_due(self) -> bool:
        return (self._full_due or not self._dump or self._settings is None
                or time.monotonic() - self._started_at >= FULL_ROTATION_AGE_S)

    def tick(self) -> TickResult:
        if self._pyframes is not None:  # issue #5: module names, before the stop
            self._pyframes.before_rotation()
        self._signals.poll()  # issue #13: takeovers of the profiling signals, logged
        logs: List[str] = []
        try:
            with self._lock:
                self._load_inline()
                result = self._tick(logs)
        finally:
            self._forward(logs)
        if result.recording is not None:  # issue #12: outside the lock (a fork waits for it)
            result.recording = self._inline_report(result.recording)
        return result

    def _load_inline(self) -> None:
        """issue #12: the rewrite, imported once, on the agent thread, under the lock that the
        fork hooks take (a child never inherits a half-done import)."""
        if self._inline and self._inline_fn is None:
            from asprof.jfrio.inline import inline_python_frames

            self._inline_fn = inline_python_frames

    def _inline_report(self, data: bytes) -> bytes:
        """issue #12: ``data`` with its Python frames inline, or as recorded (one log line) when
        it cannot be rewritten."""
        fn = self._inline_fn
        if fn is None or not data:
            return data
        try:
            return fn(data)
        except Exception as e:  # noqa: BLE001 - ChunkError, MemoryError, a surprise: report as recorded
            logger.warning("asprof: a report (%d bytes) could not be rewritten with its Python frames inline "
                           "(%s); it is reported as recorded", len(data), e)
            return data

    def _tick(self, logs: List[str]) -> TickResult:
        self._read_settings()
        if self._session.status == "running" and not self._full_rotation_due():
            data, err, log = self._session.dump()
            logs.append(log)
            if err is None:
                if not self._session.can_free_reported:
                    self._disable_dump("the file system cannot punch holes in the recording file")
                elif _largest_pool(data) >= FULL_ROTATION_POOL_BYTES:
                    self._full_due = True
                return TickResult(self._with_settings(data) or None)
            self._notes.append(f"async-profiler's dump failed ({err}): rotating by restarting it")
        recording, err, log = self._session.full_rotation()
        logs.append(log)
        if recording is None:
            if err is not None:
                raise ProfilerError(f"async-profiler could not stop: {err}")
            self._open_recording(logs)  # it was idle: this tick started it
            return TickResult(None)
        recording = self._with_settings(recording)
        if err is None:
            self._open_recording(logs)
        else:
            self._head = self._settings = self._settings_source = None
        restart = ProfilerError(f"async-profiler could not restart: {err}") if err else None
        return TickResult(recording, restart)

    def stop(self) -> Optional[bytes]:
        if self._pyframes is not None and self._session.status == "running":  # issue #5
            self._pyframes.before_rotation()
        with self._lock:
            if self._session.status != "running":
                return None
            self._load_inline()  # issue #12
            err, log = self._session.stop()
            if err is None:
                data = self._with_settings(self._session.read_active())
                self._settings = None
        forward_log(log)
        if err is not None:
            raise ProfilerError(f"async-profiler could not stop: {err}")
        self._signals.stop()  # issue #13: the application's handlers are its own again
        # The final stop leaves no thread behind (its timer thread exits on its own).
        from asprof._native import wait_async_profiler_threads

        if not wait_async_profiler_threads(1000):
            logger.debug("async-profiler's threads were still exiting 1 s after stop")
        return self._inline_report(data) if data else None  # issue #12

    def before_fork(self) -> bool:
        # Held until after the fork: no tick may run in between. The stop makes the
        # child inherit an idle async-profiler (restarting one inherited while running
        # deadlocks on its timer thread's condition variable).
        self._lock.acquire()
        self._paused = False
        try:
            err, log = self._session.pause()
        except Exception as e:  # noqa: BLE001 - never break the application's fork
            err, log = str(e), ""
        forward_log(log)
        self._paused = True  # resume in the parent whatever happened (a no-op unless stopped)
        if err is not None:
            logger.warning("could not pause async-profiler before fork (%s): the child will not profile", err)
            return False
        return True

    def after_fork_in_parent(self) -> None:
        try:
            if self._paused:
                err, log = self._session.resume()
                forward_log(log)
                if err is not None:
                    logger.error("async-profiler could not resume after fork: %s", err)
                else:
                    self._signals.after_start()  # issue #13
        finally:
            self._paused = False
            self._lock.release()

    def after_fork_in_child(self) -> None:
        self._lock = osthreads.Lock()  # the parent's threads are gone; so is whoever held it
        self._paused = False

    def memory_bytes(self) -> Optional[int]:
        err, out, log = self._lib.execute("metrics", async_profiler_loglevel())  # 4.3+
        forward_log(log)
        if err is not None:
            return None
        kb = sum(int(p[1]) for p in (line.split() for line in out.splitlines())
                 if len(p) == 2 and p[0].startswith("mem_") and p[0].endswith("_kb") and p[1].isdigit())
        size = self._session.active_size() if self._session.status != "closed" else 0
        return kb * 1024 + max(0, size)

    def signal_conflicts(self) -> int:
        return self._signals.conflicts.count

    def close(self) -> None:
        with self._lock:
            leaked, log = self._session.close()
        forward_log(log)
        self._signals.stop()  # issue #13 (a no-op after stop())
        if self._pyframes is not None:  # issue #5
            self._pyframes.detach()
            self._pyframes = None
        if leaked:
            logger.warning(
                "async-profiler may still be writing its recording (stop failed or a start was "
                "interrupted): its two temporary files are left open on purpose, so that no "
                "other file can take their descriptor numbers"
            )
