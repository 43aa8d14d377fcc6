"""Python frames inline (issue #12): a recording with asprof's Python-stack side events
rewritten into a plain recording whose stack traces carry the Python frames.

async-profiler records native stacks; asprof's capture (``csrc/pyframes``) records the Python
stack of each sampled thread in ``profiler.UserEvent`` side events (``asprof.PyCode``,
``asprof.PyStack``, ``asprof.PySample``, ``asprof.PyModule``; their payloads are described in
:mod:`asprof.jfr.pystacks`). Only asprof's reader joins the two. :func:`inline_python_frames`
does that join once and writes the result, so that every JFR tool (async-profiler's
``jfrconv``, the JDK ``jfr`` tool, JMC, ...) sees the Python code:

- each CPU (``jdk.ExecutionSample``) and wall-clock (``profiler.WallClockSample``) sample that
  has a Python stack gets a *mixed* stack: every native ``_PyEval_EvalFrameDefault`` frame is
  replaced by the Python frames that eval-loop call was running, leaf first; Python frames
  whose eval-loop frame is missing (a native stack cut at its root side) are kept at the root;
  a Python stack cut by the capture's depth limit ends with ``[truncated Python stack]``.
  The join is :mod:`asprof.jfr.pystacks`'s, rule for rule: exact by ``(tid, startTime)``
  (async-profiler 4.5+), else by timestamp within 2 ms, else the Python stack last seen on the
  same thread with the same native stack (``carried``), separately for CPU and wall samples;
- a sample without one keeps its native frames; no event of any other type is changed, and
  none is dropped: every sample keeps its time, thread, state and weight;
- frames are written as the built-in engine writes them (:mod:`asprof.jfrio.writer`): a Python
  frame is ``class = module, method = qualname, line = the line being run``, frame type
  ``Python``; native frames keep their library and symbol, frame type ``Native``. ``jfrconv``
  prints ``module.qualname`` (``:line`` with ``--lines``), the JDK tool ``module.qualname()
  line: N``. Kernel frames (``all_user=False``) become ``Native`` too, their names ending in
  ``_[k]`` as ``jfrconv`` prints them: a FrameType pool with ``Kernel`` would make ``jfrconv``
  print Python frames without their module;
- the side events that fed the join (``PyCode``/``PyStack``/``PySample``/``PyModule``) are
  left out: their content is in the stacks now, and asprof's own reader, finding none, does
  not join a second time. ``asprof.PyStats`` stays. The recording is marked with the setting
  ``pythonFramesInline = true`` and a ``profiler.UserEvent`` of type ``asprof.InlineStats``
  (JSON: how many samples were joined, and how).

Each input chunk becomes one output chunk written by :class:`~asprof.jfrio.writer.ChunkWriter`
(the one JFR writer): same start, duration and clock; pool keys unique across the file and a
metadata id of its own per chunk (the JDK's reader keeps both from one chunk to the next).

Agent side and offline: imports only :mod:`asprof.jfrio` and :mod:`asprof.errors`.
Malformed input raises :class:`~asprof.jfrio.decode.ChunkError`.
"""
from __future__ import annotations

import bisect
import json
import re
import struct
from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple

from asprof.jfrio import decode
from asprof.jfrio.decode import HEADER_SIZE, ChunkError, leb_string, uleb128
from asprof.jfrio.decode import varint as _varint
from asprof.jfrio.writer import (
    F_ARRAY,
    F_CPOOL,
    FRAME_NATIVE,
    FRAME_PYTHON,
    LOG_LEVELS,
    THREAD_STATES,
    ChunkWriter,
    Field,
)

__all__ = ["inline_python_frames", "Inliner", "has_python_stacks", "InlineStats", "ChunkError", "SETTING",
           "STATS_EVENT", "JOIN_EVENTS", "EVAL_FRAME", "TRUNCATED"]

#: Native frames that run Python code: one per eval-loop call (as in asprof.jfr.pystacks).
EVAL_FRAME = re.compile(r"^_PyEval_EvalFrameDefault(?:\..*)?$")
#: How far after async-profiler's timestamp ours may be for a timestamp join (pystacks).
TIMESTAMP_WINDOW_NS = 2_000_000
#: The side events the join consumes (left out of the output).
JOIN_EVENTS = frozenset({"asprof.PyCode", "asprof.PyStack", "asprof.PySample", "asprof.PyModule"})
#: The jdk.ActiveSetting that marks an inlined recording.
SETTING = "pythonFramesInline"
#: The profiler.UserEvent type of the join's counters (JSON).
STATS_EVENT = "asprof.InlineStats"
#: The name of the frame that ends a Python stack cut by the capture's depth limit.
TRUNCATED = "[truncated Python stack]"

_MAX_DEPTH = 16
_CHECKPOINTS = 1024
_STATE_BY_NAME = {v: k for k, v in THREAD_STATES.items()}
_LEVEL_BY_NAME = {v: k for k, v in LOG_LEVELS.items()}
# frame type descriptions -> the writer's keys
_JAVA_FRAME_TYPES = {"Interpreted": 0, "JIT compiled": 1, "Inlined": 2, "C1 compiled": 6}
_SAMPLE_FIELDS = ("startTime", "sampledThread", "stackTrace", "state")


class InlineStats:
    """How the samples of a rewrite were matched with Python stacks (as pystacks' JoinStats)."""

    __slots__ = ("exact", "timestamp", "carried", "unmatched_python_threads", "no_python", "samples",
                 "side_events")

    def __init__(self) -> None:
        self.exact = self.timestamp = self.carried = 0
        self.unmatched_python_threads = self.no_python = 0
        self.samples = 0  # CPU and wall samples written
        self.side_events = 0  # join events left out

    @property
    def with_python(self) -> int:
        return self.exact + self.timestamp + self.carried

    def as_dict(self) -> Dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self) -> str:
        return f"InlineStats({self.as_dict()})"


