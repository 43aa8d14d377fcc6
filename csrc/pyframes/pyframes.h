/*
 * Python frames in every async-profiler sample (issue #5).
 *
 * Layout of csrc/pyframes/:
 *   safeload.c  a load instruction whose faults are recovered (no crash on a bad pointer)
 *   walk.c      per-CPython-version frame walking and line tables (compiled with Py_BUILD_CORE)
 *   sigcapture.c the handler-side code table (shared with csrc/builtin)
 *   capture.c   signal chaining, per-thread slots and rings, the code table, the drain thread,
 *               emission as JFR user events, the session hooks
 *   module.c    the Python module asprof._pyframes
 *
 * See docs/python-frames.md for the design and the safety argument.
 */
#ifndef ASPROF_PYFRAMES_H
#define ASPROF_PYFRAMES_H

#include <stddef.h>
#include <stdint.h>

/* ---- safeload.c ---- */

/* Installs the SIGSEGV/SIGBUS handler that recovers faults of pf_safe_load (idempotent:
   re-installs itself in front when someone replaced it). Not async-signal-safe. */
int pf_safeload_install(void);
/* Whether our SIGSEGV and SIGBUS handlers are the ones installed now (async-signal-safe). */
int pf_safeload_active(void);
/* The same for SIGSEGV only (one system call; the handler's per-sample check). */
int pf_safeload_segv_active(void);
/* Faults recovered so far. */
unsigned long long pf_safeload_faults(void);
/* Restores the handlers that were there before us, if ours are still installed. */
void pf_safeload_uninstall(void);
/* Copies n bytes from src; returns 0, or -1 when part of it is not readable (async-signal-safe). */
int pf_safe_copy(void *dst, uintptr_t src, size_t n);
/* Reads one pointer-sized word; returns 0 or -1. */
int pf_safe_word(uintptr_t src, uintptr_t *out);

/* ---- walk.c: what the handler records per Python frame ---- */

/* Not a frame: the boundary between the Python frames of two _PyEval_EvalFrameDefault calls
   (written after the outermost frame of each call, walking from the leaf). */
#define PF_FRAME_BOUNDARY 0x1u

typedef struct {
    uintptr_t code;     /* the code object (validated to be one when read); 0 for a boundary */
    uintptr_t globals;  /* f_globals: compared (never dereferenced) with modules' __dict__ later */
    int32_t lasti;      /* instruction offset in code units (3.10+) or bytes (3.9); -1 = unknown */
    uint32_t flags;     /* PF_FRAME_* */
} pf_rawframe;

/* What the code table keeps of a code object, read in the handler. */
typedef struct {
    uintptr_t name;       /* co_name (str) */
    uintptr_t qualname;   /* co_qualname (3.11+), else co_name */
    uintptr_t filename;   /* co_filename (str) */
    uintptr_t linetable;  /* co_lnotab (3.9) / co_linetable (3.10+) (bytes) */
    int32_t firstlineno;
} pf_codeinfo;

/* Walks the Python frames of tstate (the interrupted thread's own state), leaf first. Returns
   the number of entries written to out (at most max entries, at most max_frames Python frames);
   *truncated is set when more remained. */
int pf_walk(void *tstate, pf_rawframe *out, int max, int max_frames, int *truncated);
/* Reads the identity and name pointers of a code object (validated). 0 or -1. */
int pf_code_info(uintptr_t code, pf_codeinfo *ci);
/* Copies a str object as UTF-8 into buf (at most cap bytes, cut at a character boundary).
   Returns the byte length, or -1 when it is not a readable str. */
int pf_read_str(uintptr_t str, char *buf, int cap);
/* Size of a bytes object (validated). 0 or -1. */
int pf_bytes_size(uintptr_t bytes, size_t *out);
/* Copies a bytes object's content. Returns its length (<= cap) or -1 (missing / too long). */
int pf_read_bytes(uintptr_t bytes, uint8_t *buf, int cap);
/* Line number of instruction offset lasti, from a copy of the line table. */
int pf_addr2line(const uint8_t *table, int len, int firstlineno, int lasti);
/* The current Python thread state of the calling thread, or NULL (async-signal-safe). */
void *pf_this_thread_state(void);
/* 0 when the running interpreter's layout is the one the walk was compiled for (3.14: compared
   with _PyRuntime.debug_offsets; earlier versions: always 0); else -1 with the reason in why.
   Not async-signal-safe: called once, at install. */
int pf_layout_check(char *why, size_t cap);
/* Runtime version (PY_VERSION_HEX) the walker was compiled for. */
unsigned long pf_compiled_version(void);

#endif
