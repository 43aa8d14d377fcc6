"""The built-in engine's C module under stress (asprof.engines._builtin, BUILTIN_API.md).

What a host process relies on while it is being profiled: threads coming and going, forks,
start/stop cycles, collect() from another thread, a foreign SIGPROF user, code objects made and
freed, blocking calls, bounded memory. Every scenario runs in a child interpreter (shared runner
and decoder of test_builtin_native.py); the assertions are made here. No timed assertions:
counts are only required to be non-zero or to add up.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict

import pytest
from test_builtin_native import needs_frames, run

# Shared by the scenarios below (appended to test_builtin_native's PRELUDE).
HELPERS = '''
def posix_timers():
    try:
        with open("/proc/self/timers") as f:
            return sum(1 for ln in f if ln.startswith("ID:"))
    except OSError:
        return 0

def perf_fds():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[perf_event]"
        except OSError:
            pass
    return n

def leftovers():
    """Timers, perf events and sampler threads of the engine still alive in this process."""
    return {"posix_timers": posix_timers(), "perf_fds": perf_fds(), "samplers": sampler_threads()}

def rss_kb():
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    return 0

def busy(stop, seconds=None):
    end = None if seconds is None else time.monotonic() + seconds
    x = 0
    while not stop.is_set() and (end is None or time.monotonic() < end):
        x += 1
    return x

def distinct(records):
    return {(s["t"], s["tid"], s["kind"]) for s in records}
'''


def stress(body: str, timeout: float = 120.0) -> Dict[str, Any]:
    return run(HELPERS + textwrap.dedent(body), timeout=timeout)


def test_threads_starting_and_exiting_while_sampling() -> None:
    r = stress('''
        main_tid = threading.get_native_id()
        tids = {main_tid}
        lock = threading.Lock()
        def short(n):
            with lock:
                tids.add(threading.get_native_id())
            end = time.monotonic() + 0.002 * (1 + n % 5)
            while time.monotonic() < end:
                pass
            if n % 3 == 0:  # some exit with SIGPROF blocked (a signal may be pending)
                signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGPROF])
                time.sleep(0.001)
        mode = b.start(1_000_000, 1_000_000)
        got = []
        for wave in range(25):
            ts = [threading.Thread(target=short, args=(wave * 20 + i,)) for i in range(20)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            if wave % 5 == 4:
                got += decode(b.collect())
        stats = b.stats()
        b.stop()
        got += decode(b.collect())
        emit({"mode": mode, "n": len(got), "foreign_tids": sorted({s["tid"] for s in got} - tids),
              "sampled_tids": len({s["tid"] for s in got}), "timers_after": b.stats()["timers"],
              "left": leftovers()})
    ''')
    assert r["n"] > 0
    assert r["foreign_tids"] == []  # every sample belongs to an application thread (never the sampler's)
    assert r["sampled_tids"] >= 2  # short-lived threads are sampled, not only the main one
    assert r["timers_after"] == 0
    assert r["left"] == {"posix_timers": 0, "perf_fds": 0, "samplers": 0}  # nothing outlives stop()


def test_fork_while_sampling_children_start_afresh() -> None:
    r = stress('''
        import warnings
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        stop_ev = threading.Event()
        workers = [threading.Thread(target=busy, args=(stop_ev,)) for _ in range(3)]
        for t in workers:
            t.start()
        b.start(1_000_000, 2_000_000)
        codes = []
        for i in range(8):
            end = time.monotonic() + 0.03
            while time.monotonic() < end:
                pass
            pid = os.fork()
            if pid == 0:
                rc = 0
                try:
                    me = threading.get_native_id()
                    if b.running() or b.stats()["timers"] or any(leftovers().values()):
                        rc = 10
                    elif len(b.collect()[3]) != 0:
                        rc = 11  # the parent's samples are not the child's
                    else:
                        b.start(1_000_000, 2_000_000)
                        got = []
                        t0 = time.monotonic()
                        while not got and time.monotonic() - t0 < 20:
                            end = time.monotonic() + 0.05
                            while time.monotonic() < end:
                                pass
                            got += decode(b.collect())
                        b.stop()
                        if not got:
                            rc = 12
                        elif {s["tid"] for s in got} != {me}:
                            rc = 13
                        elif any(leftovers().values()):
                            rc = 14
                except BaseException:
                    rc = 15
                os._exit(rc)
            codes.append(os.waitpid(pid, 0)[1])
        running = b.running()
        stop_ev.set()
        for t in workers:
            t.join()
        b.stop()
        parent = decode(b.collect())
        emit({"codes": codes, "running": running, "parent": len(parent)})
    ''')
    # child exit statuses: 10 inherited state, 11 parent's samples, 12 no samples, 13 foreign tid,
    # 14 leftovers after stop, 15 exception
    assert r["codes"] == [0] * 8
    assert r["running"] is True  # the parent's engine kept running through the forks
    assert r["parent"] > 0


def test_start_stop_cycles_under_load() -> None:
    r = stress('''
        stop_ev = threading.Event()
        workers = [threading.Thread(target=busy, args=(stop_ev,)) for _ in range(6)]
        for t in workers:
            t.start()
        records = set()
        lost = 0
        modes = set()
        for i in range(30):
            modes.add(b.start(1_000_000, 500_000 if i % 2 else 0))
            end = time.monotonic() + 0.02
            while time.monotonic() < end:
                pass
            if i % 3 == 0:
                batch = b.collect()  # while running
                records |= distinct(decode(batch))
                lost += batch[4]
            b.stop()
            batch = b.collect()
            records |= distinct(decode(batch))
            lost += batch[4]
        stop_ev.set()
        for t in workers:
            t.join()
        st = b.stats()
        emit({"modes": sorted(modes), "records": len(records), "samples": st["samples"], "lost": lost,
              "stats_lost": st["lost"], "left": leftovers(), "running": b.running()})
    ''')
    assert r["records"] > 0
    # nothing recorded is silently lost: every sample the handler stored was handed out once
    assert r["records"] == r["samples"]
    assert r["lost"] == r["stats_lost"]
    assert r["left"] == {"posix_timers": 0, "perf_fds": 0, "samplers": 0} and r["running"] is False


def test_collect_from_another_thread_hands_out_every_sample() -> None:
    r = stress('''
        stop_ev = threading.Event()
        workers = [threading.Thread(target=busy, args=(stop_ev,)) for _ in range(4)]
        for t in workers:
            t.start()
        b.start(1_000_000, 1_000_000)
        records = set()
        lost = [0]
        busy_errors = [0]
        rlock = threading.Lock()
        def collector():
            while not stop_ev.is_set():
                try:
                    batch = b.collect()
                except RuntimeError:
                    busy_errors[0] += 1  # another collect() is in progress: allowed, not a crash
                    continue
                with rlock:
                    records.update(distinct(decode(batch)))
                    lost[0] += batch[4]
                time.sleep(0.002)
        cs = [threading.Thread(target=collector) for _ in range(2)]
        for c in cs:
            c.start()
        time.sleep(1.5)
        stop_ev.set()
        for c in cs:
            c.join()
        for t in workers:
            t.join()
        b.stop()
        batch = b.collect()
        records.update(distinct(decode(batch)))
        lost[0] += batch[4]
        st = b.stats()
        emit({"records": len(records), "samples": st["samples"], "lost": lost[0], "stats_lost": st["lost"],
              "timeouts": st["collect_timeouts"]})
    ''')
    assert r["records"] > 0
    assert r["records"] == r["samples"]
    assert r["lost"] == r["stats_lost"]


@needs_frames
def test_code_objects_made_and_freed_while_sampling() -> None:
    r = stress('''
        import asyncio
        stop_ev = threading.Event()
        def churn(k):
            i = 0
            while not stop_ev.is_set():
                ns = {}
                src = f"def fresh_{k}_{i}(n):\\n    x = 0\\n    for j in range(n):\\n        x += j\\n    return x\\n"
                exec(compile(src, f"<fresh {k}>", "exec"), ns)
                ns[f"fresh_{k}_{i}"](3000)
                del ns  # the code object dies right after it ran
                i += 1
        def gens():
            def g():
                for j in range(1000):
                    yield j * j
            while not stop_ev.is_set():
                sum(g())
        async def coro_leaf():
            x = 0
            for j in range(2000):
                x += j
            await asyncio.sleep(0)
        async def coro_main():
            while not stop_ev.is_set():
                await asyncio.gather(*(coro_leaf() for _ in range(5)))
        ts = [threading.Thread(target=churn, args=(k,)) for k in range(2)]
        ts.append(threading.Thread(target=gens))
        ts.append(threading.Thread(target=lambda: asyncio.run(coro_main())))
        b.start(1_000_000, 1_000_000)
        for t in ts:
            t.start()
        got = []
        t0 = time.monotonic()
        names = set()
        while time.monotonic() - t0 < 1.5:
            time.sleep(0.1)
            batch = b.collect()
            codes = batch[0]
            assert all(isinstance(x, str) for c in codes for x in c[:3]) and all(isinstance(c[3], int) for c in codes)
            for s in decode(batch):
                for f in s["frames"]:
                    if f[0] == "py":
                        names.add((f[1], f[2]))
        stop_ev.set()
        for t in ts:
            t.join()
        b.stop()
        st = b.stats()
        emit({"fresh": sorted(n for n, fn in names if n.startswith("fresh_") and fn.startswith("<fresh"))[:5],
              "bad_fresh": sorted(n for n, fn in names if n.startswith("fresh_") and not fn.startswith("<fresh")),
              "g": any(n == "g" or n.endswith(".<locals>.g") for n, _ in names),  # qualname from 3.11
              "coro": any(n == "coro_leaf" or n.endswith(".coro_leaf") for n, _ in names)})
    ''')
    assert r["fresh"], "functions made by exec() and freed right after are named in the samples"
    assert r["bad_fresh"] == []  # a name is never paired with another code object's file
    assert r["g"] and r["coro"]


def test_blocking_calls_survive_wall_signals() -> None:
    r = stress('''
        import queue, select, socket
        b.start(1_000_000, 200_000)  # wall signals every 0.2 ms to every thread
        errors = []
        def guarded(fn):
            def w():
                try:
                    fn()
                except BaseException as e:
                    errors.append(f"{fn.__name__}: {e!r}")
            return w
        def sleeper():
            for _ in range(20):
                time.sleep(0.01)
        def selecter():
            r_, w_ = os.pipe()
            for _ in range(20):
                select.select([r_], [], [], 0.01)
            os.close(r_); os.close(w_)
        def reader():
            r_, w_ = os.pipe()
            def later():
                time.sleep(0.2)
                os.write(w_, b"x" * 10)
            threading.Thread(target=later).start()
            data = os.read(r_, 10)
            assert data == b"x" * 10, data
            os.close(r_); os.close(w_)
        def sock():
            a, c = socket.socketpair()
            def later():
                time.sleep(0.2)
                c.sendall(b"ping")
            threading.Thread(target=later).start()
            assert a.recv(4) == b"ping"
            a.close(); c.close()
        def waiter():
            q = queue.Queue()
            ev = threading.Event()
            lk = threading.Lock(); lk.acquire()
            for _ in range(10):
                try:
                    q.get(timeout=0.01)
                except queue.Empty:
                    pass
                ev.wait(0.01)
                lk.acquire(timeout=0.01)
        def child():
            p = subprocess.run([sys.executable, "-c", "import time; time.sleep(0.2)"], check=True)
        import subprocess
        ts = [threading.Thread(target=guarded(f)) for f in (sleeper, selecter, reader, sock, waiter, child)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        st = b.stats()
        b.stop()
        emit({"errors": errors, "wall_sent": st["wall_sent"]})
    ''')
    assert r["errors"] == []  # no InterruptedError / short read reaches the application
    assert r["wall_sent"] > 0


def test_memory_added_is_bounded() -> None:
    r = stress('''
        stop_ev = threading.Event()
        def work(k):
            def level(n):
                if n:
                    return level(n - 1)
                return busy(stop_ev)
            level(k % 7)
        ts = [threading.Thread(target=work, args=(k,)) for k in range(10)]
        for t in ts:
            t.start()
        time.sleep(0.2)
        b.collect()  # maps nothing before start
        base = rss_kb()
        peak = base
        b.start(1_000_000, 10_000_000)
        n = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:
            time.sleep(0.5)
            peak = max(peak, rss_kb())
            batch = b.collect()
            n += len(batch[3]) // RECORD.size
            del batch
            peak = max(peak, rss_kb())
        b.stop()
        stop_ev.set()
        for t in ts:
            t.join()
        emit({"base_kb": base, "peak_kb": peak, "samples": n})
    ''')
    assert r["samples"] > 0
    assert r["peak_kb"] - r["base_kb"] <= 10 * 1024, r


CHAIN_C = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <string.h>
#include <stdatomic.h>
static struct sigaction prev;
static _Atomic long hits, passed;
/* A well-behaved SIGPROF user: counts its own signals (kill/tgkill), passes every other one on. */
static void h(int sig, siginfo_t *si, void *uc) {
    if (si->si_code == SI_USER || si->si_code == SI_TKILL) { atomic_fetch_add(&hits, 1); return; }
    atomic_fetch_add(&passed, 1);
    if (prev.sa_flags & SA_SIGINFO) { if (prev.sa_sigaction) prev.sa_sigaction(sig, si, uc); }
    else if (prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) prev.sa_handler(sig);
}
int chain_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = h;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGPROF, &sa, &prev);
}
long chain_hits(void) { return hits; }
long chain_passed(void) { return passed; }
"""


