/*
 * asprof._pyframes: the Python side of the Python-frame capture (issue #5).
 *
 *   install(lib_path, native_path, join_mode, max_frames=128, drain_interval_ms=50)
 *   uninstall()
 *   register_thread()      the calling thread: its async-profiler sample counter becomes visible
 *                          to the signal handler (done for threading threads automatically)
 *   sync_modules()         emits (f_globals id -> module name) for code seen in this recording
 *   flush()                drains the per-thread buffers into the active recording now
 *   stats()                counters (dict)
 *   compiled_version       PY_VERSION_HEX this module was built for
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "asprof_ctx.h"
#include "capture.h"
#include "pyframes.h"

#include <dlfcn.h>
#include <link.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- the object kept in each registered thread's state dict ---- */

typedef struct {
    PyObject_HEAD
    int slot;
    int tid;
} Sentinel;

static void sentinel_dealloc(Sentinel *self) {
    /* Runs when the thread's Python state is cleared: on that thread when it ends (before its
       async-profiler data is freed), or at interpreter shutdown. */
    pf_unregister_thread(self->slot, self->tid);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject SentinelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asprof._pyframes._ThreadSentinel",
    .tp_basicsize = sizeof(Sentinel),
    .tp_dealloc = (destructor)sentinel_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
};

static const char SENTINEL_KEY[] = "asprof._pyframes.thread";

static int register_current(void) {
    PyObject *dict = PyThreadState_GetDict();
    if (dict == NULL) return -1;
    int tid = (int)syscall(SYS_gettid);
    PyObject *old = PyDict_GetItemString(dict, SENTINEL_KEY);  /* borrowed */
    if (old != NULL && Py_TYPE(old) == &SentinelType && ((Sentinel *)old)->tid == tid) {
        /* Already registered (e.g. again after a restart): refresh the slot. */
        int slot = pf_register_thread();
        if (slot >= 0) ((Sentinel *)old)->slot = slot;
        return slot;
    }
    int slot = pf_register_thread();
    if (slot < 0) return -1;
    Sentinel *s = PyObject_New(Sentinel, &SentinelType);
    if (s == NULL) {
        PyErr_Clear();
        return slot;
    }
    s->slot = slot;
    s->tid = tid;
    if (PyDict_SetItemString(dict, SENTINEL_KEY, (PyObject *)s) != 0) PyErr_Clear();
    Py_DECREF(s);
    return slot;
}

static PyObject *py_register_thread(PyObject *self, PyObject *unused) {
    if (!pf_installed()) Py_RETURN_FALSE;
    return PyBool_FromLong(register_current() >= 0);
}

static int pending_register(void *arg) {
    (void)arg;
    if (pf_installed()) register_current();
    return 0;
}

/* ---- library lookups ---- */

static void *open_loaded(const char *path, char *err, size_t errlen) {
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL) {
        const char *m = dlerror();
        snprintf(err, errlen, "%s is not loaded: %s", path, m ? m : "?");
    }
    return h;
}

/* csrc/core's session hooks: asp_session_hooks, declared once in csrc/include/asprof_abi.h. */
static asp_set_hooks_fn set_hooks;

/* threading.Thread._bootstrap_inner is wrapped by a C function (bound as a method with
   PyInstanceMethod), so that new threads register themselves before running anything, and no
   extra Python frame appears in their stacks. */
static PyObject *orig_bootstrap;   /* the function we wrapped */
static PyObject *our_bootstrap;    /* the instancemethod we installed */

static PyObject *bootstrap_inner(PyObject *unused, PyObject *thread) {
    if (pf_installed()) register_current();
    if (orig_bootstrap == NULL) Py_RETURN_NONE;
    return PyObject_CallOneArg(orig_bootstrap, thread);
}

static PyMethodDef bootstrap_def = {"_bootstrap_inner", bootstrap_inner, METH_O,
                                    "asprof: registers the thread for Python frames, then runs it."};

