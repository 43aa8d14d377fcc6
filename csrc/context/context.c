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
#include <structmember.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "asprof_ctx.h"

#if PY_VERSION_HEX < 0x030A0000
static inline PyObject *Py_NewRef(PyObject *o) {
    Py_INCREF(o);
    return o;
}
#endif

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

/* CLOCK_MONOTONIC_COARSE: the same clock at the last tick (a few ns to read, against ~35 for
   CLOCK_MONOTONIC on a VM). It lags the fine clock by up to a tick: twice its resolution is the
   margin (0: not usable, the fine clock is read). */
static uint64_t coarse_margin_ns;

static void coarse_init(void) {
    struct timespec res;
    if (clock_getres(CLOCK_MONOTONIC_COARSE, &res) == 0 && res.tv_sec == 0 && res.tv_nsec > 0)
        coarse_margin_ns = 2ull * (uint64_t)res.tv_nsec;
}

/* At the end of a step: worth recording (a sample of the thread was taken during it, or it
   lasted at least the threshold)? Then step_end is set. A step without a sample that is surely
   shorter than the threshold costs a coarse clock read only. */
static inline int step_worth(ctx_slot *s) {
    if (s->samples == s->step_samples && coarse_margin_ns != 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
        uint64_t c = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
        if (c + coarse_margin_ns < s->step_start + step_threshold_ns) return 0;
    }
    uint64_t now = mono_ns();
    if (s->samples != s->step_samples || now - s->step_start >= step_threshold_ns) {
        s->step_end = now;
        return 1;
    }
    return 0;
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

/* var.set(ls) (ls: a label set from the pushes' caches) and the slot follows: the new Token. */
static PyObject *push_set(PyObject *var, PyObject *ls) {
    uint32_t id;
    if (label_arg(ls, &id) != 0) return NULL;
    Py_INCREF(ls); /* (var.set may run code that clears the cache holding it) */
    PyObject *token = PyContextVar_Set(var, ls);
    Py_DECREF(ls);
    if (token != NULL) slot_follow(id);
    return token;
}

/* The slot follows var's value in the current Context (after a reset): 0, or -1 with an error. */
static int follow_var(PyObject *var) {
    PyObject *cur;
    if (PyContextVar_Get(var, Py_None, &cur) < 0) return -1;
    uint32_t id;
    int bad = label_arg(cur, &id);
    Py_DECREF(cur);
    if (bad != 0) return -1;
    slot_follow(id);
    return 0;
}

/* The label-set id of a value of the label ContextVar (0: none, or not an id). */
static uint32_t label_of(PyObject *ls) {
    uint32_t id = 0;
    if (ls != Py_None && label_arg(ls, &id) != 0) {
        PyErr_Clear();
        id = 0;
    }
    return id;
}

/* A step starts: the slot gets its labels and Context (an identity only: never dereferenced),
   the thread's sample count and the time. */
static inline void step_begin(uint32_t id, uintptr_t ctx) {
    ctx_slot *s = &slot;
    put_pair(id, id ? ctx : 0);
    s->step_samples = s->samples;
    s->step_label = id;
    s->step_start = mono_ns();
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
    return push_set(args[0], ls);
}

/* pop_token(var, token): var.reset(token), and the slot follows. */
static PyObject *c_pop_token(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "pop_token(var, token)");
        return NULL;
    }
    if (PyContextVar_Reset(args[0], args[1]) < 0 || follow_var(args[0]) < 0) return NULL;
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
    step_begin(id, args[0] != Py_None ? (uintptr_t)args[0] : 0);
    Py_RETURN_NONE;
}

/* leave() -> bool: the step ends; True when it is worth recording (then see last_step()). */
static PyObject *c_leave(PyObject *self, PyObject *noargs) {
    if (step_worth(&slot)) Py_RETURN_TRUE;
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

/* Handle's attributes read from its slots (asyncio.events.Handle has __slots__: member
   descriptors at fixed offsets) instead of three attribute lookups per step; for Handle and the
   subclasses whose three attributes are Handle's own slots (TimerHandle), else the lookups. */
static Py_ssize_t off_context = -1, off_callback = -1, off_args = -1;
#define FAST_TYPES 4
static PyTypeObject *fast_types[FAST_TYPES], *slow_types[FAST_TYPES];

static Py_ssize_t member_offset(PyObject *type, const char *name) {
    PyObject *d = PyObject_GetAttrString(type, name);
    if (d == NULL) {
        PyErr_Clear();
        return -1;
    }
    Py_ssize_t off = -1;
    if (Py_TYPE(d) == &PyMemberDescr_Type) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type == T_OBJECT_EX && !(m->flags & READONLY)) off = m->offset;
    }
    Py_DECREF(d);
    return off;
}

