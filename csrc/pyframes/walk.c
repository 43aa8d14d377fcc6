/*
 * Walking the Python frames of the interrupted thread, per CPython version.
 *
 * Runs inside a signal handler. Rules kept here:
 *  - no allocation, no locks, no Python API except PyGILState_GetThisThreadState (a
 *    pthread_getspecific; faulthandler calls it from its signal handlers too);
 *  - every read of memory reached through a pointer goes through pf_safe_copy/pf_safe_word, so
 *    a stale pointer (the thread may be interrupted half-way through pushing or popping a frame)
 *    costs a failed read, never a crash;
 *  - every object is type-checked (ob_type compared with &PyCode_Type, &PyUnicode_Type, ...)
 *    before its fields are used; every loop is bounded.
 *
 * Layouts come from the headers of the CPython this file is compiled against (the internal
 * _PyInterpreterFrame needs Py_BUILD_CORE, defined for this translation unit only).
 *
 *   3.9, 3.10   tstate->frame, a PyFrameObject chain (f_back); one eval-loop call per frame
 *   3.11        tstate->cframe->current_frame, _PyInterpreterFrame chain (previous); is_entry
 *               marks the first frame run by a _PyEval_EvalFrameDefault call
 *   3.12        same chain; each eval-loop call pushes an entry frame owned by the C stack
 *   3.13        tstate->current_frame; f_executable (a code object, or None for entry frames)
 *   3.14        f_executable is a tagged _PyStackRef (low bit: deferred reference); the entry frame
 *               is owned by FRAME_OWNED_BY_INTERPRETER (3, the value FRAME_OWNED_BY_CSTACK had
 *               before; CSTACK is now 4 and assigned nowhere); layouts from pycore_interpframe.h,
 *               checked at install against _PyRuntime.debug_offsets (pf_layout_check)
 *
 * Free-threaded builds (Py_GIL_DISABLED) are refused at build time: the walk is not written for
 * their per-thread bytecode and deferred reference counts (setup.py does not compile it there).
 */
#define Py_BUILD_CORE 1
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#if PY_VERSION_HEX >= 0x030B0000
#include <internal/pycore_frame.h>
#endif
#if PY_VERSION_HEX >= 0x030E0000
#include <internal/pycore_interpframe.h>
#include <internal/pycore_runtime.h>
#endif

#include "pyframes.h"

#include <stdio.h>
#include <string.h>

#if PY_VERSION_HEX < 0x03090000 || PY_VERSION_HEX >= 0x030F0000
#error "asprof's frame walker supports CPython 3.9 to 3.14 (setup.py builds it only there)"
#endif
#ifdef Py_GIL_DISABLED
#error "asprof's frame walker does not support the free-threaded build (setup.py leaves it out there)"
#endif

/* The entry frame each _PyEval_EvalFrameDefault call pushes (3.12+). */
#if PY_VERSION_HEX >= 0x030E0000
#define PF_ENTRY_OWNER FRAME_OWNED_BY_INTERPRETER
/* f_executable is a _PyStackRef: the low bit tags a deferred reference; both low bits set is a
   tagged int (never a code object). Masked as PyStackRef_AsPyObjectBorrow does. */
#define PF_EXECUTABLE(fr) ((((fr).f_executable.bits & 3u) == 3u) ? (uintptr_t)0 : ((fr).f_executable.bits & ~(uintptr_t)1))
#elif PY_VERSION_HEX >= 0x030C0000
#define PF_ENTRY_OWNER FRAME_OWNED_BY_CSTACK
#endif

unsigned long pf_compiled_version(void) { return PY_VERSION_HEX; }

void *pf_this_thread_state(void) { return PyGILState_GetThisThreadState(); }

