/*
 * asprof.engines._builtin: the built-in sampling engine's Python module (contract:
 * docs in /asprof/engines/_builtin.pyi).
 *
 *   start(cpu_interval_ns, wall_interval_ns, max_frames=128, cpu_mode="auto") -> str
 *   stop(), running(), collect(), stats()
 *   python_frames, compiled_version
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "builtin.h"
#include "asprof_ctx.h"

#include <dlfcn.h>
#include <link.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(Py_GIL_DISABLED) && defined(ASPROF_WALKER)
#error "the frame walker does not support the free-threaded build: build without ASPROF_WALKER"
#endif

#ifdef ASPROF_WALKER
int bi_walker_ok = 1;
#endif
static int started;            /* between a successful start() and stop() */
static int starting;           /* a start() is in progress (GIL released while the sampler starts) */
static int collecting;         /* a collect() is in progress (GIL released while swapping) */
static void sym_cache_clear(void);  /* the native symbols cache (below) */
static uint64_t lost_reported; /* bi.n.lost at the previous collect */

static void atfork_child(void) {
    /* The child has no sampler and no timers; the parent's samples are not the child's. */
    atomic_store(&bi.enabled, 0);
    atomic_store(&bi.itimer_mode, 0);
    atomic_store(&bi.itimer_shared, 0);  /* issue #13 */
    bi_atfork_child();
    bi_handler_atfork_child();
    started = 0;
    starting = 0;
    collecting = 0;
    for (int i = 0; i < 2; i++) {
        atomic_store(&bi.halves[i].pins, 0);  /* no other thread exists here */
        bi_store_reset(&bi.halves[i]);
    }
    lost_reported = atomic_load(&bi.n.lost);
}

/* ---------------------------------------------------------------- start ---- */

static PyObject *bi_start(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"cpu_interval_ns", "wall_interval_ns", "max_frames", "cpu_mode", NULL};
    long long cpu_ns, wall_ns;
    int max_frames = 128;
    const char *mode = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LL|is:start", kwlist, &cpu_ns, &wall_ns, &max_frames, &mode))
        return NULL;
    if (bi_ctx_sample == NULL) {
        /* before the running check: an import may let another thread in (it releases the GIL),
           and nothing between that check and `starting = 1` may */
        /* issue #15: samples carry the thread's label-set id (asprof.context._ctx), when built */
        /* (the module itself: PyCapsule_Import walks attributes, and asprof.context may not be
           an attribute of asprof yet) */
        PyObject *cm = PyImport_ImportModule("asprof.context._ctx");
        PyObject *cap = cm != NULL ? PyObject_GetAttrString(cm, "_hooks") : NULL;
        asprof_ctx_hooks *hk = cap != NULL ? PyCapsule_GetPointer(cap, "asprof.context._ctx._hooks") : NULL;
        if (hk != NULL && hk->version == ASPROF_CTX_HOOKS_VERSION) bi_ctx_sample = hk->sample;
        Py_XDECREF(cap);
        Py_XDECREF(cm);
        PyErr_Clear();
    }
    if (started || starting) {
        PyErr_SetString(PyExc_RuntimeError, "the built-in engine is already running");
        return NULL;
    }
    if (cpu_ns < 0 || wall_ns < 0) {
        PyErr_SetString(PyExc_ValueError, "intervals must be >= 0 ns");
        return NULL;
    }
    if (cpu_ns == 0 && wall_ns == 0) {
        PyErr_SetString(PyExc_ValueError, "both CPU and wall sampling are off (intervals 0)");
        return NULL;
    }
    if ((cpu_ns != 0 && cpu_ns < 100000) || (wall_ns != 0 && wall_ns < 100000)) {
        PyErr_SetString(PyExc_ValueError, "intervals must be at least 100000 ns (0.1 ms)");
        return NULL;
    }
    if (max_frames < 1) {
        PyErr_SetString(PyExc_ValueError, "max_frames must be >= 1");
        return NULL;
    }
    int cpu_mode;
    if (strcmp(mode, "auto") == 0) cpu_mode = 0;
    else if (strcmp(mode, "thread") == 0) cpu_mode = 1;
    else if (strcmp(mode, "process") == 0) cpu_mode = 2;
    else if (strcmp(mode, "perf") == 0) cpu_mode = 3;
    else {
        PyErr_Format(PyExc_ValueError, "cpu_mode must be 'auto', 'perf', 'thread' or 'process', not %R",
                     PyTuple_Size(args) > 3 ? PyTuple_GET_ITEM(args, 3) : Py_None);
        return NULL;
    }
    if (bi_store_init() != 0) {
        PyErr_SetString(PyExc_MemoryError, "cannot map the built-in engine's sample store");
        return NULL;
    }
    bi.max_frames = max_frames > BI_MAX_FRAMES ? BI_MAX_FRAMES : max_frames;
    /* A fresh store: nothing of a previous run is reported as this one's. */
    /* (a collect() running in another thread resets the half it drains itself) */
    for (int i = 0; i < 2; i++)
        if (!collecting || i == atomic_load(&bi.cur)) bi_store_reset(&bi.halves[i]);
    atomic_store(&bi.halves[atomic_load(&bi.cur)].epoch, bi_store_new_epoch());
    lost_reported = atomic_load(&bi.n.lost);
    if (!collecting) sym_cache_clear();  /* libraries may have come and gone since the last run */
#ifdef ASPROF_WALKER
    atomic_store(&bi.guard_ok, pf_safeload_install() == 0 && pf_safeload_active());
