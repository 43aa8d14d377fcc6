/*
 * asprof.engines._signals: who owns the profiling signals (issue #13).
 *
 * An application (or one of its libraries) that installs its own handler for a signal
 * async-profiler samples with (SIGPROF for CPU, SIGVTALRM for wall clock by default) silently
 * ends sampling: async-profiler's perf events stop at each overflow until its handler re-arms
 * them, and now the application's handler gets the signal instead. This module:
 *
 *   handler_info(sig)   what handles a signal now: address, flags, the object it lives in
 *                       (dladdr), for warnings and `asprof doctor`;
 *   object_base(path, symbol)  the load address of a loaded object (dlopen RTLD_NOLOAD),
 *                       to tell asprof's handlers (async-profiler's, csrc/pyframes') from others;
 *   watch(bases, wall_sig)  remembers which profiling signals asprof's handlers hold now and
 *                       starts the "asprof-sigwatch" thread, which every 100 ms checks that they
 *                       still do. When another handler took one over, the thread puts the
 *                       trampoline in front: asprof's signals (perf-event overflows of
 *                       async-profiler's descriptors, its CPU timers, its wall-clock tgkill)
 *                       go to asprof's chain, every other one (the application's setitimer,
 *                       kill, sigqueue, timers with a value) to the application's handler; and
 *                       re-arms async-profiler's perf events (those whose signals the
 *                       application's handler swallowed meanwhile stayed disabled);
 *   unwatch()           stops the thread; signals where the trampoline is in front go back to
 *                       the application's handler (asprof no longer samples with them);
 *   poll()              takeovers seen since the last poll: [(sig, address, flags)];
 *   stats()             cumulative counters.
 *
 * The trampoline is async-signal-safe: no allocation, no lock, one fcntl at most, errno kept,
 * and a handler that chains back to it (it saved the trampoline as "the previous handler") is
 * never called again on the same thread: the loop ends there (counted).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIG 65
#define MAX_BASES 8
#define EVENT_CAP 16
#define CHECK_NS 100000000ull

typedef struct {
    _Atomic int watched;           /* asprof samples with this signal */
    _Atomic int trampolined;       /* our trampoline is (or was last put) in front */
    _Atomic(void *) head_fn;       /* asprof's chain: async-profiler's or csrc/pyframes' handler */
    _Atomic int head_flags;
    _Atomic(void *) app_fn;        /* the application's handler, for the signals that are its own */
    _Atomic int app_flags;
    struct sigaction app_sa;       /* given back at unwatch */
} sigslot;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t th;
    int running, stop, cond_ready;
    pid_t pid;
    uintptr_t bases[MAX_BASES];
    int nbases;
    _Atomic int wall_sig;
    sigslot s[MAX_SIG];
    /* takeovers not yet polled */
    struct { int sig; uintptr_t fn; int flags; } events[EVENT_CAP];
    int nevents;
    _Atomic uint64_t takeovers, to_asprof, to_app, dropped, loops, rearmed, checks, events_lost;
} W = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Bit sig set while this thread runs a handler the trampoline called for sig (per signal: another
   profiling signal may interrupt that handler and must go through). */
static __thread uint64_t in_fwd __attribute__((tls_model("initial-exec")));

/* ------------------------------------------------------------ trampoline ---- */

/* Whether a signal is one of asprof's (async-profiler's). async-signal-safe. */
static int is_asprof_signal(int sig, const siginfo_t *info) {
    if (info == NULL) return 0;
    int code = info->si_code;
    if (code >= POLL_IN && code <= POLL_HUP) {
        /* a perf event overflow: its descriptor is set to signal `sig` (F_SETSIG) */
        int fd = info->si_fd;
        if (fd < 0) return 0;
        int saved = errno;
        int s = fcntl(fd, F_GETSIG);
        errno = saved;
        return s == sig;
    }
    /* async-profiler's per-thread CPU timers carry no value (ctimer_linux.cpp) */
    if (code == SI_TIMER) return info->si_value.sival_ptr == NULL;
    /* its wall-clock signals: tgkill from this process, on the wall signal only */
    if (code == SI_TKILL) return sig == atomic_load_explicit(&W.wall_sig, memory_order_relaxed) && info->si_pid == W.pid;
    return 0;  /* SI_KERNEL (setitimer), SI_USER (kill), SI_QUEUE, ...: the application's */
}

/* async-signal-safe. Returns 0 when fn is not a handler to call (default, ignore, none). */
static int call(void *fn, int flags, int sig, siginfo_t *info, void *uc) {
    if (fn == NULL || fn == (void *)SIG_DFL || fn == (void *)SIG_IGN) return 0;
    if (flags & SA_SIGINFO) ((void (*)(int, siginfo_t *, void *))fn)(sig, info, uc);
    else ((void (*)(int))fn)(sig);
    return 1;
}