int pf_layout_check(char *why, size_t cap) {
#if PY_VERSION_HEX >= 0x030E0000
    /* The running interpreter describes its own layout for out-of-process profilers
       (_PyRuntime.debug_offsets, the first member of _PyRuntime, stable within a minor
       version). A build against one 3.14.x's headers run by another whose layout moved is
       refused here instead of reading the wrong fields in the handler. */
    const _Py_DebugOffsets *d = &_PyRuntime.debug_offsets;
    if (memcmp(d->cookie, _Py_Debug_Cookie, sizeof(d->cookie)) != 0) {
        snprintf(why, cap, "the interpreter's _PyRuntime.debug_offsets has no debug cookie");
        return -1;
    }
    if ((d->version >> 16) != ((unsigned long)PY_VERSION_HEX >> 16)) {
        snprintf(why, cap, "built for CPython %d.%d, the interpreter says it is 0x%llx", PY_MAJOR_VERSION,
                 PY_MINOR_VERSION, (unsigned long long)d->version);
        return -1;
    }
    if (d->free_threaded) {
        snprintf(why, cap, "the interpreter is a free-threaded build");
        return -1;
    }
    struct { const char *name; uint64_t have; size_t want; } c[] = {
        {"thread_state.current_frame", d->thread_state.current_frame, offsetof(PyThreadState, current_frame)},
        {"interpreter_frame.previous", d->interpreter_frame.previous, offsetof(_PyInterpreterFrame, previous)},
        {"interpreter_frame.executable", d->interpreter_frame.executable, offsetof(_PyInterpreterFrame, f_executable)},
        {"interpreter_frame.instr_ptr", d->interpreter_frame.instr_ptr, offsetof(_PyInterpreterFrame, instr_ptr)},
        {"interpreter_frame.owner", d->interpreter_frame.owner, offsetof(_PyInterpreterFrame, owner)},
        {"interpreter_frame.localsplus", d->interpreter_frame.localsplus, offsetof(_PyInterpreterFrame, localsplus)},
        {"code_object.filename", d->code_object.filename, offsetof(PyCodeObject, co_filename)},
        {"code_object.name", d->code_object.name, offsetof(PyCodeObject, co_name)},
        {"code_object.qualname", d->code_object.qualname, offsetof(PyCodeObject, co_qualname)},
        {"code_object.linetable", d->code_object.linetable, offsetof(PyCodeObject, co_linetable)},
        {"code_object.firstlineno", d->code_object.firstlineno, offsetof(PyCodeObject, co_firstlineno)},
        {"code_object.co_code_adaptive", d->code_object.co_code_adaptive, offsetof(PyCodeObject, co_code_adaptive)},
        {"pyobject.ob_type", d->pyobject.ob_type, offsetof(PyObject, ob_type)},
        {"bytes_object.ob_size", d->bytes_object.ob_size, offsetof(PyVarObject, ob_size)},
        {"bytes_object.ob_sval", d->bytes_object.ob_sval, offsetof(PyBytesObject, ob_sval)},
        {"unicode_object.length", d->unicode_object.length, offsetof(PyASCIIObject, length)},
        {"unicode_object.asciiobject_size", d->unicode_object.asciiobject_size, sizeof(PyASCIIObject)},
    };
    for (size_t i = 0; i < sizeof(c) / sizeof(c[0]); i++) {
        if (c[i].have != (uint64_t)c[i].want) {
            snprintf(why, cap, "this CPython's %s is at %llu, asprof was built for %zu (rebuild asprof for it)",
                     c[i].name, (unsigned long long)c[i].have, c[i].want);
            return -1;
        }
    }
#endif
    (void)why; (void)cap;
    return 0;
}

__attribute__((unused)) static int is_type(uintptr_t obj, PyTypeObject *type) {
    uintptr_t t;
    if (pf_safe_word(obj + offsetof(PyObject, ob_type), &t) != 0) return 0;
    return t == (uintptr_t)type;
}

/* ---- code objects ---- */

/* Reads one int field of a code object (validated as a code object by the caller). */
#define CODE_WORD(code, field, out) pf_safe_word((code) + offsetof(PyCodeObject, field), (out))

static int code_int(uintptr_t code, size_t off, int *out) {
    uintptr_t w;
    uintptr_t at = code + off;
    if (pf_safe_word(at & ~(uintptr_t)7, &w) != 0) return -1;
    unsigned char b[8];
    memcpy(b, &w, 8);
    memcpy(out, b + (at & 7), sizeof(int));  /* ints are 4-aligned: never straddle a word */
    return 0;
}

static int is_code(uintptr_t code) {
    uintptr_t t;
    return pf_safe_word(code + offsetof(PyObject, ob_type), &t) == 0 && t == (uintptr_t)&PyCode_Type;
}

