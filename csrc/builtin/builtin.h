/*
 * asprof's built-in sampling engine (issue #11): the module asprof.engines._builtin.
 *
 *   handler.c  the SIGPROF handler (records one sample into the store), its installation and
 *              chaining to the handler that was there before
 *   store.c    the sample store: two halves (one written by handlers, one drained by collect),
 *              each a bounded sample array, a lock-free stack table and a code table
 *   timers.c   per-thread CPU-clock timers, the ITIMER_PROF fallback, the "asprof-sampler"
 *              thread (thread rescans, wall-clock signals), fork handling
 *   module.c   the Python module (start, stop, running, collect, stats)
 *
 * The Python frames come from csrc/pyframes (walk.c, safeload.c, sigcapture.c) where the walker
 * supports the interpreter (ASPROF_WALKER defined by setup.py); elsewhere samples carry the
 * native leaf only.
 */
#ifndef ASPROF_BUILTIN_H
#define ASPROF_BUILTIN_H

#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>

#ifdef ASPROF_WALKER
#include "pyframes.h"
#include "sigcapture.h"
#else
#include <time.h>
static inline uint64_t pf_mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
#endif

/* sigval of our signals: magic in the upper 32 bits, kind and state below. */
#define BI_MAGIC 0x4153505200000000ull          /* "ASPR" */
#define BI_MAGIC_MASK 0xFFFFFFFF00000000ull
#define BI_VAL_CPU 0x100u
#define BI_VAL_WALL 0x200u
#define BI_STATE_ASK 3u      /* a wall signal's state: the handler tells (running or in a blocking call) */

#define BI_MAX_FRAMES 256                       /* Python frames per sample, upper bound */
#define BI_SAMPLE_CAP (1u << 18)                /* samples per half (24 bytes each) */
#define BI_STACK_CAP (1u << 15)                 /* distinct Python stacks per half */
#define BI_FRAME_CAP (1u << 20)                 /* frames of those stacks per half */
#define BI_STACK_PROBES 64
#define BI_NO_STACK 0xFFFFFFu                   /* sample without Python frames */
#define BI_PERF_FD_MAX 65536                    /* perf event fds above are not used */
#define BI_MAX_THREADS 8192                     /* threads followed by the sampler */
#define BI_IDLE_NS 100000ull                    /* CPU time a thread may use between wall ticks and still be idle */

/* A thread's last wall sample, written by its handler, read by the sampler: while the thread
   stays idle (its CPU time does not move), the sampler records that sample again instead of
   signalling the thread (no wake-up, no handler, no EINTR). gen is odd while being written. */
typedef struct {
    _Atomic uint32_t gen;
    uint32_t epoch;      /* of the half the stack index belongs to; 0 = none */
    uint32_t stack;
    uint64_t pc;
    uint32_t label;      /* label-set id of that sample (issue #15) */
    uint32_t sleeping;   /* the thread was sleeping when it was signalled: its stack may be repeated */
} bi_wall_last;
extern bi_wall_last bi_wall_lasts[BI_MAX_THREADS];

/* A thread's last CPU sample, written by its handler, read by the sampler: a thread that ran
   through the wall interval and had a CPU sample taken in its second half gets that stack as its
   wall sample (state running) instead of a signal of its own: at 1 ms CPU + 10 ms wall, one
   signal fewer per busy thread per wall tick. gen is odd while being written. */
typedef struct {
    _Atomic uint32_t gen;
    uint32_t epoch;      /* of the half the stack index belongs to; 0 = none */
    uint32_t stack;
    uint32_t label;
    uint32_t tid;        /* the thread that wrote it (a slot is reused when its thread ends) */
    uint64_t pc;
    uint64_t time;       /* pf_mono_ns() of the sample */
} bi_cpu_last;
extern bi_cpu_last bi_cpu_lasts[BI_MAX_THREADS];
/* The sampler's slot + 1 of the thread a perf event of ours belongs to, by fd (0: unknown). */
extern _Atomic uint16_t bi_perf_slot[BI_PERF_FD_MAX];

/* The last handler found in our place on SIGPROF (timers.c, before it put ours back in front;
   0 = none yet): the application's, named in the takeover warning (issue #13). */
extern _Atomic uintptr_t bi_foreign_fn;

/* Bit fd set: fd is one of our perf task-clock events (timers.c). */
extern _Atomic uint64_t bi_perf_fds[BI_PERF_FD_MAX / 64];

typedef struct {
    uint64_t time;       /* CLOCK_MONOTONIC ns */
    uint64_t pc;         /* native PC at the signal (0 = unknown) */
    uint32_t tid;
    uint32_t packed;     /* stack index (24 bits) | kind << 24 | state << 25 | timer overrun << 27 */
    uint32_t label;      /* label-set id active on the thread (issue #15; 0 = none) */
} bi_sample;

