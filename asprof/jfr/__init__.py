"""Read and view the JFR recordings that async-profiler writes.

>>> import asprof.jfr
>>> rec = asprof.jfr.open("profile.jfr")            # .jfr, S3 reporter .zip, a directory, or bytes
>>> rec.counts["jdk.ExecutionSample"]               # (events, bytes)
>>> for ev in rec.events(["profiler.UserEvent"]):   # any event type, decoded from the metadata
...     print(ev.time_ns, ev.thread, ev["data"])
>>> prof = rec.samples("cpu", threads=["worker.*"], exclude=".*PyGC.*")
>>> open("cpu.html", "w").write(asprof.jfr.to_html(prof))
>>> print(asprof.jfr.format_top(prof, 10))

Every problem with the input raises :class:`JfrError` (a ``ValueError``)
naming the file, the byte offset and what is wrong.

Everything offline lives here (the reader, the aggregation, the Python-stack join, the views).
May import only :mod:`asprof.jfr`, :mod:`asprof.jfrio`, :mod:`asprof.errors` and
:mod:`asprof.options`; the agent side never imports it (only :mod:`asprof.cli` does).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from asprof.jfr.errors import JfrError
from asprof.jfr.inputs import ReadLimits
from asprof.jfr.model import Event, Frame, FrameType, Setting, StackTrace, Thread
from asprof.jfr.profile import KINDS, Profile, build_profile
from asprof.jfr.reader import Chunk, PathOrBytes, ProgressFn, Recording, open_recording
from asprof.jfr.views import TopEntry, format_top, to_collapsed, to_html, to_pprof, top, write_collapsed

__all__ = [
    "open",
    "JfrError",
    "ReadLimits",
    "Recording",
    "Chunk",
    "Event",
    "Frame",
    "FrameType",
    "Setting",
    "StackTrace",
    "Thread",
    "Profile",
    "KINDS",
    "build_profile",
    "to_collapsed",
    "write_collapsed",
    "to_html",
    "to_pprof",
    "top",
    "format_top",
    "TopEntry",
]


def open(  # noqa: A001 - mirrors the builtin on purpose: asprof.jfr.open(path)
    source: Union[PathOrBytes, Sequence[PathOrBytes]],
    progress: Optional[ProgressFn] = None,
    limits: Optional[ReadLimits] = None,
) -> Recording:
    """Open a recording: a ``.jfr`` path, an S3 reporter ``.zip``, a gzipped JFR, a directory
    of profiles (merged in time order), the bytes of any of these, or a list of these; read
    within ``limits`` (:class:`ReadLimits`, the defaults when None)."""
    return open_recording(source, progress, limits)