/* async-signal-safe: runs in the handler. */
static void trampoline(int sig, siginfo_t *info, void *uc) {
    int saved_errno = errno;
    if (sig <= 0 || sig >= MAX_SIG) {
        errno = saved_errno;
        return;
    }
    sigslot *s = &W.s[sig];
    int ours = is_asprof_signal(sig, info);
    uint64_t bit = 1ull << (sig - 1);  /* sig in 1..64 */
    if (in_fwd & bit) {
        /* called back by the handler we called (it chains to what it found installed: us) */
        atomic_fetch_add_explicit(&W.loops, 1, memory_order_relaxed);
        errno = saved_errno;
        return;
    }
    in_fwd |= bit;
    if (ours) {
        atomic_fetch_add_explicit(&W.to_asprof, 1, memory_order_relaxed);
        call(atomic_load_explicit(&s->head_fn, memory_order_acquire),
             atomic_load_explicit(&s->head_flags, memory_order_relaxed), sig, info, uc);
    } else if (call(atomic_load_explicit(&s->app_fn, memory_order_acquire),
                    atomic_load_explicit(&s->app_flags, memory_order_relaxed), sig, info, uc)) {
        atomic_fetch_add_explicit(&W.to_app, 1, memory_order_relaxed);
    } else {
        /* the application set SIG_IGN or SIG_DFL: nothing of its own to run. (SIG_DFL would
           end the process for these signals; a signal that is not asprof's is dropped.) */
        atomic_fetch_add_explicit(&W.dropped, 1, memory_order_relaxed);
    }
    in_fwd &= ~bit;
    errno = saved_errno;
}

/* --------------------------------------------------------------- helpers ---- */

static void *sa_fn(const struct sigaction *sa) {
    return (sa->sa_flags & SA_SIGINFO) ? (void *)sa->sa_sigaction : (void *)sa->sa_handler;
}

/* Whether fn is asprof's: the trampoline, or in one of the objects given to watch(). */
static int is_asprof_fn(void *fn) {
    if (fn == (void *)trampoline) return 1;
    if (fn == NULL || fn == (void *)SIG_DFL || fn == (void *)SIG_IGN) return 0;
    Dl_info info;
    if (dladdr(fn, &info) == 0) return 0;
    for (int i = 0; i < W.nbases; i++)
        if ((uintptr_t)info.dli_fbase == W.bases[i]) return 1;
    return 0;
}

/* Signals async-profiler may sample with (OS::getProfilingSignal's candidates), and SIGALRM. */
static int candidate(int sig) {
    if (sig == SIGPROF || sig == SIGVTALRM || sig == SIGALRM || sig == SIGPWR) return 1;
#ifdef SIGSTKFLT
    if (sig == SIGSTKFLT) return 1;
#endif
    return sig >= SIGRTMIN && sig <= SIGRTMAX && sig < MAX_SIG;
}

/* Re-arms async-profiler's perf events that signal `sig`: one whose overflow signal went to
   the application's handler stays disabled (limit 1) until someone refreshes it. An event that
   is still enabled only gets one more overflow before it would stop: harmless, its handler
   refreshes it at each one. */
static void rearm_perf(int sig) {
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL) return;
    int dfd = dirfd(d);
    struct dirent *de;
    char path[64], link[64];
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] < '0' || de->d_name[0] > '9') continue;
        int fd = atoi(de->d_name);
        if (fd == dfd) continue;
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        ssize_t n = readlink(path, link, sizeof(link) - 1);
        if (n <= 0) continue;
        link[n] = 0;
        if (strcmp(link, "anon_inode:[perf_event]") != 0) continue;
        if (fcntl(fd, F_GETSIG) != sig) continue;
        if (ioctl(fd, PERF_EVENT_IOC_REFRESH, 1) == 0) atomic_fetch_add(&W.rearmed, 1);
    }
    closedir(d);
}

static void add_event(int sig, void *fn, int flags) {
    if (W.nevents >= EVENT_CAP) {
        atomic_fetch_add(&W.events_lost, 1);
        return;
    }
    W.events[W.nevents].sig = sig;
    W.events[W.nevents].fn = (uintptr_t)fn;
    W.events[W.nevents].flags = flags;
    W.nevents++;
}

