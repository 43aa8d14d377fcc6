/*
 * Capturing the Python stack of the thread each async-profiler sample interrupted.
 *
 * Signal path (pf_signal_handler), per profiling signal on a thread:
 *   1. read the thread's asprof sample_counter (pointer obtained outside the handler, at
 *      registration), call async-profiler's handler, read the counter again;
 *   2. if it changed (a sample was recorded), walk the thread's Python frames (walk.c, fault
 *      tolerant), look each code object up in the code table (copying its names and line table
 *      into the table's arena the first time it is seen), and append one record to the thread's
 *      ring: (tid, counter, timestamps, [(code index, instruction offset)...]).
 *   No allocation, no locks (atomics only), bounded loops, errno preserved.
 *
 * Drain path (a native thread, and pf_flush before each stop): records are taken out of the
 * rings, lines resolved, stacks deduplicated, and written as profiler.UserEvent events with
 * asprof_emit_jfr_event: code definitions and stack definitions once per recording, samples as
 * references to them.
 *
 * Nothing here dereferences a code object after the handler: names are copies.
 */
#define _GNU_SOURCE 1
#include "capture.h"
#include "pyframes.h"
#include "sigcapture.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define MAX_SLOTS 512                 /* threads with a ring at the same time */
#define RING_SIZE (64u * 1024u)       /* bytes per thread; a power of two */
#define MAX_PY_FRAMES 512             /* upper bound for cfg.max_frames */
#define MAX_ENTRIES (2 * MAX_PY_FRAMES + 2)
#define CODE_CAP PF_CODE_CAP
#define ARENA_SIZE PF_ARENA_SIZE
#define NAME_CAP PF_NAME_CAP
#define FILE_CAP PF_FILE_CAP
#define IDX_BOUNDARY PF_IDX_BOUNDARY
#define IDX_UNKNOWN PF_IDX_UNKNOWN
#define EVENT_MAX 2048

#define REC_TRUNCATED 0x1
#define REC_COUNTER 0x2
#define REC_TABLE1 0x4

/* ---------------------------------------------------------------- state ---- */

typedef struct {
    uint32_t size;      /* bytes, multiple of 8 */
    uint16_t nframes;
    uint8_t flags;
    uint8_t pad;
    int32_t tid;
    uint32_t label;     /* issue #15: label-set id active on the thread (0 = none) */
    uint64_t counter;
    uint64_t tsc;
    uint64_t mono;
} rec_hdr;

typedef struct {
    uint32_t idx;
    int32_t lasti;
} rec_frame;

typedef struct {
    _Atomic int tid;               /* 0 = free */
    _Atomic(pf_tld *) tld;         /* valid while the registered thread lives; NULL otherwise */
    _Atomic int dead;              /* unregistered; the drain thread frees the slot once empty */
    _Atomic int registered;
    volatile sig_atomic_t busy;    /* the thread is inside our handler (nesting guard) */
    _Atomic uint64_t head;         /* producer: the handler on thread `tid` */
    _Atomic uint64_t tail;         /* consumer: the drain thread */
    uint64_t checked_ns;           /* drain thread: last liveness check */
    unsigned char *ring;
} slot_t;

typedef pf_code_t code_t;
typedef pf_codetable table_t;

static struct {
    _Atomic int enabled;           /* the handler does its work */
    _Atomic int guard_ok;          /* the drain thread saw our SIGSEGV and SIGBUS handlers in place */
    _Atomic int installed;
    pid_t pid;
    pf_config cfg;
    slot_t *slots;
    unsigned char *rings;
    table_t *tables[2];
    _Atomic int cur_table;
    /* signal chaining */
    struct {
        _Atomic int chained;
        _Atomic(void *) prev_fn;
        _Atomic int prev_flags;
        struct sigaction prev;
    } sig[65];
    /* events */
    int key_code, key_stack, key_sample, key_module, key_stats;
    int key_labelset, key_samplelabel, key_step;   /* issue #15 */
    /* recording state (drain_lock) */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t drainer;
    int drainer_running, drainer_stop;
    int active;
    uint32_t rec;                  /* recording number, from 1 */
    uint64_t rec_start_mono;
    /* counters */
    _Atomic uint64_t n_timed_ns, n_timed;
    _Atomic uint64_t n_signals, n_samples, n_nested, n_no_python, n_no_guard, n_masked, n_ring_full,
        n_slots_full, n_unknown_code, n_truncated;
    uint64_t n_emitted_samples, n_emitted_stacks, n_emitted_defs, n_emitted_events, n_emit_errors,
        n_lost_boundary, n_dropped_inactive, n_table_swaps, n_registered, n_chained, n_guard_reinstalled;
    uint64_t rec_emitted_samples, rec_emitted_stacks, rec_emitted_defs, rec_lost_boundary;
} g = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};

uint32_t (*volatile pf_ctx_sample)(void);   /* issue #15: asprof.context._ctx's hook, or NULL */

/* Label-set ids seen in this recording's samples, not yet handed to pf_take_labels. */
#define LABEL_SEEN_CAP 4096
static uint32_t label_seen[LABEL_SEEN_CAP];
static int label_seen_n;
static uint64_t n_label_seen_full;

/* ------------------------------------------------------- small helpers ---- */

static int ours(void) { return atomic_load(&g.installed) && getpid() == g.pid; }

/* The thread id, cached per thread (initial-exec TLS: a plain %fs-relative load in the handler,
   no lazy allocation). A forked child's copy is stale, but the capture is off in a child. */
static __thread int cached_tid __attribute__((tls_model("initial-exec")));

/* async-signal-safe: runs in the handler. */
static inline int my_tid(void) {
    int t = cached_tid;
    if (t == 0) cached_tid = t = (int)syscall(SYS_gettid);
    return t;
}

