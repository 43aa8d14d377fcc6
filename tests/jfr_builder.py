"""A small JFR writer for tests: builds chunks with arbitrary metadata, pools and events.

Only what tests need to craft well-formed and malformed inputs; the layout
follows the JFR format that async-profiler writes (see ASYNC_PROFILER.md §1).
"""
from __future__ import annotations

import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple


def varint(v: int) -> bytes:
    """LEB128 with async-profiler's rule: the 9th byte carries 8 bits."""
    v &= (1 << 64) - 1
    out = bytearray()
    for _ in range(8):
        if v < 0x80:
            out.append(v)
            return bytes(out)
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v & 0xFF)
    return bytes(out)


def padded(v: int) -> bytes:
    """The 5-byte padded varint async-profiler uses for sizes."""
    return bytes([(v & 0x7F) | 0x80, ((v >> 7) & 0x7F) | 0x80, ((v >> 14) & 0x7F) | 0x80,
                  ((v >> 21) & 0x7F) | 0x80, (v >> 28) & 0x7F])


def utf8(s: Optional[str]) -> bytes:
    if s is None:
        return b"\x00"
    b = s.encode("utf-8")
    return b"\x03" + varint(len(b)) + b


def latin1(s: str) -> bytes:
    b = s.encode("latin-1")
    return b"\x05" + varint(len(b)) + b


def chars(s: str) -> bytes:
    units = s.encode("utf-16-be")
    vals = [int.from_bytes(units[i:i + 2], "big") for i in range(0, len(units), 2)]
    return b"\x04" + varint(len(vals)) + b"".join(varint(u) for u in vals)


def event(type_id: int, body: bytes, pad: bool = False) -> bytes:
    payload = varint(type_id) + body
    if pad:
        return padded(len(payload) + 5) + payload
    size = len(payload) + 1
    if size >= 128:
        return padded(len(payload) + 5) + payload
    return varint(size) + payload


class Field:
    def __init__(self, name: str, type_id: int, cp: bool = False, array: bool = False,
                 annotations: Sequence[Tuple[int, str]] = ()) -> None:
        self.name, self.type_id, self.cp, self.array = name, type_id, cp, array
        self.annotations = list(annotations)


class Class:
    def __init__(self, cid: int, name: str, fields: Sequence[Field] = (), super_type: Optional[str] = None,
                 simple: bool = False) -> None:
        self.id, self.name, self.fields, self.super_type, self.simple = cid, name, list(fields), super_type, simple


# async-profiler's type ids (v4.5) for the standard classes
T_BOOLEAN, T_CHAR, T_FLOAT, T_DOUBLE, T_BYTE, T_SHORT, T_INT, T_LONG = 4, 5, 6, 7, 8, 9, 10, 11
T_STRING, T_CLASS, T_THREAD, T_STACK_TRACE, T_STACK_FRAME, T_METHOD, T_FRAME_TYPE = 20, 21, 22, 26, 27, 28, 24
T_THREAD_STATE, T_SYMBOL, T_PACKAGE = 25, 31, 30
T_EXEC, T_WALL, T_MALLOC, T_FREE, T_USER, T_USER_TYPE = 101, 119, 120, 121, 124, 34
T_LABEL, T_TIMESTAMP = 201, 204


