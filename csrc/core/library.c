/*
 * Loading libasyncProfiler.so and running its commands.
 */
#include "asprof_core.h"
#include "internal.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* manylinux2014 (glibc 2.17) headers lack these. */
#ifndef O_TMPFILE
#define O_TMPFILE (020000000 | O_DIRECTORY)
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif
/* Nor the memfd_create syscall number (kernel headers 3.10); a kernel without it
   answers ENOSYS and the O_TMPFILE fallback is used. */
#ifndef SYS_memfd_create
#if defined(__x86_64__)
#define SYS_memfd_create 319
#elif defined(__aarch64__)
#define SYS_memfd_create 279
#endif
#endif

#define DEFAULT_BUF_LIMIT (1u << 20)
#define LOG_READ_LIMIT (256u << 10)

/* Libraries opened so far. Never freed: the library is never unloaded. */
static asp_library *libraries;

/* Serializes every asprof_execute call and the log file around it. */
pthread_mutex_t asp_exec_lock = PTHREAD_MUTEX_INITIALIZER;

/* Where async-profiler writes its log: an unnamed file, read after each call. */
int asp_log_fd = -1;

/* The writer callback has no user pointer: the current buffer is thread-local. */
static __thread asp_buf *current_out;

void asp_buf_free(asp_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

int asp_buf_append(asp_buf *b, const char *data, size_t n) {
    size_t limit = b->limit ? b->limit : DEFAULT_BUF_LIMIT;
    if (b->len + n > limit) {
        b->truncated = 1;
        n = b->len < limit ? limit - b->len : 0;
        if (n == 0) return -1;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->data, cap);
        if (p == NULL) {
            b->truncated = 1;
            return -1;
        }
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

static void writer(const char *buf, size_t size) {
    if (current_out != NULL && buf != NULL) asp_buf_append(current_out, buf, size);
}

static void copy_err(char *err, size_t errlen, const char *fmt, const char *a, const char *b) {
    if (err != NULL && errlen > 0) snprintf(err, errlen, fmt, a ? a : "", b ? b : "");
}

asp_library *asp_library_open(const char *path, char *err, size_t errlen) {
    /* Only an absolute path: a bare or relative name would let the dynamic linker search,
     * and an empty LD_LIBRARY_PATH entry makes that search look in the working directory. */
    if (path == NULL || path[0] != '/') {
        copy_err(err, errlen, "not an absolute path: %s (refused, asprof loads libraries by absolute path only)",
                 path, NULL);
        return NULL;
    }
    dlerror();
    /* RTLD_NODELETE as well: even a dlclose by someone else must not unload it. */
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (handle == NULL) {
        const char *msg = dlerror();
        copy_err(err, errlen, "%s", msg ? msg : "dlopen failed", NULL);
        return NULL;
    }
    pthread_mutex_lock(&asp_exec_lock);
    for (asp_library *l = libraries; l != NULL; l = l->next) {
        if (l->handle == handle) {
            pthread_mutex_unlock(&asp_exec_lock);
            return l;
        }
    }
    pthread_mutex_unlock(&asp_exec_lock);

    asp_library *lib = calloc(1, sizeof(*lib));
    if (lib == NULL) {
        copy_err(err, errlen, "out of memory", NULL, NULL);
        return NULL;  /* handle stays open: never dlclose */
    }
    lib->handle = handle;
    struct link_map *map = NULL;
    if (dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map != NULL && map->l_name && map->l_name[0])
        snprintf(lib->path, sizeof(lib->path), "%s", map->l_name);
    else
        snprintf(lib->path, sizeof(lib->path), "%s", path);

    lib->init = (asp_init_fn)dlsym(handle, "asprof_init");
    lib->execute = (asp_execute_fn)dlsym(handle, "asprof_execute");
    lib->error_str = (asp_error_str_fn)dlsym(handle, "asprof_error_str");
    lib->get_thread_local_data = (asp_get_tld_fn)dlsym(handle, "asprof_get_thread_local_data");
    lib->register_jfr_event = (asp_register_event_fn)dlsym(handle, "asprof_register_jfr_event");
    lib->emit_jfr_event = (asp_emit_event_fn)dlsym(handle, "asprof_emit_jfr_event");

    const char *missing = !lib->init ? "asprof_init" : !lib->execute ? "asprof_execute"
                        : !lib->error_str ? "asprof_error_str" : NULL;
    if (missing != NULL) {
        copy_err(err, errlen,
                 "%s does not export %s: it is not async-profiler 3.0 or later (the C API appeared in 3.0)",
                 lib->path, missing);
        free(lib);
        return NULL;
    }
    pthread_mutex_lock(&asp_exec_lock);
    lib->next = libraries;
    libraries = lib;
    pthread_mutex_unlock(&asp_exec_lock);
    return lib;
}

void asp_library_init(asp_library *lib) {
    pthread_mutex_lock(&asp_exec_lock);
    if (!lib->initialized) {
        lib->init();
        lib->initialized = 1;
    }
    pthread_mutex_unlock(&asp_exec_lock);
}

int asp_tmpfile(char *err, size_t errlen) {
    /*
     * An anonymous memory file first. A recording holds one reporting interval of
     * JFR (the chunks handed over are freed by punching holes), and it is read into
     * memory at every tick anyway; in memory, freeing is immediate, whereas on a
     * disk file system punching a hole first writes the dirty pages back (2-5 ms
     * on ext4 here, inside the tick).
     */
    int fd = -1, last_errno = 0;
#ifdef SYS_memfd_create
    fd = (int)syscall(SYS_memfd_create, "asprof-jfr", MFD_CLOEXEC);
    if (fd >= 0) return fd;
    last_errno = errno;
#endif
    /* No memfd (old kernel, seccomp): O_TMPFILE, an inode with no name, so nothing
       is created by name in a shared directory. */
    const char *dirs[2] = {getenv("TMPDIR"), "/tmp"};
    for (int i = 0; i < 2; i++) {
        if (dirs[i] == NULL || dirs[i][0] == '\0') continue;
        fd = open(dirs[i], O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
        if (fd >= 0) return fd;
        last_errno = errno;
    }
    if (err != NULL) snprintf(err, errlen, "cannot create an unnamed temporary file: %s", strerror(last_errno));
    return -1;
}

void asp_fd_path(int fd, char *buf, size_t len) {
    snprintf(buf, len, "/proc/self/fd/%d", fd);
}

long long asp_fd_size(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return -1;
    return (long long)st.st_size;
}

int asp_read_range(int fd, long long from, long long to, asp_buf *out, char *err, size_t errlen) {
    long long size = to;
    if (size < 0) size = asp_fd_size(fd);
    if (size < 0) {
        copy_err(err, errlen, "cannot stat the recording: %s", strerror(errno), NULL);
        return -1;
    }
    if (from < 0 || from > size) from = size;
    size_t want = (size_t)(size - from);
    out->len = 0;
    out->limit = want + 1;
    if (out->cap < want + 1) {
        char *p = realloc(out->data, want + 1);
        if (p == NULL) {
            copy_err(err, errlen, "out of memory reading the recording", NULL, NULL);
            return -1;
        }
        out->data = p;
        out->cap = want + 1;
    }
    size_t done = 0;
    while (done < want) {
        ssize_t n = pread(fd, out->data + done, want - done, (off_t)(from + (long long)done));
        if (n < 0) {
            if (errno == EINTR) continue;
            copy_err(err, errlen, "cannot read the recording: %s", strerror(errno), NULL);
            return -1;
        }
        if (n == 0) break;
        done += (size_t)n;
    }
    out->len = done;
    out->data[done] = '\0';
    return 0;
}

/*
 * async-profiler re-creates (truncates) its log file on every command and then
 * writes at its own file offset. Messages logged between our calls (by its
 * threads) are read from where we stopped; after a command, from the start.
 */
static off_t log_offset;

static void drain_log(asp_buf *log, off_t from) {
    if (asp_log_fd < 0) return;
    long long size = asp_fd_size(asp_log_fd);
    if (size < 0) return;
    if ((long long)from > size) from = 0;
    if (log != NULL) {
        off_t off = from;
        if ((unsigned long long)(size - off) > LOG_READ_LIMIT) {
            off = (off_t)(size - LOG_READ_LIMIT);
            log->truncated = 1;
        }
        char chunk[8192];
        while (off < (off_t)size) {
            ssize_t n = pread(asp_log_fd, chunk, sizeof(chunk), off);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            asp_buf_append(log, chunk, (size_t)n);
            off += n;
        }
    }
    log_offset = (off_t)size;
}

void asp_release_log(asp_library *lib) {
    pthread_mutex_lock(&asp_exec_lock);
    if (asp_log_fd >= 0 && lib->initialized) {
        /* async-profiler keeps its log file open until its next command: make it
           switch to stderr with logging off, which closes that descriptor. */
        lib->execute("status,log=stderr,loglevel=none", NULL);
        close(asp_log_fd);
        asp_log_fd = -1;
    }
    pthread_mutex_unlock(&asp_exec_lock);
}

const char *asp_execute(asp_library *lib, const char *command, const char *loglevel,
                        asp_buf *out, asp_buf *log) {
    if (!lib->initialized) asp_library_init(lib);
    pthread_mutex_lock(&asp_exec_lock);
    if (asp_log_fd < 0) asp_log_fd = asp_tmpfile(NULL, 0);
    drain_log(log, log_offset);

    size_t n = strlen(command) + 64 + 16;
    char *full = malloc(n);
    if (full == NULL) {
        pthread_mutex_unlock(&asp_exec_lock);
        return "out of memory";
    }
    if (asp_log_fd >= 0)
        snprintf(full, n, "%s,log=/proc/self/fd/%d,loglevel=%s", command, asp_log_fd, loglevel);
    else  /* no file to capture into: keep the application's stdout clean at least */
        snprintf(full, n, "%s,log=/dev/null,loglevel=none", command);

    current_out = out;
    asp_error_t e = lib->execute(full, writer);
    current_out = NULL;
    const char *msg = NULL;
    if (e != NULL) {
        msg = lib->error_str(e);
        if (msg == NULL) msg = "async-profiler reported an error without a message";
    }
    free(full);
    drain_log(log, 0);
    pthread_mutex_unlock(&asp_exec_lock);
    return msg;
}
