/*
 * What makes SIGPROF arrive: per-thread CPU-clock timers (or the process-wide ITIMER_PROF
 * fallback) and the "asprof-sampler" thread, which
 *   - rescans /proc/self/task every 100 ms: a timer for each new thread, the timers of gone
 *     threads deleted (wall signals go to the threads of the latest scan);
 *   - every wall interval sends each thread that ran since the last tick a SIGPROF
 *     (rt_tgsigqueueinfo; its handler tells running from sleeping), repeats the last sample of a
 *     thread that did not run, and takes a busy thread's latest CPU sample as its wall sample;
 *   - keeps our SIGPROF handler and the fault guard of frame reads in front.
 * The sampler blocks SIGPROF and is never sent a signal: it never appears in the samples.
 */
#define _GNU_SOURCE 1
#include "builtin.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/perf_event.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif
#ifndef SIGEV_THREAD_ID
#define SIGEV_THREAD_ID 4
#endif

#define MAX_THREADS BI_MAX_THREADS
#define SCAN_NS 100000000ull
#define HOUSEKEEPING_SLACK_NS 20000000ull  /* rescans and checks run up to 20 ms early, with a wall tick */
/* Overflows a perf event of ours may have before it stops (its event limit, PERF_EVENT_IOC_REFRESH):
   granted ahead and topped up by rescans, so the handler never re-arms it. A re-arm in the handler
   (limit 1, as async-profiler does) was an ioctl per sample: ~4-5 us of each ~8 us handler call
   on a virtual machine, half the engine's cost at 1 kHz. 2^20 overflows: 17 minutes at 1 kHz
   between rescans, where rescans come every 100-250 ms. */
#define PERF_GRANT (1u << 20)

typedef struct {
    int tid;
    int has_timer;    /* a CPU source exists: a timer (mode 1) or a perf event (mode 2) */
    int seen;
    int excluded;     /* one of the agent's own threads (comm "asprof-..."): never sampled */
    int comm_checks;  /* scans that looked at its name (threads name themselves as they start) */
    timer_t timer;
    int perf_fd;
    uint64_t perf_ino;                /* the event's inode: the fd is still ours (not closed by the app and reused) */
    uint64_t perf_count, perf_cpu;  /* at the previous rescan: the event's count, the thread's CPU ns */
    uint64_t perf_granted;            /* overflows granted so far (the event's count / period may reach it) */
    uint64_t wall_cpu;                /* the thread's CPU ns at the previous wall tick (0 = none yet) */
} thread_t;

_Atomic uintptr_t bi_foreign_fn;

/* perf task-clock events of ours, by fd (the handler recognises its signals by si_fd). */
_Atomic uint64_t bi_perf_fds[BI_PERF_FD_MAX / 64];

static void perf_fd_mark(int fd, int on) {
    uint64_t bit = 1ull << (fd & 63);
    if (on) atomic_fetch_or(&bi_perf_fds[fd >> 6], bit);
    else atomic_fetch_and(&bi_perf_fds[fd >> 6], ~bit);
}

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t th;
    int running;      /* a sampler thread exists (joinable) */
    int stop;
    int self_tid;     /* the sampler's tid */
    int cpu_thread;   /* per-thread CPU sources in use: 1 CPU-clock timers, 2 perf task-clock events */
    int perf_exclude_kernel;
    int perf_budget;  /* perf event fds we may hold: a quarter of RLIMIT_NOFILE (the rest is the application's) */
    int n_perf;
    int itimer;       /* ITIMER_PROF in use */
    uint64_t cpu_ns, wall_ns;
    pid_t pid;
    uid_t uid;        /* getuid() at start and at rescans: the si_uid of our wall signals */
    int cond_ready;
    int task_dir;     /* /proc/self/task of this process while the sampler runs, else -1 */
    uint64_t task_dir_ino, task_dir_dev;
    thread_t threads[MAX_THREADS];
    int nthreads;
    _Atomic int n_threads_seen, n_timers, n_excluded;
} S = {.lock = PTHREAD_MUTEX_INITIALIZER, .task_dir = -1};

