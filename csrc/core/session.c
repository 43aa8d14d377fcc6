/*
 * The dual-file JFR rotation (the Rust agent's JfrFile / ProfilerState /
 * tick_blocking), and the guard that keeps forked children away from the
 * parent's recordings.
 *
 * async-profiler is given "/proc/self/fd/N" of the active file and opens that
 * path itself, so it holds its own descriptor of our file and writes to it
 * until it is stopped. Hence the rule of this file: a file is closed only when
 * async-profiler is known to be stopped. When a stop fails, or the session is
 * destroyed while the profiler may be running or starting, the descriptors are
 * leaked on purpose: closing them would free the number N, the next open() in
 * the process could reuse it, and async-profiler (which may still re-open or
 * write "/proc/self/fd/N") would then write into an unrelated file.
 *
 * Two ways to rotate. The full one (asp_session_full_rotation) stops, swaps the files
 * and starts again: samples are lost while async-profiler is stopped, and its
 * start re-reads the process. The light one (asp_session_dump) is the "dump"
 * command: async-profiler finishes the JFR chunk in progress and opens the next
 * one in the same file, sampling all along; the finished chunks are handed over
 * and their blocks freed. report_from[i] is where file i's chunks not yet handed
 * over begin; every read of a recording starts there.
 */
#include "asprof_core.h"
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Sessions alive (or leaked) in this process; walked by the at-fork handler. */
static asp_session *sessions;
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void set_err(char *err, size_t errlen, const char *msg, int e) {
    if (err != NULL && errlen > 0) snprintf(err, errlen, "%s: %s", msg, strerror(e));
}

/* ---- fork guard ---- */

static void before_fork(void) {
    /* Fork only between commands, never in the middle of a start/stop/rotation,
       so the child's copy of async-profiler and of our state is consistent. */
    pthread_mutex_lock(&asp_exec_lock);
    pthread_mutex_lock(&registry_lock);
}

static void after_fork_parent(void) {
    pthread_mutex_unlock(&registry_lock);
    pthread_mutex_unlock(&asp_exec_lock);
}

/*
 * In the child, async-profiler's own descriptors of our recordings are shared
 * with the parent (same open file description). Its atexit hook stops a running
 * profiler, which would append to the parent's file or rewrite the header of a
 * finished one. Point every such descriptor (and our own copies) at /dev/null,
 * keeping the numbers taken. Only async-signal-safe
 * calls here: raw getdents64, fstat, dup2.
 */
struct linux_dirent64 {
    unsigned long long d_ino;
    long long d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

static int matches_recording(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return 0;
    for (asp_session *s = sessions; s != NULL; s = s->next) {
        for (int i = 0; i < 2; i++) {
            /* Ours too: the child's copy of the session never uses them (it belongs to the
               parent), and a child that kept them would keep the parent's memory files,
               with whatever they hold, alive for as long as it lives. */
            if (fd == s->fd[i] || (s->dev[i] == st.st_dev && s->ino[i] == st.st_ino)) return 1;
        }
    }
    return 0;
}

static void after_fork_child(void) {
    int devnull = -1;
    int dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir >= 0 && sessions != NULL) {
        char buf[4096];
        for (;;) {
            long n = syscall(SYS_getdents64, dir, buf, sizeof(buf));
            if (n <= 0) break;
            for (long off = 0; off < n;) {
                struct linux_dirent64 *d = (struct linux_dirent64 *)(buf + off);
                off += d->d_reclen;
                int fd = 0;
                const char *p = d->d_name;
                if (*p < '0' || *p > '9') continue;
                while (*p >= '0' && *p <= '9') fd = fd * 10 + (*p++ - '0');
                if (fd == dir || !matches_recording(fd)) continue;
                if (devnull < 0) devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
                if (devnull >= 0) dup2(devnull, fd);
            }
        }
    }
    if (dir >= 0) close(dir);
    if (devnull >= 0) close(devnull);
    /* async-profiler's log file is the parent's too: the child gets its own on first use.
       Its own descriptor of it is left alone (messages from the child are harmless there). */
    if (asp_log_fd >= 0) {
        close(asp_log_fd);
        asp_log_fd = -1;
    }
    pthread_mutex_unlock(&registry_lock);
    pthread_mutex_unlock(&asp_exec_lock);
}