static int fast_handle(PyTypeObject *tp) {
    for (int i = 0; i < FAST_TYPES; i++) {
        if (fast_types[i] == tp) return 1;
        if (slow_types[i] == tp) return 0;
    }
    PyObject *t = (PyObject *)tp;
    int ok = off_args >= 0 && member_offset(t, "_context") == off_context &&
             member_offset(t, "_callback") == off_callback && member_offset(t, "_args") == off_args;
    PyTypeObject **cache = ok ? fast_types : slow_types;
    for (int i = 0; i < FAST_TYPES; i++) {
        if (cache[i] == NULL) {
            Py_INCREF(t);
            cache[i] = tp;
            break;
        }
    }
    return ok;
}

#define SLOT_AT(o, off) (*(PyObject **)((char *)(o) + (off)))

/* The step of a plain handle run here: enter its Context, the slot gets the Context's labels,
   the callback, exit (what Context.run does). 1 done, 0 failed (exception set). */
static int run_fast(PyObject *ctx, PyObject *cb, PyObject *args) {
    uint32_t id = 0;
    int entered = PyContext_Enter(ctx) == 0;
    if (entered) {
        PyObject *ls = NULL;
        if (PyContextVar_Get(run_var, NULL, &ls) < 0) {
            PyErr_Clear();
        } else if (ls != NULL) {
            id = label_of(ls);
            Py_DECREF(ls);
        }
    }
    step_begin(id, (uintptr_t)ctx);
    if (!entered) return 0; /* (as Context.run: "cannot enter context", to the loop's handler) */
    PyObject *r = PyObject_Vectorcall(cb, &PyTuple_GET_ITEM(args, 0), (size_t)PyTuple_GET_SIZE(args), NULL);
    if (PyContext_Exit(ctx) < 0) Py_CLEAR(r);
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
    int done = -1;
    if (fail != NULL && off_args >= 0 && fast_handle(Py_TYPE(self))) {
        PyObject *ctx = SLOT_AT(self, off_context), *cb = SLOT_AT(self, off_callback),
                 *args = SLOT_AT(self, off_args);
        if (ctx != NULL && cb != NULL && args != NULL && PyContext_CheckExact(ctx) && PyTuple_CheckExact(args)) {
            /* (held: the callback may cancel its own handle, which clears them) */
            Py_INCREF(ctx);
            Py_INCREF(cb);
            Py_INCREF(args);
            done = run_fast(ctx, cb, args);
            Py_DECREF(ctx);
            Py_DECREF(cb);
            Py_DECREF(args);
        }
    }
    if (done < 0) {
        PyObject *ctx = PyObject_GetAttr(self, str_context);
        uint32_t id = 0;
        if (ctx == NULL) {
            PyErr_Clear();
        } else {
            PyObject *ls = PyObject_CallMethodOneArg(ctx, str_get, run_var);
            if (ls == NULL) {
                PyErr_Clear();
            } else {
                id = label_of(ls);
                Py_DECREF(ls);
            }
        }
        step_begin(id, (uintptr_t)ctx);
        /* with a fail handler: the step run here (no Python frame for _run); an exception other
           than SystemExit / KeyboardInterrupt goes to fail(orig, handle, exc), which hands it to
           the original _run's own handling (the loop's exception handler, as without the hook) */
        done = fail != NULL ? run_direct(self, ctx) : -1;
        Py_XDECREF(ctx); /* the handle keeps its Context alive for the step */
    }
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
    if (r == NULL) { /* SystemExit, KeyboardInterrupt: _run lets them through */
        Py_XDECREF(record);
        return NULL;
    }
    Py_DECREF(r);
    if (record != NULL) {
        if (step_worth(s)) {
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
    off_context = member_offset(type, "_context");
    off_callback = member_offset(type, "_callback");
    off_args = member_offset(type, "_args");
    if (off_context < 0 || off_callback < 0) off_args = -1; /* (off_args >= 0: the fast path is on) */
    for (int i = 0; i < FAST_TYPES; i++) {
        Py_CLEAR(fast_types[i]);
        Py_CLEAR(slow_types[i]);
    }
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

/* ---- the ASGI labels middleware's call in C (asprof.context.middleware.ASGILabels) ----
   An empty request costs tens of microseconds: a Python coroutine frame for the middleware, its
   attribute reads and its try/finally were a few percent of it. Here the middleware's call
   returns a small awaitable that, when first resumed (in the context that awaits it, as the
   body of an `async def` would), pushes the request's labels (one cached lookup, a
   ContextVar.set), calls the application and drives its awaitable, and pops the labels (the
   ContextVar.reset) when it ends, however it ends. */

/* After an iterator gave NULL: 0 and *res its return value (StopIteration's value, None when no
   exception is set), or -1 with another exception left set. */
static int fetch_stop_value(PyObject **res) {
    *res = NULL;
    if (!PyErr_Occurred()) {
        *res = Py_NewRef(Py_None);
        return 0;
    }
    if (!PyErr_ExceptionMatches(PyExc_StopIteration)) return -1;
    PyObject *exc = take_exception();
    if (exc == NULL) {
        *res = Py_NewRef(Py_None);
        return 0;
    }
    *res = PyObject_GetAttrString(exc, "value");
    Py_DECREF(exc);
    return *res != NULL ? 0 : -1;
}

#if PY_VERSION_HEX < 0x030A0000
#define PYGEN_RETURN 0
#define PYGEN_ERROR (-1)
#define PYGEN_NEXT 1
#endif

static PyObject *mw_var, *mw_keyed, *mw_miss, *mw_plain, *mw_ckey;
static PyObject *str_type, *str_http, *str_websocket, *str_route, *str_path, *str_method, *str_throw, *str_close,
    *str_send, *str_endpoint;

typedef struct {
    PyObject_HEAD
    PyObject *app, *route, *key, *method, *ckey;
    vectorcallfunc vectorcall;
    int with_method;
} asgi_mw;

typedef struct {
    PyObject_HEAD
    asgi_mw *mw;
    PyObject *scope, *receive, *send; /* until started */
    PyObject *it;                     /* the application's awaitable, as an iterator */
    PyObject *token;                  /* the labels pushed (NULL: none) */
    int state;                        /* 0 created, 1 started, 2 ended */
    int running;
    int label;                        /* an HTTP / WebSocket request: labelled */
} asgi_call;

static PyTypeObject asgi_call_type;

/* send arg into an iterator: PYGEN_NEXT (*res yielded), PYGEN_RETURN (*res returned), PYGEN_ERROR */
static int iter_send(PyObject *it, PyObject *arg, PyObject **res) {
#if PY_VERSION_HEX >= 0x030A0000
    return (int)PyIter_Send(it, arg, res);
#else
    PyObject *r;
    if (arg == Py_None && Py_TYPE(it)->tp_iternext != NULL)
        r = Py_TYPE(it)->tp_iternext(it);
    else
        r = PyObject_CallMethodObjArgs(it, str_send, arg, NULL);
    if (r != NULL) {
        *res = r;
        return PYGEN_NEXT;
    }
    *res = NULL;
    if (fetch_stop_value(res) == 0) return PYGEN_RETURN;
    return PYGEN_ERROR;
#endif
}

/* What `await o` iterates (as CPython's _PyCoro_GetAwaitableIter). */
static PyObject *await_iter(PyObject *o) {
    if (PyCoro_CheckExact(o)) return Py_NewRef(o);
    unaryfunc getter = Py_TYPE(o)->tp_as_async != NULL ? Py_TYPE(o)->tp_as_async->am_await : NULL;
    if (getter == NULL) {
        if (PyGen_CheckExact(o)) return Py_NewRef(o); /* a @types.coroutine generator */
        PyErr_Format(PyExc_TypeError, "'%.100s' object can't be awaited", Py_TYPE(o)->tp_name);
        return NULL;
    }
    PyObject *r = getter(o);
    if (r == NULL) return NULL;
    if (PyCoro_CheckExact(r) || !PyIter_Check(r)) {
        PyErr_Format(PyExc_TypeError, "__await__() returned %s of type '%.100s'",
                     PyCoro_CheckExact(r) ? "a coroutine" : "non-iterator", Py_TYPE(r)->tp_name);
        Py_DECREF(r);
        return NULL;
    }
    return r;
}

/* scope[key] (new reference), NULL without an error when absent */
static PyObject *scope_get(PyObject *scope, PyObject *key) {
    if (PyDict_CheckExact(scope)) {
        PyObject *v = PyDict_GetItemWithError(scope, key);
        Py_XINCREF(v);
        return v;
    }
    PyObject *v = PyObject_GetItem(scope, key);
    if (v == NULL && PyErr_ExceptionMatches(PyExc_KeyError)) PyErr_Clear();
    return v;
}

/* d[k] when d is a dict and k is there (borrowed), else NULL (no error) */
static PyObject *dict_at(PyObject *d, PyObject *k) {
    if (d == NULL || !PyDict_CheckExact(d)) return NULL;
    PyObject *v = PyDict_GetItemWithError(d, k);
    if (v == NULL) PyErr_Clear();
    return v;
}

/* The request's labels pushed: a new token, NULL with an error set. */
static PyObject *asgi_push(asgi_mw *mw, PyObject *scope) {
    PyObject *route = NULL, *method;
    if (mw->route == mw_plain) {
        int has = PyDict_CheckExact(scope) ? PyDict_Contains(scope, str_route) : PyMapping_HasKey(scope, str_route);
        if (has < 0) return NULL;
        if (!has) {
            route = scope_get(scope, str_path);
            if (route == NULL && PyErr_Occurred()) return NULL;
            if (route != NULL && (!PyUnicode_CheckExact(route) || PyUnicode_GET_LENGTH(route) == 0)) Py_CLEAR(route);
        }
    }
    if (route == NULL && (route = PyObject_CallOneArg(mw->route, scope)) == NULL) return NULL;
    method = mw->with_method ? scope_get(scope, str_method) : NULL;
    if (method == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(route);
            return NULL;
        }
        method = Py_NewRef(Py_None);
    }
    PyObject *token = NULL, *ls = NULL, *cur;
    if (PyContextVar_Get(mw_var, Py_None, &cur) < 0) goto done;
    if (PyUnicode_CheckExact(route) && (method == Py_None || PyUnicode_CheckExact(method))) {
        /* keyed[cache key][route]([method])[current set]: mw->ckey is one object per (key,
           method) (hashed by address), the route's hash is the str's own (computed once) */
        PyObject *d = dict_at(dict_at(mw_keyed, mw->ckey), route);
        if (mw->with_method) d = dict_at(d, method);
        ls = dict_at(d, cur);
    }
    Py_DECREF(cur);
    if (ls != NULL) {
        token = push_set(mw_var, ls);
    } else {
        PyObject *a[3] = {(PyObject *)mw, route, method};
        token = PyObject_Vectorcall(mw_miss, a, 3, NULL);
    }
done:
    Py_DECREF(route);
    Py_DECREF(method);
    return token;
}

/* The labels popped (when pushed). quiet: a failing reset is ignored (closing a request
   abandoned in another context: that context is gone). */
static int asgi_pop(asgi_call *c, int quiet) {
    PyObject *token = c->token;
    if (token == NULL) return 0;
    c->token = NULL;
    int bad = PyContextVar_Reset(mw_var, token);
    Py_DECREF(token);
    if (bad == 0) bad = follow_var(mw_var);
    if (bad < 0 && quiet) {
        PyErr_Clear();
        return follow_var(mw_var) < 0 ? (PyErr_Clear(), 0) : 0;
    }
    return bad;
}

/* raise exc again, as it was (steals the reference) */
static void give_back(PyObject *exc) {
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

/* The call ends with r (PYGEN_RETURN: *res its value; PYGEN_ERROR: the exception set). */
static int asgi_end(asgi_call *c, int r, PyObject **res, int quiet) {
    c->state = 2;
    Py_CLEAR(c->it);
    if (c->token == NULL) return r;
    if (r == PYGEN_ERROR) {
        PyObject *exc = take_exception();
        if (asgi_pop(c, quiet) < 0) { /* as a `finally` raising: the new exception, the old as its context */
            PyObject *exc2 = take_exception();
            if (exc2 == NULL) {
                exc2 = exc;
            } else if (exc != NULL) {
                PyException_SetContext(exc2, exc); /* steals exc */
            }
            if (exc2 != NULL) give_back(exc2);
            return PYGEN_ERROR;
        }
        if (exc != NULL) give_back(exc);
        return PYGEN_ERROR;
    }
    if (asgi_pop(c, quiet) < 0) {
        Py_CLEAR(*res);
        return PYGEN_ERROR;
    }
    return r;
}

static int asgi_start(asgi_call *c) {
    c->state = 1;
    PyObject *scope = c->scope, *receive = c->receive, *send = c->send;
    c->scope = c->receive = c->send = NULL;
    int r = 0;
    if (c->label && (c->token = asgi_push(c->mw, scope)) == NULL) {
        r = -1;
    } else {
        PyObject *a[3] = {scope, receive, send};
        PyObject *inner = PyObject_Vectorcall(c->mw->app, a, 3, NULL);
        if (inner != NULL) {
            c->it = await_iter(inner);
            Py_DECREF(inner);
        }
        if (c->it == NULL) {
            PyObject *none = NULL;
            asgi_end(c, PYGEN_ERROR, &none, 0);
            r = -1;
        }
    }
    if (r < 0) c->state = 2;
    Py_DECREF(scope);
    Py_DECREF(receive);
    Py_DECREF(send);
    return r;
}

static int asgi_send(asgi_call *c, PyObject *arg, PyObject **res) {
    *res = NULL;
    if (c->state == 2) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return PYGEN_ERROR;
    }
    if (c->running) {
        PyErr_SetString(PyExc_ValueError, "coroutine already executing");
        return PYGEN_ERROR;
    }
    if (c->state == 0) {
        if (arg != Py_None) {
            PyErr_SetString(PyExc_TypeError, "can't send non-None value to a just-started coroutine");
            return PYGEN_ERROR;
        }
        if (asgi_start(c) < 0) return PYGEN_ERROR;
    }
    c->running = 1;
    int r = iter_send(c->it, arg, res);
    c->running = 0;
    if (r == PYGEN_NEXT) return r;
    return asgi_end(c, r, res, 0);
}

static PyObject *return_value(int r, PyObject *res) {
    if (r == PYGEN_NEXT) return res;
    if (r == PYGEN_RETURN) {
        if (res == Py_None) {
            Py_DECREF(res);
            PyErr_SetNone(PyExc_StopIteration);
            return NULL;
        }
        PyObject *e = PyObject_CallOneArg(PyExc_StopIteration, res);
        Py_DECREF(res);
        if (e != NULL) {
            PyErr_SetObject(PyExc_StopIteration, e);
            Py_DECREF(e);
        }
    }
    return NULL;
}

static PyObject *asgi_call_iternext(PyObject *self) {
    PyObject *res;
    int r = asgi_send((asgi_call *)self, Py_None, &res);
    if (r == PYGEN_RETURN && res == Py_None) { /* exhausted: no StopIteration object needed */
        Py_DECREF(res);
        return NULL;
    }
    return return_value(r, res);
}

static PyObject *asgi_call_send(PyObject *self, PyObject *arg) {
    PyObject *res;
    int r = asgi_send((asgi_call *)self, arg, &res);
    return return_value(r, res);
}

#if PY_VERSION_HEX >= 0x030A0000
static PySendResult asgi_call_am_send(PyObject *self, PyObject *arg, PyObject **res) {
    return (PySendResult)asgi_send((asgi_call *)self, arg, res);
}
#endif

/* raise the exception throw() was given, as thrown at a yield of this awaitable */
static void raise_thrown(PyObject *args) {
    PyObject *typ = PyTuple_GET_ITEM(args, 0);
    PyObject *val = PyTuple_GET_SIZE(args) > 1 ? PyTuple_GET_ITEM(args, 1) : Py_None;
    if (PyExceptionInstance_Check(typ))
        PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    else if (PyExceptionClass_Check(typ))
        PyErr_SetObject(typ, val);
    else
        PyErr_SetString(PyExc_TypeError, "exceptions must be classes or instances deriving from BaseException");
}

static PyObject *asgi_call_throw(PyObject *self, PyObject *args) {
    asgi_call *c = (asgi_call *)self;
    if (PyTuple_GET_SIZE(args) < 1 || PyTuple_GET_SIZE(args) > 3) {
        PyErr_SetString(PyExc_TypeError, "throw expected 1 to 3 arguments");
        return NULL;
    }
    if (c->running) {
        PyErr_SetString(PyExc_ValueError, "coroutine already executing");
        return NULL;
    }
    if (c->state == 0) { /* as a coroutine thrown into before it ran: its body never runs */
        c->state = 2;
        Py_CLEAR(c->scope);
        Py_CLEAR(c->receive);
        Py_CLEAR(c->send);
        raise_thrown(args);
        return NULL;
    }
    if (c->state == 2) {
        raise_thrown(args);
        return NULL;
    }
    PyObject *res = NULL;
    int r;
    PyObject *meth = PyObject_GetAttr(c->it, str_throw);
    c->running = 1;
    if (meth == NULL) { /* a plain iterator: the exception is raised here */
        PyErr_Clear();
        raise_thrown(args);
        r = PYGEN_ERROR;
    } else {
        res = PyObject_Call(meth, args, NULL);
        Py_DECREF(meth);
        if (res != NULL)
            r = PYGEN_NEXT;
        else
            r = fetch_stop_value(&res) == 0 ? PYGEN_RETURN : PYGEN_ERROR;
    }
    c->running = 0;
    if (r != PYGEN_NEXT) r = asgi_end(c, r, &res, 0);
    return return_value(r, res);
}

static PyObject *asgi_call_close(PyObject *self, PyObject *noargs) {
    asgi_call *c = (asgi_call *)self;
    if (c->running) {
        PyErr_SetString(PyExc_ValueError, "coroutine already executing");
        return NULL;
    }
    if (c->state != 1) {
        c->state = 2;
        Py_CLEAR(c->scope);
        Py_CLEAR(c->receive);
        Py_CLEAR(c->send);
        Py_RETURN_NONE;
    }
    PyObject *res = NULL;
    int r = PYGEN_RETURN;
    PyObject *meth = PyObject_GetAttr(c->it, str_close);
    if (meth == NULL) {
        PyErr_Clear();
    } else {
        c->running = 1;
        res = PyObject_CallNoArgs(meth);
        c->running = 0;
        Py_DECREF(meth);
        if (res == NULL) r = PYGEN_ERROR;
    }
    if (res == NULL && r == PYGEN_RETURN) res = Py_NewRef(Py_None);
    r = asgi_end(c, r, &res, 1);
    if (r == PYGEN_ERROR) return NULL;
    Py_XDECREF(res);
    Py_RETURN_NONE;
}

static PyObject *asgi_call_await(PyObject *self) { return Py_NewRef(self); }

static int asgi_call_traverse(PyObject *self, visitproc visit, void *arg) {
    asgi_call *c = (asgi_call *)self;
    Py_VISIT(c->mw);
    Py_VISIT(c->scope);
    Py_VISIT(c->receive);
    Py_VISIT(c->send);
    Py_VISIT(c->it);
    Py_VISIT(c->token);
    return 0;
}

static int asgi_call_clear(PyObject *self) {
    asgi_call *c = (asgi_call *)self;
    Py_CLEAR(c->mw);
    Py_CLEAR(c->scope);
    Py_CLEAR(c->receive);
    Py_CLEAR(c->send);
    Py_CLEAR(c->it);
    Py_CLEAR(c->token); /* abandoned while running: its context is gone with it (not reset) */
    return 0;
}

static void asgi_call_dealloc(PyObject *self) {
    PyObject_GC_UnTrack(self);
    asgi_call_clear(self);
    PyObject_GC_Del(self);
}

static PyMethodDef asgi_call_methods[] = {
    {"send", asgi_call_send, METH_O, "send(value): resumes the request"},
    {"throw", asgi_call_throw, METH_VARARGS, "throw(exc): raises exc in the request"},
    {"close", asgi_call_close, METH_NOARGS, "close(): closes the request"},
    {NULL, NULL, 0, NULL},
};

static PyAsyncMethods asgi_call_async = {
    .am_await = asgi_call_await,
#if PY_VERSION_HEX >= 0x030A0000
    .am_send = asgi_call_am_send,
#endif
};

static PyTypeObject asgi_call_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "asprof.context._ctx.LabelledRequest",
    .tp_basicsize = sizeof(asgi_call),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "An ASGI request running with its labels (what ASGILabels(app)(scope, receive, send) returns).",
    .tp_dealloc = asgi_call_dealloc,
    .tp_traverse = asgi_call_traverse,
    .tp_clear = asgi_call_clear,
    .tp_as_async = &asgi_call_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = asgi_call_iternext,
    .tp_methods = asgi_call_methods,
};

static PyObject *asgi_mw_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    asgi_mw *mw = (asgi_mw *)self;
    if (PyVectorcall_NARGS(nargsf) != 3 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "an ASGI application takes (scope, receive, send)");
        return NULL;
    }
    if (mw->app == NULL || mw->ckey == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ASGILabels: not initialised");
        return NULL;
    }
    PyObject *scope = args[0];
    PyObject *t = scope_get(scope, str_type);
    if (t == NULL && PyErr_Occurred()) return NULL;
    int label = 0;
    if (t != NULL && PyUnicode_Check(t))
        label = t == str_http || PyUnicode_Compare(t, str_http) == 0 || PyUnicode_Compare(t, str_websocket) == 0;
    Py_XDECREF(t);
    asgi_call *c = PyObject_GC_New(asgi_call, &asgi_call_type);
    if (c == NULL) return NULL;
    c->mw = (asgi_mw *)Py_NewRef(self);
    c->scope = Py_NewRef(scope);
    c->receive = Py_NewRef(args[1]);
    c->send = Py_NewRef(args[2]);
    c->it = c->token = NULL;
    c->state = c->running = 0;
    c->label = label;
    PyObject_GC_Track((PyObject *)c);
    return (PyObject *)c;
}