def has_python_stacks(data: bytes) -> bool:
    """Cheap test: may ``data`` carry Python-stack side events? (their type name is in it)."""
    return b"asprof.PySample" in data


# ---------------------------------------------------------------------- decoding


class _Field(NamedTuple):
    name: str
    type: int
    cpool: bool
    array: bool


class _Class:
    __slots__ = ("name", "id", "fields", "kind")

    def __init__(self, name: str, id: int, fields: List[_Field]) -> None:
        self.name = name
        self.id = id
        self.fields = fields
        # how a value of this type is read: v varint, b byte, f float, d double, s string, None struct
        self.kind: Optional[str] = _PRIMITIVE_KINDS.get(name)


_PRIMITIVE_KINDS = {"int": "v", "long": "v", "short": "v", "char": "v", "boolean": "b", "byte": "b",
                    "float": "f", "double": "d", "java.lang.String": "s"}


class _Ref(NamedTuple):
    """A constant-pool reference found in a value."""

    type: int
    key: int


def _element(b: bytes, i: int, strings: List[str], depth: int) -> Tuple[Tuple[str, Dict[str, str], List[Any]], int]:
    if depth > _MAX_DEPTH:
        raise ChunkError("metadata nested too deep")
    n = len(strings)
    k, i = _varint(b, i)
    name = strings[k] if k < n else ""
    na, i = _varint(b, i)
    attrs: Dict[str, str] = {}
    for _ in range(na):
        a, i = _varint(b, i)
        v, i = _varint(b, i)
        if a < n and v < n:
            attrs[strings[a]] = strings[v]
    nc, i = _varint(b, i)
    if nc > len(b) - i:
        raise ChunkError("metadata element count beyond the chunk")
    children = []
    for _ in range(nc):
        c, i = _element(b, i, strings, depth + 1)
        children.append(c)
    return (name, attrs, children), i


def _metadata(b: bytes, off: int) -> Dict[int, _Class]:
    i = off
    _, i = _varint(b, i)
    etype, i = _varint(b, i)
    if etype != 0:
        raise ChunkError("the metadata offset does not point at the metadata event")
    for _ in range(3):
        _, i = _varint(b, i)
    count, i = _varint(b, i)
    if count > len(b) - i:
        raise ChunkError("metadata string count beyond the chunk")
    strings: List[str] = []
    for _ in range(count):
        s, i = decode.jfr_string(b, i)
        strings.append(s or "")
    root, _ = _element(b, i, strings, 0)
    classes: Dict[int, _Class] = {}
    for meta in root[2]:
        if meta[0] != "metadata":
            continue
        for el in meta[2]:
            if el[0] != "class":
                continue
            try:
                cid = int(el[1].get("id", ""))
                fields = [_Field(f[1].get("name", ""), int(f[1].get("class", "")), f[1].get("constantPool") == "true",
                                 f[1].get("dimension", "0") not in ("", "0")) for f in el[2] if f[0] == "field"]
            except ValueError:
                raise ChunkError("metadata: a class or field id is not a number") from None
            classes[cid] = _Class(el[1].get("name", ""), cid, fields)
    return classes


_META_CACHE: Dict[bytes, Dict[int, _Class]] = {}
_META_CACHE_SIZE = 8


def _metadata_cached(b: bytes, off: int) -> Dict[int, _Class]:
    """:func:`_metadata`, remembered for the few metadata events a process's reports repeat
    (async-profiler's, the settings chunk's): parsed once, not at every report."""
    size, _ = _varint(b, off)
    if size <= 0 or off + size > len(b):
        raise ChunkError("metadata event beyond the chunk")
    key = bytes(b[off:off + size])
    got = _META_CACHE.get(key)
    if got is None:
        got = _metadata(b, off)
        if len(_META_CACHE) >= _META_CACHE_SIZE:
            _META_CACHE.pop(next(iter(_META_CACHE)))
        _META_CACHE[key] = got
    return got


_SKIPS: Dict[int, "re.Pattern[bytes]"] = {}


def _skip_varints(n: int) -> "re.Pattern[bytes]":
    """A pattern matching ``n`` JFR varints (up to 8 bytes with the high bit, then one more)."""
    p = _SKIPS.get(n)
    if p is None:
        one = rb"(?:[\x80-\xff]{0,7}[\x00-\x7f]|[\x80-\xff]{8}[\x00-\xff])"
        if n >= 65535:
            raise ChunkError("a stack trace deeper than 16383 frames")
        p = re.compile(one + b"{%d}" % n, re.DOTALL)
        if len(_SKIPS) < 512:
            _SKIPS[n] = p
    return p


