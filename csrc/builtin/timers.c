/*
 * What makes SIGPROF arrive: per-thread CPU-clock timers (or the process-wide ITIMER_PROF
 * fallback) and the "asprof-sampler" thread, which
 *   - rescans /proc/self/task every 100 ms: a timer for each new thread, the timers of gone
 *     threads deleted (wall signals go to the threads of the latest scan);
 *   - every wall interval reads each thread's state from /proc/self/task/<tid>/stat and sends
 *     it a SIGPROF carrying that state (rt_tgsigqueueinfo);
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
#include <sys/prctl.h>
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

#define MAX_THREADS 8192
#define SCAN_NS 100000000ull

typedef struct {
    int tid;
    int has_timer;
    int seen;
    timer_t timer;
} thread_t;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t th;
    int running;      /* a sampler thread exists (joinable) */
    int stop;
    int self_tid;     /* the sampler's tid */
    int cpu_thread;   /* per-thread timers in use */
    int itimer;       /* ITIMER_PROF in use */
    uint64_t cpu_ns, wall_ns;
    pid_t pid;
    int cond_ready;
    int task_dir;     /* /proc/self/task of this process while the sampler runs, else -1 */
    thread_t threads[MAX_THREADS];
    int nthreads;
    _Atomic int n_threads_seen, n_timers;
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
    sev.sigev_value.sival_ptr = (void *)(uintptr_t)(BI_MAGIC | BI_VAL_CPU);
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

static void drop_thread(int i) {
    if (S.threads[i].has_timer) {
        timer_delete(S.threads[i].timer);
        atomic_fetch_sub(&S.n_timers, 1);
    }
    S.threads[i] = S.threads[--S.nthreads];
}

/* Rescans /proc/self/task. With per-thread timers, a thread whose timer cannot be made makes
   the scan fail (-1, errno) when `strict`; otherwise it is counted and retried next scan. */
