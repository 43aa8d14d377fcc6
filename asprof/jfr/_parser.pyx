# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Hot loops of the JFR reader (see asprof/jfr/reader.py for the model).

Everything here works on one immutable ``bytes`` object holding the whole
input and never reads outside ``[0, len(data))``: every length, count and
offset read from the input is checked against the bytes that remain, nesting
is bounded, and every failure raises :class:`asprof.jfr.errors.JfrError`
naming the byte offset.

Format facts (written from async-profiler's ``flightRecorder.cpp`` and
``jfrMetadata.cpp``, and the JDK's JFR): LEB128 varints whose 9th byte carries
8 bits; big-endian fixed-width numbers; strings with an encoding byte 0..5;
a 68-byte chunk header; a metadata event describing every class and field;
checkpoint events holding constant pools; events framed by
``size`` (varint, counting itself) and ``type`` (varint).
"""
cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int8_t, int16_t, int32_t, int64_t
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #if !defined(__GNUC__) && !defined(__clang__)
    static inline int __builtin_ctzll(unsigned long long x) { int n = 0; while (!(x & 1)) { x >>= 1; n++; } return n; }
    #endif
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    #error "the JFR varint fast path assumes a little-endian machine"
    #endif
    """
    int __builtin_ctzll(unsigned long long x) nogil

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_attr_t:
        pass
    int pthread_create(pthread_t* thread, const pthread_attr_t* attr, void* (*start)(void*) noexcept nogil,
                       void* arg)
    int pthread_join(pthread_t thread, void** retval)
from libc.stdlib cimport malloc, calloc, realloc, free, qsort
from cpython.array cimport array, resize_smart


cdef class Buf:
    """A read-only view of the input (bytes, or an mmap of the file): pointer + length."""
    cdef object obj
    cdef const uint8_t[::1] mv
    cdef const uint8_t* p
    cdef Py_ssize_t n

    def __cinit__(self, object obj):
        self.obj = obj
        self.mv = obj
        self.n = self.mv.shape[0]
        self.p = &self.mv[0] if self.n > 0 else NULL

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        return bytes(self.mv[key])


cdef Buf _buf(object data):
    return data if isinstance(data, Buf) else Buf(data)

import array as _pyarray

from asprof.jfr.errors import JfrError

# ---------------------------------------------------------------------------------------------
# constants

cdef Py_ssize_t PARALLEL_MIN_BYTES = 4 << 20   # chunks smaller than this are filled by one thread

cdef enum:
    MAX_NESTING = 32          # inline struct / metadata element nesting bound
    MAX_TYPE_TABLE = 4096     # type ids below this are looked up in C arrays

# primitive kinds of a field (MetaField.kind)
cdef enum:
    P_BOOL = 1
    P_BYTE = 2
    P_SHORT = 3
    P_CHAR = 4
    P_INT = 5
    P_LONG = 6
    P_FLOAT = 7
    P_DOUBLE = 8
    P_STRING = 9
    P_STRUCT = 10

# sample kinds recorded in the column tables
KIND_EXEC = 1
KIND_WALL = 2
KIND_MALLOC = 3
KIND_FREE = 4
ALL_KINDS = (1, 2, 3, 4)
cdef enum:
    K_NONE = 0
    K_EXEC = 1
    K_WALL = 2
    K_MALLOC = 3
    K_FREE = 4

# slots that a sample event's fields are captured into
cdef enum:
    S_TIME = 0
    S_THREAD = 1
    S_STACK = 2
    S_STATE = 3
    S_VALUE = 4
    S_ADDR = 5
    N_SLOTS = 6

# C-level ops for fast field skipping/capture
cdef enum:
    OP_BYTE = 1
    OP_VAR = 2
    OP_F4 = 3
    OP_F8 = 4
    OP_STR = 5

_PRIMITIVES = {
    "boolean": P_BOOL, "byte": P_BYTE, "short": P_SHORT, "char": P_CHAR, "int": P_INT,
    "long": P_LONG, "float": P_FLOAT, "double": P_DOUBLE, "java.lang.String": P_STRING,
}

SAMPLE_TYPES = {
    "jdk.ExecutionSample": K_EXEC,
    "jdk.NativeMethodSample": K_WALL,   # JDK recordings: threads in native code
    "profiler.WallClockSample": K_WALL,
    "profiler.Malloc": K_MALLOC,
    "profiler.Free": K_FREE,
}

_SLOT_NAMES = {
    "startTime": S_TIME,
    "sampledThread": S_THREAD,
    "eventThread": S_THREAD,
    "stackTrace": S_STACK,
    "state": S_STATE,
    "address": S_ADDR,
}


# ---------------------------------------------------------------------------------------------
# primitive readers: return 0 on success, -1 when the input ends too early

cdef inline int rd_var(const uint8_t* p, Py_ssize_t* pos, Py_ssize_t end, uint64_t* out) noexcept nogil:
    cdef Py_ssize_t i = pos[0]
    cdef uint64_t result = 0
    cdef uint8_t b
    cdef int shift = 0
    while shift < 56:
        if i >= end:
            return -1
        b = p[i]
        i += 1
        result |= (<uint64_t>(b & 0x7f)) << shift
        if b < 0x80:
            pos[0] = i
            out[0] = result
            return 0
        shift += 7
    if i >= end:
        return -1
    result |= (<uint64_t>p[i]) << 56
    pos[0] = i + 1
    out[0] = result
    return 0


cdef inline int rd_var_fast(const uint8_t* p, Py_ssize_t* pos, Py_ssize_t end, uint64_t* out) noexcept nogil:
    """rd_var, eight bytes at a time: branch-light decoding of varints of up to 8 bytes."""
    cdef Py_ssize_t i = pos[0]
    cdef uint64_t x, stop
    cdef int nbytes
    if end - i < 8:
        return rd_var(p, pos, end, out)
    memcpy(&x, p + i, 8)        # little-endian load (x86-64, aarch64)
    stop = ~x & 0x8080808080808080ULL
    if stop == 0:
        return rd_var(p, pos, end, out)   # 9-byte varint
    nbytes = (__builtin_ctzll(stop) >> 3) + 1
    if nbytes < 8:
        x &= (<uint64_t>1 << (nbytes * 8)) - 1
    x &= 0x7f7f7f7f7f7f7f7fULL
    x = ((x & 0x7f007f007f007f00ULL) >> 1) | (x & 0x007f007f007f007fULL)
    x = ((x & 0x3fff00003fff0000ULL) >> 2) | (x & 0x00003fff00003fffULL)
    x = ((x & 0x0fffffff00000000ULL) >> 4) | (x & 0x000000000fffffffULL)
    pos[0] = i + nbytes
    out[0] = x
    return 0


cdef inline uint64_t be64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int k
    for k in range(8):
        v = (v << 8) | p[k]
    return v


cdef inline uint32_t be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline int skip_string(const uint8_t* p, Py_ssize_t* pos, Py_ssize_t end) noexcept nogil:
    cdef uint64_t n, tmp, k
    cdef uint8_t enc
    if pos[0] >= end:
        return -1
    enc = p[pos[0]]
    pos[0] += 1
    if enc == 0 or enc == 1:
        return 0
    if enc == 2:
        return rd_var(p, pos, end, &tmp)
    if enc == 3 or enc == 5:
        if rd_var(p, pos, end, &n) < 0:
            return -1
        if n > <uint64_t>(end - pos[0]):
            return -1
        pos[0] += <Py_ssize_t>n
        return 0
    if enc == 4:
        if rd_var(p, pos, end, &n) < 0:
            return -1
        if n > <uint64_t>(end - pos[0]):
            return -1
        k = 0
        while k < n:
            if rd_var(p, pos, end, &tmp) < 0:
                return -1
            k += 1
        return 0
    return -2


# ---------------------------------------------------------------------------------------------
# metadata model

cdef class MetaField:
    """A field of a metadata class, in wire order."""
    cdef public str name
    cdef public object type_id
    cdef public bint constant_pool
    cdef public int dimension
    cdef public dict annotations   # annotation class name -> value (or None)
    cdef public int kind           # P_* (0 until resolved)
    cdef public object type_name

    def __repr__(self):
        return f"MetaField({self.name!r}, {self.type_name!r}, cp={self.constant_pool}, dim={self.dimension})"


cdef class MetaClass:
    """A class (event type, struct, pool type or primitive) of a chunk's metadata."""
    cdef public object id
    cdef public str name
    cdef public object super_type
    cdef public bint simple_type
    cdef public list fields
    cdef public dict annotations
    # fast plan (all fields scalar) for sample capture
    cdef int nops
    cdef int* ops
    cdef int* slots
    cdef public bint scalar

    def __cinit__(self):
        self.ops = NULL
        self.slots = NULL
        self.nops = 0

    def __dealloc__(self):
        if self.ops != NULL:
            free(self.ops)
        if self.slots != NULL:
            free(self.slots)

    @property
    def label(self):
        return self.annotations.get("jdk.jfr.Label") if self.annotations else None

    @property
    def category(self):
        return self.annotations.get("jdk.jfr.Category") if self.annotations else None

    def field(self, str name):
        for f in self.fields:
            if (<MetaField>f).name == name:
                return f
        return None

    def __repr__(self):
        return f"MetaClass({self.id}, {self.name!r}, {len(self.fields)} fields)"


cdef class Ref:
    """A constant-pool reference inside a decoded value: pool class id + key."""
    cdef public object type_id
    cdef public object key

    def __init__(self, type_id, key):
        self.type_id = type_id
        self.key = key

    def __eq__(self, other):
        return isinstance(other, Ref) and (<Ref>other).type_id == self.type_id and (<Ref>other).key == self.key

    def __hash__(self):
        return hash((self.type_id, self.key))

    def __repr__(self):
        return f"Ref({self.type_id}, {self.key})"


# ---------------------------------------------------------------------------------------------
# cursor with Python-level error reporting

cdef class Cursor:
    cdef object data
    cdef const uint8_t* p
    cdef public Py_ssize_t pos
    cdef public Py_ssize_t end

    def __init__(self, object data, Py_ssize_t pos, Py_ssize_t end):
        cdef Buf b = _buf(data)
        self.data = b
        self.p = b.p
        if end > b.n:
            end = b.n
        if pos > end:
            pos = end
        self.pos = pos
        self.end = end

    cdef fail(self, str what):
        raise JfrError(what, self.pos)

    cdef inline uint64_t var(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef uint64_t v = 0
        if rd_var(self.p, &self.pos, self.end, &v) < 0:
            self.fail("truncated varint")
        return v

    cdef inline Py_ssize_t count(self, str what) except -1:
        """A count of items that each take at least one byte."""
        cdef Py_ssize_t start = self.pos
        cdef uint64_t v = self.var()
        if v > <uint64_t>(self.end - self.pos):
            raise JfrError(f"{what} count {v} exceeds the {self.end - self.pos} bytes left", start)
        return <Py_ssize_t>v

    cdef inline uint8_t u8(self) except? 0xFF:
        if self.pos >= self.end:
            self.fail("unexpected end of data")
        self.pos += 1
        return self.p[self.pos - 1]

    cdef object string(self, object string_type_id):
        cdef Py_ssize_t start = self.pos
        cdef uint8_t enc = self.u8()
        cdef Py_ssize_t n
        cdef Py_ssize_t k
        cdef list chars
        cdef uint64_t c
        if enc == 0:
            return None
        if enc == 1:
            return ""
        if enc == 2:
            return Ref(string_type_id, self.var())
        if enc == 3 or enc == 5:
            n = self.count("string byte")
            self.pos += n
            if enc == 3:
                return (<const char*>self.p)[self.pos - n:self.pos].decode("utf-8", "replace")
            return (<const char*>self.p)[self.pos - n:self.pos].decode("latin-1")
        if enc == 4:
            n = self.count("string char")
            chars = []
            for k in range(n):
                c = self.var()
                chars.append(chr(c & 0xFFFF))
            return "".join(chars).encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        raise JfrError(f"invalid string encoding {enc}", start)

    cdef object value(self, MetaField f, dict classes, object string_type_id, int depth):
        cdef Py_ssize_t n, k, start
        cdef list out
        if f.dimension:
            n = self.count("array element")
            if n == 0:
                return []
            start = self.pos
            out = [self.single(f, classes, string_type_id, depth)]
            if n > 1 and self.pos == start:
                # elements of a type without bytes: the count alone (bounded by the bytes left)
                # would make every array of the pool that large, their total quadratic in the size
                raise JfrError(f"array of {n} elements of a type that takes no bytes", start)
            for k in range(1, n):
                out.append(self.single(f, classes, string_type_id, depth))
            return out
        return self.single(f, classes, string_type_id, depth)

    cdef object single(self, MetaField f, dict classes, object string_type_id, int depth):
        cdef uint64_t v
        cdef int kind = f.kind
        cdef uint32_t bits32
        cdef float fv
        cdef double dv
        cdef uint64_t bits64
        if f.constant_pool:
            return Ref(f.type_id, self.var())
        if kind == P_LONG:
            v = self.var()
            return <int64_t>v
        if kind == P_INT:
            v = self.var()
            return <int32_t>(<uint32_t>v)
        if kind == P_STRING:
            return self.string(string_type_id)
        if kind == P_BOOL:
            return self.u8() != 0
        if kind == P_BYTE:
            return <int8_t>self.u8()
        if kind == P_SHORT:
            v = self.var()
            return <int16_t>(<uint16_t>v)
        if kind == P_CHAR:
            v = self.var()
            return chr(v & 0xFFFF)
        if kind == P_FLOAT:
            if self.end - self.pos < 4:
                self.fail("truncated float")
            bits32 = be32(self.p + self.pos)
            self.pos += 4
            memcpy(&fv, &bits32, 4)
            return fv
        if kind == P_DOUBLE:
            if self.end - self.pos < 8:
                self.fail("truncated double")
            bits64 = be64(self.p + self.pos)
            self.pos += 8
            memcpy(&dv, &bits64, 8)
            return dv
        if kind == P_STRUCT:
            cls = classes.get(f.type_id)
            if cls is None:
                self.fail(f"field {f.name!r} has unknown type {f.type_id}")
            return self.struct(<MetaClass>cls, classes, string_type_id, depth + 1)
        self.fail(f"field {f.name!r} has unresolved type {f.type_id}")

    cdef object struct(self, MetaClass cls, dict classes, object string_type_id, int depth):
        if depth > MAX_NESTING:
            self.fail(f"inline values of {cls.name!r} nested deeper than {MAX_NESTING} (cyclic type?)")
        cdef dict out = {}
        for f in cls.fields:
            out[(<MetaField>f).name] = self.value(<MetaField>f, classes, string_type_id, depth)
        return out


# ---------------------------------------------------------------------------------------------
# metadata parsing

cdef object _read_element(Cursor c, list strings, int depth):
    if depth > MAX_NESTING:
        c.fail(f"metadata elements nested deeper than {MAX_NESTING}")
    cdef Py_ssize_t nstr = len(strings)
    cdef Py_ssize_t start = c.pos
    cdef uint64_t idx = c.var()
    if idx >= <uint64_t>nstr:
        raise JfrError(f"metadata string index {idx} out of range ({nstr} strings)", start)
    name = strings[idx]
    cdef Py_ssize_t nattr = c.count("metadata attribute")
    cdef dict attrs = {}
    cdef Py_ssize_t k
    cdef uint64_t ki, vi
    for k in range(nattr):
        start = c.pos
        ki = c.var()
        vi = c.var()
        if ki >= <uint64_t>nstr or vi >= <uint64_t>nstr:
            raise JfrError("metadata attribute string index out of range", start)
        attrs[strings[ki]] = strings[vi]
    cdef Py_ssize_t nchild = c.count("metadata child")
    cdef list children = [_read_element(c, strings, depth + 1) for k in range(nchild)]
    return (name, attrs, children)


cdef object _to_int(object s, Cursor c, str what):
    try:
        return int(s)
    except (TypeError, ValueError):
        c.fail(f"metadata {what} {s!r} is not a number")


cdef dict _annotations(list children, dict names_by_id, Cursor c):
    cdef dict out = {}
    for (name, attrs, _kids) in children:
        if name != "annotation":
            continue
        cid = attrs.get("class")
        aname = names_by_id.get(_to_int(cid, c, "annotation class"), cid)
        if "value" in attrs:
            out[aname] = attrs["value"]
        else:
            vals = [attrs[k] for k in sorted(a for a in attrs if a.startswith("value-"))]
            out[aname] = vals if vals else None
    return out


def parse_metadata(object data, Py_ssize_t offset, Py_ssize_t chunk_end):
    """Parse the metadata event at ``offset``: returns ``(classes_by_id, classes_by_name)``."""
    cdef Cursor c = Cursor(data, offset, chunk_end)
    cdef Py_ssize_t start = c.pos
    cdef uint64_t size = c.var()
    if size < 2 or size > <uint64_t>(chunk_end - start):
        raise JfrError(f"metadata event size {size} does not fit the chunk", start)
    c.end = start + <Py_ssize_t>size
    cdef uint64_t etype = c.var()
    if etype != 0:
        raise JfrError(f"expected the metadata event (type 0), found type {etype}", start)
    c.var()  # start time
    c.var()  # duration
    c.var()  # metadata id
    cdef Py_ssize_t nstrings = c.count("metadata string")
    cdef list strings = []
    cdef Py_ssize_t k
    for k in range(nstrings):
        s = c.string(None)
        if isinstance(s, Ref):
            c.fail("metadata strings cannot reference a constant pool")
        strings.append(s)
    root = _read_element(c, strings, 0)
    cdef list class_elems = []
    cdef list stack = [root]
    while stack:
        name, attrs, children = stack.pop()
        if name == "class":
            class_elems.append((attrs, children))
        else:
            stack.extend(children)
    cdef dict names_by_id = {}
    for attrs, children in class_elems:
        names_by_id[_to_int(attrs.get("id"), c, "class id")] = attrs.get("name")
    cdef dict by_id = {}
    cdef dict by_name = {}
    cdef MetaClass cls
    cdef MetaField f
    for attrs, children in class_elems:
        cls = MetaClass()
        cls.id = _to_int(attrs.get("id"), c, "class id")
        cls.name = attrs.get("name") or f"type{cls.id}"
        cls.super_type = attrs.get("superType")
        cls.simple_type = attrs.get("simpleType") == "true"
        cls.annotations = _annotations(children, names_by_id, c)
        cls.fields = []
        for (fname, fattrs, fkids) in children:
            if fname != "field":
                continue
            f = MetaField()
            f.name = fattrs.get("name") or ""
            f.type_id = _to_int(fattrs.get("class"), c, "field class")
            f.constant_pool = fattrs.get("constantPool") == "true"
            f.dimension = 1 if fattrs.get("dimension") not in (None, "0") else 0
            f.annotations = _annotations(fkids, names_by_id, c)
            f.kind = 0
            cls.fields.append(f)
        by_id[cls.id] = cls
        by_name[cls.name] = cls
    # resolve field kinds
    for cls in by_id.values():
        for f in cls.fields:
            tname = names_by_id.get(f.type_id)
            if tname is None:
                c.fail(f"field {cls.name}.{f.name} refers to undeclared class {f.type_id}")
            f.type_name = tname
            f.kind = _PRIMITIVES.get(tname, P_STRUCT)
    for cls in by_id.values():
        _compile_plan(cls)
    return by_id, by_name


cdef void _compile_plan(MetaClass cls) except *:
    """Scalar fast path: every field is a fixed-size number, a varint or a string."""
    cdef int n = len(cls.fields)
    cdef int i
    cdef MetaField f
    cls.scalar = True
    cls.ops = <int*>malloc(sizeof(int) * (n + 1))
    cls.slots = <int*>malloc(sizeof(int) * (n + 1))
    if cls.ops == NULL or cls.slots == NULL:
        raise MemoryError()
    cls.nops = n
    for i in range(n):
        f = cls.fields[i]
        cls.slots[i] = _SLOT_NAMES.get(f.name, -1)
        if f.name in ("samples", "size"):
            cls.slots[i] = S_VALUE
        if f.dimension:
            cls.scalar = False
            cls.ops[i] = 0
        elif f.constant_pool:
            cls.ops[i] = OP_VAR
        elif f.kind in (P_BOOL, P_BYTE):
            cls.ops[i] = OP_BYTE
        elif f.kind in (P_SHORT, P_CHAR, P_INT, P_LONG):
            cls.ops[i] = OP_VAR
        elif f.kind == P_FLOAT:
            cls.ops[i] = OP_F4
        elif f.kind == P_DOUBLE:
            cls.ops[i] = OP_F8
        elif f.kind == P_STRING:
            cls.ops[i] = OP_STR
        else:
            cls.scalar = False
            cls.ops[i] = 0


# ---------------------------------------------------------------------------------------------
# chunk header

def parse_header(object data, Py_ssize_t offset):
    """The 68-byte chunk header at ``offset`` as a dict (no validation of offsets)."""
    cdef Buf b = _buf(data)
    cdef Py_ssize_t n = b.n
    cdef const uint8_t* p = b.p
    if n - offset < 68:
        raise JfrError(f"truncated chunk header ({n - offset} of 68 bytes)", offset)
    if not (p[offset] == 70 and p[offset + 1] == 76 and p[offset + 2] == 82 and p[offset + 3] == 0):
        raise JfrError("not a JFR file (bad magic, expected 'FLR\\0')", offset)
    p += offset
    return {
        "major": (p[4] << 8) | p[5],
        "minor": (p[6] << 8) | p[7],
        "size": <int64_t>be64(p + 8),
        "cp_offset": <int64_t>be64(p + 16),
        "meta_offset": <int64_t>be64(p + 24),
        "start_nanos": <int64_t>be64(p + 32),
        "duration_nanos": <int64_t>be64(p + 40),
        "start_ticks": <int64_t>be64(p + 48),
        "ticks_per_second": <int64_t>be64(p + 56),
        "features": be32(p + 64),
    }


# ---------------------------------------------------------------------------------------------
# stack traces: flat columns

cdef inline void push_q(array a, int64_t v) except *:
    cdef Py_ssize_t n = len(a)
    resize_smart(a, n + 1)
    a.data.as_longlongs[n] = v


cdef class StackTable:
    """All stack traces of a chunk, as flat columns.

    Trace ``i`` (``index[key] == i``) has frames ``starts[i] .. starts[i+1]``,
    leaf first. Per frame: ``method`` (Method pool key), ``line``, ``bci`` and
    ``ftype`` (FrameType pool key).
    """
    cdef public dict index
    cdef public array keys
    cdef public array starts
    cdef public array truncated
    cdef public array method
    cdef public array line
    cdef public array bci
    cdef public array ftype

    def __init__(self):
        self.index = {}
        self.keys = array("q")
        self.starts = array("q", [0])
        self.truncated = array("b")
        self.method = array("q")
        self.line = array("q")
        self.bci = array("q")
        self.ftype = array("q")

    def __len__(self):
        return len(self.keys)

    def add(self, key, bint truncated, frames):
        """Append a trace given as ``[(method, line, bci, ftype), ...]`` (leaf first)."""
        self.index[key] = len(self.keys)
        push_q(self.keys, key)
        self.truncated.append(1 if truncated else 0)
        for (m, l, b, t) in frames:
            push_q(self.method, m)
            push_q(self.line, l)
            push_q(self.bci, b)
            push_q(self.ftype, t)
        push_q(self.starts, len(self.method))

    def frames(self, Py_ssize_t i):
        cdef Py_ssize_t a = self.starts[i]
        cdef Py_ssize_t b = self.starts[i + 1]
        return [(self.method[k], self.line[k], self.bci[k], self.ftype[k]) for k in range(a, b)]


cdef int _stackframe_layout(MetaClass st, dict classes, int* idx) except -2:
    """For the fast path: positions of method/line/bci/type in StackFrame, or -1."""
    cdef MetaField frames = None
    cdef MetaField f
    for f in st.fields:
        if f.name == "frames":
            frames = f
        elif f.dimension or f.kind == P_STRUCT and not f.constant_pool:
            return -1
    if frames is None or not frames.dimension or frames.constant_pool or frames.kind != P_STRUCT:
        return -1
    sf = classes.get(frames.type_id)
    if sf is None or not (<MetaClass>sf).scalar:
        return -1
    cdef int i = 0
    idx[0] = idx[1] = idx[2] = idx[3] = -1
    for f in (<MetaClass>sf).fields:
        if f.name == "method":
            idx[0] = i
        elif f.name == "lineNumber":
            idx[1] = i
        elif f.name == "bytecodeIndex":
            idx[2] = i
        elif f.name == "type":
            idx[3] = i
        i += 1
    return 0


cdef int _scalar_fields(const uint8_t* p, Py_ssize_t* pos, Py_ssize_t end, MetaClass cls,
                        int64_t* vals, int nvals) noexcept nogil:
    """Read the scalar fields of cls; value of field i (if i < nvals) into vals[i]."""
    cdef int i, op, r
    cdef uint64_t v
    for i in range(cls.nops):
        op = cls.ops[i]
        v = 0
        if op == OP_VAR:
            if rd_var(p, pos, end, &v) < 0:
                return -1
        elif op == OP_BYTE:
            if pos[0] >= end:
                return -1
            v = p[pos[0]]
            pos[0] += 1
        elif op == OP_F4:
            if end - pos[0] < 4:
                return -1
            pos[0] += 4
        elif op == OP_F8:
            if end - pos[0] < 8:
                return -1
            pos[0] += 8
        elif op == OP_STR:
            r = skip_string(p, pos, end)
            if r < 0:
                return r
        else:
            return -3
        if i < nvals:
            vals[i] = <int64_t>v
    return 0


cdef inline int64_t _as_i64(object v, int64_t default):
    """``v`` as the fast path would store it (64 bits, wrapped), or ``default`` if not a number."""
    if isinstance(v, int):
        return <int64_t>(<uint64_t>(v & 0xFFFFFFFFFFFFFFFF))
    return default


cdef void _read_stack_pool(Cursor c, MetaClass st, dict classes, object string_type_id,
                           Py_ssize_t count, StackTable table) except *:
    cdef int idx[4]
    idx[0] = idx[1] = idx[2] = idx[3] = -1
    cdef int64_t vals[64]
    cdef Py_ssize_t k, j, nframes, start
    cdef uint64_t key
    cdef MetaField f
    cdef MetaClass sf
    cdef int truncated, r
    cdef Py_ssize_t nfields
    if _stackframe_layout(st, classes, idx) < 0 or len(classes[(<MetaField>st.field("frames")).type_id].fields) > 64:
        # generic (slow) path
        for k in range(count):
            key = c.var()
            entry = c.struct(st, classes, string_type_id, 0)
            frames = []
            for fr in entry.get("frames") or ():
                if not isinstance(fr, dict):
                    continue
                m = fr.get("method")
                t = fr.get("type")
                # any decoded value may stand where a number is expected (a hostile metadata can
                # declare lineNumber a string): numbers as the fast path reads them, else a default
                frames.append((
                    _as_i64((<Ref>m).key if isinstance(m, Ref) else 0, 0),
                    _as_i64(fr.get("lineNumber"), 0),
                    _as_i64(fr.get("bytecodeIndex"), 0),
                    _as_i64((<Ref>t).key if isinstance(t, Ref) else t, -1),
                ))
            table.add(<int64_t>key, bool(entry.get("truncated")), frames)
        return
    sf = classes[(<MetaField>st.field("frames")).type_id]
    nfields = len(sf.fields)
    if sf.nops == 0:
        # frames without fields take no bytes: a count bounded by the bytes left, in every stack of
        # the pool, would make the table quadratic in the size of the file
        for k in range(count):
            c.var()
            for f in st.fields:
                if f.name == "frames":
                    start = c.pos
                    if c.count("stack frame") > 0:
                        raise JfrError("stack frames of a type without fields", start)
                else:
                    c.single(f, classes, string_type_id, 0)
        return
    for k in range(count):
        key = c.var()
        truncated = 0
        for f in st.fields:
            if f.name == "frames":
                start = c.pos
                nframes = c.count("stack frame")
                for j in range(nframes):
                    vals[0] = vals[1] = vals[2] = vals[3] = 0
                    r = _scalar_fields(c.p, &c.pos, c.end, sf, vals, 64)
                    if r < 0:
                        c.fail("truncated or invalid stack frame" if r != -2 else "invalid string encoding in stack frame")
                    push_q(table.method, vals[idx[0]] if idx[0] >= 0 else 0)
                    push_q(table.line, <int32_t>vals[idx[1]] if idx[1] >= 0 else 0)
                    push_q(table.bci, <int32_t>vals[idx[2]] if idx[2] >= 0 else 0)
                    push_q(table.ftype, vals[idx[3]] if idx[3] >= 0 else -1)
            elif f.name == "truncated":
                v = c.single(f, classes, string_type_id, 0)
                truncated = 1 if v else 0
            else:
                c.single(f, classes, string_type_id, 0)
        table.index[<int64_t>key] = len(table.keys)
        push_q(table.keys, <int64_t>key)
        table.truncated.append(truncated)
        push_q(table.starts, len(table.method))


def parse_checkpoint(object data, Py_ssize_t offset, Py_ssize_t chunk_end, dict classes,
                     dict pools, StackTable stacks):
    """Parse the checkpoint event at ``offset`` into ``pools`` (type id -> {key: value})
    and ``stacks``. Returns the delta to the previous checkpoint (0 = none)."""
    cdef Cursor c = Cursor(data, offset, chunk_end)
    cdef Py_ssize_t start = c.pos
    cdef uint64_t size = c.var()
    if size < 2 or size > <uint64_t>(chunk_end - start):
        raise JfrError(f"checkpoint size {size} does not fit the chunk", start)
    c.end = start + <Py_ssize_t>size
    cdef uint64_t etype = c.var()
    if etype != 1:
        raise JfrError(f"expected a checkpoint event (type 1), found type {etype}", start)
    c.var()  # start time
    c.var()  # duration
    cdef int64_t delta = <int64_t>c.var()
    c.u8()   # flush / type mask
    cdef Py_ssize_t npools = c.count("constant pool")
    cdef Py_ssize_t i, k, n
    cdef uint64_t tid
    cdef MetaClass cls
    cdef dict pool
    cdef bint flat
    string_cls = None
    for v in classes.values():
        if (<MetaClass>v).name == "java.lang.String":
            string_cls = (<MetaClass>v).id
            break
    for i in range(npools):
        start = c.pos
        tid = c.var()
        cls_obj = classes.get(tid)
        if cls_obj is None:
            raise JfrError(f"constant pool of undeclared type {tid}", start)
        cls = <MetaClass>cls_obj
        n = c.count("constant pool entry")
        if cls.name == "jdk.types.StackTrace":
            _read_stack_pool(c, cls, classes, string_cls, n, stacks)
            continue
        pool = pools.get(cls.id)
        if pool is None:
            pool = pools[cls.id] = {}
        if cls.name == "java.lang.String":
            for k in range(n):
                key = c.var()
                pool[key] = c.string(string_cls)
            continue
        flat = cls.simple_type and len(cls.fields) == 1
        for k in range(n):
            key = c.var()
            if flat:
                pool[key] = c.value(<MetaField>cls.fields[0], classes, string_cls, 1)
            else:
                pool[key] = c.struct(cls, classes, string_cls, 1)
    return delta


# ---------------------------------------------------------------------------------------------
# event scanning

cdef class Columns:
    """Samples of one chunk as columns (one row per sample event).

    ``kind``: 1 ExecutionSample, 2 WallClockSample, 3 Malloc. ``value``: 1, the
    ``samples`` field, or the allocation size. The ``mem_*`` columns hold
    Malloc and Free events in file order (``mem_row`` = sample row of a
    Malloc, -1 for a Free), for leak detection.
    """
    cdef public array time
    cdef public array thread
    cdef public array stack
    cdef public array state
    cdef public array value
    cdef public array kind
    cdef public array mem_time
    cdef public array mem_address
    cdef public array mem_row

    def __init__(self):
        self.time = array("q")
        self.thread = array("q")
        self.stack = array("q")
        self.state = array("q")
        self.value = array("q")
        self.kind = array("b")
        self.mem_time = array("q")
        self.mem_address = array("q")
        self.mem_row = array("q")

    def __len__(self):
        return len(self.time)


cdef struct Plan:
    int kind          # K_* (0: not a sample type)
    int nops
    int* ops
    int* slots
    bint scalar
    bint allvar       # every field is a varint (the usual layout): the tightest loop


cdef inline int decode_plan(const uint8_t* p, Py_ssize_t* pos, Py_ssize_t end, Plan* pl,
                            int64_t* slots) noexcept nogil:
    """Decodes one sample event's scalar fields by its plan into ``slots``; -1 if malformed."""
    cdef int i, op, slot
    cdef int* slt = pl.slots
    cdef uint64_t v = 0
    if pl.allvar:  # every field a varint: the usual layout, the tightest loop
        for i in range(pl.nops):
            if rd_var_fast(p, pos, end, &v) < 0:
                return -1
            slot = slt[i]
            if slot >= 0:
                slots[slot] = <int64_t>v
        return 0
    for i in range(pl.nops):
        op = pl.ops[i]
        v = 0
        if op == OP_VAR:
            if rd_var(p, pos, end, &v) < 0:
                return -1
        elif op == OP_BYTE:
            if pos[0] >= end:
                return -1
            v = p[pos[0]]
            pos[0] += 1
        elif op == OP_F4:
            if end - pos[0] < 4:
                return -1
            pos[0] += 4
        elif op == OP_F8:
            if end - pos[0] < 8:
                return -1
            pos[0] += 8
        elif skip_string(p, pos, end) < 0:
            return -1
        slot = slt[i]
        if slot >= 0:
            slots[slot] = <int64_t>v
    return 0


cdef struct CountOut:
    Py_ssize_t err_at
    uint64_t err_size
    Py_ssize_t target       # split the fill at the first event at or after this offset
    Py_ssize_t split_at
    Py_ssize_t n_before     # sample rows before split_at
    Py_ssize_t m_before     # memory rows before split_at
    int64_t* cps            # checkpoint offsets (up to max_cp)
    int max_cp
    int n_cp                # may exceed max_cp: then the offsets are incomplete


cdef int _count_pass(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, int64_t* cnt, int64_t* byt,
                     Plan* plans, CountOut* o) noexcept nogil:
    """Pass 1: walk the event frames, counting types below MAX_TYPE_TABLE, finding the
    split point for a two-threaded fill and the checkpoint events.
    Returns 0, or -1 (truncated header), -2 (bad size), -3 (truncated type) with err_at set."""
    cdef Py_ssize_t ev
    cdef uint64_t size = 0, etype = 0
    cdef int kind
    cdef bint before = True
    o.split_at = end
    o.n_before = 0
    o.m_before = 0
    o.n_cp = 0
    while pos < end:
        ev = pos
        if rd_var(p, &pos, end, &size) < 0:
            o.err_at = ev
            return -1
        if size == 0 or size > <uint64_t>(end - ev):
            o.err_at = ev
            o.err_size = size
            return -2
        if rd_var(p, &pos, ev + <Py_ssize_t>size, &etype) < 0:
            o.err_at = ev
            return -3
        if before and ev >= o.target:
            before = False
            o.split_at = ev
        if etype < MAX_TYPE_TABLE:
            cnt[etype] += 1
            byt[etype] += <int64_t>size
            if before:
                kind = plans[etype].kind
                if kind:
                    if kind != K_FREE:
                        o.n_before += 1
                    if kind == K_MALLOC or kind == K_FREE:
                        o.m_before += 1
            if etype == 1:
                if o.n_cp < o.max_cp:
                    o.cps[o.n_cp] = ev
                o.n_cp += 1
        pos = ev + <Py_ssize_t>size
    return 0


cdef inline Py_ssize_t _grow_to(array a, Py_ssize_t extra) except -1:
    cdef Py_ssize_t n0 = len(a)
    resize_smart(a, n0 + extra)
    return n0



cdef struct FillJob:
    const uint8_t* p
    Py_ssize_t pos
    Py_ssize_t end
    Plan* plans
    int64_t* c_time
    int64_t* c_thread
    int64_t* c_stack
    int64_t* c_state
    int64_t* c_value
    signed char* c_kind
    int64_t* m_time
    int64_t* m_addr
    int64_t* m_row
    Py_ssize_t cap_n
    Py_ssize_t cap_m
    Py_ssize_t row_base     # row number of this job's first sample (for m_row)
    Py_ssize_t n            # out: samples written
    Py_ssize_t m            # out: memory events written
    int err                 # out: 0 ok, 1 malformed sample event, 2 more rows than counted
    Py_ssize_t err_at
    uint64_t err_type


cdef void* _fill_job(void* arg) noexcept nogil:
    """Fill the columns from the events of [pos, end), all of whose sample types
    have scalar plans (checked by the caller). Safe to run in parallel on disjoint ranges."""
    cdef FillJob* j = <FillJob*>arg
    cdef const uint8_t* p = j.p
    cdef Py_ssize_t pos = j.pos, end = j.end, ev, ev_end
    cdef uint64_t size = 0, etype = 0, v = 0
    cdef int64_t slots[N_SLOTS]
    cdef int i, kind, op, slot, nops
    cdef int* ops
    cdef int* slt
    cdef Plan* pl
    cdef Py_ssize_t n = 0, m = 0
    cdef bint ok
    while pos < end:
        ev = pos
        rd_var(p, &pos, end, &size)           # validated by the count pass
        ev_end = ev + <Py_ssize_t>size
        rd_var(p, &pos, ev_end, &etype)
        if etype >= MAX_TYPE_TABLE:
            pos = ev_end
            continue
        pl = &j.plans[etype]
        kind = pl.kind
        if kind == 0:
            pos = ev_end
            continue
        slots[S_TIME] = 0
        slots[S_THREAD] = 0
        slots[S_STACK] = 0
        slots[S_STATE] = 0
        slots[S_ADDR] = 0
        slots[S_VALUE] = 0 if kind == K_MALLOC else 1
        if decode_plan(p, &pos, ev_end, pl, slots) < 0:
            j.err = 1
            j.err_at = ev
            j.err_type = etype
            break
        if kind == K_FREE:
            if m >= j.cap_m:
                j.err = 2
                j.err_at = ev
                break
            j.m_time[m] = slots[S_TIME]
            j.m_addr[m] = slots[S_ADDR]
            j.m_row[m] = -1
            m += 1
        else:
            if n >= j.cap_n or (kind == K_MALLOC and m >= j.cap_m):
                j.err = 2
                j.err_at = ev
                break
            j.c_time[n] = slots[S_TIME]
            j.c_thread[n] = slots[S_THREAD]
            j.c_stack[n] = slots[S_STACK]
            j.c_state[n] = slots[S_STATE]
            j.c_value[n] = slots[S_VALUE]
            j.c_kind[n] = <signed char>kind
            if kind == K_MALLOC:
                j.m_time[m] = slots[S_TIME]
                j.m_addr[m] = slots[S_ADDR]
                j.m_row[m] = j.row_base + n
                m += 1
            n += 1
        pos = ev_end
    j.n = n
    j.m = m
    return NULL


cdef bint _parallel_fill(const uint8_t* p, Py_ssize_t start, Py_ssize_t end, Plan* plans, Columns cols,
                         Py_ssize_t base, Py_ssize_t mbase, Py_ssize_t n_total, Py_ssize_t m_total,
                         CountOut* o, list checkpoints) except -1:
    """Fill the columns, with two threads for big chunks (GIL released). Returns False
    when it does not apply (the caller then uses the general path)."""
    cdef Py_ssize_t split_at = o.split_at, n0 = o.n_before, m0 = o.m_before
    cdef int k
    cdef FillJob jobs[2]
    cdef pthread_t th
    cdef bint threaded = False
    if o.n_cp > o.max_cp:
        return False  # very many checkpoints: the general path collects them
    memset(jobs, 0, sizeof(jobs))
    for k in range(2):
        jobs[k].p = p
        jobs[k].plans = plans
    jobs[0].pos = start
    jobs[0].end = split_at
    jobs[1].pos = split_at
    jobs[1].end = end
    jobs[0].row_base = base
    jobs[1].row_base = base + n0
    jobs[0].cap_n = n0
    jobs[0].cap_m = m0
    jobs[1].cap_n = n_total - n0
    jobs[1].cap_m = m_total - m0
    cdef Py_ssize_t offs_n[2]
    cdef Py_ssize_t offs_m[2]
    offs_n[0] = base
    offs_n[1] = base + n0
    offs_m[0] = mbase
    offs_m[1] = mbase + m0
    for k in range(2):
        jobs[k].c_time = <int64_t*>cols.time.data.as_longlongs + offs_n[k]
        jobs[k].c_thread = <int64_t*>cols.thread.data.as_longlongs + offs_n[k]
        jobs[k].c_stack = <int64_t*>cols.stack.data.as_longlongs + offs_n[k]
        jobs[k].c_state = <int64_t*>cols.state.data.as_longlongs + offs_n[k]
        jobs[k].c_value = <int64_t*>cols.value.data.as_longlongs + offs_n[k]
        jobs[k].c_kind = cols.kind.data.as_schars + offs_n[k]
        jobs[k].m_time = <int64_t*>cols.mem_time.data.as_longlongs + offs_m[k]
        jobs[k].m_addr = <int64_t*>cols.mem_address.data.as_longlongs + offs_m[k]
        jobs[k].m_row = <int64_t*>cols.mem_row.data.as_longlongs + offs_m[k]
    with nogil:
        if end - start >= PARALLEL_MIN_BYTES and split_at < end:
            threaded = pthread_create(&th, NULL, _fill_job, &jobs[1]) == 0
        _fill_job(&jobs[0])
        if threaded:
            pthread_join(th, NULL)
        else:
            _fill_job(&jobs[1])
    for k in range(2):
        if jobs[k].err == 1:
            raise JfrError(f"sample event (type {jobs[k].err_type}) is truncated or malformed", jobs[k].err_at)
        if jobs[k].err:
            raise JfrError("internal error: more sample events than counted", jobs[k].err_at)
    if jobs[0].n != n0 or jobs[0].m != m0:
        raise JfrError("internal error: sample events miscounted", start)
    for k in range(o.n_cp):
        checkpoints.append(o.cps[k])
    global _last_fill_threads
    _last_fill_threads = 2 if threaded else 1
    return True


cdef int _last_fill_threads = 0


def set_parallel_min_bytes(Py_ssize_t n):
    """Chunks of at least ``n`` bytes are filled by two threads (default 4 MiB)."""
    global PARALLEL_MIN_BYTES
    PARALLEL_MIN_BYTES = n


def last_fill_threads():
    """Threads used by the last column fill (0: the general, single-threaded path). For tests."""
    return _last_fill_threads


def scan_events(object data, Py_ssize_t start, Py_ssize_t end, dict classes, Columns cols,
                dict counts, list checkpoints, object progress=None, Py_ssize_t progress_step=8 << 20,
                tuple kinds=ALL_KINDS):
    """Scan the events of a chunk in ``[start, end)``.

    Fills ``cols`` with sample events, ``counts`` with ``type id -> [count, bytes]``
    and ``checkpoints`` with the offsets of checkpoint events (type 1).
    ``progress(pos)`` is called every ``progress_step`` bytes. Only sample
    events of ``kinds`` (KIND_* codes) are put into the columns.

    Two passes: the first only walks event frames to count the events per
    type, so that the columns are sized exactly and filled in place by the second.
    """
    cdef Buf buf = _buf(data)
    cdef const uint8_t* p = buf.p
    if end > buf.n or start > end or start < 0:
        raise JfrError("chunk extends past the end of the data", start)
    cdef int64_t* cnt = <int64_t*>calloc(MAX_TYPE_TABLE, sizeof(int64_t))
    cdef int64_t* byt = <int64_t*>calloc(MAX_TYPE_TABLE, sizeof(int64_t))
    cdef Plan* plans = <Plan*>calloc(MAX_TYPE_TABLE, sizeof(Plan))
    cdef int r, i
    cdef MetaClass mc
    cdef CountOut o
    cdef int64_t cps[256]
    if cnt == NULL or byt == NULL or plans == NULL:
        free(cnt); free(byt); free(plans)
        raise MemoryError()
    try:
        big_kinds = {}
        for cid, cobj in classes.items():
            mc = <MetaClass>cobj
            kind = SAMPLE_TYPES.get(mc.name, 0)
            if not kind or kind not in kinds:
                continue
            if isinstance(cid, int) and 0 <= cid < MAX_TYPE_TABLE:
                plans[<int>cid].kind = kind
                plans[<int>cid].nops = mc.nops
                plans[<int>cid].ops = mc.ops
                plans[<int>cid].slots = mc.slots
                plans[<int>cid].scalar = mc.scalar and mc.nops <= 128
                plans[<int>cid].allvar = plans[<int>cid].scalar
                for i in range(mc.nops):
                    if mc.ops[i] != OP_VAR:
                        plans[<int>cid].allvar = False
            else:
                big_kinds[cid] = (kind, cobj)
        memset(&o, 0, sizeof(o))
        o.target = start + (end - start) // 2
        o.cps = cps
        o.max_cp = 256
        with nogil:
            r = _count_pass(p, start, end, cnt, byt, plans, &o)
        if r == -1:
            raise JfrError("truncated event header", o.err_at)
        if r == -2:
            raise JfrError(f"event size {o.err_size} is invalid or exceeds the chunk ({end - o.err_at} bytes left)",
                           o.err_at)
        if r == -3:
            raise JfrError("truncated event type", o.err_at)
        n_samples = 0
        n_mem = 0
        for i in range(MAX_TYPE_TABLE):
            if plans[i].kind and cnt[i]:
                if plans[i].kind != K_FREE:
                    n_samples += cnt[i]
                if plans[i].kind in (K_MALLOC, K_FREE):
                    n_mem += cnt[i]
        if big_kinds:
            # rare: sample types with huge ids; size the columns for the worst case
            n_samples = n_mem = (end - start) // 2 + 1
        base = _grow_to(cols.time, n_samples)
        for a in (cols.thread, cols.stack, cols.state, cols.value, cols.kind):
            _grow_to(a, n_samples)
        mbase = _grow_to(cols.mem_time, n_mem)
        _grow_to(cols.mem_address, n_mem)
        _grow_to(cols.mem_row, n_mem)
        fast = not big_kinds
        for i in range(MAX_TYPE_TABLE):
            if plans[i].kind and cnt[i] and not plans[i].scalar:
                fast = False
        if fast and n_samples == 0 and n_mem == 0 and o.n_cp <= o.max_cp:
            rows = (0, 0)  # nothing to decode: the count pass found the checkpoints
            for i in range(o.n_cp):
                checkpoints.append(o.cps[i])
        elif fast and _parallel_fill(p, start, end, plans, cols, base, mbase, n_samples, n_mem, &o, checkpoints):
            rows = (n_samples, n_mem)
            if progress is not None:
                progress(end)
        else:
            global _last_fill_threads
            _last_fill_threads = 0
            rows = _fill_pass(p, start, end, plans, big_kinds, counts, checkpoints, classes, buf, cols, base,
                              mbase, progress, progress_step)
        # trim to what was filled (only differs on the big-id path)
        for a in (cols.time, cols.thread, cols.stack, cols.state, cols.value, cols.kind):
            resize_smart(a, base + rows[0])
        for a in (cols.mem_time, cols.mem_address, cols.mem_row):
            resize_smart(a, mbase + rows[1])
        for i in range(MAX_TYPE_TABLE):
            if cnt[i]:
                counts[i] = [cnt[i], byt[i]]
    finally:
        free(cnt)
        free(byt)
        free(plans)
    return None


cdef tuple _fill_pass(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, Plan* plans, dict big_kinds,
                      dict counts, list checkpoints, dict classes, object data, Columns cols,
                      Py_ssize_t base, Py_ssize_t mbase, object progress, Py_ssize_t progress_step):
    cdef int64_t* c_time = <int64_t*>cols.time.data.as_longlongs + base
    cdef int64_t* c_thread = <int64_t*>cols.thread.data.as_longlongs + base
    cdef int64_t* c_stack = <int64_t*>cols.stack.data.as_longlongs + base
    cdef int64_t* c_state = <int64_t*>cols.state.data.as_longlongs + base
    cdef int64_t* c_value = <int64_t*>cols.value.data.as_longlongs + base
    cdef signed char* c_kind = cols.kind.data.as_schars + base
    cdef int64_t* m_time = <int64_t*>cols.mem_time.data.as_longlongs + mbase
    cdef int64_t* m_addr = <int64_t*>cols.mem_address.data.as_longlongs + mbase
    cdef int64_t* m_row = <int64_t*>cols.mem_row.data.as_longlongs + mbase
    cdef Py_ssize_t n = 0, m = 0
    cdef Py_ssize_t cap_n = len(cols.time) - base, cap_m = len(cols.mem_time) - mbase
    cdef Py_ssize_t ev, ev_end, next_progress = pos + progress_step
    cdef uint64_t size = 0, etype = 0, v = 0
    cdef int64_t slots[N_SLOTS]
    cdef int i, kind, op, slot, nops
    cdef int* ops
    cdef int* slt
    cdef Plan* pl
    cdef bint ok
    cdef Cursor cur = None
    while pos < end:
        ev = pos
        rd_var(p, &pos, end, &size)           # validated by the count pass
        ev_end = ev + <Py_ssize_t>size
        rd_var(p, &pos, ev_end, &etype)
        pl = NULL
        kind = 0
        if etype < MAX_TYPE_TABLE:
            pl = &plans[etype]
            kind = pl.kind
        elif big_kinds:
            e = counts.get(etype)
            if e is None:
                counts[etype] = [1, size]
            else:
                e[0] += 1
                e[1] += size
            t = big_kinds.get(etype)
            if t is not None:
                kind = t[0]
        if etype == 1:
            checkpoints.append(ev)
        elif kind:
            slots[S_TIME] = slots[S_THREAD] = slots[S_STACK] = slots[S_STATE] = slots[S_ADDR] = 0
            slots[S_VALUE] = 0 if kind == K_MALLOC else 1
            if pl != NULL and (pl.allvar or pl.scalar):
                if decode_plan(p, &pos, ev_end, pl, slots) < 0:
                    raise JfrError(f"sample event (type {etype}) is truncated or malformed", ev)
            else:
                cls = classes[etype] if pl != NULL else big_kinds[etype][1]
                if cur is None:
                    cur = Cursor(data, ev, ev_end)
                cur.pos = pos
                cur.end = ev_end
                for f in (<MetaClass>cls).fields:
                    val = cur.value(<MetaField>f, classes, None, 0)
                    slot = _SLOT_NAMES.get((<MetaField>f).name, -1)
                    if (<MetaField>f).name in ("samples", "size"):
                        slot = S_VALUE
                    if slot >= 0:
                        if isinstance(val, Ref):
                            slots[slot] = (<Ref>val).key
                        elif isinstance(val, int):
                            slots[slot] = val
            if kind == K_FREE:
                if m >= cap_m:
                    raise JfrError("internal error: more memory events than counted", ev)
                m_time[m] = slots[S_TIME]
                m_addr[m] = slots[S_ADDR]
                m_row[m] = -1
                m += 1
            else:
                if n >= cap_n:
                    raise JfrError("internal error: more samples than counted", ev)
                c_time[n] = slots[S_TIME]
                c_thread[n] = slots[S_THREAD]
                c_stack[n] = slots[S_STACK]
                c_state[n] = slots[S_STATE]
                c_value[n] = slots[S_VALUE]
                c_kind[n] = <signed char>kind
                if kind == K_MALLOC:
                    if m >= cap_m:
                        raise JfrError("internal error: more memory events than counted", ev)
                    m_time[m] = slots[S_TIME]
                    m_addr[m] = slots[S_ADDR]
                    m_row[m] = base + n
                    m += 1
                n += 1
        pos = ev_end
        if progress is not None and pos >= next_progress:
            progress(pos)
            next_progress = pos + progress_step
    return (n, m)


def find_events(object data, Py_ssize_t start, Py_ssize_t end, object type_ids):
    """Offsets of the events in ``[start, end)`` whose type is in ``type_ids`` (None = all)."""
    cdef Buf buf = _buf(data)
    cdef const uint8_t* p = buf.p
    if end > buf.n or start < 0:
        raise JfrError("chunk extends past the end of the data", start)
    cdef Py_ssize_t pos = start, ev
    cdef uint64_t size, etype
    cdef array out = array("q")
    while pos < end:
        ev = pos
        if rd_var(p, &pos, end, &size) < 0:
            raise JfrError("truncated event header", ev)
        if size == 0 or size > <uint64_t>(end - ev):
            raise JfrError(f"event size {size} is invalid or exceeds the chunk", ev)
        if rd_var(p, &pos, ev + <Py_ssize_t>size, &etype) < 0:
            raise JfrError("truncated event type", ev)
        if type_ids is None or etype in type_ids:
            push_q(out, ev)
        pos = ev + <Py_ssize_t>size
    return out


def decode_event(object data, Py_ssize_t offset, Py_ssize_t chunk_end, dict classes, object string_type_id):
    """Decode the event at ``offset``: returns ``(type_id, {field: value})``.

    Constant-pool fields come back as :class:`Ref`; fields beyond the end of
    the event (older writers) are left out."""
    cdef Cursor c = Cursor(data, offset, chunk_end)
    cdef uint64_t size = c.var()
    if size == 0 or size > <uint64_t>(chunk_end - offset):
        raise JfrError(f"event size {size} is invalid or exceeds the chunk", offset)
    c.end = offset + <Py_ssize_t>size
    cdef uint64_t etype = c.var()
    cls = classes.get(etype)
    if cls is None:
        raise JfrError(f"event of undeclared type {etype}", offset)
    cdef dict out = {}
    for f in (<MetaClass>cls).fields:
        if c.pos >= c.end:
            break
        out[(<MetaField>f).name] = c.value(<MetaField>f, classes, string_type_id, 0)
    return etype, out


# ---------------------------------------------------------------------------------------------
# aggregation

@cython.final
cdef class _Selector:
    """Which sample rows ``select_rows`` and ``aggregate_select`` keep: the kind
    (1 cpu, 2 wall, 3 nativemem), a tick range and, for ExecutionSamples, the
    thread states that count as CPU (None = all; others are wall-clock)."""
    cdef int kind
    cdef int64_t t0, t1
    cdef object cpu_states
    cdef uint64_t cpu_mask
    cdef bint all_cpu, big_states

    def __cinit__(self, int kind, object cpu_states, int64_t t0, int64_t t1):
        self.kind = kind
        self.t0 = t0
        self.t1 = t1
        self.cpu_states = cpu_states
        self.all_cpu = cpu_states is None
        if not self.all_cpu:
            for s in cpu_states:
                if 0 <= s < 64:
                    self.cpu_mask |= (<uint64_t>1) << <int>s
                else:
                    self.big_states = True

    cdef inline bint keeps(self, signed char k, int64_t tm, int64_t st) except -1:
        cdef bint cpu
        if tm < self.t0 or tm > self.t1:
            return False
        if k != K_EXEC:
            return k == self.kind
        if self.all_cpu:
            cpu = True
        elif 0 <= st < 64:
            cpu = (self.cpu_mask >> st) & 1
        else:
            cpu = self.big_states and st in self.cpu_states
        if self.kind == K_EXEC:
            return cpu
        return self.kind == K_WALL and not cpu


def select_rows(Columns cols, int kind, object cpu_states, int64_t t0, int64_t t1, object threads):
    """Row numbers of the samples of ``kind`` (1 cpu, 2 wall, 3 nativemem) in
    ``[t0, t1]`` ticks, on ``threads`` (a set of thread keys, or None).

    cpu keeps ExecutionSamples whose state is in ``cpu_states`` (None = all);
    wall keeps WallClockSamples and ExecutionSamples whose state is not.
    """
    cdef Py_ssize_t n = len(cols.time), i
    cdef int64_t[:] tm = cols.time
    cdef int64_t[:] th = cols.thread
    cdef int64_t[:] st = cols.state
    cdef signed char[:] kd = cols.kind
    cdef array out = array("q")
    cdef _Selector sel = _Selector(kind, cpu_states, t0, t1)
    for i in range(n):
        if not sel.keeps(kd[i], tm[i], st[i]):
            continue
        if threads is not None and th[i] not in threads:
            continue
        push_q(out, i)
    return out


cdef inline uint64_t _mix(uint64_t x) noexcept nogil:
    x ^= x >> 33
    x *= 0xff51afd7ed558ccdULL
    x ^= x >> 33
    x *= 0xc4ceb9fe1a85ec53ULL
    x ^= x >> 33
    return x


cdef class LeakMap:
    """The last Malloc/Free event per address over a sequence of chunks.

    An allocation is live at the end when its address's last event (chunks in
    order, events by time within a chunk) is a Malloc with a positive size.
    """
    cdef int64_t* keys
    cdef int32_t* chunk
    cdef int64_t* time
    cdef int64_t* row       # malloc sample row, or -1 for a free
    cdef int64_t* seq
    cdef uint8_t* used
    cdef Py_ssize_t cap, n
    cdef public object lo, hi

    def __cinit__(self):
        self.cap = 0
        self.n = 0
        self.keys = NULL
        self.chunk = NULL
        self.time = NULL
        self.row = NULL
        self.seq = NULL
        self.used = NULL
        self.lo = None
        self.hi = None

    def __dealloc__(self):
        free(self.keys); free(self.chunk); free(self.time); free(self.row); free(self.seq); free(self.used)

    cdef int _grow(self) except -1:
        cdef Py_ssize_t oc = self.cap, nc = self.cap * 2 if self.cap else 1 << 16, i, j
        cdef int64_t* k = self.keys
        cdef int32_t* c = self.chunk
        cdef int64_t* t = self.time
        cdef int64_t* r = self.row
        cdef int64_t* q = self.seq
        cdef uint8_t* u = self.used
        self.keys = <int64_t*>malloc(nc * sizeof(int64_t))
        self.chunk = <int32_t*>malloc(nc * sizeof(int32_t))
        self.time = <int64_t*>malloc(nc * sizeof(int64_t))
        self.row = <int64_t*>malloc(nc * sizeof(int64_t))
        self.seq = <int64_t*>malloc(nc * sizeof(int64_t))
        self.used = <uint8_t*>malloc(nc)
        if not (self.keys and self.chunk and self.time and self.row and self.seq and self.used):
            raise MemoryError()
        for i in range(nc):
            self.used[i] = 0
        self.cap = nc
        for i in range(oc):
            if u[i]:
                j = <Py_ssize_t>(_mix(<uint64_t>k[i]) & <uint64_t>(nc - 1))
                while self.used[j]:
                    j = (j + 1) & (nc - 1)
                self.used[j] = 1
                self.keys[j] = k[i]; self.chunk[j] = c[i]; self.time[j] = t[i]; self.row[j] = r[i]
                self.seq[j] = q[i]
        free(k); free(c); free(t); free(r); free(q); free(u)
        return 0

    def add_chunk(self, Columns cols, int chunk_id, int64_t t0, int64_t t1, object threads):
        """Apply a chunk's Malloc/Free events in ``[t0, t1]`` (mallocs only of ``threads``)."""
        cdef Py_ssize_t n = len(cols.mem_time), i, j
        cdef int64_t[:] tm = cols.mem_time
        cdef int64_t[:] ad = cols.mem_address
        cdef int64_t[:] rw = cols.mem_row
        cdef int64_t[:] sth = cols.thread
        cdef int64_t[:] sval = cols.value
        cdef int64_t lo = 0, hi = 0, rr
        cdef bint any_ = False
        cdef uint64_t mask
        for i in range(n):
            if tm[i] < t0 or tm[i] > t1:
                continue
            rr = rw[i]
            if rr >= 0 and threads is not None and sth[rr] not in threads:
                continue
            if rr >= 0 and sval[rr] <= 0:
                rr = -1  # a zero-size malloc counts as a free, as in async-profiler's converter
            if not any_:
                lo = hi = tm[i]
                any_ = True
            elif tm[i] < lo:
                lo = tm[i]
            elif tm[i] > hi:
                hi = tm[i]
            if (self.n + 1) * 2 > self.cap:
                self._grow()
            mask = <uint64_t>(self.cap - 1)
            j = <Py_ssize_t>(_mix(<uint64_t>ad[i]) & mask)
            while self.used[j] and self.keys[j] != ad[i]:
                j = (j + 1) & <Py_ssize_t>mask
            if not self.used[j]:
                self.used[j] = 1
                self.keys[j] = ad[i]
                self.n += 1
            elif self.chunk[j] == chunk_id and (self.time[j] > tm[i] or (self.time[j] == tm[i] and self.seq[j] > i)):
                continue  # a later event of this chunk is already recorded
            self.chunk[j] = chunk_id
            self.time[j] = tm[i]
            self.row[j] = rr
            self.seq[j] = i
        if any_:
            return lo, hi
        return None

    def live(self):
        """``{chunk id: [(sample row, time ticks), ...]}`` of the allocations still live."""
        cdef dict out = {}
        cdef Py_ssize_t i
        for i in range(self.cap):
            if self.used[i] and self.row[i] >= 0:
                lst = out.get(self.chunk[i])
                if lst is None:
                    lst = out[self.chunk[i]] = []
                lst.append((self.row[i], self.time[i]))
        return out


def aggregate(Columns cols, array rows, bint by_thread, bint count_only):
    """Sum the weight of ``rows`` per stack key (or ``(stack, thread)``):
    returns {key: [weight, count]}. With ``count_only`` the weight is the
    number of events."""
    cdef dict out = {}
    cdef Py_ssize_t i, n = len(rows)
    cdef int64_t r
    cdef int64_t[:] rv = rows
    cdef int64_t[:] stk = cols.stack
    cdef int64_t[:] th = cols.thread
    cdef int64_t[:] val = cols.value
    cdef int64_t w
    cdef list e
    for i in range(n):
        r = rv[i]
        if by_thread:
            key = (stk[r], th[r])
        else:
            key = stk[r]
        w = 1 if count_only else val[r]
        e = out.get(key)
        if e is None:
            out[key] = [w, 1]
        else:
            e[0] += w
            e[1] += 1
    return out


cdef class _PairSum:
    """Open-addressing hash map (int64, int64) -> (weight, count)."""
    cdef int64_t* ka
    cdef int64_t* kb
    cdef int64_t* w
    cdef int64_t* c
    cdef uint8_t* used
    cdef Py_ssize_t cap, n

    def __cinit__(self):
        self.cap = 0
        self.n = 0
        self.ka = self.kb = self.w = self.c = NULL
        self.used = NULL

    def __dealloc__(self):
        free(self.ka); free(self.kb); free(self.w); free(self.c); free(self.used)

    cdef int grow(self) except -1:
        cdef Py_ssize_t oc = self.cap, nc = self.cap * 2 if self.cap else 1024, i, j
        cdef int64_t* ka = self.ka
        cdef int64_t* kb = self.kb
        cdef int64_t* w = self.w
        cdef int64_t* c = self.c
        cdef uint8_t* u = self.used
        self.ka = <int64_t*>malloc(nc * sizeof(int64_t))
        self.kb = <int64_t*>malloc(nc * sizeof(int64_t))
        self.w = <int64_t*>malloc(nc * sizeof(int64_t))
        self.c = <int64_t*>malloc(nc * sizeof(int64_t))
        self.used = <uint8_t*>malloc(nc)
        if not (self.ka and self.kb and self.w and self.c and self.used):
            raise MemoryError()
        for i in range(nc):
            self.used[i] = 0
        self.cap = nc
        for i in range(oc):
            if u[i]:
                j = <Py_ssize_t>(_mix(<uint64_t>ka[i] * 31 + <uint64_t>kb[i]) & <uint64_t>(nc - 1))
                while self.used[j]:
                    j = (j + 1) & (nc - 1)
                self.used[j] = 1
                self.ka[j] = ka[i]; self.kb[j] = kb[i]; self.w[j] = w[i]; self.c[j] = c[i]
        free(ka); free(kb); free(w); free(c); free(u)
        return 0

    cdef inline int add(self, int64_t a, int64_t b, int64_t weight) except -1:
        cdef Py_ssize_t j
        if (self.n + 1) * 2 > self.cap:
            self.grow()
        j = <Py_ssize_t>(_mix(<uint64_t>a * 31 + <uint64_t>b) & <uint64_t>(self.cap - 1))
        while self.used[j]:
            if self.ka[j] == a and self.kb[j] == b:
                self.w[j] += weight
                self.c[j] += 1
                return 0
            j = (j + 1) & (self.cap - 1)
        self.used[j] = 1
        self.ka[j] = a
        self.kb[j] = b
        self.w[j] = weight
        self.c[j] = 1
        self.n += 1
        return 0

    cdef dict result(self, bint by_thread):
        cdef dict out = {}
        cdef Py_ssize_t i
        for i in range(self.cap):
            if self.used[i]:
                if by_thread:
                    out[(self.ka[i], self.kb[i])] = [self.w[i], self.c[i]]
                else:
                    out[self.ka[i]] = [self.w[i], self.c[i]]
        return out


def aggregate_select(Columns cols, int kind, object cpu_states, int64_t t0, int64_t t1, object threads,
                     bint by_thread, bint count_only):
    """``aggregate(cols, select_rows(...), by_thread, count_only)`` in one pass."""
    cdef Py_ssize_t n = len(cols.time), i
    if n == 0:
        return {}
    cdef int64_t[:] tm = cols.time
    cdef int64_t[:] th = cols.thread
    cdef int64_t[:] st = cols.state
    cdef int64_t[:] stk = cols.stack
    cdef int64_t[:] val = cols.value
    cdef signed char[:] kd = cols.kind
    cdef _PairSum acc = _PairSum()
    cdef _Selector sel = _Selector(kind, cpu_states, t0, t1)
    for i in range(n):
        if not sel.keeps(kd[i], tm[i], st[i]):
            continue
        if threads is not None and th[i] not in threads:
            continue
        acc.add(stk[i], th[i] if by_thread else 0, 1 if count_only else val[i])
    return acc.result(by_thread)