@pytest.fixture(scope="module")
def chain_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the foreign SIGPROF handler")
    d = tmp_path_factory.mktemp("chain")
    (d / "chain.c").write_text(CHAIN_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "libchain.so"), str(d / "chain.c")], check=True)
    return d / "libchain.so"


def test_mutually_chaining_foreign_handler_no_loop(chain_lib: Path) -> None:
    """A SIGPROF handler that chains to its predecessor, installed after start(): ours goes back
    in front (chaining to it), so each passes on what it does not own to the other. A signal
    neither owns must end somewhere, not bounce between them until the stack overflows."""
    r = stress(f'''
        import ctypes
        lib = ctypes.CDLL({str(chain_lib)!r})
        lib.chain_install.restype = ctypes.c_int
        lib.chain_hits.restype = lib.chain_passed.restype = ctypes.c_long
        b.start(1_000_000, 10_000_000)
        assert lib.chain_install() == 0
        t0 = time.monotonic()
        while b.stats()["handler_reinstalled"] == 0 and time.monotonic() - t0 < 20:
            end = time.monotonic() + 0.05
            while time.monotonic() < end:
                pass
        reinstalled = b.stats()["handler_reinstalled"]
        libc = ctypes.CDLL(None, use_errno=True)
        class SigInfo(ctypes.Structure):
            _fields_ = [("signo", ctypes.c_int), ("errno", ctypes.c_int), ("code", ctypes.c_int),
                        ("pad", ctypes.c_int), ("pid", ctypes.c_int), ("uid", ctypes.c_int),
                        ("value", ctypes.c_void_p), ("rest", ctypes.c_char * 96)]
        # SI_QUEUE (-1) with a value that is not ours: neither handler owns it
        si = SigInfo(signo=signal.SIGPROF, code=-1, pid=os.getpid(), uid=os.getuid(), value=12345)
        SYS_rt_tgsigqueueinfo = {{"x86_64": 297, "aarch64": 240}}[os.uname().machine]
        rc = libc.syscall(SYS_rt_tgsigqueueinfo, os.getpid(), threading.get_native_id(), signal.SIGPROF,
                          ctypes.byref(si))
        time.sleep(0.05)
        signal.pthread_kill(threading.get_ident(), signal.SIGPROF)  # the foreign handler's own signal
        time.sleep(0.05)
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass
        got = decode(b.collect())
        b.stop()
        emit({{"reinstalled": reinstalled, "rc": rc, "hits": lib.chain_hits(), "ours": len(got)}})
    ''')
    assert r["reinstalled"] >= 1
    assert r["rc"] == 0
    assert r["hits"] == 1  # its own signal reached it exactly once
    assert r["ours"] > 0  # and ours kept sampling


