/*
 * asprof.context._ctx (issue #15): the per-thread slot the signal handlers read.
 *
 * Each thread has one slot (initial-exec TLS: a plain %fs-relative access, no allocation,
 * usable in a signal handler):
 *
 *   label, ctx   the label-set id active on the thread and the contextvars.Context it was set
 *                in. asprof.context sets them whenever the label ContextVar changes (labels(),
 *                set_labels()) and whenever the event loop switches to another task's context
 *                (the step hook, enter()). The handler returns the label only while the thread
 *                still runs that very Context (PyThreadState.context): a context switch that
 *                was not hooked (a library calling Context.run) yields "no label", never the
 *                label of another task.
 *   samples      samples recorded on this thread: the engines' handlers bump it (hooks.sample).
 *   step_*       the current event-loop step: enter() notes the time and the sample count,
 *                leave() says whether the step is worth recording (a sample was taken during
 *                it, or it lasted at least the threshold: async-profiler records idle threads'
 *                wall samples without interrupting them).
 *
 * Writers of label/ctx run on the slot's own thread (Python code); the only other reader is a
 * signal handler on that same thread: ctx is cleared first and set last, so a handler that
 * interrupts an update sees either the old pair, the new pair, or ctx 0 (no label).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "asprof_ctx.h"

typedef struct {
    volatile uint32_t label;
    volatile uintptr_t ctx;
    volatile uint64_t samples;
    uint64_t step_start, step_end, step_samples;
    uint32_t step_label;
    int tid;
} ctx_slot;

static __thread ctx_slot slot __attribute__((tls_model("initial-exec")));
static uint64_t step_threshold_ns = 1000000000ull;  /* set by the agent: the wall interval */

static inline uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void put_pair(uint32_t label, uintptr_t ctx) {
    ctx_slot *s = &slot;
    s->ctx = 0;
    atomic_signal_fence(memory_order_seq_cst);
    s->label = label;
    atomic_signal_fence(memory_order_seq_cst);
    s->ctx = ctx;
}

/* async-signal-safe: runs in the handler (of the engines, on the thread they interrupted). */
static uint32_t hook_sample(void) {
    ctx_slot *s = &slot;
    s->samples++;
    atomic_signal_fence(memory_order_seq_cst);
    uint32_t label = s->label;
    uintptr_t want = s->ctx;
    if (label == 0 || want == 0) return 0;
    PyThreadState *ts = PyGILState_GetThisThreadState();
    if (ts == NULL || (uintptr_t)ts->context != want) return 0;
    return label;
}

static asprof_ctx_hooks hooks = {ASPROF_CTX_HOOKS_VERSION, hook_sample};