static void register_atfork(void) {
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

/* ---- hooks around start/stop (issue #5, Python frames; owner: csrc/pyframes) ----
 * An optional extension (asprof._pyframes) sets these through asp_session_set_hooks, found
 * with dlsym on this module; without it they stay NULL and nothing changes. They run on the
 * thread doing the start/stop, outside asp_exec_lock, and must not need the GIL. The struct is
 * asp_session_hooks (csrc/include/asprof_abi.h), shared with the extension. */
static asp_session_hooks session_hooks;
static pthread_mutex_t hooks_lock = PTHREAD_MUTEX_INITIALIZER;

__attribute__((visibility("default"))) void asp_session_set_hooks(const asp_session_hooks *h) {
    pthread_mutex_lock(&hooks_lock);
    if (h != NULL) session_hooks = *h;
    else memset(&session_hooks, 0, sizeof(session_hooks));
    pthread_mutex_unlock(&hooks_lock);
}

static asp_session_hooks current_hooks(void) {
    pthread_mutex_lock(&hooks_lock);
    asp_session_hooks h = session_hooks;
    pthread_mutex_unlock(&hooks_lock);
    return h;
}
/* ---- end of the issue #5 hooks ---- */

/* ---- the session ---- */

asp_session *asp_session_new(asp_library *lib, const char *start_command, const char *loglevel,
                             char *err, size_t errlen) {
    pthread_once(&atfork_once, register_atfork);
    asp_session *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        set_err(err, errlen, "cannot allocate the session", ENOMEM);
        return NULL;
    }
    s->lib = lib;
    s->pid = getpid();
    s->fd[0] = s->fd[1] = -1;
    snprintf(s->loglevel, sizeof(s->loglevel), "%s", loglevel);
    s->start_command = strdup(start_command);
    if (s->start_command == NULL) {
        set_err(err, errlen, "cannot allocate the session", ENOMEM);
        free(s);
        return NULL;
    }
    for (int i = 0; i < 2; i++) {
        s->fd[i] = asp_tmpfile(err, errlen);
        struct stat st;
        if (s->fd[i] < 0 || fstat(s->fd[i], &st) != 0) {
            if (s->fd[i] >= 0) set_err(err, errlen, "cannot stat the recording file", errno);
            for (int j = 0; j <= i; j++) if (s->fd[j] >= 0) close(s->fd[j]);
            free(s->start_command);
            free(s);
            return NULL;
        }
        s->dev[i] = st.st_dev;
        s->ino[i] = st.st_ino;
    }
    /* async-profiler opens the path itself: /proc must be there. */
    char path[64];
    asp_fd_path(s->fd[0], path, sizeof(path));
    if (access(path, R_OK | W_OK) != 0) {
        set_err(err, errlen, "cannot reach the recording through /proc/self/fd (is /proc mounted?)", errno);
        close(s->fd[0]);
        close(s->fd[1]);
        free(s->start_command);
        free(s);
        return NULL;
    }
    pthread_mutex_lock(&registry_lock);
    s->next = sessions;
    sessions = s;
    pthread_mutex_unlock(&registry_lock);
    return s;
}

static int foreign(asp_session *s) {
    /* A forked child's copy: the profiler and the files belong to the parent. */
    return s->pid != getpid();
}

static const char *run_start(asp_session *s, const char *action, asp_buf *log);

const char *asp_session_start(asp_session *s, asp_buf *log) {
    return run_start(s, "start", log);
}

/* Is a thread named "async-profiler" (see run_start) still alive in this process? */
static int async_profiler_thread_alive(void) {
    int dir = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) return 1;  /* cannot tell: assume the worst */
    int alive = 0;
    char buf[4096];
    for (;;) {
        long n = syscall(SYS_getdents64, dir, buf, sizeof(buf));
        if (n <= 0) break;
        for (long off = 0; off < n && !alive;) {
            struct linux_dirent64 *d = (struct linux_dirent64 *)(buf + off);
            off += d->d_reclen;
            if (d->d_name[0] < '0' || d->d_name[0] > '9') continue;
            char path[64], comm[32] = "";
            snprintf(path, sizeof(path), "/proc/self/task/%s/comm", d->d_name);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            ssize_t r = read(fd, comm, sizeof(comm) - 1);
            close(fd);
            if (r > 0 && strncmp(comm, "async-profiler", 14) == 0) alive = 1;
        }
    }
    close(dir);
    return alive;
}