/* async-signal-safe: runs in the handler. */
static inline uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The counter async-profiler uses for JFR ticks by default (TSC / cntvct_el0). */
/* async-signal-safe: runs in the handler. */
static inline uint64_t cpu_ticks(void) {
#if defined(__x86_64__)
    return __builtin_ia32_rdtsc();
#elif defined(__aarch64__)
    uint64_t v;
    __asm__ __volatile__("mrs %0, cntvct_el0" : "=r"(v));
    return v;
#else
    return 0;
#endif
}

static inline uint32_t hash_int(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}

/* --------------------------------------------------------------- slots ---- */

/* async-signal-safe: runs in the handler. */
static slot_t *find_slot(int tid) {
    uint32_t start = hash_int((uint32_t)tid) & (MAX_SLOTS - 1);
    for (uint32_t i = 0; i < MAX_SLOTS; i++) {
        slot_t *s = &g.slots[(start + i) & (MAX_SLOTS - 1)];
        if (atomic_load_explicit(&s->tid, memory_order_acquire) == tid) return s;
    }
    return NULL;
}

/* async-signal-safe: runs in the handler. Claims a free slot for tid (CAS only). Only thread `tid` claims for itself. */
static slot_t *claim_slot(int tid, int registered) {
    uint32_t start = hash_int((uint32_t)tid) & (MAX_SLOTS - 1);
    for (uint32_t i = 0; i < MAX_SLOTS; i++) {
        slot_t *s = &g.slots[(start + i) & (MAX_SLOTS - 1)];
        int expect = 0;
        if (atomic_load_explicit(&s->tid, memory_order_relaxed) == 0 &&
            atomic_compare_exchange_strong(&s->tid, &expect, tid)) {
            atomic_store(&s->tld, NULL);
            atomic_store(&s->dead, 0);
            atomic_store(&s->registered, registered);
            s->checked_ns = 0;
            return s;
        }
    }
    return NULL;
}

/* ---------------------------------------------------------- code table ---- */

#define code_index pf_code_index

/* ------------------------------------------------------------- handler ---- */

/* async-signal-safe: runs in the handler. */
static void call_prev(int sig, siginfo_t *info, void *uc) {
    void *fn = atomic_load_explicit(&g.sig[sig].prev_fn, memory_order_acquire);
    int flags = atomic_load_explicit(&g.sig[sig].prev_flags, memory_order_relaxed);
    if (fn == (void *)SIG_DFL || fn == (void *)SIG_IGN || fn == NULL) return;
    if (flags & SA_SIGINFO) ((void (*)(int, siginfo_t *, void *))fn)(sig, info, uc);
    else ((void (*)(int))fn)(sig);
}

/* async-signal-safe: runs in the handler. */
static void record(slot_t *s, int tid, void *tstate, uint64_t counter, int have_counter, uint32_t label) {
    pf_rawframe raw[MAX_ENTRIES];
    int truncated = 0;
    uint64_t tsc = cpu_ticks(), mono = mono_ns();
    int n = pf_walk(tstate, raw, 2 * g.cfg.max_frames + 2, g.cfg.max_frames, &truncated);
    /* Pin the code table so the drain thread does not recycle it under us. */
    int ti = atomic_load(&g.cur_table);
    table_t *t = g.tables[ti];
    atomic_fetch_add(&t->pins, 1);
    if (atomic_load(&g.cur_table) != ti) {
        atomic_fetch_sub(&t->pins, 1);
        ti = atomic_load(&g.cur_table);
        t = g.tables[ti];
        atomic_fetch_add(&t->pins, 1);
    }
    unsigned char buf[sizeof(rec_hdr) + MAX_ENTRIES * sizeof(rec_frame)];
    rec_hdr *h = (rec_hdr *)buf;
    rec_frame *fr = (rec_frame *)(buf + sizeof(rec_hdr));
    int unknown = 0;
    for (int i = 0; i < n; i++) {
        if (raw[i].flags & PF_FRAME_BOUNDARY) {
            fr[i].idx = IDX_BOUNDARY;
            fr[i].lasti = 0;
        } else {
            fr[i].idx = code_index(t, raw[i].code, raw[i].globals);
            fr[i].lasti = raw[i].lasti;
            if (fr[i].idx == IDX_UNKNOWN) unknown++;
        }
    }
    atomic_fetch_sub(&t->pins, 1);
    if (unknown) atomic_fetch_add_explicit(&g.n_unknown_code, 1, memory_order_relaxed);
    if (truncated) atomic_fetch_add_explicit(&g.n_truncated, 1, memory_order_relaxed);
    uint32_t size = (uint32_t)(sizeof(rec_hdr) + (size_t)n * sizeof(rec_frame));
    size = (size + 7u) & ~7u;
    memset(h, 0, sizeof(*h));
    h->size = size;
    h->nframes = (uint16_t)n;
    h->flags = (uint8_t)((truncated ? REC_TRUNCATED : 0) | (have_counter ? REC_COUNTER : 0) |
                         (ti ? REC_TABLE1 : 0));
    h->tid = tid;
    h->label = label;
    h->counter = counter;
    h->tsc = tsc;
    h->mono = mono;
    uint64_t head = atomic_load_explicit(&s->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&s->tail, memory_order_acquire);
    if (head - tail + size > RING_SIZE) {
        atomic_fetch_add_explicit(&g.n_ring_full, 1, memory_order_relaxed);
        return;
    }
    uint32_t pos = (uint32_t)(head & (RING_SIZE - 1));
    uint32_t first = RING_SIZE - pos < size ? RING_SIZE - pos : size;
    memcpy(s->ring + pos, buf, first);
    if (first < size) memcpy(s->ring, buf + first, size - first);
    atomic_store_explicit(&s->head, head + size, memory_order_release);
    atomic_fetch_add_explicit(&g.n_samples, 1, memory_order_relaxed);
}