/* The calling thread's label-set id, counting one sample (asprof.context._ctx's hook; NULL
   until an engine start found it). async-signal-safe. */
extern uint32_t (*volatile bi_ctx_sample)(void);
/* Benchmarks only: our signals are taken and nothing else done (handler.c). */
extern _Atomic int bi_inert;

typedef struct {
    uint32_t idx;        /* code index in the half's code table (or PF_IDX_UNKNOWN) */
    int32_t lasti;
} bi_frame;

typedef struct {
    _Atomic uint64_t hash;   /* 0 = empty */
    _Atomic int ready;       /* 1 = frames written; 2 = no room for frames */
    uint32_t off;
    uint16_t n;
    uint16_t truncated;
} bi_stack;

typedef struct {
    _Atomic int pins;                  /* handlers using this half now */
    _Atomic uint32_t epoch;            /* set when the half becomes the current one (never 0) */
    _Atomic uint32_t nsamples;         /* reserved slots (may exceed BI_SAMPLE_CAP: lost) */
    _Atomic uint32_t nstacks;
    _Atomic uint32_t frames_used;
    _Atomic uint64_t lost;             /* samples dropped for lack of room (stack table, frames) */
    bi_sample *samples;
    bi_stack *stacks;
    bi_frame *frames;
#ifdef ASPROF_WALKER
    pf_codetable *codes;
#endif
} bi_half;

typedef struct {
    _Atomic uint64_t signals, samples, lost, chained, no_python, truncated, handler_calls,
        handler_ns, handler_slow, inert, no_guard, masked, unknown_code, foreign_kernel, handler_reinstalled,
        wall_sent, wall_failed, timer_failed, collects, collect_timeouts, perf_rearmed, chain_loops, wall_repeated,
        wall_from_cpu;
} bi_counters;

extern struct bi_state {
    _Atomic int enabled;              /* the handler records our signals */
    _Atomic int itimer_mode;          /* SI_KERNEL SIGPROF are ours */
    /* issue #13: the application re-armed ITIMER_PROF (one per process) over ours: its ticks are
       recorded and also passed on to the handler behind ours; itimer_taken counts the times. */
    _Atomic int itimer_shared;
    _Atomic uint64_t itimer_taken;
    _Atomic int guard_ok;             /* the fault guard for frame reads is in place */
    int max_frames;
    _Atomic int cur;                  /* the half handlers write to */
    bi_half halves[2];
    bi_counters n;
} bi;

#ifdef ASPROF_WALKER
/* 0 when the running interpreter's layout is not the one the walker was built for
   (pf_layout_check at import): samples then carry no Python stack (module.c). */
extern int bi_walker_ok;
#endif

/* store.c */
int bi_store_init(void);                 /* maps the halves (once); 0 or -1 */
void bi_store_reset(bi_half *h);         /* no handler may use it */
/* Swaps the halves and waits for handlers to leave the old one: returns it, or NULL (timeout). */
bi_half *bi_store_swap(void);
/* Waits (up to ~1 s) until no handler writes to the store; call after clearing bi.enabled. */
void bi_store_quiesce(void);
/* A fresh non-zero epoch for a half about to become current. */
uint32_t bi_store_new_epoch(void);
/* Bytes of the store resident in memory now (mincore over its mappings). */
uint64_t bi_store_resident(void);

/* handler.c */
/* Appends a sample from outside a handler (the sampler's repeated wall samples), into the
   current half only if its epoch is `epoch`. 0, or -1 (not that half any more, or full). */
int bi_store_append(uint64_t time, uint32_t tid, uint32_t stack, uint64_t pc, unsigned kind, unsigned state,
                    uint32_t epoch, uint32_t label);
int bi_handler_install(void);            /* 0 or -1 (errno) */
int bi_handler_is_installed(void);
void bi_handler_restore(void);
void bi_handler_atfork_child(void);   /* forget the cached thread id */           /* puts the previous handler back if ours is installed */
/* async-signal-safe: runs in the handler. */
void bi_handler(int sig, siginfo_t *info, void *ucontext);

/* timers.c */
/* cpu_mode: 0 auto (perf, else timers, else itimer), 1 thread (CPU-clock timers), 2 process
   (ITIMER_PROF), 3 perf. Returns NULL or an error message (errno kept). *mode_out:
   "perf-task-clock" | "thread-cputime" | "itimer" | "off". */
const char *bi_sampler_start(uint64_t cpu_ns, uint64_t wall_ns, int cpu_mode, const char **mode_out);
void bi_sampler_stop(void);
void bi_sampler_recheck(void);     /* issue #13: our handler in front and our perf events re-armed, now */
int bi_sampler_running(void);
int bi_sampler_threads(void);
int bi_sampler_timers(void);
int bi_sampler_perf_events(void);  /* per-thread perf events open now */
int bi_sampler_excluded(void);    /* threads named "asprof-..." left out */
void bi_atfork_child(void);

#endif
