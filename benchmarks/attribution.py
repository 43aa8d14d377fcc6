"""Attribution check: does the engine give each Python function its share of each thread's CPU?

    python benchmarks/attribution.py                      # built-in engine, 1 ms CPU, 10 s
    python benchmarks/attribution.py --engine async-profiler --seconds 5
    python benchmarks/attribution.py --json -             # the result as JSON on stdout (the test uses it)

Two threads run two Python functions, ``attribution_f1`` and ``attribution_f2``, in
alternating calls of random length (1-10 ms of CPU per pair, so nothing lines up with the
sampling period); thread A gives f1 ~70% of its CPU and f2 ~30%, thread B ~40/60.
f1 is pure Python; f2 mixes Python with ``hashlib.sha256`` of 64 KiB, which releases the
GIL (the samples taken there must still carry f2). The truth is each call's thread CPU
time (``time.thread_time``) summed per function, against the thread's CPU time over the
whole run. The profile is made by the asprof agent with the chosen engine at 1 ms of CPU
(wall-clock sampling on at 10 ms, as at those rates in production), reported every 2 s to a
private temporary directory, and read back with ``asprof.jfr``: per thread (by OS thread id),
the share of its CPU samples whose stack has f1, or f2. The deviation is
``|engine share - true share|`` in percentage points; the target (issue #11) is <= 3 per
function and thread.

The threads exist and wait before the profiler starts, and do nothing before the go signal
or after they finish, so the truth and the samples cover the same CPU time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

DATA = bytes(random.Random(3).getrandbits(8) for _ in range(65536))
FUNCS = ("attribution_f1", "attribution_f2")
SPLITS = {"A": 0.7, "B": 0.4}  # the share of f1 in each thread's CPU; f2 gets the rest
TARGET_POINTS = 3.0


def attribution_f1(budget_s: float) -> int:
    """Pure Python until ``budget_s`` of this thread's CPU time is spent."""
    end = time.thread_time() + budget_s
    x = 0
    while time.thread_time() < end:
        for i in range(150):
            x += i * i % 7
    return x


def attribution_f2(budget_s: float) -> int:
    """Python and GIL-free hashing until ``budget_s`` of this thread's CPU time is spent."""
    end = time.thread_time() + budget_s
    x = 0
    while time.thread_time() < end:
        x += len(hashlib.sha256(DATA).digest())  # releases the GIL (>= 2 KiB)
        for i in range(100):
            x ^= i * 31
    return x


class Worker(threading.Thread):
    def __init__(self, name: str, share_f1: float, go: threading.Event, seconds: float, seed: int) -> None:
        super().__init__(name=f"attribution-{name}", daemon=True)
        self.label = name
        self.share_f1 = share_f1
        self.go = go
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.cpu = {f: 0.0 for f in FUNCS}
        self.total_cpu = 0.0
        self.tid = 0
        self.ready = threading.Event()

    def run(self) -> None:
        self.tid = threading.get_native_id()
        self.ready.set()
        self.go.wait()
        t_start = time.thread_time()
        deadline = time.monotonic() + self.seconds
        f1, f2 = attribution_f1, attribution_f2
        while time.monotonic() < deadline:
            chunk = self.rng.uniform(0.001, 0.010)
            a = time.thread_time()
            f1(chunk * self.share_f1)
            b = time.thread_time()
            f2(chunk * (1 - self.share_f1))
            c = time.thread_time()
            self.cpu["attribution_f1"] += b - a
            self.cpu["attribution_f2"] += c - b
        self.total_cpu = time.thread_time() - t_start


def engine_shares(profile_dir: str, tids: Dict[str, int]) -> Dict[str, Dict[str, Any]]:
    """Per thread: CPU samples, and the share of them whose stack has each function."""
    import asprof.jfr

    rec = asprof.jfr.open(profile_dir)
    out: Dict[str, Dict[str, Any]] = {}
    for label, tid in tids.items():
        prof = rec.samples("cpu", threads=[tid], count=True)
        counts = {f: 0 for f in FUNCS}
        total = 0
        for stack, (_weight, count) in prof.stacks.items():
            total += count
            names = [prof.frames[i][0] for i in stack]
            for f in FUNCS:
                if any(f in n for n in names):
                    counts[f] += count
                    break
        out[label] = {"samples": total,
                      "share": {f: (counts[f] / total * 100 if total else float("nan")) for f in FUNCS}}
    return out