/* async-signal-safe: runs in the handler. */
static void pf_signal_handler(int sig, siginfo_t *info, void *ucontext) {
    int saved_errno = errno;
    /* enabled is cleared in a forked child (at-fork handler), so no getpid() here. */
    if (!atomic_load_explicit(&g.enabled, memory_order_acquire)) {
        call_prev(sig, info, ucontext);
        errno = saved_errno;
        return;
    }
    uint64_t t0 = g.cfg.timing ? mono_ns() : 0, t1 = 0, t2 = 0;
    atomic_fetch_add_explicit(&g.n_signals, 1, memory_order_relaxed);
    int tid = my_tid();
    slot_t *s = find_slot(tid);
    pf_tld *tld = s != NULL ? atomic_load_explicit(&s->tld, memory_order_acquire) : NULL;
    uint64_t before = tld != NULL ? tld->sample_counter : 0;
    if (t0 != 0) t1 = mono_ns();
    call_prev(sig, info, ucontext);
    if (t0 != 0) t2 = mono_ns();
    uint64_t after = tld != NULL ? tld->sample_counter : 0;
    if (tld != NULL && after == before) goto out;   /* async-profiler recorded no sample */
    /* issue #15: count the sample in the thread's context slot, take its label-set id */
    uint32_t (*ctx_sample)(void) = pf_ctx_sample;
    uint32_t label = ctx_sample != NULL ? ctx_sample() : 0u;
    if (s != NULL && s->busy) {                     /* we interrupted ourselves */
        atomic_fetch_add_explicit(&g.n_nested, 1, memory_order_relaxed);
        goto out;
    }
    void *tstate = pf_this_thread_state();
    if (tstate == NULL) {
        atomic_fetch_add_explicit(&g.n_no_python, 1, memory_order_relaxed);
        goto out;
    }
    ucontext_t *uc = (ucontext_t *)ucontext;
    if (uc != NULL && (sigismember(&uc->uc_sigmask, SIGSEGV) == 1 || sigismember(&uc->uc_sigmask, SIGBUS) == 1)) {
        atomic_fetch_add_explicit(&g.n_masked, 1, memory_order_relaxed);  /* a fault could not be caught */
        goto out;
    }
    /* Our fault guard must be first in line for SIGSEGV (checked per sample: one system call;
       SIGBUS, which a heap read cannot raise, is checked by the drain thread). */
    if (!atomic_load_explicit(&g.guard_ok, memory_order_relaxed) || !pf_safeload_segv_active()) {
        atomic_fetch_add_explicit(&g.n_no_guard, 1, memory_order_relaxed);
        goto out;
    }
    if (s == NULL) {
        s = claim_slot(tid, 0);
        if (s == NULL) {
            atomic_fetch_add_explicit(&g.n_slots_full, 1, memory_order_relaxed);
            goto out;
        }
    }
    if (atomic_load(&s->dead)) goto out;
    s->busy = 1;
    atomic_signal_fence(memory_order_seq_cst);
    int exact = tld != NULL && g.cfg.join_mode == PF_JOIN_EXACT;
    record(s, tid, tstate, exact ? after : 0, exact, label);
    atomic_signal_fence(memory_order_seq_cst);
    s->busy = 0;
out:
    if (t0 != 0) {
        /* our share of the handler: everything but async-profiler's own handler */
        uint64_t t3 = mono_ns();
        atomic_fetch_add_explicit(&g.n_timed_ns, (t1 - t0) + (t3 - t2), memory_order_relaxed);
        atomic_fetch_add_explicit(&g.n_timed, 1, memory_order_relaxed);
    }
    errno = saved_errno;
}

/* ------------------------------------------------------ signal chaining ---- */

static int is_profiler_handler(const struct sigaction *sa) {
    void *fn = (sa->sa_flags & SA_SIGINFO) ? (void *)sa->sa_sigaction : (void *)sa->sa_handler;
    if (fn == (void *)SIG_DFL || fn == (void *)SIG_IGN || fn == NULL) return 0;
    Dl_info info;
    if (dladdr(fn, &info) == 0) return 0;
    return (uintptr_t)info.dli_fbase == g.cfg.lib_base;
}

/* Signals async-profiler may sample with (OS::getProfilingSignal's candidates). */
static int candidate(int sig) {
    if (sig == SIGPROF || sig == SIGVTALRM || sig == SIGPWR) return 1;
#ifdef SIGSTKFLT
    if (sig == SIGSTKFLT) return 1;
#endif
    return sig >= SIGRTMIN && sig <= SIGRTMAX;
}

static void chain_signals(void) {
    for (int sig = 1; sig < 65 && sig < NSIG; sig++) {
        if (!candidate(sig)) continue;
        struct sigaction cur;
        if (sigaction(sig, NULL, &cur) != 0) continue;
        if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == pf_signal_handler) continue;
        if (!is_profiler_handler(&cur)) continue;
        g.sig[sig].prev = cur;
        atomic_store(&g.sig[sig].prev_flags, cur.sa_flags);
        atomic_store(&g.sig[sig].prev_fn,
                     (cur.sa_flags & SA_SIGINFO) ? (void *)cur.sa_sigaction : (void *)cur.sa_handler);
        struct sigaction sa = cur;
        sa.sa_sigaction = pf_signal_handler;
        sa.sa_flags = cur.sa_flags | SA_SIGINFO;
        if (sigaction(sig, &sa, NULL) == 0) {
            atomic_store(&g.sig[sig].chained, 1);
            g.n_chained++;
        }
    }
}

