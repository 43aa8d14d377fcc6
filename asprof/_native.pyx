# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython wrapper over the native core (csrc/core).

Low level and private: asprof.engines.asyncprofiler builds the public behaviour on it.
Every call into async-profiler runs without the GIL.
"""
from libc.stdlib cimport free
from libc.string cimport memset

cdef extern from "asprof_core.h":
    ctypedef struct asp_buf:
        char *data
        size_t len
        size_t cap
        size_t limit
        int truncated
    void asp_buf_free(asp_buf *b)

    ctypedef struct asp_library:
        char path[4096]
        void *get_thread_local_data
        void *register_jfr_event
        void *emit_jfr_event
        int initialized

    asp_library *asp_library_open(const char *path, char *err, size_t errlen) nogil
    void asp_library_init(asp_library *lib) nogil
    void asp_release_log(asp_library *lib) nogil
    const char *asp_execute(asp_library *lib, const char *command, const char *loglevel,
                            asp_buf *out, asp_buf *log) nogil

    ctypedef enum asp_status:
        ASP_IDLE
        ASP_STARTING
        ASP_RUNNING

    ctypedef struct asp_session:
        int fd[2]
        int active
        asp_status status
        int leaked
        long long report_from[2]
        int no_punch

    asp_session *asp_session_new(asp_library *lib, const char *start_command, const char *loglevel,
                                 char *err, size_t errlen) nogil
    const char *asp_session_start(asp_session *s, asp_buf *log) nogil
    const char *asp_session_stop(asp_session *s, asp_buf *log) nogil
    const char *asp_session_full_rotation(asp_session *s, int *finished, long long *start, asp_buf *log) nogil
    const char *asp_session_dump(asp_session *s, asp_buf *out, asp_buf *log) nogil
    void asp_session_discard(asp_session *s, int fd) nogil
    int asp_read_range(int fd, long long start, long long end, asp_buf *out, char *err, size_t errlen) nogil
    const char *asp_session_pause(asp_session *s, asp_buf *log) nogil
    const char *asp_session_resume(asp_session *s, asp_buf *log) nogil
    long long asp_fd_size(int fd) nogil
    int asp_session_destroy(asp_session *s, asp_buf *log) nogil
    int asp_wait_async_profiler_threads(int timeout_ms) nogil


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()
    int pthread_setname_np(pthread_t thread, const char *name)


def set_thread_name(str name):
    """Names the calling OS thread (visible in /proc/self/task/*/comm, top, gdb)."""
    cdef bytes b = name.encode()[:15]
    pthread_setname_np(pthread_self(), b)


ctypedef const char *(*session_op)(asp_session *s, asp_buf *log) noexcept nogil


def wait_async_profiler_threads(int timeout_ms):
    """Waits until async-profiler's threads are gone after a stop; True if they are."""
    cdef int rc
    with nogil:
        rc = asp_wait_async_profiler_threads(timeout_ms)
    return rc == 0


cdef str _text(asp_buf *b):
    if b.data == NULL or b.len == 0:
        return ""
    return b.data[:b.len].decode("utf-8", "replace").replace("\x00", "")


cdef class Library:
    """A loaded libasyncProfiler.so. Never unloaded."""
    cdef asp_library *lib

    @staticmethod
    def open(str path):
        """Loads `path` (a file, or a bare soname for the linker's search).

        Raises OSError with the dynamic linker's message on failure.
        """
        cdef char err[1024]
        cdef bytes p = path.encode()
        cdef const char *cp = p
        cdef asp_library *lib
        memset(err, 0, sizeof(err))
        with nogil:
            lib = asp_library_open(cp, err, sizeof(err))
        if lib == NULL:
            raise OSError(err.decode("utf-8", "replace"))
        cdef Library self = Library.__new__(Library)
        self.lib = lib
        return self

    @property
    def path(self):
        return self.lib.path.decode("utf-8", "replace")

    @property
    def has_thread_local_data(self):
        return self.lib.get_thread_local_data != NULL

    @property
    def has_user_events(self):
        return self.lib.register_jfr_event != NULL and self.lib.emit_jfr_event != NULL

    def init(self):
        with nogil:
            asp_library_init(self.lib)

    def release_log(self):
        """Closes async-profiler's log descriptors while it is idle."""
        with nogil:
            asp_release_log(self.lib)

    def execute(self, str command, str loglevel="warn"):
        """Runs a command: returns (error or None, output text, log text)."""
        cdef bytes c = command.encode()
        cdef bytes lv = loglevel.encode()
        cdef const char *cc = c
        cdef const char *clv = lv
        cdef asp_buf out
        cdef asp_buf log
        cdef const char *e
        memset(&out, 0, sizeof(out))
        memset(&log, 0, sizeof(log))
        try:
            with nogil:
                e = asp_execute(self.lib, cc, clv, &out, &log)
            err = None if e == NULL else e.decode("utf-8", "replace")
            return err, _text(&out), _text(&log)
        finally:
            asp_buf_free(&out)
            asp_buf_free(&log)


cdef class Session:
    """The dual-file JFR rotation over one library (see csrc/core/session.c)."""
    cdef asp_session *s
    cdef readonly Library library

    def __cinit__(self, Library library, str start_command, str loglevel="warn"):
        cdef char err[1024]
        cdef bytes c = start_command.encode()
        cdef bytes lv = loglevel.encode()
        cdef const char *cc = c
        cdef const char *clv = lv
        memset(err, 0, sizeof(err))
        self.library = library
        with nogil:
            self.s = asp_session_new(library.lib, cc, clv, err, sizeof(err))
        if self.s == NULL:
            raise OSError(err.decode("utf-8", "replace"))

    def __dealloc__(self):
        cdef asp_buf log
        if self.s != NULL:
            memset(&log, 0, sizeof(log))
            with nogil:
                asp_session_destroy(self.s, &log)
            asp_buf_free(&log)
            self.s = NULL

    cdef void _check(self) except *:
        if self.s == NULL:
            raise ValueError("the session is closed")

    @property
    def status(self):
        """'idle', 'starting' or 'running'; 'closed' after close()."""
        if self.s == NULL:
            return "closed"
        return ("idle", "starting", "running")[<int>self.s.status]

    @property
    def fds(self):
        self._check()
        return (self.s.fd[0], self.s.fd[1])

    @property
    def active_fd(self):
        self._check()
        return self.s.fd[self.s.active]

    cdef tuple _op(self, session_op op):
        """Runs one state change without the GIL: (error or None, log text)."""
        cdef asp_buf log
        cdef const char *e
        self._check()
        memset(&log, 0, sizeof(log))
        try:
            with nogil:
                e = op(self.s, &log)
            return (None if e == NULL else e.decode("utf-8", "replace")), _text(&log)
        finally:
            asp_buf_free(&log)

    def start(self):
        """Starts on the active file: returns (error or None, log text)."""
        return self._op(asp_session_start)

    def stop(self):
        """Stops: returns (error or None, log text). The active file holds the recording."""
        return self._op(asp_session_stop)

    def pause(self):
        """Stops before a fork, to be resumed on the same file: (error or None, log)."""
        return self._op(asp_session_pause)

    def resume(self):
        """Resumes after a fork, appending a chunk to the active file: (error or None, log)."""
        return self._op(asp_session_resume)

    def full_rotation(self):
        """One full rotation (stop, swap files, start; a start when idle): returns
        (the finished recording's bytes or None, error or None, log text)."""
        cdef asp_buf log
        cdef const char *e
        cdef int finished = -1
        cdef long long start = 0
        self._check()
        memset(&log, 0, sizeof(log))
        try:
            with nogil:
                e = asp_session_full_rotation(self.s, &finished, &start, &log)
            err = None if e == NULL else e.decode("utf-8", "replace")
            recording = None
            if finished >= 0:
                recording = self._read(finished, start)
                asp_session_discard(self.s, finished)
            return recording, err, _text(&log)
        finally:
            asp_buf_free(&log)

    def dump(self):
        """A rotation without stopping (async-profiler's "dump" command): returns (the JFR
        chunks finished since the last hand-over, error or None, log text)."""
        cdef asp_buf out
        cdef asp_buf log
        cdef const char *e
        self._check()
        memset(&out, 0, sizeof(out))
        memset(&log, 0, sizeof(log))
        try:
            with nogil:
                e = asp_session_dump(self.s, &out, &log)
            err = None if e == NULL else e.decode("utf-8", "replace")
            data = out.data[:out.len] if (e == NULL and out.len > 0) else b""
            return data, err, _text(&log)
        finally:
            asp_buf_free(&out)
            asp_buf_free(&log)

    @property
    def can_free_reported(self):
        """False once the file system refused to punch holes (the file then grows until
        the next full rotation)."""
        self._check()
        return not self.s.no_punch

    def read_active(self):
        """What the active file holds past the last hand-over (the recording after stop())."""
        self._check()
        return self._read(self.s.fd[self.s.active], self.s.report_from[self.s.active])

    def active_size(self):
        """Bytes of the active file not handed over yet."""
        self._check()
        cdef long long size = asp_fd_size(self.s.fd[self.s.active])
        return -1 if size < 0 else size - self.s.report_from[self.s.active]

    cdef bytes _read(self, int fd, long long start):
        cdef asp_buf out
        cdef char err[512]
        cdef int rc
        memset(&out, 0, sizeof(out))
        memset(err, 0, sizeof(err))
        try:
            with nogil:
                rc = asp_read_range(fd, start, -1, &out, err, sizeof(err))
            if rc != 0:
                raise OSError(err.decode("utf-8", "replace"))
            if out.len == 0:
                return b""
            return out.data[:out.len]
        finally:
            asp_buf_free(&out)

    def close(self):
        """Releases the files; returns (leaked, log text). Leaked when async-profiler
        may still write to them (see csrc/core/session.c)."""
        cdef asp_buf log
        cdef int leaked = 0
        if self.s == NULL:
            return False, ""
        memset(&log, 0, sizeof(log))
        try:
            with nogil:
                leaked = asp_session_destroy(self.s, &log)
            self.s = NULL
            return bool(leaked), _text(&log)
        finally:
            asp_buf_free(&log)
