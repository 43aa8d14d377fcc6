"""Benchmark: asprof's JFR converter vs async-profiler's Java converter (jfrconv).

    python benchmarks/bench_convert.py [--jfr FILE] [--runs N] [--seconds S]

Without ``--jfr`` a large recording (tens of MB) is generated first, in a
private temporary directory, by loading the real async-profiler into a child
Python process (ctypes) and sampling CPU, wall clock and *every* native
allocation (``nativemem=0``) of an allocation-heavy workload.

Then both converters turn it into collapsed stacks and into an HTML flame
graph, end to end as a user runs them (``asprof convert`` in a fresh Python
process; ``jfrconv`` including JVM start-up), each the median of ``--runs``
runs, and the table shows time, MB/s and the ratio (jfrconv time / asprof
time; > 1 means asprof is faster).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The workload runs in a child process: async-profiler is process-global and
# nativemem hooks stay installed after stop, so keep it out of this process.
WORKLOAD = r"""
import ctypes, ctypes.util, sys, threading, time, zlib, json

path, seconds, lib = sys.argv[1], float(sys.argv[2]), sys.argv[3]
ap = ctypes.CDLL(lib)
ap.asprof_execute.restype = ctypes.c_char_p
ap.asprof_execute.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
ap.asprof_init()

def run(cmd):
    err = ap.asprof_execute(cmd.encode(), None)
    if err:
        sys.exit("async-profiler: " + err.decode())

def churn(stop, seed):
    i = seed
    while not stop.is_set():
        d = {str(k): [k] * (k % 7) for k in range(i % 300)}
        s = json.dumps(d)
        zlib.compress(s.encode() * 3)
        bytearray(1000 + i % 5000)
        i += 1

def sleeper(stop):
    while not stop.is_set():
        time.sleep(0.005)

run("start,event=cpu,interval=1ms,wall=10ms,jfr,cstack=dwarf,nativemem=0,file=" + path
    + ",log=/dev/null,loglevel=warn")
stop = threading.Event()
threads = [threading.Thread(target=churn, args=(stop, n)) for n in range(2)]
threads.append(threading.Thread(target=sleeper, args=(stop,)))
for t in threads:
    t.start()
time.sleep(seconds)
stop.set()
for t in threads:
    t.join()
run("stop,log=/dev/null,loglevel=warn")
"""


def find_library() -> Optional[str]:
    for cand in ("/usr/local/lib/libasyncProfiler.so",
                 os.path.join(ROOT, "asprof", "lib", "libasyncProfiler.so")):
        if os.path.exists(cand):
            return cand
    import ctypes.util

    return ctypes.util.find_library("asyncProfiler")


def find_jfrconv() -> Optional[List[str]]:
    exe = shutil.which("jfrconv")
    if exe:
        return [exe]
    for jar in ("/usr/local/share/async-profiler/jfr-converter.jar",
                "/opt/build/async-profiler/build/jar/jfr-converter.jar"):
        java = shutil.which("java")
        if os.path.exists(jar) and java:
            return [java, "-jar", jar]
    return None


def generate(path: str, seconds: float, target_mb: float) -> None:
    lib = find_library()
    if lib is None:
        sys.exit("cannot generate a recording: libasyncProfiler.so not found (pass --jfr FILE)")
    print(f"generating a recording with async-profiler ({lib}) ...", flush=True)
    script = os.path.join(os.path.dirname(path), "workload.py")
    with open(script, "w") as f:
        f.write(WORKLOAD)
    subprocess.run([sys.executable, script, path, str(seconds), lib], check=True)
    size = os.path.getsize(path) / 1e6
    print(f"  {size:.1f} MB in {seconds:.0f} s of profiling", flush=True)
    if size < target_mb * 0.5 and seconds < 60:
        generate(path, seconds * min(4.0, target_mb / max(size, 0.1)), target_mb)


def timed(cmd: List[str], env: Optional[dict] = None) -> Tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one run of ``cmd``, start-up included."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    dt = time.perf_counter() - t
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.decode(errors='replace').strip()}")
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return dt, cpu


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jfr", help="convert this recording instead of generating one")
    ap.add_argument("--runs", type=int, default=5, help="runs per measurement (median is shown)")
    ap.add_argument("--seconds", type=float, default=8.0, help="profiling time of the generated recording")
    ap.add_argument("--target-mb", type=float, default=40.0, help="approximate size of the generated recording")
    ap.add_argument("--kind", default="nativemem", choices=["cpu", "wall", "nativemem"],
                    help="profile kind to convert (default: nativemem, the bulk of the generated file)")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="asprof-bench-")
    try:
        jfr = args.jfr
        if jfr is None:
            jfr = os.path.join(tmp, "bench.jfr")
            generate(jfr, args.seconds, args.target_mb)
        size_mb = os.path.getsize(jfr) / 1e6
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        jfrconv = find_jfrconv()
        if jfrconv is None:
            print("jfrconv / jfr-converter.jar not found: measuring asprof only")
        print(f"\ninput: {jfr} ({size_mb:.1f} MB), kind {args.kind}, median of {args.runs} runs\n")
        print(f"{'output':<10} {'asprof s':>9} {'MB/s':>8} {'jfrconv s':>10} {'MB/s':>8} {'ratio':>7}"
              f"   {'CPU s: asprof':>13} {'jfrconv':>8} {'ratio':>7}")
        results = []
        for fmt in ("collapsed", "html"):
            out_a = os.path.join(tmp, f"asprof.{fmt}")
            out_j = os.path.join(tmp, f"jfrconv.{fmt}")
            a_cmd = [sys.executable, "-m", "asprof", "convert", jfr, "-o", out_a, "--format", fmt,
                     f"--{args.kind}"]
            j_cmd = (jfrconv or []) + ["-o", fmt, f"--{args.kind}"]
            if args.kind == "nativemem":
                j_cmd.append("--total")  # bytes, as asprof reports them
            j_cmd += [jfr, out_j]
            a_runs, j_runs = [], []
            for _ in range(args.runs):  # interleaved, so both see the same machine state
                a_runs.append(timed(a_cmd, env))
                if jfrconv:
                    j_runs.append(timed(j_cmd))
            a = statistics.median(w for w, _c in a_runs)
            a_cpu = statistics.median(c for _w, c in a_runs)
            line = f"{fmt:<10} {a:9.3f} {size_mb / a:8.1f}"
            if j_runs:
                j = statistics.median(w for w, _c in j_runs)
                j_cpu = statistics.median(c for _w, c in j_runs)
                line += f" {j:10.3f} {size_mb / j:8.1f} {j / a:6.2f}x   {a_cpu:13.3f} {j_cpu:8.3f} {j_cpu / a_cpu:6.2f}x"
                results.append(j / a)
            print(line, flush=True)
        if results:
            print(f"\nratio = jfrconv / asprof (> 1: asprof is faster), wall-clock time end to end "
                  f"(process start to exit, JVM start-up included); worst {min(results):.2f}x."
                  f"\nCPU s = user+sys CPU time of the process (less sensitive to a busy machine).")
        load = os.getloadavg()[0]
        if load > (os.cpu_count() or 1):
            print(f"note: load average {load:.1f} on {os.cpu_count()} CPUs: the machine is busy, times are noisy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