/* Puts async-profiler's own handlers back (before each start, and at stop). */
static void unchain_signals(void) {
    for (int sig = 1; sig < 65 && sig < NSIG; sig++) {
        if (!atomic_load(&g.sig[sig].chained)) continue;
        struct sigaction cur;
        if (sigaction(sig, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == pf_signal_handler)
            sigaction(sig, &g.sig[sig].prev, NULL);
        atomic_store(&g.sig[sig].chained, 0);
        /* prev_fn stays: a handler still running elsewhere may call it. */
    }
}

static void chained_mask(sigset_t *set) {
    sigemptyset(set);
    for (int sig = 1; sig < 65 && sig < NSIG; sig++)
        if (candidate(sig)) sigaddset(set, sig);
}

/* ------------------------------------------------------------ emission ---- */

typedef struct {
    int key;
    size_t len;
    uint8_t data[EVENT_MAX];
} ebuf;

static ebuf eb_code, eb_stack, eb_sample, eb_module, eb_label;

static void eb_init(ebuf *b, int key) {
    b->key = key;
    b->data[0] = 1;  /* format version */
    b->len = 1;
}

static void eb_flush(ebuf *b) {
    if (b->len <= 1) return;
    if (g.active && g.cfg.emit != NULL && b->key >= 0) {
        const char *err = g.cfg.emit(b->key, b->data, b->len);
        if (err == NULL) g.n_emitted_events++;
        else g.n_emit_errors++;
    }
    b->len = 1;
}

static size_t put_varint(uint8_t *p, uint64_t v) {
    size_t n = 0;
    do {
        uint8_t c = v & 0x7F;
        v >>= 7;
        p[n++] = c | (v ? 0x80 : 0);
    } while (v);
    return n;
}

static size_t put_str(uint8_t *p, const unsigned char *s, size_t len) {
    size_t n = put_varint(p, len);
    memcpy(p + n, s, len);
    return n + len;
}

static void eb_add(ebuf *b, const uint8_t *item, size_t len) {
    if (len + 1 > EVENT_MAX) return;  /* cannot happen: items are bounded below */
    if (b->len + len > EVENT_MAX) eb_flush(b);
    memcpy(b->data + b->len, item, len);
    b->len += len;
}

static uint64_t def_id(const table_t *t, uint32_t idx) { return t->gen * CODE_CAP + idx; }

static void emit_code_def(table_t *t, uint32_t idx) {
    code_t *e = &t->entries[idx];
    if (e->emitted_rec == g.rec) return;
    uint8_t item[32 + NAME_CAP + FILE_CAP + 16];
    size_t n = put_varint(item, def_id(t, idx));
    n += put_varint(item + n, (uint64_t)(uint32_t)e->firstlineno);
    n += put_varint(item + n, (uint64_t)e->globals);
    n += put_str(item + n, t->arena + e->qn_off, e->qn_len);
    n += put_str(item + n, t->arena + e->fn_off, e->fn_len);
    eb_add(&eb_code, item, n);
    e->emitted_rec = g.rec;
    g.n_emitted_defs++;
    g.rec_emitted_defs++;
}

/* Stacks already defined in this recording: open addressing on a content hash. */
#define STACK_CAP 65536
#define STACK_ARENA (8u << 20)
typedef struct { uint64_t hash; uint32_t off, len; uint32_t id; } stack_t_;
static stack_t_ *stacks;
static uint8_t *stack_arena;
static size_t stack_arena_used;
static uint32_t stack_count, next_stack_id = 1;

static void stacks_reset(void) {
    if (stacks != NULL) memset(stacks, 0, sizeof(stack_t_) * STACK_CAP);
    stack_arena_used = 0;
    stack_count = 0;
}

static uint64_t fnv(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ULL; }
    return h ? h : 1;
}

/* Returns the id of the stack encoded in enc (emitting its definition the first time). */
static uint32_t stack_id(const uint8_t *enc, size_t len) {
    if (stacks == NULL) return 0;
    if (stack_count >= STACK_CAP / 2 || stack_arena_used + len > STACK_ARENA) stacks_reset();
    uint64_t h = fnv(enc, len);
    for (uint32_t i = 0; i < STACK_CAP; i++) {
        stack_t_ *s = &stacks[(h + i) & (STACK_CAP - 1)];
        if (s->hash == 0) {
            s->hash = h;
            s->off = (uint32_t)stack_arena_used;
            s->len = (uint32_t)len;
            s->id = next_stack_id++;
            memcpy(stack_arena + stack_arena_used, enc, len);
            stack_arena_used += len;
            stack_count++;
            uint8_t item[16 + MAX_ENTRIES * 12];
            size_t n = put_varint(item, s->id);
            memcpy(item + n, enc, len);
            eb_add(&eb_stack, item, n + len);
            g.n_emitted_stacks++;
            g.rec_emitted_stacks++;
            return s->id;
        }
        if (s->hash == h && s->len == len && memcmp(stack_arena + s->off, enc, len) == 0) return s->id;
    }
    return 0;
}