def test_concurrent_start_calls_one_wins_nothing_leaks() -> None:
    r = stress('''
        ev = threading.Event()
        idle = [threading.Thread(target=ev.wait) for _ in range(20)]
        for t in idle:
            t.start()
        res = []
        go = threading.Barrier(3)
        def starter():
            go.wait()
            try:
                res.append(b.start(1_000_000, 10_000_000))
            except RuntimeError:
                res.append("already running")
        ts = [threading.Thread(target=starter) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        samplers_running = sampler_threads()
        b.stop()
        emit({"res": sorted(res), "samplers_running": samplers_running, "left": leftovers(), "running": b.running()})
        ev.set()
    ''')
    assert r["res"].count("already running") == 2, r["res"]  # start() is not run twice at once
    assert r["samplers_running"] == 1
    assert r["left"] == {"posix_timers": 0, "perf_fds": 0, "samplers": 0}  # stop() leaves nothing armed
    assert r["running"] is False


def test_file_descriptors_left_to_the_application() -> None:
    """Per-thread perf events cost one descriptor each: threads started after start() must not
    use up the process's RLIMIT_NOFILE (the application's open() would fail)."""
    r = stress('''
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        ev = threading.Event()
        mode = b.start(10_000_000, 0)
        ts = [threading.Thread(target=ev.wait) for _ in range(300)]
        for t in ts:
            t.start()
        time.sleep(0.5)  # a few rescans of the thread list
        files = []
        err = None
        try:
            for _ in range(100):
                files.append(open(os.devnull))
        except OSError as e:
            err = repr(e)
        for f in files:
            f.close()
        b.stop()
        ev.set()
        for t in ts:
            t.join()
        emit({"mode": mode, "opened": len(files), "err": err, "left": leftovers()})
    ''')
    assert r["err"] is None and r["opened"] == 100, r
    assert r["left"] == {"posix_timers": 0, "perf_fds": 0, "samplers": 0}


