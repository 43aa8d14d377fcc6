/*
 * asprof native core: loading async-profiler and rotating its JFR output.
 *
 * Plain C with no Python API, so that it can run without the GIL and be
 * tested on its own. The Cython module asprof/_native.pyx wraps it.
 *
 * async-profiler's C API is declared once, in csrc/include/asprof_abi.h.
 */
#ifndef ASPROF_CORE_H
#define ASPROF_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "asprof_abi.h"   /* async-profiler's C API and the session hooks, declared once */

/* A growable byte buffer, bounded by `limit` (0 = 1 MiB). */
typedef struct {
    char *data;
    size_t len;
    size_t cap;
    size_t limit;
    int truncated;
} asp_buf;

void asp_buf_free(asp_buf *b);

/* ---- library.c ---- */
typedef struct asp_library {
    void *handle;                 /* never dlclosed: async-profiler owns threads and signal handlers */
    char path[4096];              /* where the dynamic linker found it */
    asp_init_fn init;
    asp_execute_fn execute;
    asp_error_str_fn error_str;
    asp_get_tld_fn get_thread_local_data;   /* optional (4.0+) */
    asp_register_event_fn register_jfr_event; /* optional (4.1+) */
    asp_emit_event_fn emit_jfr_event;       /* optional (4.1+) */
    int initialized;
    struct asp_library *next;
} asp_library;

/*
 * Opens `path` (a file path, or a bare soname searched by the dynamic linker)
 * and resolves the API. Returns the library (cached per handle, never freed)
 * or NULL with a message in err.
 */
asp_library *asp_library_open(const char *path, char *err, size_t errlen);

/* asprof_init, once per library. */
void asp_library_init(asp_library *lib);

/*
 * Runs one command. `command` must not carry log= or loglevel=: they are
 * added here so that async-profiler never writes to the application's
 * stdout/stderr; its messages are returned in `log` (may be NULL).
 * The command's text output goes to `out` (may be NULL).
 * Returns NULL on success, otherwise async-profiler's (static) message or
 * one of ours. Serialized process-wide; call without the GIL.
 */
const char *asp_execute(asp_library *lib, const char *command, const char *loglevel,
                        asp_buf *out, asp_buf *log);

/*
 * Closes the descriptors of async-profiler's log (ours and its own) while it
 * is idle; the next command opens a new one.
 */
void asp_release_log(asp_library *lib);

/* ---- session.c: the dual-file JFR rotation ---- */
typedef enum { ASP_IDLE = 0, ASP_STARTING = 1, ASP_RUNNING = 2 } asp_status;

typedef struct asp_session {
    asp_library *lib;
    int fd[2];          /* two unnamed temporary files */
    int active;         /* index into fd of the file async-profiler writes */
    asp_status status;
    int leaked;         /* the files were leaked on purpose (see session.c) */
    int paused;         /* stopped by asp_session_pause, to be resumed */
    long long report_from[2]; /* per file: where the chunks not yet handed over begin */
    int no_punch;       /* the file system cannot free reported bytes (see asp_session_dump) */
    pid_t pid;          /* process that created the session */
    dev_t dev[2];
    ino_t ino[2];
    char *start_command;  /* "start,...,jfr,..." without file=, log=, loglevel= */
    char loglevel[16];
    struct asp_session *next;  /* registry walked by the at-fork handler */
} asp_session;

asp_session *asp_session_new(asp_library *lib, const char *start_command, const char *loglevel,
                             char *err, size_t errlen);

/* Starts async-profiler on the active file. */
const char *asp_session_start(asp_session *s, asp_buf *log);

/* Stops async-profiler; the active file then holds the finished recording. */
const char *asp_session_stop(asp_session *s, asp_buf *log);

/*
 * One full rotation. When idle: start, *finished = -1. When running:
 * stop -> truncate the inactive file -> swap -> start; *finished is the fd
 * holding the finished recording, from offset *from on (readable even if the
 * restart failed, in which case the restart's error is returned and *finished
 * is still set). When stop fails, its error is returned and *finished = -1.
 */
const char *asp_session_full_rotation(asp_session *s, int *finished, long long *from, asp_buf *log);

/*
 * After the recording handed over by a full rotation was read: empties its file
 * (unless async-profiler may be writing it), so that it holds no memory until the
 * next full rotation.
 */
void asp_session_discard(asp_session *s, int fd);

/*
 * A rotation without stopping: async-profiler's "dump" finishes the current
 * JFR chunk and opens the next one in the same file while sampling goes on.
 * `out` receives the chunks finished since the last hand-over (whole, valid
 * chunks; empty when none), which are then freed from the file (a hole is
 * punched; s->no_punch is set where the file system cannot). Errors: the
 * dump's, or a file that is not made of JFR chunks (nothing is handed over).
 */
const char *asp_session_dump(asp_session *s, asp_buf *out, asp_buf *log);


/*
 * Around os.fork(): pause stops async-profiler, finishing the current chunk of
 * the active file (so the child inherits an idle profiler it can restart);
 * resume appends a new chunk to the same file ("resume" action), so the
 * recording covering the fork stays one file. A pause when not running is a
 * no-op; resume only resumes a paused session.
 */
const char *asp_session_pause(asp_session *s, asp_buf *log);
const char *asp_session_resume(asp_session *s, asp_buf *log);

/*
 * async-profiler's stop signals its timer thread, which exits a moment later.
 * Waits (bounded) until no thread started by it is left; 0 when none is.
 */
int asp_wait_async_profiler_threads(int timeout_ms);

/* Reads [from, to) of fd (to < 0: to the end of the file) into out (no limit beyond memory). */
int asp_read_range(int fd, long long from, long long to, asp_buf *out, char *err, size_t errlen);

/* Size of the file behind fd, or -1. */
long long asp_fd_size(int fd);

/*
 * Releases the session. Files are closed only when async-profiler cannot be
 * writing to them; otherwise they are leaked on purpose. Returns 1 when the
 * files were leaked.
 */
int asp_session_destroy(asp_session *s, asp_buf *log);

/* Path async-profiler is given for fd: "/proc/self/fd/N". */
void asp_fd_path(int fd, char *buf, size_t len);

/* Creates an unnamed temporary file (memfd, else O_TMPFILE in $TMPDIR or /tmp). */
int asp_tmpfile(char *err, size_t errlen);

#endif
