"""Which engine records: ``ProfilerOptions(engine=...)`` and ``ASPROF_ENGINE`` (issue #11).

- ``"async-profiler"``: async-profiler, and today's :class:`~asprof.errors.LibraryNotFoundError`
  when it is missing;
- ``"builtin"``: the built-in engine (:mod:`asprof.engines.builtin`);
- ``"auto"`` (default): async-profiler when it loads (its native core ``asprof._native`` imports and
  ``libasyncProfiler.so`` is found and recent enough), else the built-in engine, with one INFO
  line saying why. A library asked for by path (``library_path=`` or ``ASPROF_LIB``) that does
  not load stays an error: that is not a library that happens to be missing.

``ASPROF_ENGINE`` applies when the options leave the choice to ``auto``. :class:`EngineFactory`
decides once per profiler: a forked child uses the engine its parent chose.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional, Tuple

from asprof.autostart.values import engine_from_environment, library_from_environment
from asprof.errors import LibraryNotFoundError, UnsupportedVersionError

if TYPE_CHECKING:
    from asprof.engines.base import Engine
    from asprof.options import ProfilerOptions

__all__ = ["ENGINES", "EngineFactory", "make_engine", "requested_engine", "describe"]

logger = logging.getLogger("asprof")

ENGINES = ("auto", "async-profiler", "builtin")
ASYNC_PROFILER = "async-profiler"
BUILTIN = "builtin"


def _async_profiler_engine(options: "ProfilerOptions", library_path: Optional[str]) -> "Engine":
    """async-profiler's engine (loads the library). A seam: tests replace it to play a machine
    without async-profiler whatever this one has."""
    from asprof.engines.asyncprofiler import NativeEngine

    return NativeEngine(options, library_path)


def _load_async_profiler(library_path: Optional[str]) -> str:
    """Loads async-profiler (for :func:`describe`); returns what loaded. Also a seam."""
    from asprof.engines.asyncprofiler import load_library

    _lib, info = load_library(library_path)
    return f"async-profiler {info.version} loads from {info.path}"


def requested_engine(options: "ProfilerOptions") -> Tuple[str, str]:
    """(engine asked for, where it was asked): the options, else ``ASPROF_ENGINE``, else auto.
    Raises ValueError for an invalid ``ASPROF_ENGINE``."""
    asked = getattr(options, "engine", "auto")
    if asked != "auto":
        return asked, "ProfilerOptions(engine=...)"
    env = engine_from_environment()
    if env is not None and env != "auto":
        return env, "ASPROF_ENGINE"
    return "auto", "default"


def _explicit_library(library_path: Optional[str]) -> bool:
    if library_path is not None:
        return True
    try:
        return library_from_environment() is not None
    except ValueError:  # a relative ASPROF_LIB: asked for, and refused with its reason
        return True


def make_engine(options: "ProfilerOptions", library_path: Optional[str] = None,
                engine: Optional[str] = None) -> "Engine":
    """The engine to run (not started). ``engine`` overrides the choice (a forked child's)."""
    asked = engine if engine is not None else requested_engine(options)[0]
    if asked == ASYNC_PROFILER:
        return _async_profiler_engine(options, library_path)
    from asprof.engines import builtin

    if asked == BUILTIN:
        return builtin.BuiltinEngine(options, explicit=True)
    try:
        return _async_profiler_engine(options, library_path)
    except (LibraryNotFoundError, UnsupportedVersionError, ImportError) as e:
        why_not = builtin.unavailable_reason()
        if _explicit_library(library_path) or why_not is not None:
            raise
        logger.info("engine: built-in (async-profiler does not load: %s)", _first_line(e))
        return builtin.BuiltinEngine(options, explicit=False)


def _first_line(e: BaseException) -> str:
    tried = getattr(e, "tried", None)
    if isinstance(e, LibraryNotFoundError) and tried:
        return "not found; tried " + "; ".join(f"{where}: {what}" for where, what in tried)
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class EngineFactory:
    """Makes the profiler's engine; the first choice sticks (a forked child makes the same kind)."""

    __slots__ = ("options", "library_path", "chosen", "explicit")

    def __init__(self, options: "ProfilerOptions", library_path: Optional[str]) -> None:
        self.options = options
        self.library_path = library_path
        self.chosen: Optional[str] = None
        self.explicit = True  # False when auto chose

    def __call__(self) -> "Engine":
        if self.chosen == BUILTIN and not self.explicit:
            from asprof.engines import builtin  # auto chose it before: same leniency, no second INFO line

            return _with_alloc(builtin.BuiltinEngine(self.options, explicit=False), self.options)
        if self.chosen is None:
            self.explicit = requested_engine(self.options)[0] != "auto"
        eng = make_engine(self.options, self.library_path, self.chosen)
        if self.chosen is None:
            self.chosen = BUILTIN if getattr(eng, "name", None) == BUILTIN else ASYNC_PROFILER
        return _with_alloc(eng, self.options)


def _with_alloc(eng: "Engine", options: "ProfilerOptions") -> "Engine":
    """Python allocation sampling around either engine (issue #16), when asked for."""
    if getattr(options, "python_alloc", None) is None:
        return eng
    from asprof.engines.alloc import wrap

    return wrap(eng, options)


def describe(options: "Optional[ProfilerOptions]" = None, library_path: Optional[str] = None) -> Tuple[str, str]:
    """(engine that would run, why) without starting anything: for ``asprof doctor``.
    The engine is ``"async-profiler"``, ``"builtin"`` or ``"none"``."""
    from asprof.engines import builtin

    try:
        if options is None:
            from asprof.options import ProfilerOptions

            options = ProfilerOptions()
        asked, where = requested_engine(options)
    except ValueError as e:
        return "none", str(e)
    if asked == BUILTIN:
        why_not = builtin.unavailable_reason()
        if why_not is not None:
            return "none", f"engine=builtin ({where}) but {why_not}"
        return BUILTIN, f"asked for by {where}"
    try:
        loaded = _load_async_profiler(library_path)
    except (LibraryNotFoundError, UnsupportedVersionError, ImportError) as e:
        if asked == ASYNC_PROFILER:
            return "none", f"engine=async-profiler ({where}) but it does not load: {_first_line(e)}"
        if _explicit_library(library_path):
            return "none", f"the async-profiler library asked for does not load: {_first_line(e)}"
        why_not = builtin.unavailable_reason()
        if why_not is not None:
            return "none", f"async-profiler does not load ({_first_line(e)}) and {why_not}"
        return BUILTIN, f"auto: async-profiler does not load ({_first_line(e)})"
    if asked == ASYNC_PROFILER:
        return ASYNC_PROFILER, f"asked for by {where}; {loaded}"
    return ASYNC_PROFILER, f"auto: {loaded}"
