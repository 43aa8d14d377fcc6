/*
 * The SIGPROF handler of the built-in engine.
 *
 * Our signals carry a magic value (per-thread timers: SI_TIMER; wall signals from the sampler:
 * SI_QUEUE with the thread's state), or are SI_KERNEL while the ITIMER_PROF fallback runs.
 * Any other SIGPROF goes to the handler installed before ours (chained, never swallowed).
 *
 * Per sample: the native PC from the signal context, the Python frames of this thread
 * (csrc/pyframes' fault-tolerant walk, names copied into the half's code table), the stack
 * deduplicated into the half's lock-free stack table, one 24-byte record. No allocation, no
 * lock, no call that is not async-signal-safe; bounded loops; errno preserved.
 */
#define _GNU_SOURCE 1
#include "builtin.h"

#include <errno.h>
#include <linux/perf_event.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* The thread id, cached per thread (initial-exec TLS: a plain %fs-relative load in the handler,
   no lazy allocation). Reset in a forked child (bi_handler_atfork_child). */
static __thread int cached_tid __attribute__((tls_model("initial-exec")));

uint32_t (*volatile bi_ctx_sample)(void);

/* Benchmarks only (_builtin._set_inert): the handler returns as soon as it knows a signal is ours,
   so a run measures what the signals themselves cost (timer interrupts, delivery, sigreturn). */
_Atomic int bi_inert;

/* async-signal-safe: runs in the handler. */
static inline uint32_t my_tid(void) {
    int t = cached_tid;
    if (t == 0) cached_tid = t = (int)syscall(SYS_gettid);
    return (uint32_t)t;
}

void bi_handler_atfork_child(void) { cached_tid = 0; }

/* The most one handler call adds to handler_ns (see the end of bi_handler). */
#define HANDLER_NS_CAP 50000ull

/* When a handler last saw our fault guard first in line for SIGSEGV (one sigaction call at most
   every GUARD_RECHECK_NS across all threads; the sampler re-installs it every 100 ms). */
#ifdef ASPROF_WALKER
#define GUARD_RECHECK_NS 10000000ull
static _Atomic uint64_t guard_checked_ns;
#endif

static _Atomic(void *) prev_fn;
static _Atomic int prev_flags;
static struct sigaction prev_sa;

/* Set while this thread runs the previous handler: a handler that chains back to ours (it was
   installed after us, and ours went back in front) must not start a loop. */
static __thread int in_prev __attribute__((tls_model("initial-exec")));

/* async-signal-safe: runs in the handler. */
static void call_prev(int sig, siginfo_t *info, void *uc) {
    void *fn = atomic_load_explicit(&prev_fn, memory_order_acquire);
    int flags = atomic_load_explicit(&prev_flags, memory_order_relaxed);
    if (fn == (void *)SIG_DFL || fn == (void *)SIG_IGN || fn == NULL || fn == (void *)bi_handler) return;
    if (in_prev) {
        /* we were called by the previous handler for a signal neither owns: it ends here */
        atomic_fetch_add_explicit(&bi.n.chain_loops, 1, memory_order_relaxed);
        return;
    }
    in_prev = 1;
    if (flags & SA_SIGINFO) ((void (*)(int, siginfo_t *, void *))fn)(sig, info, uc);
    else ((void (*)(int))fn)(sig);
    in_prev = 0;
}

/* async-signal-safe: runs in the handler. */
static inline int our_perf_fd(const siginfo_t *info) {
    if (info->si_code != POLL_HUP && info->si_code != POLL_IN) return -1;
    int fd = info->si_fd;
    if (fd < 0 || fd >= BI_PERF_FD_MAX) return -1;
    uint64_t word = atomic_load_explicit(&bi_perf_fds[fd >> 6], memory_order_acquire);
    return (word >> (fd & 63)) & 1u ? fd : -1;
}

/* async-signal-safe: runs in the handler. */
static inline uint64_t signal_pc(void *ucontext) {
    ucontext_t *uc = (ucontext_t *)ucontext;
    if (uc == NULL) return 0;
#if defined(__x86_64__)
    return (uint64_t)uc->uc_mcontext.gregs[REG_RIP];
#elif defined(__aarch64__)
    return (uint64_t)uc->uc_mcontext.pc;
#else
    return 0;
#endif
}

