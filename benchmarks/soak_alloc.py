"""Soak of Python allocation sampling (issue #16): a high sampling rate, threads and forks, for
minutes; not part of the test suite.

    /work/main/.venv/bin/python benchmarks/soak_alloc.py [--minutes 10] [--interval 4k] [--live-cap 4096]

The process profiles itself (built-in engine, a report every 5 s to a temporary directory)
with ``python_alloc`` at ``--interval`` (4 KiB: ~128x the default rate) and a small live-set cap
(so the cap is reached and overflow is counted). Four threads allocate dicts, lists and strings,
keep a rolling window alive and leak slowly; every 10 s the main thread forks a child that
allocates for 2 s, reports and exits (each child must exit 0 within 30 s: a hang fails the
soak). Every 10 s it prints RSS, the sampler's memory and counters. At the end it checks: no
child failed or hung, every report reads back with alloc and live events, the live set never
exceeded the cap, the sampler's memory stayed under its bound, and RSS growth beyond the
workload's own leak is small. Exit status 0 when all hold.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any, Deque, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LEAK: List[bytes] = []
LEAK_LOCK = threading.Lock()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker(stop: threading.Event, seed: int) -> None:
    window: Deque[Any] = deque(maxlen=20000)
    i = seed
    while not stop.is_set():
        for _ in range(2000):
            i += 1
            d = {"id": i, "name": f"n{i}", "v": [i, i + 1, str(i)]}
            window.append(("x" * (i % 200), d, bytearray(i % 3000)))
        with LEAK_LOCK:
            if len(LEAK) < 20000:  # bounded: ~20 MB over the run
                LEAK.append(bytes(1000))
        time.sleep(0.001)


def child_body(seconds: float) -> None:
    t_end = time.monotonic() + seconds
    keep = []
    while time.monotonic() < t_end:
        keep.append([{"k": j, "s": str(j) * 5} for j in range(500)])
        if len(keep) > 200:
            keep.pop(0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--interval", default="4k")
    p.add_argument("--live-cap", type=int, default=4096)
    p.add_argument("--keep", action="store_true", help="keep the reports directory")
    a = p.parse_args()

    import asprof
    from asprof.engines import alloc as alloc_mod
    from asprof.options import ProfilerOptions
    from asprof.reporter import LocalReporter

    alloc_mod.LIVE_CAP = a.live_cap
    out = tempfile.mkdtemp(prefix="asprof-soak-")
    asprof.start_profiling(LocalReporter(out), reporting_interval=5,
                           options=ProfilerOptions(engine="builtin", python_alloc=a.interval))
    import asprof.profiler as prof_mod

    def sampler() -> Any:
        h = prof_mod._default
        agent = getattr(h, "_agent", None) or getattr(getattr(h, "_profiler", None), "_agent", None)
        eng = getattr(agent, "engine", None)
        return getattr(eng, "sampler", None)

    stop = threading.Event()
    threads = [threading.Thread(target=worker, args=(stop, k * 10**9), name=f"w{k}", daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    rss0 = _rss_mb()
    t0 = time.monotonic()
    deadline = t0 + a.minutes * 60
    forks = fork_failures = 0
    max_live = max_mem = 0
    rows: List[Dict[str, Any]] = []
    next_fork = t0 + 10
    base = None
    while time.monotonic() < deadline:
        time.sleep(1)
        now = time.monotonic()
        if now >= next_fork:
            next_fork = now + 10
            pid = os.fork()
            if pid == 0:
                try:
                    child_body(2.0)
                    asprof.stop_profiling()
                finally:
                    os._exit(0)
            forks += 1
            waited = 0.0
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    if status != 0:
                        fork_failures += 1
                        print(f"child {pid} exited with status {status}", flush=True)
                    break
                if waited > 30:
                    fork_failures += 1
                    print(f"child {pid} HUNG (killed)", flush=True)
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.1)
                waited += 0.1
            s = sampler()
            st = s.stats() if s is not None else {}
            mem = s.memory_bytes() if s is not None else 0
            max_live = max(max_live, int(st.get("live", 0)))
            max_mem = max(max_mem, mem)
            with LEAK_LOCK:
                leak_mb = len(LEAK) * 1033 / 2**20
            row = {"t": round(now - t0), "rss_mb": round(_rss_mb(), 1), "leak_mb": round(leak_mb, 1),
                   "sampler_mb": round(mem / 2**20, 2), "live": st.get("live"), "live_tracked": st.get("live_tracked"),
                   "overflow": st.get("live_overflow"), "samples": st.get("samples"), "lost": st.get("lost_total"),
                   "forks": forks}
            rows.append(row)
            print(row, flush=True)
            if base is None and now - t0 >= 30:  # the workers' windows are full by now
                base = (row["rss_mb"], row["leak_mb"])
    stop.set()
    for t in threads:
        t.join(5)
    gc.collect()
    rss1 = _rss_mb()
    asprof.stop_profiling()

    from asprof.jfr import open_recording

    files = sorted(f for f in os.listdir(out) if f.endswith(".jfr"))
    parent = [f for f in files if f.endswith(f"_{os.getpid()}.jfr")]
    bad = []
    alloc_events = live_events = 0
    for f in parent:
        try:
            rec = open_recording(os.path.join(out, f))
            c = rec.counts
            alloc_events += c.get("jdk.ObjectAllocationSample", (0, 0))[0]
            live_events += c.get("profiler.LiveObject", (0, 0))[0]
        except Exception as e:  # noqa: BLE001
            bad.append(f"{f}: {e}")
    with LEAK_LOCK:
        leak_mb = len(LEAK) * 1033 / 2**20
    if base is None:
        base = (rss0, 0.0)
    growth = rss1 - base[0] - (leak_mb - base[1])
    print(f"\nsoak: {a.minutes:g} min, interval {a.interval}, live cap {a.live_cap}, {forks} forks "
          f"({fork_failures} failed or hung), {len(files)} reports ({len(parent)} of the parent, {len(bad)} unreadable), "
          f"{alloc_events} allocation and {live_events} live events in the parent's reports")
    print(f"RSS {rss0:.0f} at start, {base[0]:.0f} after 30 s, {rss1:.0f} MB at the end (workload leak {leak_mb:.0f} MB; "
          f"growth after 30 s beyond the leak's {growth:+.0f} MB); "
          f"sampler memory max {max_mem / 2**20:.1f} MB; live set max {max_live} (cap {a.live_cap})")
    ok = (fork_failures == 0 and not bad and alloc_events > 0 and live_events > 0 and max_live <= a.live_cap
          and max_mem < 64 * 2**20 and growth < 100)
    print("PASS" if ok else "FAIL", bad[:3])
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
    else:
        print("reports in", out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
