"""Python allocation sampling overhead (issue #16): asprof vs off vs ddtrace's memory profiler
vs memray, on an allocation-heavy workload, interleaved.

    /work/benchvenv/bin/python benchmarks/bench_alloc.py [--rounds 9] [--units 40] [--seed 1] [--instructions 2]

Every measurement is a fresh interpreter running one configuration; each round runs every
configuration once in a shuffled order, and ratios are taken against the unprofiled run of the
same round (an A/A pair, ``off2``, shows the machine's noise); the medians of the per-round
ratios are reported, for wall time and for the process's CPU time (all threads, getrusage).

Configurations:
- ``off``, ``off2``: nothing;
- ``asprof``: asprof's allocation sampler at its default rate (``python_alloc=True``: 512 KiB),
  its collector thread and a report at the end (the sampler alone: no CPU/wall engine); the
  times include each profiler's stop (asprof's last report, which holds every sample of the run;
  ddtrace's heap snapshot; memray's file closed);
- ``ddtrace``: ddtrace's memory profiler (``MemoryCollector``, the allocation and heap
  profiles) at the same 512 KiB sampling interval, heap snapshot at the end;
- ``memray``: ``memray.Tracker`` to a file (it records every allocation: no sampling);
- not in the default list, the breakdown of ``asprof``: ``asprof_import`` (its modules imported,
  nothing started: more objects for the cyclic GC to scan) and ``asprof_hooks`` (the C hooks and
  samples alone, no collector thread, no report).

The workload (``work``): builds dicts, lists and strings, keeps a rolling window of them alive
(frees as many as it allocates, so the live set stays ~constant) and retains a small steady
leak. RSS is read at the end of the workload (VmRSS); "RSS added" is the median of per-round
differences with ``off``. For asprof, the sampler's own memory (C buffers and the live set's
entries, ``AllocSampler.memory_bytes``) and its live-set size are printed too.

Wall and CPU times on a shared, loaded machine are noisy (the A/A line says by how much):
``--instructions N`` also counts the instructions each configuration executes (all threads)
under valgrind, for N and 2N work units (the difference cancels start-up): deterministic,
and what the overhead is on a quiet machine, cache effects aside. There asprof's 2-second
collector is turned off (valgrind runs ~50x slower, so it would run ~50x as often per unit of
work; its cost is in the wall/CPU columns) and so is the cyclic GC (whose schedule, shifted
by what each configuration imports, would dominate the differences): the column is the
hooks' and the samples' cost.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("off", "off2", "asprof", "ddtrace", "memray")
LEAK: List[Any] = []


WINDOW: Deque[Any] = deque(maxlen=50000)


def work(units: int) -> int:
    """Allocation-heavy: per unit 20000 dicts, lists and strings; a window of the last 50000 is
    kept alive (also after the workload: the live set when RSS and the sampler are measured)."""
    window = WINDOW
    n = 0
    for u in range(units):
        for i in range(20000):
            d: Dict[str, Any] = {"id": i, "name": f"user-{i}", "tags": ["a", "b", str(u)], "score": i * 0.5}
            s = "-".join((d["name"], str(i), "x" * (i % 64)))
            lst = [i, s, d]
            window.append(lst)
            n += len(s)
        LEAK.append(bytearray(4096))  # a slow steady leak
    return n


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child(config: str, units: int) -> Dict[str, Any]:
    stop: Callable[[], None] = lambda: None  # noqa: E731
    extra: Dict[str, Any] = {}
    tmp = tempfile.mkdtemp(prefix="bench-alloc-")
    sampler: Any = None
    if config == "asprof":
        from asprof.engines import alloc as alloc_mod
        from asprof.engines.alloc import AllocSampler
        from asprof.options import DEFAULT_PYTHON_ALLOC

        if os.environ.get("BENCH_ALLOC_NO_PERIODIC"):  # under valgrind (50x slower) the 2 s collector
            alloc_mod.COLLECT_EVERY = 1e9              # would run 50x as often per unit of work

        sampler = AllocSampler(DEFAULT_PYTHON_ALLOC)
        sampler.start()

        def stop() -> None:
            data = sampler.stop()
            extra["report_bytes"] = len(data or b"")
    elif config == "asprof_import":  # the breakdown: what the asprof configuration imports, nothing started
        from asprof.engines import alloc as _alloc_mod  # noqa: F401
        from asprof.options import DEFAULT_PYTHON_ALLOC  # noqa: F401
    elif config == "asprof_hooks":  # the breakdown: the C hooks and samples alone (no collector, no report)
        from asprof.engines import _alloc
        from asprof.options import DEFAULT_PYTHON_ALLOC

        _alloc.start(int(DEFAULT_PYTHON_ALLOC))
        stop = _alloc.stop  # type: ignore[assignment]
    elif config == "ddtrace":
        from ddtrace.profiling.collector.memalloc import MemoryCollector

        coll = MemoryCollector(heap_sample_size=512 * 1024)
        coll.start()

        def stop() -> None:
            coll.snapshot()
            coll.stop()
    elif config == "memray":
        import memray

        tracker = memray.Tracker(os.path.join(tmp, "memray.bin"))
        tracker.__enter__()

        def stop() -> None:
            tracker.__exit__(None, None, None)
            extra["file_bytes"] = os.path.getsize(os.path.join(tmp, "memray.bin"))
    if os.environ.get("BENCH_ALLOC_NO_GC"):  # instruction counts: the cyclic GC's schedule (which
        gc.collect()                        # imports shift) would dominate the differences
        gc.disable()
    if os.environ.get("BENCH_ALLOC_SYNC"):  # --pairs: start the timed work together with the pair's other
        print("ready", flush=True)          # process (both pinned to one CPU)
        sys.stdin.readline()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    work(units)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    rss = _rss_kb()
    if sampler is not None:
        st = sampler.stats()
        extra["sampler_memory_bytes"] = sampler.memory_bytes()
        extra["live"] = st.get("live", 0)
        extra["samples"] = st.get("samples", 0)
    # the profiler's stop is timed too: its last report holds every sample of the run (a service
    # pays for writing them in its periodic reports). The workload's pending garbage collection is
    # settled first, untimed, in every configuration: else whichever allocates next (the report)
    # pays it, or a full collection forced in the window weighs each configuration's imports.
    if not os.environ.get("BENCH_ALLOC_NO_GC"):
        gc.collect()
    r2 = resource.getrusage(resource.RUSAGE_SELF)
    t2 = time.perf_counter()
    stop()
    wall += time.perf_counter() - t2
    r3 = resource.getrusage(resource.RUSAGE_SELF)
    for f in os.listdir(tmp):
        os.unlink(os.path.join(tmp, f))
    os.rmdir(tmp)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime) + (r3.ru_utime - r2.ru_utime) + (r3.ru_stime - r2.ru_stime)
    return {"config": config, "wall": wall, "cpu": cpu, "rss_kb": rss, **extra}


def run_one(config: str, units: int) -> Optional[Dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DD_PROFILING_ENABLED="false", DD_TRACE_ENABLED="false", DD_INSTRUMENTATION_TELEMETRY_ENABLED="false")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", config, "--units", str(units)],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        sys.stderr.write(f"{config}: failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}\n")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


PAIR_NICE = -20


def _pair_child_setup(cpu: int) -> Callable[[], None]:
    def setup() -> None:
        os.sched_setaffinity(0, {cpu})  # threads created later inherit it
        try:
            os.setpriority(os.PRIO_PROCESS, 0, PAIR_NICE)  # where allowed (root)
        except OSError:
            pass
    return setup


def run_pair(configs: List[str], units: int, cpu: int) -> Optional[List[Dict[str, Any]]]:
    """The configurations' processes at the same time, every thread of each on the same CPU, their
    timed work started together: they take turns on that CPU, so the machine's other work (a
    neighbour on the sibling hyper-thread, steal) falls on both alike. The measure is each one's CPU
    time for the same work (benchmarks/README.md, "same-CPU pairs")."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DD_PROFILING_ENABLED="false", DD_TRACE_ENABLED="false", DD_INSTRUMENTATION_TELEMETRY_ENABLED="false",
               BENCH_ALLOC_SYNC="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", c, "--units", str(units)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, preexec_fn=_pair_child_setup(cpu)) for c in configs]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"pair child did not get ready: {p.communicate(timeout=60)[1][-2000:]}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        out = []
        for c, p in zip(configs, procs):
            stdout, stderr = p.communicate(timeout=600)
            if p.returncode != 0:
                sys.stderr.write(f"{c}: failed: {stderr.strip().splitlines()[-1:] or p.returncode}\n")
                return None
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def pairs_table(configs: List[str], rounds: int, units: int, rng: random.Random) -> None:
    """``rounds`` rounds; in each, every configuration runs beside an unprofiled process ('off') on
    one CPU (CPU 0 and 1 in turn), in a shuffled order; ratios per pair, medians and IQRs."""
    if len(os.sched_getaffinity(0)) < 2:
        print("pairs: SKIPPED (needs two CPUs)")
        return
    cpus = sorted(os.sched_getaffinity(0))[:2]
    others = [c for c in configs if c != "off"]
    res: Dict[str, List[float]] = {c: [] for c in others}
    for r in range(rounds):
        order = others[:]
        rng.shuffle(order)
        for c in order:
            got = run_pair(["off", c], units, cpus[r % 2])
            if got is None:
                continue
            base, x = got
            res[c].append(100 * (x["cpu"] / base["cpu"] - 1))
            sys.stderr.write(f"pairs round {r + 1}/{rounds} {c}: CPU {x['cpu']:.3f} s vs off {base['cpu']:.3f} s\n")

    def q(xs: List[float], f: float) -> float:
        ys = sorted(xs)
        return ys[min(len(ys) - 1, max(0, round(f * (len(ys) - 1))))]

    print(f"same-CPU pairs: {rounds} rounds, {units} units; each configuration beside an unprofiled process on one "
          "CPU; CPU time for the same work vs its pair's ('off2' is a second unprofiled process: the method's noise)")
    print(f"{'config':<10} {'CPU':>9} {'IQR':>17}")
    for c in others:
        xs = res[c]
        if not xs:
            print(f"{c:<10} {'failed':>9}")
            continue
        print(f"{c:<10} {statistics.median(xs):>+8.2f}% {q(xs, .25):+7.2f} .. {q(xs, .75):+.2f}")