/* A wall sample's thread state, from the context the signal interrupted (the sampler sends
   BI_STATE_ASK instead of reading /proc/<tid>/stat, an open, a read and a close per thread per
   tick, most of its cost): 2 (sleeping) when the signal broke into a blocking system call, 1
   (running) otherwise. The kernel, delivering a signal that interrupts a system call, leaves the
   saved PC on the syscall instruction (the call is restarted) or returns -EINTR just after it.
   Instruction bytes are read through the fault guard; 1 when they cannot be read.
   async-signal-safe: runs in the handler. */
static unsigned interrupted_state(void *ucontext) {
#if defined(ASPROF_WALKER) && (defined(__x86_64__) || defined(__aarch64__))
    ucontext_t *uc = (ucontext_t *)ucontext;
    if (uc == NULL || !atomic_load_explicit(&bi.guard_ok, memory_order_relaxed)) return 1;
#if defined(__x86_64__)
    uint64_t pc = (uint64_t)uc->uc_mcontext.gregs[REG_RIP], ret = (uint64_t)uc->uc_mcontext.gregs[REG_RAX];
    unsigned char b[4];
    if (pc < 2 || pf_safe_copy(b, pc - 2, sizeof(b)) != 0) return 1;
    /* bytes pc-2 .. pc+1: "syscall" is 0f 05 */
    if (b[2] == 0x0F && b[3] == 0x05) return 2;                                    /* to be restarted */
    if (b[0] == 0x0F && b[1] == 0x05 && (int64_t)ret == -(int64_t)EINTR) return 2; /* interrupted */
    return 1;
#else
    uint64_t pc = (uint64_t)uc->uc_mcontext.pc, ret = (uint64_t)uc->uc_mcontext.regs[0];
    uint32_t w[2];
    if (pc < 4 || pf_safe_copy(w, pc - 4, sizeof(w)) != 0) return 1;
    /* the instructions at pc-4 and pc: "svc #0" is d4000001 */
    if (w[1] == 0xD4000001u) return 2;                                        /* to be restarted */
    if (w[0] == 0xD4000001u && (int64_t)ret == -(int64_t)EINTR) return 2;     /* interrupted */
    return 1;
#endif
#else
    (void)ucontext;
    return 1;
#endif
}

#ifdef ASPROF_WALKER
/* async-signal-safe: runs in the handler. */
static uint64_t hash_frames(const bi_frame *fr, int n, int truncated) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)n ^ ((uint64_t)truncated << 40);
    for (int i = 0; i < n; i++) {
        uint64_t x = ((uint64_t)fr[i].idx << 32) | (uint32_t)fr[i].lasti;
        h = (h ^ x) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
    }
    return h ? h : 1;
}

/* Finds or adds the stack; returns its index, or BI_STACK_CAP when there is no room.
   async-signal-safe: runs in the handler. */
static uint32_t stack_index(bi_half *hf, const bi_frame *fr, int n, int truncated) {
    uint64_t h = hash_frames(fr, n, truncated);
    for (uint32_t p = 0; p < BI_STACK_PROBES; p++) {
        uint32_t idx = (uint32_t)((h + p) & (BI_STACK_CAP - 1));
        bi_stack *e = &hf->stacks[idx];
        uint64_t k = atomic_load_explicit(&e->hash, memory_order_acquire);
        if (k == 0) {
            if (atomic_load_explicit(&hf->nstacks, memory_order_relaxed) >= BI_STACK_CAP * 3 / 4) break;
            uint64_t expect = 0;
            if (atomic_compare_exchange_strong(&e->hash, &expect, h)) {
                atomic_fetch_add(&hf->nstacks, 1);
                uint32_t off = atomic_fetch_add(&hf->frames_used, (uint32_t)n);
                if ((uint64_t)off + (uint64_t)n > BI_FRAME_CAP) {
                    atomic_store_explicit(&e->ready, 2, memory_order_release);
                    return BI_STACK_CAP;
                }
                memcpy(&hf->frames[off], fr, (size_t)n * sizeof(bi_frame));
                e->off = off;
                e->n = (uint16_t)n;
                e->truncated = (uint16_t)truncated;
                atomic_store_explicit(&e->ready, 1, memory_order_release);
                return idx;
            }
            k = expect;
        }
        /* Being written by another handler right now: probe on (a duplicate is merged later). */
        if (k == h && atomic_load_explicit(&e->ready, memory_order_acquire) == 1 && e->n == n &&
            e->truncated == truncated && memcmp(&hf->frames[e->off], fr, (size_t)n * sizeof(bi_frame)) == 0)
            return idx;
    }
    return BI_STACK_CAP;
}

