"""The engine: async-profiler loaded through the native core.

``load_library`` finds and loads ``libasyncProfiler.so``; ``NativeEngine``
drives one recording session (start, rotate, stop) for the agent loop.
async-profiler's own log lines are routed to ``logging.getLogger("asprof")``.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, FrozenSet, List, Optional, Tuple

from asprof.errors import LibraryNotFoundError, ProfilerError, UnsupportedVersionError
from asprof.options import ProfilerOptions

if TYPE_CHECKING:
    from asprof._native import Library

__all__ = ["LibraryInfo", "load_library", "NativeEngine", "Engine", "TickResult", "nativemem_hazard"]

logger = logging.getLogger("asprof")
_engine_log = logging.getLogger("asprof.async-profiler")

SONAME = "libasyncProfiler.so"
MIN_VERSION = (3, 0)
_BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", SONAME)
_LOG_LINE = re.compile(r"^\[(TRACE|DEBUG|INFO|WARN|ERROR)\]\s?(.*)$")
_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
}


@dataclass(frozen=True)
class LibraryInfo:
    """A loaded async-profiler: where it is, its version and optional features."""

    path: str
    version: str
    version_tuple: Tuple[int, ...]
    capabilities: FrozenSet[str]

    @property
    def has_thread_local_data(self) -> bool:
        """``asprof_get_thread_local_data`` (4.0+): per-thread sample counter."""
        return "thread_local_data" in self.capabilities

    @property
    def has_user_events(self) -> bool:
        """``asprof_register_jfr_event``/``asprof_emit_jfr_event`` (4.1+)."""
        return "user_events" in self.capabilities


_lock = threading.Lock()
_loaded: Dict[str, Tuple["Library", LibraryInfo]] = {}


def forward_log(text: str) -> None:
    """Sends async-profiler's log text to the ``asprof.async-profiler`` logger."""
    for line in text.replace("\x00", "").splitlines():
        line = line.rstrip()
        if not line:
            continue
        m = _LOG_LINE.match(line)
        if m:
            _engine_log.log(_LEVELS[m.group(1)], "%s", m.group(2))
        else:
            _engine_log.info("%s", line)


def engine_loglevel() -> str:
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
    """(label, what to dlopen) in discovery order."""
    out: List[Tuple[str, str]] = []
    if path is not None:
        out.append(("library_path argument", os.path.abspath(os.fspath(path))))
        return out  # an explicit path is the only place looked at
    env = os.environ.get("ASPROF_LIB")
    if env:
        out.append(("ASPROF_LIB", os.path.abspath(env)))
        return out
    out.append(("bundled copy", _BUNDLED))
    # A bare soname: the dynamic linker's own search (LD_LIBRARY_PATH, RUNPATH,
    # ld.so.cache, system directories), never the current directory.
    out.append(("dynamic linker search", SONAME))
    return out


def load_library(path: Optional[str] = None) -> Tuple["Library", LibraryInfo]:
    """Finds, loads and initialises async-profiler; returns (native handle, info).

    Discovery, first hit wins: ``path`` → ``$ASPROF_LIB`` → the copy bundled
    in the package (``asprof/lib/``) → ``libasyncProfiler.so`` through the
    dynamic linker's search. Raises :class:`LibraryNotFoundError` listing every
    place tried, or :class:`UnsupportedVersionError`.
    """
    from asprof import _native

    tried: List[Tuple[str, str]] = []
    with _lock:
        for label, target in _candidates(path):
            where = f"{label} ({target})"
            if target != SONAME and not os.path.exists(target):
                tried.append((where, "no such file"))
                continue
            try:
                lib = _native.Library.open(target)
            except OSError as e:
                tried.append((where, str(e)))
                if target != SONAME:
                    break  # the file is there but unusable: do not silently pick another one
                continue
            cached = _loaded.get(lib.path)
            if cached is not None:
                return cached
            lib.init()
            err, out, log = lib.execute("version", engine_loglevel())
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
    raise LibraryNotFoundError(tried)


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


@dataclass
class TickResult:
    """A finished recording (or None), and the error of the restart if any."""

    recording: Optional[bytes]
    restart_error: Optional[ProfilerError] = None


class Engine:
    """What the agent loop drives. ``NativeEngine`` is the real one; tests use fakes."""

    def start(self) -> None:
        """Starts recording; raises ProfilerError."""
        raise NotImplementedError

    def tick(self) -> TickResult:
        """Stops, rotates and restarts; raises ProfilerError when the stop fails."""
        raise NotImplementedError

    def stop(self) -> Optional[bytes]:
        """Stops and returns the last recording (None if nothing was recorded)."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases resources; must not raise."""


class NativeEngine(Engine):
    """async-profiler through the native core's dual-file rotation."""

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
        lib, self.info = load_library(library_path)
        self._session = _native.Session(lib, options.start_command(), engine_loglevel())

    def start(self) -> None:
        err, log = self._session.start()
        forward_log(log)
        if err is not None:
            raise ProfilerError(f"async-profiler could not start: {err}")

    def tick(self) -> TickResult:
        recording, err, log = self._session.tick()
        forward_log(log)
        if recording is None:
            if err is not None:
                raise ProfilerError(f"async-profiler could not stop: {err}")
            return TickResult(None)
        restart = ProfilerError(f"async-profiler could not restart: {err}") if err else None
        return TickResult(recording, restart)

    def stop(self) -> Optional[bytes]:
        if self._session.status != "running":
            return None
        err, log = self._session.stop()
        forward_log(log)
        if err is not None:
            raise ProfilerError(f"async-profiler could not stop: {err}")
        data: bytes = self._session.read_active()
        return data or None

    @property
    def status(self) -> str:
        return str(self._session.status)

    def close(self) -> None:
        leaked, log = self._session.close()
        forward_log(log)
        if leaked:
            logger.warning(
                "async-profiler may still be writing its recording (stop failed or a start was "
                "interrupted): its two temporary files are left open on purpose, so that no "
                "other file can take their descriptor numbers"
            )