class _Chunk:
    """One input chunk, decoded: header, classes, constant pools, events' offsets."""

    def __init__(self, b: bytes, off: int, h: decode.ChunkHeader) -> None:
        self.b = b
        self.off = off
        self.h = h
        self.end = off + h.size
        if not HEADER_SIZE <= h.meta_offset < h.size:
            raise ChunkError(f"metadata offset outside the chunk at byte {off}")
        if h.ticks_per_second <= 0:
            raise ChunkError(f"invalid ticks per second at byte {off}")
        self.classes = _metadata_cached(b, off + h.meta_offset)
        self.by_name = {c.name: c for c in self.classes.values()}
        self.string_type = self._id("java.lang.String")
        self.pools: Dict[int, Dict[int, Any]] = {}
        self.stacks: Dict[int, Tuple[bool, List[Tuple[int, int, int, int]]]] = {}
        self.stack_at: Dict[int, Tuple[int, int, bool]] = {}  # key -> (first frame, frames, truncated)
        self._read_pools()

    def _id(self, name: str) -> int:
        c = self.by_name.get(name)
        return c.id if c is not None else -1

    def pool(self, name: str) -> Dict[int, Any]:
        return self.pools.get(self._id(name), {})

    # -- values --------------------------------------------------------------------------

    def value(self, i: int, f: _Field, depth: int = 0) -> Tuple[Any, int]:
        b = self.b
        if f.array:
            n, i = _varint(b, i)
            if n > self.end - i:
                raise ChunkError("array length beyond the chunk")
            out = []
            for _ in range(n):
                v, i = self.one(i, f.type, f.cpool, depth)
                out.append(v)
            return out, i
        return self.one(i, f.type, f.cpool, depth)

    def one(self, i: int, tid: int, cpool: bool, depth: int) -> Tuple[Any, int]:
        b = self.b
        if cpool:
            k, i = _varint(b, i)
            return _Ref(tid, k), i
        cls = self.classes.get(tid)
        if cls is None:
            raise ChunkError(f"a field of unknown type {tid}")
        kind = cls.kind
        if kind == "v":
            return _varint(b, i)
        if kind == "b":
            if i >= self.end:
                raise ChunkError("truncated value")
            return b[i], i + 1
        if kind == "s":
            if i < self.end and b[i] == 2:  # a String pool reference
                k, i = _varint(b, i + 1)
                return _Ref(tid, k), i
            return decode.jfr_string(b, i)
        if kind == "f":
            if i + 4 > self.end:
                raise ChunkError("truncated value")
            return struct.unpack_from(">f", b, i)[0], i + 4
        if kind == "d":
            if i + 8 > self.end:
                raise ChunkError("truncated value")
            return struct.unpack_from(">d", b, i)[0], i + 8
        if depth > _MAX_DEPTH:
            raise ChunkError("values nested too deep")
        d: Dict[str, Any] = {}
        for f in cls.fields:
            d[f.name], i = self.value(i, f, depth + 1)
        return d, i

    # -- constant pools -------------------------------------------------------------------

    def _read_pools(self) -> None:
        b = self.b
        stack_type = self._id("jdk.types.StackTrace")
        frame_cls = self.by_name.get("jdk.types.StackFrame")
        trace_cls = self.by_name.get("jdk.types.StackTrace")
        fast_stacks = (trace_cls is not None and [f.name for f in trace_cls.fields] == ["truncated", "frames"]
                       and frame_cls is not None
                       and [f.name for f in frame_cls.fields] == ["method", "lineNumber", "bytecodeIndex", "type"]
                       and frame_cls.fields[0].cpool and frame_cls.fields[3].cpool
                       and not frame_cls.fields[1].cpool and not frame_cls.fields[2].cpool)
        cp = self.off + self.h.cpool_offset
        for _ in range(_CHECKPOINTS):
            if not self.off + HEADER_SIZE <= cp < self.end:
                raise ChunkError(f"constant pool offset outside the chunk at byte {self.off}")
            i = cp
            _, i = _varint(b, i)
            etype, i = _varint(b, i)
            if etype != 1:
                raise ChunkError(f"no checkpoint event at byte {cp}")
            _, i = _varint(b, i)  # start
            _, i = _varint(b, i)  # duration
            delta, i = _varint(b, i)
            i += 1  # flush
            npools, i = _varint(b, i)
            for _ in range(npools):
                tid, i = _varint(b, i)
                count, i = _varint(b, i)
                if count > self.end - i:
                    raise ChunkError("pool size beyond the chunk")
                if tid == stack_type:
                    if not fast_stacks:
                        raise ChunkError("stack traces laid out otherwise than async-profiler's")
                    i = self._read_stacks(i, count)
                    continue
                pool = self.pools.setdefault(tid, {})
                for _ in range(count):
                    k, i = _varint(b, i)
                    pool[k], i = self.one(i, tid, False, 0)
            if delta == 0 or delta >= (1 << 62):
                break
            cp += delta
        else:
            raise ChunkError("too many checkpoints")

    def _read_stacks(self, i: int, count: int) -> int:
        """Where each stack trace of the pool is (decoded when used: async-profiler's pool
        holds every stack seen since its start, most of them not used by this chunk)."""
        b = self.b
        end = self.end
        at = self.stack_at
        vi = _varint
        for _ in range(count):
            k, i = vi(b, i)
            if i >= end:
                raise ChunkError("truncated stack trace")
            trunc = b[i] != 0
            n, i = vi(b, i + 1)
            if n > end - i:
                raise ChunkError("stack trace length beyond the chunk")
            at[k] = (i, n, trunc)
            m = _skip_varints(4 * n).match(b, i, end)
            if m is None:
                raise ChunkError("truncated stack trace")
            i = m.end()
        return i

    def stack(self, k: int) -> Optional[Tuple[bool, List[Tuple[int, int, int, int]]]]:
        """The frames of stack trace ``k``: (method, line, bytecode index, frame type), leaf first."""
        got = self.stacks.get(k)
        if got is not None:
            return got
        where = self.stack_at.get(k)
        if where is None:
            return None
        i, n, trunc = where
        b = self.b
        vi = _varint
        frames = []
        for _ in range(n):
            c = b[i]  # the four varints of a frame: most are one byte
            if c < 0x80:
                m = c
                i += 1
            else:
                m, i = vi(b, i)
            c = b[i]
            if c < 0x80:
                line = c
                i += 1
            else:
                line, i = vi(b, i)
            c = b[i]
            if c < 0x80:
                bci = c
                i += 1
            else:
                bci, i = vi(b, i)
            c = b[i]
            if c < 0x80:
                ft = c
                i += 1
            else:
                ft, i = vi(b, i)
            frames.append((m, line, bci, ft))
        got = self.stacks[k] = (trunc, frames)
        return got

    # -- events ---------------------------------------------------------------------------

    def events(self) -> List[Tuple[int, int, int, int]]:
        """(offset, size, type id, offset of the first field) of each event but the metadata
        and checkpoints."""
        b = self.b
        out = []
        i = self.off + HEADER_SIZE
        end = self.end
        while i < end:
            size = b[i]  # most sizes and types are one byte (async-profiler's samples)
            j = i + 1
            if size >= 0x80:
                size, j = _varint(b, i)
            etype = b[j]
            if etype < 0x80:
                j += 1
            else:
                etype, j = _varint(b, j)
            if size <= 0 or i + size > end:
                raise ChunkError(f"bad event size at byte {i}")
            if etype > 1:
                out.append((i, size, etype, j))
            i += size
        return out

    def fields(self, off: int, cls: _Class) -> Tuple[List[Any], int]:
        """The values of the event at ``off`` (after its size and type), and where they end."""
        b = self.b
        _, i = _varint(b, off)
        _, i = _varint(b, i)
        vals = []
        for f in cls.fields:
            v, i = self.value(i, f)
            vals.append(v)
        return vals, i