int pf_code_info(uintptr_t code, pf_codeinfo *ci) {
    /* Only the fields needed, word by word (a code object's head is ~200 bytes). */
    if (!is_code(code)) return -1;
    if (CODE_WORD(code, co_name, &ci->name) != 0 || CODE_WORD(code, co_filename, &ci->filename) != 0)
        return -1;
#if PY_VERSION_HEX >= 0x030B0000
    if (CODE_WORD(code, co_qualname, &ci->qualname) != 0 || CODE_WORD(code, co_linetable, &ci->linetable) != 0)
        return -1;
#elif PY_VERSION_HEX >= 0x030A0000
    ci->qualname = ci->name;
    if (CODE_WORD(code, co_linetable, &ci->linetable) != 0) return -1;
#else
    ci->qualname = ci->name;
    if (CODE_WORD(code, co_lnotab, &ci->linetable) != 0) return -1;
#endif
    int first;
    if (code_int(code, offsetof(PyCodeObject, co_firstlineno), &first) != 0) return -1;
    ci->firstlineno = first;
    return 0;
}

/* ---- strings ---- */

static int utf8_put(char *buf, int cap, int n, uint32_t c) {
    char tmp[4];
    int k;
    if (c < 0x80) { tmp[0] = (char)c; k = 1; }
    else if (c < 0x800) { tmp[0] = (char)(0xC0 | (c >> 6)); tmp[1] = (char)(0x80 | (c & 0x3F)); k = 2; }
    else if (c < 0x10000) {
        if (c >= 0xD800 && c <= 0xDFFF) c = 0xFFFD;  /* lone surrogate */
        tmp[0] = (char)(0xE0 | (c >> 12)); tmp[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        tmp[2] = (char)(0x80 | (c & 0x3F)); k = 3;
    } else if (c < 0x110000) {
        tmp[0] = (char)(0xF0 | (c >> 18)); tmp[1] = (char)(0x80 | ((c >> 12) & 0x3F));
        tmp[2] = (char)(0x80 | ((c >> 6) & 0x3F)); tmp[3] = (char)(0x80 | (c & 0x3F)); k = 4;
    } else return -1;
    if (n + k > cap) return -1;
    memcpy(buf + n, tmp, (size_t)k);
    return n + k;
}

int pf_read_str(uintptr_t str, char *buf, int cap) {
    PyCompactUnicodeObject u;
    if (pf_safe_copy(&u, str, sizeof(u)) != 0) return -1;
    if ((uintptr_t)Py_TYPE((PyObject *)&u) != (uintptr_t)&PyUnicode_Type) return -1;
    if (!u._base.state.compact) return -1;
#if PY_VERSION_HEX < 0x030C0000
    if (!u._base.state.ready) return -1;
#endif
    Py_ssize_t len = u._base.length;
    if (len < 0 || len > (1 << 20)) return -1;
    if (u._base.state.ascii) {
        int n = len > cap ? cap : (int)len;
        if (pf_safe_copy(buf, str + sizeof(PyASCIIObject), (size_t)n) != 0) return -1;
        return n;
    }
    unsigned kind = u._base.state.kind;
    if (kind != 1 && kind != 2 && kind != 4) return -1;
    uintptr_t data = str + sizeof(PyCompactUnicodeObject);
    int n = 0;
    unsigned char chunk[64];
    Py_ssize_t i = 0;
    while (i < len) {
        Py_ssize_t take = (Py_ssize_t)(sizeof(chunk) / kind);
        if (take > len - i) take = len - i;
        if (pf_safe_copy(chunk, data + (uintptr_t)(i * kind), (size_t)(take * kind)) != 0) return -1;
        for (Py_ssize_t j = 0; j < take; j++) {
            uint32_t c;
            if (kind == 1) c = chunk[j];
            else if (kind == 2) { uint16_t v; memcpy(&v, chunk + j * 2, 2); c = v; }
            else { uint32_t v; memcpy(&v, chunk + j * 4, 4); c = v; }
            int m = utf8_put(buf, cap, n, c);
            if (m < 0) return n;  /* full: cut at a character boundary */
            n = m;
        }
        i += take;
    }
    return n;
}

int pf_bytes_size(uintptr_t bytes, size_t *out) {
    PyBytesObject b;
    if (pf_safe_copy(&b, bytes, offsetof(PyBytesObject, ob_sval)) != 0) return -1;
    if ((uintptr_t)Py_TYPE((PyObject *)&b) != (uintptr_t)&PyBytes_Type) return -1;
    if (Py_SIZE((PyObject *)&b) < 0) return -1;
    *out = (size_t)Py_SIZE((PyObject *)&b);
    return 0;
}

int pf_read_bytes(uintptr_t bytes, uint8_t *buf, int cap) {
    PyBytesObject b;
    if (pf_safe_copy(&b, bytes, offsetof(PyBytesObject, ob_sval)) != 0) return -1;
    if ((uintptr_t)Py_TYPE((PyObject *)&b) != (uintptr_t)&PyBytes_Type) return -1;
    Py_ssize_t n = Py_SIZE((PyObject *)&b);
    if (n < 0 || n > cap) return -1;
    if (pf_safe_copy(buf, bytes + offsetof(PyBytesObject, ob_sval), (size_t)n) != 0) return -1;
    return (int)n;
}

/* ---- line tables (decoders written from the format descriptions in CPython's
   Objects/lnotab_notes.txt and Objects/locations.md) ---- */

#if PY_VERSION_HEX >= 0x030B0000
static unsigned read_varint(const uint8_t *t, int len, int *i) {
    unsigned val = 0, shift = 0;
    while (*i < len) {
        uint8_t b = t[(*i)++];
        val |= (unsigned)(b & 63) << shift;
        if (!(b & 64) || shift > 24) break;
        shift += 6;
    }
    return val;
}
static int read_svarint(const uint8_t *t, int len, int *i) {
    unsigned u = read_varint(t, len, i);
    return (u & 1) ? -(int)(u >> 1) : (int)(u >> 1);
}
#endif

int pf_addr2line(const uint8_t *t, int len, int firstlineno, int lasti) {
    if (lasti < 0 || t == NULL) return firstlineno;
#if PY_VERSION_HEX >= 0x030B0000
    /* Location table; lasti in code units. */
    int line = firstlineno, pos = 0, i = 0;
    while (i < len) {
        uint8_t b = t[i++];
        if (!(b & 128)) continue;  /* not at an entry start: resync */
        int code = (b >> 3) & 15, n = (b & 7) + 1, here = line;
        if (code == 15) here = -1;
        else if (code == 14) {
            line += read_svarint(t, len, &i); here = line;
            read_varint(t, len, &i); read_varint(t, len, &i); read_varint(t, len, &i);
        } else if (code == 13) { line += read_svarint(t, len, &i); here = line; }
        else if (code >= 10) { line += code - 10; here = line; i += 2; }
        else { i += 1; }
        if (lasti >= pos && lasti < pos + n) return here < 0 ? 0 : here;
        pos += n;
    }
    return line;
#elif PY_VERSION_HEX >= 0x030A0000
    /* co_linetable: (bytes delta, signed line delta) pairs, -128 = no line; addresses in bytes. */
    int addr = lasti * 2, start = 0, line = firstlineno, result = -1;
    for (int i = 0; i + 1 < len; i += 2) {
        int end = start + t[i];
        int ld = (int8_t)t[i + 1];
        int here;
        if (ld == -128) here = -1;
        else { line += ld; here = line; }
        if (end > start && addr >= start && addr < end) { result = here; break; }
        start = end;
    }
    return result < 0 ? 0 : result;
#else
    /* co_lnotab: (bytes delta, signed line delta) pairs; lasti in bytes. */
    int line = firstlineno, addr = 0;
    for (int i = 0; i + 1 < len; i += 2) {
        addr += t[i];
        if (addr > lasti) break;
        line += (int8_t)t[i + 1];
    }
    return line;
#endif
}

/* ---- the walk ---- */

#define MAX_WALK 4096  /* frames visited at most (skipped ones included): bounds a corrupt chain */

static void put(pf_rawframe *out, int *n, uintptr_t code, int32_t lasti, uint32_t flags, uintptr_t globals) {
    out[*n].code = code;
    out[*n].lasti = lasti;
    out[*n].flags = flags;
    out[*n].globals = globals;
    (*n)++;
}

int pf_walk(void *tstate_ptr, pf_rawframe *out, int max, int max_frames, int *truncated) {
    uintptr_t ts = (uintptr_t)tstate_ptr;
    int n = 0, frames = 0;
    *truncated = 0;
    if (ts == 0 || max <= 0) return 0;
#if PY_VERSION_HEX < 0x030B0000
    uintptr_t f;
    if (pf_safe_word(ts + offsetof(PyThreadState, frame), &f) != 0) return 0;
    for (int visited = 0; f != 0 && visited < MAX_WALK; visited++) {
        PyFrameObject fr;
        if (pf_safe_copy(&fr, f, offsetof(PyFrameObject, f_localsplus)) != 0) break;
        if ((uintptr_t)Py_TYPE((PyObject *)&fr) != (uintptr_t)&PyFrame_Type) break;
        if (n + 2 > max || frames >= max_frames) { *truncated = 1; break; }
        uintptr_t code = (uintptr_t)fr.f_code;
        if (is_type(code, &PyCode_Type)) {
            frames++;
            put(out, &n, code, fr.f_lasti, 0, (uintptr_t)fr.f_globals);
            put(out, &n, 0, 0, PF_FRAME_BOUNDARY, 0);  /* one eval-loop call per frame */
        }
        f = (uintptr_t)fr.f_back;
    }
#else
    uintptr_t f;
#if PY_VERSION_HEX >= 0x030D0000
    if (pf_safe_word(ts + offsetof(PyThreadState, current_frame), &f) != 0) return 0;
#else
    uintptr_t cframe;
    if (pf_safe_word(ts + offsetof(PyThreadState, cframe), &cframe) != 0) return 0;
    if (cframe == 0 || pf_safe_word(cframe + offsetof(_PyCFrame, current_frame), &f) != 0) return 0;
#endif
    for (int visited = 0; f != 0 && visited < MAX_WALK; visited++) {
        _PyInterpreterFrame fr;
        if (pf_safe_copy(&fr, f, offsetof(_PyInterpreterFrame, localsplus)) != 0) break;
        if (n + 2 > max) { *truncated = 1; break; }
#if PY_VERSION_HEX >= 0x030C0000
        if (fr.owner == PF_ENTRY_OWNER) {
            /* The entry frame of a _PyEval_EvalFrameDefault call: the Python frames walked
               since the previous boundary ran in that call. */
            put(out, &n, 0, 0, PF_FRAME_BOUNDARY, 0);
            f = (uintptr_t)fr.previous;
            continue;
        }
#endif
#if PY_VERSION_HEX >= 0x030E0000
        if (fr.owner > FRAME_OWNED_BY_INTERPRETER) {  /* not a Python frame (incomplete by definition) */
            f = (uintptr_t)fr.previous;
            continue;
        }
        uintptr_t code = PF_EXECUTABLE(fr);
        uintptr_t instr = (uintptr_t)fr.instr_ptr;
#elif PY_VERSION_HEX >= 0x030D0000
        uintptr_t code = (uintptr_t)fr.f_executable;
        uintptr_t instr = (uintptr_t)fr.instr_ptr;
#else
        uintptr_t code = (uintptr_t)fr.f_code;
        uintptr_t instr = (uintptr_t)fr.prev_instr;
#endif
        int firsttraceable;
        if (is_code(code) && code_int(code, offsetof(PyCodeObject, _co_firsttraceable), &firsttraceable) == 0) {
            uintptr_t first = code + offsetof(PyCodeObject, co_code_adaptive);
            /* A frame pushed but not yet started (faulthandler skips these too). */
            int incomplete = fr.owner != FRAME_OWNED_BY_GENERATOR &&
                             instr < first + (uintptr_t)firsttraceable * sizeof(_Py_CODEUNIT);
            if (!incomplete && frames >= max_frames) { *truncated = 1; break; }
            if (!incomplete) {
                frames++;
                intptr_t lasti = instr >= first ? (intptr_t)((instr - first) / sizeof(_Py_CODEUNIT)) : -1;
                if (lasti > INT32_MAX) lasti = -1;
                put(out, &n, code, (int32_t)lasti, 0, (uintptr_t)fr.f_globals);
            }
        }
#if PY_VERSION_HEX < 0x030C0000
        if (fr.is_entry) put(out, &n, 0, 0, PF_FRAME_BOUNDARY, 0);
#endif
        f = (uintptr_t)fr.previous;
    }
#endif
    if (f != 0 && !*truncated) *truncated = 1;  /* stopped early (bad read or too long) */
    return n;
}