def measure(engine: str, seconds: float, cpu_interval: float, wall_interval: Optional[float],
            reporting_interval: float, lib: Optional[str]) -> Dict[str, Any]:
    import asprof

    go = threading.Event()
    workers = [Worker(name, share, go, seconds, seed) for seed, (name, share) in enumerate(SPLITS.items())]
    for w in workers:
        w.start()
        w.ready.wait()
    tmp = tempfile.mkdtemp(prefix="asprof-attribution-")
    try:
        kw: Dict[str, Any] = {"cpu_interval": cpu_interval, "wall_interval": wall_interval}
        if engine != "default":
            kw["engine"] = engine
        options = asprof.ProfilerOptions(**kw)
        running = asprof.Profiler(reporter=asprof.LocalReporter(tmp), reporting_interval=reporting_interval,
                                  options=options, library_path=lib).start()
        try:
            time.sleep(0.3)  # timers armed for the threads that already exist
            go.set()
            for w in workers:
                w.join()
        finally:
            stopped = running.stop(timeout=60)
        if not stopped:
            raise RuntimeError("the profiler did not stop in time")
        shares = engine_shares(tmp, {w.label: w.tid for w in workers})
        files = sorted(f for f in os.listdir(tmp) if f.endswith(".jfr"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    threads: Dict[str, Any] = {}
    worst = 0.0
    for w in workers:
        truth = {f: w.cpu[f] / w.total_cpu * 100 for f in FUNCS}
        got = shares[w.label]["share"]
        dev = {f: abs(got[f] - truth[f]) for f in FUNCS}
        worst = max(worst, *dev.values())
        threads[w.label] = {"tid": w.tid, "cpu_s": w.total_cpu, "samples": shares[w.label]["samples"],
                            "truth": truth, "engine": got, "deviation": dev}
    return {"engine": engine, "seconds": seconds, "cpu_interval": cpu_interval, "wall_interval": wall_interval,
            "files": len(files), "threads": threads, "max_deviation": worst}


def report(res: Dict[str, Any]) -> str:
    lines = [f"engine {res['engine']}, cpu {res['cpu_interval'] * 1e3:g} ms, wall "
             f"{'off' if res['wall_interval'] is None else str(res['wall_interval'] * 1e3) + ' ms'}, "
             f"{res['seconds']:g} s, {res['files']} reports",
             f"{'thread':8s} {'function':16s} {'truth %':>8s} {'engine %':>9s} {'dev pt':>7s} {'samples':>8s} {'CPU s':>6s}"]
    for label, t in res["threads"].items():
        for f in FUNCS:
            lines.append(f"{label:8s} {f:16s} {t['truth'][f]:8.2f} {t['engine'][f]:9.2f} {t['deviation'][f]:7.2f} "
                         f"{t['samples']:8d} {t['cpu_s']:6.2f}")
    worst = res["max_deviation"]
    lines.append(f"max deviation: {worst:.2f} points (target <= {TARGET_POINTS:g}): "
                 + ("MET" if worst <= TARGET_POINTS else "NOT MET"))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="builtin", help="builtin (default), async-profiler, or default (the "
                   "ProfilerOptions default: no engine argument)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--cpu-interval", type=float, default=0.001)
    p.add_argument("--wall-interval", type=float, default=0.01, help="0 = wall-clock sampling off")
    p.add_argument("--reporting-interval", type=float, default=2.0)
    p.add_argument("--lib", default=None, help="libasyncProfiler.so for --engine async-profiler")
    p.add_argument("--json", default="", help="write the result as JSON to this file ('-': stdout)")
    a = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    res = measure(a.engine, a.seconds, a.cpu_interval, a.wall_interval or None, a.reporting_interval, a.lib)
    if a.json == "-":
        sys.stdout.write(json.dumps(res) + "\n")
    else:
        print(report(res))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