# ---------------------------------------------------------------------- the Python stacks


def _plain_sample(c: _Chunk, cls: _Class) -> bool:
    """Are the fields of ``cls`` (startTime, thread, stack, state, ...) four varints then
    fields without pool references, as async-profiler writes its samples?"""
    f = cls.fields
    kinds = [c.classes[x.type].kind if x.type in c.classes else None for x in f]
    return (len(f) >= 4 and not f[0].cpool and kinds[0] == "v" and all(x.cpool and not x.array for x in f[1:4])
            and all(not x.cpool and not x.array and k == "v" for x, k in zip(f[4:], kinds[4:])))


def _read4(b: bytes, i: int) -> Tuple[Tuple[int, int, int, int], int, int]:
    """Four JFR varints at ``i``, where the first ends, where the last ends (IndexError when cut)."""
    out = []
    first = 0
    for n in range(4):
        if n == 1:
            first = i
        c = b[i]
        i += 1
        if c < 0x80:
            out.append(c)
            continue
        v = c & 0x7F
        shift = 7
        while True:
            c = b[i]
            i += 1
            if shift == 56:
                v |= c << 56
                break
            v |= (c & 0x7F) << shift
            if c < 0x80:
                break
            shift += 7
        out.append(v)
    return (out[0], out[1], out[2], out[3]), first, i


def _ulebs(b: bytes, i: int) -> List[int]:
    """Every LEB128 integer from ``i`` to the end (a payload made of integers only)."""
    vals = []
    v = shift = 0
    for c in b[i:]:
        v |= (c & 0x7F) << shift
        if c & 0x80:
            shift += 7
        else:
            vals.append(v)
            v = shift = 0
    if shift:
        raise ChunkError("truncated integer")
    return vals


class _PyStacks:
    """The side events of one recording file (pystacks' _Source)."""

    def __init__(self) -> None:
        self.codes: Dict[int, Tuple[int, int, str, str]] = {}
        self.modules: Dict[int, str] = {}
        self.raw_stacks: Dict[int, Tuple[bool, List[Tuple[int, int]]]] = {}
        self.exact: Dict[Tuple[int, int], int] = {}
        self.by_tsc: Dict[int, List[Tuple[int, int]]] = {}
        self.by_mono: Dict[int, List[Tuple[int, int]]] = {}
        self.threads: Set[int] = set()
        self.samples = 0
        self.bad = 0
        self.groups: Dict[int, Optional[Tuple[Tuple[Tuple[str, str, int], ...], ...]]] = {}
        self.truncated: Dict[int, bool] = {}

    def add(self, etype: str, b: bytes) -> None:
        if not b or b[0] != 1:
            self.bad += 1
            return
        i, n = 1, len(b)
        if etype == "asprof.PyCode":
            while i < n:
                cid, i = uleb128(b, i)
                first, i = uleb128(b, i)
                gid, i = uleb128(b, i)
                qn, i = leb_string(b, i)
                fn, i = leb_string(b, i)
                self.codes[cid] = (first, gid, qn, fn)
        elif etype == "asprof.PyStack":
            vals = _ulebs(b, 1)
            k, nv = 0, len(vals)
            while k < nv:
                sid, trunc, count = vals[k], vals[k + 1], vals[k + 2]
                k += 3
                entries: List[Tuple[int, int]] = []
                for _ in range(count):
                    v = vals[k]
                    if v >= 2:
                        entries.append((v - 2, vals[k + 1]))
                        k += 2
                    else:
                        entries.append((-1 - v, 0))  # -1 boundary, -2 unknown code
                        k += 1
                self.raw_stacks[sid] = (bool(trunc), entries)
        elif etype == "asprof.PySample":
            vals = _ulebs(b, 1)
            if len(vals) % 5:
                raise ChunkError("truncated PySample record")
            exact, by_tsc, by_mono, threads = self.exact, self.by_tsc, self.by_mono, self.threads
            for k in range(0, len(vals), 5):
                tid, counter, tsc, mono, sid = vals[k:k + 5]
                if tid not in threads:
                    threads.add(tid)
                    by_tsc[tid] = []
                    by_mono[tid] = []
                if counter:
                    exact[(tid, counter)] = sid
                by_tsc[tid].append((tsc, sid))
                by_mono[tid].append((mono, sid))
            self.samples += len(vals) // 5
        elif etype == "asprof.PyModule":
            while i < n:
                gid, i = uleb128(b, i)
                name, i = leb_string(b, i)
                self.modules[gid] = name

    def sort(self) -> None:
        for lst in list(self.by_tsc.values()) + list(self.by_mono.values()):
            lst.sort()

    def stack(self, sid: int) -> Optional[Tuple[Tuple[Tuple[str, str, int], ...], ...]]:
        """The eval-loop groups of Python stack ``sid``: (module, qualname, line) leaf first."""
        if sid in self.groups:
            return self.groups[sid]
        raw = self.raw_stacks.get(sid)
        out: Optional[Tuple[Tuple[Tuple[str, str, int], ...], ...]] = None
        if raw is not None:
            trunc, entries = raw
            groups: List[Tuple[Tuple[str, str, int], ...]] = []
            cur: List[Tuple[str, str, int]] = []
            for cid, line in entries:
                if cid == -1:
                    groups.append(tuple(cur))
                    cur = []
                    continue
                code = self.codes.get(cid) if cid >= 0 else None
                if code is None:
                    cur.append(("", "<unknown>", 0))
                    continue
                module = self.modules.get(code[1]) or _module_from_file(code[3])
                cur.append((module, code[2], line))
            if cur:
                groups.append(tuple(cur))
            out = tuple(groups)
            self.truncated[sid] = trunc
        self.groups[sid] = out
        return out

    def lookup(self, tid: int, ticks: int, monotonic: bool, tps: int) -> Tuple[Optional[int], str]:
        sid = self.exact.get((tid, ticks))
        if sid is not None:
            return sid, "exact"
        series = (self.by_mono if monotonic else self.by_tsc).get(tid)
        if series:
            window = TIMESTAMP_WINDOW_NS
            if not monotonic and tps:
                window = int(window * tps / 1e9)
            k = bisect.bisect_left(series, (ticks, -1))
            if k < len(series) and 0 <= series[k][0] - ticks <= window:
                return series[k][1], "timestamp"
        return None, "none"


