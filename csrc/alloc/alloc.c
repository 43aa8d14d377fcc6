/*
 * asprof.engines._alloc: Python allocation sampling with Python stacks, and the live heap
 * (issue #16). Contract: asprof/engines/_alloc.pyi; design: docs/memory.md.
 *
 * Hooks: PyMem_SetAllocator for PYMEM_DOMAIN_RAW, MEM and OBJ, each wrapping the allocator that
 * was there (never replacing it): every call goes on to the previous allocator. On stop() the
 * previous allocator is put back only where our hook is still the one installed; where
 * somebody wrapped us since, ours stays as a pass-through (and is re-used by the next start()).
 * Over CPython's own pymalloc (the default) the MEM and OBJ frees are not hooked: sampled blocks
 * are taken from pymalloc's RAW side, whose frees the RAW hook sees (see "the hooks").
 *
 * Sampling (Poisson over bytes): each thread counts down a distance drawn from an exponential
 * distribution of mean `interval` bytes; the allocation that crosses it is sampled and a new
 * distance drawn. An allocation of s bytes is sampled with probability 1 - exp(-s/interval), so
 * each sample stands for weight = s / (1 - exp(-s/interval)) bytes (unbiased; ~interval for
 * small objects, ~s for large ones).
 *
 * Safety:
 *  - the fast path is a byte countdown (OBJ/MEM: one counter serialised by the GIL their callers
 *    hold; RAW: per thread); no allocation, no lock anywhere in the hooks: every buffer is
 *    mmap-ed once at the first start();
 *  - a thread-local re-entrancy flag: while an OBJ/MEM hook runs (pymalloc hands large blocks
 *    to PyMem_RawMalloc) and while collect() builds its Python objects, nested hooks only pass
 *    the call on;
 *  - recording happens only on a thread that holds the GIL of the main interpreter (checked on
 *    the sample path only): the sample buffer, stack table and live-table inserts are therefore
 *    serialised by the GIL, as is collect(). Frees may come without the GIL (PyMem_RawFree): they
 *    only turn a live-table key into a tombstone with one compare-and-swap;
 *  - the Python stack is read with csrc/pyframes/walk.c through fault-recovering loads (the
 *    SIGSEGV guard of safeload.c must be in place, checked per sample);
 *  - fork: the child's live set, samples and tables are emptied by a pthread_atfork handler
 *    and recording is off until its own agent starts again.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "pyframes.h"
#include "sigcapture.h"

#include <dlfcn.h>
#include <math.h>
#include <signal.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(Py_GIL_DISABLED)
#error "asprof.engines._alloc does not support the free-threaded build"
#endif

#define AL_SAMPLE_CAP (1u << 16)       /* samples between two collects */
#define AL_STACK_CAP (1u << 14)        /* distinct stacks between two collects (power of two) */
#define AL_FRAME_CAP (1u << 19)        /* frames of those stacks */
#define AL_STACK_PROBES 64
#define AL_MAX_FRAMES 256
#define AL_LIVE_PROBES 64
#define AL_LIVE_MAX_CAP (1u << 20)
#define AL_NO_STACK (-1)
#define TOMBSTONE ((uintptr_t)1)

enum { D_RAW = 0, D_MEM = 1, D_OBJ = 2 };

typedef struct {
    uint64_t time, serial, size;
    double weight;
    uint32_t tid;
    int32_t stack;
    uint8_t domain, live, pad[2];
} al_sample;  /* written to Python as "<QQQdIiBBxx" (44 bytes) */

typedef struct {
    uint32_t idx;
    int32_t lasti;
} al_frame;

typedef struct {
    uint64_t hash;   /* 0 = empty */
    uint32_t off;
    uint16_t n, truncated;
} al_stack;

typedef struct {
    _Atomic uintptr_t key;  /* 0 empty, 1 tombstone, else the sampled pointer */
    uint64_t serial;
} al_live;

typedef struct {
    PyMemAllocatorEx prev;
    int domain;
} al_ctx;

/* ---- state ---- */

static al_ctx ctxs[3];
static int chained[3];                 /* our hook is in the domain's chain (installed, not removed) */
static _Atomic int enabled;
static _Atomic uint32_t generation;    /* bumped by start(): threads draw a new distance */
static double interval = 512 * 1024.0;
static int max_frames = 128;

static al_sample *samples;
static uint32_t nsamples;
static al_stack *stacks;
static uint32_t nstacks;
static al_frame *frames;
static uint32_t frames_used;
static pf_codetable *codes;

static al_live *live;
static uint32_t live_slots = 0;        /* power of two; 0 before the first start() */
static uint32_t live_cap;
static _Atomic uint32_t live_count;
#define AL_FILTER_SIZE (1u << 17)      /* the free path's counting filter: bytes (in .bss, touched as used) */
static _Atomic uint8_t filter[AL_FILTER_SIZE] __attribute__((aligned(4096)));

static uint64_t serial_next;
static uint64_t lost_reported;  /* n.lost at the previous collect */

static struct {
    _Atomic uint64_t samples, lost, live_overflow, no_stack, no_gil, no_guard, truncated, frees_tracked,
        filter_hits, collects;
} n;

static int guard_ok;
/* pf_layout_check at import: the frame walker's layout is this interpreter's (3.14: checked
   against _PyRuntime.debug_offsets). When it is not, start() refuses (no stacks to give). */