#endif
    int had_handler = bi_handler_is_installed();
    if (bi_handler_install() != 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, "sigaction(SIGPROF)");
        return NULL;
    }
    atomic_store(&bi.enabled, 1);
    const char *mode_out = "off";
    const char *err;
    starting = 1;  /* under the GIL: a second start() now fails instead of starting twice */
    Py_BEGIN_ALLOW_THREADS
    err = bi_sampler_start((uint64_t)cpu_ns, (uint64_t)wall_ns, cpu_mode, &mode_out);
    Py_END_ALLOW_THREADS
    starting = 0;
    if (err != NULL) {
        int e = errno;
        atomic_store(&bi.enabled, 0);
        if (!had_handler) bi_handler_restore();  /* no signal of ours was ever sent */
        PyErr_Format(PyExc_OSError, "built-in engine: %s: %s", err, strerror(e));
        return NULL;
    }
    started = 1;
    return PyUnicode_FromString(mode_out);
}

static PyObject *bi_stop(PyObject *self, PyObject *noargs) {
    if (!started) Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    bi_sampler_stop();
    Py_END_ALLOW_THREADS
    /* Signals still in flight find the handler inert; it stays installed (a pending SIGPROF
       must never meet SIG_DFL, which would end the process). */
    atomic_store(&bi.enabled, 0);
    Py_BEGIN_ALLOW_THREADS
    bi_store_quiesce();  /* what stop() returns after is all in the store: collect() gets all of it */
    Py_END_ALLOW_THREADS
    started = 0;
    Py_RETURN_NONE;
}

static PyObject *bi_running(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(started);
}

/* -------------------------------------------------------------- collect ---- */

typedef struct {
    PyObject *codes, *natives, *stacks;
    PyObject *pc_map, *native_map, *stack_map, *combo_map, *code_dedup;
    PyObject **py_pairs;        /* per stack index: list of (code id, line) ints, or NULL */
    int32_t *code_map;
    long unknown_code;
    PyObject *labels, *label_map;   /* issue #15: label-set ids of the batch; id -> index + 1 */
    uint32_t last_label, last_label_idx;
    uint64_t gen;               /* this batch's number (sym_ranges' per-batch ids) */
} batch;

/* The label-set ids of the last collect(): a record's 16-bit field r[18..19] is 0 (no label) or
   an index + 1 into this list (0xFFFF: more distinct label sets in one batch than fit). */
static PyObject *last_labels;

/* The batch-local index + 1 of label-set id `label` (0 for none); 0xFFFF when full; -1 on error. */
static long label_index(batch *b, uint32_t label) {
    if (label == 0) return 0;
    if (label == b->last_label) return (long)b->last_label_idx;
    PyObject *k = PyLong_FromUnsignedLong(label);
    if (k == NULL) return -1;
    long idx;
    PyObject *hit = PyDict_GetItemWithError(b->label_map, k);
    if (hit != NULL) {
        idx = PyLong_AsLong(hit);
    } else if (PyErr_Occurred()) {
        idx = -1;
    } else if (PyList_GET_SIZE(b->labels) >= 0xFFFE) {
        idx = 0xFFFF;
    } else if (PyList_Append(b->labels, k) != 0) {
        idx = -1;
    } else {
        idx = (long)PyList_GET_SIZE(b->labels);
        PyObject *v = PyLong_FromLong(idx);
        if (v == NULL || PyDict_SetItem(b->label_map, k, v) != 0) idx = -1;
        Py_XDECREF(v);
    }
    Py_DECREF(k);
    if (idx >= 0) { b->last_label = label; b->last_label_idx = (uint32_t)idx; }
    return idx;
}

#ifdef ASPROF_WALKER
static PyObject *decode(const unsigned char *p, size_t n, const char *dflt) {
    if (n == 0) return PyUnicode_FromString(dflt);
    return PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, "replace");
}

static long add_unknown_code(batch *b) {
    if (b->unknown_code >= 0) return b->unknown_code;
    PyObject *t = Py_BuildValue("(sssi)", "<unknown>", "<unknown>", "", 0);
    if (t == NULL || PyList_Append(b->codes, t) != 0) { Py_XDECREF(t); return -1; }
    Py_DECREF(t);
    b->unknown_code = (long)PyList_GET_SIZE(b->codes) - 1;
    return b->unknown_code;
}

