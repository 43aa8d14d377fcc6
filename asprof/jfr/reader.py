"""Reading JFR recordings: the inputs (``.jfr`` files, S3 reporter zips, directories, bytes)
split into chunks (:mod:`asprof.jfr.chunk`), kept in time order as a :class:`Recording`."""
from __future__ import annotations

import logging
import os
import stat
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from asprof.jfr import _parser
from asprof.jfr.chunk import HEADER_SIZE, Chunk, PathOrBytes, ProgressFn
from asprof.jfr.errors import JfrError
from asprof.jfr.inputs import DEFAULT_LIMITS, ReadLimits, ReadTotals, check_path, list_dir, load_bytes, load_path
from asprof.jfr.model import Event, Setting, Thread

if TYPE_CHECKING:  # pragma: no cover
    from asprof.jfr.profile import Profile

__all__ = ["Chunk", "Recording", "open_recording", "HEADER_SIZE", "PathOrBytes", "ProgressFn", "ReadLimits"]

log = logging.getLogger("asprof.jfr")

class Recording:
    """A JFR recording: one or more chunks (possibly from several files).

    Create one with :func:`asprof.jfr.open`. Chunks are kept in time order.
    """

    def __init__(self, chunks: Sequence[Chunk], source: str = "<bytes>",
                 report_metadata: Optional[Mapping[str, Any]] = None) -> None:
        self.chunks: List[Chunk] = sorted(chunks, key=lambda c: (c.start_nanos, c.source, c.index))
        self.source = source
        #: The ``metadata.json`` of an S3 reporter zip (start/end/reporting_interval, ms), if any.
        self.report_metadata: Optional[Dict[str, Any]] = dict(report_metadata) if report_metadata else None
        #: Problems that did not stop reading (e.g. an unfinished last chunk).
        self.warnings: List[str] = []

    def __repr__(self) -> str:
        return f"<Recording {self.source!r}: {len(self.chunks)} chunk(s)>"

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    # -- overview ------------------------------------------------------------------------

    @property
    def start_nanos(self) -> int:
        return min((c.start_nanos for c in self.chunks), default=0)

    @property
    def end_nanos(self) -> int:
        return max((c.end_nanos for c in self.chunks), default=0)

    @property
    def duration_nanos(self) -> int:
        return self.end_nanos - self.start_nanos

    @property
    def counts(self) -> Dict[str, Tuple[int, int]]:
        """Event type -> (count, bytes) over all chunks (like ``jfr summary``)."""
        out: Dict[str, Tuple[int, int]] = {}
        for c in self.chunks:
            for name, (n, size) in c.counts.items():
                p = out.get(name, (0, 0))
                out[name] = (p[0] + n, p[1] + size)
        return out

    @property
    def threads(self) -> List[Thread]:
        """Distinct threads (by key and name) over all chunks."""
        seen: Dict[Tuple[int, str], Thread] = {}
        for c in self.chunks:
            for t in c.threads:
                seen.setdefault((t.key, t.name), t)
        return list(seen.values())

    @property
    def settings(self) -> List[Setting]:
        """``jdk.ActiveSetting`` events (usually all in the first chunk)."""
        return [s for c in self.chunks for s in c.settings]

    def setting(self, name: str, event_id: Optional[int] = None) -> Optional[str]:
        """Value of the last setting called ``name`` (optionally of one event type id)."""
        value = None
        for s in self.settings:
            if s.name == name and (event_id is None or s.event_id == event_id):
                value = s.value
        return value

    def events(self, types: Optional[Iterable[str]] = None) -> Iterator[Event]:
        """All events (or those of the named types), chunk by chunk in file order."""
        tlist = list(types) if types is not None else None
        for c in self.chunks:
            yield from c.events(tlist)

    # -- samples -------------------------------------------------------------------------

    def samples(self, kind: str = "cpu", **filters: Any) -> "Profile":
        """Aggregate samples into a :class:`~asprof.jfr.profile.Profile`.

        ``kind`` is ``cpu``, ``wall``, ``nativemem`` or ``leaks`` (or ``auto``).
        Filters: ``threads`` (names, regexes or tids), ``start``/``end``,
        ``include``/``exclude`` (regexes), ``by_thread``. See
        :func:`asprof.jfr.profile.build_profile`.
        """
        from asprof.jfr.profile import build_profile

        return build_profile(self, kind, **filters)