static int asgi_mw_init(PyObject *self, PyObject *args, PyObject *kw) {
    asgi_mw *mw = (asgi_mw *)self;
    static char *names[] = {"app", "route", "key", "method", NULL};
    PyObject *app, *route = NULL, *key = NULL, *method = Py_True;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OUO:ASGILabels", names, &app, &route, &key, &method)) return -1;
    if (mw_plain == NULL || mw_ckey == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ASGILabels: import asprof.context.middleware first");
        return -1;
    }
    if (route == NULL || route == Py_None) route = mw_plain;
    if (!PyCallable_Check(route)) {
        PyErr_SetString(PyExc_TypeError, "ASGILabels: route must be a function of the scope");
        return -1;
    }
    if (key == NULL) key = str_endpoint;
    if (PyUnicode_GET_LENGTH(key) == 0) {
        PyErr_SetString(PyExc_ValueError, "ASGILabels: the label key must be non-empty");
        return -1;
    }
    int wm = PyObject_IsTrue(method);
    if (wm < 0) return -1;
    PyObject *ckey = PyObject_CallFunction(mw_ckey, "OO", key, wm ? Py_True : Py_False);
    if (ckey == NULL) return -1;
    Py_XSETREF(mw->app, Py_NewRef(app));
    Py_XSETREF(mw->route, Py_NewRef(route));
    Py_XSETREF(mw->key, Py_NewRef(key));
    Py_XSETREF(mw->method, Py_NewRef(wm ? Py_True : Py_False));
    Py_XSETREF(mw->ckey, ckey);
    mw->with_method = wm;
    mw->vectorcall = asgi_mw_vectorcall;
    return 0;
}