/* The (code id, line) pairs of stack idx of half h, leaf first. New reference to a list. */
static PyObject *python_pairs(batch *b, bi_half *h, uint32_t idx) {
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    bi_stack *e = &h->stacks[idx];
    if (atomic_load(&e->ready) != 1) return out;
    pf_codetable *t = h->codes;
    for (uint32_t i = 0; i < e->n; i++) {
        bi_frame *f = &h->frames[e->off + i];
        long id;
        int line = 0;
        pf_code_t *c = f->idx < PF_CODE_CAP ? &t->entries[f->idx] : NULL;
        if (c == NULL || !atomic_load(&c->ready)) {
            id = add_unknown_code(b);
        } else {
            if (b->code_map[f->idx] < 0) {
                PyObject *name = decode(t->arena + c->nm_off, c->nm_len, "<unknown>");
                PyObject *qual = decode(t->arena + c->qn_off, c->qn_len, "<unknown>");
                PyObject *file = decode(t->arena + c->fn_off, c->fn_len, "");
                PyObject *tup = (name && qual && file) ? Py_BuildValue("(OOOi)", name, qual, file, (int)c->firstlineno) : NULL;
                Py_XDECREF(name); Py_XDECREF(qual); Py_XDECREF(file);
                if (tup == NULL) { Py_DECREF(out); return NULL; }
                PyObject *known = PyDict_GetItemWithError(b->code_dedup, tup);  /* the same code in both halves */
                if (known != NULL) {
                    b->code_map[f->idx] = (int32_t)PyLong_AsLong(known);
                } else {
                    PyObject *v = PyLong_FromSsize_t(PyList_GET_SIZE(b->codes));
                    if (PyErr_Occurred() || v == NULL || PyDict_SetItem(b->code_dedup, tup, v) != 0 ||
                        PyList_Append(b->codes, tup) != 0) {
                        Py_XDECREF(v); Py_DECREF(tup); Py_DECREF(out); return NULL;
                    }
                    Py_DECREF(v);
                    b->code_map[f->idx] = (int32_t)(PyList_GET_SIZE(b->codes) - 1);
                }
                Py_DECREF(tup);
            }
            id = b->code_map[f->idx];
            if (c->lt_len >= 0) {
                line = pf_addr2line(t->arena + c->lt_off, c->lt_len, c->firstlineno, f->lasti);
                if (line < 0) line = 0;
            }
        }
        if (id < 0) { Py_DECREF(out); return NULL; }
        PyObject *a = PyLong_FromLong(id), *l = PyLong_FromLong(line);
        int bad = a == NULL || l == NULL || PyList_Append(out, a) != 0 || PyList_Append(out, l) != 0;
        Py_XDECREF(a); Py_XDECREF(l);
        if (bad) { Py_DECREF(out); return NULL; }
    }
    return out;
}
#endif

/* Native symbols resolved so far, kept across collects: a profile's native PCs are much the same
   from one collect to the next, and dladdr walks the library's whole symbol table (tens of
   microseconds in libpython; PCs in functions it has no symbol for, such as a stripped library's
   static ones, got no range and paid it per PC per collect: a third of the collector's time with
   zlib in the profile). Only collect() uses them (`collecting` keeps out a second one), with the
   GIL. Cleared at start() (libraries may have changed) and when full. */
#define SYM_PCS_MAX 65536
#define SYM_RANGES_MAX 65536
static PyObject *sym_pcs;   /* pc -> (sym, lib) */
static struct sym_range {
    uint64_t lo, hi;
    PyObject *nat;          /* (sym, lib) */
    uint64_t gen;           /* batch that id belongs to */
    long id;
} *sym_ranges;              /* sorted by lo */
static size_t sym_nranges, sym_cap_ranges;
static uint64_t batch_gen;

static void sym_cache_clear(void) {
    Py_CLEAR(sym_pcs);
    for (size_t i = 0; i < sym_nranges; i++) Py_DECREF(sym_ranges[i].nat);
    PyMem_Free(sym_ranges);
    sym_ranges = NULL;
    sym_nranges = sym_cap_ranges = 0;
}

/* The symbol range holding pc, or the index where one starting above pc would go. */
static size_t range_find(uint64_t pc, int *hit) {
    size_t lo = 0, hi = sym_nranges;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (sym_ranges[mid].lo <= pc) lo = mid + 1;
        else hi = mid;
    }
    *hit = lo > 0 && pc < sym_ranges[lo - 1].hi;
    return *hit ? lo - 1 : lo;
}

/* Remembers [lo, hi) -> nat: the next PCs in that function skip dladdr. Best effort: no room,
   no cache. */
static void range_add(uint64_t lo, uint64_t hi, PyObject *nat) {
    int hit;
    size_t at = range_find(lo, &hit);
    if (hit || (at < sym_nranges && sym_ranges[at].lo < hi)) return;  /* overlaps one we have */
    if (sym_nranges >= SYM_RANGES_MAX) return;
    if (sym_nranges == sym_cap_ranges) {
        size_t cap = sym_cap_ranges ? sym_cap_ranges * 2 : 256;
        void *p = PyMem_Realloc(sym_ranges, cap * sizeof(*sym_ranges));
        if (p == NULL) return;
        sym_ranges = p;
        sym_cap_ranges = cap;
    }
    memmove(&sym_ranges[at + 1], &sym_ranges[at], (sym_nranges - at) * sizeof(*sym_ranges));
    Py_INCREF(nat);
    sym_ranges[at] = (struct sym_range){lo, hi, nat, 0, -1};
    sym_nranges++;
}

/* The batch's id of native frame nat ((sym, lib)); -1 with an exception set on error. */
static long nat_id(batch *b, PyObject *nat) {
    PyObject *known = PyDict_GetItemWithError(b->native_map, nat);
    if (known != NULL) return PyLong_AsLong(known);
    if (PyErr_Occurred() || PyList_Append(b->natives, nat) != 0) return -1;
    long id = (long)PyList_GET_SIZE(b->natives) - 1;
    PyObject *v = PyLong_FromLong(id);
    if (v == NULL || PyDict_SetItem(b->native_map, nat, v) != 0) id = -1;
    Py_XDECREF(v);
    return id;
}

/* Native id of pc (cached per pc in the batch, per pc and per symbol range across batches, else
   dladdr); -1 with an exception set on error. */
