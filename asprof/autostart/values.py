"""The values of the ``ASPROF_*`` variables: their grammar (booleans and the off words,
durations, sizes), the defaults and limits of the intervals, and the few variables read at run
time by the layers below the configuration (``ASPROF_ENABLED`` by ``Profiler.start()``,
``ASPROF_LIB`` by the library search, the Python-frame test knobs).

Written once here and used by :mod:`asprof.options`, :mod:`asprof.profiler`, the engines and
:mod:`asprof.autostart.config` (the table of the variables and their parsing). Cheap to import
(no dataclass, patterns compiled on first use): it is on the path of every ``start()``.
May import nothing of asprof.
"""
from __future__ import annotations

import math
import os
import re
from typing import Mapping, Optional

__all__ = [
    "DEFAULT_REPORTING_INTERVAL", "MIN_REPORTING_INTERVAL", "MAX_REPORTING_INTERVAL",
    "DEFAULT_CPU_INTERVAL", "DEFAULT_WALL_INTERVAL", "MIN_CPU_INTERVAL", "MIN_WALL_INTERVAL",
    "MAX_PROFILER_INTERVAL", "parse_bool", "parse_duration", "parse_size", "format_seconds",
    "parse_file_mode", "file_mode_problem",
    "disabled_by_environment", "library_from_environment", "engine_from_environment", "ENGINE_NAMES",
    "pyframes_join_by_timestamp",
    "pyframes_timing",
]

DEFAULT_REPORTING_INTERVAL = 30.0
MIN_REPORTING_INTERVAL = 0.1
MAX_REPORTING_INTERVAL = 24 * 3600.0
#: async-profiler's sampling intervals, seconds (as the Rust agent's defaults).
DEFAULT_CPU_INTERVAL = 0.1
DEFAULT_WALL_INTERVAL = 1.0
MIN_CPU_INTERVAL = 1e-6
MIN_WALL_INTERVAL = 1e-3
MAX_PROFILER_INTERVAL = 3600.0

# Patterns are compiled on first use (re caches them): importing this module stays cheap.
_TRUE = frozenset({"1", "true", "yes", "on", "enabled"})
_FALSE = frozenset({"0", "false", "no", "off", "disabled"})
_OFF = frozenset({"off", "none", "no", "false", "disabled"})
_DURATION = r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([-+]?[0-9]{1,3}))?\s*([a-zµ]*)$"
_DURATION_UNITS = {
    "": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hour": 3600.0, "hours": 3600.0,
}
_SIZE = r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)$"
_SIZE_UNITS = {
    "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
}


def parse_bool(text: str) -> Optional[bool]:
    """``1/true/yes/on/enabled`` → True, ``0/false/no/off/disabled`` → False, else None."""
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    return None


def parse_duration(text: str) -> Optional[float]:
    """Seconds from ``30``, ``30s``, ``1.5s``, ``500ms``, ``250us``, ``2m``, ``1h``; None if invalid."""
    m = re.fullmatch(_DURATION, text.strip().lower())
    if not m:
        return None
    unit = _DURATION_UNITS.get(m.group(3))
    if unit is None:
        return None
    number = float(m.group(1) + (f"e{m.group(2)}" if m.group(2) else ""))
    value = number * unit
    if math.isnan(value) or math.isinf(value):
        return None
    return value


def parse_size(text: str, bare: int = 1) -> Optional[float]:
    """Bytes from ``1048576``, ``512k``, ``10m``, ``10MB``, ``1.5GiB``; a bare number counts
    ``bare`` bytes (1, or ``1 << 20`` for a size in MiB). None if invalid."""
    m = re.fullmatch(_SIZE, text.strip().lower())
    if not m:
        return None
    unit = _SIZE_UNITS.get(m.group(2)) if m.group(2) else bare
    if unit is None:
        return None
    return float(m.group(1)) * unit


def format_seconds(v: float) -> str:
    if v >= 1 or v == 0:
        return f"{v:g}s"
    if v >= 1e-3:
        return f"{v * 1e3:g}ms"
    return f"{v * 1e6:g}us"


# ---------------------------------------------------------------- read at run time

def disabled_by_environment(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The ``ASPROF_ENABLED`` value that turns profiling off (the kill switch), or None."""
    value = (os.environ if environ is None else environ).get("ASPROF_ENABLED")
    if value is not None and value.strip().lower() in _FALSE:
        return value
    return None


def library_from_environment(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``ASPROF_LIB`` as an absolute path (``~`` expanded), or None when unset, empty or blank.

    ValueError for a relative path: it would be resolved against each process's working
    directory (another file in every directory a service runs in), so it is refused."""
    value = (os.environ if environ is None else environ).get("ASPROF_LIB", "").strip()
    if not value:
        return None
    path = os.path.expanduser(value)
    if not os.path.isabs(path):
        raise ValueError(f"ASPROF_LIB must be an absolute path, not {value!r} (a relative path would be "
                         "looked up in each process's working directory); give the full path of "
                         "libasyncProfiler.so")
    return os.path.normpath(path)


def parse_file_mode(text: str) -> Optional[int]:
    """An octal file mode (``600``, ``0640``, ``0o644``), or None when the text is not one."""
    t = text.strip().lower()
    if t.startswith("0o"):
        t = t[2:]
    if not t or len(t) > 4 or any(c not in "01234567" for c in t):
        return None
    return int(t, 8)


def file_mode_problem(mode: int) -> Optional[str]:
    """Why ``mode`` is not allowed for profiles (None when it is): the owner reads and
    writes, group and others may only read."""
    if mode & ~0o644 or mode & 0o600 != 0o600:
        return (f"file mode {mode:#o} is not allowed: the owner must read and write, group and others may "
                "only read (0o600, 0o640 or 0o644)")
    return None


#: The values of ``ProfilerOptions(engine=...)`` and ``ASPROF_ENGINE``.
ENGINE_NAMES = ("auto", "async-profiler", "builtin")


def engine_from_environment(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``ASPROF_ENGINE`` (``auto``, ``async-profiler`` or ``builtin``), or None when unset or
    empty; ValueError naming the variable for any other value."""
    raw = (os.environ if environ is None else environ).get("ASPROF_ENGINE", "")
    value = raw.strip().lower()
    if not value:
        return None
    if value not in ENGINE_NAMES:
        raise ValueError(f"ASPROF_ENGINE must be one of {', '.join(ENGINE_NAMES)}, got {raw!r}")
    return value


def pyframes_join_by_timestamp() -> bool:
    """``ASPROF_PYFRAMES_JOIN=timestamp`` (a test knob, see :data:`INTERNAL_VARIABLES`)."""
    return os.environ.get("ASPROF_PYFRAMES_JOIN", "").strip().lower() == "timestamp"


def pyframes_timing() -> bool:
    """``ASPROF_PYFRAMES_TIMING=1`` (a benchmark knob, see :data:`INTERNAL_VARIABLES`)."""
    return os.environ.get("ASPROF_PYFRAMES_TIMING", "").strip() == "1"