const char *asp_session_pause(asp_session *s, asp_buf *log) {
    if (foreign(s)) return "this profiler belongs to the parent process (the process forked)";
    if (s->status != ASP_RUNNING) return NULL;
    const char *e = asp_session_stop(s, log);
    if (e != NULL) return e;
    s->paused = 1;
    /*
     * async-profiler's stop only signals its timer thread, which exits on its own
     * a moment later. A fork while that thread is still inside pthread_cond_timedwait
     * hands the child a condition variable in a state no thread will ever complete:
     * the child's next stop then blocks forever in pthread_cond_signal (seen with
     * 4.5). Wait, bounded, until async-profiler's threads are gone.
     */
    if (asp_wait_async_profiler_threads(500) != 0) return "async-profiler's timer thread did not exit within 500 ms";
    return NULL;
}

int asp_wait_async_profiler_threads(int timeout_ms) {
    for (int waited_ms = 0; async_profiler_thread_alive(); waited_ms++) {
        if (waited_ms >= timeout_ms) return -1;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

const char *asp_session_resume(asp_session *s, asp_buf *log) {
    if (!s->paused) return NULL;
    s->paused = 0;
    return run_start(s, "resume", log);
}

static const char *run_start(asp_session *s, const char *action, asp_buf *log) {
    if (foreign(s)) return "this profiler belongs to the parent process (the process forked)";
    if (s->leaked) return "the recording files were abandoned after a failed stop";
    if (s->status != ASP_IDLE) return "the profiler session is already started";
    char path[64];
    asp_fd_path(s->fd[s->active], path, sizeof(path));
    size_t n = strlen(s->start_command) + sizeof(path) + 16;
    char *cmd = malloc(n);
    if (cmd == NULL) return "out of memory";
    /* start_command begins with "start,"; resume keeps the rest of the arguments. */
    const char *args = strncmp(s->start_command, "start,", 6) == 0 ? s->start_command + 6 : s->start_command;
    snprintf(cmd, n, "%s,%s,file=%s", action, args, path);
    /* From here until start returns, the profiler may be running: a session destroyed
       now leaks its files (the seed's Status::Starting). */
    s->status = ASP_STARTING;
    /* async-profiler's threads (timer, wall clock) inherit the name of the thread
       that starts them: name them "async-profiler", so that top, /proc and the
       benchmarks attribute their CPU time correctly. */
    char own_name[16] = "";
    int named = pthread_getname_np(pthread_self(), own_name, sizeof(own_name)) == 0 &&
                pthread_setname_np(pthread_self(), "async-profiler") == 0;
    asp_session_hooks hooks = current_hooks();                 /* issue #5 hooks */
    if (hooks.before_start != NULL) hooks.before_start();
    const char *e = asp_execute(s->lib, cmd, s->loglevel, NULL, log);
    if (hooks.after_start != NULL) hooks.after_start(e == NULL);
    if (named) pthread_setname_np(pthread_self(), own_name);
    free(cmd);
    if (e == NULL) s->status = ASP_RUNNING;
    if (e == NULL && action[0] == 's') s->report_from[s->active] = 0;  /* start truncated the file */
    return e;
}

const char *asp_session_stop(asp_session *s, asp_buf *log) {
    if (foreign(s)) return "this profiler belongs to the parent process (the process forked)";
    if (s->status == ASP_IDLE) return NULL;
    asp_session_hooks hooks = current_hooks();                 /* issue #5 hooks */
    if (hooks.before_stop != NULL) hooks.before_stop();
    const char *e = asp_execute(s->lib, "stop", s->loglevel, NULL, log);
    /* "not active": someone else stopped it (async-profiler's own atexit hook runs
       before ours when a server exits without finalizing Python, e.g. uwsgi).
       It is not writing, and that stop finished the recording in our file. */
    if (e != NULL && strcmp(e, "Profiler is not active") == 0) e = NULL;
    if (hooks.after_stop != NULL) hooks.after_stop(e == NULL);
    if (e == NULL) s->status = ASP_IDLE;
    return e;
}

const char *asp_session_full_rotation(asp_session *s, int *finished, long long *from, asp_buf *log) {
    *finished = -1;
    *from = 0;
    s->paused = 0;
    if (s->status != ASP_RUNNING) return asp_session_start(s, log);
    const char *e = asp_session_stop(s, log);
    if (e != NULL) return e;
    int inactive = 1 - s->active;
    /* Empty the other file before async-profiler gets it (start also truncates it).
       If that fails, the finished recording is still handed over (nothing lost). */
    if (ftruncate(s->fd[inactive], 0) != 0) {
        *finished = s->fd[s->active];
        *from = s->report_from[s->active];
        return "cannot empty the inactive recording file";
    }
    s->report_from[inactive] = 0;
    s->active = inactive;
    *finished = s->fd[1 - s->active];
    *from = s->report_from[1 - s->active];
    return asp_session_start(s, log);
}

void asp_session_discard(asp_session *s, int fd) {
    if (foreign(s) || s->leaked) return;
    if (fd == s->fd[s->active] && s->status != ASP_IDLE) return;
    for (int i = 0; i < 2; i++)
        if (fd == s->fd[i] && ftruncate(fd, 0) == 0) s->report_from[i] = 0;
}

static uint64_t be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

/*
 * End of the run of finished chunks that begins at `from`: async-profiler writes
 * a chunk's header with a placeholder size and a constant pool offset of 0, and
 * patches both once the chunk is complete. -1 when `from` is not a chunk.
 */
static long long finished_end(int fd, long long from, long long size) {
    long long off = from;
    while (off + 68 <= size) {
        unsigned char h[68];
        ssize_t n;
        do n = pread(fd, h, sizeof(h), (off_t)off); while (n < 0 && errno == EINTR);
        if (n != (ssize_t)sizeof(h) || memcmp(h, "FLR", 4) != 0) return off == from ? -1 : off;
        uint64_t chunk = be64(h + 8), cpool = be64(h + 16);
        if (cpool == 0) break;                                    /* still being written */
        if (chunk < 68 || cpool >= chunk || (long long)chunk > size - off) return off == from ? -1 : off;
        off += (long long)chunk;
    }
    return off;
}

const char *asp_session_dump(asp_session *s, asp_buf *out, asp_buf *log) {
    if (foreign(s)) return "this profiler belongs to the parent process (the process forked)";
    if (s->status != ASP_RUNNING) return "the profiler is not running";
    out->len = 0;
    int fd = s->fd[s->active];
    long long from = s->report_from[s->active];
    asp_session_hooks hooks = current_hooks();                 /* issue #5 hooks */
    if (hooks.before_dump != NULL) hooks.before_dump();
    /* JFR output: no file is opened; the recording's current chunk is finished in place. */
    const char *e = asp_execute(s->lib, "dump,jfr", s->loglevel, NULL, log);
    if (hooks.after_dump != NULL) hooks.after_dump(e == NULL);
    if (e != NULL) return e;
    long long size = asp_fd_size(fd);
    if (size < 0) return "cannot stat the recording file";
    long long end = finished_end(fd, from, size);
    if (end < 0) return "the recording file is not made of JFR chunks";
    char err[256];
    if (asp_read_range(fd, from, end, out, err, sizeof(err)) != 0) return "cannot read the recording file";
    s->report_from[s->active] = end;
    /*
     * What was handed over is not needed any more: free its blocks, keeping the
     * offsets (async-profiler goes on writing at its own file position). Whole
     * pages only, so the chunk in progress is never touched.
     */
    long long lo = from & ~4095LL, upto = end & ~4095LL;  /* before `lo`: freed by the last dump */
    if (upto > lo && !s->no_punch &&
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)lo, (off_t)(upto - lo)) != 0 &&
        (errno == EOPNOTSUPP || errno == ENOSYS)) {
        s->no_punch = 1;
    }
    return NULL;
}

int asp_session_destroy(asp_session *s, asp_buf *log) {
    if (s == NULL) return 0;
    if (foreign(s)) return 1;  /* the parent's files: never touched from a child */
    if (s->status == ASP_RUNNING) asp_session_stop(s, log);
    if (s->status != ASP_IDLE || s->leaked) {
        /* Stop failed, or a start may be in progress: async-profiler may still
           write "/proc/self/fd/N". Keep the descriptors (and the registry entry,
           so that forked children are still guarded). */
        s->leaked = 1;
        return 1;
    }
    pthread_mutex_lock(&registry_lock);
    for (asp_session **pp = &sessions; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    }
    pthread_mutex_unlock(&registry_lock);
    close(s->fd[0]);
    close(s->fd[1]);
    asp_library *lib = s->lib;
    free(s->start_command);
    free(s);
    /* Leave no descriptor behind once nothing is recording. */
    pthread_mutex_lock(&registry_lock);
    int others = 0;
    for (asp_session *o = sessions; o != NULL; o = o->next) others |= !o->leaked;
    pthread_mutex_unlock(&registry_lock);
    if (!others) asp_release_log(lib);
    return 0;
}