static long native_id(batch *b, uint64_t pc) {
    int in_range;
    size_t r = range_find(pc, &in_range);
    if (in_range) {
        struct sym_range *g = &sym_ranges[r];
        if (g->gen != b->gen) {
            long id = nat_id(b, g->nat);
            if (id < 0) return -1;
            g->gen = b->gen;
            g->id = id;
        }
        return g->id;
    }
    PyObject *key = PyLong_FromUnsignedLongLong(pc);
    if (key == NULL) return -1;
    PyObject *hit = PyDict_GetItemWithError(b->pc_map, key);
    if (hit != NULL) { Py_DECREF(key); return PyLong_AsLong(hit); }
    if (PyErr_Occurred()) { Py_DECREF(key); return -1; }
    if (sym_pcs == NULL && (sym_pcs = PyDict_New()) == NULL) { Py_DECREF(key); return -1; }
    PyObject *nat = PyDict_GetItemWithError(sym_pcs, key);  /* borrowed */
    long id = -1;
    if (nat != NULL) {
        Py_INCREF(nat);
    } else if (PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    } else {
        Dl_info info;
        const ElfW(Sym) *esym = NULL;
        const char *sym, *lib = "";
        memset(&info, 0, sizeof(info));
        if (dladdr1((void *)(uintptr_t)pc, &info, (void **)&esym, RTLD_DL_SYMENT) != 0) {
            if (info.dli_fname != NULL) lib = info.dli_fname;
        }
        /* No symbol: "?", one native frame per library (the PC itself, differing per sample and
           per run, made as many frames and stacks as PCs for the writer to go through, all
           shown as the same "[libz.so.1]") */
        sym = info.dli_sname != NULL ? info.dli_sname : "?";
        nat = Py_BuildValue("(ss)", sym, lib);
        if (nat == NULL) { Py_DECREF(key); return -1; }
        if (info.dli_sname != NULL && info.dli_saddr != NULL && esym != NULL && esym->st_size > 0) {
            uint64_t lo = (uint64_t)(uintptr_t)info.dli_saddr, hi = lo + (uint64_t)esym->st_size;
            if (lo <= pc && pc < hi) range_add(lo, hi, nat);
        }
        if (PyDict_GET_SIZE(sym_pcs) >= SYM_PCS_MAX) PyDict_Clear(sym_pcs);  /* bounded */
        if (PyDict_SetItem(sym_pcs, key, nat) != 0) PyErr_Clear();  /* a cache: best effort */
    }
    id = nat_id(b, nat);
    Py_DECREF(nat);
    if (id >= 0) {
        PyObject *v = PyLong_FromLong(id);
        if (v == NULL || PyDict_SetItem(b->pc_map, key, v) != 0) id = -1;
        Py_XDECREF(v);
    }
    Py_DECREF(key);
    return id;
}

/* Final stack id of (native id or -1, stack index); -1 with an exception on error. */
static long final_stack(batch *b, bi_half *h, long nat, uint32_t idx) {
    PyObject *ck = PyLong_FromLongLong((long long)(nat + 1) * (1LL << 25) + (long long)idx);
    if (ck == NULL) return -1;
    PyObject *hit = PyDict_GetItemWithError(b->combo_map, ck);
    if (hit != NULL) { Py_DECREF(ck); return PyLong_AsLong(hit); }
    if (PyErr_Occurred()) { Py_DECREF(ck); return -1; }
    long id = -1;
    PyObject *refs = PyList_New(0);
    if (refs == NULL) goto done;
    if (nat >= 0) {
        PyObject *a = PyLong_FromLong(-nat - 1), *z = PyLong_FromLong(0);
        int bad = a == NULL || z == NULL || PyList_Append(refs, a) != 0 || PyList_Append(refs, z) != 0;
        Py_XDECREF(a); Py_XDECREF(z);
        if (bad) goto done;
    }
#ifdef ASPROF_WALKER
    if (idx < BI_STACK_CAP) {
        if (b->py_pairs[idx] == NULL && (b->py_pairs[idx] = python_pairs(b, h, idx)) == NULL) goto done;
        PyObject *pairs = b->py_pairs[idx];
        if (PyList_SetSlice(refs, PyList_GET_SIZE(refs), PyList_GET_SIZE(refs), pairs) != 0) goto done;
    }
#else
    (void)h;
#endif
    PyObject *tup = PyList_AsTuple(refs);
    if (tup == NULL) goto done;
    PyObject *known = PyDict_GetItemWithError(b->stack_map, tup);
    if (known != NULL) id = PyLong_AsLong(known);
    else if (!PyErr_Occurred() && PyList_Append(b->stacks, tup) == 0) {
        id = (long)PyList_GET_SIZE(b->stacks) - 1;
        PyObject *v = PyLong_FromLong(id);
        if (v == NULL || PyDict_SetItem(b->stack_map, tup, v) != 0) id = -1;
        Py_XDECREF(v);
    }
    Py_DECREF(tup);
    if (id >= 0) {
        PyObject *v = PyLong_FromLong(id);
        if (v == NULL || PyDict_SetItem(b->combo_map, ck, v) != 0) id = -1;
        Py_XDECREF(v);
    }
done:
    Py_XDECREF(refs);
    Py_DECREF(ck);
    return id;
}

/* Timer overruns, spread evenly over each thread's CPU samples.
 *
 * A thread CPU-clock timer is checked on scheduler ticks: at intervals below a tick, one signal
 * stands for 1 + si_overrun intervals. Crediting that weight to the stack the signal found
 * biases the profile (the CPU time behind an overrun was spent before, in whatever ran then,
 * e.g. the bursts between GIL waits). Each signal is an unbiased sample, so the batch keeps
 * every signal's stack and gives each thread's samples, in turn, copies adding up to the
 * thread's total weight: counts stay CPU time / interval per thread, shares stay unbiased. */