/* The Python stack of this thread into hf: its index, BI_NO_STACK (no Python frames) or
   BI_STACK_CAP (no room). async-signal-safe: runs in the handler. */
static uint32_t python_stack(bi_half *hf, void *ucontext, uint64_t now) {
    if (!bi_walker_ok) return BI_NO_STACK;  /* refused at import (pf_layout_check) */
    void *tstate = pf_this_thread_state();
    if (tstate == NULL) {
        atomic_fetch_add_explicit(&bi.n.no_python, 1, memory_order_relaxed);
        return BI_NO_STACK;
    }
    ucontext_t *uc = (ucontext_t *)ucontext;
    if (uc != NULL && (sigismember(&uc->uc_sigmask, SIGSEGV) == 1 || sigismember(&uc->uc_sigmask, SIGBUS) == 1)) {
        atomic_fetch_add_explicit(&bi.n.masked, 1, memory_order_relaxed);  /* a fault could not be caught */
        return BI_NO_STACK;
    }
    /* Our fault guard must be first in line for SIGSEGV (SIGBUS, which a heap read cannot raise,
       is checked by the sampler thread). */
    if (!atomic_load_explicit(&bi.guard_ok, memory_order_relaxed)) {
        atomic_fetch_add_explicit(&bi.n.no_guard, 1, memory_order_relaxed);
        return BI_NO_STACK;
    }
    uint64_t checked = atomic_load_explicit(&guard_checked_ns, memory_order_relaxed);
    if (now - checked > GUARD_RECHECK_NS) {
        if (!pf_safeload_segv_active()) {
            atomic_store_explicit(&bi.guard_ok, 0, memory_order_relaxed);  /* the sampler puts it back */
            atomic_fetch_add_explicit(&bi.n.no_guard, 1, memory_order_relaxed);
            return BI_NO_STACK;
        }
        atomic_store_explicit(&guard_checked_ns, now, memory_order_relaxed);
    }
    /* Sized by max_frames (default 128: ~7 KB of the interrupted thread's stack, not 15). */
    int max = bi.max_frames;
    if (max < 1 || max > BI_MAX_FRAMES) max = BI_MAX_FRAMES;
    pf_rawframe raw[2 * max + 2];
    bi_frame fr[max];
    int truncated = 0, unknown = 0;
    int n = pf_walk(tstate, raw, 2 * max + 2, max, &truncated);
    int m = 0;
    for (int i = 0; i < n && m < max; i++) {
        if (raw[i].flags & PF_FRAME_BOUNDARY) continue;
        fr[m].idx = pf_code_index(hf->codes, raw[i].code, raw[i].globals);
        fr[m].lasti = raw[i].lasti;
        if (fr[m].idx == PF_IDX_UNKNOWN) unknown = 1;
        m++;
    }
    if (unknown) atomic_fetch_add_explicit(&bi.n.unknown_code, 1, memory_order_relaxed);
    if (truncated) atomic_fetch_add_explicit(&bi.n.truncated, 1, memory_order_relaxed);
    if (m == 0) return BI_NO_STACK;
    return stack_index(hf, fr, m, truncated);
}
#endif

