"""``import asprof.auto``: profile this process as the ``ASPROF_*`` variables say.

One line at the top of the application's entry point (or what ``asprof run``
does for it, through ``sitecustomize``)::

    import asprof.auto  # noqa: F401

Profiling starts once per process, detached: it runs until
:func:`asprof.stop_profiling` or exit. Nothing here ever raises: an invalid
variable or a missing async-profiler is one log line and the application
runs unprofiled. ``asprof.auto.profiler`` is the running profiler, or None.
See docs/configuration.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from asprof.autostart.start import auto_start

if TYPE_CHECKING:
    from asprof.profiler import RunningProfiler

__all__ = ["profiler"]

profiler: Optional["RunningProfiler"] = auto_start()