static int walker_ok;
static char walker_why[256];

typedef struct {
    int64_t countdown;
    uint64_t rng;
    uint32_t gen;
    uint32_t tid;
    int in_hook;
} al_tls;
static __thread al_tls T __attribute__((tls_model("initial-exec")));

/* ---- helpers (no allocation, no lock) ---- */

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return x;
}

static inline uint32_t my_tid(void) {
    if (T.tid == 0) T.tid = (uint32_t)syscall(SYS_gettid);
    return T.tid;
}

/* An exponential distance of mean `interval` bytes (at least 1). */
static int64_t draw(void) {
    if (T.rng == 0) T.rng = mix64(((uint64_t)my_tid() << 32) ^ pf_mono_ns() ^ (uintptr_t)&T) | 1;
    uint64_t x = T.rng;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    T.rng = x;
    double u = ((double)(x >> 11) + 0.5) * (1.0 / 9007199254740992.0);  /* (0, 1) */
    double d = -log(u) * interval;
    if (d < 1.0) d = 1.0;
    if (d > 9.0e18) d = 9.0e18;
    return (int64_t)d;
}

static inline uint32_t home_of(uintptr_t p) { return (uint32_t)mix64((uint64_t)p) & (live_slots - 1); }

/* The free path's check: a counting filter of the live keys, 128 Ki one-byte counters at a
   fixed address indexed by address bits 4..20 (blocks are 16-byte aligned; 0 = no sampled block
   can be at p, also true of every p while nothing is live); a counter at 255 sticks (never
   decremented). One shift, one mask, one load and one test on the fast path. */
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
static inline uint32_t filter_of(uintptr_t p) { return (uint32_t)(p >> 4) & (AL_FILTER_SIZE - 1); }

static inline void filter_add(uint32_t home, int delta) {
    uint8_t c = atomic_load_explicit(&filter[home], memory_order_relaxed);
    while (c != 255) {
        uint8_t next = (uint8_t)(c + delta);
        if (delta > 0 && c == 254) next = 255;
        if (atomic_compare_exchange_weak(&filter[home], &c, next)) return;
    }
}

/* Removes p from the live set (found there). Any thread, GIL or not. */
static __attribute__((noinline)) void live_remove_slow(uintptr_t p) {
    atomic_fetch_add_explicit(&n.filter_hits, 1, memory_order_relaxed);
    uint32_t mask = live_slots - 1;
    uint32_t h = home_of(p);
    for (uint32_t i = 0; i < AL_LIVE_PROBES; i++) {
        al_live *e = &live[(h + i) & mask];
        uintptr_t k = atomic_load_explicit(&e->key, memory_order_acquire);
        if (k == 0) return;
        if (k == p) {
            uintptr_t expect = p;
            if (atomic_compare_exchange_strong(&e->key, &expect, TOMBSTONE)) {
                atomic_fetch_sub(&live_count, 1);
                filter_add(filter_of(p), -1);
                atomic_fetch_add_explicit(&n.frees_tracked, 1, memory_order_relaxed);
            }
            return;
        }
    }
}

/* The free path's check: no sampled block can be at p (NULL included: the slow path finds no key 0). */
static inline void live_remove(uintptr_t p) {
    if (UNLIKELY(atomic_load_explicit(&filter[filter_of(p)], memory_order_relaxed) != 0)) live_remove_slow(p);
}

/* Adds p (GIL held). 1 when it is tracked, 0 when the live set is full. */
static int live_insert(uintptr_t p, uint64_t serial) {
    uint32_t mask = live_slots - 1;
    uint32_t h = home_of(p);
    al_live *free_slot = NULL;
    for (uint32_t i = 0; i < AL_LIVE_PROBES; i++) {
        al_live *e = &live[(h + i) & mask];
        uintptr_t k = atomic_load_explicit(&e->key, memory_order_acquire);
        if (k == p) { e->serial = serial; return 1; }  /* stale entry of a free we did not see */
        if (k == TOMBSTONE || k == 0) {
            if (free_slot == NULL) free_slot = e;
            if (k == 0) break;
        }
    }
    if (free_slot == NULL || atomic_load(&live_count) >= live_cap) {
        atomic_fetch_add_explicit(&n.live_overflow, 1, memory_order_relaxed);
        return 0;
    }
    free_slot->serial = serial;
    filter_add(filter_of(p), 1);
    uintptr_t k = atomic_load(&free_slot->key);
    /* only this thread (holding the GIL) turns empty/tombstone slots into keys */
    if (!atomic_compare_exchange_strong(&free_slot->key, &k, p)) { filter_add(filter_of(p), -1); return 0; }
    atomic_fetch_add(&live_count, 1);
    return 1;
}

/* The thread holds the GIL of the main interpreter. */
static int holds_main_gil(void) {
    PyThreadState *mine = PyGILState_GetThisThreadState();
    if (mine == NULL) return 0;
#if PY_VERSION_HEX >= 0x030D0000
    PyThreadState *cur = PyThreadState_GetUnchecked();
#else
    PyThreadState *cur = _PyThreadState_UncheckedGet();
#endif
    if (cur != mine) return 0;
    return PyThreadState_GetInterpreter(mine) == PyInterpreterState_Main();
}