static int install_trampoline(int sig, const struct sigaction *app) {
    sigslot *s = &W.s[sig];
    s->app_sa = *app;
    atomic_store(&s->app_flags, app->sa_flags);
    atomic_store(&s->app_fn, sa_fn(app));
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = trampoline;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | (app->sa_flags & SA_ONSTACK);
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL) != 0) return -1;
    atomic_store(&s->trampolined, 1);
    return 0;
}

/* One check of every watched signal (lock held). */
static void check(void) {
    atomic_fetch_add(&W.checks, 1);
    for (int sig = 1; sig < MAX_SIG; sig++) {
        sigslot *s = &W.s[sig];
        if (!atomic_load(&s->watched)) continue;
        struct sigaction cur;
        if (sigaction(sig, NULL, &cur) != 0) continue;
        void *fn = sa_fn(&cur);
        if (fn == (void *)trampoline) continue;
        if (is_asprof_fn(fn)) {
            if (atomic_load(&s->trampolined)) {
                /* async-profiler put its handler back (a restart) over ours: in front again,
                   its handler as asprof's chain, the application's kept */
                atomic_store(&s->head_flags, cur.sa_flags);
                atomic_store(&s->head_fn, fn);
                struct sigaction app = s->app_sa;
                install_trampoline(sig, &app);
            }
            continue;
        }
        /* someone else's handler (or SIG_DFL / SIG_IGN) took the signal */
        atomic_fetch_add(&W.takeovers, 1);
        add_event(sig, fn, cur.sa_flags);
        if (install_trampoline(sig, &cur) == 0) rearm_perf(sig);
    }
}

static void *watch_main(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "asprof-sigwatch", 0, 0, 0);
    pthread_mutex_lock(&W.lock);
    while (!W.stop) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t ns = (uint64_t)ts.tv_nsec + CHECK_NS;
        ts.tv_sec += (time_t)(ns / 1000000000ull);
        ts.tv_nsec = (long)(ns % 1000000000ull);
        pthread_cond_timedwait(&W.cond, &W.lock, &ts);
        if (W.stop || getpid() != W.pid) break;
        check();
    }
    pthread_mutex_unlock(&W.lock);
    return NULL;
}

static void atfork_child(void) {
    /* no watcher thread in the child; the lock may have been held by the parent's */
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&W.lock, &m, sizeof(m));
    W.cond_ready = 0;
    W.running = 0;
    W.stop = 0;
    W.nevents = 0;
    /* the trampolines stay installed (the child inherited them) and keep forwarding */
}

/* ------------------------------------------------------------ Python API ---- */

/* What is known of handler fn (flags: its sigaction flags, -1 unknown) as a dict. */
static PyObject *describe(void *fn, int flags) {
    const char *kind = fn == (void *)SIG_DFL ? "default" : fn == (void *)SIG_IGN ? "ignore" : "handler";
    const char *object = NULL, *symbol = NULL;
    uintptr_t base = 0;
    Dl_info info;
    if (fn != (void *)SIG_DFL && fn != (void *)SIG_IGN && dladdr(fn, &info) != 0) {
        object = info.dli_fname;
        symbol = info.dli_sname;
        base = (uintptr_t)info.dli_fbase;
    }
    /* the object holding CPython's own signal handler (where Py_Initialize is) */
    int python = 0;
    Dl_info pinfo;
    if (base != 0 && dladdr((void *)Py_Initialize, &pinfo) != 0) python = (uintptr_t)pinfo.dli_fbase == base;
    int asprof = fn == (void *)trampoline;
    if (!asprof && base != 0)
        for (int i = 0; i < W.nbases; i++) if (base == W.bases[i]) asprof = 1;
    return Py_BuildValue("{s:s,s:K,s:i,s:z,s:z,s:K,s:O,s:O,s:O}", "kind", kind, "address",
                         (unsigned long long)(uintptr_t)fn, "flags", flags, "object", object,
                         "symbol", symbol, "base", (unsigned long long)base, "python", python ? Py_True : Py_False,
                         "trampoline", fn == (void *)trampoline ? Py_True : Py_False, "asprof",
                         asprof ? Py_True : Py_False);
}