static int asgi_mw_traverse(PyObject *self, visitproc visit, void *arg) {
    asgi_mw *mw = (asgi_mw *)self;
    if (Py_TYPE(self)->tp_flags & Py_TPFLAGS_HEAPTYPE) Py_VISIT(Py_TYPE(self)); /* a subclass's instances keep it */
    Py_VISIT(mw->app);
    Py_VISIT(mw->route);
    Py_VISIT(mw->key);
    Py_VISIT(mw->method);
    Py_VISIT(mw->ckey);
    return 0;
}

static int asgi_mw_clear(PyObject *self) {
    asgi_mw *mw = (asgi_mw *)self;
    Py_CLEAR(mw->app);
    Py_CLEAR(mw->route);
    Py_CLEAR(mw->key);
    Py_CLEAR(mw->method);
    Py_CLEAR(mw->ckey);
    return 0;
}

static void asgi_mw_dealloc(PyObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    asgi_mw_clear(self);
    tp->tp_free(self);
    if (tp->tp_flags & Py_TPFLAGS_HEAPTYPE) Py_DECREF(tp);
}

static PyMemberDef asgi_mw_members[] = {
    {"app", T_OBJECT, offsetof(asgi_mw, app), 0, "the application"},
    {"route", T_OBJECT, offsetof(asgi_mw, route), READONLY, "route(scope) -> the endpoint label"},
    {"key", T_OBJECT, offsetof(asgi_mw, key), READONLY, "the label's key"},
    {"method", T_OBJECT, offsetof(asgi_mw, method), READONLY, "whether the method is a label too"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject asgi_mw_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "asprof.context.middleware.ASGILabels",
    .tp_basicsize = sizeof(asgi_mw),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(asgi_mw, vectorcall),
    .tp_doc = "ASGILabels(app, route=None, key='endpoint', method=True)\n--\n\n"
              "ASGI middleware: each HTTP / WebSocket request runs with the labels {key: route(scope)}\n"
              "and, unless method=False, its method, added to the current ones (route None: asgi_route,\n"
              "the route template when the scope has one, else the path). Calling it returns an\n"
              "awaitable that, when first awaited (in the context that awaits it), pushes the labels,\n"
              "runs the application and pops them when it ends, however it ends. route, key and\n"
              "method are fixed at construction; app can be replaced.",
    .tp_new = PyType_GenericNew,
    .tp_init = asgi_mw_init,
    .tp_call = PyVectorcall_Call,
    .tp_dealloc = asgi_mw_dealloc,
    .tp_traverse = asgi_mw_traverse,
    .tp_clear = asgi_mw_clear,
    .tp_members = asgi_mw_members,
};

/* asgi_setup(var, keyed, miss, plain_route, cache_key): what the middleware's calls use.
   keyed[cache_key(key, method)] is {route: ({method: ...} when method) {current label set or
   None: the set to push}}; miss(mw, route, method) pushes on a miss (and fills it); plain_route
   is asgi_route (inlined here). */
static PyObject *c_asgi_setup(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    if (n != 5 || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "asgi_setup(var, dict, miss, plain_route, cache_key)");
        return NULL;
    }
    Py_XSETREF(mw_ckey, Py_NewRef(args[4]));
    Py_XSETREF(mw_var, Py_NewRef(args[0]));
    Py_XSETREF(mw_keyed, Py_NewRef(args[1]));
    Py_XSETREF(mw_miss, Py_NewRef(args[2]));
    Py_XSETREF(mw_plain, Py_NewRef(args[3]));
    Py_RETURN_NONE;
}