static int run_patch(PyObject *module, int install) {
    PyObject *threading = PyImport_ImportModule("threading");
    if (threading == NULL) return -1;
    PyObject *cls = PyObject_GetAttrString(threading, "Thread");
    Py_DECREF(threading);
    if (cls == NULL) return -1;
    PyObject *cls_dict = ((PyTypeObject *)cls)->tp_dict;  /* borrowed */
    PyObject *cur = PyDict_GetItemString(cls_dict, "_bootstrap_inner");  /* borrowed */
    int rc = 0;
    if (install) {
        if (cur != NULL && cur != our_bootstrap) {
            PyObject *fn = PyCFunction_New(&bootstrap_def, NULL);
            PyObject *meth = fn ? PyInstanceMethod_New(fn) : NULL;
            Py_XDECREF(fn);
            if (meth == NULL) rc = -1;
            else {
                Py_INCREF(cur);
                Py_XSETREF(orig_bootstrap, cur);
                if (PyObject_SetAttrString(cls, "_bootstrap_inner", meth) != 0) rc = -1;
                Py_XSETREF(our_bootstrap, meth);
            }
        }
    } else if (cur != NULL && cur == our_bootstrap && orig_bootstrap != NULL) {
        /* orig_bootstrap stays referenced: threads started meanwhile may still call through us. */
        if (PyObject_SetAttrString(cls, "_bootstrap_inner", orig_bootstrap) != 0) rc = -1;
    }
    Py_DECREF(cls);
    return rc;
}