def _module_from_file(filename: str) -> str:
    """A module name guessed from a file name (pystacks' rule)."""
    if not filename or filename.startswith("<"):
        return ""
    base = filename.rpartition("/")[2]
    stem = base[:-3] if base.endswith(".py") else base
    if stem == "__init__":
        stem = filename.rpartition("/")[0].rpartition("/")[2] or stem
    return stem


# ---------------------------------------------------------------------- the rewrite


class _Out:
    """One output chunk: a ChunkWriter and the translation of one input chunk's keys."""

    def __init__(self, c: _Chunk, index: int, key_base: int, user_types: Dict[str, int],
                 name_ids: Dict[Tuple[str, ...], int]) -> None:
        h = c.h
        self.c = c
        self.user_types = user_types
        self.w = ChunkWriter(h.start_nanos, h.start_ticks, h.ticks_per_second,
                             metadata_id=0x7FFFFFFF - index, key_base=key_base)
        self.threads: Dict[int, int] = {}
        self.methods: Dict[Tuple[int, int], Tuple[int, int, str]] = {}  # -> (out key, out type, display)
        self.natives: Dict[int, int] = {}  # input stack key -> output stack key
        self.names: Dict[int, Tuple[str, ...]] = {}  # input stack key -> frame names (the carry key)
        self.carry_ids: Dict[int, int] = {}
        self.name_ids = name_ids
        self.evals: Dict[int, Tuple[bool, ...]] = {}
        self.pyframes: Dict[Tuple[str, str], int] = {}  # (module, qualname) -> output method key
        self.joined: Dict[Tuple[int, int], int] = {}  # (input stack key, Python stack id) -> output key
        self.translated: Dict[int, Tuple[bool, List[Tuple[int, int, int]]]] = {}  # input stack -> output frames
        self.pygroups: Dict[int, Tuple[Tuple[Tuple[int, int, int], ...], ...]] = {}  # Python stack -> frames
        ft = c.pool("jdk.types.FrameType")
        self.frame_types: Dict[int, str] = {k: _simple_str(v) for k, v in ft.items()}
        self.native_is_c = any(v in ("Kernel", "Python") for v in self.frame_types.values())
        symbols = c.pool("jdk.types.Symbol")
        self.symbols = {k: _simple_str(v) for k, v in symbols.items()}
        self.classes = c.pool("java.lang.Class")
        self.method_pool = c.pool("jdk.types.Method")
        self.thread_pool = c.pool("java.lang.Thread")
        self.strings = c.pool("java.lang.String")

    def user_type(self, name: str) -> int:
        """The output key of a user event type: one per name across the whole output."""
        k = self.user_types.get(name)
        if k is None:
            k = self.user_types[name] = len(self.user_types) + 1
        return self.w.user_event_type(k, name)

    def thread(self, key: int) -> int:
        t = self.threads.get(key)
        if t is None:
            entry = self.thread_pool.get(key)
            tid = key
            if isinstance(entry, dict):
                os_tid = entry.get("osThreadId")
                if isinstance(os_tid, int) and os_tid > 0:
                    tid = os_tid
                name = self.string(entry.get("osName"))
                jname = self.string(entry.get("javaName"))
                jid = entry.get("javaThreadId")
                self.w.thread(tid, name if name is not None else f"[tid={tid}]", jname,
                              jid if isinstance(jid, int) else 0)
            t = self.threads[key] = tid
        return t

    def string(self, v: Any) -> Optional[str]:
        if isinstance(v, _Ref):
            v = self.strings.get(v.key)
        return v if isinstance(v, str) else None

    def symbol(self, ref: Any) -> str:
        if isinstance(ref, _Ref):
            return self.symbols.get(ref.key, "")
        return ref if isinstance(ref, str) else ""

    def frame_type(self, ft: int) -> int:
        desc = self.frame_types.get(ft)
        if desc == "Python":
            return FRAME_PYTHON
        java = _JAVA_FRAME_TYPES.get(desc or "")
        if java is not None:
            return java
        return FRAME_NATIVE  # Native, C++, Kernel, unknown

    def method(self, m: int, ft: int) -> Tuple[int, int, str]:
        """(output method key, output frame type, display name) of an input frame."""
        r = self.methods.get((m, ft))
        if r is not None:
            return r
        entry = self.method_pool.get(m)
        desc_name = self.frame_types.get(ft, "")
        out_type = self.frame_type(ft)
        if not isinstance(entry, dict):
            key = self.w.method("", "unknown", "()L;", 0x100)
            r = (key, out_type, "unknown")
        else:
            name = self.symbol(entry.get("name"))
            descriptor = self.symbol(entry.get("descriptor"))
            mods = entry.get("modifiers")
            owner = ""
            cref = entry.get("type")
            if isinstance(cref, _Ref):
                centry = self.classes.get(cref.key)
                if isinstance(centry, dict):
                    owner = self.symbol(centry.get("name"))
            # a kernel frame keeps the mark jfrconv and asprof give it (``_[k]``) in its name: the
            # output's FrameType pool cannot say Kernel (see the module docstring)
            key = self.w.method(owner, name + "_[k]" if desc_name == "Kernel" else name, descriptor,
                                mods if isinstance(mods, int) else 0)
            native = desc_name in ("C++", "Kernel") or (desc_name == "Native" and self.native_is_c)
            display = name if (not owner or native) else (owner if not name else owner + "." + name)
            r = (key, out_type, display)
        self.methods[(m, ft)] = r
        return r

    def _frames(self, skey: int) -> Tuple[bool, List[Tuple[int, int, int]], Tuple[str, ...], Tuple[bool, ...]]:
        st = self.c.stack(skey)
        if st is None:
            return False, [], (), ()
        trunc, frames = st
        out = []
        names = []
        for m, line, _bci, ft in frames:
            key, otype, display = self.method(m, ft)
            out.append((key, line, otype))
            names.append(display)
        return trunc, out, tuple(names), tuple(EVAL_FRAME.match(n) is not None for n in names)

    def native_stack(self, skey: int) -> int:
        k = self.natives.get(skey)
        if k is None:
            trunc, frames, names, evals = self._frames(skey)
            k = self.natives[skey] = self.w.stack(frames, trunc)
            self.names[skey] = names
            self.evals[skey] = evals
            self.translated[skey] = (trunc, frames)
        return k

    def carry_key(self, skey: int) -> int:
        """The carry key of an input stack: one number per sequence of frame names (pystacks
        carries by names), the same across the chunks of the file."""
        k = self.carry_ids.get(skey)
        if k is None:
            if skey not in self.names:
                self.native_stack(skey)
            k = self.carry_ids[skey] = self.name_ids.setdefault(self.names[skey], len(self.name_ids))
        return k

    def _pyframe(self, mod: str, qn: str) -> int:
        k = self.pyframes.get((mod, qn))
        if k is None:
            k = self.pyframes[(mod, qn)] = self.w.python_method(mod, qn)
        return k

    def py_stack(self, skey: int, sid: int, py: "_PyStacks") -> int:
        """The output stack of native stack ``skey`` joined with Python stack ``sid``
        (pystacks' ``transform``, mode ``mixed``)."""
        k = self.joined.get((skey, sid))
        if k is not None:
            return k
        groups = self.pygroups.get(sid)
        if groups is None:
            groups = self.pygroups[sid] = tuple(tuple((self._pyframe(mod, qn), pline, FRAME_PYTHON)
                                                      for mod, qn, pline in g) for g in py.stack(sid) or ())
        self.native_stack(skey)
        ntrunc, nframes = self.translated[skey]
        evals = self.evals[skey]
        frames: List[Tuple[int, int, int]] = []
        gi = 0
        ng = len(groups)
        for idx, f in enumerate(nframes):
            if evals[idx] and gi < ng:
                g = groups[gi]
                gi += 1
                if g:
                    frames += g
                    continue
            frames.append(f)
        # Python frames of eval-loop calls whose native frames are missing (a native stack
        # cut at its root side): kept, outermost last
        for g in groups[gi:]:
            frames += g
        if py.truncated.get(sid):
            frames.append((self._pyframe("", TRUNCATED), 0, FRAME_PYTHON))
        k = self.joined[(skey, sid)] = self.w.stack(frames, ntrunc)
        return k


