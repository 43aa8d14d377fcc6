/*
 * The handler-side pieces shared by the two users of the frame walker: capture.c (Python
 * frames in async-profiler's samples) and csrc/builtin (asprof's own sampling engine).
 *
 *   the code table   code objects seen by the handler, their names and line tables COPIED
 *                    into the table's arena the first time each is seen (never dereferenced
 *                    after the handler);
 *   time and thread  the monotonic clock and the thread id, cheap and async-signal-safe.
 *
 * Every function marked "async-signal-safe: runs in the handler" uses no allocation, no lock
 * (atomics only), bounded loops, and reads interpreter memory only through safeload.c.
 */
#ifndef ASPROF_PYFRAMES_SIGCAPTURE_H
#define ASPROF_PYFRAMES_SIGCAPTURE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#define PF_CODE_CAP 16384                /* code table entries (power of two) */
#define PF_ARENA_SIZE (6u << 20)         /* bytes of copied names and line tables per table */
#define PF_NAME_CAP 256
#define PF_FILE_CAP 512
#define PF_LINETABLE_CAP 16384
#define PF_PROBES 32
#define PF_IDX_BOUNDARY 0xFFFFFFFFu
#define PF_IDX_UNKNOWN 0xFFFFFFFEu

typedef struct {
    _Atomic uintptr_t code;        /* key; 0 = empty */
    _Atomic int ready;
    uintptr_t name, qualname, filename, linetable;   /* fingerprint (pointer identities) */
    int32_t firstlineno;
    uintptr_t globals;
    uint32_t qn_off, fn_off, lt_off, nm_off;
    uint16_t qn_len, fn_len, nm_len;
    int32_t lt_len;                /* -1: no line table */
    /* owned by the reader (drain thread / collect), never touched by the handler */
    uint32_t emitted_rec;
    uint32_t mapped_rec;
} pf_code_t;

typedef struct {
    pf_code_t entries[PF_CODE_CAP];
    _Atomic size_t arena_used;
    _Atomic int count;
    _Atomic int pins;
    uint64_t gen;                  /* capture.c: definition ids are gen * PF_CODE_CAP + index */
    unsigned char arena[PF_ARENA_SIZE];
} pf_codetable;

/* Finds or adds the code object `code` (its names and line table copied when added). Returns
   its index in t->entries, or PF_IDX_UNKNOWN (unreadable, or the table is full).
   async-signal-safe: runs in the handler. */
uint32_t pf_code_index(pf_codetable *t, uintptr_t code, uintptr_t globals);

/* Empties the table (no handler may be using it) and gives its arena's pages back. */
void pf_codetable_clear(pf_codetable *t);

/* Code objects that could not be read / did not fit, since the process started. */
uint64_t pf_unknown_unreadable(void);
uint64_t pf_unknown_full(void);

/* CLOCK_MONOTONIC in ns (vDSO). async-signal-safe: runs in the handler. */
static inline uint64_t pf_mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t pf_hash_ptr(uintptr_t p, int32_t line) {
    uint64_t x = (uint64_t)p ^ ((uint64_t)(uint32_t)line << 32);
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return x;
}

#endif
