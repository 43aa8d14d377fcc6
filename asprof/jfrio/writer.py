"""THE JFR writer: one self-contained chunk per :class:`ChunkWriter`.

The chunks it writes follow async-profiler's layout exactly where async-profiler's own
converter (``jfrconv``, ``JfrReader.java``) hard-codes it: the metadata event has id
``0x7fffffff``; the classes, fields and field order of the types below are async-profiler's
(``src/jfrMetadata.cpp``, v4.5), with async-profiler's type ids; the constant pools are written
as ``FlightRecorder::writeCpool`` writes them (an empty pool becomes a one-entry String pool).
The JDK ``jfr`` tool, asprof's reader and ``jfrconv`` all read them.

Frames:

- a Python frame is an ordinary frame: class = the dotted module name, method = the qualified
  name, line = the line number, frame type :data:`FRAME_PYTHON` (key 3, described ``"Python"``);
- a native frame is written as async-profiler writes a C function: class = the library's
  basename, method = the symbol, descriptor ``()L;``, modifiers ``0x100``, frame type
  :data:`FRAME_NATIVE` (key 4, described ``"Native"``).

The FrameType pool has no ``Kernel`` entry: that absence is what makes ``jfrconv`` print key 3
as ``class.method`` (``module.qualname``) with no ``_[x]`` suffix and key 4 as the bare symbol
(``JfrConverter.isNativeFrame``); the JDK tool prints ``module.qualname()`` and
``libc.so.6.__poll()``. Other features (rewriting recordings, issue #12) use the same two
constants so that every tool names frames alike.

Ticks are whatever clock the caller stamps events with; the agent uses ``CLOCK_MONOTONIC`` ns
(``ticks_per_second`` 1e9) and a header start in ns since the epoch from a
``(time.time_ns(), time.monotonic_ns())`` pair (:func:`clock_pair`).

Imports nothing of asprof above :mod:`asprof.errors`.
"""
from __future__ import annotations

import struct
import time
from typing import Callable, Collection, Dict, Iterable, List, Optional, Sequence, Tuple, Union

__all__ = [
    "ChunkWriter", "Field", "SAMPLE", "FRAME_PYTHON", "FRAME_NATIVE", "STATE_DEFAULT", "STATE_RUNNABLE",
    "STATE_SLEEPING", "KIND_CPU", "KIND_WALL", "T_EXECUTION_SAMPLE", "T_WALL_CLOCK_SAMPLE",
    "T_ACTIVE_RECORDING", "T_ACTIVE_SETTING", "T_ALLOCATION_SAMPLE", "T_LIVE_OBJECT", "clock_pair", "varint",
]

#: One sample record of the built-in engine: time_ns, tid, stack, kind, state, reserved.
SAMPLE = struct.Struct("<QIIBBH")
KIND_CPU = 0
KIND_WALL = 1

FRAME_PYTHON = 3
FRAME_NATIVE = 4
#: The FrameType pool: key -> description (see the module docstring for why no "Kernel").
FRAME_TYPES: Dict[int, str] = {0: "Interpreted", 1: "JIT compiled", 2: "Inlined",
                               FRAME_PYTHON: "Python", FRAME_NATIVE: "Native", 6: "C1 compiled"}

STATE_DEFAULT = 0
STATE_RUNNABLE = 1
STATE_SLEEPING = 2
THREAD_STATES: Dict[int, str] = {STATE_DEFAULT: "STATE_DEFAULT", STATE_RUNNABLE: "STATE_RUNNABLE",
                                 STATE_SLEEPING: "STATE_SLEEPING"}
LOG_LEVELS: Dict[int, str] = {0: "TRACE", 1: "DEBUG", 2: "INFO", 3: "WARN", 4: "ERROR"}

# async-profiler's type ids (jfrMetadata.h)
T_BOOLEAN, T_CHAR, T_FLOAT, T_DOUBLE, T_BYTE, T_SHORT, T_INT, T_LONG = 4, 5, 6, 7, 8, 9, 10, 11
T_STRING, T_CLASS, T_THREAD, T_CLASS_LOADER, T_FRAME_TYPE, T_THREAD_STATE = 20, 21, 22, 23, 24, 25
T_STACK_TRACE, T_STACK_FRAME, T_METHOD, T_PACKAGE, T_SYMBOL = 26, 27, 28, 30, 31
T_LOG_LEVEL, T_USER_EVENT_TYPE = 33, 34
T_EXECUTION_SAMPLE, T_CPU_LOAD, T_ACTIVE_RECORDING, T_ACTIVE_SETTING = 101, 106, 107, 108
T_OS_INFORMATION, T_CPU_INFORMATION, T_NATIVE_LIBRARY, T_LOG = 109, 110, 113, 116
T_WALL_CLOCK_SAMPLE, T_MALLOC, T_FREE, T_NATIVE_LOCK, T_USER_EVENT = 119, 120, 121, 122, 124
T_LIVE_OBJECT = 118  # async-profiler's profiler.LiveObject
T_ALLOCATION_SAMPLE = 130  # jdk.ObjectAllocationSample (the JDK's type; async-profiler has no id for it)
T_LABEL, T_CATEGORY, T_CONTENT_TYPE, T_TIMESTAMP, T_TIMESPAN, T_DATA_AMOUNT = 201, 202, 203, 204, 205, 206
T_MEMORY_ADDRESS, T_UNSIGNED, T_PERCENTAGE = 207, 208, 209
_FIRST_USER_TYPE = 400