def test_descriptors_reused_by_the_application_are_left_alone() -> None:
    """An application that closes every descriptor while running (python-daemon's DaemonContext
    does) and opens its own files, which get the engine's old numbers: stop() and the thread
    rescans must not close or touch them."""
    r = stress('''
        ev = threading.Event()
        ts = [threading.Thread(target=ev.wait) for _ in range(5)]
        for t in ts:
            t.start()
        mode = b.start(1_000_000, 10_000_000)
        time.sleep(0.2)
        os.closerange(3, 4096)
        app = [os.open(os.devnull, os.O_RDONLY) for _ in range(16)]
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass
        ev.set()
        for t in ts:
            t.join()
        time.sleep(0.3)  # rescans find the threads gone
        b.stop()
        closed = []
        for fd in app:
            try:
                os.fstat(fd)
            except OSError:
                closed.append(fd)
        emit({"mode": mode, "closed": closed})
    ''')
    assert r["closed"] == [], f"the engine closed the application's descriptors {r['closed']} ({r['mode']})"


EXIT_WITHOUT_STOP = """
import sys, threading, time
from asprof.engines import _builtin as b
def spin():
    x = 0
    while True:
        x += 1
def deep(n):
    return deep(n - 1) if n else spin()
for i in range(4):
    threading.Thread(target=deep, args=(i * 20,), daemon=True).start()
b.start(200_000, 200_000, 128, sys.argv[1])
time.sleep(0.2)
sys.exit(0)  # no stop(): finalization with daemon threads running and signals arriving
"""