/* async-signal-safe: runs in the handler. */
void bi_handler(int sig, siginfo_t *info, void *ucontext) {
    int saved_errno = errno;
    uint64_t t0 = pf_mono_ns();
    unsigned kind, state, extra = 0;
    int perf_fd = -1, wall_slot = -1, cpu_slot = -1;
    uint64_t v = info != NULL ? (uint64_t)(uintptr_t)info->si_value.sival_ptr : 0;
    if (info != NULL && (perf_fd = our_perf_fd(info)) >= 0) {
        kind = 0; state = 0;  /* one perf task-clock period of this thread's CPU */
        cpu_slot = (int)atomic_load_explicit(&bi_perf_slot[perf_fd], memory_order_relaxed) - 1;
    } else if (info != NULL && info->si_code == SI_TIMER && (v & BI_MAGIC_MASK) == BI_MAGIC &&
               (v & 0xF00u) == BI_VAL_CPU) {
        kind = 0; state = 0;
        cpu_slot = (int)((v >> 12) & 0xFFFFFu);
        /* Thread CPU-clock timers expire on scheduler ticks: at intervals shorter than a tick,
           one signal stands for 1 + si_overrun intervals (collect repeats the record). */
        extra = info->si_overrun > 0 ? (info->si_overrun > 31 ? 31u : (unsigned)info->si_overrun) : 0u;
    } else if (info != NULL && info->si_code == SI_QUEUE && (v & BI_MAGIC_MASK) == BI_MAGIC &&
               (v & 0xF00u) == BI_VAL_WALL) {
        kind = 1; state = (unsigned)(v & 3u);
        if (state == BI_STATE_ASK) state = interrupted_state(ucontext);
        wall_slot = (int)((v >> 12) & 0xFFFFFu);
    } else if (info != NULL && info->si_code == SI_KERNEL && atomic_load_explicit(&bi.itimer_mode, memory_order_relaxed)) {
        kind = 0; state = 0;
        /* issue #13: the ITIMER_PROF is the application's now (it re-armed it): its handler gets
           every tick too (first: what follows may return early) */
        if (atomic_load_explicit(&bi.itimer_shared, memory_order_relaxed)) call_prev(sig, info, ucontext);
    } else {
        atomic_fetch_add_explicit(&bi.n.chained, 1, memory_order_relaxed);
        call_prev(sig, info, ucontext);
        errno = saved_errno;
        return;
    }
    if (atomic_load_explicit(&bi_inert, memory_order_relaxed)) {
        atomic_fetch_add_explicit(&bi.n.signals, 1, memory_order_relaxed);  /* counted, nothing else */
        errno = saved_errno;
        return;
    }
    if (!atomic_load_explicit(&bi.enabled, memory_order_acquire)) {
        atomic_fetch_add_explicit(&bi.n.inert, 1, memory_order_relaxed);  /* in flight at stop */
        errno = saved_errno;
        return;
    }
    atomic_fetch_add_explicit(&bi.n.signals, 1, memory_order_relaxed);
    /* Pin the half we write to; collect() swaps halves and waits for pins to drop. */
    int c = atomic_load(&bi.cur);
    bi_half *hf = &bi.halves[c];
    atomic_fetch_add(&hf->pins, 1);
    if (atomic_load(&bi.cur) != c) {
        atomic_fetch_sub(&hf->pins, 1);
        c = 1 - c;
        hf = &bi.halves[c];
        atomic_fetch_add(&hf->pins, 1);
        if (atomic_load(&bi.cur) != c) {  /* two swaps under us: give up this one */
            atomic_fetch_sub(&hf->pins, 1);
            atomic_fetch_add_explicit(&bi.n.lost, 1, memory_order_relaxed);
            goto out;
        }
    }
    if (!atomic_load(&bi.enabled)) {
        /* stop() came in between: it waits for pinned handlers, so this one writes nothing */
        atomic_fetch_sub(&hf->pins, 1);
        atomic_fetch_add_explicit(&bi.n.inert, 1, memory_order_relaxed);
        errno = saved_errno;
        return;
    }
    uint32_t slot = atomic_fetch_add_explicit(&hf->nsamples, 1, memory_order_relaxed);
    if (slot >= BI_SAMPLE_CAP) {
        atomic_fetch_sub(&hf->pins, 1);
        atomic_fetch_add_explicit(&bi.n.lost, 1, memory_order_relaxed);
        goto out;
    }
    uint32_t stack = BI_NO_STACK;
#ifdef ASPROF_WALKER
    stack = python_stack(hf, ucontext, t0);
    if (stack == BI_STACK_CAP) {
        /* the slot stays reserved but empty: marked so collect skips it */
        hf->samples[slot].packed = 0xFFFFFFFFu;
        hf->samples[slot].tid = 0;
        atomic_fetch_add_explicit(&hf->lost, 1, memory_order_relaxed);
        atomic_fetch_sub(&hf->pins, 1);
        atomic_fetch_add_explicit(&bi.n.lost, 1, memory_order_relaxed);
        goto out;
    }
#endif
    bi_sample *s = &hf->samples[slot];
    uint32_t (*ctx_sample)(void) = bi_ctx_sample;
    s->time = t0;
    s->pc = signal_pc(ucontext);
    s->tid = my_tid();
    s->label = ctx_sample != NULL ? ctx_sample() : 0u;  /* issue #15: the thread's labels now */
    s->packed = (stack & 0xFFFFFFu) | (kind << 24) | (state << 25) | (extra << 27);
    if (wall_slot >= 0 && wall_slot < BI_MAX_THREADS) {
        /* what the sampler repeats while this thread stays idle */
        bi_wall_last *w = &bi_wall_lasts[wall_slot];
        atomic_fetch_add(&w->gen, 1);
        w->epoch = atomic_load(&hf->epoch);
        w->stack = stack;
        w->pc = s->pc;
        w->label = s->label;
        /* Only a stack taken while the thread slept is where it still is while it stays idle: one
           taken while it ran (it then blocked after using little CPU) would be repeated, stale,
           for the whole wait (issue #15: an event-loop stall showed the code before it). */
        w->sleeping = state == 2u;
        atomic_fetch_add(&w->gen, 1);
    }
    if (cpu_slot >= 0 && cpu_slot < BI_MAX_THREADS && extra == 0) {
        /* what the sampler takes as this thread's wall sample while it keeps running */
        bi_cpu_last *cl = &bi_cpu_lasts[cpu_slot];
        atomic_fetch_add(&cl->gen, 1);
        cl->epoch = atomic_load(&hf->epoch);
        cl->stack = stack;
        cl->pc = s->pc;
        cl->label = s->label;
        cl->time = t0;
        cl->tid = s->tid;
        atomic_fetch_add(&cl->gen, 1);
    }
    atomic_fetch_sub(&hf->pins, 1);  /* seq_cst: the record is complete before the unpin */
    atomic_fetch_add_explicit(&bi.n.samples, 1, memory_order_relaxed);
out:
    /* Elapsed time, so a call during which the thread was preempted would count the other
       processes' time too (tens of ms on a busy host): each call counts at most HANDLER_NS_CAP,
       far above what the handler's own work takes (~0.3-3 us), so the overhead guard, which adds
       handler_ns to the profiler's CPU, never stops profiling for time that was not ours. */
    uint64_t dt = pf_mono_ns() - t0;
    if (dt > HANDLER_NS_CAP) {
        dt = HANDLER_NS_CAP;
        atomic_fetch_add_explicit(&bi.n.handler_slow, 1, memory_order_relaxed);
    }
    atomic_fetch_add_explicit(&bi.n.handler_ns, dt, memory_order_relaxed);
    atomic_fetch_add_explicit(&bi.n.handler_calls, 1, memory_order_relaxed);
    errno = saved_errno;
}