# field flags (as in jfrMetadata.h)
F_CPOOL, F_ARRAY, F_UNSIGNED, F_BYTES, F_TIME_TICKS, F_TIME_MILLIS = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
F_DURATION_TICKS, F_DURATION_NANOS, F_DURATION_MILLIS, F_ADDRESS, F_PERCENTAGE = 0x40, 0x80, 0x100, 0x200, 0x400

MAX_LONG = (1 << 63) - 1


class Field:
    """A field of a declared type: ``type`` is a type name (``"long"``, ``"java.lang.String"``,
    ``"java.lang.Thread"``, ...) or id; ``flags`` are the ``F_*`` constants."""

    __slots__ = ("name", "type", "label", "flags")

    def __init__(self, name: str, type: Union[str, int], label: Optional[str] = None, flags: int = 0) -> None:
        self.name = name
        self.type = type
        self.label = label
        self.flags = flags


_TypeDef = Tuple[str, int, Optional[str], bool, Tuple[str, ...], List[Tuple[str, int, Optional[str], int]]]

_START = ("startTime", T_LONG, "Start Time", F_TIME_TICKS)
_THREAD = ("sampledThread", T_THREAD, "Thread", F_CPOOL)
_EV_THREAD = ("eventThread", T_THREAD, "Event Thread", F_CPOOL)
_STACK = ("stackTrace", T_STACK_TRACE, "Stack Trace", F_CPOOL)

