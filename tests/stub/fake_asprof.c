/*
 * A stand-in for libasyncProfiler.so, written for asprof's tests.
 *
 * It implements async-profiler's C API (asprof_init, asprof_execute,
 * asprof_error_str and, unless STUB_NO_OPTIONAL, the 4.x functions) well
 * enough to exercise the real dlopen/dlsym path and the JFR rotation through
 * /proc/self/fd/N, with failures on demand. Behaviour is read from the
 * environment at each call:
 *   STUB_VERSION      text of the "version" command (default "4.5")
 *   STUB_FAIL_START   "all", or N: fail the N-th start (1-based)
 *   STUB_FAIL_STOP    "all", or N: fail the N-th stop
 *   STUB_LOG_WARN     a message logged at WARN on every command
 *   STUB_COMMANDS     a file to which every command line is appended
 *   STUB_FAIL_DUMP    "all", or N: fail the N-th dump (dump always fails without STUB_CHUNKS)
 *   STUB_CHUNKS       write the recording as JFR-like chunks: a 68-byte header
 *                     (magic, size, constant pool offset) around the text, the size
 *                     and offset patched when "dump" or "stop" finishes the chunk,
 *                     as async-profiler does; otherwise the recording is plain text
 * Like the real library it logs to stdout unless the command has log=, and
 * its atexit hook writes to a recording that is still active (which is what
 * corrupts a parent's file when a forked child exits).
 * Build: cc -shared -fPIC -o libasyncProfiler.so fake_asprof.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "asprof_abi.h"  /* the ABI the agent expects (csrc/include): the stand-in implements it */

#define EXPORT __attribute__((visibility("default")))

static int initialized;
static int running;
static int rec_fd = -1;
static int log_fd = 1;
static int starts, stops, dumps;
static off_t chunk_start = -1;
static int warn_enabled = 1, info_enabled = 1;

static void log_line(const char *level, const char *msg) {
    char line[512];
    int n = snprintf(line, sizeof(line), "[%s] %s\n", level, msg);
    if (n > 0 && write(log_fd, line, (size_t)n) < 0) { /* ignored */ }
}

static int should_fail(const char *var, int count) {
    const char *v = getenv(var);
    if (v == NULL || *v == '\0') return 0;
    if (strcmp(v, "all") == 0) return 1;
    return atoi(v) == count;
}

static void append(const char *text) {
    if (rec_fd < 0) return;
    off_t end = lseek(rec_fd, 0, SEEK_END);
    if (pwrite(rec_fd, text, strlen(text), end) < 0) { /* ignored */ }
}

static void put64(unsigned char *p, uint64_t v) {
    for (int i = 7; i >= 0; i--) { p[i] = (unsigned char)v; v >>= 8; }
}

/* STUB_CHUNKS: open a chunk at the end of the file (size placeholder, constant pool 0). */
static void open_chunk(void) {
    if (getenv("STUB_CHUNKS") == NULL || rec_fd < 0) return;
    unsigned char h[68] = {'F', 'L', 'R', 0, 0, 2, 0, 0};
    put64(h + 8, 1u << 30);
    chunk_start = lseek(rec_fd, 0, SEEK_END);
    if (pwrite(rec_fd, h, sizeof(h), chunk_start) < 0) { /* ignored */ }
}

static void finish_chunk(void) {
    if (chunk_start < 0 || rec_fd < 0) return;
    append("POOL\n");
    off_t end = lseek(rec_fd, 0, SEEK_END);
    unsigned char f[16];
    put64(f, (uint64_t)(end - chunk_start));
    put64(f + 8, (uint64_t)(end - chunk_start - 5));  /* "POOL\n" stands for the constant pool */
    if (pwrite(rec_fd, f, sizeof(f), chunk_start + 8) < 0) { /* ignored */ }
    chunk_start = -1;
}

static void at_exit(void) {
    if (running) {
        char buf[64];
        snprintf(buf, sizeof(buf), "ATEXIT pid=%d\n", (int)getpid());
        append(buf);
    }
}

/* Each function has exactly the type the agent resolves it as (a mismatch fails to compile). */
EXPORT void asprof_init(void);
EXPORT const char *asprof_error_str(const char *err);
static asp_init_fn const check_init __attribute__((unused)) = asprof_init;
static asp_error_str_fn const check_error_str __attribute__((unused)) = asprof_error_str;

EXPORT void asprof_init(void) {
    if (!initialized) atexit(at_exit);
    initialized++;
}

EXPORT const char *asprof_error_str(const char *err) { return err; }