static int label_arg(PyObject *o, uint32_t *out) {
    if (o == Py_None) { *out = 0; return 0; }
    unsigned long v = PyLong_AsUnsignedLong(o);
    if (v == (unsigned long)-1 && PyErr_Occurred()) return -1;
    if (v > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_OverflowError, "label-set id out of range");
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

/* set_label(id): the label of the current thread, in its current Context. */
static PyObject *c_set_label(PyObject *self, PyObject *arg) {
    uint32_t id;
    if (label_arg(arg, &id) != 0) return NULL;
    PyThreadState *ts = PyThreadState_Get();
    put_pair(id, id ? (uintptr_t)ts->context : 0);
    /* a step that started without labels is described by the first ones set during it */
    if (id != 0 && slot.step_label == 0) slot.step_label = id;
    Py_RETURN_NONE;
}

/* The slot after the label ContextVar changed in the current Context (read ts->context after
   the change: a thread's first ContextVar.set creates its Context). */
static inline void slot_follow(uint32_t id) {
    PyThreadState *ts = PyThreadState_Get();
    put_pair(id, id ? (uintptr_t)ts->context : 0);
    if (id != 0 && slot.step_label == 0) slot.step_label = id;
}

/* push_cached(var, cache, key) -> Token, or None: the fast path of asprof.context's push. cache
   is {key: {current label set or None: the label set to push}} (filled by the Python side); on a
   hit: var.set(that set) and the slot follows; a miss changes nothing (the caller computes). */
static PyObject *c_push_cached(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 3 || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "push_cached(var, dict, key)");
        return NULL;
    }
    PyObject *inner = PyDict_GetItemWithError(args[1], args[2]);  /* borrowed */
    if (inner == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    if (!PyDict_CheckExact(inner)) Py_RETURN_NONE;
    PyObject *cur;
    if (PyContextVar_Get(args[0], Py_None, &cur) < 0) return NULL;
    PyObject *ls = PyDict_GetItemWithError(inner, cur);  /* borrowed; the cache holds it */
    Py_DECREF(cur);
    if (ls == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    uint32_t id;
    if (label_arg(ls, &id) != 0) return NULL;
    Py_INCREF(ls);  /* (var.set may run code that clears the cache) */
    PyObject *token = PyContextVar_Set(args[0], ls);
    Py_DECREF(ls);
    if (token == NULL) return NULL;
    slot_follow(id);
    return token;
}

/* pop_token(var, token): var.reset(token), and the slot follows. */
static PyObject *c_pop_token(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "pop_token(var, token)");
        return NULL;
    }
    if (PyContextVar_Reset(args[0], args[1]) < 0) return NULL;
    PyObject *cur;
    if (PyContextVar_Get(args[0], Py_None, &cur) < 0) return NULL;
    uint32_t id;
    int bad = label_arg(cur, &id);
    Py_DECREF(cur);
    if (bad != 0) return NULL;
    slot_follow(id);
    Py_RETURN_NONE;
}

/* enter(ctx, id): an event-loop step is about to run in Context ctx, whose label is id. */
static PyObject *c_enter(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "enter(ctx, id)");
        return NULL;
    }
    uint32_t id;
    if (label_arg(args[1], &id) != 0) return NULL;
    ctx_slot *s = &slot;
    put_pair(id, id && args[0] != Py_None ? (uintptr_t)args[0] : 0);
    s->step_samples = s->samples;
    s->step_label = id;
    s->step_start = mono_ns();
    Py_RETURN_NONE;
}