static PyObject *py_install(PyObject *module, PyObject *args, PyObject *kw) {
    static char *names[] = {"lib_path", "native_path", "join_mode", "max_frames", "drain_interval_ms",
                            "timing", NULL};
    const char *lib_path, *native_path;
    int join_mode, max_frames = 128, drain_ms = 50, timing = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ssi|iip", names, &lib_path, &native_path, &join_mode,
                                     &max_frames, &drain_ms, &timing))
        return NULL;
    if (join_mode != PF_JOIN_EXACT && join_mode != PF_JOIN_COUNTER) {
        PyErr_SetString(PyExc_ValueError, "join_mode must be 1 (exact) or 2 (counter)");
        return NULL;
    }
    char err[512];
    if (pf_layout_check(err, sizeof(err)) != 0) {  /* 3.14: the walk's offsets against the interpreter's */
        PyErr_SetString(PyExc_RuntimeError, err);
        return NULL;
    }
    void *lib = open_loaded(lib_path, err, sizeof(err));
    if (lib == NULL) {
        PyErr_SetString(PyExc_OSError, err);
        return NULL;
    }
    void *native = open_loaded(native_path, err, sizeof(err));
    if (native == NULL) {
        PyErr_SetString(PyExc_OSError, err);
        return NULL;
    }
    pf_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.get_tld = (pf_get_tld_fn)dlsym(lib, "asprof_get_thread_local_data");
    cfg.register_event = (pf_register_fn)dlsym(lib, "asprof_register_jfr_event");
    cfg.emit = (pf_emit_fn)dlsym(lib, "asprof_emit_jfr_event");
    set_hooks = (asp_set_hooks_fn)dlsym(native, "asp_session_set_hooks");
    Dl_info info;
    void *exec = dlsym(lib, "asprof_execute");
    if (exec == NULL || dladdr(exec, &info) == 0) {
        PyErr_SetString(PyExc_OSError, "cannot locate asprof_execute in async-profiler");
        return NULL;
    }
    cfg.lib_base = (uintptr_t)info.dli_fbase;
    cfg.join_mode = join_mode;
    cfg.max_frames = max_frames;
    cfg.drain_interval_ms = drain_ms;
    cfg.timing = timing;
    if (cfg.get_tld == NULL || cfg.emit == NULL || cfg.register_event == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "async-profiler lacks asprof_get_thread_local_data or user events (4.1+ needed)");
        return NULL;
    }
    if (set_hooks == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "asprof._native has no session hooks (asp_session_set_hooks)");
        return NULL;
    }
    const char *e;
    Py_BEGIN_ALLOW_THREADS
    e = pf_install(&cfg);
    Py_END_ALLOW_THREADS
    if (e != NULL) {
        PyErr_SetString(PyExc_RuntimeError, e);
        return NULL;
    }
    if (pf_ctx_sample == NULL) {
        /* issue #15: samples carry the thread's label-set id (asprof.context._ctx), when built */
        /* (the module itself: PyCapsule_Import walks attributes, and asprof.context may not be
           an attribute of asprof yet) */
        PyObject *cm = PyImport_ImportModule("asprof.context._ctx");
        PyObject *cap = cm != NULL ? PyObject_GetAttrString(cm, "_hooks") : NULL;
        asprof_ctx_hooks *hk = cap != NULL ? PyCapsule_GetPointer(cap, "asprof.context._ctx._hooks") : NULL;
        if (hk != NULL && hk->version == ASPROF_CTX_HOOKS_VERSION) pf_ctx_sample = hk->sample;
        Py_XDECREF(cap);
        Py_XDECREF(cm);
        PyErr_Clear();
    }
    asp_session_hooks h = {pf_before_start, pf_after_start, pf_before_stop, pf_after_stop,
                      pf_before_flush, pf_after_flush};
    set_hooks(&h);
    register_current();
    Py_AddPendingCall(pending_register, NULL);  /* the main thread, next time it runs Python */
    if (run_patch(module, 1) != 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_uninstall(PyObject *module, PyObject *unused) {
    if (set_hooks != NULL) set_hooks(NULL);
    Py_BEGIN_ALLOW_THREADS
    pf_uninstall();
    Py_END_ALLOW_THREADS
    if (our_bootstrap != NULL && run_patch(module, 0) != 0) PyErr_Clear();
    Py_RETURN_NONE;
}

static PyObject *py_installed(PyObject *m, PyObject *unused) { return PyBool_FromLong(pf_installed()); }

static PyObject *py_flush(PyObject *m, PyObject *unused) {
    Py_BEGIN_ALLOW_THREADS
    pf_flush();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* (globals id -> module name) for the code seen in this recording, from sys.modules. */
static PyObject *py_sync_modules(PyObject *m, PyObject *unused) {
    uintptr_t want[4096];
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = pf_unmapped_globals(want, 4096);
    Py_END_ALLOW_THREADS
    if (n == 0) return PyLong_FromLong(0);
    PyObject *modules = PyImport_GetModuleDict();  /* borrowed */
    PyObject *items = modules ? PyDict_Items(modules) : NULL;
    if (items == NULL) return NULL;
    uintptr_t *gl = PyMem_Malloc(sizeof(uintptr_t) * (size_t)n);
    char **names = PyMem_Malloc(sizeof(char *) * (size_t)n);
    PyObject *keep = PyList_New(0);
    int found = 0;
    if (gl == NULL || names == NULL || keep == NULL) goto done;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items) && found < n; i++) {
        PyObject *pair = PyList_GET_ITEM(items, i);
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *mod = PyTuple_GET_ITEM(pair, 1);
        if (!PyUnicode_Check(name) || !PyModule_Check(mod)) continue;
        PyObject *d = PyModule_GetDict(mod);  /* borrowed */
        if (d == NULL) continue;
        for (int k = 0; k < n; k++) {
            if (want[k] != (uintptr_t)d) continue;
            PyObject *mn = PyObject_GetAttrString(mod, "__name__");
            if (mn == NULL || !PyUnicode_Check(mn)) { PyErr_Clear(); Py_XDECREF(mn); mn = name; Py_INCREF(mn); }
            const char *s = PyUnicode_AsUTF8(mn);
            if (s == NULL) { PyErr_Clear(); Py_DECREF(mn); break; }
            PyList_Append(keep, mn);
            Py_DECREF(mn);
            gl[found] = want[k];
            names[found] = (char *)s;
            found++;
            break;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    pf_emit_modules(gl, (const char *const *)names, found);
    Py_END_ALLOW_THREADS
done:
    Py_DECREF(items);
    Py_XDECREF(keep);
    PyMem_Free(gl);
    PyMem_Free(names);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromLong(found);
}

/* issue #15: label-set ids seen in samples since the last call. */
static PyObject *py_take_labels(PyObject *m, PyObject *unused) {
    uint32_t ids[2048];
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = pf_take_labels(ids, 2048);
    Py_END_ALLOW_THREADS
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLong(ids[i]);
        if (v == NULL) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

/* issue #15: emit_context(kind, payload) -> bool; kind 0 asprof.LabelSet, 1 asprof.Step. */
static PyObject *py_emit_context(PyObject *m, PyObject *args) {
    int kind;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iy*", &kind, &buf)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pf_emit_context(kind, (const uint8_t *)buf.buf, (size_t)buf.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return PyBool_FromLong(rc == 0);
}

static PyObject *py_labels_hooked(PyObject *m, PyObject *unused) { return PyBool_FromLong(pf_ctx_sample != NULL); }

static PyObject *py_stats(PyObject *m, PyObject *unused) {
    pf_stats s;
    pf_get_stats(&s);
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsKsK}",
        "signals", s.signals, "samples", s.samples, "nested", s.nested, "no_python", s.no_python,
        "no_guard", s.no_guard, "masked", s.masked, "ring_full", s.ring_full, "slots_full", s.slots_full,
        "unknown_code", s.unknown_code, "truncated", s.truncated, "emitted_samples", s.emitted_samples,
        "emitted_stacks", s.emitted_stacks, "emitted_defs", s.emitted_defs, "emitted_events", s.emitted_events,
        "emit_errors", s.emit_errors, "lost_boundary", s.lost_boundary, "dropped_inactive", s.dropped_inactive,
        "table_swaps", s.table_swaps, "recordings", s.recordings, "registered", s.registered,
        "chained_signals", s.chained_signals, "recording_samples", s.rec_emitted_samples,
        "unknown_unreadable", s.unknown_unreadable, "unknown_full", s.unknown_full,
        "timed_ns", s.timed_ns, "timed_signals", s.timed, "faults_recovered", s.faults_recovered,
        "guard_reinstalled", s.guard_reinstalled);
}

#ifdef ASPROF_BENCH
static PyObject *py_bench(PyObject *m, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromUnsignedLongLong(pf_bench((int)n));
}
#endif

static PyMethodDef methods[] = {
#ifdef ASPROF_BENCH /* benchmarks/bench_pyframes.py builds its own copy with it */
    {"bench", py_bench, METH_O, "bench(n): ns per capture of the calling thread's stack (best of 5 batches of n)."},
#endif
    {"install", (PyCFunction)(void (*)(void))py_install, METH_VARARGS | METH_KEYWORDS,
     "install(lib_path, native_path, join_mode, max_frames=128, drain_interval_ms=50, timing=False)"},
    {"uninstall", py_uninstall, METH_NOARGS, "Stops capturing Python frames."},
    {"installed", py_installed, METH_NOARGS, "Whether capture is installed in this process."},
    {"register_thread", py_register_thread, METH_NOARGS, "Registers the calling thread."},
    {"flush", py_flush, METH_NOARGS, "Drains captured stacks into the active recording."},
    {"sync_modules", py_sync_modules, METH_NOARGS, "Emits module names of code seen in this recording."},
    {"stats", py_stats, METH_NOARGS, "Counters."},
    {"take_labels", py_take_labels, METH_NOARGS, "Label-set ids seen in samples since the last call (issue #15)."},
    {"emit_context", py_emit_context, METH_VARARGS, "emit_context(kind, payload): asprof.LabelSet (0) / asprof.Step (1)."},
    {"labels_hooked", py_labels_hooked, METH_NOARGS, "Whether samples carry label-set ids (issue #15)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "asprof._pyframes", "Python frames in async-profiler samples (issue #5).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pyframes(void) {
    if (PyType_Ready(&SentinelType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL) return NULL;
    PyModule_AddIntConstant(m, "JOIN_EXACT", PF_JOIN_EXACT);
    PyModule_AddIntConstant(m, "JOIN_COUNTER", PF_JOIN_COUNTER);
    PyModule_AddObject(m, "compiled_version", PyLong_FromUnsignedLong(pf_compiled_version()));
    return m;
}