static clockid_t thread_cpu_clock(int tid) {
    /* MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED): the thread's scheduler CPU time. */
    return (clockid_t)((~(unsigned)tid << 3) | 6u);
}

static int create_timer(thread_t *t) {
    struct sigevent sev;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGPROF;
    sev.sigev_value.sival_ptr = (void *)(uintptr_t)(BI_MAGIC | BI_VAL_CPU | ((uint64_t)(t - S.threads) << 12));
    sev.sigev_notify_thread_id = t->tid;
    timer_t timer;
    if (timer_create(thread_cpu_clock(t->tid), &sev, &timer) != 0) return -1;
    struct itimerspec its;
    its.it_interval.tv_sec = (time_t)(S.cpu_ns / 1000000000ull);
    its.it_interval.tv_nsec = (long)(S.cpu_ns % 1000000000ull);
    its.it_value = its.it_interval;
    if (timer_settime(timer, 0, &its, NULL) != 0) {
        int e = errno;
        timer_delete(timer);
        errno = e;
        return -1;
    }
    t->timer = timer;
    t->has_timer = 1;
    atomic_fetch_add(&S.n_timers, 1);
    return 0;
}

/* A perf task-clock event on thread t's CPU time: each overflow (every cpu_ns of the thread's
   CPU, an hrtimer while it runs, so not bound to scheduler ticks) sends SIGPROF to the thread
   (F_SETSIG, F_SETOWN_EX) with POLL_IN while its event limit lasts (PERF_GRANT, topped up by
   check_perf); the overflow that uses the limit up disables it (POLL_HUP). */
static int create_perf(thread_t *t) {
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.type = PERF_TYPE_SOFTWARE;
    attr.size = sizeof(attr);
    attr.config = PERF_COUNT_SW_TASK_CLOCK;
    attr.sample_period = S.cpu_ns;
    attr.disabled = 1;
    attr.exclude_kernel = (unsigned)S.perf_exclude_kernel;
    attr.exclude_hv = 1;
    int fd = (int)syscall(SYS_perf_event_open, &attr, t->tid, -1, -1, PERF_FLAG_FD_CLOEXEC);
    if (fd < 0 && (errno == EACCES || errno == EPERM) && !S.perf_exclude_kernel) {
        S.perf_exclude_kernel = 1;  /* perf_event_paranoid >= 2: our own user-space time only */
        attr.exclude_kernel = 1;
        fd = (int)syscall(SYS_perf_event_open, &attr, t->tid, -1, -1, PERF_FLAG_FD_CLOEXEC);
    }
    if (fd < 0) return -1;
    if (fd >= BI_PERF_FD_MAX) {
        close(fd);
        errno = EMFILE;
        return -1;
    }
    struct f_owner_ex owner = {F_OWNER_TID, t->tid};
    if (fcntl(fd, F_SETOWN_EX, &owner) != 0 || fcntl(fd, F_SETSIG, SIGPROF) != 0 ||
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_ASYNC) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    atomic_store(&bi_perf_slot[fd], (uint16_t)(t - S.threads + 1));
    perf_fd_mark(fd, 1);
    if (ioctl(fd, PERF_EVENT_IOC_RESET, 0) != 0 || ioctl(fd, PERF_EVENT_IOC_REFRESH, (int)PERF_GRANT) != 0) {
        int e = errno;
        perf_fd_mark(fd, 0);
        close(fd);
        errno = e;
        return -1;
    }
    struct stat st;
    t->perf_ino = fstat(fd, &st) == 0 ? (uint64_t)st.st_ino : 0;
    S.n_perf++;
    t->perf_fd = fd;
    t->perf_count = 0;
    t->perf_cpu = 0;
    t->perf_granted = PERF_GRANT;
    t->has_timer = 1;
    atomic_fetch_add(&S.n_timers, 1);
    return 0;
}

/* Whether t->perf_fd is still the event we opened (someone may have closed it, e.g. a
   daemon's closerange, and the number been reused for one of their files). */
static int perf_fd_is_ours(const thread_t *t) {
    struct stat st;
    return fstat(t->perf_fd, &st) == 0 && (uint64_t)st.st_ino == t->perf_ino;
}

