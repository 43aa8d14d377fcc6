"""Reading JFR recordings: the inputs (``.jfr`` files, S3 reporter zips, directories, bytes)
split into chunks (:mod:`asprof.jfr.chunk`), kept in time order as a :class:`Recording`."""
from __future__ import annotations

import io
import logging
import os
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
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
from asprof.jfr.model import Event, Setting, Thread

if TYPE_CHECKING:  # pragma: no cover
    from asprof.jfr.profile import Profile

__all__ = ["Chunk", "Recording", "open_recording", "HEADER_SIZE", "PathOrBytes", "ProgressFn"]

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
               done_before: int, grand_total: int, warnings: List[str]) -> List[Chunk]:
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
            chunk = Chunk(buf, pos, len(chunks), source, _progress if progress else None)
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


def _read_zip(path: str, blob: bytes) -> Tuple[bytes, Optional[Dict[str, Any]]]:
    import json
    import zipfile

    try:
        zf = zipfile.ZipFile(io.BytesIO(blob))
    except zipfile.BadZipFile as e:
        raise JfrError(f"not a valid zip file ({e})", None, path) from None
    with zf:
        names = zf.namelist()
        jfr_names = [n for n in names if n == "async_profiler_dump_0.jfr"] or \
            sorted(n for n in names if n.endswith(".jfr"))
        if not jfr_names:
            raise JfrError("zip holds no .jfr file (expected async_profiler_dump_0.jfr)", None, path)
        meta: Optional[Dict[str, Any]] = None
        try:
            jfr = b"".join(zf.read(n) for n in jfr_names)
            if "metadata.json" in names:
                try:
                    m = json.loads(zf.read("metadata.json").decode("utf-8"))
                    meta = m if isinstance(m, dict) else None
                except (ValueError, UnicodeDecodeError):
                    log.warning("%s: metadata.json is not valid JSON; ignored", path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
            raise JfrError(f"cannot read zip member ({e})", None, path) from None
    return jfr, meta


_READ_BLOCK = 16 << 20


def _load_file(path: str, progress: Optional[Callable[[int], None]] = None) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """The bytes of a file (a ``bytearray``, read in blocks with ``progress(bytes_read)``),
    or the JFR and metadata inside an S3 reporter zip."""
    try:
        with io.open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            blob = bytearray(size)
            view = memoryview(blob)
            got = 0
            while got < size:
                n = f.readinto(view[got:got + _READ_BLOCK])
                if not n:
                    break
                got += n
                if progress is not None:
                    progress(got)
            view.release()
            if got < size:
                del blob[got:]  # the file shrank while being read
    except OSError as e:
        raise JfrError(f"cannot read file: {e.strerror or e}", None, path) from None
    if blob[:4] == b"PK\x03\x04" or path.endswith(".zip"):
        return _read_zip(path, bytes(blob))
    return blob, None


def _dir_files(path: str) -> List[str]:
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise JfrError(f"cannot list directory: {e.strerror or e}", None, path) from None
    files = [os.path.join(path, n) for n in names
             if n.endswith((".jfr", ".zip")) and os.path.isfile(os.path.join(path, n))]
    if not files:
        raise JfrError("directory holds no .jfr or .zip profiles", None, path)
    return files


def open_recording(source: Union[PathOrBytes, Sequence[PathOrBytes]],
                   progress: Optional[ProgressFn] = None) -> Recording:
    """Open a recording.

    ``source`` is a path to a ``.jfr`` file, to an S3 reporter ``.zip``
    (``async_profiler_dump_0.jfr`` + ``metadata.json``), to a directory of
    such files, the bytes of a JFR, or a list of any of these. Several
    inputs are merged into one recording whose chunks are in time order.
    ``progress(done, total)`` is called while reading and parsing (the
    units are bytes read plus bytes parsed).
    """
    if isinstance(source, (list, tuple)):
        items: List[PathOrBytes] = list(source)
    else:
        items = [source]  # type: ignore[list-item]
    blobs: List[Tuple[str, Any, Optional[Dict[str, Any]]]] = []
    paths: List[str] = []
    for item in items:
        if not isinstance(item, (bytes, bytearray, memoryview)):
            p = os.fspath(item)
            paths.extend(_dir_files(p) if os.path.isdir(p) else [p])
    read_total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    read_done = [0]

    def load(path: str) -> Tuple[Any, Optional[Dict[str, Any]]]:
        base = read_done[0]

        def cb(n: int) -> None:
            if progress is not None:
                progress(base + n, 2 * read_total)

        r = _load_file(path, cb if progress is not None and read_total >= _READ_BLOCK else None)
        read_done[0] = base + os.path.getsize(path) if os.path.isfile(path) else base
        return r

    for item in items:
        if isinstance(item, (bytes, bytearray, memoryview)):
            blob = bytes(item)
            if blob[:4] == b"PK\x03\x04":
                jfr, meta = _read_zip("<bytes>", blob)
                blobs.append(("<bytes>", jfr, meta))
            else:
                blobs.append(("<bytes>", blob, None))
            continue
        path = os.fspath(item)
        if os.path.isdir(path):
            for f in _dir_files(path):
                jfr, meta = load(f)
                blobs.append((f, jfr, meta))
        elif not os.path.exists(path):
            raise JfrError("no such file or directory", None, path)
        else:
            jfr, meta = load(path)
            blobs.append((path, jfr, meta))
    total = read_total + sum(len(b) for _, b, _ in blobs)
    done = read_total
    chunks: List[Chunk] = []
    warnings: List[str] = []
    metas = []
    for name, blob, meta in blobs:
        chunks.extend(_chunks_of(blob, name, progress, done, total, warnings))
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
