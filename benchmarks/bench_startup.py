"""Start-up cost of asprof against async-profiler's own start, side by side (issue #10).

    python benchmarks/bench_startup.py [--pairs 20] [--lib /path/to/libasyncProfiler.so]

Each measurement runs in a fresh interpreter, interleaved ``A B W I A B W I ...`` so that drift
in the machine's load hits all alike:

- ``A``: async-profiler alone: ``dlopen`` it with ctypes, ``asprof_init()``, then its own
  ``start`` with the command asprof sends by default (CPU 100 ms, wall 1 s, JFR, dwarf);
- ``B``: asprof: ``import asprof``, ``asprof.Profiler(...)``, ``start()`` (same library, same
  command, a local reporter), i.e. everything an application pays before its next line runs;
- ``W``: ``B`` in an interpreter that already imported what a service usually has (logging,
  dataclasses, typing, re, threading): asprof's own share;
- ``I``: ``import asprof`` alone.

Timed inside the child, from before the first step to after the start returned (interpreter
start-up is the same for all and left out); CPU time is the process's (every thread: the
agent's and async-profiler's included), from ``getrusage``. The start is then stopped,
untimed. Printed: the medians of each, and the medians of the per-round ratios B / A and W / A.

Compiled bytecode is used as an installed package would (``PYTHONDONTWRITEBYTECODE`` is
dropped for the children, the ``.pyc`` files go to a temporary ``PYTHONPYCACHEPREFIX``, and a
first untimed round writes them).
"""
from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = "ABWI"
START = "start,event=cpu,interval=100000000,wall=1000ms,jfr,cstack=dwarf,alluser"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(mode: str, lib: str, out: str) -> Dict[str, float]:
    if mode == "W":
        import dataclasses  # noqa: F401
        import logging  # noqa: F401
        import re  # noqa: F401
        import threading  # noqa: F401
        import typing  # noqa: F401
    t0, c0 = time.perf_counter(), _cpu()
    if mode == "A":
        so = ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        so.asprof_init()
        so.asprof_execute.restype = ctypes.c_void_p
        so.asprof_execute.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        err = so.asprof_execute(f"{START},file={out}/a.jfr".encode(), None)
        t1, c1 = time.perf_counter(), _cpu()
        if err:
            raise SystemExit("async-profiler refused to start")
        so.asprof_execute(b"stop", None)
    elif mode in ("B", "W"):
        import asprof

        # a bare soname (the linker's search): asprof's own discovery ends with the same search
        handle = asprof.Profiler(asprof.LocalReporter(out), library_path=lib if os.sep in lib else None).start()
        t1, c1 = time.perf_counter(), _cpu()
        if not handle.running:
            raise SystemExit("asprof did not start")
        handle.stop()
    else:
        import asprof  # noqa: F401

        t1, c1 = time.perf_counter(), _cpu()
    return {"wall_ms": (t1 - t0) * 1e3, "cpu_ms": (c1 - c0) * 1e3}


def run(mode: str, lib: str, pycache: str) -> Dict[str, float]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONPYCACHEPREFIX=pycache)
    env.pop("ASPROF_LIB", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryDirectory(prefix="asprof-bench-startup-") as out:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, lib, out],
                           capture_output=True, text=True, timeout=60, env=env)
    if r.returncode != 0:
        raise SystemExit(f"child {mode} failed: {r.stderr.strip() or r.stdout.strip()}")
    result: Dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def find_library(given: Optional[str]) -> str:
    lib = given or os.environ.get("ASPROF_LIB") or ctypes.util.find_library("asyncProfiler")
    if not lib:
        raise SystemExit("async-profiler not found: pass --lib or set ASPROF_LIB")
    return lib


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], sys.argv[4])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20, help="rounds of A, B, W, I (default 20)")
    ap.add_argument("--lib", help="libasyncProfiler.so (default: ASPROF_LIB, then the linker's search)")
    args = ap.parse_args()
    lib = find_library(args.lib)
    res: Dict[str, List[Dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="asprof-bench-pycache-") as pycache:
        for mode in MODES:  # warm the page cache and write the .pyc files; not counted
            run(mode, lib, pycache)
        for _ in range(args.pairs):
            for mode in MODES:
                res[mode].append(run(mode, lib, pycache))

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in res[mode])

    ratio_wall = statistics.median(b["wall_ms"] / a["wall_ms"] for a, b in zip(res["A"], res["B"]))
    ratio_cpu = statistics.median(b["cpu_ms"] / a["cpu_ms"] for a, b in zip(res["A"], res["B"]) if a["cpu_ms"] > 0)
    print(f"library: {lib}; {args.pairs} interleaved rounds, fresh interpreters; medians")
    print(f"  A async-profiler's own load + start      {med('A', 'wall_ms'):7.1f} ms wall  {med('A', 'cpu_ms'):7.1f} ms CPU")
    print(f"  B import asprof + Profiler() + start()   {med('B', 'wall_ms'):7.1f} ms wall  {med('B', 'cpu_ms'):7.1f} ms CPU")
    print(f"  W B after the usual stdlib imports       {med('W', 'wall_ms'):7.1f} ms wall  {med('W', 'cpu_ms'):7.1f} ms CPU")
    print(f"  I import asprof                          {med('I', 'wall_ms'):7.1f} ms wall  {med('I', 'cpu_ms'):7.1f} ms CPU")
    ratio_warm = statistics.median(w["wall_ms"] / a["wall_ms"] for a, w in zip(res["A"], res["W"]))
    print(f"  B / A per round: wall {ratio_wall:.2f}x, CPU {ratio_cpu:.2f}x;  W / A: wall {ratio_warm:.2f}x")


if __name__ == "__main__":
    main()