/* One record out of a ring: resolve, define, emit. */
static void emit_record(const rec_hdr *h, const rec_frame *fr) {
    table_t *t = g.tables[(h->flags & REC_TABLE1) ? 1 : 0];
    /* Stack encoding: flags, count, then per entry: 0 = eval-loop boundary, 1 = unknown code,
       else (definition id + 2) followed by the line. */
    uint8_t enc[8 + MAX_ENTRIES * 12];
    size_t n = put_varint(enc, (h->flags & REC_TRUNCATED) ? 1 : 0);
    n += put_varint(enc + n, h->nframes);
    for (int i = 0; i < h->nframes; i++) {
        uint32_t idx = fr[i].idx;
        if (idx == IDX_BOUNDARY) {
            enc[n++] = 0;
        } else if (idx == IDX_UNKNOWN || idx >= CODE_CAP) {
            enc[n++] = 1;
        } else {
            code_t *e = &t->entries[idx];
            emit_code_def(t, idx);
            int line = e->lt_len >= 0
                ? pf_addr2line(t->arena + e->lt_off, e->lt_len, e->firstlineno, fr[i].lasti)
                : e->firstlineno;
            n += put_varint(enc + n, def_id(t, idx) + 2);
            n += put_varint(enc + n, (uint64_t)(line < 0 ? 0 : line));
        }
    }
    uint32_t sid = stack_id(enc, n);
    uint8_t item[64];
    size_t m = put_varint(item, (uint64_t)(uint32_t)h->tid);
    m += put_varint(item + m, (h->flags & REC_COUNTER) ? h->counter : 0);
    m += put_varint(item + m, h->tsc);
    m += put_varint(item + m, h->mono);
    m += put_varint(item + m, sid);
    eb_add(&eb_sample, item, m);
    g.n_emitted_samples++;
    g.rec_emitted_samples++;
    if (h->label != 0) {
        /* issue #15: asprof.SampleLabel (tid, join key, tsc, mono, label) */
        uint8_t li[64];
        size_t k = put_varint(li, (uint64_t)(uint32_t)h->tid);
        k += put_varint(li + k, (h->flags & REC_COUNTER) ? h->counter : 0);
        k += put_varint(li + k, h->tsc);
        k += put_varint(li + k, h->mono);
        k += put_varint(li + k, h->label);
        eb_add(&eb_label, li, k);
        uint32_t at = (h->label * 2654435761u) & (LABEL_SEEN_CAP - 1);
        for (int p = 0; p < 16; p++) {
            uint32_t *e = &label_seen[(at + (uint32_t)p) & (LABEL_SEEN_CAP - 1)];
            if (*e == h->label) break;
            if (*e == 0) {
                if (label_seen_n < LABEL_SEEN_CAP / 2) { *e = h->label; label_seen_n++; }
                else n_label_seen_full++;
                break;
            }
        }
    }
}

static void drain_all(void);

/* issue #15: the label-set ids seen since the last call (drain lock taken here). */
int pf_take_labels(uint32_t *out, int max) {
    int n = 0;
    pthread_mutex_lock(&g.lock);
    drain_all();
    for (int i = 0; i < LABEL_SEEN_CAP && n < max; i++)
        if (label_seen[i] != 0) out[n++] = label_seen[i];
    memset(label_seen, 0, sizeof(label_seen));
    label_seen_n = 0;
    pthread_mutex_unlock(&g.lock);
    return n;
}

/* issue #15: emits one asprof.LabelSet (kind 0) or asprof.Step (kind 1) event into the active
   recording. 0, or -1 (not recording, no such event, or emit failed). */
int pf_emit_context(int kind, const uint8_t *data, size_t len) {
    int rc = -1;
    if (!ours() || len == 0 || len > EVENT_MAX) return -1;
    pthread_mutex_lock(&g.lock);
    int key = kind == 0 ? g.key_labelset : g.key_step;
    if (g.active && g.cfg.emit != NULL && key >= 0) {
        if (g.cfg.emit(key, data, len) == NULL) { g.n_emitted_events++; rc = 0; }
        else g.n_emit_errors++;
    }
    pthread_mutex_unlock(&g.lock);
    return rc;
}

/* Drains every ring (drain lock held). */
static void drain_all(void) {
    unsigned char buf[sizeof(rec_hdr) + MAX_ENTRIES * sizeof(rec_frame)];
    uint64_t now = mono_ns();
    for (int i = 0; i < MAX_SLOTS; i++) {
        slot_t *s = &g.slots[i];
        int tid = atomic_load(&s->tid);
        if (tid == 0) continue;
        uint64_t tail = atomic_load_explicit(&s->tail, memory_order_relaxed);
        uint64_t head = atomic_load_explicit(&s->head, memory_order_acquire);
        while (tail < head) {
            uint32_t pos = (uint32_t)(tail & (RING_SIZE - 1));
            uint32_t size;
            unsigned char *p = s->ring;
            /* the size is the first 4 bytes; records are 8-aligned, so it never wraps */
            memcpy(&size, p + pos, 4);
            if (size < sizeof(rec_hdr) || size > sizeof(buf) || size > head - tail) {
                tail = head;  /* corrupt (cannot happen): drop the rest */
                break;
            }
            uint32_t first = RING_SIZE - pos < size ? RING_SIZE - pos : size;
            memcpy(buf, p + pos, first);
            if (first < size) memcpy(buf + first, p, size - first);
            tail += size;
            const rec_hdr *h = (const rec_hdr *)buf;
            if (h->nframes > MAX_ENTRIES) continue;
            if (!g.active) g.n_dropped_inactive++;
            else if (h->mono < g.rec_start_mono) { g.n_lost_boundary++; g.rec_lost_boundary++; }
            else emit_record(h, (const rec_frame *)(buf + sizeof(rec_hdr)));
        }
        atomic_store_explicit(&s->tail, tail, memory_order_release);
        /* Free slots of threads that are gone. */
        int free_it = 0;
        if (atomic_load(&s->dead)) free_it = 1;
        else if (!atomic_load(&s->registered) && now - s->checked_ns > 1000000000ull) {
            s->checked_ns = now;
            if (syscall(SYS_tgkill, g.pid, tid, 0) != 0 && errno == ESRCH) free_it = 1;
        }
        if (free_it && atomic_load(&s->head) == tail) {
            atomic_store(&s->tld, NULL);
            atomic_store(&s->registered, 0);
            atomic_store(&s->dead, 0);
            madvise(s->ring, RING_SIZE, MADV_DONTNEED);
            atomic_store(&s->tid, 0);
        }
    }
    eb_flush(&eb_code);   /* definitions before the samples that use them */
    eb_flush(&eb_stack);
    eb_flush(&eb_sample);
    eb_flush(&eb_label);
}