static uint64_t thread_cpu_ns(int tid) {
    struct timespec ts;
    if (clock_gettime(thread_cpu_clock(tid), &ts) != 0) return 0;
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* 0 when the thread's perf event still works; -1 when its thread ended and the tid now belongs
   to a new thread (its CPU time went backwards, or cannot be read). Not poll(): a perf event
   without a mapped ring buffer always polls as POLLHUP, which made every rescan drop and re-open
   every thread's event. Tops up the event's limit when half of what was granted is used; a
   stalled event (disabled: the count stands still while the thread burns CPU) is re-armed. */
static int check_perf(thread_t *t) {
    if (!perf_fd_is_ours(t)) return -1;
    uint64_t count = 0, cpu = thread_cpu_ns(t->tid);
    if (cpu == 0 || cpu < t->perf_cpu) return -1;
    if (read(t->perf_fd, &count, sizeof(count)) != (ssize_t)sizeof(count)) return 0;
    uint64_t used = S.cpu_ns ? count / S.cpu_ns : 0;  /* overflows so far, about */
    if (t->perf_cpu != 0 && count == t->perf_count && cpu > t->perf_cpu + 3 * S.cpu_ns) {
        if (ioctl(t->perf_fd, PERF_EVENT_IOC_REFRESH, (int)PERF_GRANT) == 0) t->perf_granted = used + PERF_GRANT;
        atomic_fetch_add(&bi.n.perf_rearmed, 1);
    } else if (t->perf_granted < used + PERF_GRANT / 2) {
        if (ioctl(t->perf_fd, PERF_EVENT_IOC_REFRESH, (int)(PERF_GRANT / 2)) == 0) t->perf_granted += PERF_GRANT / 2;
    }
    t->perf_count = count;
    t->perf_cpu = cpu;
    return 0;
}

static void drop_source(thread_t *t) {
    if (!t->has_timer) return;
    if (t->perf_fd >= 0) {
        perf_fd_mark(t->perf_fd, 0);
        if (perf_fd_is_ours(t)) close(t->perf_fd);  /* never someone else's file */
        t->perf_fd = -1;
        S.n_perf--;
    } else {
        timer_delete(t->timer);
    }
    t->has_timer = 0;
    atomic_fetch_sub(&S.n_timers, 1);
}

static void drop_thread(int i) {
    drop_source(&S.threads[i]);
    if (S.threads[i].excluded) atomic_fetch_sub(&S.n_excluded, 1);
    /* slots stay where they are (their index travels in wall signals): this one is free now */
    S.threads[i].tid = 0;
    S.threads[i].excluded = 0;
    while (S.nthreads > 0 && S.threads[S.nthreads - 1].tid == 0) S.nthreads--;
}

static int own_thread(int tid);

/* Rescans /proc/self/task. With per-thread timers, a thread whose timer cannot be made makes
   the scan fail (-1, errno) when `strict`; otherwise it is counted and retried next scan. */
static int scan(int strict) {
    S.uid = getuid();  /* the application may have changed it */
    DIR *d = opendir("/proc/self/task");
    if (d == NULL) return -1;
    for (int i = 0; i < S.nthreads; i++) S.threads[i].seen = 0;
    struct dirent *de;
    int rc = 0;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] < '0' || de->d_name[0] > '9') continue;
        int tid = atoi(de->d_name);
        if (tid <= 0 || tid == S.self_tid) continue;
        int i;
        int free_slot = -1;
        for (i = 0; i < S.nthreads; i++) {
            if (S.threads[i].tid == tid) break;
            if (S.threads[i].tid == 0 && free_slot < 0) free_slot = i;
        }
        if (i == S.nthreads) {
            if (free_slot >= 0) i = free_slot;
            else if (S.nthreads >= MAX_THREADS) continue;
            else S.nthreads++;
            memset(&S.threads[i], 0, sizeof(thread_t));
            S.threads[i].tid = tid;
            S.threads[i].perf_fd = -1;
            atomic_fetch_add(&bi_wall_lasts[i].gen, 1);
            bi_wall_lasts[i].epoch = 0;  /* nothing to repeat for the new thread */
            atomic_fetch_add(&bi_wall_lasts[i].gen, 1);
            atomic_fetch_add(&bi_cpu_lasts[i].gen, 1);
            bi_cpu_lasts[i].epoch = 0;
            atomic_fetch_add(&bi_cpu_lasts[i].gen, 1);
        }
        thread_t *t = &S.threads[i];
        t->seen = 1;
        if (!t->excluded && t->comm_checks < 3) {
            t->comm_checks++;
            if (own_thread(tid)) {
                t->excluded = 1;
                drop_source(t);
                atomic_fetch_add(&S.n_excluded, 1);
            }
        }
        if (t->excluded) continue;
        if (t->has_timer && t->perf_fd >= 0) {
            if (check_perf(t) != 0) drop_source(t);  /* the tid belongs to a new thread now */
        } else if (t->has_timer) {
            /* A timer whose thread ended reads as disarmed (an expired live one reads 1 ns): the
               tid now belongs to a new thread, which needs its own timer. */
            struct itimerspec cur;
            if (timer_gettime(t->timer, &cur) != 0 || (cur.it_value.tv_sec == 0 && cur.it_value.tv_nsec == 0))
                drop_source(t);
        }
        /* perf events while the descriptor budget lasts, CPU-clock timers for the threads beyond */
        if (S.cpu_thread && !t->has_timer &&
            ((S.cpu_thread == 2 && S.n_perf < S.perf_budget) ? create_perf(t) : create_timer(t)) != 0) {
            int e = errno;
            char path[64];
            snprintf(path, sizeof(path), "/proc/self/task/%d", tid);
            if (access(path, F_OK) != 0) continue;  /* gone meanwhile */
            errno = e;
            atomic_fetch_add(&bi.n.timer_failed, 1);
            if (strict) { rc = -1; break; }
        }
    }
    int e = errno;
    closedir(d);
    if (rc == 0)
        for (int i = S.nthreads - 1; i >= 0; i--) if (S.threads[i].tid != 0 && !S.threads[i].seen) drop_thread(i);
    int live = 0;
    for (int i = 0; i < S.nthreads; i++) live += S.threads[i].tid != 0;
    atomic_store(&S.n_threads_seen, live);
    errno = e;
    return rc;
}