/* leave() -> bool: the step ends; True when it is worth recording (then see last_step()). */
static PyObject *c_leave(PyObject *self, PyObject *noargs) {
    ctx_slot *s = &slot;
    uint64_t now = mono_ns();
    if (s->samples != s->step_samples || now - s->step_start >= step_threshold_ns) {
        s->step_end = now;
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

/* last_step() -> (tid, start_ns, end_ns, samples, label) of the step leave() said True for; the
   label is the one at its start, else the first set during it. */
static PyObject *c_last_step(PyObject *self, PyObject *noargs) {
    ctx_slot *s = &slot;
    if (s->tid == 0) s->tid = (int)syscall(SYS_gettid);
    return Py_BuildValue("(iKKKk)", s->tid, (unsigned long long)s->step_start, (unsigned long long)s->step_end,
                         (unsigned long long)(s->samples - s->step_samples), (unsigned long)s->step_label);
}

static PyObject *c_set_step_threshold(PyObject *self, PyObject *arg) {
    unsigned long long v = PyLong_AsUnsignedLongLong(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    step_threshold_ns = v;
    Py_RETURN_NONE;
}

/* What a handler interrupting this thread now would record (tests), without counting a sample. */
static PyObject *c_current_label(PyObject *self, PyObject *noargs) {
    ctx_slot *s = &slot;
    uint32_t label = s->label;
    uintptr_t want = s->ctx;
    PyThreadState *ts = PyThreadState_Get();
    if (label == 0 || want == 0 || (uintptr_t)ts->context != want) label = 0;
    return PyLong_FromUnsignedLong(label);
}

static PyObject *c_thread_samples(PyObject *self, PyObject *noargs) {
    return PyLong_FromUnsignedLongLong(slot.samples);
}

/* For tests: what a handler would do (count a sample, return the label), outside a handler. */
static PyObject *c_simulate_sample(PyObject *self, PyObject *noargs) {
    return PyLong_FromUnsignedLong(hook_sample());
}

/* ---- the step hook in C (asprof.context.steps): Handle._run replaced by a method descriptor
   doing enter, the original _run, leave (and, for a step to record, the Python recorder) ---- */

static PyObject *run_orig, *run_var, *run_record, *run_fail, *str_context, *str_get, *str_callback, *str_args,
    *str_run;

/* What Handle._run does, without its Python frame: self._context.run(self._callback, *self._args).
   Returns 1 done, 0 failed (exception set: the caller decides), -1 "not a plain handle" (nothing
   ran: the caller calls the original). */
static PyObject *take_exception(void) {
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v != NULL && tb != NULL) PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
#endif
}

#define RUN_MAX_ARGS 8
static int run_direct(PyObject *self, PyObject *ctx) {
    if (ctx == NULL || !PyContext_CheckExact(ctx)) return -1;
    PyObject *cb = PyObject_GetAttr(self, str_callback);
    if (cb == NULL) {
        PyErr_Clear();
        return -1;
    }
    PyObject *args = PyObject_GetAttr(self, str_args);
    if (args == NULL) PyErr_Clear();
    if (args == NULL || !PyTuple_CheckExact(args) || PyTuple_GET_SIZE(args) > RUN_MAX_ARGS) {
        Py_DECREF(cb);
        Py_XDECREF(args);
        return -1;
    }
    PyObject *vec[RUN_MAX_ARGS + 2];
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    vec[0] = ctx;
    vec[1] = cb;
    for (Py_ssize_t i = 0; i < n; i++) vec[2 + i] = PyTuple_GET_ITEM(args, i);
    PyObject *r = PyObject_VectorcallMethod(str_run, vec, (size_t)(n + 2), NULL);
    Py_DECREF(cb);
    Py_DECREF(args);
    if (r == NULL) return 0;
    Py_DECREF(r);
    return 1;
}

static PyObject *c_handle_run(PyObject *self, PyObject *noargs) {
    PyObject *orig = run_orig, *record = run_record, *fail = run_fail;
    if (orig == NULL) Py_RETURN_NONE;
    Py_INCREF(orig);
    Py_XINCREF(record);
    Py_XINCREF(fail);
    ctx_slot *s = &slot;
    PyObject *ctx = PyObject_GetAttr(self, str_context);
    uint32_t id = 0;
    if (ctx == NULL) {
        PyErr_Clear();
    } else {
        PyObject *ls = PyObject_CallMethodOneArg(ctx, str_get, run_var);
        if (ls == NULL) {
            PyErr_Clear();
        } else {
            if (ls != Py_None && label_arg(ls, &id) != 0) {
                PyErr_Clear();
                id = 0;
            }
            Py_DECREF(ls);
        }
    }
    put_pair(id, id && ctx != NULL ? (uintptr_t)ctx : 0);  /* an identity only: never dereferenced */
    s->step_samples = s->samples;
    s->step_label = id;
    s->step_start = mono_ns();
    /* with a fail handler: the step run here (no Python frame for _run); an exception other than
       SystemExit / KeyboardInterrupt goes to fail(orig, handle, exc), which hands it to the
       original _run's own handling (the loop's exception handler, as without the hook) */
    int done = fail != NULL ? run_direct(self, ctx) : -1;
    Py_XDECREF(ctx);  /* the handle keeps its Context alive for the step */
    PyObject *r;
    if (done == 1) {
        r = Py_NewRef(Py_None);
    } else if (done == 0) {
        r = NULL;
        if (!PyErr_ExceptionMatches(PyExc_SystemExit) && !PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
            PyObject *exc = take_exception();
            if (exc != NULL) {
                PyObject *fargs[3] = {orig, self, exc};
                r = PyObject_Vectorcall(fail, fargs, 3, NULL);
                Py_DECREF(exc);
            }
        }
    } else {
        r = PyObject_CallOneArg(orig, self);
    }
    Py_DECREF(orig);
    Py_XDECREF(fail);
    if (r == NULL) {  /* SystemExit, KeyboardInterrupt: _run lets them through */
        Py_XDECREF(record);
        return NULL;
    }
    Py_DECREF(r);
    if (record != NULL) {
        uint64_t now = mono_ns();
        if (s->samples != s->step_samples || now - s->step_start >= step_threshold_ns) {
            s->step_end = now;
            PyObject *x = PyObject_CallOneArg(record, self);
            if (x == NULL) PyErr_Clear();
            Py_XDECREF(x);
        }
        Py_DECREF(record);
    }
    Py_RETURN_NONE;
}

static PyMethodDef run_def = {"_run", c_handle_run, METH_NOARGS, "asprof's step hook around asyncio's Handle._run"};

/* make_run(handle_type, orig, var, record_or_None[, fail]) -> the descriptor to set as Handle._run.
   fail(orig, handle, exc): with it the step is run in C (see run_direct). */
static PyObject *c_make_run(PyObject *self, PyObject *args) {
    PyObject *type, *orig, *var, *record, *fail = Py_None;
    if (!PyArg_ParseTuple(args, "O!OOO|O:make_run", &PyType_Type, &type, &orig, &var, &record, &fail)) return NULL;
    if (str_context == NULL && (str_context = PyUnicode_InternFromString("_context")) == NULL) return NULL;
    if (str_get == NULL && (str_get = PyUnicode_InternFromString("get")) == NULL) return NULL;
    if (str_callback == NULL && (str_callback = PyUnicode_InternFromString("_callback")) == NULL) return NULL;
    if (str_args == NULL && (str_args = PyUnicode_InternFromString("_args")) == NULL) return NULL;
    if (str_run == NULL && (str_run = PyUnicode_InternFromString("run")) == NULL) return NULL;
    if (fail == Py_None) {
        Py_CLEAR(run_fail);
    } else {
        Py_INCREF(fail);
        Py_XSETREF(run_fail, fail);
    }
    Py_INCREF(orig);
    Py_XSETREF(run_orig, orig);
    Py_INCREF(var);
    Py_XSETREF(run_var, var);
    if (record == Py_None) {
        Py_CLEAR(run_record);
    } else {
        Py_INCREF(record);
        Py_XSETREF(run_record, record);
    }
    return PyDescr_NewMethod((PyTypeObject *)type, &run_def);
}

static void atfork_child(void) { slot.tid = 0; }

static PyMethodDef methods[] = {
    {"set_label", c_set_label, METH_O, "set_label(id): the label-set id of this thread in its current Context"},
    {"push_cached", (PyCFunction)(void (*)(void))c_push_cached, METH_FASTCALL,
     "push_cached(var, cache, key) -> Token or None (a miss): var.set(cache[key][var.get()]), the slot follows"},
    {"pop_token", (PyCFunction)(void (*)(void))c_pop_token, METH_FASTCALL,
     "pop_token(var, token): var.reset(token), the slot follows"},
    {"enter", (PyCFunction)(void (*)(void))c_enter, METH_FASTCALL, "enter(ctx, id): an event-loop step starts"},
    {"leave", c_leave, METH_NOARGS, "leave() -> bool: the step ended; True when it is to be recorded"},
    {"last_step", c_last_step, METH_NOARGS, "last_step() -> (tid, start_ns, end_ns, samples, start label)"},
    {"set_step_threshold", c_set_step_threshold, METH_O, "steps at least this long (ns) are recorded"},
    {"current_label", c_current_label, METH_NOARGS, "the label a sample of this thread would carry now"},
    {"thread_samples", c_thread_samples, METH_NOARGS, "samples recorded on this thread"},
    {"simulate_sample", c_simulate_sample, METH_NOARGS, "tests: what a handler does, outside one"},
    {"make_run", c_make_run, METH_VARARGS, "make_run(handle_type, orig, var, record) -> a Handle._run descriptor"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "asprof.context._ctx",
                                    "The per-thread label and step slot read by the signal handlers.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__ctx(void) {
    PyObject *m = PyModule_Create(&moddef);
    if (m == NULL) return NULL;
    PyObject *cap = PyCapsule_New(&hooks, "asprof.context._ctx._hooks", NULL);
    if (cap == NULL || PyModule_AddObject(m, "_hooks", cap) != 0) {
        Py_XDECREF(cap);
        Py_DECREF(m);
        return NULL;
    }
    pthread_atfork(NULL, NULL, atfork_child);
    return m;
}
