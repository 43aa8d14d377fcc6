"""Agent-side control of the Python-frame capture (``asprof._pyframes``, csrc/pyframes).

:func:`attach_capture` installs the capture for a loaded async-profiler, and :class:`Capture`
is what the engine calls at each rotation. The offline side (decoding the events and joining
them to samples) is :mod:`asprof.jfr.pystacks`. May import: ``asprof._native``,
``asprof._pyframes``, :mod:`asprof.errors`; never the reader.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, FrozenSet, Optional

from asprof.autostart.values import pyframes_join_by_timestamp, pyframes_timing

__all__ = ["Capture", "attach_capture"]

log = logging.getLogger("asprof")


class Capture:
    """The process's Python-frame capture (``asprof._pyframes``), attached to one engine."""

    def __init__(self, module: Any) -> None:
        self._m = module
        self._context: Optional[Any] = None  # issue #15: asprof.context.report.ContextEvents

    def enable_context(self, steps: bool, threshold_ns: int) -> None:
        """Issue #15: label-set definitions and asyncio step events go into each recording
        (``steps``: hook the asyncio event loop; ``threshold_ns``: the wall interval)."""
        if not getattr(self._m, "labels_hooked", lambda: False)():
            log.info("asprof: samples carry no labels: asprof.context._ctx is not built")
        from asprof.context.report import ContextEvents

        self._context = ContextEvents(steps, threshold_ns)
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
    CPython 3.9-3.13, or the extension missing. On 4.0-4.4 ``sample_counter`` counts events,
    so samples are joined by timestamp instead of exactly.
    """
    global _capture, _capture_pid
    if _capture is not None:
        if _capture_pid == os.getpid():
            return _capture
        _capture = None  # a forked child: the parent's capture was reset by the at-fork handler
    import sys

    if sys.implementation.name != "cpython" or not (3, 9) <= sys.version_info[:2] <= (3, 13):
        log.info("asprof: Python frames are off: CPython 3.9 to 3.13 is needed, this is %s %s",
                 sys.implementation.name, sys.version.split()[0])
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
