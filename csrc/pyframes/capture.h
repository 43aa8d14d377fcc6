/* capture.c's interface to module.c (no Python API in capture.c except through walk.c). */
#ifndef ASPROF_PYFRAMES_CAPTURE_H
#define ASPROF_PYFRAMES_CAPTURE_H

#include <stdint.h>
#include <stddef.h>

#include "asprof_abi.h"  /* async-profiler's C API, declared once */

/* Short names for the 4.x functions capture.c calls (the types are the ABI header's). */
typedef asp_thread_local_data pf_tld;
typedef asp_get_tld_fn pf_get_tld_fn;
typedef asp_register_event_fn pf_register_fn;
typedef asp_emit_event_fn pf_emit_fn;

/* How the handler's record is tied to async-profiler's sample. */
enum { PF_JOIN_EXACT = 1,    /* 4.5+: sample_counter is the sample's startTime */
       PF_JOIN_COUNTER = 2   /* 4.0-4.4: it is an event counter; join by timestamp */ };

typedef struct {
    pf_get_tld_fn get_tld;
    pf_register_fn register_event;
    pf_emit_fn emit;
    uintptr_t lib_base;      /* load address of libasyncProfiler.so (to recognise its handlers) */
    int join_mode;
    int max_frames;          /* Python frames kept per sample (leaf side) */
    int drain_interval_ms;
    int timing;              /* measure our share of each handler call (benchmarks) */
} pf_config;

/* Sets everything up (memory, event types, fault guard, drain thread). Returns NULL or an error. */
const char *pf_install(const pf_config *cfg);
/* Stops the drain thread and unchains the signals. Memory is kept (a handler may still run). */
void pf_uninstall(void);
int pf_installed(void);

/* Session hooks (called by csrc/core/session.c around async-profiler's start and stop). */
void pf_before_start(void);
void pf_after_start(int ok);
void pf_before_stop(void);
void pf_after_stop(int ok);
/* Around async-profiler's dump (a chunk finished while sampling goes on): the captured
   samples go into the finished chunk; definitions are emitted again in the next one. */
void pf_before_flush(void);
void pf_after_flush(int ok);

/* Registers the calling thread (reads its asprof_thread_local_data). Returns the slot or -1. */
int pf_register_thread(void);
/* Forgets thread `tid` registered in `slot` (called when its Python state is cleared). */
void pf_unregister_thread(int slot, int tid);

/* issue #15: the hook of asprof.context._ctx (set by module.c at install), label-set ids seen in
   samples since the last call, and emission of asprof.LabelSet (kind 0) / asprof.Step (kind 1). */
extern uint32_t (*volatile pf_ctx_sample)(void);
int pf_take_labels(uint32_t *out, int max);
int pf_emit_context(int kind, const uint8_t *data, size_t len);

/* Drains the rings and emits into the active recording now (takes the drain lock). */
void pf_flush(void);

/* globals pointers seen in code definitions of the current recording, not yet mapped. */
int pf_unmapped_globals(uintptr_t *out, int max);
/* Emits (globals pointer, module name) pairs into the active recording. */
void pf_emit_modules(const uintptr_t *globals, const char *const *names, int n);

typedef struct {
    uint64_t signals, samples, nested, no_python, no_guard, masked, ring_full, slots_full,
        unknown_code, truncated, emitted_samples, emitted_stacks, emitted_defs, emitted_events,
        emit_errors, lost_boundary, dropped_inactive, table_swaps, recordings, registered,
        chained_signals, rec_emitted_samples, unknown_unreadable, unknown_full, timed_ns, timed, faults_recovered, guard_reinstalled;
} pf_stats;
void pf_get_stats(pf_stats *out);
#ifdef ASPROF_BENCH
uint64_t pf_bench(int n);  /* benchmarks/bench_pyframes.py's own build only */
#endif

#endif