static uint64_t hash_frames(const al_frame *fr, int cnt, int truncated) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)cnt ^ ((uint64_t)truncated << 40);
    for (int i = 0; i < cnt; i++) {
        uint64_t x = ((uint64_t)fr[i].idx << 32) | (uint32_t)fr[i].lasti;
        h = (h ^ x) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
    }
    return h ? h : 1;
}

static int32_t stack_index(const al_frame *fr, int cnt, int truncated) {
    uint64_t h = hash_frames(fr, cnt, truncated);
    for (uint32_t p = 0; p < AL_STACK_PROBES; p++) {
        al_stack *e = &stacks[(h + p) & (AL_STACK_CAP - 1)];
        if (e->hash == 0) {
            if (nstacks >= AL_STACK_CAP * 3 / 4 || frames_used + (uint32_t)cnt > AL_FRAME_CAP) return AL_NO_STACK - 1;
            e->hash = h;
            e->off = frames_used;
            e->n = (uint16_t)cnt;
            e->truncated = (uint16_t)truncated;
            memcpy(&frames[frames_used], fr, (size_t)cnt * sizeof(al_frame));
            frames_used += (uint32_t)cnt;
            nstacks++;
            return (int32_t)((h + p) & (AL_STACK_CAP - 1));
        }
        if (e->hash == h && e->n == cnt && e->truncated == truncated &&
            memcmp(&frames[e->off], fr, (size_t)cnt * sizeof(al_frame)) == 0)
            return (int32_t)((h + p) & (AL_STACK_CAP - 1));
    }
    return AL_NO_STACK - 1;
}

/* Our fault guard (safeload.c) recovers a faulting read when it is the SIGSEGV handler, or
   when the handler installed on top of it since passes foreign faults on (the built-in engine's
   and asprof._pyframes' guards, async-profiler's and faulthandler's handlers all do). A default
   or ignored disposition means ours is gone. The reads are of this thread's own frames while it
   holds the GIL: a fault would take a bug in the walker. */
static int guard_in_chain(void) {
    if (pf_safeload_segv_active()) return 1;
    struct sigaction cur;
    if (sigaction(SIGSEGV, NULL, &cur) != 0) return 0;
    return (cur.sa_flags & SA_SIGINFO) ? cur.sa_sigaction != NULL
                                        : (cur.sa_handler != SIG_DFL && cur.sa_handler != SIG_IGN);
}

/* The Python stack of this thread (GIL held): its index, AL_NO_STACK, or AL_NO_STACK - 1 (no room). */
static int32_t python_stack(void) {
    void *tstate = pf_this_thread_state();
    if (tstate == NULL || !walker_ok) return AL_NO_STACK;
    if (!guard_ok || !guard_in_chain()) {
        guard_ok = 0;  /* collect() puts it back */
        atomic_fetch_add_explicit(&n.no_guard, 1, memory_order_relaxed);
        return AL_NO_STACK;
    }
    pf_rawframe raw[2 * AL_MAX_FRAMES + 2];
    al_frame fr[AL_MAX_FRAMES];
    int truncated = 0;
    int cnt = pf_walk(tstate, raw, 2 * max_frames + 2, max_frames, &truncated);
    int m = 0;
    for (int i = 0; i < cnt && m < max_frames; i++) {
        if (raw[i].flags & PF_FRAME_BOUNDARY) continue;
        fr[m].idx = pf_code_index(codes, raw[i].code, raw[i].globals);
        fr[m].lasti = raw[i].lasti;
        m++;
    }
    if (truncated) atomic_fetch_add_explicit(&n.truncated, 1, memory_order_relaxed);
    if (m == 0) return AL_NO_STACK;
    return stack_index(fr, m, truncated);
}

/* The OBJ and MEM domains' countdown: their callers hold the GIL, so one counter for all threads
   (GIL-serialised; no thread-local access on their fast path). The byte stream of all threads is
   sampled as one Poisson process: each allocation still has its chance 1 - exp(-s/interval).
   (Interpreters with their own GIL, 3.12+, may race on it: a lost decrement only moves which
   allocation is sampled; theirs are not recorded.) The RAW domain, called without the GIL too,
   counts per thread (T.countdown). */
static int64_t gil_countdown __attribute__((aligned(64)));

/* The sample path, part 1 (before the allocation): the countdown (the GIL one when `gil`)
   crossed zero. A new distance is drawn; 1 when this allocation is to be recorded (then it is
   made, then record()). */
static __attribute__((cold)) int sample_due(int gil) {
    if (gil) {
        gil_countdown = draw();  /* start() draws the first one of a new interval */
    } else {
        uint32_t gen = atomic_load_explicit(&generation, memory_order_relaxed);
        if (T.gen != gen) {  /* a new start(): a distance of the new interval, nothing sampled yet */
            T.gen = gen;
            T.countdown = draw();
            return 0;
        }
        T.countdown = draw();
    }
    if (T.in_hook || !atomic_load_explicit(&enabled, memory_order_relaxed)) return 0;  /* collect()'s own */
    if (!holds_main_gil()) {
        atomic_fetch_add_explicit(&n.no_gil, 1, memory_order_relaxed);
        return 0;
    }
    return 1;
}