typedef struct {
    uint32_t tid, raw, seen;
    uint64_t weight;
} spread_entry;

typedef struct {
    spread_entry *tab;
    uint32_t cap;   /* power of two, or 0: no spreading (each signal keeps its own weight) */
} spread;

static spread_entry *spread_find(spread *sp, uint32_t tid) {
    uint32_t i = (tid * 2654435761u) & (sp->cap - 1);
    for (uint32_t p = 0; p < sp->cap; p++, i = (i + 1) & (sp->cap - 1)) {
        if (sp->tab[i].tid == tid) return &sp->tab[i];
        if (sp->tab[i].tid == 0) {
            sp->tab[i].tid = tid;
            return &sp->tab[i];
        }
    }
    return NULL;
}

static void spread_init(spread *sp, bi_half *h, uint32_t n) {
    sp->cap = 1024;
    sp->tab = PyMem_Calloc(sp->cap, sizeof(spread_entry));
    if (sp->tab == NULL) { sp->cap = 0; return; }
    for (uint32_t i = 0; i < n; i++) {
        bi_sample *s = &h->samples[i];
        if (s->packed == 0xFFFFFFFFu || s->tid == 0 || ((s->packed >> 24) & 1u) != 0) continue;
        spread_entry *e = spread_find(sp, s->tid);
        if (e == NULL) { PyMem_Free(sp->tab); sp->tab = NULL; sp->cap = 0; return; }  /* too many threads */
        e->raw++;
        e->weight += 1u + (s->packed >> 27);
    }
}

/* Copies of the next CPU sample of tid: floor((k+1) W / R) - floor(k W / R) for its k-th sample. */
static unsigned spread_copies(spread *sp, uint32_t tid, unsigned own) {
    if (sp->cap == 0) return own;
    spread_entry *e = spread_find(sp, tid);
    if (e == NULL || e->raw == 0) return own;
    uint64_t k = e->seen++;
    return (unsigned)((k + 1) * e->weight / e->raw - k * e->weight / e->raw);
}

static void put_u32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static void put_u64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i)); }

/* The samples of half h appended to *samples (records, at *kept). 0, or -1 with an exception. */
static int drain_half(batch *b, bi_half *h, PyObject **samples, uint32_t *kept) {
    int rc = -1;
    spread sp;
    memset(&sp, 0, sizeof(sp));
    uint32_t n = atomic_load(&h->nsamples);
    if (n > BI_SAMPLE_CAP) n = BI_SAMPLE_CAP;
    if (n == 0) return 0;
    /* per half: its stack and code indices */
    Py_XSETREF(b->combo_map, PyDict_New());
    if (b->combo_map == NULL) return -1;
#ifdef ASPROF_WALKER
    b->py_pairs = PyMem_Calloc(BI_STACK_CAP, sizeof(PyObject *));
    b->code_map = PyMem_Malloc(PF_CODE_CAP * sizeof(int32_t));
    if (b->py_pairs == NULL || b->code_map == NULL) { PyErr_NoMemory(); goto out; }
    memset(b->code_map, 0xFF, PF_CODE_CAP * sizeof(int32_t));
#endif
    if ((size_t)PyBytes_GET_SIZE(*samples) < ((size_t)*kept + n) * 20 &&
        _PyBytes_Resize(samples, (Py_ssize_t)(*kept + n) * 20) != 0) goto out;
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(*samples);
    spread_init(&sp, h, n);
    for (uint32_t i = 0; i < n; i++) {
        bi_sample *s = &h->samples[i];
        if (s->packed == 0xFFFFFFFFu || s->tid == 0) continue;  /* lost in the handler */
        uint32_t idx = s->packed & 0xFFFFFFu;
        unsigned kind = (s->packed >> 24) & 1u, state = (s->packed >> 25) & 3u;
        long nat = -1;
        if (s->pc != 0 && (nat = native_id(b, s->pc)) < 0) goto out;
        long sid = final_stack(b, h, nat, idx);
        if (sid < 0) goto out;
        long lix = label_index(b, s->label);
        if (lix < 0) goto out;
        unsigned copies = kind == 0 ? spread_copies(&sp, s->tid, 1u + (s->packed >> 27)) : 1u;
        if ((size_t)(*kept + copies) * 20 > (size_t)PyBytes_GET_SIZE(*samples)) {
            /* room for the overrun copies: grow the output */
            Py_ssize_t want = (Py_ssize_t)(*kept + copies + (n - i)) * 20 * 2;
            if (_PyBytes_Resize(samples, want) != 0) goto out;
            w = (unsigned char *)PyBytes_AS_STRING(*samples);
        }
        for (unsigned k = 0; k < copies; k++) {
            unsigned char *r = w + (size_t)*kept * 20;
            put_u64(r, s->time);
            put_u32(r + 8, s->tid);
            put_u32(r + 12, (uint32_t)sid);
            r[16] = (unsigned char)kind;
            r[17] = (unsigned char)state;
            r[18] = (unsigned char)(lix & 0xFF);
            r[19] = (unsigned char)((lix >> 8) & 0xFF);
            (*kept)++;
        }
    }
    rc = 0;
out:
    PyMem_Free(sp.tab);
    if (b->py_pairs != NULL) {
        for (uint32_t i = 0; i < BI_STACK_CAP; i++) Py_XDECREF(b->py_pairs[i]);
        PyMem_Free(b->py_pairs);
        b->py_pairs = NULL;
    }
    PyMem_Free(b->code_map);
    b->code_map = NULL;
    return rc;
}