/* Recycles a code table that is getting full (drain lock held). */
static void maybe_swap_tables(void) {
    int ti = atomic_load(&g.cur_table);
    table_t *t = g.tables[ti];
    if (atomic_load(&t->count) < CODE_CAP / 2 && atomic_load(&t->arena_used) < ARENA_SIZE / 2) return;
    table_t *other = g.tables[1 - ti];  /* clean: cleared after the previous swap */
    atomic_store(&g.cur_table, 1 - ti);
    /* Handlers that pinned t before the switch finish quickly (bounded work). */
    for (int i = 0; i < 1000 && atomic_load(&t->pins) != 0; i++) usleep(100);
    if (atomic_load(&t->pins) != 0) {
        atomic_store(&g.cur_table, ti);  /* give up this time */
        return;
    }
    drain_all();  /* resolve every record that refers to t */
    uint64_t gen = t->gen;
    memset(t->entries, 0, sizeof(t->entries));
    atomic_store(&t->count, 0);
    atomic_store(&t->arena_used, 0);
    madvise(t->arena, ARENA_SIZE, MADV_DONTNEED);
    t->gen = (gen > other->gen ? gen : other->gen) + 1;
    g.n_table_swaps++;
}

static void *drainer_main(void *arg) {
    (void)arg;
    /* Profiling signals stay deliverable: this thread is profiled like any other. */
    pthread_mutex_lock(&g.lock);
    while (!g.drainer_stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t ns = (uint64_t)ts.tv_nsec + (uint64_t)g.cfg.drain_interval_ms * 1000000ull;
        ts.tv_sec += (time_t)(ns / 1000000000ull);
        ts.tv_nsec = (long)(ns % 1000000000ull);
        pthread_cond_timedwait(&g.cond, &g.lock, &ts);
        if (g.drainer_stop || getpid() != g.pid) break;
        drain_all();
        maybe_swap_tables();
        /* Someone installed a SIGSEGV/SIGBUS handler after ours: get in front again (it stays
           chained behind us for every fault that is not ours). */
        if (!pf_safeload_active()) {
            pf_safeload_install();
            g.n_guard_reinstalled++;
        }
        atomic_store(&g.guard_ok, pf_safeload_active());
    }
    pthread_mutex_unlock(&g.lock);
    return NULL;
}

#ifdef ASPROF_BENCH
/* The capture path of one sample, run n times on the calling thread outside a signal handler
   (same lookups, walk, code table and ring write; the ring is a scratch one). Returns the
   nanoseconds of the fastest of 5 batches, per capture. Only in the copy of the extension
   benchmarks/bench_pyframes.py builds with -DASPROF_BENCH, never in the shipped one. */
uint64_t pf_bench(int n) {
    if (!ours() || n <= 0) return 0;
    static slot_t scratch;
    static unsigned char ring[RING_SIZE];
    scratch.ring = ring;
    void *tstate = pf_this_thread_state();
    if (tstate == NULL) return 0;
    uint64_t best = UINT64_MAX;
    for (int batch = 0; batch < 5; batch++) {
        uint64_t t0 = mono_ns();
        for (int i = 0; i < n; i++) {
            int tid = my_tid();
            slot_t *s = find_slot(tid);
            pf_tld *tld = s != NULL ? atomic_load(&s->tld) : NULL;
            uint64_t c = tld != NULL ? tld->sample_counter : 0;
            if (pf_this_thread_state() == NULL || !pf_safeload_segv_active()) return 0;
            atomic_store(&scratch.head, 0);
            atomic_store(&scratch.tail, 0);
            record(&scratch, tid, tstate, c, 1, 0);
        }
        uint64_t dt = (mono_ns() - t0) / (uint64_t)n;
        if (dt < best) best = dt;
    }
    atomic_fetch_sub(&g.n_samples, 5 * (uint64_t)n);  /* not real samples */
    return best;
}
#endif /* ASPROF_BENCH */

/* ---------------------------------------------------------------- hooks ---- */


void pf_before_start(void) {
    if (!ours()) return;
    /* async-profiler keeps a signal only if its current handler is its own (or default):
       give it back its handlers, chain again after the start. */
    pthread_mutex_lock(&g.lock);
    unchain_signals();
    g.rec_start_mono = mono_ns();
    pthread_mutex_unlock(&g.lock);
}

void pf_after_start(int ok) {
    if (!ours()) return;
    pthread_mutex_lock(&g.lock);
    if (ok) {
        g.rec++;
        g.rec_emitted_samples = g.rec_emitted_stacks = g.rec_emitted_defs = g.rec_lost_boundary = 0;
        stacks_reset();
        g.active = 1;
        pf_safeload_install();  /* in front again if someone replaced it since */
        atomic_store(&g.guard_ok, pf_safeload_active());
        chain_signals();
    }
    pthread_mutex_unlock(&g.lock);
}

static void emit_stats(void) {
    char text[512];
    int n = snprintf(text, sizeof(text),
        "{\"recording\":%u,\"samples\":%llu,\"stacks\":%llu,\"defs\":%llu,\"lost_boundary\":%llu,"
        "\"ring_full\":%llu,\"slots_full\":%llu,\"nested\":%llu,\"unknown_code\":%llu,"
        "\"truncated\":%llu,\"no_guard\":%llu,\"events\":%llu,\"join\":%d}",
        g.rec, (unsigned long long)g.rec_emitted_samples, (unsigned long long)g.rec_emitted_stacks,
        (unsigned long long)g.rec_emitted_defs, (unsigned long long)g.rec_lost_boundary,
        (unsigned long long)atomic_load(&g.n_ring_full), (unsigned long long)atomic_load(&g.n_slots_full),
        (unsigned long long)atomic_load(&g.n_nested), (unsigned long long)atomic_load(&g.n_unknown_code),
        (unsigned long long)atomic_load(&g.n_truncated), (unsigned long long)atomic_load(&g.n_no_guard),
        (unsigned long long)g.n_emitted_events, g.cfg.join_mode);
    if (n > 0 && g.active && g.cfg.emit != NULL && g.key_stats >= 0) {
        if (g.cfg.emit(g.key_stats, (const uint8_t *)text, (size_t)n) == NULL) g.n_emitted_events++;
        else g.n_emit_errors++;
    }
}