static int asgi_init_module(PyObject *m) {
#define INTERN(v, s) if (v == NULL && (v = PyUnicode_InternFromString(s)) == NULL) return -1
    INTERN(str_type, "type");
    INTERN(str_http, "http");
    INTERN(str_websocket, "websocket");
    INTERN(str_route, "route");
    INTERN(str_path, "path");
    INTERN(str_method, "method");
    INTERN(str_throw, "throw");
    INTERN(str_close, "close");
    INTERN(str_send, "send");
    INTERN(str_endpoint, "endpoint");
#undef INTERN
    if (PyType_Ready(&asgi_call_type) < 0 || PyType_Ready(&asgi_mw_type) < 0) return -1;
    Py_INCREF(&asgi_mw_type);
    if (PyModule_AddObject(m, "ASGILabels", (PyObject *)&asgi_mw_type) < 0) {
        Py_DECREF(&asgi_mw_type);
        return -1;
    }
    return 0;
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
    {"asgi_setup", (PyCFunction)(void (*)(void))c_asgi_setup, METH_FASTCALL,
     "asgi_setup(var, cache, miss, plain_route, cache_key): what ASGILabels's calls use"},
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
    coarse_init();
    if (asgi_init_module(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    pthread_atfork(NULL, NULL, atfork_child);
    return m;
}