#ifndef STUB_NO_EXECUTE
EXPORT asp_error_t asprof_execute(const char *command, asp_writer_fn writer);
static asp_execute_fn const check_execute __attribute__((unused)) = asprof_execute;
EXPORT asp_error_t asprof_execute(const char *command, asp_writer_fn writer) {
    const char *record = getenv("STUB_COMMANDS");
    if (record != NULL) {
        int fd = open(record, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (fd >= 0) {
            if (write(fd, command, strlen(command)) < 0 || write(fd, "\n", 1) < 0) { /* ignored */ }
            close(fd);
        }
    }
    char *cmd = strdup(command);
    char *action = NULL, *file = NULL, *log = NULL, *level = NULL;
    for (char *save = NULL, *tok = strtok_r(cmd, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (action == NULL) action = tok;
        else if (strncmp(tok, "file=", 5) == 0) file = tok + 5;
        else if (strncmp(tok, "log=", 4) == 0) log = tok + 4;
        else if (strncmp(tok, "loglevel=", 9) == 0) level = tok + 9;
    }
    /* Like Log::open: every call re-opens the log (truncating it), stdout by default. */
    if (log_fd > 2) close(log_fd);
    log_fd = 1;
    if (log != NULL && strcmp(log, "stdout") != 0) {
        int fd = strcmp(log, "stderr") == 0 ? 2 : creat(log, 0660);
        if (fd >= 0) log_fd = fd;
    }
    info_enabled = level == NULL || strcmp(level, "info") == 0 || strcmp(level, "debug") == 0;
    warn_enabled = info_enabled || (level != NULL && strcmp(level, "warn") == 0);
    const char *warn = getenv("STUB_LOG_WARN");
    if (warn != NULL && warn_enabled) log_line("WARN", warn);

    const char *err = NULL;
    char msg[256];
    if (action == NULL) {
        err = "No action";
    } else if (strcmp(action, "version") == 0) {
        const char *v = getenv("STUB_VERSION");
        v = v ? v : "4.5";
        if (writer) writer(v, strlen(v));
    } else if (strcmp(action, "status") == 0) {
        const char *s = running ? "Profiling is running\n" : "Profiler is not active\n";
        if (writer) writer(s, strlen(s));
    } else if (strcmp(action, "start") == 0 || strcmp(action, "resume") == 0) {
        int resume = action[0] == 'r';
        starts++;
        if (running) err = "Profiler already started";
        else if (file == NULL) err = "Flight Recorder output file is not specified";
        else if (should_fail("STUB_FAIL_START", starts)) err = "Stub: start failed on demand";
        else {
            rec_fd = open(file, O_CREAT | O_RDWR | (resume ? 0 : O_TRUNC), 0644);
            if (rec_fd < 0) err = "Could not open Flight Recorder output file";
            else {
                open_chunk();
                snprintf(msg, sizeof(msg), "%s start=%d pid=%d\n", resume ? "RESUMED" : "STUBJFR", starts, (int)getpid());
                append(msg);
                running = 1;
                if (info_enabled) log_line("INFO", "stub started");
            }
        }
    } else if (strcmp(action, "stop") == 0) {
        stops++;
        if (!running) err = "Profiler is not active";
        else if (should_fail("STUB_FAIL_STOP", stops)) err = "Stub: stop failed on demand";
        else {
            snprintf(msg, sizeof(msg), "END start=%d\n", starts);
            append(msg);
            finish_chunk();
            close(rec_fd);
            rec_fd = -1;
            running = 0;
        }
    } else if (strcmp(action, "dump") == 0) {
        /* Like async-profiler's dump with JFR output: finish the chunk, open the next. */
        dumps++;
        if (should_fail("STUB_FAIL_DUMP", dumps)) err = "Stub: dump failed on demand";
        else if (getenv("STUB_CHUNKS") == NULL) err = "Stub: dump needs STUB_CHUNKS";
        else if (running) {
            snprintf(msg, sizeof(msg), "DUMP %d\n", dumps);
            append(msg);
            finish_chunk();
            open_chunk();
        }
    } else {
        snprintf(msg, sizeof(msg), "Unknown argument: %s", action);
        if (warn_enabled) log_line("WARN", msg);
    }
    free(cmd);
    return err;
}
#endif

#ifndef STUB_NO_OPTIONAL
static __thread asp_thread_local_data tld;
EXPORT asp_thread_local_data *asprof_get_thread_local_data(void) { return &tld; }
EXPORT int asprof_register_jfr_event(const char *name) { return name && *name ? 1 : -1; }
EXPORT asp_error_t asprof_emit_jfr_event(int key, const uint8_t *data, size_t len);
static asp_get_tld_fn const check_get_tld __attribute__((unused)) = asprof_get_thread_local_data;
static asp_register_event_fn const check_register __attribute__((unused)) = asprof_register_jfr_event;
static asp_emit_event_fn const check_emit __attribute__((unused)) = asprof_emit_jfr_event;
EXPORT const char *asprof_emit_jfr_event(int key, const uint8_t *data, size_t len) {
    return len > 2048 ? "Unable to emit JFR event larger than ASPROF_MAX_JFR_EVENT_LENGTH bytes" : NULL;
}
#endif