# (name, id, label, simpleType, category, fields) in async-profiler's order
_BUILTIN_TYPES: List[_TypeDef] = [
    ("boolean", T_BOOLEAN, None, False, (), []),
    ("char", T_CHAR, None, False, (), []),
    ("float", T_FLOAT, None, False, (), []),
    ("double", T_DOUBLE, None, False, (), []),
    ("byte", T_BYTE, None, False, (), []),
    ("short", T_SHORT, None, False, (), []),
    ("int", T_INT, None, False, (), []),
    ("long", T_LONG, None, False, (), []),
    ("java.lang.String", T_STRING, None, False, (), []),
    ("java.lang.Class", T_CLASS, "Java Class", False, (), [
        ("classLoader", T_CLASS_LOADER, "Class Loader", F_CPOOL), ("name", T_SYMBOL, "Name", F_CPOOL),
        ("package", T_PACKAGE, "Package", F_CPOOL), ("modifiers", T_INT, "Access Modifiers", 0)]),
    ("java.lang.Thread", T_THREAD, "Thread", False, (), [
        ("osName", T_STRING, "OS Thread Name", 0), ("osThreadId", T_LONG, "OS Thread Id", 0),
        ("javaName", T_STRING, "Java Thread Name", 0), ("javaThreadId", T_LONG, "Java Thread Id", 0)]),
    ("jdk.types.ClassLoader", T_CLASS_LOADER, "Java Class Loader", False, (), [
        ("type", T_CLASS, "Type", F_CPOOL), ("name", T_SYMBOL, "Name", F_CPOOL)]),
    ("jdk.types.FrameType", T_FRAME_TYPE, "Frame type", True, (), [("description", T_STRING, "Description", 0)]),
    ("jdk.types.ThreadState", T_THREAD_STATE, "Java Thread State", True, (), [("name", T_STRING, "Name", 0)]),
    ("jdk.types.StackTrace", T_STACK_TRACE, "Stacktrace", False, (), [
        ("truncated", T_BOOLEAN, "Truncated", 0), ("frames", T_STACK_FRAME, "Stack Frames", F_ARRAY)]),
    ("jdk.types.StackFrame", T_STACK_FRAME, None, False, (), [
        ("method", T_METHOD, "Java Method", F_CPOOL), ("lineNumber", T_INT, "Line Number", 0),
        ("bytecodeIndex", T_INT, "Bytecode Index", 0), ("type", T_FRAME_TYPE, "Frame Type", F_CPOOL)]),
    ("jdk.types.Method", T_METHOD, "Java Method", False, (), [
        ("type", T_CLASS, "Type", F_CPOOL), ("name", T_SYMBOL, "Name", F_CPOOL),
        ("descriptor", T_SYMBOL, "Descriptor", F_CPOOL), ("modifiers", T_INT, "Access Modifiers", 0),
        ("hidden", T_BOOLEAN, "Hidden", 0)]),
    ("jdk.types.Package", T_PACKAGE, "Package", False, (), [("name", T_SYMBOL, "Name", F_CPOOL)]),
    ("jdk.types.Symbol", T_SYMBOL, "Symbol", True, (), [("string", T_STRING, "String", 0)]),
    ("profiler.types.LogLevel", T_LOG_LEVEL, "Log Level", True, (), [("name", T_STRING, "Name", 0)]),
    ("profiler.types.UserEventType", T_USER_EVENT_TYPE, "User-Defined Event Type", True, (),
     [("name", T_STRING, "Name", 0)]),
    ("jdk.ExecutionSample", T_EXECUTION_SAMPLE, "Method Profiling Sample", False,
     ("Java Virtual Machine", "Profiling"), [_START, _THREAD, _STACK, ("state", T_THREAD_STATE, "Thread State", F_CPOOL)]),
    ("jdk.CPULoad", T_CPU_LOAD, "CPU Load", False, ("Operating System", "Processor"), [
        _START, ("jvmUser", T_FLOAT, "JVM User", F_PERCENTAGE), ("jvmSystem", T_FLOAT, "JVM System", F_PERCENTAGE),
        ("machineTotal", T_FLOAT, "Machine Total", F_PERCENTAGE)]),
    ("jdk.ActiveRecording", T_ACTIVE_RECORDING, "Async-profiler Recording", False, ("Flight Recorder",), [
        _START, ("id", T_LONG, "Id", 0), ("name", T_STRING, "Name", 0), ("destination", T_STRING, "Destination", 0),
        ("maxAge", T_LONG, "Max Age", F_DURATION_MILLIS), ("maxSize", T_LONG, "Max Size", F_BYTES),
        ("recordingStart", T_LONG, "Start Time", F_TIME_MILLIS),
        ("recordingDuration", T_LONG, "Recording Duration", F_DURATION_MILLIS)]),
    ("jdk.ActiveSetting", T_ACTIVE_SETTING, "Async-profiler Setting", False, ("Flight Recorder",), [
        _START, ("id", T_LONG, "Event Id", 0), ("name", T_STRING, "Setting Name", 0),
        ("value", T_STRING, "Setting Value", 0)]),
    ("jdk.OSInformation", T_OS_INFORMATION, "OS Information", False, ("Operating System",), [
        _START, ("osVersion", T_STRING, "OS Version", 0)]),
    ("jdk.CPUInformation", T_CPU_INFORMATION, "CPU Information", False, ("Operating System", "Processor"), [
        _START, ("cpu", T_STRING, "Type", 0), ("description", T_STRING, "Description", 0),
        ("sockets", T_INT, "Sockets", F_UNSIGNED), ("cores", T_INT, "Cores", F_UNSIGNED),
        ("hwThreads", T_INT, "Hardware Threads", F_UNSIGNED)]),
    ("jdk.NativeLibrary", T_NATIVE_LIBRARY, "Native Library", False, ("Java Virtual Machine", "Runtime"), [
        _START, ("name", T_STRING, "Name", 0), ("baseAddress", T_LONG, "Base Address", F_ADDRESS),
        ("topAddress", T_LONG, "Top Address", F_ADDRESS)]),
    ("profiler.Log", T_LOG, "Log Message", False, ("Profiler",), [
        _START, ("level", T_LOG_LEVEL, "Level", F_CPOOL), ("message", T_STRING, "Message", 0)]),
    ("profiler.WallClockSample", T_WALL_CLOCK_SAMPLE, "Wall Clock Sample", False,
     ("Java Virtual Machine", "Profiling"), [
        _START, _THREAD, _STACK, ("state", T_THREAD_STATE, "Thread State", F_CPOOL),
        ("samples", T_INT, "Samples", F_UNSIGNED), ("timeSpan", T_LONG, "Time Span", F_DURATION_TICKS)]),
    ("profiler.Malloc", T_MALLOC, "malloc", False, ("Java Virtual Machine", "Native Memory"), [
        _START, _EV_THREAD, _STACK, ("address", T_LONG, "Address", F_ADDRESS), ("size", T_LONG, "Size", F_BYTES)]),
    ("profiler.Free", T_FREE, "free", False, ("Java Virtual Machine", "Native Memory"), [
        _START, _EV_THREAD, _STACK, ("address", T_LONG, "Address", F_ADDRESS)]),
    ("profiler.NativeLock", T_NATIVE_LOCK, "Native Lock Sample", False, ("Java Virtual Machine", "Native Lock"), [
        _START, ("duration", T_LONG, "Duration", F_DURATION_TICKS), _EV_THREAD, _STACK,
        ("address", T_LONG, "Lock Address", F_ADDRESS)]),
    ("profiler.UserEvent", T_USER_EVENT, "User-Defined Event", False, ("Profiler",), [
        _START, _EV_THREAD, ("type", T_USER_EVENT_TYPE, "User Event Type", F_CPOOL),
        ("data", T_STRING, "User Data", 0)]),
    # issue #16: Python allocation samples and the live heap, in the fields jfrconv reads
    # (JfrReader.readAllocationSample / readLiveObject: positional, no field may be added)
    ("jdk.ObjectAllocationSample", T_ALLOCATION_SAMPLE, "Object Allocation Sample", False,
     ("Java Application",), [
        _START, _EV_THREAD, _STACK, ("objectClass", T_CLASS, "Object Class", F_CPOOL),
        ("weight", T_LONG, "Sample Weight", F_BYTES)]),
    ("profiler.LiveObject", T_LIVE_OBJECT, "Live Object", False, ("Java Application",), [
        _START, _EV_THREAD, _STACK, ("objectClass", T_CLASS, "Object Class", F_CPOOL),
        ("allocationSize", T_LONG, "Allocation Size", F_BYTES),
        ("allocationTime", T_LONG, "Allocation Time", F_TIME_TICKS)]),
]
_ANNOTATION_TYPES: List[Tuple[str, int, Optional[str], bool]] = [
    # (name, id, label, has a "value" field / dimension)
    ("jdk.jfr.Label", T_LABEL, None, False), ("jdk.jfr.Category", T_CATEGORY, None, True),
    ("jdk.jfr.ContentType", T_CONTENT_TYPE, "Content Type", False),
    ("jdk.jfr.Timestamp", T_TIMESTAMP, "Timestamp", False), ("jdk.jfr.Timespan", T_TIMESPAN, "Timespan", False),
    ("jdk.jfr.DataAmount", T_DATA_AMOUNT, "Data Amount", False),
    ("jdk.jfr.MemoryAddress", T_MEMORY_ADDRESS, "Memory Address", False),
    ("jdk.jfr.Unsigned", T_UNSIGNED, "Unsigned Value", False), ("jdk.jfr.Percentage", T_PERCENTAGE, "Percentage", False),
]
_VALUED_ANNOTATIONS = {T_LABEL, T_CATEGORY, T_TIMESTAMP, T_TIMESPAN, T_DATA_AMOUNT}
_PRIMITIVE_NAMES = {d[0]: d[1] for d in _BUILTIN_TYPES}