void pf_before_stop(void) {
    if (!ours()) return;
    /* Everything captured so far goes into the recording that is about to be finished. */
    pthread_mutex_lock(&g.lock);
    drain_all();
    emit_stats();
    g.active = 0;
    pthread_mutex_unlock(&g.lock);
}

void pf_after_stop(int ok) {
    if (!ours()) return;
    pthread_mutex_lock(&g.lock);
    if (!ok) g.active = 1;  /* still recording */
    else unchain_signals();
    pthread_mutex_unlock(&g.lock);
}

void pf_before_flush(void) {
    if (!ours()) return;
    /* Held until pf_after_flush: nothing is emitted while the chunk is being finished. */
    pthread_mutex_lock(&g.lock);
    drain_all();
    emit_stats();
}

void pf_after_flush(int ok) {
    if (!ours()) return;
    if (ok && g.active) {
        /* A new chunk: its own definitions, statistics and boundary count. */
        g.rec++;
        g.rec_emitted_samples = g.rec_emitted_stacks = g.rec_emitted_defs = g.rec_lost_boundary = 0;
        stacks_reset();
    }
    pthread_mutex_unlock(&g.lock);
}

void pf_flush(void) {
    if (!ours()) return;
    pthread_mutex_lock(&g.lock);
    drain_all();
    pthread_mutex_unlock(&g.lock);
}

/* --------------------------------------------------------- registration ---- */

int pf_register_thread(void) {
    if (!ours()) return -1;
    int tid = my_tid();
    pf_tld *tld = g.cfg.get_tld != NULL ? g.cfg.get_tld() : NULL;
    /* The handler may claim a slot for this thread itself: keep it out while we do. */
    sigset_t mask, old;
    chained_mask(&mask);
    pthread_sigmask(SIG_BLOCK, &mask, &old);
    slot_t *s = find_slot(tid);
    if (s == NULL) s = claim_slot(tid, 1);
    if (s != NULL) {
        atomic_store(&s->dead, 0);
        atomic_store(&s->registered, 1);
        atomic_store(&s->tld, tld);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (s == NULL) {
        atomic_fetch_add(&g.n_slots_full, 1);
        return -1;
    }
    pthread_mutex_lock(&g.lock);
    g.n_registered++;
    pthread_mutex_unlock(&g.lock);
    return (int)(s - g.slots);
}

void pf_unregister_thread(int slot, int tid) {
    if (slot < 0 || slot >= MAX_SLOTS || g.slots == NULL) return;
    slot_t *s = &g.slots[slot];
    if (atomic_load(&s->tid) != tid) return;
    atomic_store(&s->tld, NULL);  /* before the thread's asprof data can be freed */
    atomic_store(&s->dead, 1);
}

/* ------------------------------------------------------------- modules ---- */

int pf_unmapped_globals(uintptr_t *out, int max) {
    int n = 0;
    if (!ours()) return 0;
    pthread_mutex_lock(&g.lock);
    for (int ti = 0; ti < 2; ti++) {
        table_t *t = g.tables[ti];
        for (uint32_t i = 0; i < CODE_CAP && n < max; i++) {
            code_t *e = &t->entries[i];
            if (!atomic_load(&e->ready) || e->emitted_rec != g.rec || e->mapped_rec == g.rec) continue;
            int dup = 0;
            for (int j = 0; j < n; j++) if (out[j] == e->globals) { dup = 1; break; }
            if (!dup) out[n++] = e->globals;
        }
    }
    pthread_mutex_unlock(&g.lock);
    return n;
}

void pf_emit_modules(const uintptr_t *globals, const char *const *names, int count) {
    if (!ours()) return;
    pthread_mutex_lock(&g.lock);
    if (g.active) {
        for (int k = 0; k < count; k++) {
            uint8_t item[16 + NAME_CAP];
            size_t len = strlen(names[k]);
            if (len > NAME_CAP) len = NAME_CAP;
            size_t n = put_varint(item, (uint64_t)globals[k]);
            n += put_str(item + n, (const unsigned char *)names[k], len);
            eb_add(&eb_module, item, n);
        }
        eb_flush(&eb_module);
        for (int ti = 0; ti < 2; ti++) {
            table_t *t = g.tables[ti];
            for (uint32_t i = 0; i < CODE_CAP; i++) {
                code_t *e = &t->entries[i];
                if (atomic_load(&e->ready) && e->emitted_rec == g.rec) e->mapped_rec = g.rec;
            }
        }
    }
    pthread_mutex_unlock(&g.lock);
}

/* ------------------------------------------------------- install / stats ---- */

static void *map_anon(size_t n) {
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

int pf_installed(void) { return ours(); }

/* In a forked child: the drain thread does not exist and the lock may be held by it. The
   capture is off there (ours() compares pids); make the state consistent in case the child
   installs it again. Only async-signal-safe work. */
static void after_fork_child(void) {
    cached_tid = 0;  /* the forking thread, the child's only thread, has a new tid */
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    memcpy(&g.lock, &m, sizeof(m));
    memcpy(&g.cond, &c, sizeof(c));
    g.drainer_running = 0;
    g.active = 0;
    atomic_store(&g.installed, 0);
    atomic_store(&g.enabled, 0);
    if (g.slots != NULL)
        for (int i = 0; i < MAX_SLOTS; i++) {
            atomic_store(&g.slots[i].tid, 0);
            atomic_store(&g.slots[i].tld, NULL);
            atomic_store(&g.slots[i].head, 0);
            atomic_store(&g.slots[i].tail, 0);
        }
    for (int sig = 0; sig < 65; sig++) atomic_store(&g.sig[sig].chained, 0);
}
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, after_fork_child); }