def _simple_str(v: Any) -> str:
    """The string of a simple-type pool entry ({"string": s} or {"description": s} or s)."""
    if isinstance(v, dict):
        v = next(iter(v.values()), None)
    return v if isinstance(v, str) else ""


class _Rewriter:
    def __init__(self, data: bytes, stats: InlineStats, inliner: "Inliner") -> None:
        self.data = data
        self.stats = stats
        self.inliner = inliner
        self.chunks: List[_Chunk] = [_Chunk(data, off, h) for off, h in decode.chunks(data)]
        self.py = _PyStacks()
        self.monotonic = False
        self.join_types: Dict[Tuple[int, int], str] = {}  # (chunk index, user event type key) -> name

    def _user_types(self, ci: int, c: _Chunk) -> Dict[int, str]:
        return {k: _simple_str(v) for k, v in c.pool("profiler.types.UserEventType").items()}

    def collect(self) -> None:
        """First pass: the side events of every chunk, and the recording's clock setting."""
        for ci, c in enumerate(self.chunks):
            user = c.by_name.get("profiler.UserEvent")
            setting = c.by_name.get("jdk.ActiveSetting")
            types = self._user_types(ci, c)
            for off, _size, etype, _body in c.events():
                if user is not None and etype == user.id:
                    vals, _ = c.fields(off, user)
                    d = dict(zip((f.name for f in user.fields), vals))
                    t = d.get("type")
                    name = types.get(t.key, "") if isinstance(t, _Ref) else ""
                    if name in JOIN_EVENTS:
                        self.join_types[(ci, t.key)] = name  # type: ignore[union-attr]
                        data = d.get("data")
                        if isinstance(data, _Ref):
                            data = c.pool("java.lang.String").get(data.key)
                        if isinstance(data, str):
                            try:
                                self.py.add(name, data.encode("latin-1"))
                            except (UnicodeError, ValueError, IndexError):
                                self.py.bad += 1
                elif setting is not None and etype == setting.id:
                    vals, _ = c.fields(off, setting)
                    d = dict(zip((f.name for f in setting.fields), vals))
                    if d.get("name") == "clock" and d.get("value") == "monotonic":
                        self.monotonic = True
        self.py.sort()

    def write(self) -> bytes:
        stats = self.stats
        py = self.py
        carry: Dict[Tuple[bool, int, int], int] = {}  # (cpu, thread, carry key) -> Python stack id
        name_ids: Dict[Tuple[str, ...], int] = {}
        outs: List[_Out] = []
        inl = self.inliner
        for ci, c in enumerate(self.chunks):
            o = _Out(c, inl.chunks, inl.key_base, inl.user_types, name_ids)
            inl.chunks += 1
            outs.append(o)
            w = o.w
            exec_cls = c.by_name.get("jdk.ExecutionSample")
            wall_cls = c.by_name.get("profiler.WallClockSample")
            user = c.by_name.get("profiler.UserEvent")
            states = {k: _simple_str(v) for k, v in c.pool("jdk.types.ThreadState").items()}
            cpu_states = {k for k, v in states.items() if v == "STATE_DEFAULT"}
            tps = c.h.ticks_per_second
            samples = {}
            for cls in (exec_cls, wall_cls):
                if cls is not None and tuple(f.name for f in cls.fields[:4]) == _SAMPLE_FIELDS:
                    samples[cls.id] = cls
            fast = {k for k, cls in samples.items() if _plain_sample(c, cls)}
            state_out: Dict[int, int] = {}
            b = c.b
            for off, size, etype, body in c.events():
                cls = samples.get(etype)
                if cls is not None:
                    if etype in fast:  # four varints, then fields without pool references: copied
                        (t, thk, skk, stk), tend, j = _read4(b, body)
                        if j > off + size:
                            raise ChunkError(f"sample event at byte {off}: fields beyond its size")
                        tail = b[j:off + size]
                        vals: List[Any] = []
                    else:
                        vals, _ = c.fields(off, cls)
                        t, th, sk, state = vals[0], vals[1], vals[2], vals[3]
                        if not (isinstance(t, int) and isinstance(th, _Ref) and isinstance(sk, _Ref)
                                and isinstance(state, _Ref)):
                            raise ChunkError(f"sample event at byte {off}: unexpected field types")
                        thk, skk, stk = th.key, sk.key, state.key
                    tid = o.thread(thk)
                    is_cpu = cls is exec_cls and (not cpu_states or stk in cpu_states)
                    sid, how = py.lookup(thk, t, self.monotonic, tps) if py.samples else (None, "none")
                    ckey = (is_cpu, thk, o.carry_key(skk))
                    if sid is not None and py.stack(sid) is not None:
                        carry[ckey] = sid
                        if how == "exact":
                            stats.exact += 1
                        else:
                            stats.timestamp += 1
                    else:
                        if sid is not None:  # a sample whose stack is not defined: as pystacks, no stack
                            sid = None
                        sid = carry.get(ckey)
                        if sid is not None:
                            stats.carried += 1
                        elif thk in py.threads and any(o.evals[skk]):
                            stats.unmatched_python_threads += 1
                        else:
                            stats.no_python += 1
                    out_stack = o.py_stack(skk, sid, py) if sid is not None else o.native_stack(skk)
                    ostate = state_out.get(stk)
                    if ostate is None:
                        sname = states.get(stk, "STATE_DEFAULT")
                        ostate = _STATE_BY_NAME.get(sname)
                        if ostate is None:
                            raise ChunkError(f"thread state {sname!r} cannot be written")
                        state_out[stk] = ostate
                    if etype in fast:
                        w.sample(cls.name, t, tid, out_stack, ostate, tail, b[body:tend])
                    else:
                        rest = [self._carry_value(o, cls.fields[j], vals[j]) for j in range(4, len(vals))]
                        w.event(cls.name, t, tid, out_stack, ostate, *rest)
                    stats.samples += 1
                    continue
                ecls = c.classes.get(etype)
                if ecls is None:
                    raise ChunkError(f"event of undeclared type {etype} at byte {off}")
                vals, _ = c.fields(off, ecls)
                if ecls is user:
                    ut = vals[2] if len(vals) > 2 else None
                    if isinstance(ut, _Ref) and (ci, ut.key) in self.join_types:
                        stats.side_events += 1
                        continue
                self._copy(o, ecls, vals)
            inl.key_base = w.max_key() + 1
        # the marker and the counters, in the first chunk
        if outs and self.join_types:
            w0 = outs[0].w
            w0.setting("jdk.ActiveRecording", SETTING, "true")
            t0 = outs[0].c.h.start_ticks
            w0.event("profiler.UserEvent", t0, 0, outs[0].user_type(STATS_EVENT),
                     json.dumps(stats.as_dict(), sort_keys=True))
        parts = []
        for o in outs:
            h = o.c.h
            end_ticks = h.start_ticks + h.duration_nanos * h.ticks_per_second // 1_000_000_000
            parts.append(o.w.finish(end_ticks=end_ticks))
        return b"".join(parts)

    # -- other events: carried over as they are ---------------------------------------------

    def _carry_value(self, o: _Out, f: _Field, v: Any) -> Any:
        if f.array or isinstance(v, (list, dict)):
            raise ChunkError(f"field {f.name!r}: arrays and inline structs cannot be carried over")
        if isinstance(v, _Ref):
            return self._ref(o, v)
        return v

    def _ref(self, o: _Out, r: _Ref) -> Any:
        c = o.c
        cls = c.classes.get(r.type)
        name = cls.name if cls is not None else ""
        w = o.w
        if name == "java.lang.Thread":
            return o.thread(r.key)
        if name == "jdk.types.StackTrace":
            return o.native_stack(r.key)
        if name == "java.lang.String":
            return o.strings.get(r.key)
        if name == "jdk.types.ThreadState":
            s = _simple_str(c.pool(name).get(r.key))
            if s in _STATE_BY_NAME:
                return _STATE_BY_NAME[s]
        elif name == "profiler.types.LogLevel":
            s = _simple_str(c.pool(name).get(r.key))
            if s in _LEVEL_BY_NAME:
                return _LEVEL_BY_NAME[s]
        elif name == "profiler.types.UserEventType":
            return o.user_type(_simple_str(c.pool(name).get(r.key)))
        elif name == "java.lang.Class":
            entry = c.pool(name).get(r.key)
            return w.klass(o.symbol(entry.get("name")) if isinstance(entry, dict) else "")
        elif name == "jdk.types.Symbol":
            return w.symbol(o.symbols.get(r.key, ""))
        raise ChunkError(f"a reference to {name or r.type} cannot be carried over")

    def _copy(self, o: _Out, cls: _Class, vals: List[Any]) -> None:
        w = o.w
        names = [f.name for f in cls.fields]
        have = w.field_names(cls.name)
        if have is None:
            fields = []
            for f in cls.fields:
                ref = o.c.classes.get(f.type)
                tname = ref.name if ref is not None else ""
                if f.cpool:
                    wid = _WRITER_POOL_TYPES.get(tname)
                    if wid is None:
                        raise ChunkError(f"{cls.name}.{f.name}: a reference to {tname} cannot be carried over")
                    fields.append(Field(f.name, wid, None, F_CPOOL | (F_ARRAY if f.array else 0)))
                elif tname in _PRIMITIVE_KINDS:
                    fields.append(Field(f.name, tname, None, F_ARRAY if f.array else 0))
                else:
                    raise ChunkError(f"{cls.name}.{f.name}: inline {tname} values cannot be carried over")
            w.declare_event(cls.name, fields, category=("Profiler",))
        elif list(have) != names:
            raise ChunkError(f"{cls.name}: fields {names} differ from the writer's {list(have)}")
        w.event(cls.name, *[self._carry_value(o, f, v) for f, v in zip(cls.fields, vals)])