int bi_handler_is_installed(void) {
    struct sigaction cur;
    return sigaction(SIGPROF, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == bi_handler;
}

/* Installs ours in front; the one found there is kept to chain to. Not async-signal-safe. */
int bi_handler_install(void) {
    struct sigaction cur;
    if (sigaction(SIGPROF, NULL, &cur) != 0) return -1;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == bi_handler) return 0;
    prev_sa = cur;
    atomic_store(&prev_flags, cur.sa_flags);
    atomic_store(&prev_fn, (cur.sa_flags & SA_SIGINFO) ? (void *)cur.sa_sigaction : (void *)cur.sa_handler);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = bi_handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART | (cur.sa_flags & SA_ONSTACK);
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGPROF, &sa, NULL);
}

void bi_handler_restore(void) {
    if (bi_handler_is_installed()) sigaction(SIGPROF, &prev_sa, NULL);
}

/* Not in a handler: the sampler thread (which never takes SIGPROF). Same protocol as the
   handler's: pin the current half, re-check, reserve a slot. */
int bi_store_append(uint64_t time, uint32_t tid, uint32_t stack, uint64_t pc, unsigned kind, unsigned state,
                    uint32_t epoch, uint32_t label) {
    if (!atomic_load(&bi.enabled)) return -1;
    int c = atomic_load(&bi.cur);
    bi_half *hf = &bi.halves[c];
    atomic_fetch_add(&hf->pins, 1);
    if (atomic_load(&bi.cur) != c || atomic_load(&hf->epoch) != epoch || !atomic_load(&bi.enabled)) {
        atomic_fetch_sub(&hf->pins, 1);
        return -1;
    }
    uint32_t slot = atomic_fetch_add(&hf->nsamples, 1);
    if (slot >= BI_SAMPLE_CAP) {
        atomic_fetch_sub(&hf->pins, 1);
        atomic_fetch_add(&bi.n.lost, 1);
        return 0;  /* counted as lost: nothing to retry */
    }
    bi_sample *s = &hf->samples[slot];
    s->time = time;
    s->pc = pc;
    s->tid = tid;
    s->label = label;
    s->packed = (stack & 0xFFFFFFu) | (kind << 24) | (state << 25);
    atomic_fetch_sub(&hf->pins, 1);
    atomic_fetch_add(&bi.n.samples, 1);
    return 0;
}
