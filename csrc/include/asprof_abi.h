/*
 * The one declaration of async-profiler's C API as asprof uses it, and of the session hooks
 * that csrc/core offers to an optional extension (csrc/pyframes).
 *
 * Our own declarations, from async-profiler's documented ABI (asprof_init, asprof_execute,
 * asprof_error_str, and the optional 4.x functions asprof_get_thread_local_data,
 * asprof_register_jfr_event, asprof_emit_jfr_event), not a copy of upstream's header.
 * Included by csrc/core (which resolves them with dlsym), csrc/pyframes (which calls the 4.x
 * functions through pointers handed over at install) and tests/stub/fake_asprof.c (the stand-in
 * library, which implements them), so the three can never disagree.
 *
 * Rule: declarations only, no code; plain C, no Python API.
 */
#ifndef ASPROF_ABI_H
#define ASPROF_ABI_H

#include <stddef.h>
#include <stdint.h>

/* ---- async-profiler's C API (what each symbol's type is once resolved) ---- */
typedef const char *asp_error_t;                     /* NULL on success, else a message */
typedef void (*asp_writer_fn)(const char *buf, size_t size);
typedef void (*asp_init_fn)(void);
typedef asp_error_t (*asp_execute_fn)(const char *command, asp_writer_fn writer);
typedef const char *(*asp_error_str_fn)(asp_error_t err);
/* 4.0+: per-thread data; sample_counter changes whenever a sample of the thread is recorded. */
typedef struct { volatile uint64_t sample_counter; } asp_thread_local_data;
typedef asp_thread_local_data *(*asp_get_tld_fn)(void);
/* 4.1+: user-defined JFR events. */
typedef int (*asp_register_event_fn)(const char *name);
typedef asp_error_t (*asp_emit_event_fn)(int key, const uint8_t *data, size_t len);

/* ---- csrc/core's session hooks (set by an optional extension through the exported
 * asp_session_set_hooks, found with dlsym; NULL members are skipped). They run on the thread
 * doing the start/stop/dump, outside the core's execute lock, and must not need the GIL. ---- */
typedef struct {
    void (*before_start)(void);
    void (*after_start)(int ok);
    void (*before_stop)(void);
    void (*after_stop)(int ok);
    void (*before_dump)(void);   /* around a dump: the chunk is finished, sampling goes on */
    void (*after_dump)(int ok);
} asp_session_hooks;
typedef void (*asp_set_hooks_fn)(const asp_session_hooks *hooks);

#endif