_WRITER_POOL_TYPES = {"java.lang.Thread": 22, "jdk.types.StackTrace": 26, "java.lang.String": 20,
                      "jdk.types.ThreadState": 25, "profiler.types.LogLevel": 33,
                      "profiler.types.UserEventType": 34, "java.lang.Class": 21, "jdk.types.Symbol": 31}


class Inliner:
    """Rewrites recording files one after the other into one output: chunk metadata ids and
    pool keys (user event types included) stay unique across all it writes, so that the
    outputs of several files can be concatenated into one recording. ``stats`` adds up."""

    def __init__(self, stats: Optional[InlineStats] = None) -> None:
        self.stats = stats if stats is not None else InlineStats()
        self.chunks = 0
        self.key_base = 0
        self.user_types: Dict[str, int] = {}

    def rewrite(self, data: bytes, always: bool = False) -> bytes:
        """``data`` (complete JFR chunks: one recording file, or one agent report; its
        Python-stack side events are joined within it) with the Python frames inline (see the
        module docstring). Without Python-stack side events ``data`` is returned as is, or,
        with ``always``, written again through the writer all the same (keys made unique).
        Raises :class:`ChunkError` on malformed input, or on an event that cannot be carried
        over; then nothing of ``data`` has been counted."""
        if not always and not has_python_stacks(data):
            return data
        st = InlineStats()
        saved = (self.chunks, self.key_base, dict(self.user_types))
        try:
            r = _Rewriter(bytes(data), st, self)
            r.collect()
            if not r.join_types and not always:
                return data
            out = r.write()
        except (IndexError, struct.error, UnicodeError, KeyError, TypeError, ValueError) as e:
            self.chunks, self.key_base, self.user_types = saved
            if isinstance(e, ChunkError):
                raise
            raise ChunkError(f"cannot rewrite the recording: {type(e).__name__}: {e}") from None
        except BaseException:
            self.chunks, self.key_base, self.user_types = saved
            raise
        for k in InlineStats.__slots__:
            setattr(self.stats, k, getattr(self.stats, k) + getattr(st, k))
        return out


def inline_python_frames(data: bytes, stats: Optional[InlineStats] = None) -> bytes:
    """``data`` (one recording file, or one agent report) with the Python frames of its side
    events inline; as is when it has none. ``stats`` (if given) receives the join's counters.
    Raises :class:`ChunkError` on malformed input, or on an event that cannot be carried over."""
    return Inliner(stats).rewrite(data)