/* One batch of the halves given (either may be NULL), self-contained. */
static PyObject *drain(bi_half *h1, bi_half *h2, uint64_t lost) {
    batch b;
    memset(&b, 0, sizeof(b));
    b.unknown_code = -1;
    b.gen = ++batch_gen;
    PyObject *samples = NULL, *result = NULL;
    b.codes = PyList_New(0); b.natives = PyList_New(0); b.stacks = PyList_New(0);
    b.pc_map = PyDict_New(); b.native_map = PyDict_New(); b.stack_map = PyDict_New(); b.code_dedup = PyDict_New();
    b.labels = PyList_New(0); b.label_map = PyDict_New();
    uint64_t n1 = h1 != NULL ? atomic_load(&h1->nsamples) : 0, n2 = h2 != NULL ? atomic_load(&h2->nsamples) : 0;
    if (n1 > BI_SAMPLE_CAP) n1 = BI_SAMPLE_CAP;
    if (n2 > BI_SAMPLE_CAP) n2 = BI_SAMPLE_CAP;
    /* never the shared empty bytes object: it is resized below */
    samples = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n1 + n2 + 1) * 20);
    if (!b.codes || !b.natives || !b.stacks || !b.pc_map || !b.native_map || !b.stack_map || !b.code_dedup || !samples ||
        !b.labels || !b.label_map)
        goto out;
    uint32_t kept = 0;
    if (h1 != NULL && drain_half(&b, h1, &samples, &kept) != 0) goto out;
    if (h2 != NULL && drain_half(&b, h2, &samples, &kept) != 0) goto out;
    if ((Py_ssize_t)kept * 20 != PyBytes_GET_SIZE(samples) && _PyBytes_Resize(&samples, (Py_ssize_t)kept * 20) != 0)
        goto out;
    result = Py_BuildValue("(OOOOK)", b.codes, b.natives, b.stacks, samples, (unsigned long long)lost);
    if (result != NULL) {
        Py_INCREF(b.labels);
        Py_XSETREF(last_labels, b.labels);
    }
out:
    Py_XDECREF(b.labels); Py_XDECREF(b.label_map);
    Py_XDECREF(b.codes); Py_XDECREF(b.natives); Py_XDECREF(b.stacks);
    Py_XDECREF(b.pc_map); Py_XDECREF(b.native_map); Py_XDECREF(b.stack_map); Py_XDECREF(b.combo_map);
    Py_XDECREF(b.code_dedup);
    Py_XDECREF(samples);
    return result;
}

static PyObject *bi_collect(PyObject *self, PyObject *noargs) {
    if (collecting) {
        PyErr_SetString(PyExc_RuntimeError, "collect() is already running in another thread");
        return NULL;
    }
    if (bi.halves[0].samples == NULL) return drain(NULL, NULL, 0);  /* never started */
    collecting = 1;
    bi_half *h;
    Py_BEGIN_ALLOW_THREADS
    h = bi_store_swap();
    Py_END_ALLOW_THREADS
    uint64_t lost_now = atomic_load(&bi.n.lost);
    atomic_fetch_add(&bi.n.collects, 1);
    PyObject *r = drain(h, NULL, lost_now - lost_reported);
    if (r != NULL) {
        lost_reported = lost_now;
    } else if (h != NULL) {
        /* Could not hand them out (MemoryError): they are counted as lost, never silently gone
           (the next collect() reports them; "samples" counts what was handed out or is held). */
        uint32_t n = atomic_load(&h->nsamples), held = 0;
        if (n > BI_SAMPLE_CAP) n = BI_SAMPLE_CAP;
        for (uint32_t i = 0; i < n; i++)
            held += h->samples[i].packed != 0xFFFFFFFFu && h->samples[i].tid != 0;
        atomic_fetch_add(&bi.n.lost, held);
        atomic_fetch_sub(&bi.n.samples, held);
    }
    if (h != NULL) bi_store_reset(h);
    collecting = 0;
    return r;
}

/* ---------------------------------------------------------------- stats ---- */

static int put(PyObject *d, const char *k, unsigned long long v) {
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    int rc = o == NULL ? -1 : PyDict_SetItemString(d, k, o);
    Py_XDECREF(o);
    return rc;
}

static PyObject *bi_labels_hooked(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(bi_ctx_sample != NULL);
}

/* ---- encode(): collect()'s packed records as JFR sample events, in C ----
   The same bytes as asprof.jfrio.writer.ChunkWriter.samples_from (which stays the reference and
   the fallback; tests compare the two): per record, the event size (one byte), the type
   (jdk.ExecutionSample 101 for kind 0, whose state is written as 0; profiler.WallClockSample 119
   for kind 1, then samples = 1 and timeSpan = 0), startTime, sampledThread, stackTrace, state, as
   JFR varints. At 1 kHz the Python loop was ~1 us per sample of the collector's time. */

static size_t put_varint(unsigned char *o, uint64_t v) {
    size_t n = 0;
    for (int i = 0; i < 8; i++) {
        if (v < 0x80) { o[n++] = (unsigned char)v; return n; }
        o[n++] = (unsigned char)((v & 0x7F) | 0x80);
        v >>= 7;
    }
    o[n++] = (unsigned char)v;  /* the 9th byte whole */
    return n;
}

