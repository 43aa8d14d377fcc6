"""Agent-side control of the Python-frame capture (``asprof._pyframes``, csrc/pyframes).

:func:`attach_capture` installs the capture for a loaded async-profiler, and :class:`Capture`
is what the engine calls at each rotation. The offline side (decoding the events and joining
them to samples) is :mod:`asprof.jfr.pystacks`. May import: ``asprof._native``,
``asprof._pyframes``, :mod:`asprof.errors`; never the reader.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, FrozenSet, Optional, Tuple

from asprof.autostart.values import pyframes_join_by_timestamp, pyframes_timing

__all__ = ["Capture", "attach_capture", "unsupported_reason", "SUPPORTED_VERSIONS"]

log = logging.getLogger("asprof")

# The CPython versions whose frame layout the walk (csrc/pyframes/walk.c) knows; setup.py builds
# it only there. A newer version is refused until it is supported (issue #14).
SUPPORTED_VERSIONS = ((3, 9), (3, 14))


def free_threaded(config_var: Optional[Any] = None) -> bool:
    """Whether this interpreter is a free-threaded build (``Py_GIL_DISABLED``), whether or not
    the GIL was turned back on at run time: the frame layout differs either way.
    ``config_var``: the value of ``sysconfig.get_config_var("Py_GIL_DISABLED")`` (tests)."""
    if config_var is None:
        import sysconfig

        config_var = sysconfig.get_config_var("Py_GIL_DISABLED")
    if config_var:
        return True
    import sys

    is_enabled = getattr(sys, "_is_gil_enabled", None)  # 3.13+: False only in a free-threaded build
    return is_enabled is not None and not is_enabled()


def unsupported_reason(implementation: Optional[str] = None, version: Optional[Tuple[int, ...]] = None,
                       gil_disabled: Optional[bool] = None) -> Optional[str]:
    """Why Python stacks cannot be captured by this interpreter, or None. The arguments default
    to this interpreter's (``sys.implementation.name``, ``sys.version_info``, :func:`free_threaded`)."""
    import sys

    name = sys.implementation.name if implementation is None else implementation
    v = tuple(sys.version_info[:3] if version is None else version)
    shown = ".".join(map(str, v))
    lo, hi = SUPPORTED_VERSIONS
    if name != "cpython" or not lo <= v[:2] <= hi:
        return "CPython %d.%d to %d.%d is needed, this is %s %s" % (lo + hi + (name, shown))
    if free_threaded() if gil_disabled is None else gil_disabled:
        return (f"CPython {shown} is a free-threaded build (Py_GIL_DISABLED): the frame walk is not "
                "supported there yet; native stacks are profiled")
    return None


class Capture:
    """The process's Python-frame capture (``asprof._pyframes``), attached to one engine."""

    def __init__(self, module: Any) -> None:
        self._m = module
        self._context: Optional[Any] = None  # issue #15: asprof.context.report.ContextEvents

    def enable_context(self, steps: bool, threshold_ns: int, otel: bool = False) -> None:
        """Issue #15: label-set definitions and asyncio step events go into each recording
        (``steps``: hook the asyncio event loop; ``threshold_ns``: the wall interval)."""
        if not getattr(self._m, "labels_hooked", lambda: False)():
            log.info("asprof: samples carry no labels: asprof.context._ctx is not built")
        from asprof.context.report import ContextEvents

        self._context = ContextEvents(steps, threshold_ns, otel)
        self._context.start()

    def before_rotation(self) -> None:
        """Before a stop: name the modules of the code seen in this recording (needs the GIL;
        the C side then drains its buffers into the recording from the stop hook)."""
        try:
            self._m.sync_modules()
        except Exception:  # noqa: BLE001 - never break a rotation
            log.debug("asprof: could not map Python modules", exc_info=True)
        ctx = self._context
        if ctx is not None:  # issue #15
            try:
                for kind, payload in ctx.payloads_for_rotation(self._m.take_labels()):
                    self._m.emit_context(kind, payload)
            except Exception:  # noqa: BLE001 - never break a rotation
                log.warning("asprof: could not write label and step events", exc_info=True)

    def stats(self) -> Dict[str, int]:
        return dict(self._m.stats())

    def detach(self) -> None:
        global _capture
        if self._context is not None:
            self._context.stop()
            self._context = None
        try:
            self._m.uninstall()
        finally:
            _capture = None


_capture: Optional[Capture] = None
_capture_pid = 0


def attach_capture(info: Any) -> Optional[Capture]:
    """Installs the capture for the loaded async-profiler ``info`` (a ``LibraryInfo``).

    Returns None, with one log line, when it is not supported here: async-profiler older than
    4.1 (no user events) or without ``asprof_get_thread_local_data``, a Python other than
    CPython 3.9-3.14 with the GIL (:func:`unsupported_reason`), or the extension missing. On 4.0-4.4 ``sample_counter`` counts events,
    so samples are joined by timestamp instead of exactly.
    """
    global _capture, _capture_pid
    if _capture is not None:
        if _capture_pid == os.getpid():
            return _capture
        _capture = None  # a forked child: the parent's capture was reset by the at-fork handler
    why = unsupported_reason()
    if why is not None:
        log.info("asprof: Python frames are off: %s", why)
        return None
    vt = tuple(getattr(info, "version_tuple", ()) or ())
    caps: FrozenSet[str] = frozenset(getattr(info, "capabilities", frozenset()))
    if "user_events" not in caps or "thread_local_data" not in caps or (vt and vt < (4, 1)):
        log.info("asprof: Python frames are off: async-profiler %s lacks the 4.x thread-local "
                 "data and user-event functions (4.1 or later is needed)", getattr(info, "version", "?"))
        return None
    try:
        from asprof import _native, _pyframes
    except ImportError as e:
        log.info("asprof: Python frames are off: the extension asprof._pyframes is missing (%s)", e)
        return None
    exact = bool(vt) and vt >= (4, 5)
    if pyframes_join_by_timestamp():  # tests: the 4.0-4.4 join on 4.5
        exact = False
    mode = _pyframes.JOIN_EXACT if exact else _pyframes.JOIN_COUNTER
    try:
        _pyframes.install(info.path, _native.__file__, mode,
                          timing=pyframes_timing())
    except (OSError, RuntimeError, ValueError) as e:
        log.info("asprof: Python frames are off: %s", e)
        return None
    if not exact:
        log.info("asprof: async-profiler %s: Python stacks are joined to samples by timestamp "
                 "(exact join needs 4.5 or later)", getattr(info, "version", "?"))
    _capture = Capture(_pyframes)
    _capture_pid = os.getpid()
    return _capture