def _chunks_of(data: bytes, source: str, progress: Optional[ProgressFn],
               done_before: int, grand_total: int, warnings: List[str],
               metadata_cache: Optional[Dict[bytes, Any]] = None) -> List[Chunk]:
    chunks: List[Chunk] = []
    pos = 0
    n = len(data)
    buf = _parser.Buf(data)  # one read-only view shared by every chunk of this input
    if n == 0:
        raise JfrError("empty file", 0, source)
    while pos < n:
        if n - pos < HEADER_SIZE and chunks:
            warnings.append(f"{source}: {n - pos} trailing bytes after the last chunk ignored")
            break
        start = pos

        def _progress(p: int) -> None:
            if progress is not None:
                progress(done_before + p, grand_total)

        try:
            chunk = Chunk(buf, pos, len(chunks), source, _progress if progress else None, metadata_cache, data)
        except JfrError as e:
            if chunks and e.reason.startswith("incomplete chunk"):
                msg = f"{source}: chunk {len(chunks) + 1} at offset {start} is incomplete and was skipped"
                log.warning("%s", msg)
                warnings.append(msg)
                break
            raise e.with_path(source) from None
        chunks.append(chunk)
        pos = chunk.end
        if progress is not None:
            progress(done_before + pos, grand_total)
    return chunks


_READ_BLOCK = 16 << 20  # inputs smaller than this report no reading progress


def open_recording(source: Union[PathOrBytes, Sequence[PathOrBytes]],
                   progress: Optional[ProgressFn] = None,
                   limits: Optional[ReadLimits] = None) -> Recording:
    """Open a recording.

    ``source`` is a path to a ``.jfr`` file, to an S3 reporter ``.zip``
    (``async_profiler_dump_0.jfr`` + ``metadata.json``), to a gzipped JFR, to a
    directory of such files, the bytes of any of these, or a list of any of these.
    Several inputs are merged into one recording whose chunks are in time order.
    ``progress(done, total)`` is called while reading and parsing (the
    units are bytes read plus bytes parsed).

    Every input is read within ``limits`` (default :data:`~asprof.jfr.inputs.DEFAULT_LIMITS`:
    1 GiB per input after decompression, a compression ratio of 50, 10,000 files per
    directory); FIFOs, sockets, devices and symlink loops are refused. See
    :mod:`asprof.jfr.inputs`.
    """
    lim = limits if limits is not None else DEFAULT_LIMITS
    if isinstance(source, (list, tuple)):
        items: List[PathOrBytes] = list(source)
    else:
        items = [source]  # type: ignore[list-item]
    warnings: List[str] = []
    # what each item is, decided once: ("bytes", data) or ("file", path)
    plan: List[Tuple[str, Any]] = []
    sizes: Dict[str, int] = {}
    for item in items:
        if isinstance(item, (bytes, bytearray, memoryview)):
            plan.append(("bytes", item))
            continue
        p = os.fspath(item)
        st = check_path(p)
        if stat.S_ISDIR(st.st_mode):
            files, skipped = list_dir(p, lim)
            for msg in skipped:
                log.warning("%s", msg)
            warnings.extend(skipped)
            for f in files:
                plan.append(("file", f))
        else:
            plan.append(("file", p))
            sizes[p] = st.st_size
    read_total = 0
    for kind, what in plan:
        if kind == "file":
            if what not in sizes:
                try:
                    sizes[what] = os.stat(what).st_size
                except OSError:
                    sizes[what] = 0
            read_total += sizes[what]
    read_done = [0]
    totals = ReadTotals(lim)  # the ratio check over all the compressed inputs together
    blobs: List[Tuple[str, Any, Optional[Dict[str, Any]]]] = []
    for kind, what in plan:
        if kind == "bytes":
            jfr, meta, warns = load_bytes(what, lim, totals=totals)
            blobs.append(("<bytes>", jfr, meta))
            warnings.extend(warns)
            continue
        base = read_done[0]

        def cb(n: int, base: int = base) -> None:
            if progress is not None:
                progress(base + n, 2 * read_total)

        jfr, meta, warns = load_path(what, lim, cb if progress is not None and read_total >= _READ_BLOCK else None,
                                     totals)
        read_done[0] = base + sizes.get(what, 0)
        blobs.append((what, jfr, meta))
        warnings.extend(warns)
    total = read_total + sum(len(b) for _, b, _ in blobs)
    done = read_total
    chunks: List[Chunk] = []
    metadata_cache: Dict[bytes, Any] = {}  # chunks with the same metadata share its parse
    metas = []
    for name, blob, meta in blobs:
        chunks.extend(_chunks_of(blob, name, progress, done, total, warnings, metadata_cache))
        done += len(blob)
        if meta:
            metas.append(meta)
    label = blobs[0][0] if len(blobs) == 1 else (os.fspath(items[0]) if len(items) == 1 and not isinstance(
        items[0], (bytes, bytearray, memoryview)) else f"{len(blobs)} inputs")
    report = None
    if metas:
        report = dict(metas[0])
        if len(metas) > 1:
            starts: List[int] = [m["start"] for m in metas if isinstance(m.get("start"), int)]
            ends: List[int] = [m["end"] for m in metas if isinstance(m.get("end"), int)]
            if starts:
                report["start"] = min(starts)
            if ends:
                report["end"] = max(ends)
    rec = Recording(chunks, label, report)
    rec.warnings = warnings
    return rec
