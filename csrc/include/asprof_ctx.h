/*
 * The per-thread context slot (issue #15: request labels, asyncio step events), shared by the
 * module that owns it (csrc/context, asprof.context._ctx) and the signal handlers of both
 * engines (csrc/builtin's handler, csrc/pyframes' capture of async-profiler samples).
 *
 * The owner exports a capsule "asprof.context._ctx._hooks" holding an asprof_ctx_hooks; an
 * engine imports it once (outside any handler) and its handler calls `sample` on the thread
 * it interrupted, after a sample of that thread was recorded: it counts the sample (the step
 * hook compares that count before and after each event-loop step) and returns the label-set
 * id active on the thread now, or 0 (none, or the thread runs a context other than the one
 * the label was set for).
 *
 * Rule: declarations only, no code; plain C, no Python API.
 */
#ifndef ASPROF_CTX_H
#define ASPROF_CTX_H

#include <stdint.h>

#define ASPROF_CTX_HOOKS_VERSION 1

typedef struct {
    int version;                  /* ASPROF_CTX_HOOKS_VERSION */
    /* async-signal-safe: no allocation, no lock; reads and writes the calling thread's slot only */
    uint32_t (*sample)(void);
} asprof_ctx_hooks;

#endif
