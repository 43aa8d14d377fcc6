"""One JFR chunk: its header, metadata, constant pools and events, decoded on demand.

The byte-level work (varints, metadata, constant pools, the event scan) is in the Cython
module :mod:`asprof.jfr._parser`. A recording (:mod:`asprof.jfr.reader`) is a list of chunks;
what the aggregation and the Python-stack join read of one is :class:`RecordingLike`.
"""
from __future__ import annotations

import logging
import os
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Protocol,
    Set,
    Tuple,
    Union,
)

from asprof.jfr import _parser
from asprof.jfr.errors import JfrError
from asprof.jfr.model import Event, Frame, FrameType, Setting, StackTrace, Thread

__all__ = ["Chunk", "RecordingLike", "HEADER_SIZE", "ProgressFn", "PathOrBytes"]

log = logging.getLogger("asprof.jfr")

HEADER_SIZE = 68
MAX_RESOLVE_DEPTH = 64
MAX_RESOLVE_NODES = 1_000_000

_UNRESOLVED = object()

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
                 progress: Optional[Callable[[int], None]] = None,
                 metadata_cache: Optional[Dict[bytes, Any]] = None, raw: Any = None) -> None:
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
        self.classes, self.types = _metadata(data, raw, offset + self.meta_offset, self.end, metadata_cache)
        self.pools: Dict[int, Dict[int, Any]] = {}
        self.stacks = _parser.StackTable()
        self._resolved: Dict[Tuple[int, int], Any] = {}
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
        # in the JDK's own recordings it means a Java native method. asprof's writer
        # (asprof.jfrio.writer) has "Python" instead of "Kernel": there too it is C code.
        self.native_is_c = any(v in ("Kernel", "Python") for v in ft.values())

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
        Each constant-pool entry is resolved once per chunk and its value shared by every
        value that refers to it (treat resolved values as read-only): entries that refer
        to each other many times over (a fan-out of references, 85 KB of them) cost their
        size, not a budget per thread or method (that took minutes).
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
            done = self._resolved.get((tid, key), _UNRESOLVED)
            if done is not _UNRESOLVED:
                return done
            target = self.pools.get(tid, {}).get(key)
            if target is None:
                return None
            out = self._resolve(target, depth + 1, path + ((tid, key),), budget)
            if budget[0] >= 0:  # complete: each entry is resolved once per chunk
                self._resolved[(tid, key)] = out
            return out
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


def _metadata(data: "_parser.Buf", raw: Any, start: int, end: int, cache: Optional[Dict[bytes, Any]]) -> Any:
    """``parse_metadata`` of the metadata event at ``start``, shared by the chunks whose metadata
    event has the same bytes (every chunk of a recording repeats it: parsed once, a file of many
    small chunks costs memory in proportion to its size, not ~10x it). ``raw``: the bytes-like
    object ``data`` views."""
    if cache is None or raw is None:
        return _parser.parse_metadata(data, start, end)
    from asprof.jfrio.decode import ChunkError, varint

    try:
        size, _ = varint(raw[start:min(start + 9, end)], 0)
    except ChunkError:
        size = 0
    if not 2 <= size <= end - start:
        return _parser.parse_metadata(data, start, end)  # says what is wrong
    key = bytes(raw[start:start + size])
    parsed = cache.get(key)
    if parsed is None:
        parsed = cache[key] = _parser.parse_metadata(data, start, end)
    return parsed


def _str(v: Any) -> Optional[str]:
    return v if isinstance(v, str) else None


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


class RecordingLike(Protocol):
    """What the aggregation (:mod:`asprof.jfr.profile`) and the Python-stack join read of a
    recording; :class:`asprof.jfr.reader.Recording` is one."""

    chunks: List[Chunk]
    source: str

    @property
    def start_nanos(self) -> int: ...

    @property
    def end_nanos(self) -> int: ...

    @property
    def counts(self) -> Dict[str, Tuple[int, int]]: ...

    def setting(self, name: str, event_id: Optional[int] = None) -> Optional[str]: ...

    def events(self, types: Optional[Iterable[str]] = None) -> Iterator[Event]: ...