/* Reads /proc/self/task/<tid>/<name> into buf (NUL-terminated); the byte count, or -1. Relative
   to the kept /proc/self/task when we have it: no lookup of /proc/self/task per read. */
static ssize_t read_task_file(int tid, const char *name, char *buf, size_t cap) {
    char path[64];
    int fd;
    if (S.task_dir >= 0) {
        snprintf(path, sizeof(path), "%d/%s", tid, name);
        fd = openat(S.task_dir, path, O_RDONLY | O_CLOEXEC);
    } else {
        snprintf(path, sizeof(path), "/proc/self/task/%d/%s", tid, name);
        fd = open(path, O_RDONLY | O_CLOEXEC);
    }
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    buf[n > 0 ? n : 0] = 0;
    return n;
}

/* Whether thread tid is named "asprof-..." (the agent's own threads: asprof-agent,
   asprof-collect, ...). */
static int own_thread(int tid) {
    char buf[32];
    ssize_t n = read_task_file(tid, "comm", buf, sizeof(buf));
    return n >= 7 && memcmp(buf, "asprof-", 7) == 0;
}

/* 1 running / runnable, 2 sleeping (any other state), 0 unknown. */
__attribute__((unused)) static unsigned thread_state(int tid) {
    char buf[512];
    if (read_task_file(tid, "stat", buf, sizeof(buf)) <= 0) return 0;
    char *p = strrchr(buf, ')');
    if (p == NULL || p[1] != ' ') return 0;
    return p[2] == 'R' ? 1u : 2u;
}