@pytest.mark.parametrize("cpu_mode", ["auto", "process"])
def test_exit_without_stop_while_sampling(cpu_mode: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    runs = [subprocess.run([sys.executable, "-c", EXIT_WITHOUT_STOP, cpu_mode], env=env, capture_output=True,
                           text=True, timeout=60) for _ in range(4)]
    # never a crash or "Profiling timer expired" at exit
    assert [p.returncode for p in runs] == [0] * 4, [(p.returncode, p.stderr[-500:]) for p in runs]


def test_a_failed_collect_loses_nothing_silently() -> None:
    """collect() that fails (MemoryError here, from a tight RLIMIT_AS) must leave its samples for
    the next collect() or count them as lost: handed out + lost == stored + lost, always."""
    r = stress('''
        import resource
        def vmsize():
            with open("/proc/self/status") as f:
                for ln in f:
                    if ln.startswith("VmSize:"):
                        return int(ln.split()[1]) * 1024
            return 0
        stop_ev = threading.Event()
        ts = [threading.Thread(target=busy, args=(stop_ev,)) for _ in range(2)]
        for t in ts:
            t.start()
        b.start(1_000_000, 1_000_000)
        time.sleep(0.5)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        records, lost, failed = set(), 0, 0
        resource.setrlimit(resource.RLIMIT_AS, (vmsize(), hard))
        try:
            batch = b.collect()
        except MemoryError:
            failed = 1
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        if not failed:
            records |= distinct(decode(batch))
            lost += batch[4]
        stop_ev.set()
        for t in ts:
            t.join()
        b.stop()
        batch = b.collect()
        records |= distinct(decode(batch))
        lost += batch[4]
        st = b.stats()
        emit({"failed": failed, "out": len(records) + lost, "stored": st["samples"] + st["lost"]})
    ''')
    assert r["out"] == r["stored"], r