def clock_pair() -> Tuple[int, int]:
    """(ns since the epoch, CLOCK_MONOTONIC ns) read back to back: maps ticks to wall time."""
    return time.time_ns(), time.monotonic_ns()


_SMALL = [bytes((i,)) for i in range(128)]


def varint(v: int) -> bytes:
    """JFR's compressed integer: LEB128 of the 64-bit two's complement, 9th byte whole."""
    if 0 <= v < 0x80:
        return _SMALL[v]
    if 0 <= v < 0x4000:
        return bytes(((v & 0x7F) | 0x80, v >> 7))
    v &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    for _ in range(8):
        if v < 0x80:
            out.append(v)
            return bytes(out)
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v & 0xFF)
    return bytes(out)




def _put_string(out: bytearray, s: Optional[str]) -> None:
    if s is None:
        out.append(0)
        return
    b = s.encode("utf-8", "surrogateescape") if s.isascii() else s.encode("utf-8", "replace")
    out.append(3)
    out += varint(len(b))
    out += b


def _framed(type_id: int, body: bytes, padded: bool = False) -> bytes:
    """An event: its size (counting itself; a 5-byte padded varint when ``padded``), type, body."""
    head = varint(type_id)
    n = len(head) + len(body)
    if padded:
        total = n + 5
        size = bytes(((total & 0x7F) | 0x80, ((total >> 7) & 0x7F) | 0x80, ((total >> 14) & 0x7F) | 0x80,
                      ((total >> 21) & 0x7F) | 0x80, (total >> 28) & 0x7F))
        return size + head + body
    s = 1
    while len(varint(n + s)) != s:
        s += 1
    return varint(n + s) + head + body


class _Type:
    __slots__ = ("name", "id", "label", "simple", "category", "fields", "event")

    def __init__(self, name: str, id: int, label: Optional[str], simple: bool, category: Tuple[str, ...],
                 fields: List[Tuple[str, int, Optional[str], int]], event: bool) -> None:
        self.name = name
        self.id = id
        self.label = label
        self.simple = simple
        self.category = category
        self.fields = fields
        self.event = event