static void send_wall(void) {
    pid_t pid = S.pid;
    uid_t uid = S.uid;  /* getuid() at start (a system call per tick otherwise) */
    uint64_t now = pf_mono_ns();
    for (int i = 0; i < S.nthreads; i++) {
        thread_t *t = &S.threads[i];
        if (t->excluded || t->tid == 0) continue;
        int tid = t->tid;
        uint64_t cpu = thread_cpu_ns(tid);
        if (cpu == 0) continue;  /* gone */
        if (t->wall_cpu != 0 && cpu - t->wall_cpu < BI_IDLE_NS) {
            /* Idle since the last tick (what it used is our handler's and the way back to its
               wait): it is where it was, sleeping. Repeat its last wall sample. */
            bi_wall_last *w = &bi_wall_lasts[i];
            uint32_t g1 = atomic_load(&w->gen);
            uint32_t epoch = w->epoch, stack = w->stack, label = w->label;
            uint64_t pc = w->pc;
            if (!(g1 & 1u) && atomic_load(&w->gen) == g1 && epoch != 0 && w->sleeping &&
                bi_store_append(now, (uint32_t)tid, stack, pc, 1, 2, epoch, label) == 0) {
                t->wall_cpu = cpu;
                atomic_fetch_add_explicit(&bi.n.wall_repeated, 1, memory_order_relaxed);
                continue;
            }
        }
        /* Busy for at least half the interval: running (its /proc state would say R all but
           never, and reading it costs the sampler an open, a read and a close per thread per tick).
           Otherwise the handler tells from where the signal found the thread (BI_STATE_ASK: in a
           blocking system call or not), where it can read instructions safely; else /proc. */
        int busy = t->wall_cpu != 0 && cpu - t->wall_cpu >= S.wall_ns / 2;
        /* Ran a good part of the interval (an eighth, and a CPU interval at least: busy threads
           sharing a CPU, or waiting their turn for the GIL, run less than half of it) */
        uint64_t ran_enough = S.wall_ns / 8 > S.cpu_ns ? S.wall_ns / 8 : S.cpu_ns;
        if (t->wall_cpu != 0 && S.cpu_ns != 0 && cpu - t->wall_cpu >= ran_enough) {
            /* Its latest CPU sample, if taken in the second half of this interval, stands for the
               wall sample: the thread was running then, and has run since the last tick (no
               signal, no handler call). */
            bi_cpu_last *c = &bi_cpu_lasts[i];
            uint32_t g1 = atomic_load(&c->gen);
            uint32_t epoch = c->epoch, stack = c->stack, label = c->label;
            uint64_t pc = c->pc, when = c->time;
            int same = c->tid == (uint32_t)tid;
            if (!(g1 & 1u) && atomic_load(&c->gen) == g1 && epoch != 0 && same && when <= now &&
                now - when <= S.wall_ns / 2 &&
                bi_store_append(now, (uint32_t)tid, stack, pc, 1, 1, epoch, label) == 0) {
                t->wall_cpu = cpu;
                atomic_fetch_add_explicit(&bi.n.wall_from_cpu, 1, memory_order_relaxed);
                continue;
            }
        }
#ifdef ASPROF_WALKER
        unsigned state = busy ? 1u : BI_STATE_ASK;
#else
        unsigned state = busy ? 1u : thread_state(tid);
#endif
        t->wall_cpu = cpu;
        if (state == 0) continue;  /* gone */
        siginfo_t si;
        memset(&si, 0, sizeof(si));
        si.si_signo = SIGPROF;
        si.si_code = SI_QUEUE;
        si.si_pid = pid;
        si.si_uid = uid;
        si.si_value.sival_ptr = (void *)(uintptr_t)(BI_MAGIC | BI_VAL_WALL | state | ((uint64_t)i << 12));
        if (syscall(SYS_rt_tgsigqueueinfo, pid, tid, SIGPROF, &si) == 0)
            atomic_fetch_add_explicit(&bi.n.wall_sent, 1, memory_order_relaxed);
        else
            atomic_fetch_add_explicit(&bi.n.wall_failed, 1, memory_order_relaxed);
    }
}

static void open_task_dir(void) {
    S.task_dir = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    struct stat st;
    if (S.task_dir >= 0 && fstat(S.task_dir, &st) == 0) {
        S.task_dir_ino = (uint64_t)st.st_ino;
        S.task_dir_dev = (uint64_t)st.st_dev;
    }
}