static PyObject *bi_encode(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *keys_obj, *skip_obj;
    if (!PyArg_ParseTuple(args, "y*OO:encode", &buf, &keys_obj, &skip_obj)) return NULL;
    PyObject *result = NULL, *out = NULL, *tids = NULL, *keys = NULL;
    uint64_t *kv = NULL;
    if (buf.len % 20 != 0) {
        PyErr_SetString(PyExc_ValueError, "encode: packed records must be 20 bytes each");
        goto done;
    }
    keys = PySequence_Fast(keys_obj, "encode: stack_keys must be a sequence");
    if (keys == NULL) goto done;
    Py_ssize_t nkeys = PySequence_Fast_GET_SIZE(keys);
    kv = PyMem_Malloc((size_t)(nkeys > 0 ? nkeys : 1) * sizeof(uint64_t));
    if (kv == NULL) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < nkeys; i++) {
        kv[i] = PyLong_AsUnsignedLongLongMask(PySequence_Fast_GET_ITEM(keys, i));
        if (PyErr_Occurred()) goto done;
    }
    Py_ssize_t nrec = buf.len / 20;
    out = PyBytes_FromStringAndSize(NULL, nrec * 32 + 1);  /* an event is at most 2+9+5+9+1+2 bytes */
    tids = PySet_New(NULL);
    if (out == NULL || tids == NULL) goto done;
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out), *o0 = o;
    const unsigned char *r = buf.buf;
    uint64_t last = 0, n = 0;
    /* tid -> 1 skipped, 2 kept (open addressing; threads are few): the Python set is asked once per tid */
    enum { TCAP = 512 };
    uint32_t ttid[TCAP];
    unsigned char tflag[TCAP];
    memset(tflag, 0, sizeof(tflag));
    int tused = 0;
    for (Py_ssize_t i = 0; i < nrec; i++, r += 20) {
        uint64_t t;
        uint32_t tid, sid;
        memcpy(&t, r, 8); memcpy(&tid, r + 8, 4); memcpy(&sid, r + 12, 4);
        unsigned kind = r[16], state = r[17];
        unsigned h = (tid * 2654435761u) & (TCAP - 1), flag = 0;
        for (int p = 0; p < TCAP; p++, h = (h + 1) & (TCAP - 1)) {
            if (tflag[h] == 0 || ttid[h] == tid) { flag = tflag[h]; break; }
        }
        if (flag == 0) {
            PyObject *k = PyLong_FromUnsignedLong(tid);
            if (k == NULL) goto done;
            int skip = PySequence_Contains(skip_obj, k);
            if (skip < 0 || (!skip && PySet_Add(tids, k) != 0)) { Py_DECREF(k); goto done; }
            Py_DECREF(k);
            flag = skip ? 1u : 2u;
            if (tused < TCAP / 2 && tflag[h] == 0) { ttid[h] = tid; tflag[h] = (unsigned char)flag; tused++; }
        }
        if (flag == 1) continue;
        if (kind > 1 || state > 2) {
            PyErr_Format(PyExc_ValueError, "sample record: kind %u, state %u", kind, state);
            goto done;
        }
        if ((Py_ssize_t)sid >= nkeys) {
            PyErr_Format(PyExc_ValueError, "sample record: stack %u of %zd", (unsigned)sid, nkeys);
            goto done;
        }
        unsigned char *e = o;
        o += 1;
        *o++ = kind ? 119 : 101;
        o += put_varint(o, t);
        o += put_varint(o, tid);
        o += put_varint(o, kv[sid]);
        *o++ = (unsigned char)(kind ? state : 0);
        if (kind) { *o++ = 1; *o++ = 0; }
        *e = (unsigned char)(o - e);
        if (t > last) last = t;
        n++;
    }
    if (_PyBytes_Resize(&out, (Py_ssize_t)(o - o0)) != 0) { out = NULL; goto done; }
    result = Py_BuildValue("(OKKO)", out, (unsigned long long)n, (unsigned long long)last, tids);
done:
    PyBuffer_Release(&buf);
    Py_XDECREF(keys);
    Py_XDECREF(out);
    Py_XDECREF(tids);
    PyMem_Free(kv);
    return result;
}

static PyObject *bi_set_inert(PyObject *self, PyObject *on) {
    int v = PyObject_IsTrue(on);
    if (v < 0) return NULL;
    atomic_store(&bi_inert, v);
    Py_RETURN_NONE;
}

static PyObject *bi_batch_labels(PyObject *self, PyObject *noargs) {
    if (last_labels == NULL) return PyList_New(0);
    Py_INCREF(last_labels);
    return last_labels;
}