class ChunkWriter:
    """Builds one self-contained JFR chunk: intern strings, symbols, classes, methods, stacks and
    threads, add events (by type name, values in field order), then :meth:`finish`.

    ``start_ns``: the chunk's start in ns since the epoch; ``start_ticks``: the same instant in
    ticks. Keys returned by the interning methods are local to this chunk."""

    def __init__(self, start_ns: int, start_ticks: int, ticks_per_second: int = 1_000_000_000,
                 metadata_id: int = 0x7FFFFFFF, key_base: int = 0) -> None:
        # A chunk appended to another producer's (issue #16: the allocation chunk after
        # async-profiler's) needs its own metadata_id (the JDK's reader re-uses the previous
        # chunk's metadata, parsers and clock when the id is the same) and pool keys no other
        # chunk of the file uses (key_base: the JDK's reader keeps constant pools across chunks).
        self.metadata_id = metadata_id
        self.key_base = key_base
        self.start_ns = start_ns
        self.start_ticks = start_ticks
        self.ticks_per_second = ticks_per_second
        self._types: Dict[str, _Type] = {}
        for name, tid, label, simple, cat, fields in _BUILTIN_TYPES:
            self._types[name] = _Type(name, tid, label, simple, cat, fields, 100 < tid < 200)
        self._next_type = _FIRST_USER_TYPE
        self._events = bytearray()
        self._symbols: Dict[str, int] = {}
        self._classes: Dict[str, int] = {}
        self._methods: Dict[Tuple[int, int, int, int], int] = {}
        self._method_rows: List[Tuple[int, int, int, int]] = []
        self._stacks: Dict[Tuple[bool, Tuple[Tuple[int, int, int], ...]], int] = {}
        self._stack_rows: List[bytes] = []
        self._frame_bytes: Dict[Tuple[int, int, int], bytes] = {}
        self._sample_rests: Dict[Tuple[int, int, int, int, bytes], bytes] = {}
        self._threads: Dict[int, Tuple[str, Optional[str], int]] = {}
        self._thread_refs: set[int] = set()
        self._strings: Dict[str, int] = {}
        self._user_event_types: Dict[int, str] = {}
        self.samples = 0
        self.last_ticks = start_ticks

    # -- type declarations -----------------------------------------------------------------

    def declare_event(self, name: str, fields: Sequence[Field], label: Optional[str] = None,
                      category: Sequence[str] = ("Profiler",)) -> int:
        """Declares an event type (fields in wire order); returns its id. Re-declaring a name
        with the same fields returns the id it has."""
        if name in self._types:
            t = self._types[name]
            if [f[0] for f in t.fields] != [f.name for f in fields]:
                raise ValueError(f"event type {name!r} is already declared with other fields")
            return t.id
        rows = []
        for f in fields:
            tid = f.type if isinstance(f.type, int) else _PRIMITIVE_NAMES.get(f.type)
            if tid is None:
                raise ValueError(f"field {f.name!r} of {name!r}: unknown type {f.type!r}")
            rows.append((f.name, tid, f.label, f.flags))
        tid = self._next_type
        self._next_type += 1
        self._types[name] = _Type(name, tid, label, False, tuple(category), rows, True)
        return tid

    def type_id(self, name: str) -> int:
        return self._types[name].id

    # -- constant pools ----------------------------------------------------------------------

    def symbol(self, s: str) -> int:
        k = self._symbols.get(s)
        if k is None:
            k = self._symbols[s] = len(self._symbols) + 1 + self.key_base
        return k

    def klass(self, name: str) -> int:
        k = self._classes.get(name)
        if k is None:
            k = self._classes[name] = len(self._classes) + 1 + self.key_base
            self.symbol(name)
        return k

    def method(self, class_name: str, name: str, descriptor: str = "()L;", modifiers: int = 0) -> int:
        """A Method pool key for ``class_name.name``."""
        row = (self.klass(class_name), self.symbol(name), self.symbol(descriptor), modifiers)
        k = self._methods.get(row)
        if k is None:
            k = self._methods[row] = len(self._method_rows) + 1 + self.key_base
            self._method_rows.append(row)
        return k

    def python_method(self, module: str, qualname: str) -> int:
        """A Python function: class = dotted module name, method = qualified name."""
        return self.method(module, qualname, "()L;", 0)

    def native_method(self, library: str, symbol: str) -> int:
        """A native function as async-profiler writes it (``library`` is reduced to its basename)."""
        return self.method(library.rpartition("/")[2], symbol, "()L;", 0x100)

    def stack(self, frames: Iterable[Tuple[int, int, int]], truncated: bool = False) -> int:
        """A StackTrace pool key for ``frames``: (method key, line, frame type), leaf first."""
        fr = tuple(frames)
        key = (truncated, fr)
        k = self._stacks.get(key)
        if k is None:
            k = self._stacks[key] = len(self._stack_rows) + 1 + self.key_base
            parts = [varint(k), b"\x01" if truncated else b"\x00", varint(len(fr))]
            enc = self._frame_bytes
            for f in fr:
                e = enc.get(f)
                if e is None:  # frames recur across stacks: each encoded once
                    m, line, ftype = f
                    e = enc[f] = varint(m) + varint(line) + bytes((0, ftype))
                parts.append(e)
            self._stack_rows.append(b"".join(parts))
        return k

    def thread(self, tid: int, name: str, java_name: Optional[str] = None, java_id: int = 0) -> int:
        """Names a thread (key = the OS thread id)."""
        self._threads[tid] = (name, java_name, java_id)
        self._thread_refs.add(tid)
        return tid

    def string(self, s: str) -> int:
        """A java.lang.String pool key."""
        k = self._strings.get(s)
        if k is None:
            k = self._strings[s] = len(self._strings) + 1 + self.key_base
        return k

    def user_event_type(self, key: int, name: str) -> int:
        self._user_event_types[key] = name
        return key

    def field_names(self, type_name: str) -> Optional[List[str]]:
        """The fields of a declared type in wire order; None when it is not declared."""
        t = self._types.get(type_name)
        return None if t is None else [f[0] for f in t.fields]

    def max_key(self) -> int:
        """The largest pool key handed out so far (``key_base`` when none): a chunk written
        after this one into the same file takes a ``key_base`` above it."""
        return self.key_base + max(len(self._symbols), len(self._classes), len(self._method_rows),
                                   len(self._stack_rows), len(self._strings))

    @property
    def thread_ids(self) -> List[int]:
        """The threads events refer to (named or not yet)."""
        return sorted(self._thread_refs)

    def unnamed_threads(self) -> List[int]:
        """The threads events refer to that :meth:`thread` has not named yet."""
        return sorted(t for t in self._thread_refs if t not in self._threads)

    def size_estimate(self) -> int:
        """Bytes held so far (events and pools; roughly what :meth:`finish` will return)."""
        return len(self._events) + sum(len(r) for r in self._stack_rows) + 32 * len(self._method_rows) \
            + sum(len(s) + 8 for s in self._symbols) + 64 * len(self._threads)

    # -- events ----------------------------------------------------------------------------

    def event(self, type_name: str, *values: object) -> None:
        """Adds an event; ``values`` in field order (pool fields take the key; a thread field
        takes the OS thread id)."""
        t = self._types[type_name]
        if len(values) != len(t.fields):
            raise ValueError(f"{type_name} has {len(t.fields)} fields, {len(values)} values given")
        body = bytearray()
        for (fname, ftype, _label, flags), v in zip(t.fields, values):
            self._put_value(body, fname, ftype, flags, v)
            if ftype == T_THREAD and isinstance(v, int) and v:
                self._thread_refs.add(v)
            if flags & F_TIME_TICKS and isinstance(v, int) and v > self.last_ticks:
                self.last_ticks = v
        self._events += _framed(t.id, bytes(body), padded=True)

    def _put_value(self, out: bytearray, fname: str, ftype: int, flags: int, v: object) -> None:
        if flags & F_ARRAY:
            seq = list(v)  # type: ignore[call-overload]
            out += varint(len(seq))
            for x in seq:
                self._put_value(out, fname, ftype, flags & ~F_ARRAY, x)
            return
        if flags & F_CPOOL or ftype in (T_LONG, T_INT, T_SHORT, T_CHAR):
            out += varint(int(v))  # type: ignore[call-overload]
        elif ftype in (T_BOOLEAN, T_BYTE):
            out.append(int(v) & 0xFF)  # type: ignore[call-overload]
        elif ftype == T_STRING:
            if v is not None and not isinstance(v, str):
                raise ValueError(f"field {fname!r}: a string expected, got {type(v).__name__}")
            _put_string(out, v)
        elif ftype == T_FLOAT:
            out += struct.pack(">f", float(v))  # type: ignore[arg-type]
        elif ftype == T_DOUBLE:
            out += struct.pack(">d", float(v))  # type: ignore[arg-type]
        else:
            raise ValueError(f"field {fname!r}: inline struct values are not supported")

    def setting(self, owner: Union[str, int], name: str, value: Optional[str]) -> None:
        """A jdk.ActiveSetting event; ``owner`` is the event type (name or id) it belongs to,
        ``jdk.ActiveRecording`` for recording-wide settings."""
        oid = owner if isinstance(owner, int) else self._types[owner].id
        self.event("jdk.ActiveSetting", self.start_ticks, oid, name, value)

    def recording_info(self, name: str, destination: str = "asprof.jfr") -> None:
        """The jdk.ActiveRecording event async-profiler writes first."""
        self.event("jdk.ActiveRecording", self.start_ticks, 1, name, destination, MAX_LONG, 0,
                   self.start_ns // 1_000_000, MAX_LONG)

    def system_info(self) -> None:
        """jdk.OSInformation and jdk.CPUInformation as async-profiler writes them."""
        import os
        u = os.uname()
        self.event("jdk.OSInformation", self.start_ticks, f"uname: {u.sysname} {u.release} {u.version} {u.machine}")
        n = os.cpu_count() or 1
        self.event("jdk.CPUInformation", self.start_ticks, u.machine, _cpu_description(), 1, n, n)

    def sample(self, type_name: str, ticks: int, tid: int, stack: int, state: int, tail: bytes = b"",
               ticks_bytes: Optional[bytes] = None) -> None:
        """The fast path of :meth:`event` for a sample whose first fields are (startTime, thread,
        stackTrace, state), as ``jdk.ExecutionSample`` and ``profiler.WallClockSample``:
        ``tail`` is the other fields already encoded (none of them a pool reference; for a
        wall-clock sample ``samples`` and ``timeSpan``), e.g. copied from another recording;
        ``ticks_bytes``, if given, is ``ticks`` already encoded (``varint(ticks)``)."""
        tid_ = self._types[type_name].id
        key = (tid_, tid, stack, state, tail)
        rest = self._sample_rests.get(key)
        if rest is None:  # samples repeat (thread, stack, state): their encoding is kept
            self._thread_refs.add(tid)
            rest = self._sample_rests[key] = varint(tid) + varint(stack) + varint(state) + tail
        if ticks > self.last_ticks:
            self.last_ticks = ticks
        self._events += _framed(tid_, (varint(ticks) if ticks_bytes is None else ticks_bytes) + rest)

    def samples_from(self, packed: Union[bytes, bytearray, memoryview], stack_keys: Sequence[int],
                     skip_tids: Collection[int] = ()) -> int:
        """The fast path: the engine's packed :data:`SAMPLE` records as jdk.ExecutionSample (kind 0,
        state ``STATE_DEFAULT`` whatever the record says) and profiler.WallClockSample (kind 1, samples=1, timeSpan=0) events.
        ``stack_keys[i]`` is the StackTrace key of the batch's stack id ``i`` (ids are local to one
        call: several batches may go into one chunk). Samples of ``skip_tids`` are left out.
        Returns the number of events written.
        Raises ValueError on a record whose stack id is out of range or whose kind is unknown."""
        tails: Dict[int, Tuple[bytes, ...]] = {}  # () for a skipped thread
        last_h, last_hi = -1, b""  # samples come nearly in time order: one entry is enough
        refs = self._thread_refs
        out = self._events
        small = _SMALL
        n = 0
        last = self.last_ticks
        for t, tid, sid, kind, state, _r in SAMPLE.iter_unpack(packed):
            ck = (sid << 40) | (tid << 8) | (kind << 4) | state
            tail = tails.get(ck)
            if tail is None:
                if tid in skip_tids:
                    tails[ck] = ()
                    continue
                if kind > KIND_WALL or state > STATE_SLEEPING:
                    raise ValueError(f"sample record: kind {kind}, state {state}")
                if sid >= len(stack_keys):
                    raise ValueError(f"sample record: stack {sid} of {len(stack_keys)}")
                refs.add(tid)
                # a CPU sample is STATE_DEFAULT: that is how jfrconv and asprof tell CPU from wall
                rest = varint(tid) + varint(stack_keys[sid]) + small[STATE_DEFAULT if kind == KIND_CPU else state]
                if kind == KIND_WALL:
                    rest += b"\x01\x00"  # samples = 1, timeSpan = 0
                tail = tails[ck] = (bytes((len(rest) + 10, T_WALL_CLOCK_SAMPLE if kind else T_EXECUTION_SAMPLE)),
                                    rest)
            elif not tail:
                continue
            if 0x200000 <= t < 0x100000000000000:  # LEB128(t) = its 3 low groups + LEB128(t >> 21)
                h = t >> 21
                if h == last_h:
                    hi = last_hi
                else:
                    hi = last_hi = varint(h)
                    last_h = h
                out.append(5 + len(hi) + len(tail[1]))
                out.append(tail[0][1])
                out += bytes((t & 0x7F | 0x80, (t >> 7) & 0x7F | 0x80, (t >> 14) & 0x7F | 0x80))
                out += hi
            else:
                tb = varint(t)
                out.append(len(tb) + len(tail[1]) + 2)
                out.append(tail[0][1])
                out += tb
            out += tail[1]
            if t > last:
                last = t
            n += 1
        self.last_ticks = last
        self.samples += n
        return n

    def add_encoded(self, events: Union[bytes, bytearray], n: int, last_ticks: int, tids: Iterable[int]) -> int:
        """Sample events already encoded as :meth:`samples_from` would write them (the built-in
        engine's C ``encode``): ``n`` events, the latest startTime ``last_ticks``, the threads
        they name ``tids``. Returns ``n``."""
        self._events += events
        self._thread_refs.update(tids)
        if last_ticks > self.last_ticks:
            self.last_ticks = last_ticks
        self.samples += n
        return n

    # -- finish ----------------------------------------------------------------------------

    def finish(self, end_ticks: Optional[int] = None, thread_name: Optional[Callable[[int], str]] = None) -> bytes:
        """The chunk's bytes. Threads referred to but not named get ``thread_name(tid)`` or
        async-profiler's ``[tid=N]``. ``end_ticks`` defaults to the latest event's ticks."""
        end = max(end_ticks if end_ticks is not None else self.last_ticks, self.start_ticks)
        for tid in self._thread_refs:
            if tid not in self._threads:
                name = thread_name(tid) if thread_name is not None else None
                self._threads[tid] = (name or f"[tid={tid}]", None, 0)
        meta = self._metadata()
        head_len = 68
        meta_off = head_len
        events_off = meta_off + len(meta)
        cpool_off = events_off + len(self._events)
        cpool = self._cpool()
        size = cpool_off + len(cpool)
        duration_ns = (end - self.start_ticks) * 1_000_000_000 // self.ticks_per_second
        header = struct.pack(">4sHHqqqqqqqI", b"FLR\0", 2, 0, size, cpool_off, meta_off, self.start_ns,
                             duration_ns, self.start_ticks, self.ticks_per_second, 1)
        return b"".join((header, meta, bytes(self._events), cpool))

    def _metadata(self) -> bytes:
        sig = tuple((t.name, t.id, t.label, t.simple, t.category, tuple(t.fields), t.event)
                    for t in self._types.values())
        tail = _METADATA_TAILS.get(sig)
        if tail is None:  # the same types give the same strings and classes: built once
            tail = self._metadata_tail()
            if len(_METADATA_TAILS) >= 16:
                _METADATA_TAILS.pop(next(iter(_METADATA_TAILS)))
            _METADATA_TAILS[sig] = tail
        body = bytearray(varint(0))  # type 0 = metadata
        body += varint(self.start_ticks)
        body += varint(0)
        body += varint(self.metadata_id)
        body += tail
        total = len(body) + 5
        return bytes(((total & 0x7F) | 0x80, ((total >> 7) & 0x7F) | 0x80, ((total >> 14) & 0x7F) | 0x80,
                      ((total >> 21) & 0x7F) | 0x80, (total >> 28) & 0x7F)) + bytes(body)

    def _metadata_tail(self) -> bytes:
        """The metadata event's strings and element tree (what follows its metadata id)."""
        strings: Dict[str, int] = {"": 0}

        def sid(s: str) -> int:
            k = strings.get(s)
            if k is None:
                k = strings[s] = len(strings)
            return k

        def element(name: str, attrs: Sequence[Tuple[str, str]], children: Sequence[bytes]) -> bytes:
            b = bytearray(varint(sid(name)))
            b += varint(len(attrs))
            for k, v in attrs:
                b += varint(sid(k))
                b += varint(sid(v))
            b += varint(len(children))
            for c in children:
                b += c
            return bytes(b)

        def annotation(cls: int, *values: str) -> bytes:
            attrs = [("class", str(cls))]
            if len(values) == 1:
                attrs.append(("value", values[0]))
            else:
                attrs += [(f"value-{i}", v) for i, v in enumerate(values)]
            return element("annotation", attrs, [])

        def field(name: str, ftype: int, label: Optional[str], flags: int) -> bytes:
            attrs = [("name", name), ("class", str(ftype))]
            if flags & F_CPOOL:
                attrs.append(("constantPool", "true"))
            if flags & F_ARRAY:
                attrs.append(("dimension", "1"))
            ch = []
            if label is not None:
                ch.append(annotation(T_LABEL, label))
            if flags & F_UNSIGNED:
                ch.append(annotation(T_UNSIGNED))
            elif flags & F_BYTES:
                ch += [annotation(T_UNSIGNED), annotation(T_DATA_AMOUNT, "BYTES")]
            elif flags & F_TIME_TICKS:
                ch.append(annotation(T_TIMESTAMP, "TICKS"))
            elif flags & F_TIME_MILLIS:
                ch.append(annotation(T_TIMESTAMP, "MILLISECONDS_SINCE_EPOCH"))
            elif flags & F_DURATION_TICKS:
                ch.append(annotation(T_TIMESPAN, "TICKS"))
            elif flags & F_DURATION_NANOS:
                ch.append(annotation(T_TIMESPAN, "NANOSECONDS"))
            elif flags & F_DURATION_MILLIS:
                ch.append(annotation(T_TIMESPAN, "MILLISECONDS"))
            elif flags & F_ADDRESS:
                ch.append(annotation(T_MEMORY_ADDRESS))
            elif flags & F_PERCENTAGE:
                ch.append(annotation(T_PERCENTAGE))
            return element("field", attrs, ch)

        classes = []
        for t in self._types.values():
            attrs = [("name", t.name), ("id", str(t.id))]
            if t.simple:
                attrs.append(("simpleType", "true"))
            elif t.event:
                attrs.append(("superType", "jdk.jfr.Event"))
            ch = []
            if t.label is not None:
                ch.append(annotation(T_LABEL, t.label))
            if t.category:
                ch.append(annotation(T_CATEGORY, *t.category))
            ch += [field(*f) for f in t.fields]
            classes.append(element("class", attrs, ch))
        for name, tid, label, valued in _ANNOTATION_TYPES:
            ch = [annotation(T_LABEL, label)] if label is not None else []
            if tid in _VALUED_ANNOTATIONS:
                ch.append(field("value", T_STRING, None, F_ARRAY if valued else 0))
            classes.append(element("class", [("name", name), ("id", str(tid)),
                                             ("superType", "java.lang.annotation.Annotation")], ch))
        root = element("root", [], [element("metadata", [], classes),
                                    element("region", [("locale", "en_US"), ("gmtOffset", "0")], [])])
        body = bytearray(varint(len(strings)))
        for s in strings:
            _put_string(body, s)
        body += root
        return bytes(body)

    def _cpool(self) -> bytes:
        pools: List[bytes] = []

        def pool(type_id: int, rows: Sequence[bytes]) -> None:
            if rows:
                pools.append(varint(type_id) + varint(len(rows)) + b"".join(rows))
            else:  # the JDK's reader does not accept an empty pool (async-profiler's writePoolHeader)
                pools.append(varint(T_STRING) + b"\x01\x00\x00")

        def str_rows(d: Dict[int, str]) -> List[bytes]:
            rows = []
            for k, s in sorted(d.items()):
                b = bytearray(varint(k))
                _put_string(b, s)
                rows.append(bytes(b))
            return rows

        pool(T_FRAME_TYPE, str_rows(FRAME_TYPES))
        pool(T_THREAD_STATE, str_rows(THREAD_STATES))
        trows = []
        for tid in sorted(self._threads):
            name, jname, jid = self._threads[tid]
            b = bytearray(varint(tid))
            _put_string(b, name)
            b += varint(tid)
            _put_string(b, jname)
            b += varint(jid)
            trows.append(bytes(b))
        pool(T_THREAD, trows)
        pool(T_STACK_TRACE, self._stack_rows)
        mrows = []
        for k, (cls, mname, desc, mods) in enumerate(self._method_rows, 1 + self.key_base):
            mrows.append(varint(k) + varint(cls) + varint(mname) + varint(desc) + varint(mods) + b"\x00")
        pool(T_METHOD, mrows)
        pool(T_CLASS, [varint(k) + b"\x00" + varint(self._symbols[name]) + b"\x00\x00"
                       for name, k in self._classes.items()])
        pool(T_PACKAGE, [])
        srows = []
        for s, k in self._symbols.items():
            b = bytearray(varint(k))
            _put_string(b, s)
            srows.append(bytes(b))
        pool(T_SYMBOL, srows)
        pool(T_STRING, str_rows({k: s for s, k in self._strings.items()}))
        pool(T_USER_EVENT_TYPE, str_rows(self._user_event_types))
        pool(T_LOG_LEVEL, str_rows(LOG_LEVELS))
        body = bytearray(varint(1))  # type 1 = checkpoint
        body += varint(self.start_ticks)
        body += varint(0)  # duration
        body += varint(0)  # delta to the previous checkpoint: none
        body += varint(1)  # flush
        body += varint(len(pools))
        for p in pools:
            body += p
        total = len(body) + 5
        return bytes(((total & 0x7F) | 0x80, ((total >> 7) & 0x7F) | 0x80, ((total >> 14) & 0x7F) | 0x80,
                      ((total >> 21) & 0x7F) | 0x80, (total >> 28) & 0x7F)) + bytes(body)


_cpu_desc: Optional[str] = None
#: ChunkWriter._metadata: the strings and classes of a set of types, by their signature.
_METADATA_TAILS: Dict[Tuple[object, ...], bytes] = {}


def _cpu_description() -> str:
    """The first block of /proc/cpuinfo, as async-profiler writes it (read once)."""
    global _cpu_desc
    if _cpu_desc is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                _cpu_desc = f.read(65536).split("\n\n", 1)[0]
        except OSError:
            _cpu_desc = ""
    return _cpu_desc