/* Whether S.task_dir is still our directory (the application may have closed every descriptor
   and reused the number). */
static int task_dir_ours(void) {
    struct stat st;
    return S.task_dir >= 0 && fstat(S.task_dir, &st) == 0 && (uint64_t)st.st_ino == S.task_dir_ino &&
           (uint64_t)st.st_dev == S.task_dir_dev;
}

static void close_task_dir(void) {
    if (task_dir_ours()) close(S.task_dir);  /* never someone else's file */
    S.task_dir = -1;
}

/* issue #13: with the ITIMER_PROF fallback, the application may re-arm the process's one
   ITIMER_PROF (setitimer) over ours. Its ticks then stand for our samples too, and its handler
   (behind ours) gets each of them (bi.itimer_shared); samples follow its interval, not ours. When
   it disarms it, ours is armed again. */
static void arm_itimer(void) {
    struct itimerval it;
    it.it_interval.tv_sec = (time_t)(S.cpu_ns / 1000000000ull);
    it.it_interval.tv_usec = (suseconds_t)((S.cpu_ns % 1000000000ull) / 1000);
    if (it.it_interval.tv_sec == 0 && it.it_interval.tv_usec == 0) it.it_interval.tv_usec = 1;
    it.it_value = it.it_interval;
    setitimer(ITIMER_PROF, &it, NULL);
}

static void check_itimer(void) {
    struct itimerval cur;
    if (getitimer(ITIMER_PROF, &cur) != 0) return;
    uint64_t ours_us = S.cpu_ns / 1000 ? S.cpu_ns / 1000 : 1;
    uint64_t now_us = (uint64_t)cur.it_interval.tv_sec * 1000000ull + (uint64_t)cur.it_interval.tv_usec;
    if (now_us == 0 && cur.it_value.tv_sec == 0 && cur.it_value.tv_usec == 0) {
        atomic_store(&bi.itimer_shared, 0);  /* disarmed by the application: ours again */
        arm_itimer();
    } else if (now_us != ours_us && !atomic_load(&bi.itimer_shared)) {
        atomic_store(&bi.itimer_shared, 1);
        atomic_fetch_add(&bi.itimer_taken, 1);
    } else if (now_us == ours_us && atomic_load(&bi.itimer_shared)) {
        atomic_store(&bi.itimer_shared, 0);  /* ours again (the application set our interval back) */
    }
}

static void keep_in_front(void) {
    if (S.task_dir >= 0 && !task_dir_ours()) {
        S.task_dir = -1;  /* closed by the application: forget the number, open ours again */
        open_task_dir();
    }
    if (!bi_handler_is_installed()) {
        /* Someone replaced our handler: get in front again, chaining theirs. */
        struct sigaction cur;
        if (sigaction(SIGPROF, NULL, &cur) == 0)
            atomic_store(&bi_foreign_fn, (uintptr_t)((cur.sa_flags & SA_SIGINFO) ? (void *)cur.sa_sigaction
                                                                                  : (void *)cur.sa_handler));
        if (bi_handler_install() == 0) atomic_fetch_add(&bi.n.handler_reinstalled, 1);
    }
    if (S.itimer) check_itimer();  /* issue #13 */
#ifdef ASPROF_WALKER
    if (!pf_safeload_active()) pf_safeload_install();
    atomic_store(&bi.guard_ok, pf_safeload_active());
#endif
}

/* issue #13: keep_in_front now (the application just set SIGPROF's handler from Python), and every
   perf event of ours checked (check_perf: one found disabled is re-armed). Our events do not stop
   when their signals go to another handler (their limit is granted ahead, not re-armed by ours). */
void bi_sampler_recheck(void) {
    pthread_mutex_lock(&S.lock);
    if (S.running) {
        keep_in_front();
        for (int i = 0; i < S.nthreads; i++) {
            thread_t *t = &S.threads[i];
            if (t->tid != 0 && t->has_timer && t->perf_fd >= 0 && check_perf(t) != 0) drop_source(t);
        }
    }
    pthread_mutex_unlock(&S.lock);
}

