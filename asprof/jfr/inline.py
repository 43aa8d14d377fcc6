"""Offline: recordings rewritten with their Python frames inline (issue #12), for
``asprof convert IN -o OUT.jfr --format jfr``.

The rewrite itself is :mod:`asprof.jfrio.inline` (the agent runs it on each report); this module
applies it to an opened :class:`~asprof.jfr.reader.Recording`: each input file (a ``.jfr``, the
JFR of an S3 reporter ``.zip``, each file of a directory) is rewritten on its own, since the
Python-stack side events of a file describe that file's samples only, and the results are
concatenated, in the recording's order, into one JFR file that every tool reads.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from asprof.jfr.errors import JfrError
from asprof.jfr.inputs import DEFAULT_LIMITS, ReadLimits, load_path
from asprof.jfrio.inline import ChunkError, Inliner, InlineStats

if TYPE_CHECKING:  # pragma: no cover
    from asprof.jfr.reader import Recording

__all__ = ["inline_recording", "InlineStats"]


def inline_recording(rec: "Recording", stats: Optional[InlineStats] = None,
                     limits: Optional[ReadLimits] = None) -> Tuple[bytes, List[str]]:
    """(the JFR bytes of ``rec`` with Python frames inline, warnings). Each input file of
    ``rec`` is read again (within ``limits``) and written again through the writer, its chunks
    as far as the reader took them; chunk and pool keys stay unique across the output. A file
    that cannot be rewritten is copied as recorded, with a warning naming it."""
    inl = Inliner(stats)
    ends: Dict[str, int] = {}
    for c in rec.chunks:
        ends[c.source] = max(ends.get(c.source, 0), c.end)
    parts: List[bytes] = []
    warnings: List[str] = []
    for source, end in ends.items():
        if source.startswith("<"):
            raise JfrError("recordings given as bytes cannot be rewritten here: pass their paths", None, source)
        data = bytes(load_path(source, limits if limits is not None else DEFAULT_LIMITS)[0][:end])
        try:
            parts.append(inl.rewrite(data, always=True))
        except ChunkError as e:
            warnings.append(f"{source}: cannot be rewritten ({e}); copied as recorded")
            parts.append(data)
    return b"".join(parts), warnings
