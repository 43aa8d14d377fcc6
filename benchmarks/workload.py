"""The benchmark child process: one configuration, one fresh interpreter.

``benchmarks/run.py`` starts this script once per measurement, so that
async-profiler's process-global state never carries over from one
configuration to the next. It prints one JSON object on its last line.

Modes (first argument):

- ``calibrate``: how many work units per second the two busy threads do,
  unprofiled.
- ``run``: the mixed workload under one profiler configuration
  (``--profiler none|import|aprof|agent``), timed between the profiler's
  start and its stop, with the CPU time of every thread.
- ``tick``: ``NativeEngine`` rotated every second under the workload: the
  duration of each ``tick()`` and the gap between consecutive recordings.

The workload: the main thread and a second thread each do the same number
of work units (pure-Python loops, dict and sort work, zlib, json and
hashlib calls, the latter releasing the GIL), while a third thread sleeps.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
import zlib
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------- the work

_rng = random.Random(2)
_WORDS = [("".join(_rng.choice("abcdefghij") for _ in range(_rng.randint(3, 9)))) for _ in range(500)]
# Compressible but not trivial: text-like bytes.
DATA = (" ".join(_rng.choice(_WORDS) for _ in range(12000))).encode()[:65536]
OBJ = {
    "items": [{"id": i, "name": _WORDS[i % len(_WORDS)], "tags": _WORDS[i % 7:i % 7 + 3],
               "score": i * 0.5} for i in range(150)],
    "meta": {"version": 3, "ok": True},
}


def _py_part() -> int:
    s = 0
    for i in range(3000):
        s += (i * i) % 7
    d = {w + str(i): i for i, w in enumerate(_WORDS[:200])}
    ordered = sorted(d.items(), key=lambda kv: (-kv[1] % 13, kv[0]))
    return s + len(ordered)


def work_unit() -> int:
    """About a millisecond of mixed pure-Python and native work."""
    n = _py_part()
    packed = zlib.compress(DATA, 6)
    n += len(zlib.decompress(packed))
    n += len(json.loads(json.dumps(OBJ))["items"])
    n += len(hashlib.sha256(DATA).digest())
    return n


# ---------------------------------------------------------------- measuring

def thread_names() -> Dict[int, str]:
    """The OS name (comm) of every live thread of this process."""
    out: Dict[int, str] = {}
    for name in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{name}/comm") as f:
                out[int(name)] = f.read().strip()
        except OSError:
            pass
    return out


_COMMS: Dict[int, str] = {}


def _comm(tid: int) -> str:
    """The thread's name when read_tasks last saw it."""
    return _COMMS.get(tid, "(ended)")