def standard_classes() -> List[Class]:
    ev = "jdk.jfr.Event"
    ts = [(T_TIMESTAMP, "TICKS")]
    return [
        Class(T_BOOLEAN, "boolean"), Class(T_CHAR, "char"), Class(T_FLOAT, "float"), Class(T_DOUBLE, "double"),
        Class(T_BYTE, "byte"), Class(T_SHORT, "short"), Class(T_INT, "int"), Class(T_LONG, "long"),
        Class(T_STRING, "java.lang.String"),
        Class(T_CLASS, "java.lang.Class", [Field("classLoader", T_LONG), Field("name", T_SYMBOL, cp=True),
                                           Field("package", T_PACKAGE, cp=True), Field("modifiers", T_INT)]),
        Class(T_THREAD, "java.lang.Thread", [Field("osName", T_STRING), Field("osThreadId", T_LONG),
                                             Field("javaName", T_STRING), Field("javaThreadId", T_LONG)]),
        Class(T_STACK_TRACE, "jdk.types.StackTrace", [Field("truncated", T_BOOLEAN),
                                                      Field("frames", T_STACK_FRAME, array=True)]),
        Class(T_STACK_FRAME, "jdk.types.StackFrame", [Field("method", T_METHOD, cp=True), Field("lineNumber", T_INT),
                                                      Field("bytecodeIndex", T_INT),
                                                      Field("type", T_FRAME_TYPE, cp=True)]),
        Class(T_METHOD, "jdk.types.Method", [Field("type", T_CLASS, cp=True), Field("name", T_SYMBOL, cp=True),
                                             Field("descriptor", T_SYMBOL, cp=True), Field("modifiers", T_INT),
                                             Field("hidden", T_BOOLEAN)]),
        Class(T_FRAME_TYPE, "jdk.types.FrameType", [Field("description", T_STRING)], simple=True),
        Class(T_THREAD_STATE, "jdk.types.ThreadState", [Field("name", T_STRING)], simple=True),
        Class(T_SYMBOL, "jdk.types.Symbol", [Field("string", T_STRING)], simple=True),
        Class(T_PACKAGE, "jdk.types.Package", [Field("name", T_SYMBOL, cp=True)], simple=True),
        Class(T_USER_TYPE, "profiler.types.UserEventType", [Field("name", T_STRING)], simple=True),
        Class(T_EXEC, "jdk.ExecutionSample", [Field("startTime", T_LONG, annotations=ts),
                                              Field("sampledThread", T_THREAD, cp=True),
                                              Field("stackTrace", T_STACK_TRACE, cp=True),
                                              Field("state", T_THREAD_STATE, cp=True)], super_type=ev),
        Class(T_WALL, "profiler.WallClockSample", [Field("startTime", T_LONG, annotations=ts),
                                                   Field("sampledThread", T_THREAD, cp=True),
                                                   Field("stackTrace", T_STACK_TRACE, cp=True),
                                                   Field("state", T_THREAD_STATE, cp=True),
                                                   Field("samples", T_INT), Field("timeSpan", T_LONG)],
              super_type=ev),
        Class(T_MALLOC, "profiler.Malloc", [Field("startTime", T_LONG, annotations=ts),
                                            Field("eventThread", T_THREAD, cp=True),
                                            Field("stackTrace", T_STACK_TRACE, cp=True),
                                            Field("address", T_LONG), Field("size", T_LONG)], super_type=ev),
        Class(T_FREE, "profiler.Free", [Field("startTime", T_LONG, annotations=ts),
                                        Field("eventThread", T_THREAD, cp=True),
                                        Field("stackTrace", T_STACK_TRACE, cp=True),
                                        Field("address", T_LONG)], super_type=ev),
        Class(T_USER, "profiler.UserEvent", [Field("startTime", T_LONG, annotations=ts),
                                             Field("eventThread", T_THREAD, cp=True),
                                             Field("type", T_USER_TYPE, cp=True), Field("data", T_STRING)],
              super_type=ev),
        Class(T_LABEL, "jdk.jfr.Label", [Field("value", T_STRING)], super_type="java.lang.annotation.Annotation"),
        Class(T_TIMESTAMP, "jdk.jfr.Timestamp", [Field("value", T_STRING)],
              super_type="java.lang.annotation.Annotation"),
    ]


def metadata(classes: Sequence[Class], nest: int = 0) -> bytes:
    strings: List[str] = [""]
    index: Dict[str, int] = {"": 0}

    def s(x: str) -> int:
        if x not in index:
            index[x] = len(strings)
            strings.append(x)
        return index[x]

    def element(name: str, attrs: Sequence[Tuple[str, str]], children: Sequence[bytes]) -> bytes:
        out = varint(s(name)) + varint(len(attrs))
        for k, v in attrs:
            out += varint(s(k)) + varint(s(v))
        out += varint(len(children)) + b"".join(children)
        return out

    class_elems = []
    for c in classes:
        attrs = [("name", c.name), ("id", str(c.id))]
        if c.super_type:
            attrs.append(("superType", c.super_type))
        if c.simple:
            attrs.append(("simpleType", "true"))
        kids = []
        for f in c.fields:
            fa = [("name", f.name), ("class", str(f.type_id))]
            if f.cp:
                fa.append(("constantPool", "true"))
            if f.array:
                fa.append(("dimension", "1"))
            ann = [element("annotation", [("class", str(a)), ("value", v)], []) for a, v in f.annotations]
            kids.append(element("field", fa, ann))
        class_elems.append(element("class", attrs, kids))
    meta = element("metadata", [], class_elems)
    region = element("region", [("locale", "en_US"), ("gmtOffset", "0")], [])
    inner: bytes = element("root", [], [meta, region])
    for _ in range(nest):  # optional extra nesting, for depth tests
        inner = element("wrap", [], [inner])
    body = varint(0) + varint(0) + varint(0x7FFFFFFF) + varint(len(strings))
    body += b"".join(utf8(x) for x in strings) + inner
    return event(0, body, pad=True)


def checkpoint(pools: Sequence[Tuple[int, Sequence[Tuple[int, bytes]]]], delta: int = 0) -> bytes:
    body = varint(0) + varint(0) + varint(delta) + b"\x01" + varint(len(pools))
    for type_id, entries in pools:
        body += varint(type_id) + varint(len(entries))
        for key, value in entries:
            body += varint(key) + value
    return event(1, body, pad=True)


