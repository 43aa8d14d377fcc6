"""The built-in engine's C module (asprof.engines._builtin) on its own, per BUILTIN_API.md.

Each scenario runs in a child interpreter (signal handlers, timers and threads stay out of the
pytest process) that prints one JSON line; the assertions are made here. Needs no
async-profiler. Sample counts are only required to be non-zero (no timing assertions).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict

import pytest

ROOT = Path(__file__).resolve().parents[2]

try:
    from asprof.engines import _builtin
except ImportError as e:  # pragma: no cover - a build without the module
    pytest.skip(f"the built-in engine's C module is not built ({e})", allow_module_level=True)

needs_frames = pytest.mark.skipif(
    not getattr(_builtin, "python_frames", False),
    reason="the built-in engine captures no Python stacks on this interpreter",
)

RECORD = struct.Struct("<QIIBBH")

# Shared by every child: decoding collect() into per-sample dicts.
PRELUDE = '''
import json, os, signal, struct, sys, threading, time
from asprof.engines import _builtin as b
RECORD = struct.Struct("<QIIBBH")

def decode(batch):
    codes, natives, stacks, samples, lost = batch
    out = []
    for t, tid, sid, kind, state, res in RECORD.iter_unpack(samples):
        st = stacks[sid]
        frames = []
        for i in range(0, len(st), 2):
            ref, line = st[i], st[i + 1]
            if ref >= 0:
                name, qual, fn, first = codes[ref]
                frames.append(["py", qual, os.path.basename(fn), line])
            else:
                sym, lib = natives[-ref - 1]
                frames.append(["native", sym, lib, line])
        out.append({"t": t, "tid": tid, "kind": kind, "state": state, "res": res, "frames": frames})
    return out

def busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass

def collect_until(n, step, keep=lambda s: True, limit=30):
    """Runs step() and collects until n kept samples arrived (or limit seconds passed)."""
    got = []
    t0 = time.monotonic()
    while len(got) < n and time.monotonic() - t0 < limit:
        step()
        got += [s for s in decode(b.collect()) if keep(s)]
    return got

def spin_until(ev):
    x = 0
    while not ev.is_set():
        x += 1
    return x

def sampler_threads():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names.count("asprof-sampler")

def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\\n")
'''


def run(body: str, timeout: float = 60.0) -> Dict[str, Any]:
    """Runs PRELUDE + body in a fresh interpreter; returns the JSON object it emitted last."""
    code = PRELUDE + textwrap.dedent(body)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(ROOT))
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"child printed no result:\n{proc.stdout}\n{proc.stderr}"
    result: Dict[str, Any] = json.loads(lines[-1])
    return result


def test_module_constants() -> None:
    assert isinstance(_builtin.python_frames, bool)
    assert _builtin.compiled_version >> 16 == (sys.version_info[0] << 8) | sys.version_info[1]
    assert _builtin.running() is False


@needs_frames
def test_busy_thread_functions_names_and_lines() -> None:
    r = run('''
        def hot_leaf(ev):
            x = 0
            while not ev.is_set():
                x += 1          # HOT
            return x
        def hot_caller(ev):
            return hot_leaf(ev)
        ev = threading.Event()
        t = threading.Thread(target=hot_caller, args=(ev,), name="busy")
        mode = b.start(1_000_000, 0)
        t.start()
        deadline = time.monotonic() + 20
        samples = []
        while time.monotonic() < deadline:
            time.sleep(0.2)
            samples += [s for s in decode(b.collect()) if s["tid"] == t.native_id]
            if sum(1 for s in samples if any(f[1] == "hot_leaf" for f in s["frames"])) >= 20:
                break
        ev.set(); t.join(); b.stop()
        code = hot_leaf.__code__
        emit({"mode": mode, "samples": samples, "first": code.co_firstlineno, "n_lines": 5})
    ''')
    assert r["mode"] in ("perf-task-clock", "thread-cputime", "itimer")
    first, last = r["first"], r["first"] + r["n_lines"] - 1
    hot = [s for s in r["samples"] if any(f[1] == "hot_leaf" for f in s["frames"])]
    assert len(hot) >= 20
    # most samples stop in hot_leaf itself (the rest in Event.is_set, which it calls)
    leaf_in_hot = [s for s in hot if next(f for f in s["frames"] if f[0] == "py")[1] == "hot_leaf"]
    assert len(leaf_in_hot) >= len(hot) * 0.5
    for s in hot:
        py = [f for f in s["frames"] if f[0] == "py"]
        assert py[0][1] in ("hot_leaf", "Event.is_set", "is_set"), py  # no co_qualname before 3.11
    for s in leaf_in_hot:
        assert s["kind"] == 0 and s["state"] == 0 and s["res"] == 0
        py = [f for f in s["frames"] if f[0] == "py"]
        # Python frames leaf first: hot_leaf, then hot_caller, then threading's bootstrap frames
        assert py[0][1] == "hot_leaf" and py[1][1] == "hot_caller", py
        assert py[0][2] == "<string>"
        assert first <= py[0][3] <= last, (py[0], first, last)
        assert py[-1][1] == "Thread._bootstrap" or py[-1][1] == "_bootstrap"
        # the native leaf, when known, comes first
        assert all(f[0] == "py" for f in s["frames"][1:])
    # the loop's lines (while / x += 1) carry nearly all samples
    lines = [next(f for f in s["frames"] if f[0] == "py")[3] for s in leaf_in_hot]
    assert sum(1 for ln in lines if first + 2 <= ln <= first + 3) >= len(lines) * 0.8


@needs_frames
def test_thread_started_after_start_is_sampled() -> None:
    r = run('''
        b.start(1_000_000, 0, cpu_mode="thread")
        time.sleep(0.3)
        ev = threading.Event()
        def late_worker():
            spin_until(ev)
        t = threading.Thread(target=late_worker)
        t.start()
        got = []
        for _ in range(100):
            time.sleep(0.1)
            got += [s for s in decode(b.collect()) if s["tid"] == t.native_id]
            if len(got) >= 10:
                break
        stats = b.stats()
        ev.set(); t.join(); b.stop()
        emit({"n": len(got), "names": sorted({f[1] for s in got for f in s["frames"] if f[0] == "py"}),
              "timers": stats["timers"]})
    ''')
    assert r["n"] >= 10
    assert "late_worker" in r["names"]
    assert r["timers"] >= 2  # the main thread and the late one at least


def test_wall_samples_carry_thread_state() -> None:
    r = run('''
        ev = threading.Event()
        sleeper = threading.Thread(target=ev.wait)  # a futex wait
        spinner = threading.Thread(target=spin_until, args=(ev,))
        rfd, wfd = os.pipe()
        reader = threading.Thread(target=os.read, args=(rfd, 1))  # a blocking read (restarted)
        def nap():
            while not ev.is_set():
                time.sleep(0.05)  # clock_nanosleep (interrupted with EINTR, resumed by Python)
        napper = threading.Thread(target=nap)
        for t in (sleeper, spinner, reader, napper):
            t.start()
        b.start(0, 5_000_000)
        got = []
        def of(t):
            return [s["state"] for s in got if s["tid"] == t.native_id]
        for _ in range(200):
            time.sleep(0.1)
            got += decode(b.collect())
            if min(len(of(t)) for t in (sleeper, spinner, reader, napper)) >= 20:
                break
        b.stop(); ev.set(); os.write(wfd, b"x")
        for t in (sleeper, spinner, reader, napper):
            t.join()
        emit({"sleep": of(sleeper), "spin": of(spinner), "read": of(reader), "nap": of(napper),
              "kinds": sorted({s["kind"] for s in got}),
              "sampler_tids": [s["tid"] for s in got if s["tid"] not in
                               (threading.get_native_id(), sleeper.native_id, spinner.native_id, reader.native_id,
                                napper.native_id)]})
    ''')
    assert r["kinds"] == [1]  # CPU sampling is off
    # blocked threads are sleeping, whichever system call they wait in
    assert len(r["sleep"]) >= 20 and set(r["sleep"]) == {2}
    assert len(r["read"]) >= 20 and set(r["read"]) == {2}
    assert len(r["nap"]) >= 20 and r["nap"].count(2) >= len(r["nap"]) * 0.9
    assert len(r["spin"]) >= 20
    # a spinning thread is running or runnable nearly always (it may wait for the GIL now and then)
    assert r["spin"].count(1) >= len(r["spin"]) * 0.5
    assert r["sampler_tids"] == []  # the engine's own thread is never sampled


def test_foreign_sigprof_handler_is_chained() -> None:
    r = run('''
        hits = [0]
        def foreign(signum, frame):
            hits[0] += 1
        signal.signal(signal.SIGPROF, foreign)
        signal.setitimer(signal.ITIMER_PROF, 0.005, 0.005)
        mode = b.start(1_000_000, 10_000_000)
        h0 = hits[0]  # those came before our handler was in place
        ev = threading.Event()
        ours = []
        t0 = time.monotonic()
        while hits[0] - h0 < 20 or len(ours) < 20:
            end = time.monotonic() + 0.1
            while time.monotonic() < end:
                pass
            ours += decode(b.collect())
            if time.monotonic() - t0 > 30:
                break
        seen = hits[0] - h0  # before the counters: every hit since start came through our chain
        stats = b.stats()
        b.stop()
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        emit({"mode": mode, "hits": seen, "ours": len(ours), "chained": stats["chained"]})
    ''')
    assert r["mode"] in ("perf-task-clock", "thread-cputime")  # ITIMER_PROF is someone else's: never clobbered
    assert r["hits"] >= 20
    assert r["ours"] >= 20
    assert r["chained"] >= r["hits"]


def test_itimer_already_in_use_is_a_clear_error() -> None:
    r = run('''
        signal.signal(signal.SIGPROF, lambda *a: None)
        signal.setitimer(signal.ITIMER_PROF, 0.5, 0.5)
        try:
            b.start(1_000_000, 0, cpu_mode="process")
            err = None
        except OSError as e:
            err = str(e)
        emit({"err": err, "running": b.running(), "itimer": signal.getitimer(signal.ITIMER_PROF)[1]})
    ''')
    assert r["err"] is not None and "ITIMER_PROF" in r["err"]
    assert r["running"] is False
    assert r["itimer"] == 0.5  # left as it was


def test_process_mode_uses_itimer() -> None:
    r = run('''
        mode = b.start(2_000_000, 0, cpu_mode="process")
        got = collect_until(10, lambda: busy(0.1))
        b.stop()
        emit({"mode": mode, "n": len(got), "kinds": sorted({s["kind"] for s in got}),
              "itimer": signal.getitimer(signal.ITIMER_PROF)[0]})
    ''')
    assert r["mode"] == "itimer"
    assert r["n"] >= 10 and r["kinds"] == [0]
    assert r["itimer"] == 0.0  # disarmed by stop()


def test_stop_leaves_no_sampler_thread_and_collect_after_stop() -> None:
    r = run('''
        b.start(1_000_000, 10_000_000)
        before = sampler_threads()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            pass
        s_run = b.stats()
        b.stop()
        after = sampler_threads()
        s_stop = b.stats()
        first = decode(b.collect())
        second = decode(b.collect())
        b.stop()  # idempotent
        emit({"before": before, "after": after, "running": b.running(), "timers_run": s_run["timers"],
              "timers_stop": s_stop["timers"], "first": len(first), "second": len(second)})
    ''')
    assert r["before"] == 1 and r["after"] == 0
    assert r["running"] is False
    assert r["timers_run"] >= 1 and r["timers_stop"] == 0
    assert r["first"] > 0  # what was recorded before stop() stays collectable
    assert r["second"] == 0  # and is handed out once


@needs_frames
def test_forked_child_starts_afresh() -> None:
    r = run('''
        b.start(1_000_000, 10_000_000)
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                res = {"running_after_fork": b.running(), "sampler_after_fork": sampler_threads(),
                       "inherited": len(decode(b.collect()))}
                def child_work():
                    x = 0
                    for i in range(10**9):
                        x += i
                        if i % 10000 == 0 and time.monotonic() > deadline:
                            break
                res["mode"] = b.start(1_000_000, 0)
                got = []
                t0 = time.monotonic()
                while len(got) < 10 and time.monotonic() - t0 < 30:
                    deadline = time.monotonic() + 0.1
                    child_work()
                    got += decode(b.collect())
                b.stop()
                res["n"] = len(got)
                res["tids"] = sorted({s["tid"] for s in got})
                res["pid"] = os.getpid()
                res["names"] = sorted({f[1] for s in got for f in s["frames"] if f[0] == "py"})
                os.write(wr, json.dumps(res).encode())
            finally:
                os._exit(0)
        os.close(wr)
        data = b""
        while True:
            chunk = os.read(rd, 65536)
            if not chunk:
                break
            data += chunk
        os.waitpid(pid, 0)
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass
        parent = decode(b.collect())
        running = b.running()
        b.stop()
        emit({"child": json.loads(data), "parent_n": len(parent), "parent_running": running,
              "parent_tids": sorted({s["tid"] for s in parent}), "pid": os.getpid()})
    ''')
    child = r["child"]
    assert child["running_after_fork"] is False
    assert child["sampler_after_fork"] == 0
    assert child["inherited"] == 0  # the parent's samples are not the child's
    assert child["mode"] in ("perf-task-clock", "thread-cputime")
    assert child["n"] >= 10 and child["tids"] == [child["pid"]]
    assert "child_work" in child["names"]
    assert r["parent_running"] is True and r["parent_n"] > 0
    assert child["pid"] not in r["parent_tids"]


def test_stats_counters_move() -> None:
    r = run('''
        s0 = b.stats()
        b.start(1_000_000, 10_000_000)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            end = time.monotonic() + 0.1
            while time.monotonic() < end:
                pass
            s1 = b.stats()
            if s1["samples"] >= 20:
                break
        b.collect()
        s2 = b.stats()
        b.stop()
        emit({"s0": s0, "s1": s1, "s2": s2})
    ''')
    s0, s1, s2 = r["s0"], r["s1"], r["s2"]
    for key in ("signals", "samples", "lost", "chained", "no_python", "truncated", "handler_calls",
                "handler_ns", "threads", "timers", "memory_bytes"):
        assert key in s0, key
    assert s0["samples"] == 0 and s0["handler_calls"] == 0
    # samples: the handler's, and the sampler's wall samples without a signal (an idle thread's
    # repeated, a busy thread's taken from its latest CPU sample)
    by_sampler = s1["wall_repeated"] + s1["wall_from_cpu"]
    assert s1["samples"] >= 20 and s1["signals"] + by_sampler >= s1["samples"]
    assert s1["handler_calls"] + by_sampler >= s1["samples"] and s1["handler_ns"] > 0
    assert s1["threads"] >= 1 and s1["timers"] >= 1 and s1["wall_sent"] >= 1
    assert s2["collects"] == 1
    assert s1["memory_bytes"] > 0  # the store's resident pages, given back after each collect


def test_collect_format_is_self_contained() -> None:
    r = run('''
        b.start(1_000_000, 5_000_000)
        t0 = time.monotonic()
        batches = []
        while time.monotonic() - t0 < 30 and sum(len(x[3]) for x in batches) < 20 * 50:
            end = time.monotonic() + 0.1
            while time.monotonic() < end:
                pass
            batches.append(b.collect())
        b.stop()
        emit({"batches": [[c, n, [list(s) for s in st], smp.hex(), lost] for c, n, st, smp, lost in batches]})
    ''')
    total = 0
    for codes, natives, stacks, hexed, lost in r["batches"]:
        samples = bytes.fromhex(hexed)
        assert len(samples) % RECORD.size == 0 and lost >= 0
        for code in codes:
            assert isinstance(code[0], str) and isinstance(code[1], str) and isinstance(code[3], int)
        for sym, lib in natives:
            assert sym and isinstance(lib, str)
        used_codes, used_natives = set(), set()
        for st in stacks:
            assert len(st) % 2 == 0
            for i in range(0, len(st), 2):
                ref, line = st[i], st[i + 1]
                if ref >= 0:
                    assert ref < len(codes) and line >= 0
                    used_codes.add(ref)
                else:
                    assert i == 0 and line == 0  # the native leaf only, first
                    assert -ref - 1 < len(natives)
                    used_natives.add(-ref - 1)
        assert used_codes == set(range(len(codes)))  # no definition without a use
        assert used_natives == set(range(len(natives)))
        for t, tid, sid, kind, state, res in RECORD.iter_unpack(samples):
            total += 1
            assert sid < len(stacks) and tid > 0 and t > 0 and res == 0
            assert (kind, state) in ((0, 0), (1, 1), (1, 2))
    assert total >= 20


def test_bad_arguments() -> None:
    r = run('''
        errs = []
        for args, kw in [((0, 0), {}), ((-1, 0), {}), ((1000, 0), {}), ((1_000_000, 0), {"cpu_mode": "x"}),
                         ((1_000_000, 0), {"max_frames": 0})]:
            try:
                b.start(*args, **kw)
                errs.append(None)
                b.stop()
            except ValueError as e:
                errs.append(str(e))
        b.start(10_000_000, 0)
        try:
            b.start(10_000_000, 0)
            again = None
        except RuntimeError as e:
            again = str(e)
        b.stop()
        emit({"errs": errs, "again": again})
    ''')
    assert all(r["errs"]), r["errs"]
    assert r["again"] and "already running" in r["again"]


def test_handler_cost_is_measurable() -> None:
    r = run('''
        def deep(n):
            return b._bench(2000) if n == 0 else deep(n - 1)
        emit({"ns": deep(10), "samples": b.stats()["samples"], "left": len(b.collect()[3])})
    ''')
    assert r["ns"] > 0
    assert r["samples"] == 0 and r["left"] == 0  # the bench leaves nothing behind


def test_handler_installed_after_start_is_chained_and_ours_put_back() -> None:
    r = run('''
        b.start(1_000_000, 0, cpu_mode="thread")
        hits = [0]
        def late(signum, frame):
            hits[0] += 1
        signal.signal(signal.SIGPROF, late)  # replaces ours; the sampler puts ours back in front
        reinstalled = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            time.sleep(0.05)
            reinstalled = b.stats()["handler_reinstalled"]
            if reinstalled:
                break
        b.collect()
        before = hits[0]
        for _ in range(5):
            os.kill(os.getpid(), signal.SIGPROF)  # not ours: goes to the late handler
        time.sleep(0.05)  # lets the Python-level handler run
        got = collect_until(10, lambda: busy(0.1))
        b.stop()
        emit({"reinstalled": reinstalled, "forwarded": hits[0] - before, "ours": len(got)})
    ''')
    assert r["reinstalled"] >= 1
    assert r["forwarded"] >= 1  # standard signals may merge while pending: at least one arrives
    assert r["ours"] >= 10


@needs_frames
def test_max_frames_keeps_the_leaf_side() -> None:
    r = run('''
        def deep(n):
            if n == 0:
                end = time.monotonic() + 0.1
                while time.monotonic() < end:
                    pass
                return 0
            return deep(n - 1)
        b.start(1_000_000, 0, max_frames=5)
        got = collect_until(10, lambda: deep(40), keep=lambda s: any(f[1] == "deep" for f in s["frames"]))
        stats = b.stats()
        b.stop()
        emit({"depths": [sum(1 for f in s["frames"] if f[0] == "py") for s in got],
              "names": [[f[1] for f in s["frames"] if f[0] == "py"] for s in got], "truncated": stats["truncated"]})
    ''')
    assert r["depths"] and max(r["depths"]) <= 5
    assert r["truncated"] >= 1
    assert all(names[-1] == "deep" for names in r["names"] if len(names) == 5)  # the root side is cut


@needs_frames
@pytest.mark.parametrize("cpu_mode, expected", [("thread", "thread-cputime"), ("perf", "perf-task-clock")])
def test_per_thread_cpu_modes(cpu_mode: str, expected: str) -> None:
    r = run(f'''
        try:
            mode = b.start(1_000_000, 0, cpu_mode={cpu_mode!r})
        except OSError as e:
            emit({{"unavailable": str(e)}})
            sys.exit(0)
        ev = threading.Event()
        def mode_worker():
            spin_until(ev)
        t = threading.Thread(target=mode_worker)
        t.start()
        got = []
        t0 = time.monotonic()
        while len(got) < 20 and time.monotonic() - t0 < 30:
            time.sleep(0.1)
            got += [s for s in decode(b.collect()) if s["tid"] == t.native_id]
        ev.set(); t.join(); b.stop()
        emit({{"mode": mode, "n": len(got), "names": sorted({{f[1] for s in got for f in s["frames"] if f[0] == "py"}}),
               "timers": b.stats()["timers"]}})
    ''')
    if "unavailable" in r:
        pytest.skip(f"{cpu_mode} mode unavailable here: {r['unavailable']}")
    assert r["mode"] == expected
    assert r["n"] >= 20 and "mode_worker" in r["names"]
    assert r["timers"] == 0  # every per-thread source gone after stop()


def test_perf_fds_closed_by_the_application_are_never_closed_again() -> None:
    r = run('''
        try:
            b.start(1_000_000, 0, cpu_mode="perf")
        except OSError as e:
            emit({"unavailable": str(e)})
            sys.exit(0)
        def link(fd):
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return ""
        perf = [int(fd) for fd in os.listdir("/proc/self/fd") if link(fd) == "anon_inode:[perf_event]"]
        for fd in perf:
            os.close(fd)  # as a daemon's closerange would
        mine = [os.open("/dev/null", os.O_RDONLY) for _ in perf]  # likely the same numbers
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.4:  # a few rescans
            pass
        b.stop()
        still_open = []
        for fd in mine:
            try:
                os.fstat(fd)
                still_open.append(fd)
            except OSError:
                pass
        emit({"perf": perf, "mine": mine, "still_open": still_open, "timers": b.stats()["timers"]})
    ''')
    if "unavailable" in r:
        pytest.skip(f"perf mode unavailable here: {r['unavailable']}")
    assert r["perf"]
    assert r["still_open"] == r["mine"]
    assert r["timers"] == 0


def test_agent_threads_named_asprof_are_never_sampled() -> None:
    r = run('''
        import ctypes
        libc = ctypes.CDLL(None)
        ev = threading.Event()
        def own():
            libc.prctl(15, b"asprof-collect", 0, 0, 0)  # PR_SET_NAME, as the agent's threads do
            spin_until(ev)
        def app():
            spin_until(ev)
        mode = b.start(1_000_000, 10_000_000)
        t_own = threading.Thread(target=own)
        t_app = threading.Thread(target=app)
        t_own.start(); t_app.start()
        time.sleep(0.5)  # its name is seen at the next rescans
        b.collect()
        got = []
        t0 = time.monotonic()
        while sum(1 for s in got if s["tid"] == t_app.native_id) < 20 and time.monotonic() - t0 < 30:
            time.sleep(0.1)
            got += decode(b.collect())
        excluded = b.stats()["excluded_threads"]
        ev.set(); t_own.join(); t_app.join(); b.stop()
        emit({"mode": mode, "own": sum(1 for s in got if s["tid"] == t_own.native_id),
              "app": sum(1 for s in got if s["tid"] == t_app.native_id), "excluded": excluded})
    ''')
    if r["mode"] == "itimer":
        pytest.skip("process-wide ITIMER_PROF picks any thread")
    assert r["app"] >= 20
    assert r["own"] == 0
    assert r["excluded"] >= 1


@needs_frames
def test_idle_threads_are_not_woken_for_every_wall_sample() -> None:
    r = run('''
        ev = threading.Event()
        def idle_waiter():
            ev.wait()
        ts = [threading.Thread(target=idle_waiter) for _ in range(20)]
        for t in ts:
            t.start()
        b.start(0, 5_000_000)
        got = collect_until(20 * 40, lambda: time.sleep(0.1))
        st = b.stats()
        b.stop(); ev.set()
        for t in ts:
            t.join()
        ids = {t.native_id for t in ts}
        mine = [s for s in got if s["tid"] in ids]
        emit({"n": len(mine), "states": sorted({s["state"] for s in mine}),
              "with_frames": sum(1 for s in mine if any(f[1] == "idle_waiter" for f in s["frames"])),
              "sent": st["wall_sent"], "repeated": st["wall_repeated"]})
    ''')
    assert r["n"] >= 20 * 20
    assert r["states"] == [2]
    assert r["with_frames"] == r["n"]  # a repeated sample carries the thread's stack like a signalled one
    assert r["repeated"] > r["sent"]  # most idle ticks cost no signal