def read_tasks() -> Dict[int, int]:
    """CPU time (ns) of every live thread of this process, from /proc/self/task."""
    out: Dict[int, int] = {}
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        try:
            with open(f"/proc/self/task/{name}/comm") as f:
                _COMMS[tid] = f.read().strip()
        except OSError:
            pass
        try:
            with open(f"/proc/self/task/{name}/schedstat") as f:
                out[tid] = int(f.read().split()[0])
            continue
        except (OSError, ValueError, IndexError):
            pass
        try:  # no schedstat: utime + stime in clock ticks
            with open(f"/proc/self/task/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[tid] = (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return out


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


class Workers:
    """The busy second thread and the sleeping one; both stay alive until close()
    so that their CPU time can still be read from /proc/self/task."""

    def __init__(self, units: int) -> None:
        self.units = units
        self.go = threading.Event()
        self.busy_done = threading.Event()
        self.exit = threading.Event()
        # daemon threads: a failing measurement must not leave the process hanging
        self.busy = threading.Thread(target=self._busy, name="busy", daemon=True)
        self.sleeper = threading.Thread(target=self._sleep, name="sleeper", daemon=True)
        self.busy.start()
        self.sleeper.start()

    def _busy(self) -> None:
        self.go.wait()
        for _ in range(self.units):
            work_unit()
        self.busy_done.set()
        self.exit.wait()

    def _sleep(self) -> None:
        while not self.exit.is_set():
            time.sleep(0.2)

    def run(self) -> float:
        """Both busy threads do their units; returns the wall time."""
        t0 = time.perf_counter()
        self.go.set()
        for _ in range(self.units):
            work_unit()
        self.busy_done.wait()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.go.set()
        self.exit.set()
        self.busy.join()
        self.sleeper.join()


# ---------------------------------------------------------------- profilers

class CtypesProfiler:
    """async-profiler driven directly through its C API: no agent, one recording."""

    def __init__(self, lib_path: str, command: str, file: str) -> None:
        import ctypes

        self.lib = ctypes.CDLL(lib_path)
        self.lib.asprof_execute.restype = ctypes.c_char_p
        self.lib.asprof_execute.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        self.lib.asprof_init()
        self.file = file
        # async-profiler's threads inherit the name of the thread that starts them:
        # name them as asprof's native core does, so that they are told apart.
        libc = ctypes.CDLL(None)
        old = ctypes.create_string_buffer(16)
        libc.prctl(16, old, 0, 0, 0)  # PR_GET_NAME
        libc.prctl(15, b"async-profiler", 0, 0, 0)  # PR_SET_NAME
        try:
            err = self.lib.asprof_execute(f"{command},file={file},log=/dev/null,loglevel=warn".encode(), None)
        finally:
            libc.prctl(15, old.value, 0, 0, 0)
        if err is not None:
            raise RuntimeError(f"async-profiler start failed: {err.decode()}")

    def stop(self) -> None:
        err = self.lib.asprof_execute(b"stop,log=/dev/null,loglevel=warn", None)
        if err is not None:
            raise RuntimeError(f"async-profiler stop failed: {err.decode()}")


def count_samples(paths: List[str], window: Tuple[int, int]) -> Dict[str, int]:
    """Samples in the recordings: all of them, and those taken in the window."""
    sys.path.insert(0, HERE)
    from sample_count import count_events

    out = {"cpu_samples": 0, "wall_samples": 0, "cpu_samples_window": 0, "wall_samples_window": 0,
           "chunks": 0, "files": len(paths)}
    for p in paths:
        with open(p, "rb") as f:
            total, cs = count_events(f.read(), window)
        out["cpu_samples"] += total.get("jdk.ExecutionSample", 0)
        out["wall_samples"] += total.get("profiler.WallClockSample", 0)
        for c in cs:
            out["cpu_samples_window"] += c.in_window.get("jdk.ExecutionSample", 0)
            out["wall_samples_window"] += c.in_window.get("profiler.WallClockSample", 0)
        out["chunks"] += len(cs)
    return out


def mode_run(a: argparse.Namespace) -> Dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="asprof-bench-", dir=a.tmp)
    workers = Workers(a.units)
    # An idle thread that waits like the agent thread does, so that the ctypes
    # baseline has as many threads for wall-clock sampling as the agent.
    idle_exit = threading.Event()
    idle = None
    if a.profiler == "aprof" and a.idle_thread:
        idle = threading.Thread(target=lambda: idle_exit.wait(), name="idle", daemon=True)
        idle.start()
    gc.collect()
    out: Dict[str, Any] = {"rss_before_kb": status_kb("VmRSS")}
    t0 = time.perf_counter()
    if a.profiler in ("import", "agent"):
        import asprof

        # and the names that starting needs (`import asprof` alone may be lazy)
        asprof.Profiler, asprof.ProfilerOptions, asprof.LocalReporter  # noqa: B018
    out["import_s"] = time.perf_counter() - t0
    out["rss_imported_kb"] = status_kb("VmRSS")
    running = prof = None
    t0 = time.perf_counter()
    if a.profiler == "aprof":
        prof = CtypesProfiler(a.lib, a.command, os.path.join(tmp, "recording.jfr"))
    elif a.profiler == "agent":
        options = asprof.ProfilerOptions(**json.loads(a.opts))
        if a.command and options.start_command() != a.command:
            raise SystemExit(f"command mismatch: {options.start_command()!r} != {a.command!r}")
        running = asprof.Profiler(reporter=asprof.LocalReporter(os.path.join(tmp, "profiles")),
                                  reporting_interval=a.interval, options=options,
                                  library_path=a.lib).start()
    out["start_s"] = time.perf_counter() - t0
    out["rss_started_kb"] = status_kb("VmRSS")
    python_tids = {t.native_id for t in threading.enumerate()}
    agent_tids = {t.native_id for t in threading.enumerate() if t.name == "asprof-agent"}

    cpu0 = time.process_time()
    tasks0 = read_tasks()
    window0 = time.time_ns()
    wall = workers.run()
    window1 = time.time_ns()
    tasks1 = read_tasks()
    cpu1 = time.process_time()
    names = thread_names()
    out["rss_kb"] = status_kb("VmRSS")
    out["hwm_kb"] = status_kb("VmHWM")

    t0 = time.perf_counter()
    if running is not None:
        if not running.stop(timeout=60):
            raise SystemExit("agent did not stop in time")
    elif prof is not None:
        prof.stop()
    out["stop_s"] = time.perf_counter() - t0
    workers.close()
    idle_exit.set()
    if idle is not None:
        idle.join()

    python_tids |= {t.native_id for t in threading.enumerate()}
    delta = {tid: ns - tasks0.get(tid, 0) for tid, ns in tasks1.items()}
    # Whose threads: async-profiler's are named "async-profiler" (by asprof's core, and by
    # CtypesProfiler above); asprof-agent is the agent's Python thread; any other thread that
    # is not a Python thread was started by asprof's native code (e.g. the Python-stack drainer).
    aprof_tids = [t for t in delta if names.get(t) == "async-profiler" and t not in python_tids]
    native_tids = [t for t in delta if t not in python_tids and t not in aprof_tids]
    out["wall_s"] = wall
    out["cpu_s"] = cpu1 - cpu0
    out["agent_thread_cpu_s"] = sum(v for t, v in delta.items() if t in agent_tids) / 1e9
    out["agent_native_cpu_s"] = sum(delta[t] for t in native_tids) / 1e9
    out["agent_cpu_s"] = out["agent_thread_cpu_s"] + out["agent_native_cpu_s"]
    out["aprof_threads"] = len(aprof_tids)
    out["agent_native_threads"] = len(native_tids)
    out["aprof_cpu_s"] = sum(delta[t] for t in aprof_tids) / 1e9
    out["tasks_cpu_s"] = sum(delta.values()) / 1e9
    if a.count:
        paths = []
        for root, _dirs, files in os.walk(tmp):
            paths += [os.path.join(root, f) for f in files if f.endswith(".jfr")]
        out.update(count_samples(sorted(paths), (window0, window1)))
    out["python_threads"] = len(python_tids)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------- engines comparison