static int scan(int strict) {
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
        for (i = 0; i < S.nthreads; i++) if (S.threads[i].tid == tid) break;
        if (i == S.nthreads) {
            if (S.nthreads >= MAX_THREADS) continue;
            memset(&S.threads[i], 0, sizeof(thread_t));
            S.threads[i].tid = tid;
            S.nthreads++;
        }
        thread_t *t = &S.threads[i];
        t->seen = 1;
        if (t->has_timer) {
            /* A timer whose thread ended reads as disarmed (an expired live one reads 1 ns): the
               tid now belongs to a new thread, which needs its own timer. */
            struct itimerspec cur;
            if (timer_gettime(t->timer, &cur) != 0 || (cur.it_value.tv_sec == 0 && cur.it_value.tv_nsec == 0)) {
                timer_delete(t->timer);
                t->has_timer = 0;
                atomic_fetch_sub(&S.n_timers, 1);
            }
        }
        if (S.cpu_thread && !t->has_timer && create_timer(t) != 0) {
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
        for (int i = S.nthreads - 1; i >= 0; i--) if (!S.threads[i].seen) drop_thread(i);
    atomic_store(&S.n_threads_seen, S.nthreads);
    errno = e;
    return rc;
}

/* 1 running / runnable, 2 sleeping (any other state), 0 unknown. */
static unsigned thread_state(int tid) {
    char path[64], buf[512];
    int fd;
    if (S.task_dir >= 0) {
        /* relative to the kept /proc/self/task: no lookup of /proc/self/task per read */
        snprintf(path, sizeof(path), "%d/stat", tid);
        fd = openat(S.task_dir, path, O_RDONLY | O_CLOEXEC);
    } else {
        snprintf(path, sizeof(path), "/proc/self/task/%d/stat", tid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
    }
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (p == NULL || p[1] != ' ') return 0;
    return p[2] == 'R' ? 1u : 2u;
}

static void send_wall(void) {
    pid_t pid = S.pid;
    uid_t uid = getuid();
    for (int i = 0; i < S.nthreads; i++) {
        int tid = S.threads[i].tid;
        unsigned state = thread_state(tid);
        if (state == 0) continue;  /* gone */
        siginfo_t si;
        memset(&si, 0, sizeof(si));
        si.si_signo = SIGPROF;
        si.si_code = SI_QUEUE;
        si.si_pid = pid;
        si.si_uid = uid;
        si.si_value.sival_ptr = (void *)(uintptr_t)(BI_MAGIC | BI_VAL_WALL | state);
        if (syscall(SYS_rt_tgsigqueueinfo, pid, tid, SIGPROF, &si) == 0)
            atomic_fetch_add_explicit(&bi.n.wall_sent, 1, memory_order_relaxed);
        else
            atomic_fetch_add_explicit(&bi.n.wall_failed, 1, memory_order_relaxed);
    }
}

static void keep_in_front(void) {
    if (!bi_handler_is_installed()) {
        /* Someone replaced our handler: get in front again, chaining theirs. */
        if (bi_handler_install() == 0) atomic_fetch_add(&bi.n.handler_reinstalled, 1);
    }
#ifdef ASPROF_WALKER
    if (!pf_safeload_active()) pf_safeload_install();
    atomic_store(&bi.guard_ok, pf_safeload_active());
#endif
}

static void *sampler_main(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "asprof-sampler", 0, 0, 0);
    pthread_mutex_lock(&S.lock);
    S.self_tid = (int)syscall(SYS_gettid);
    uint64_t now = pf_mono_ns();
    uint64_t scan_every = SCAN_NS;
    uint64_t next_scan = now, next_wall = S.wall_ns ? now + S.wall_ns : UINT64_MAX;
    uint64_t next_check = now + SCAN_NS;
    while (!S.stop) {
        now = pf_mono_ns();
        if (now >= next_scan) {
            scan(0);
            next_scan = now + scan_every;
        }
        if (now >= next_wall) {
            send_wall();
            next_wall += S.wall_ns;
            if (next_wall <= now) next_wall = now + S.wall_ns;  /* fell behind: skip, do not burst */
        }
        if (now >= next_check) {
            keep_in_front();
            next_check = now + SCAN_NS;
        }
        uint64_t until = next_scan < next_wall ? next_scan : next_wall;
        if (next_check < until) until = next_check;
        struct timespec ts = {(time_t)(until / 1000000000ull), (long)(until % 1000000000ull)};
        pthread_cond_timedwait(&S.cond, &S.lock, &ts);
    }
    pthread_mutex_unlock(&S.lock);
    return NULL;
}

static void delete_all(void) {
    while (S.nthreads > 0) drop_thread(S.nthreads - 1);
    atomic_store(&S.n_threads_seen, 0);
    if (S.itimer) {
        struct itimerval zero;
        memset(&zero, 0, sizeof(zero));
        setitimer(ITIMER_PROF, &zero, NULL);
        S.itimer = 0;
        atomic_store(&bi.itimer_mode, 0);
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
    S.stop = 0;
    S.self_tid = 0;
    S.nthreads = 0;
    *mode_out = "off";
    const char *err = NULL;
    if (cpu_ns != 0) {
        if (cpu_mode != 2) {
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
    if (S.task_dir < 0) S.task_dir = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
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
    if (S.task_dir >= 0) {
        close(S.task_dir);
        S.task_dir = -1;
    }
    pthread_mutex_unlock(&S.lock);
}

int bi_sampler_running(void) { return S.running; }
int bi_sampler_threads(void) { return atomic_load(&S.n_threads_seen); }
int bi_sampler_timers(void) { return atomic_load(&S.n_timers); }

/* In a forked child: no sampler thread, no per-thread timer, no itimer (none is inherited); the
   lock may have been held by the parent's sampler. Only async-signal-safe work. */
void bi_atfork_child(void) {
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    memcpy(&S.lock, &m, sizeof(m));
    S.cond_ready = 0;  /* the condition variable is made again at the next start */
    if (S.task_dir >= 0) {
        close(S.task_dir);  /* the parent's task directory */
        S.task_dir = -1;
    }
    S.running = 0;
    S.stop = 0;
    S.nthreads = 0;
    S.cpu_thread = 0;
    S.itimer = 0;
    atomic_store(&S.n_threads_seen, 0);
    atomic_store(&S.n_timers, 0);
}
