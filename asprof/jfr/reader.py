"""Reading JFR recordings: chunks, metadata, constant pools, events.

The byte-level work (varints, metadata, constant pools, the event scan) is in
the Cython module :mod:`asprof.jfr._parser`; this module holds the model.
"""
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
    Set,
    Tuple,
    Union,
)

from asprof.jfr import _parser
from asprof.jfr.errors import JfrError
from asprof.jfr.model import Event, Frame, FrameType, Setting, StackTrace, Thread

if TYPE_CHECKING:  # pragma: no cover
    from asprof.jfr.profile import Profile

__all__ = ["Chunk", "Recording", "open_recording", "HEADER_SIZE"]

log = logging.getLogger("asprof.jfr")

HEADER_SIZE = 68
MAX_RESOLVE_DEPTH = 64
MAX_RESOLVE_NODES = 1_000_000

#: Pseudo type names that ``jfr summary`` uses for the metadata and checkpoint events.
_SPECIAL_TYPES = {0: "jdk.Metadata", 1: "jdk.CheckPoint"}

ProgressFn = Callable[[int, int], None]
PathOrBytes = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


class Chunk:
    """One chunk of a recording: its header, metadata, constant pools and samples.

    Timestamps inside a chunk are ticks of the chunk's own clock; use
    :meth:`ticks_to_nanos` to get nanoseconds since the epoch.
    """

    def __init__(self, data: "_parser.Buf", offset: int, index: int, source: str,
                 progress: Optional[Callable[[int], None]] = None) -> None:
        self._data = data
        self.offset = offset
        self.index = index
        self.source = source
        h = _parser.parse_header(data, offset)
        self.major: int = h["major"]
        self.minor: int = h["minor"]
        self.size: int = h["size"]
        self.cp_offset: int = h["cp_offset"]
        self.meta_offset: int = h["meta_offset"]
        self.start_nanos: int = h["start_nanos"]
        self.duration_nanos: int = h["duration_nanos"]
        self.start_ticks: int = h["start_ticks"]
        self.ticks_per_second: int = h["ticks_per_second"]
        self.features: int = h["features"]
        if self.major != 2:
            raise JfrError(f"unsupported JFR version {self.major}.{self.minor} (expected 2.x)", offset)
        remaining = len(data) - offset
        if self.size < HEADER_SIZE or self.size > remaining:
            raise JfrError(
                f"incomplete chunk: header says {self.size} bytes, {remaining} available "
                "(truncated file, or a recording that is still running)", offset)
        if self.cp_offset == 0 or self.meta_offset == 0:
            raise JfrError("incomplete chunk: constant pool or metadata offset is 0 "
                           "(the recording was not finished)", offset)
        for what, off in (("metadata", self.meta_offset), ("constant pool", self.cp_offset)):
            if off < HEADER_SIZE or off >= self.size:
                raise JfrError(f"{what} offset {off} is outside the chunk", offset)
        if self.ticks_per_second <= 0:
            raise JfrError(f"invalid ticks per second {self.ticks_per_second}", offset + 56)
        if not self.features & 1:
            raise JfrError("uncompressed (fixed-width) JFR integers are not supported", offset + 64)
        self.end = offset + self.size
        self.classes, self.types = _parser.parse_metadata(data, offset + self.meta_offset, self.end)
        self.pools: Dict[int, Dict[int, Any]] = {}
        self.stacks = _parser.StackTable()
        self._columns: Dict[Tuple[int, ...], _parser.Columns] = {}
        counts: Dict[int, List[int]] = {}
        checkpoints: List[int] = []
        # the first scan counts events and finds checkpoints; samples are decoded on demand
        _parser.scan_events(data, offset + HEADER_SIZE, self.end, self.classes, _parser.Columns(),
                            counts, checkpoints, progress, kinds=())
        if not checkpoints:
            # async-profiler always writes one; follow the header if the scan found none
            checkpoints.append(offset + self.cp_offset)
        for cp in checkpoints:
            _parser.parse_checkpoint(data, cp, self.end, self.classes, self.pools, self.stacks)
        self._counts = counts
        self._string_type = self._type_id("java.lang.String")
        self._methods: Dict[Tuple[int, int], Tuple[str, str, str, FrameType]] = {}
        self._frame_types: Dict[int, FrameType] = {}
        self._threads: Dict[int, Thread] = {}
        self._traces: Dict[int, Optional[StackTrace]] = {}
        ft = self.pool("jdk.types.FrameType")
        for k, v in ft.items():
            self._frame_types[k] = FrameType.from_name(v if isinstance(v, str) else None)
        # async-profiler's FrameType pool has "Kernel": there "Native" means C code;
        # in the JDK's own recordings it means a Java native method.
        self.native_is_c = any(v == "Kernel" for v in ft.values())

    # -- samples -------------------------------------------------------------------------

    def columns_of(self, kinds: Tuple[int, ...]) -> "_parser.Columns":
        """The sample events of ``kinds`` (``_parser.KIND_*``) as columns, decoded on first use."""
        cols = self._columns.get(kinds)
        if cols is None:
            cols = _parser.Columns()
            try:
                _parser.scan_events(self._data, self.offset + HEADER_SIZE, self.end, self.classes, cols, {}, [],
                                    kinds=kinds)
            except JfrError as e:
                raise e.with_path(self.source) from None
            self._columns[kinds] = cols
        return cols

    @property
    def columns(self) -> "_parser.Columns":
        """All sample events (CPU, wall clock, Malloc and Free) as columns."""
        return self.columns_of(_parser.ALL_KINDS)

    # -- metadata and pools --------------------------------------------------------------

    def _type_id(self, name: str) -> Optional[int]:
        cls = self.types.get(name)
        return None if cls is None else int(cls.id)

    def pool(self, type_name: str) -> Dict[int, Any]:
        """The constant pool of a type, by type name (``{}`` if absent)."""
        tid = self._type_id(type_name)
        return self.pools.get(tid, {}) if tid is not None else {}

    @property
    def counts(self) -> Dict[str, Tuple[int, int]]:
        """Event type name -> (count, bytes), including metadata and checkpoints."""
        out: Dict[str, Tuple[int, int]] = {}
        for tid, (n, size) in self._counts.items():
            cls = self.classes.get(tid)
            name = cls.name if cls is not None else _SPECIAL_TYPES.get(tid, f"unknown.Type{tid}")
            if tid in _SPECIAL_TYPES:
                name = _SPECIAL_TYPES[tid]
            prev = out.get(name, (0, 0))
            out[name] = (prev[0] + n, prev[1] + size)
        return out

    def ticks_to_nanos(self, ticks: int) -> int:
        """Nanoseconds since the epoch of a tick value of this chunk."""
        return self.start_nanos + (ticks - self.start_ticks) * 1_000_000_000 // self.ticks_per_second

    def nanos_to_ticks(self, nanos: int) -> int:
        return self.start_ticks + (nanos - self.start_nanos) * self.ticks_per_second // 1_000_000_000

    @property
    def end_nanos(self) -> int:
        return self.start_nanos + self.duration_nanos

    def resolve(self, value: Any) -> Any:
        """Replace constant-pool references in a decoded value by what they refer to.

        Cyclic references resolve to ``None``; so does anything past
        ``MAX_RESOLVE_DEPTH`` references deep or past a budget of
        ``MAX_RESOLVE_NODES`` values (a hostile file cannot make this explode).
        """
        budget = [MAX_RESOLVE_NODES]
        return self._resolve(value, 0, (), budget)

    def _resolve(self, value: Any, depth: int, path: Tuple[Tuple[int, int], ...], budget: List[int]) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            return None
        if isinstance(value, _parser.Ref):
            tid, key = value.type_id, value.key
            if self._string_type is not None and tid == self._string_type:
                return self.pools.get(tid, {}).get(key)
            cls = self.classes.get(tid)
            if cls is not None and cls.name == "jdk.types.StackTrace":
                st = self.stack_trace(key)
                return None if st is None else self._stack_dict(st)
            if depth >= MAX_RESOLVE_DEPTH or (tid, key) in path:
                return None  # too deep, or a cyclic reference
            target = self.pools.get(tid, {}).get(key)
            if target is None:
                return None
            return self._resolve(target, depth + 1, path + ((tid, key),), budget)
        if isinstance(value, dict):
            return {k: self._resolve(v, depth, path, budget) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve(v, depth, path, budget) for v in value]
        return value

    def _stack_dict(self, st: StackTrace) -> Dict[str, Any]:
        idx = self.stacks.index.get(st.key)
        frames = []
        if idx is not None:
            type_pool = self.pool("jdk.types.FrameType")
            method_tid = self._type_id("jdk.types.Method")
            for (m, line, bci, ft) in self.stacks.frames(idx):
                method = self.resolve(_parser.Ref(method_tid, m)) if method_tid is not None else None
                frames.append({"method": method, "lineNumber": line, "bytecodeIndex": bci,
                               "type": type_pool.get(ft)})
        return {"truncated": st.truncated, "frames": frames}

    # -- threads, frames, stacks ---------------------------------------------------------

    def thread(self, key: int) -> Thread:
        t = self._threads.get(key)
        if t is None:
            entry = self.pool("java.lang.Thread").get(key)
            if isinstance(entry, dict):
                res = self.resolve(entry)
                t = Thread(key=key, os_name=_str(res.get("osName")),
                           os_thread_id=_int(res.get("osThreadId")),
                           java_name=_str(res.get("javaName")),
                           java_thread_id=_int(res.get("javaThreadId")))
            else:
                t = Thread(key=key, os_name=None, os_thread_id=key)
            self._threads[key] = t
        return t

    @property
    def threads(self) -> List[Thread]:
        return [self.thread(k) for k in self.pool("java.lang.Thread")]

    def frame_type(self, ftype_key: int) -> FrameType:
        t = self._frame_types.get(ftype_key)
        if t is None:
            t = FrameType(ftype_key) if 0 <= ftype_key <= 6 else FrameType.UNKNOWN
        return t

    def _symbol(self, ref: Any) -> str:
        v = self.resolve(ref)
        if isinstance(v, dict):  # a Symbol pool written as a struct {string: ...}
            v = next(iter(v.values()), None)
        return v if isinstance(v, str) else ""

    def method(self, method_key: int, ftype_key: int) -> Tuple[str, str, str, FrameType]:
        """(display name, method name, owner, frame type) of a frame."""
        ck = (method_key, ftype_key)
        r = self._methods.get(ck)
        if r is not None:
            return r
        ftype = self.frame_type(ftype_key)
        entry = self.pool("jdk.types.Method").get(method_key)
        if not isinstance(entry, dict):
            r = ("unknown", "unknown", "", ftype)
        else:
            mname = self._symbol(entry.get("name"))
            cls = entry.get("type")
            owner = ""
            if isinstance(cls, _parser.Ref):
                centry = self.pools.get(cls.type_id, {}).get(cls.key)
                if isinstance(centry, dict):
                    owner = self._symbol(centry.get("name"))
            native = ftype in (FrameType.CPP, FrameType.KERNEL) or (ftype == FrameType.NATIVE and self.native_is_c)
            if not owner or native:
                display = mname
            elif not mname:
                display = owner
            else:
                display = owner + "." + mname
            r = (display, mname, owner, ftype)
        self._methods[ck] = r
        return r

    def stack_trace(self, key: int) -> Optional[StackTrace]:
        if key in self._traces:
            return self._traces[key]
        idx = self.stacks.index.get(key)
        st: Optional[StackTrace] = None
        if idx is not None:
            frames = []
            for (m, line, bci, ft) in self.stacks.frames(idx):
                display, mname, owner, ftype = self.method(m, ft)
                frames.append(Frame(display, mname, owner, ftype, line, bci))
            st = StackTrace(key, tuple(frames), bool(self.stacks.truncated[idx]))
        self._traces[key] = st
        return st

    # -- events --------------------------------------------------------------------------

    def events(self, types: Optional[Iterable[str]] = None) -> Iterator[Event]:
        """Events of this chunk in file order (metadata and checkpoints excluded)."""
        if types is None:
            ids: Optional[Set[int]] = {int(c.id) for c in self.classes.values()} - {0, 1}
        else:
            ids = {int(self.types[t].id) for t in types if t in self.types}
            ids -= {0, 1}
            if not ids:
                return
        try:
            offsets = _parser.find_events(self._data, self.offset + HEADER_SIZE, self.end, ids)
            for off in offsets:
                tid, raw = _parser.decode_event(self._data, off, self.end, self.classes, self._string_type)
                yield Event(self.classes[tid].name, tid, self, off, raw)
        except JfrError as e:
            raise e.with_path(self.source) from None

    @property
    def settings(self) -> List[Setting]:
        out = []
        for ev in self.events(["jdk.ActiveSetting"]):
            v = ev.values
            out.append(Setting(_int(v.get("id")), _str(v.get("name")) or "", _str(v.get("value"))))
        return out


def _str(v: Any) -> Optional[str]:
    return v if isinstance(v, str) else None


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


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