const char *pf_install(const pf_config *cfg) {
    if (ours()) return NULL;
    pthread_once(&atfork_once, register_atfork);
    if (cfg->emit == NULL || cfg->register_event == NULL)
        return "async-profiler has no user events (asprof_emit_jfr_event needs 4.1 or later)";
    if (g.slots == NULL) {
        g.slots = map_anon(sizeof(slot_t) * MAX_SLOTS);
        g.rings = map_anon((size_t)RING_SIZE * MAX_SLOTS);
        g.tables[0] = map_anon(sizeof(table_t));
        g.tables[1] = map_anon(sizeof(table_t));
        stacks = map_anon(sizeof(stack_t_) * STACK_CAP);
        stack_arena = map_anon(STACK_ARENA);
        if (!g.slots || !g.rings || !g.tables[0] || !g.tables[1] || !stacks || !stack_arena)
            return "cannot reserve memory for the Python stack buffers";
        for (int i = 0; i < MAX_SLOTS; i++) g.slots[i].ring = g.rings + (size_t)i * RING_SIZE;
        g.tables[1]->gen = 1;
    }
    pthread_mutex_lock(&g.lock);
    g.cfg = *cfg;
    if (g.cfg.max_frames < 1) g.cfg.max_frames = 1;
    if (g.cfg.max_frames > MAX_PY_FRAMES) g.cfg.max_frames = MAX_PY_FRAMES;
    if (g.cfg.drain_interval_ms < 1) g.cfg.drain_interval_ms = 50;
    g.pid = getpid();
    g.key_code = cfg->register_event("asprof.PyCode");
    g.key_stack = cfg->register_event("asprof.PyStack");
    g.key_sample = cfg->register_event("asprof.PySample");
    g.key_module = cfg->register_event("asprof.PyModule");
    g.key_stats = cfg->register_event("asprof.PyStats");
    g.key_labelset = cfg->register_event("asprof.LabelSet");
    g.key_samplelabel = cfg->register_event("asprof.SampleLabel");
    g.key_step = cfg->register_event("asprof.Step");
    eb_init(&eb_label, g.key_samplelabel);
    eb_init(&eb_code, g.key_code);
    eb_init(&eb_stack, g.key_stack);
    eb_init(&eb_sample, g.key_sample);
    eb_init(&eb_module, g.key_module);
    if (g.key_code < 0 || g.key_stack < 0 || g.key_sample < 0) {
        pthread_mutex_unlock(&g.lock);
        return "asprof_register_jfr_event failed";
    }
    if (pf_safeload_install() != 0) {
        pthread_mutex_unlock(&g.lock);
        return "cannot install the fault guard for frame reads (unsupported architecture?)";
    }
    g.drainer_stop = 0;
    if (!g.drainer_running) {
        if (pthread_create(&g.drainer, NULL, drainer_main, NULL) != 0) {
            pthread_mutex_unlock(&g.lock);
            return "cannot start the Python stack drain thread";
        }
        g.drainer_running = 1;
        pthread_setname_np(g.drainer, "asprof-pyframes");  /* visible in top, /proc, gdb */
    }
    atomic_store(&g.guard_ok, pf_safeload_active());
    atomic_store(&g.installed, 1);
    atomic_store(&g.enabled, 1);
    pthread_mutex_unlock(&g.lock);
    return NULL;
}

void pf_uninstall(void) {
    if (!ours()) return;
    pthread_mutex_lock(&g.lock);
    atomic_store(&g.enabled, 0);
    unchain_signals();
    drain_all();
    g.active = 0;
    g.drainer_stop = 1;
    pthread_cond_broadcast(&g.cond);
    int join = g.drainer_running;
    g.drainer_running = 0;
    atomic_store(&g.installed, 0);
    pthread_mutex_unlock(&g.lock);
    if (join) pthread_join(g.drainer, NULL);
    /* The fault guard stays: a handler that started before we unchained may still be walking. */
}

void pf_get_stats(pf_stats *o) {
    memset(o, 0, sizeof(*o));
    if (g.pid != 0 && getpid() != g.pid) return;  /* a forked child: the lock may be the parent's */
    o->signals = atomic_load(&g.n_signals);
    o->samples = atomic_load(&g.n_samples);
    o->nested = atomic_load(&g.n_nested);
    o->no_python = atomic_load(&g.n_no_python);
    o->no_guard = atomic_load(&g.n_no_guard);
    o->masked = atomic_load(&g.n_masked);
    o->ring_full = atomic_load(&g.n_ring_full);
    o->slots_full = atomic_load(&g.n_slots_full);
    o->unknown_code = atomic_load(&g.n_unknown_code);
    o->unknown_unreadable = pf_unknown_unreadable();
    o->unknown_full = pf_unknown_full();
    o->faults_recovered = pf_safeload_faults();
    o->guard_reinstalled = g.n_guard_reinstalled;
    o->timed_ns = atomic_load(&g.n_timed_ns);
    o->timed = atomic_load(&g.n_timed);
    o->truncated = atomic_load(&g.n_truncated);
    pthread_mutex_lock(&g.lock);
    o->emitted_samples = g.n_emitted_samples;
    o->emitted_stacks = g.n_emitted_stacks;
    o->emitted_defs = g.n_emitted_defs;
    o->emitted_events = g.n_emitted_events;
    o->emit_errors = g.n_emit_errors;
    o->lost_boundary = g.n_lost_boundary;
    o->dropped_inactive = g.n_dropped_inactive;
    o->table_swaps = g.n_table_swaps;
    o->recordings = g.rec;
    o->registered = g.n_registered;
    o->chained_signals = g.n_chained;
    o->rec_emitted_samples = g.rec_emitted_samples;
    pthread_mutex_unlock(&g.lock);
}