class _BuiltinAlone:
    """The built-in engine's C module driven by hand (no agent): start, a Python thread
    collecting every second as the agent's tick would, stop."""

    def __init__(self, cpu_ns: int, wall_ns: int, inert: bool = False) -> None:
        from asprof.engines import _builtin  # type: ignore[attr-defined]

        self.mod = _builtin
        _builtin._set_inert(inert)  # the signal floor: signals taken, nothing recorded
        self.mode = _builtin.start(cpu_ns, wall_ns)
        self.samples = 0
        self.quit = threading.Event()
        self.thread = threading.Thread(target=self._collect, name="builtin-collector", daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        while not self.quit.wait(1.0):
            self.samples += len(self.mod.collect()[3]) // 20

    def stop(self) -> None:
        self.mod.stop()
        self.quit.set()
        self.thread.join()
        self.samples += len(self.mod.collect()[3]) // 20


class _PySpy:
    """py-spy attached from outside, as users run it: ``py-spy record --pid P``."""

    def __init__(self, exe: str, rate: int, nonblocking: bool, out: str) -> None:
        import subprocess

        t0 = time.perf_counter()
        cmd = [exe, "record", "--pid", str(os.getpid()), "--rate", str(rate), "--format", "raw", "-o", out]
        if nonblocking:
            cmd.append("--nonblocking")
        self.out = out
        self.err = open(out + ".stderr", "w+")  # closed in stop()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.err)
        self.started = time.perf_counter()
        self.spawn_s = self.started - t0
        # py-spy says nothing when it has attached (its "Sampling process" line needs a terminal): it
        # takes ~30 ms here; give it 0.5 s, and make sure it is still there.
        time.sleep(0.5)
        if self.proc.poll() is not None:
            self.err.seek(0)
            raise SystemExit(f"py-spy exited ({self.proc.returncode}): {self.err.read()[-2000:]}")
        self.stopped = self.started

    def cpu_ns(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/schedstat") as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def hwm_kb(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return -1

    def stop(self) -> Tuple[int, str]:
        import signal

        self.stopped = time.perf_counter()
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        self.err.seek(0)
        err = self.err.read()
        self.err.close()
        samples = 0
        try:
            with open(self.out) as f:
                for line in f:
                    count = line.rstrip("\n").rsplit(" ", 1)[-1]
                    if count.isdigit():
                        samples += int(count)
        except OSError:
            pass
        return samples, err


def _builtin_stats() -> Dict[str, int]:
    try:
        from asprof.engines import _builtin  # type: ignore[attr-defined]
    except ImportError:
        return {}
    return dict(_builtin.stats())


def mode_engine(a: argparse.Namespace) -> Dict[str, Any]:
    """One profiler (or none) around the workload; its cost in the process and outside it."""
    if a.affinity >= 0:  # before any thread starts: every thread of the process inherits the one CPU
        os.sched_setaffinity(0, {a.affinity})
    tmp = tempfile.mkdtemp(prefix="asprof-bench-", dir=a.tmp)
    workers = Workers(a.units)
    cpu_ns = round(a.cpu_interval * 1e9)
    wall_ns = round(a.wall_interval * 1e9)
    # Same threads for every configuration: the agent's asprof-agent thread is stood in for by an idle one.
    idle_exit = threading.Event()
    idle = None
    if a.profiler not in ("builtin", "agent"):
        idle = threading.Thread(target=lambda: idle_exit.wait(), name="idle", daemon=True)
        idle.start()
    workload_tids = {t.native_id for t in threading.enumerate()}
    gc.collect()
    out: Dict[str, Any] = {"rss_before_kb": status_kb("VmRSS"), "profiler": a.profiler}
    prof: Any = None
    t0 = time.perf_counter()
    if a.profiler == "aprof":
        wall = f",wall={max(1, round(a.wall_interval * 1e3))}ms" if a.wall_interval > 0 else ""
        command = f"start,event=cpu,interval={cpu_ns}{wall},jfr,cstack=dwarf,alluser"
        prof = CtypesProfiler(a.lib, command, os.path.join(tmp, "recording.jfr"))
    elif a.profiler in ("builtin", "agent"):
        import asprof

        kw: Dict[str, Any] = {"cpu_interval": a.cpu_interval, "wall_interval": a.wall_interval or None}
        if a.profiler == "builtin":
            kw["engine"] = "builtin"
        prof = asprof.Profiler(reporter=asprof.LocalReporter(os.path.join(tmp, "profiles")),
                               reporting_interval=a.interval, options=asprof.ProfilerOptions(**kw),
                               library_path=a.lib if a.profiler == "agent" else None).start()
    elif a.profiler == "builtin-c":
        prof = _BuiltinAlone(cpu_ns, wall_ns)
    elif a.profiler == "floor":
        prof = _BuiltinAlone(cpu_ns, 0, inert=True)
    elif a.profiler in ("pyspy", "pyspy-nb"):
        prof = _PySpy(a.pyspy, a.rate, a.profiler == "pyspy-nb", os.path.join(tmp, "pyspy.txt"))
    elif a.profiler == "pyroscope":
        import pyroscope

        pyroscope.configure(application_name=f"asprof-bench-{os.getpid()}", server_address=a.sink,
                            sample_rate=a.rate, oncpu=True, gil_only=False, enable_logging=False)
    prof_t0 = time.perf_counter()
    out["start_s"] = prof.spawn_s if isinstance(prof, _PySpy) else prof_t0 - t0  # (py-spy: the spawn alone)
    out["rss_started_kb"] = status_kb("VmRSS")
    time.sleep(0.2)  # let the profiler's threads settle (py-spy: attached; timers armed)
    if a.sync:  # run.py's pairs: both processes of a pair start their timed window together
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()

    stats0 = _builtin_stats() if a.profiler.startswith("builtin") or a.profiler == "floor" else {}
    ext0 = prof.cpu_ns() if isinstance(prof, _PySpy) else 0
    cpu0 = time.process_time()
    tasks0 = read_tasks()
    window0 = time.time_ns()
    wall_s = workers.run()
    window1 = time.time_ns()
    tasks1 = read_tasks()
    cpu1 = time.process_time()
    ext1 = prof.cpu_ns() if isinstance(prof, _PySpy) else 0
    stats1 = _builtin_stats() if a.profiler.startswith("builtin") or a.profiler == "floor" else {}
    out["rss_kb"] = status_kb("VmRSS")
    out["hwm_kb"] = status_kb("VmHWM")
    out["ext_hwm_kb"] = prof.hwm_kb() if isinstance(prof, _PySpy) else 0

    t0 = time.perf_counter()
    samples = -1
    if a.profiler in ("builtin", "agent"):
        if not prof.stop(timeout=60):
            raise SystemExit("agent did not stop in time")
    elif a.profiler in ("aprof", "builtin-c", "floor"):
        prof.stop()
        if a.profiler == "builtin-c":
            samples = prof.samples
            bench = getattr(prof.mod, "_bench", None)
            if bench is not None:  # the handler's work outside a signal, warm caches (fastest of 5 batches)
                out["bench_handler_ns"] = bench(20000)
    elif isinstance(prof, _PySpy):
        samples, err = prof.stop()
        out["pyspy_stderr"] = err[-300:]
    elif a.profiler == "pyroscope":
        import pyroscope

        pyroscope.shutdown()
    prof_t1 = time.perf_counter()
    out["stop_s"] = prof_t1 - t0
    out["prof_span_s"] = (prof.stopped - prof.started) if isinstance(prof, _PySpy) else prof_t1 - prof_t0
    workers.close()
    idle_exit.set()
    if idle is not None:
        idle.join()

    delta = {tid: ns - tasks0.get(tid, 0) for tid, ns in tasks1.items()}
    out["wall_s"] = wall_s
    out["window_s"] = (window1 - window0) / 1e9
    out["cpu_s"] = cpu1 - cpu0
    # the profiler's own threads: every thread of the process that is not the workload's
    out["prof_threads"] = len([t for t in delta if t not in workload_tids])
    out["prof_thread_cpu_s"] = sum(v for t, v in delta.items() if t not in workload_tids) / 1e9
    by_name: Dict[str, float] = {}
    for t, v in delta.items():
        if t not in workload_tids:
            by_name[_comm(t)] = by_name.get(_comm(t), 0.0) + v / 1e9
    out["prof_thread_cpu_by_name"] = by_name
    out["ext_cpu_s"] = (ext1 - ext0) / 1e9  # a profiler in another process (py-spy)
    out["samples_total"] = samples
    if stats1:
        out["stats"] = stats1
        for k in ("samples", "handler_calls", "handler_ns", "lost", "signals"):
            out[f"d_{k}"] = stats1.get(k, 0) - stats0.get(k, 0)
    paths = []
    for root, _dirs, files in os.walk(tmp):
        paths += [os.path.join(root, f) for f in files if f.endswith(".jfr")]
    if paths:
        try:
            out.update(count_samples(sorted(paths), (window0, window1)))
        except (ValueError, OSError, struct.error) as e:
            out["count_error"] = repr(e)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def mode_calibrate(a: argparse.Namespace) -> Dict[str, Any]:
    workers = Workers(a.units)
    wall = workers.run()
    workers.close()
    return {"units_per_s": a.units / wall, "wall_s": wall}


def mode_tick(a: argparse.Namespace) -> Dict[str, Any]:
    """The agent's rotation, driven by hand from this (main) thread while two
    threads do the workload and a third sleeps."""
    sys.path.insert(0, HERE)
    from sample_count import read_chunks

    import asprof
    from asprof.engines.asyncprofiler import NativeEngine

    options = asprof.ProfilerOptions(**json.loads(a.opts))
    stop = threading.Event()

    big = DATA * 32  # 2 MiB: hashing it releases the GIL for ~5 ms

    def busy() -> None:
        if a.load == "nogil":  # CPU-bound, but almost always without the GIL
            while not stop.is_set():
                hashlib.sha256(big).digest()
        else:
            while not stop.is_set():
                work_unit()

    def sleeper() -> None:
        while not stop.is_set():
            time.sleep(0.2)

    threads = [threading.Thread(target=busy, daemon=True), threading.Thread(target=busy, daemon=True),
               threading.Thread(target=sleeper, daemon=True)]
    for t in threads:
        t.start()
    engine = NativeEngine(options, a.lib)
    engine.start()
    ticks_ms: List[float] = []
    tick_cpu_ms: List[float] = []
    sizes: List[int] = []
    recordings: List[bytes] = []
    try:
        for _ in range(a.ticks):
            time.sleep(a.interval)
            c0 = time.thread_time()
            t0 = time.perf_counter()
            res = engine.tick()
            t1 = time.perf_counter()
            c1 = time.thread_time()
            if res.recording is None or res.restart_error is not None:
                raise SystemExit(f"tick failed: {res.restart_error}")
            ticks_ms.append((t1 - t0) * 1e3)
            tick_cpu_ms.append((c1 - c0) * 1e3)
            sizes.append(len(res.recording))
            recordings.append(res.recording)
        last = engine.stop()
        if last:
            recordings.append(last)
    finally:
        engine.close()
        stop.set()
        for t in threads:
            t.join()
    chunks = [read_chunks(r, keep_times=True) for r in recordings]
    # The recording gap: from the end of one chunk (async-profiler takes it
    # after its samplers stopped and its buffers were flushed) to the start of
    # the next (taken before its samplers start).
    gaps_ms = [(nxt[0].start_ns - prev[-1].end_ns) / 1e6 for prev, nxt in zip(chunks, chunks[1:])]
    # The sample gap: from the last CPU sample before a rotation to the first after it.
    es = "jdk.ExecutionSample"
    # (a report may open with a settings chunk, which has no samples)
    firsts = [next((c.first_ns[es] for c in cs if es in c.first_ns), None) for cs in chunks]
    lasts = [next((c.last_ns[es] for c in reversed(cs) if es in c.last_ns), None) for cs in chunks]
    sample_gaps_ms = [(f - last) / 1e6 for last, f in zip(lasts, firsts[1:]) if last is not None and f is not None]
    # For comparison: the spacing of consecutive CPU samples inside the recordings.
    spacing_ms: List[float] = []
    for cs in chunks:
        for c in cs:
            ts = c.times.get(es, [])
            spacing_ms += [(b - a_) / 1e6 for a_, b in zip(ts, ts[1:])]
    spacing_ms.sort()
    cpu = [sum(c.counts.get(es, 0) for c in cs) for cs in chunks]
    spans = [sum(c.duration_ns for c in cs) / 1e9 for cs in chunks]
    return {"tick_ms": ticks_ms, "tick_cpu_ms": tick_cpu_ms, "gap_ms": gaps_ms,
            "sample_gap_ms": sample_gaps_ms, "bytes": sizes, "cpu_samples": cpu, "chunk_s": spans,
            "spacing_p50_ms": spacing_ms[len(spacing_ms) // 2] if spacing_ms else None,
            "spacing_p99_ms": spacing_ms[int(len(spacing_ms) * 0.99)] if spacing_ms else None,
            "spacing_p999_ms": spacing_ms[int(len(spacing_ms) * 0.999)] if spacing_ms else None,
            "spacing_max_ms": spacing_ms[-1] if spacing_ms else None}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["calibrate", "run", "tick", "engine"])
    p.add_argument("--profiler", default="none",
                   choices=["none", "import", "aprof", "agent", "builtin", "builtin-c", "floor", "pyspy", "pyspy-nb",
                            "pyroscope"])
    p.add_argument("--units", type=int, default=500)
    p.add_argument("--opts", default="{}", help="asprof.ProfilerOptions keyword arguments, as JSON")
    p.add_argument("--interval", type=float, default=30.0)
    p.add_argument("--command", default="")
    p.add_argument("--lib", default=None)
    p.add_argument("--tmp", default=None)
    p.add_argument("--count", action="store_true", help="count the recorded samples")
    p.add_argument("--idle-thread", type=int, default=1)
    p.add_argument("--ticks", type=int, default=10)
    p.add_argument("--cpu-interval", type=float, default=0.1, help="engine mode: s of CPU between CPU samples")
    p.add_argument("--wall-interval", type=float, default=1.0, help="engine mode: s between wall samples (0 = off)")
    p.add_argument("--rate", type=int, default=100, help="engine mode: py-spy's and pyroscope's rate (Hz)")
    p.add_argument("--pyspy", default="py-spy", help="engine mode: the py-spy executable")
    p.add_argument("--sink", default="http://127.0.0.1:9", help="engine mode: pyroscope's server address")
    p.add_argument("--full-rotation", action="store_true",
                   help="every tick stops, swaps files and restarts async-profiler (as asprof did before "
                        "rotating with dump, and still does every 10 minutes)")
    p.add_argument("--affinity", type=int, default=-1, help="engine mode: run every thread on this CPU")
    p.add_argument("--sync", action="store_true",
                   help="engine mode: print 'ready' and wait for a line on stdin before the timed window")
    p.add_argument("--load", choices=["mixed", "nogil"], default="mixed",
                   help="tick mode: the busy threads run the mixed workload or GIL-free hashing")
    a = p.parse_args(argv)
    if a.full_rotation:
        from asprof.engines import asyncprofiler as engine

        engine.FULL_ROTATION_AGE_S = 0.0
    result = {"calibrate": mode_calibrate, "run": mode_run, "tick": mode_tick, "engine": mode_engine}[a.mode](a)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