def chunk(events: Sequence[bytes], classes: Optional[Sequence[Class]] = None,
          pools: Sequence[Tuple[int, Sequence[Tuple[int, bytes]]]] = (),
          start_nanos: int = 1_700_000_000_000_000_000, start_ticks: int = 1000,
          ticks_per_second: int = 1_000_000_000, duration_nanos: int = 1_000_000_000,
          meta_nest: int = 0) -> bytes:
    meta = metadata(classes if classes is not None else standard_classes(), meta_nest)
    body = meta + b"".join(events)
    cp_offset = 68 + len(body)
    body += checkpoint(pools)
    size = 68 + len(body)
    header = b"FLR\x00" + struct.pack(">HHqqqqqqqI", 2, 0, size, cp_offset, 68, start_nanos, duration_nanos,
                                      start_ticks, ticks_per_second, 1)
    assert len(header) == 68
    return header + body


# -- helpers for the standard classes ------------------------------------------------------------

def thread_entry(name: Optional[str], tid: int) -> bytes:
    return utf8(name) + varint(tid) + utf8(None) + varint(0)


def method_entry(class_key: int, name_sym: int) -> bytes:
    return varint(class_key) + varint(name_sym) + varint(0) + varint(0x100) + b"\x00"


def class_entry(name_sym: int) -> bytes:
    return varint(0) + varint(name_sym) + varint(0) + varint(0)


def stack_entry(frames: Sequence[Tuple[int, int]], truncated: bool = False) -> bytes:
    """frames: (method key, frame type key), leaf first."""
    out = (b"\x01" if truncated else b"\x00") + varint(len(frames))
    for m, t in frames:
        out += varint(m) + varint(0) + varint(0) + varint(t)
    return out


FRAME_TYPES = [(0, "Interpreted"), (1, "JIT compiled"), (2, "Inlined"), (3, "Native"), (4, "C++"),
               (5, "Kernel"), (6, "C1 compiled")]
THREAD_STATES = [(0, "STATE_DEFAULT"), (1, "STATE_RUNNABLE"), (2, "STATE_SLEEPING")]


class Simple:
    """A recording of native stacks built from names: ``add_stack(["main", "work"])`` (root first)."""

    def __init__(self) -> None:
        self.symbols: Dict[str, int] = {}
        self.methods: Dict[Tuple[str, str, int], int] = {}
        self.classes: Dict[str, int] = {}
        self.stacks: Dict[Tuple[Any, ...], int] = {}
        self.threads: Dict[int, str] = {}
        self.events: List[bytes] = []

    def sym(self, s: str) -> int:
        return self.symbols.setdefault(s, len(self.symbols) + 1)

    def method(self, name: str, owner: str = "libapp.so", ftype: int = 3) -> int:
        key = (name, owner, ftype)
        if key not in self.methods:
            ck = self.classes.setdefault(owner, len(self.classes) + 1)
            self.sym(owner)
            self.sym(name)
            self.methods[key] = len(self.methods) + 1
            _ = ck
        return self.methods[key]

    def stack(self, frames: Sequence[Any]) -> int:
        """frames root first; each a name or (name, owner, ftype)."""
        norm = tuple(f if isinstance(f, tuple) else (f, "libapp.so", 3) for f in frames)
        if norm not in self.stacks:
            for f in norm:
                self.method(*f)
            self.stacks[norm] = len(self.stacks) + 1
        return self.stacks[norm]

    def thread(self, tid: int, name: str) -> int:
        self.threads[tid] = name
        return tid

    def exec_sample(self, t: int, tid: int, frames: Sequence[Any], state: int = 0) -> None:
        st = self.stack(frames)
        self.events.append(event(T_EXEC, varint(t) + varint(tid) + varint(st) + varint(state)))

    def wall_sample(self, t: int, tid: int, frames: Sequence[Any], samples: int = 1, state: int = 2) -> None:
        st = self.stack(frames)
        self.events.append(event(T_WALL, varint(t) + varint(tid) + varint(st) + varint(state) + varint(samples)
                                 + varint(0)))

    def malloc(self, t: int, tid: int, frames: Sequence[Any], address: int, size: int) -> None:
        st = self.stack(frames)
        self.events.append(event(T_MALLOC, varint(t) + varint(tid) + varint(st) + varint(address) + varint(size)))

    def free(self, t: int, tid: int, address: int) -> None:
        self.events.append(event(T_FREE, varint(t) + varint(tid) + varint(0) + varint(address)))

    def build(self, **kw: Any) -> bytes:
        pools = [
            (T_FRAME_TYPE, [(k, utf8(v)) for k, v in FRAME_TYPES]),
            (T_THREAD_STATE, [(k, utf8(v)) for k, v in THREAD_STATES]),
            (T_THREAD, [(tid, thread_entry(name, tid)) for tid, name in self.threads.items()]),
            (T_STACK_TRACE, [(key, stack_entry([(self.methods[f], f[2]) for f in reversed(frames)]))
                             for frames, key in self.stacks.items()]),
            (T_METHOD, [(mk, method_entry(self.classes[owner], self.symbols[name]))
                        for (name, owner, _t), mk in self.methods.items()]),
            (T_CLASS, [(ck, class_entry(self.symbols[owner])) for owner, ck in self.classes.items()]),
            (T_SYMBOL, [(k, utf8(s)) for s, k in self.symbols.items()]),
            (T_STRING, [(0, utf8(None))]),
        ]
        return chunk(self.events, pools=pools, **kw)