/* The sample path, part 2: allocation p of size bytes (GIL held, checked by sample_due). */
static __attribute__((cold)) void record(int domain, void *p, size_t size) {
    T.in_hook = 1;
    atomic_fetch_add_explicit(&n.samples, 1, memory_order_relaxed);
    if (nsamples >= AL_SAMPLE_CAP) {
        atomic_fetch_add_explicit(&n.lost, 1, memory_order_relaxed);
        T.in_hook = 0;
        return;
    }
    int32_t st = python_stack();
    if (st == AL_NO_STACK - 1) {  /* no room in the stack table: lost, not misattributed */
        atomic_fetch_add_explicit(&n.lost, 1, memory_order_relaxed);
        T.in_hook = 0;
        return;
    }
    if (st == AL_NO_STACK) atomic_fetch_add_explicit(&n.no_stack, 1, memory_order_relaxed);
    al_sample *s = &samples[nsamples++];
    double sz = (double)size;
    s->time = pf_mono_ns();
    s->serial = ++serial_next;
    s->size = size;
    s->weight = size == 0 ? interval : sz / -expm1(-sz / interval);
    s->tid = my_tid();
    s->stack = st;
    s->domain = (uint8_t)domain;
    s->live = (uint8_t)live_insert((uintptr_t)p, s->serial);
    T.in_hook = 0;
}

/* The countdown: this thread's bytes left before the next sample, less size; 1 when it reached
   zero (a sample is due). On x86-64 one subtraction in memory and its flags (the TLS offset comes
   from the GOT: initial-exec, no call). */
#if defined(__x86_64__) && defined(__GNUC__)
static inline __attribute__((always_inline)) int countdown_crossed(size_t size) {
    _Static_assert(offsetof(al_tls, countdown) == 0, "countdown first in al_tls");
    asm goto("movq T@gottpoff(%%rip), %%rax\n\t"
             "subq %0, %%fs:(%%rax)\n\t"
             "jle %l[crossed]"
             : : "r"(size) : "rax", "cc", "memory" : crossed);
    return 0;
crossed:
    return 1;
}
static inline __attribute__((always_inline)) int gil_countdown_crossed(size_t size) {
    asm goto("subq %0, %1\n\t"
             "jle %l[crossed]"
             : : "r"(size), "m"(gil_countdown) : "cc", "memory" : crossed);
    return 0;
crossed:
    return 1;
}
#else
static inline __attribute__((always_inline)) int countdown_crossed(size_t size) {
    return (T.countdown -= (int64_t)size) <= 0;
}
static inline __attribute__((always_inline)) int gil_countdown_crossed(size_t size) {
    return (gil_countdown -= (int64_t)size) <= 0;
}
#endif

/* ---- the hooks ----

   OBJ and MEM domains. One set of functions per domain, reading the previous allocator from a
   fixed address, so the context handed to us is the previous allocator's own (installed as
   ours) and is passed on untouched: the fast path (a small block, no sample due) is the size
   test, the countdown and a tail jump.

   pymalloc hands blocks above 512 bytes to PyMem_RawMalloc (and frees them with PyMem_RawFree):
   around those calls the re-entrancy flag tells the RAW hook the block is counted here already.
   Smaller requests stay in pymalloc (new arenas are mmap-ed; only its rare arena-table resize
   goes to the RAW domain, counted there). Whether an allocation is sampled is decided before it
   is made.

   Where the previous allocator of MEM and OBJ is CPython's pymalloc itself (the default:
   _PyMem_GetCurrentAllocatorName() says "pymalloc" before we hook; `via_pymalloc`), their free
   is not hooked at all: pymalloc's own free is installed as ours. A sampled block is then asked
   of pymalloc as 513 bytes at least, which pymalloc takes from the RAW domain (its own
   bookkeeping, as for any large block), and pymalloc frees and reallocates such blocks through
   PyMem_RawFree / PyMem_RawRealloc: the RAW hooks see every free of a sampled block. A small
   sampled block costs up to ~500 bytes more than asked (one in ~interval/size blocks). */
#define NESTS(size) ((size) > 512)
#define PYMALLOC_RAW 513   /* the smallest request pymalloc hands to PyMem_RawMalloc */

static int via_pymalloc[3];

static __attribute__((noinline, cold)) void *o_malloc_slow(int d, void *ctx, size_t size, int due) {
    al_ctx *c = &ctxs[d];
    if (!due) due = gil_countdown_crossed(size);
    int rec = due && sample_due(1);
    size_t ask = rec && via_pymalloc[d] && size < PYMALLOC_RAW ? PYMALLOC_RAW : size;
    int saved = T.in_hook;
    if (NESTS(ask)) T.in_hook = 1;
    void *p = c->prev.malloc(ctx, ask);
    T.in_hook = saved;
    if (p != NULL && rec) record(d, p, size);
    return p;
}

static __attribute__((noinline, cold)) void *o_calloc_slow(int d, void *ctx, size_t nelem, size_t elsize, size_t size,
                                                          int due) {
    al_ctx *c = &ctxs[d];
    if (!due) due = gil_countdown_crossed(size > INT64_MAX ? INT64_MAX : size);
    int rec = due && sample_due(1);
    int bump = rec && via_pymalloc[d] && size < PYMALLOC_RAW;
    int saved = T.in_hook;
    if (NESTS(size) || bump) T.in_hook = 1;
    void *p = bump ? c->prev.calloc(ctx, 1, PYMALLOC_RAW) : c->prev.calloc(ctx, nelem, elsize);
    T.in_hook = saved;
    if (p != NULL && rec) record(d, p, size);
    return p;
}