/* issue #13: called when the application set SIGPROF's handler from Python (engines/signals.py). */
static PyObject *bi_recheck(PyObject *self, PyObject *noargs) {
    Py_BEGIN_ALLOW_THREADS
    bi_sampler_recheck();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *bi_stats(PyObject *self, PyObject *noargs) {
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
#define C(name) put(d, #name, atomic_load(&bi.n.name))
    int rc = C(signals) | C(samples) | C(lost) | C(chained) | C(no_python) | C(truncated) | C(handler_calls) |
             C(handler_ns) | C(handler_slow) | C(inert) | C(no_guard) | C(masked) | C(unknown_code) | C(handler_reinstalled) |
             C(wall_sent) | C(wall_failed) | C(timer_failed) | C(collects) | C(collect_timeouts) |
             C(perf_rearmed) | C(chain_loops) | C(wall_repeated) | C(wall_from_cpu);
#undef C
    rc |= put(d, "memory_bytes", (unsigned long long)bi_store_resident());
    rc |= put(d, "threads", (unsigned long long)bi_sampler_threads());
    rc |= put(d, "timers", (unsigned long long)bi_sampler_timers());
    rc |= put(d, "excluded_threads", (unsigned long long)bi_sampler_excluded());
    rc |= put(d, "perf_events", (unsigned long long)bi_sampler_perf_events());
    rc |= put(d, "foreign_handler", (unsigned long long)atomic_load(&bi_foreign_fn));  /* issue #13 */
    rc |= put(d, "itimer_taken", (unsigned long long)atomic_load(&bi.itimer_taken));
    rc |= put(d, "itimer_shared", (unsigned long long)atomic_load(&bi.itimer_shared));
#ifdef ASPROF_WALKER
    rc |= put(d, "faults_recovered", pf_safeload_faults());
#else
    rc |= put(d, "faults_recovered", 0);
#endif
    if (rc != 0) { Py_DECREF(d); return NULL; }
    return d;
}

/* _bench(n): the handler's work for one wall sample of the calling thread, run n times outside
   a signal (5 batches; the fastest per call, in ns). Only while stopped; leaves no sample and no
   counter behind. For benchmarks. */
static PyObject *bi_bench(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > (long)BI_SAMPLE_CAP / 5) {
        PyErr_Format(PyExc_ValueError, "n must be in 1..%ld", (long)BI_SAMPLE_CAP / 5);
        return NULL;
    }
    if (started || starting || collecting) {
        PyErr_SetString(PyExc_RuntimeError, "_bench() needs the engine stopped");
        return NULL;
    }
    if (bi_store_init() != 0) return PyErr_NoMemory();
    bi_counters saved;
    memcpy(&saved, &bi.n, sizeof(saved));
    for (int i = 0; i < 2; i++) bi_store_reset(&bi.halves[i]);
    bi.max_frames = 128;
#ifdef ASPROF_WALKER
    atomic_store(&bi.guard_ok, pf_safeload_install() == 0 && pf_safeload_active());
#endif
    siginfo_t si;
    memset(&si, 0, sizeof(si));
    si.si_signo = SIGPROF;
    si.si_code = SI_QUEUE;
    si.si_value.sival_ptr = (void *)(uintptr_t)(BI_MAGIC | BI_VAL_WALL | 1u);
    uint64_t best = UINT64_MAX;
    atomic_store(&bi.enabled, 1);
    for (int batch = 0; batch < 5; batch++) {
        uint64_t t0 = pf_mono_ns();
        for (long i = 0; i < n; i++) bi_handler(SIGPROF, &si, NULL);
        uint64_t dt = (pf_mono_ns() - t0) / (uint64_t)n;
        if (dt < best) best = dt;
    }
    atomic_store(&bi.enabled, 0);
    for (int i = 0; i < 2; i++) bi_store_reset(&bi.halves[i]);
    memcpy(&bi.n, &saved, sizeof(saved));
    lost_reported = atomic_load(&bi.n.lost);
    return PyLong_FromUnsignedLongLong(best);
}

static PyMethodDef methods[] = {
    {"_bench", bi_bench, METH_O, "_bench(n) -> ns per sample of the handler's work (benchmarks)"},
    {"start", (PyCFunction)(void (*)(void))bi_start, METH_VARARGS | METH_KEYWORDS,
     "start(cpu_interval_ns, wall_interval_ns, max_frames=128, cpu_mode='auto') -> CPU mode in use"},
    {"stop", bi_stop, METH_NOARGS, "stop() -> None: timers deleted, sampler thread joined"},
    {"running", bi_running, METH_NOARGS, "running() -> bool"},
    {"collect", bi_collect, METH_NOARGS, "collect() -> (codes, natives, stacks, samples, lost)"},
    {"_set_inert", bi_set_inert, METH_O,
     "_set_inert(on) -> None: benchmarks only: the handler takes our signals and does nothing else "
     "(what the signals alone cost)"},
    {"encode", bi_encode, METH_VARARGS,
     "encode(samples, stack_keys, skip_tids) -> (events, n, last_ticks, tids): collect()'s records as JFR "
     "sample events (ChunkWriter.samples_from's bytes)"},
    {"stats", bi_stats, METH_NOARGS, "stats() -> dict of cumulative counters"},
    {"recheck", bi_recheck, METH_NOARGS, "recheck() -> None: our SIGPROF handler in front and perf events re-armed now"},
    {"batch_labels", bi_batch_labels, METH_NOARGS,
     "batch_labels() -> label-set ids of the last collect() (a record's reserved field is an index + 1)"},
    {"labels_hooked", bi_labels_hooked, METH_NOARGS, "labels_hooked() -> bool: samples carry label-set ids"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "asprof.engines._builtin",
    "asprof's built-in sampling engine (per-thread CPU-clock timers, wall-clock signals).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__builtin(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
#ifdef ASPROF_WALKER
    char why[256] = "";
    bi_walker_ok = pf_layout_check(why, sizeof(why)) == 0;
    int frames = bi_walker_ok;
    unsigned long version = pf_compiled_version();
#else
    /* free-threaded builds and CPython versions the walker does not know (setup.py) */
    const char *why = "its frame walker was not built for this interpreter";
    int frames = 0;
    unsigned long version = PY_VERSION_HEX;
#endif
    static int atfork_done;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, atfork_child);
        atfork_done = 1;
    }
    if (PyModule_AddObject(m, "python_frames_off", frames ? (Py_INCREF(Py_None), Py_None) : PyUnicode_FromString(why)) != 0 ||
        PyModule_AddObject(m, "python_frames", PyBool_FromLong(frames)) != 0 ||
        PyModule_AddIntConstant(m, "compiled_version", (long)version) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