static void *sampler_main(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "asprof-sampler", 0, 0, 0);
    pthread_mutex_lock(&S.lock);
    S.self_tid = (int)syscall(SYS_gettid);
    uint64_t now = pf_mono_ns();
    /* Rescans (new threads, the handler still in front) every 100 ms, or every two CPU intervals
       up to 250 ms: at the defaults (100 ms of CPU) a new thread misses at most about two of its
       samples, and the sampler wakes half as often (each wake-up costs it tens of microseconds). */
    uint64_t scan_every = 2 * S.cpu_ns;
    if (scan_every < SCAN_NS) scan_every = SCAN_NS;
    if (scan_every > 250000000ull) scan_every = 250000000ull;
    uint64_t next_scan = now, next_wall = S.wall_ns ? now + S.wall_ns : UINT64_MAX;
    uint64_t next_check = now + scan_every;
    /* Housekeeping (rescans, the handler check) that falls due within HOUSEKEEPING_SLACK_NS of
       a wake-up is done in it: one wake-up instead of two or three (a wake-up costs the sampler
       tens of microseconds on a virtual machine, more than the work). Wall ticks keep their pace. */
    const uint64_t slack = HOUSEKEEPING_SLACK_NS;
    while (!S.stop) {
        now = pf_mono_ns();
        if (now >= next_wall) {
            send_wall();
            next_wall += S.wall_ns;
            if (next_wall <= now) next_wall = now + S.wall_ns;  /* fell behind: skip, do not burst */
        }
        if (now + slack >= next_scan) {
            scan(0);
            next_scan = now + scan_every;
        }
        if (now + slack >= next_check) {
            keep_in_front();
            next_check = now + scan_every;
        }
        /* the next wall tick, or the next housekeeping if it is due well before it */
        uint64_t house = next_scan < next_check ? next_scan : next_check;
        uint64_t until = house + slack < next_wall ? house : next_wall;
        struct timespec ts = {(time_t)(until / 1000000000ull), (long)(until % 1000000000ull)};
        pthread_cond_timedwait(&S.cond, &S.lock, &ts);
    }
    pthread_mutex_unlock(&S.lock);
    return NULL;
}

static void delete_all(void) {
    for (int i = S.nthreads - 1; i >= 0; i--) if (S.threads[i].tid != 0) drop_thread(i);
    S.nthreads = 0;
    atomic_store(&S.n_threads_seen, 0);
    if (S.itimer) {
        struct itimerval zero;
        memset(&zero, 0, sizeof(zero));
        setitimer(ITIMER_PROF, &zero, NULL);
        S.itimer = 0;
        atomic_store(&bi.itimer_mode, 0);
        atomic_store(&bi.itimer_shared, 0);
    }
    S.cpu_thread = 0;
}