static __attribute__((noinline)) void *o_realloc_any(int d, void *ctx, void *ptr, size_t size) {
    al_ctx *c = &ctxs[d];
    /* before the block can be handed to another thread (a sampled block of pymalloc's is also
       removed by the RAW hook: pymalloc reallocates it with PyMem_RawRealloc) */
    live_remove((uintptr_t)ptr);
    int rec = gil_countdown_crossed(size) && sample_due(1);
    size_t ask = rec && via_pymalloc[d] && size < PYMALLOC_RAW ? PYMALLOC_RAW : size;
    int saved = T.in_hook;
    T.in_hook = 1;  /* a realloc may move a block between pymalloc and the RAW domain */
    void *p = c->prev.realloc(ctx, ptr, ask);
    T.in_hook = saved;
    if (p != NULL && rec) record(d, p, size);
    return p;
}

static inline __attribute__((always_inline)) void o_free_tracked(int d, void *ctx, void *ptr) {
    live_remove((uintptr_t)ptr);  /* before the block can be handed out again */
    ctxs[d].prev.free(ctx, ptr);
}

#define DOMAIN_HOOKS(name, D)                                                                        \
    static __attribute__((hot)) void *name##_malloc(void *ctx, size_t size) {                        \
        if (UNLIKELY(NESTS(size))) return o_malloc_slow(D, ctx, size, 0);                            \
        if (UNLIKELY(gil_countdown_crossed(size))) return o_malloc_slow(D, ctx, size, 1);            \
        return ctxs[D].prev.malloc(ctx, size);                                                       \
    }                                                                                                \
    static __attribute__((hot)) void *name##_calloc(void *ctx, size_t nelem, size_t elsize) {       \
        size_t size;                                                                                 \
        if (__builtin_mul_overflow(nelem, elsize, &size)) size = SIZE_MAX;                           \
        if (UNLIKELY(NESTS(size))) return o_calloc_slow(D, ctx, nelem, elsize, size, 0);             \
        if (UNLIKELY(gil_countdown_crossed(size))) return o_calloc_slow(D, ctx, nelem, elsize, size, 1); \
        return ctxs[D].prev.calloc(ctx, nelem, elsize);                                              \
    }                                                                                                \
    static void *name##_realloc(void *ctx, void *ptr, size_t size) {                                 \
        return o_realloc_any(D, ctx, ptr, size);                                                     \
    }                                                                                                \
    static void name##_free(void *ctx, void *ptr) {                                                  \
        o_free_tracked(D, ctx, ptr);                                                                 \
    }

DOMAIN_HOOKS(obj, D_OBJ)
DOMAIN_HOOKS(mem, D_MEM)

/* RAW domain: not counted when called from our OBJ/MEM hooks (counted there) or from collect();
   frees always looked up (with pymalloc's free in place, a sampled OBJ/MEM block comes back
   here, also while the flag is up: a collection run by collect()'s allocations frees objects). */
static __attribute__((noinline, cold)) void *r_malloc_slow(void *ctx, size_t size) {
    int rec = sample_due(0);
    void *p = ctxs[D_RAW].prev.malloc(ctx, size);
    if (p != NULL && rec) record(D_RAW, p, size);
    return p;
}

static __attribute__((hot)) void *r_malloc(void *ctx, size_t size) {
    if (UNLIKELY(!T.in_hook && countdown_crossed(size))) return r_malloc_slow(ctx, size);
    return ctxs[D_RAW].prev.malloc(ctx, size);
}

static void *r_calloc(void *ctx, size_t nelem, size_t elsize) {
    size_t size;
    if (__builtin_mul_overflow(nelem, elsize, &size)) size = SIZE_MAX;
    int rec = !T.in_hook && countdown_crossed(size > INT64_MAX ? INT64_MAX : size) && sample_due(0);
    void *p = ctxs[D_RAW].prev.calloc(ctx, nelem, elsize);
    if (p != NULL && rec) record(D_RAW, p, size);
    return p;
}

static void *r_realloc(void *ctx, void *ptr, size_t size) {
    live_remove((uintptr_t)ptr);
    int rec = !T.in_hook && countdown_crossed(size) && sample_due(0);
    void *p = ctxs[D_RAW].prev.realloc(ctx, ptr, size);
    if (p != NULL && rec) record(D_RAW, p, size);
    return p;
}

static __attribute__((hot)) void r_free(void *ctx, void *ptr) {
    live_remove((uintptr_t)ptr);
    ctxs[D_RAW].prev.free(ctx, ptr);
}

/* ---- set-up ---- */