static PyObject *py_handler_info(PyObject *self, PyObject *arg) {
    long sig = PyLong_AsLong(arg);
    if (sig == -1 && PyErr_Occurred()) return NULL;
    if (sig <= 0 || sig >= NSIG) {
        PyErr_Format(PyExc_ValueError, "not a signal number: %ld", sig);
        return NULL;
    }
    struct sigaction cur;
    if (sigaction((int)sig, NULL, &cur) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    return describe(sa_fn(&cur), (int)cur.sa_flags);
}

static PyObject *py_address_info(PyObject *self, PyObject *arg) {
    unsigned long long a = PyLong_AsUnsignedLongLong(arg);
    if (a == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    return describe((void *)(uintptr_t)a, -1);
}

static PyObject *py_object_base(PyObject *self, PyObject *args) {
    const char *path, *symbol;
    if (!PyArg_ParseTuple(args, "ss:object_base", &path, &symbol)) return NULL;
    void *h = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
    if (h == NULL) Py_RETURN_NONE;
    void *sym = dlsym(h, symbol);
    Dl_info info;
    unsigned long long base = 0;
    if (sym != NULL && dladdr(sym, &info) != 0) base = (unsigned long long)(uintptr_t)info.dli_fbase;
    dlclose(h);  /* RTLD_NOLOAD took a reference: give it back (the object stays loaded) */
    if (base == 0) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(base);
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, atfork_child); }

static PyObject *py_watch(PyObject *self, PyObject *args) {
    PyObject *bases;
    int wall_sig;
    if (!PyArg_ParseTuple(args, "Oi:watch", &bases, &wall_sig)) return NULL;
    PyObject *seq = PySequence_Fast(bases, "bases must be a sequence of addresses");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_BASES) n = MAX_BASES;
    uintptr_t b[MAX_BASES];
    for (Py_ssize_t i = 0; i < n; i++) {
        b[i] = (uintptr_t)PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    pthread_once(&atfork_once, register_atfork);
    PyObject *watched = PyList_New(0);
    if (watched == NULL) return NULL;
    pthread_mutex_lock(&W.lock);
    if (!W.cond_ready) {
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&W.cond, &ca);
        pthread_condattr_destroy(&ca);
        W.cond_ready = 1;
    }
    W.pid = getpid();
    memcpy(W.bases, b, sizeof(uintptr_t) * (size_t)n);
    W.nbases = (int)n;
    atomic_store(&W.wall_sig, wall_sig);
    int nwatched = 0;
    for (int sig = 1; sig < MAX_SIG && sig < NSIG; sig++) {
        sigslot *s = &W.s[sig];
        if (!candidate(sig)) continue;
        struct sigaction cur;
        if (sigaction(sig, NULL, &cur) != 0) continue;
        void *fn = sa_fn(&cur);
        if (fn == (void *)trampoline) {
            atomic_store(&s->watched, 1);  /* still ours from before (a restart) */
        } else if (is_asprof_fn(fn)) {
            atomic_store(&s->head_flags, cur.sa_flags);
            atomic_store(&s->head_fn, fn);
            atomic_store(&s->trampolined, 0);
            atomic_store(&s->watched, 1);
        } else {
            atomic_store(&s->watched, 0);  /* not (or no longer) a signal asprof samples with */
            continue;
        }
        nwatched++;
        PyObject *v = PyLong_FromLong(sig);
        if (v == NULL || PyList_Append(watched, v) != 0) {
            Py_XDECREF(v);
            pthread_mutex_unlock(&W.lock);
            Py_DECREF(watched);
            return NULL;
        }
        Py_DECREF(v);
    }
    int err = 0;
    if (nwatched > 0 && !W.running) {
        W.stop = 0;
        /* the watcher never takes a profiling signal */
        sigset_t block, old;
        sigfillset(&block);
        pthread_sigmask(SIG_BLOCK, &block, &old);
        err = pthread_create(&W.th, NULL, watch_main, NULL);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (err == 0) {
            pthread_setname_np(W.th, "asprof-sigwatch");
            W.running = 1;
        }
    }
    pthread_mutex_unlock(&W.lock);
    if (err != 0) {
        Py_DECREF(watched);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return watched;
}

static PyObject *py_unwatch(PyObject *self, PyObject *unused) {
    pthread_mutex_lock(&W.lock);
    int join = W.running && getpid() == W.pid;
    W.stop = 1;
    if (W.cond_ready) pthread_cond_broadcast(&W.cond);
    pthread_mutex_unlock(&W.lock);
    if (join) {
        Py_BEGIN_ALLOW_THREADS
        pthread_join(W.th, NULL);
        Py_END_ALLOW_THREADS
    }
    pthread_mutex_lock(&W.lock);
    W.running = 0;
    for (int sig = 1; sig < MAX_SIG; sig++) {
        sigslot *s = &W.s[sig];
        atomic_store(&s->watched, 0);
        if (!atomic_load(&s->trampolined)) continue;
        /* asprof no longer samples with it: the application's handler alone, as it set it */
        struct sigaction cur;
        if (sigaction(sig, NULL, &cur) == 0 && sa_fn(&cur) == (void *)trampoline) sigaction(sig, &s->app_sa, NULL);
        atomic_store(&s->trampolined, 0);
        /* app_fn and head_fn stay: a trampoline call still running elsewhere may use them */
    }
    pthread_mutex_unlock(&W.lock);
    Py_RETURN_NONE;
}

static PyObject *py_poll(PyObject *self, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    pthread_mutex_lock(&W.lock);
    int n = W.nevents;
    struct { int sig; uintptr_t fn; int flags; } ev[EVENT_CAP];
    memcpy(ev, W.events, sizeof(ev[0]) * (size_t)n);
    W.nevents = 0;
    pthread_mutex_unlock(&W.lock);
    for (int i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(iKi)", ev[i].sig, (unsigned long long)ev[i].fn, ev[i].flags);
        if (t == NULL || PyList_Append(out, t) != 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    return out;
}

static PyObject *py_check(PyObject *self, PyObject *unused) {
    /* one check now, on the calling thread (tests; the watcher does it every 100 ms) */
    pthread_mutex_lock(&W.lock);
    check();
    pthread_mutex_unlock(&W.lock);
    Py_RETURN_NONE;
}

static PyObject *py_set_default(PyObject *self, PyObject *arg) {
    /* sig back to SIG_DFL (the application asked for the default action while asprof sampled with
       the signal: asprof set SIG_IGN instead, which cannot end the process) */
    long sig = PyLong_AsLong(arg);
    if (sig == -1 && PyErr_Occurred()) return NULL;
    if (sig <= 0 || sig >= NSIG) {
        PyErr_Format(PyExc_ValueError, "not a signal number: %ld", sig);
        return NULL;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    if (sigaction((int)sig, &sa, NULL) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *py_stats(PyObject *self, PyObject *unused) {
    PyObject *watched = PyList_New(0), *front = PyList_New(0);
    if (watched == NULL || front == NULL) {
        Py_XDECREF(watched);
        Py_XDECREF(front);
        return NULL;
    }
    for (int sig = 1; sig < MAX_SIG; sig++) {
        PyObject *v = NULL;
        if (atomic_load(&W.s[sig].watched) && ((v = PyLong_FromLong(sig)) == NULL || PyList_Append(watched, v) != 0)) goto fail;
        Py_XDECREF(v);
        v = NULL;
        if (atomic_load(&W.s[sig].trampolined) && ((v = PyLong_FromLong(sig)) == NULL || PyList_Append(front, v) != 0)) goto fail;
        Py_XDECREF(v);
        continue;
    fail:
        Py_XDECREF(v);
        Py_DECREF(watched);
        Py_DECREF(front);
        return NULL;
    }
    return Py_BuildValue("{s:N,s:N,s:O,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "watched", watched, "trampolines", front,
                         "running", W.running ? Py_True : Py_False,
                         "takeovers", (unsigned long long)atomic_load(&W.takeovers),
                         "to_asprof", (unsigned long long)atomic_load(&W.to_asprof),
                         "to_app", (unsigned long long)atomic_load(&W.to_app),
                         "dropped", (unsigned long long)atomic_load(&W.dropped),
                         "loops", (unsigned long long)atomic_load(&W.loops),
                         "rearmed", (unsigned long long)atomic_load(&W.rearmed),
                         "checks", (unsigned long long)atomic_load(&W.checks),
                         "events_lost", (unsigned long long)atomic_load(&W.events_lost));
}

static PyMethodDef methods[] = {
    {"handler_info", py_handler_info, METH_O, "handler_info(sig) -> dict: what handles sig now"},
    {"address_info", py_address_info, METH_O, "address_info(address) -> dict: what is known of a handler address"},
    {"object_base", py_object_base, METH_VARARGS,
     "object_base(path, symbol) -> int | None: load address of a loaded object"},
    {"watch", py_watch, METH_VARARGS,
     "watch(bases, wall_sig) -> [sig]: the profiling signals asprof's handlers hold now, watched"},
    {"unwatch", py_unwatch, METH_NOARGS, "unwatch() -> None: watcher stopped, application handlers given back"},
    {"poll", py_poll, METH_NOARGS, "poll() -> [(sig, address, flags)]: takeovers since the last poll"},
    {"check", py_check, METH_NOARGS, "check() -> None: one check now"},
    {"set_default", py_set_default, METH_O, "set_default(sig) -> None: SIG_DFL for sig"},
    {"stats", py_stats, METH_NOARGS, "stats() -> dict of counters"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "asprof.engines._signals",
    "Who owns the profiling signals: detection, the forwarding trampoline (issue #13).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__signals(void) { return PyModule_Create(&moduledef); }