const char *bi_sampler_start(uint64_t cpu_ns, uint64_t wall_ns, int cpu_mode, const char **mode_out) {
    pthread_mutex_lock(&S.lock);
    if (!S.cond_ready) {
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&S.cond, &ca);
        pthread_condattr_destroy(&ca);
        S.cond_ready = 1;
    }
    S.cpu_ns = cpu_ns;
    S.wall_ns = wall_ns;
    S.pid = getpid();
    S.uid = getuid();
    S.stop = 0;
    S.self_tid = 0;
    S.nthreads = 0;
    *mode_out = "off";
    const char *err = NULL;
    if (cpu_ns != 0) {
        if (cpu_mode == 0 || cpu_mode == 3) {
            S.cpu_thread = 2;
            S.perf_exclude_kernel = 0;
            struct rlimit rl;
            S.perf_budget = 1024;
            if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur / 4 < 1024)
                S.perf_budget = (int)(rl.rlim_cur / 4);
            S.n_perf = 0;
            if (scan(1) == 0) {
                *mode_out = "perf-task-clock";
            } else {
                int e = errno;
                delete_all();
                errno = e;
                if (cpu_mode == 3) { err = "cannot open per-thread perf task-clock events (perf_event_open)"; goto fail; }
            }
        }
        if (!S.cpu_thread && (cpu_mode == 0 || cpu_mode == 1)) {
            S.cpu_thread = 1;
            if (scan(1) == 0) {
                *mode_out = "thread-cputime";
            } else {
                int e = errno;
                delete_all();
                errno = e;
                if (cpu_mode == 1) { err = "cannot create per-thread CPU-clock timers (timer_create)"; goto fail; }
            }
        }
        if (!S.cpu_thread) {
            struct itimerval cur;
            if (getitimer(ITIMER_PROF, &cur) == 0 && (cur.it_value.tv_sec || cur.it_value.tv_usec)) {
                errno = EBUSY;
                err = "ITIMER_PROF is already in use in this process";
                goto fail;
            }
            struct itimerval it;
            it.it_interval.tv_sec = (time_t)(cpu_ns / 1000000000ull);
            it.it_interval.tv_usec = (suseconds_t)((cpu_ns % 1000000000ull) / 1000);
            if (it.it_interval.tv_sec == 0 && it.it_interval.tv_usec == 0) it.it_interval.tv_usec = 1;
            it.it_value = it.it_interval;
            atomic_store(&bi.itimer_mode, 1);
            if (setitimer(ITIMER_PROF, &it, NULL) != 0) {
                atomic_store(&bi.itimer_mode, 0);
                err = "cannot arm ITIMER_PROF (setitimer)";
                goto fail;
            }
            S.itimer = 1;
            *mode_out = "itimer";
        }
    } else if (wall_ns != 0) {
        scan(0);
    }
    /* The sampler never takes SIGPROF: blocked before it exists, inherited by it. */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGPROF);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    int rc = pthread_create(&S.th, NULL, sampler_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        delete_all();
        errno = rc;
        err = "cannot start the asprof-sampler thread";
        goto fail;
    }
    pthread_setname_np(S.th, "asprof-sampler");  /* named before start() returns */
    if (S.task_dir < 0) open_task_dir();
    S.running = 1;
    pthread_mutex_unlock(&S.lock);
    return NULL;
fail:
    pthread_mutex_unlock(&S.lock);
    return err;
}

void bi_sampler_stop(void) {
    pthread_mutex_lock(&S.lock);
    if (!S.running) {
        pthread_mutex_unlock(&S.lock);
        return;
    }
    S.stop = 1;
    pthread_cond_broadcast(&S.cond);
    pthread_mutex_unlock(&S.lock);
    pthread_join(S.th, NULL);
    pthread_mutex_lock(&S.lock);
    S.running = 0;
    delete_all();
    close_task_dir();
    pthread_mutex_unlock(&S.lock);
}

int bi_sampler_running(void) { return S.running; }
int bi_sampler_threads(void) { return atomic_load(&S.n_threads_seen); }
int bi_sampler_timers(void) { return atomic_load(&S.n_timers); }
int bi_sampler_excluded(void) { return atomic_load(&S.n_excluded); }
int bi_sampler_perf_events(void) { return S.n_perf; }

/* In a forked child: no sampler thread, no per-thread timer, no itimer (none is inherited); the
   lock may have been held by the parent's sampler. Only async-signal-safe work. */
void bi_atfork_child(void) {
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&S.lock, &m, sizeof(m));
    S.cond_ready = 0;  /* the condition variable is made again at the next start */
    for (int i = 0; i < S.nthreads; i++)
        if (S.threads[i].tid != 0 && S.threads[i].perf_fd >= 0) {
            /* the parent's events (the open file descriptions are shared: closing ours only) */
            perf_fd_mark(S.threads[i].perf_fd, 0);
            close(S.threads[i].perf_fd);
        }
    close_task_dir();  /* the parent's task directory */
    S.running = 0;
    S.stop = 0;
    S.nthreads = 0;
    S.cpu_thread = 0;
    S.itimer = 0;
    atomic_store(&S.n_threads_seen, 0);
    atomic_store(&S.n_timers, 0);
    atomic_store(&S.n_excluded, 0);
    S.n_perf = 0;
}