static void *map(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void drop_pages(void *p, size_t bytes) {
    if (p != NULL) madvise(p, bytes, MADV_DONTNEED);
}

static void reset_batch(void) {
    /* zero-filled pages again: the tables cost memory only for what the next period touches */
    nsamples = 0;
    nstacks = 0;
    frames_used = 0;
    drop_pages(stacks, sizeof(al_stack) * AL_STACK_CAP);
    drop_pages(frames, sizeof(al_frame) * AL_FRAME_CAP);
    drop_pages(samples, sizeof(al_sample) * AL_SAMPLE_CAP);
    drop_pages(codes, sizeof(pf_codetable));  /* = pf_codetable_clear: entries, count, arena_used zero */
}

static void reset_live(void) {
    atomic_store(&live_count, 0);
    drop_pages(live, sizeof(al_live) * live_slots);
    drop_pages((void *)filter, sizeof(filter));
}

static void atfork_child(void) {
    /* Only this thread exists; the parent's samples and live objects are not the child's. */
    atomic_store(&enabled, 0);
    T.tid = 0;
    T.in_hook = 0;
    if (samples != NULL) {
        reset_batch();
        reset_live();
    }
}

static int buffers(uint32_t cap) {
    if (samples == NULL) {
        samples = map(sizeof(al_sample) * AL_SAMPLE_CAP);
        stacks = map(sizeof(al_stack) * AL_STACK_CAP);
        frames = map(sizeof(al_frame) * AL_FRAME_CAP);
        codes = map(sizeof(pf_codetable));
        if (!samples || !stacks || !frames || !codes) return -1;
    }
    uint32_t slots = 1024;
    while (slots < cap * 2u) slots <<= 1;
    if (slots != live_slots) {
        /* a different cap: new table (the old one stays mapped: a free without the GIL may be
           reading it); only while nothing is live */
        al_live *t = map(sizeof(al_live) * slots);
        if (!t) return -1;
        live = t;
        live_slots = slots;
    }
    live_cap = cap;
    return 0;
}

/* Our allocator for domain d: its context is the previous allocator's (passed on untouched). */
static PyMemAllocatorEx ours_for(int d) {
    void *ctx = ctxs[d].prev.ctx;
    if (d == D_RAW) return (PyMemAllocatorEx){ctx, r_malloc, r_calloc, r_realloc, r_free};
    if (d == D_MEM) return (PyMemAllocatorEx){ctx, mem_malloc, mem_calloc, mem_realloc, via_pymalloc[d] ? ctxs[d].prev.free : mem_free};
    return (PyMemAllocatorEx){ctx, obj_malloc, obj_calloc, obj_realloc, via_pymalloc[d] ? ctxs[d].prev.free : obj_free};
}

static PyObject *al_start(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"interval", "max_frames", "live_cap", NULL};
    unsigned long long iv;
    int mf = 128;
    unsigned int cap = 65536;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "K|iI", kwlist, &iv, &mf, &cap)) return NULL;
    if (iv < 1 || iv > (1ull << 40)) { PyErr_SetString(PyExc_ValueError, "interval must be 1 byte to 1 TiB"); return NULL; }
    if (mf < 1 || mf > AL_MAX_FRAMES) { PyErr_SetString(PyExc_ValueError, "max_frames must be 1 to 256"); return NULL; }
    if (cap < 1 || cap > AL_LIVE_MAX_CAP) { PyErr_SetString(PyExc_ValueError, "live_cap must be 1 to 1048576"); return NULL; }
    if (atomic_load(&enabled)) { PyErr_SetString(PyExc_RuntimeError, "allocation sampling is already running"); return NULL; }
    if (!walker_ok) {
        PyErr_Format(PyExc_RuntimeError, "Python allocation sampling cannot read this interpreter's frames: %s", walker_why);
        return NULL;
    }
    if (pf_safeload_install() != 0) { PyErr_SetString(PyExc_RuntimeError, "the fault guard for frame reads could not be installed"); return NULL; }
    guard_ok = 1;
    if (atomic_load(&live_count) != 0) reset_live();
    if (buffers(cap) != 0) { PyErr_SetString(PyExc_MemoryError, "no memory for the allocation sampler's buffers"); return NULL; }
    reset_batch();
    interval = (double)iv;
    max_frames = mf;
    atomic_fetch_add(&generation, 1);
    T.gen = atomic_load(&generation);
    T.countdown = draw();
    gil_countdown = draw();
    /* CPython's own allocators, none of them wrapped yet (asked before we hook anything): MEM and
       OBJ frees need no hook (see "the hooks") */
    const char *(*current_name)(void) = (const char *(*)(void))dlsym(RTLD_DEFAULT, "_PyMem_GetCurrentAllocatorName");
    const char *name = current_name != NULL ? current_name() : NULL;
    int pymalloc = name != NULL && strcmp(name, "pymalloc") == 0;
    static const PyMemAllocatorDomain doms[3] = {PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
    for (int d = 0; d < 3; d++) {  /* RAW first: it sees the frees of MEM/OBJ's sampled blocks */
        if (chained[d]) continue;  /* still in the chain since an earlier start(): re-used */
        ctxs[d].domain = d;
        PyMem_GetAllocator(doms[d], &ctxs[d].prev);
        via_pymalloc[d] = d != D_RAW && pymalloc;
        PyMemAllocatorEx ours = ours_for(d);
        PyMem_SetAllocator(doms[d], &ours);
        chained[d] = 1;
    }
    atomic_store(&enabled, 1);
    Py_RETURN_NONE;
}