def instructions(config: str, units: int) -> Optional[int]:
    """Instructions the process executes (all threads), counted by valgrind's callgrind."""
    import re

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DD_PROFILING_ENABLED="false", DD_TRACE_ENABLED="false", DD_INSTRUMENTATION_TELEMETRY_ENABLED="false")
    env["BENCH_ALLOC_NO_PERIODIC"] = "1"
    env["BENCH_ALLOC_NO_GC"] = "1"
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts in every run
    r = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                        os.path.abspath(__file__), "--child", config, "--units", str(units)],
                       capture_output=True, text=True, env=env, timeout=3600)
    m = re.search(r"Collected : (\d+)", r.stderr)
    if r.returncode != 0 or m is None:
        sys.stderr.write(f"{config}: valgrind run failed: {r.stderr.strip().splitlines()[-1:]}\n")
        return None
    return int(m.group(1))


def instruction_table(configs: List[str], units: int) -> None:
    """The instructions the workload's ``units`` more units cost per configuration (two runs,
    ``units`` and ``2 * units``: the interpreter's start-up and the profiler's start cancel)."""
    print(f"instructions (valgrind callgrind, all threads) of {units} work units, relative to 'off'")
    base: Optional[float] = None
    for c in configs:
        if c == "off2":
            continue
        a1, a2 = instructions(c, units), instructions(c, 2 * units)
        if a1 is None or a2 is None:
            print(f"{c:<10} failed")
            continue
        d = a2 - a1
        if c == "off":
            base = d
        rel = f"{100 * (d / base - 1):+8.2f}%" if base else "        "
        print(f"{c:<10} {rel} {d / 1e6:10.1f} M instructions")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--units", type=int, default=40, help="work units per run (~1.5 s unprofiled on 2 cores)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--json", help="raw results to this file")
    p.add_argument("--pairs", type=int, metavar="ROUNDS", default=0,
                   help="also run ROUNDS rounds of same-CPU pairs (each configuration beside 'off' on one CPU)")
    p.add_argument("--instructions", type=int, metavar="UNITS", default=0,
                   help="also count instructions under valgrind (UNITS and 2*UNITS work units; 0: no)")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.units)))
        return 0
    configs = [c for c in a.configs.split(",") if c]
    if "off" not in configs:
        configs.insert(0, "off")
    rng = random.Random(a.seed)
    if a.instructions:
        instruction_table(configs, a.instructions)
    if a.pairs:
        pairs_table(configs, a.pairs, a.units, rng)
    if a.rounds == 0:
        return 0
    rounds: List[Dict[str, Dict[str, Any]]] = []
    for i in range(a.rounds):
        order = configs[:]
        rng.shuffle(order)
        res: Dict[str, Dict[str, Any]] = {}
        for c in order:
            got = run_one(c, a.units)
            if got is not None:
                res[c] = got
        rounds.append(res)
        sys.stderr.write(f"round {i + 1}/{a.rounds}: " + ", ".join(
            f"{c} {res[c]['wall']:.2f}s" for c in configs if c in res) + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rounds, f, indent=1)
    print(f"allocation-heavy workload, {a.units} units, {a.rounds} rounds, medians of per-round ratios to 'off'")
    print(f"{'config':<10} {'wall':>9} {'CPU':>9} {'RSS added':>11}  notes")
    for c in configs:
        pairs = [r for r in rounds if c in r and "off" in r]
        if not pairs:
            print(f"{c:<10} {'failed':>9}")
            continue
        wall = statistics.median(r[c]["wall"] / r["off"]["wall"] for r in pairs)
        cpu = statistics.median(r[c]["cpu"] / r["off"]["cpu"] for r in pairs)
        rss = statistics.median((r[c]["rss_kb"] - r["off"]["rss_kb"]) / 1024 for r in pairs)
        note = ""
        if c == "asprof":
            note = (f"sampler memory {statistics.median(r[c]['sampler_memory_bytes'] for r in pairs) / 2**20:.1f} MiB, "
                    f"live set {statistics.median(r[c]['live'] for r in pairs):.0f} blocks, "
                    f"{statistics.median(r[c]['samples'] for r in pairs):.0f} samples")
        elif c == "memray":
            note = f"file {statistics.median(r[c]['file_bytes'] for r in pairs) / 2**20:.0f} MiB"
        base = statistics.median(r["off"]["wall"] for r in pairs)
        if c == "off":
            note = f"median {base:.2f} s wall"
        print(f"{c:<10} {100 * (wall - 1):>+8.2f}% {100 * (cpu - 1):>+8.2f}% {rss:>+9.1f} MB  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
