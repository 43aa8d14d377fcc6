"""Cost of Python frames in samples (issue #5), side by side in one run.

For each sampling rate (default: 100 ms CPU / 1 s wall; aggressive: 1 ms CPU / 10 ms wall) the
same CPU-bound Python workload runs, each in a fresh interpreter, unprofiled, with
async-profiler alone, and with Python frames; runs are interleaved and the median is kept. A last
run per rate measures the capture's own cost per sample (our share of each signal handler call,
timed inside the handler), and the capture path alone, outside a handler, through a private copy of
asprof._pyframes built by this script with -DASPROF_BENCH into a temporary directory (the shipped
extension has no benchmark code).

    PYTHONPATH=. python benchmarks/bench_pyframes.py [--reps 5] [--seconds 2] [--python PATH]

Targets: Python frames add <= 1 % at default rates and <= 3 % at the aggressive ones.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RATES = {"default": (0.1, 1.0), "aggressive": (0.001, 0.01)}
# The bench build of asprof._pyframes: the directory holding its asprof/_pyframes*.so.
BENCH_DIR_ENV = "ASPROF_BENCH_PYFRAMES_DIR"


def build_bench_extension(out: str) -> None:
    """Builds asprof._pyframes with pf_bench compiled in (-DASPROF_BENCH) into `out`/asprof/,
    for the running interpreter; compiled as setup.py compiles the shipped one."""
    from setuptools import Distribution, Extension

    ext = Extension(
        "asprof._pyframes",
        sources=sorted(glob.glob(os.path.join(ROOT, "csrc/pyframes/*.c"))),
        include_dirs=[os.path.join(ROOT, "csrc/pyframes"), os.path.join(ROOT, "csrc/include")],
        libraries=["dl", "pthread"],
        extra_compile_args=["-O2", "-g0", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden",
                            "-std=gnu11"],
        define_macros=[("_GNU_SOURCE", "1"), ("ASPROF_BENCH", "1")],
    )
    cmd = Distribution({"name": "asprof-bench-pyframes", "ext_modules": [ext]}).get_command_obj("build_ext")
    cmd.build_lib = out
    cmd.build_temp = os.path.join(out, "obj")
    cmd.ensure_finalized()
    cmd.run()


def bench_extension(python: str) -> Optional[str]:
    """A private temporary directory holding the bench build for `python`, or None (said why)."""
    tmp = tempfile.mkdtemp(prefix="asprof-bench-pyframes-")
    try:
        subprocess.run([python, os.path.abspath(__file__), "--build", tmp], check=True, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except subprocess.CalledProcessError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"(the bench build of asprof._pyframes failed, no 'capture ns' column values:\n{e.stdout[-2000:]})")
        return None
    return tmp


def child(mode: str, cpu: float, wall: float, work: int) -> None:
    import threading
    import zlib

    bench_dir = os.environ.get(BENCH_DIR_ENV)
    if bench_dir:  # asprof._pyframes from the bench build, before anything imports the shipped one
        import asprof

        asprof.__path__.insert(0, os.path.join(bench_dir, "asprof"))
    engine = None
    if mode != "none":
        from asprof.engines.asyncprofiler import NativeEngine
        from asprof.options import ProfilerOptions

        engine = NativeEngine(ProfilerOptions(cpu_interval=cpu, wall_interval=wall,
                                              python_frames=mode != "asprof"),
                              library_path=os.environ.get("ASPROF_LIB"))
        engine.start()

    stop = threading.Event()

    def idle():  # a second Python thread, mostly asleep: wall samples
        while not stop.is_set():
            time.sleep(0.005)

    t = threading.Thread(target=idle, daemon=True)
    t.start()

    def leaf(n):
        d = {}
        for i in range(n):
            d[i & 63] = d.get(i & 63, 0) + i
        return len(d)

    def level(depth, n):  # ~20 Python frames deep, like a web request handler
        if depth == 0:
            return leaf(n)
        return level(depth - 1, n) + 1

    data = os.urandom(1 << 14)
    capture_ns = None
    if mode == "frames" and bench_dir:
        from asprof import _pyframes

        assert _pyframes.__file__.startswith(bench_dir), _pyframes.__file__

        def probe(depth):  # the capture path at the workload's depth, outside a handler
            return _pyframes.bench(2000) if depth == 0 else probe(depth - 1)
        capture_ns = probe(20)
    t0 = time.perf_counter()
    for k in range(work):
        level(20, 2000)
        if k % 10 == 0:
            zlib.compress(data, 6)
    elapsed = time.perf_counter() - t0
    stop.set()
    t.join()
    stats = None
    if engine is not None:
        cap = getattr(engine, "_pyframes", None)
        stats = cap.stats() if cap is not None else None
        engine.stop()
        engine.close()
    print(json.dumps({"elapsed": elapsed, "stats": stats, "capture_ns": capture_ns}))


def run(python: str, mode: str, rate: str, work: int, timing: bool = False, bench_dir: Optional[str] = None) -> dict:
    cpu, wall = RATES[rate]
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(BENCH_DIR_ENV, None)
    if timing:
        env["ASPROF_PYFRAMES_TIMING"] = "1"
    if bench_dir:
        env[BENCH_DIR_ENV] = bench_dir
    out = subprocess.check_output([python, os.path.abspath(__file__), "--child", mode, str(cpu), str(wall),
                                   str(work)], env=env, text=True)
    return json.loads(out.strip().splitlines()[-1])


def calibrate(python: str, seconds: float) -> int:
    r = run(python, "none", "default", 200)
    return max(50, int(200 * seconds / max(r["elapsed"], 1e-3)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one unprofiled run")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--child", nargs=4, metavar=("MODE", "CPU", "WALL", "WORK"), help=argparse.SUPPRESS)
    ap.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, cpu, wall, work = args.child
        child(mode, float(cpu), float(wall), int(work))
        return
    if args.build:
        build_bench_extension(args.build)
        return
    bench_dir = bench_extension(args.python)
    try:
        measure(args, bench_dir)
    finally:
        if bench_dir:
            shutil.rmtree(bench_dir, ignore_errors=True)


def measure(args: argparse.Namespace, bench_dir: Optional[str]) -> None:
    work = calibrate(args.python, args.seconds)
    ver = subprocess.check_output([args.python, "-c", "import sys;print(sys.version.split()[0])"], text=True).strip()
    print(f"Python {ver} ({args.python}), workload: {work} iterations, {args.reps} interleaved runs each, median")
    print(f"{'rates':<34} {'unprofiled':>11} {'async-prof':>11} {'+py frames':>11} "
          f"{'asprof %':>9} {'frames %':>9} {'ns/sample':>10} {'capture ns':>10} {'samples/s':>10} {'est. %':>7}")
    for rate, (cpu, wall) in RATES.items():
        times = {"none": [], "asprof": [], "frames": []}
        for _ in range(args.reps):
            for mode in times:
                times[mode].append(run(args.python, mode, rate, work)["elapsed"])
        med = {m: statistics.median(v) for m, v in times.items()}
        timed = run(args.python, "frames", rate, work, timing=True, bench_dir=bench_dir)
        st = timed["stats"] or {}
        ns = st.get("timed_ns", 0) / max(1, st.get("timed_signals", 0))
        cap_ns = timed.get("capture_ns") or 0
        sps = st.get("samples", 0) / max(timed["elapsed"], 1e-9)
        label = f"{rate} ({cpu * 1000:g} ms cpu, {wall * 1000:g} ms wall)"
        print(f"{label:<34} {med['none']:>10.3f}s {med['asprof']:>10.3f}s {med['frames']:>10.3f}s "
              f"{100 * (med['asprof'] / med['none'] - 1):>+8.2f}% {100 * (med['frames'] / med['asprof'] - 1):>+8.2f}% "
              f"{ns:>10.0f} {cap_ns:>10.0f} {sps:>10.0f} {100 * ns * sps / 1e9:>6.2f}%")
    print("asprof %: async-profiler alone vs unprofiled; frames %: with Python frames vs async-profiler alone;")
    print("ns/sample: our share of each profiling signal, timed in the handler (includes preemption);")
    print("capture ns: the same capture path (slot, guard check, walk of 24 frames, code table, ring) run")
    print("2000 times in a row outside a handler, best of 5 batches: the CPU cost without scheduling noise;")
    print("est. %: ns/sample x samples/s, the capture's share of the workload's CPU (robust to a noisy host).")


if __name__ == "__main__":
    main()