static PyObject *al_stop(PyObject *self, PyObject *noargs) {
    atomic_store(&enabled, 0);
    static const PyMemAllocatorDomain doms[3] = {PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
    int passthrough = 0;
    for (int d = 2; d >= 0; d--) {
        if (!chained[d]) continue;
        PyMemAllocatorEx cur;
        PyMem_GetAllocator(doms[d], &cur);
        if (cur.malloc == ours_for(d).malloc && cur.ctx == ctxs[d].prev.ctx) {
            PyMem_SetAllocator(doms[d], &ctxs[d].prev);
            chained[d] = 0;
        } else {
            passthrough++;  /* somebody wrapped us: stay in their chain, passing calls on */
        }
    }
    if (live != NULL) reset_live();
    return PyLong_FromLong(passthrough);
}

static PyObject *al_running(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(atomic_load(&enabled));
}

/* ---- collect ---- */

static PyObject *decode(const unsigned char *p, size_t len, const char *dflt) {
    if (len == 0) return PyUnicode_FromString(dflt);
    return PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)len, "replace");
}

static PyObject *build(void) {
    PyObject *code_list = PyList_New(0), *stack_list = PyList_New(0), *data = NULL, *out = NULL;
    int32_t *code_map = NULL, *stack_map = NULL;
    if (code_list == NULL || stack_list == NULL) goto done;
    code_map = (int32_t *)PyMem_RawMalloc(sizeof(int32_t) * PF_CODE_CAP);
    stack_map = (int32_t *)PyMem_RawMalloc(sizeof(int32_t) * AL_STACK_CAP);
    if (code_map == NULL || stack_map == NULL) { PyErr_NoMemory(); goto done; }
    memset(code_map, 0xff, sizeof(int32_t) * PF_CODE_CAP);
    memset(stack_map, 0xff, sizeof(int32_t) * AL_STACK_CAP);
    long unknown = -1;
    data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)nsamples * 44);
    if (data == NULL) goto done;
    char *w = PyBytes_AS_STRING(data);
    for (uint32_t i = 0; i < nsamples; i++) {
        al_sample *s = &samples[i];
        int32_t sid = -1;
        if (s->stack >= 0) {
            sid = stack_map[s->stack];
            if (sid < 0) {
                al_stack *e = &stacks[s->stack];
                PyObject *pairs = PyTuple_New(2 * e->n);
                if (pairs == NULL) goto done;
                for (uint32_t k = 0; k < e->n; k++) {
                    al_frame *f = &frames[e->off + k];
                    pf_code_t *c = f->idx < PF_CODE_CAP ? &codes->entries[f->idx] : NULL;
                    long id;
                    int line = 0;
                    if (c == NULL || !atomic_load(&c->ready)) {
                        if (unknown < 0) {
                            PyObject *t = Py_BuildValue("(sssi)", "<unknown>", "<unknown>", "", 0);
                            if (t == NULL || PyList_Append(code_list, t) != 0) { Py_XDECREF(t); Py_DECREF(pairs); goto done; }
                            Py_DECREF(t);
                            unknown = (long)PyList_GET_SIZE(code_list) - 1;
                        }
                        id = unknown;
                    } else {
                        if (code_map[f->idx] < 0) {
                            const unsigned char *a = codes->arena;
                            PyObject *nm = decode(a + c->nm_off, c->nm_len, "<unknown>");
                            PyObject *qn = decode(a + c->qn_off, c->qn_len, "<unknown>");
                            PyObject *fn = decode(a + c->fn_off, c->fn_len, "");
                            PyObject *t = (nm && qn && fn) ? Py_BuildValue("(OOOi)", nm, qn, fn, (int)c->firstlineno) : NULL;
                            Py_XDECREF(nm); Py_XDECREF(qn); Py_XDECREF(fn);
                            if (t == NULL || PyList_Append(code_list, t) != 0) { Py_XDECREF(t); Py_DECREF(pairs); goto done; }
                            Py_DECREF(t);
                            code_map[f->idx] = (int32_t)(PyList_GET_SIZE(code_list) - 1);
                        }
                        id = code_map[f->idx];
                        if (c->lt_len >= 0) {
                            line = pf_addr2line(codes->arena + c->lt_off, c->lt_len, c->firstlineno, f->lasti);
                            if (line < 0) line = 0;
                        }
                    }
                    PyTuple_SET_ITEM(pairs, 2 * k, PyLong_FromLong(id));
                    PyTuple_SET_ITEM(pairs, 2 * k + 1, PyLong_FromLong(line));
                    if (PyErr_Occurred()) { Py_DECREF(pairs); goto done; }
                }
                PyObject *entry = Py_BuildValue("(NO)", pairs, e->truncated ? Py_True : Py_False);
                if (entry == NULL || PyList_Append(stack_list, entry) != 0) { Py_XDECREF(entry); goto done; }
                Py_DECREF(entry);
                sid = stack_map[s->stack] = (int32_t)(PyList_GET_SIZE(stack_list) - 1);
            }
        }
        al_sample rec = *s;
        rec.stack = sid;
        memcpy(w + (size_t)i * 44, &rec.time, 8);
        memcpy(w + (size_t)i * 44 + 8, &rec.serial, 8);
        memcpy(w + (size_t)i * 44 + 16, &rec.size, 8);
        memcpy(w + (size_t)i * 44 + 24, &rec.weight, 8);
        memcpy(w + (size_t)i * 44 + 32, &rec.tid, 4);
        memcpy(w + (size_t)i * 44 + 36, &rec.stack, 4);
        w[(size_t)i * 44 + 40] = (char)rec.domain;
        w[(size_t)i * 44 + 41] = (char)rec.live;
        w[(size_t)i * 44 + 42] = 0;
        w[(size_t)i * 44 + 43] = 0;
    }
    out = Py_BuildValue("(OOO)", code_list, stack_list, data);
done:
    Py_XDECREF(code_list); Py_XDECREF(stack_list); Py_XDECREF(data);
    PyMem_RawFree(code_map); PyMem_RawFree(stack_map);
    return out;
}

static PyObject *al_collect(PyObject *self, PyObject *noargs) {
    if (samples == NULL) return Py_BuildValue("([][]y#K)", "", (Py_ssize_t)0, (unsigned long long)0);
    int saved = T.in_hook;
    T.in_hook = 1;  /* our own allocations here are not the application's */
    PyObject *out = build();
    T.in_hook = saved;
    if (out == NULL) return NULL;
    reset_batch();
    if (atomic_load(&enabled) && !guard_ok && pf_safeload_install() == 0) guard_ok = 1;  /* was removed */
    atomic_fetch_add(&n.collects, 1);
    uint64_t lost_now = atomic_load(&n.lost);
    PyObject *r = Py_BuildValue("(OOOK)", PyTuple_GET_ITEM(out, 0), PyTuple_GET_ITEM(out, 1), PyTuple_GET_ITEM(out, 2),
                                (unsigned long long)(lost_now - lost_reported));
    lost_reported = lost_now;
    Py_DECREF(out);
    return r;
}

static PyObject *al_live_serials(PyObject *self, PyObject *noargs) {
    uint32_t cnt = atomic_load(&live_count);
    PyObject *data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(cnt + 64) * 8);
    if (data == NULL) return NULL;
    uint64_t *w = (uint64_t *)PyBytes_AS_STRING(data);
    uint32_t m = 0, room = cnt + 64;
    for (uint32_t i = 0; i < live_slots && m < room; i++) {
        uintptr_t k = atomic_load_explicit(&live[i].key, memory_order_acquire);
        if (k > TOMBSTONE) w[m++] = live[i].serial;
    }
    if (_PyBytes_Resize(&data, (Py_ssize_t)m * 8) != 0) return NULL;
    return data;
}

static PyObject *al_stats(PyObject *self, PyObject *noargs) {
    unsigned long long mem = 0;
    if (samples != NULL) {
        /* what the current period has touched (whole pages at most) and the live set */
        mem = (unsigned long long)nsamples * sizeof(al_sample) + (unsigned long long)frames_used * sizeof(al_frame) +
              (unsigned long long)nstacks * 4096 + (unsigned long long)atomic_load(&codes->count) * 4096 +
              atomic_load(&codes->arena_used) + sizeof(al_live) * (unsigned long long)live_slots + AL_FILTER_SIZE;
    }
#define C(x) #x, (unsigned long long)atomic_load(&n.x)
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsIsIsKsisi}", C(samples), C(lost), C(live_overflow), C(no_stack),
                         C(no_gil), C(no_guard), C(truncated), C(frees_tracked), C(filter_hits), C(collects),
                         "live", (unsigned int)atomic_load(&live_count), "live_cap", live_cap,
                         "memory_bytes", mem, "pending", (int)nsamples,
                         /* MEM/OBJ frees unhooked: sampled blocks taken from pymalloc's RAW side */
                         "via_pymalloc", via_pymalloc[D_MEM] + via_pymalloc[D_OBJ]);
#undef C
}

static PyObject *al_hooks(PyObject *self, PyObject *noargs) {
    return Py_BuildValue("(iii)", chained[0], chained[1], chained[2]);
}

static PyMethodDef methods[] = {
    {"start", (PyCFunction)(void (*)(void))al_start, METH_VARARGS | METH_KEYWORDS,
     "start(interval, max_frames=128, live_cap=65536): hooks installed (or re-used), sampling on"},
    {"stop", al_stop, METH_NOARGS, "stop() -> number of hooks left in place as pass-throughs"},
    {"running", al_running, METH_NOARGS, "running() -> bool"},
    {"collect", al_collect, METH_NOARGS, "collect() -> (codes, stacks, samples, lost)"},
    {"live", al_live_serials, METH_NOARGS, "live() -> bytes: the serials (uint64) of sampled blocks not freed"},
    {"stats", al_stats, METH_NOARGS, "stats() -> dict"},
    {"hooks", al_hooks, METH_NOARGS, "hooks() -> (raw, mem, obj): 1 where our hook is in the chain"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "asprof.engines._alloc",
    "Python allocation sampling with Python stacks, and the live heap (issue #16).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__alloc(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL) return NULL;
    static int atfork_done;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, atfork_child);
        atfork_done = 1;
    }
    walker_ok = pf_layout_check(walker_why, sizeof(walker_why)) == 0;
    if (PyModule_AddObject(m, "python_frames_off",
                           walker_ok ? (Py_INCREF(Py_None), Py_None) : PyUnicode_FromString(walker_why)) != 0 ||
        PyModule_AddIntConstant(m, "compiled_version", (long)pf_compiled_version()) != 0 ||
        PyModule_AddIntConstant(m, "SAMPLE_CAP", AL_SAMPLE_CAP) != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
