"""Python frames in async-profiler samples (issue #5): join rate, fidelity, safety.

The profiled workloads run in child interpreters (every CPython 3.9-3.14 found under pyenv,
with the real async-profiler); this process reads their recordings with asprof.jfr and
asprof.jfr.pystacks. The file doubles as the child script: ``python tests/real/test_pyframes.py child
<scenario> <out dir> [seconds]``.

Opt-in: ``ASPROF_SOAK=1`` runs the 10-minute safety soak on every version
(``ASPROF_SOAK_SECONDS`` to change its length); by default a ~15 s soak runs on this Python.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYENV = os.path.expanduser("~/.pyenv/versions")
VERSIONS = ("3.9", "3.10", "3.11", "3.12", "3.13", "3.14")


# ---------------------------------------------------------------------------------------------
# Building the extensions for another interpreter (no Cython needed: the generated C is used)
# ---------------------------------------------------------------------------------------------

def interpreters():
    """(version, path) of the CPython 3.9-3.14 interpreters found (pyenv, then this one)."""
    found = {}
    for v in VERSIONS:
        for path in sorted(glob.glob(os.path.join(PYENV, v + ".*", "bin", "python" + v))):
            found[v] = path
    me = "%d.%d" % sys.version_info[:2]
    if me in VERSIONS and me not in found:
        found[me] = sys.executable
    return sorted(found.items(), key=lambda kv: tuple(map(int, kv[0].split("."))))


def build_for(python):
    """Builds asprof._native and asprof._pyframes in place for ``python`` (if out of date).
    Returns None or why it could not."""
    try:
        out = subprocess.check_output([python, "-c",
            "import sysconfig,json;print(json.dumps([sysconfig.get_paths()['include'],"
            "sysconfig.get_config_var('EXT_SUFFIX')]))"], text=True)
        inc, suffix = json.loads(out)
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
        return f"cannot query {python}: {e}"
    jobs = [("asprof/_native", ["asprof/_native.c"] + sorted(glob.glob(os.path.join(ROOT, "csrc/core/*.c"))),
             "csrc/core"),
            ("asprof/_pyframes", sorted(glob.glob(os.path.join(ROOT, "csrc/pyframes/*.c"))), "csrc/pyframes")]
    for name, srcs, incdir in jobs:
        srcs = [s if os.path.isabs(s) else os.path.join(ROOT, s) for s in srcs]
        target = os.path.join(ROOT, name + suffix)
        deps = srcs + glob.glob(os.path.join(ROOT, incdir, "*.h")) + glob.glob(os.path.join(ROOT, "csrc/include/*.h"))
        if not all(os.path.exists(s) for s in srcs):
            if os.path.exists(target):
                continue
            return f"sources of {name} missing (run: python setup.py build_ext --inplace)"
        if os.path.exists(target) and os.path.getmtime(target) >= max(map(os.path.getmtime, deps)):
            continue
        cmd = ["gcc", "-shared", "-fPIC", "-O2", "-g", "-std=gnu11", "-D_GNU_SOURCE=1",
               "-fvisibility=hidden", "-I" + inc, "-I" + os.path.join(ROOT, incdir),
               "-I" + os.path.join(ROOT, "csrc/include")] + srcs + \
              ["-o", target + ".tmp", "-ldl", "-lpthread"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return f"gcc failed for {name}{suffix}: {r.stderr[-2000:]}"
        os.replace(target + ".tmp", target)
    return None


def library_path():
    for p in (os.environ.get("ASPROF_LIB"), os.path.join(ROOT, "asprof/lib/libasyncProfiler.so"),
              "/usr/local/lib/libasyncProfiler.so", "/usr/lib/libasyncProfiler.so"):
        if p and os.path.exists(p) and _is_elf(p):
            return p
    return None


def _is_elf(path):
    """A file mounted or copied over the library that is not one counts as absent."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def run_child(python, scenario, out_dir, seconds, extra_env=None, timeout=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT
    env.pop("PYTHONHOME", None)
    env.update(extra_env or {})
    cmd = [python, os.path.abspath(__file__), "child", scenario, out_dir, str(seconds)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=timeout or (seconds * 4 + 60))


# ---------------------------------------------------------------------------------------------
# The child: workloads under the real engine
# ---------------------------------------------------------------------------------------------

def _child(scenario, out_dir, seconds):  # noqa: C901 - a script
    import asyncio
    import gc
    import logging
    import threading
    import zlib

    logging.basicConfig(level=logging.DEBUG if os.environ.get("ASPROF_DEBUG") else logging.WARNING)
    from asprof.engines.asyncprofiler import NativeEngine
    from asprof.options import ProfilerOptions

    cpu = float(os.environ.get("ASPROF_TEST_CPU", "0.001"))
    wall = float(os.environ.get("ASPROF_TEST_WALL", "0.01"))
    rotate = float(os.environ.get("ASPROF_TEST_ROTATE", "2"))
    opts = ProfilerOptions(cpu_interval=cpu, wall_interval=wall,
                           all_user=os.environ.get("ASPROF_TEST_ALLUSER", "1") == "1",
                           python_frames=os.environ.get("ASPROF_TEST_PYFRAMES", "1") == "1",
                           python_frames_inline=False)  # this file reads the capture's own events
    engine = NativeEngine(opts, library_path=os.environ.get("ASPROF_LIB"))
    stop = threading.Event()
    info = {"tids": {}, "eintr": 0, "errors": []}
    payload = os.urandom(1 << 16)

    def mark(name):
        info["tids"][name] = threading.get_native_id()

    # -- fidelity: 75% of this thread's CPU in alpha (part of it in zlib), 25% in beta --------
    # Few system calls (the CPU engine counts user time only, "alluser"): the clock is read
    # every ~0.3 ms of work, and zlib (which releases the GIL) runs on 16 KiB at a time.
    def alpha(budget):
        t0 = time.thread_time()
        x = 0
        while time.thread_time() - t0 < budget:
            for _ in range(10):
                for i in range(300):
                    x += i * i
            zlib.compress(payload[: 16384], 6)
        return time.thread_time() - t0

    def beta(budget):
        t0 = time.thread_time()
        x = 0
        while time.thread_time() - t0 < budget:
            for _ in range(20):
                for i in range(300):
                    x ^= i * 7
        return time.thread_time() - t0

    def fidelity():
        # Self-correcting: the CPU time measured inside alpha stays at 3x beta's (75% / 25%).
        mark("fidelity")
        ta = tb = 0.0
        while not stop.is_set():
            if ta <= 3 * tb:
                ta += alpha(0.006)
            else:
                tb += beta(0.002)
        info["truth"] = {"alpha": ta, "beta": tb}

    # -- recursion 1000 deep -------------------------------------------------------------------
    def recurse(n):
        if n == 0:
            t0 = time.thread_time()
            x = 0
            while time.thread_time() - t0 < 0.05:
                x += 1
            return x
        return recurse(n - 1) + 1

    def deep():
        mark("deep")
        sys.setrecursionlimit(5000)
        while not stop.is_set():
            recurse(1000)
            time.sleep(0.1)  # leave most of the GIL to the fidelity thread

    # -- asyncio coroutines ------------------------------------------------------------------
    async def crunch(n):
        x = 0
        for i in range(n):
            x += i % 7
        await asyncio.sleep(0)
        return x

    async def pipeline():
        while not stop.is_set():
            await asyncio.gather(crunch(20000), crunch(10000))
            await asyncio.sleep(0.01)

    def aio():
        mark("asyncio")
        asyncio.run(pipeline())

    # -- a sleeper (wall samples) -------------------------------------------------------------
    def sleeper():
        mark("sleeper")
        while not stop.is_set():
            time.sleep(0.02)

    # -- safety churn -------------------------------------------------------------------------
    def guarded(fn):
        def run():
            try:
                fn()
            except InterruptedError:
                info["eintr"] += 1
            except Exception as e:  # noqa: BLE001
                info["errors"].append(repr(e))
        return run

    def thread_churn():
        while not stop.is_set():
            ts = [threading.Thread(target=lambda: sum(i * i for i in range(2000))) for _ in range(8)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

    def code_churn():
        k = 0
        while not stop.is_set():
            ns = {}
            exec(f"def churn_{k % 50}(n):\n    return sum(i for i in range(n))\n", ns)
            ns[f"churn_{k % 50}"](3000)
            k += 1

    def gc_pressure():
        while not stop.is_set():
            junk = [[{"a": i, "b": [i] * 3} for i in range(200)] for _ in range(20)]
            for j in junk:
                j.append(j)  # cycles
            del junk
            gc.collect(0)

    def generators():
        def gen(n):
            for i in range(n):
                yield i * 2

        def nested(n):
            yield from gen(n)
        while not stop.is_set():
            sum(nested(5000))

    def spawner():
        if os.environ.get("ASPROF_TEST_NO_VFORK") == "1":  # ASan cannot intercept vfork here
            subprocess._USE_VFORK = False  # type: ignore[attr-defined]
        while not stop.is_set():
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            r = os.fork() if hasattr(os, "fork") else 0
            if r == 0:
                os._exit(0)
            os.waitpid(r, 0)

    workers = {"fidelity": [fidelity, deep, aio, sleeper],
               "soak": [fidelity, deep, aio, sleeper, thread_churn, code_churn, gc_pressure, generators,
                        spawner]}[scenario]
    engine.start()
    if os.environ.get("ASPROF_TEST_LATE_FAULTHANDLER") == "1":
        import faulthandler  # installs its SIGSEGV handler in front of ours: we must get back in front

        faulthandler.enable()
    threads = [threading.Thread(target=guarded(w), name=w.__name__, daemon=True) for w in workers]
    for t in threads:
        t.start()
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(min(rotate, max(0.0, deadline - time.monotonic())))
        except InterruptedError:
            info["eintr"] += 1
        if time.monotonic() >= deadline:
            break
        res = engine.tick()
        if res.recording:
            with open(os.path.join(out_dir, f"rec-{n:03d}.jfr"), "wb") as f:
                f.write(res.recording)
            n += 1
    stop.set()
    for t in threads:
        t.join(30)
        if t.is_alive():
            info["errors"].append(f"thread {t.name} hung")
    data = engine.stop()
    if data:
        with open(os.path.join(out_dir, f"rec-{n:03d}.jfr"), "wb") as f:
            f.write(data)
    cap = getattr(engine, "_pyframes", None)
    info["stats"] = cap.stats() if cap is not None else None
    info["library"] = engine.info.version
    engine.close()
    with open(os.path.join(out_dir, "info.json"), "w") as f:
        json.dump(info, f)


# ---------------------------------------------------------------------------------------------
# Analysis (in the test process)
# ---------------------------------------------------------------------------------------------

def analyse(out_dir):
    """Per-kind join stats, the fidelity split, and the collapsed stacks of every recording."""
    import asprof.jfr as jfr
    from asprof.jfr.pystacks import JoinStats, PythonStacks
    from asprof.jfr.views import to_collapsed

    with open(os.path.join(out_dir, "info.json")) as f:
        info = json.load(f)
    files = sorted(glob.glob(os.path.join(out_dir, "rec-*.jfr")))
    res = {"info": info, "files": len(files), "found": 0, "emitted": 0,
           "cpu": JoinStats(), "wall": JoinStats(), "collapsed": {"cpu": [], "wall": []}, "python_only": []}
    for path in files:
        rec = jfr.open(path)
        ps = PythonStacks.from_recording(rec)
        res["found"] += ps.sample_count
        res["emitted"] += ps.emitted
        for kind in ("cpu", "wall"):
            prof = rec.samples(kind, stack_hook=ps.stack_hook(rec, stats=res[kind]), by_thread=True)
            res["collapsed"][kind].extend(to_collapsed(prof).splitlines())
        prof = rec.samples("cpu", stack_hook=ps.stack_hook(rec, mode="python"), by_thread=True)
        res["python_only"].extend(to_collapsed(prof).splitlines())
    return res


def _weight(line):
    return int(line.rsplit(" ", 1)[1])


def thread_lines(lines, tid):
    return [ln for ln in lines if f" tid={tid}]" in ln.split(";", 1)[0]]


_PY_FRAME = re.compile(r" \([^;()]*:\d+\)$")


def _python_after_native(line):
    """Whether a collapsed stack has a Python frame leafward of a native one (spliced in)."""
    frames = line.rsplit(" ", 1)[0].split(";")[1:]
    native = [i for i, f in enumerate(frames) if not _PY_FRAME.search(f)]
    return bool(native) and any(_PY_FRAME.search(f) for f in frames[native[0]:])


def fidelity_split(res):
    tid = res["info"]["tids"]["fidelity"]
    a = b = 0
    for ln in thread_lines(res["collapsed"]["cpu"], tid):
        if ".alpha (" in ln:
            a += _weight(ln)
        elif ".beta (" in ln:
            b += _weight(ln)
    return a, b


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

if __name__ != "__main__":
    import pytest

    LIB = library_path()
    needs_lib = pytest.mark.skipif(LIB is None, reason="libasyncProfiler.so (4.5) not found: set ASPROF_LIB")

    def _python_for(version):
        for v, path in interpreters():
            if v == version:
                return path
        return None

    def _prepared(version):
        python = _python_for(version)
        if python is None:
            pytest.skip(f"CPython {version} not installed (looked in {PYENV}; or run the suite under it, "
                        "e.g. 3.14 in a Debian sid chroot: docs/python-frames.md)")
        why = build_for(python)
        if why:
            pytest.skip(f"cannot build the extensions for {version}: {why}")
        return python

    @pytest.fixture(scope="module")
    def fidelity_runs(tmp_path_factory):
        """One 6-second fidelity run per CPython version, analysed once."""
        cache = {}

        def get(version):
            if version not in cache:
                python = _prepared(version)
                out = str(tmp_path_factory.mktemp(f"fid{version}"))
                r = run_child(python, "fidelity", out, 6)
                assert r.returncode == 0, f"child failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
                cache[version] = analyse(out)
            return cache[version]
        return get

    @needs_lib
    @pytest.mark.parametrize("version", VERSIONS)
    def test_join_rate_and_counts(version, fidelity_runs):
        res = fidelity_runs(version)
        cpu, wall = res["cpu"], res["wall"]
        print(f"\n{version}: cpu {cpu} rate={cpu.rate:.4f}; wall {wall} rate={wall.rate:.4f}; "
              f"emitted={res['emitted']} found={res['found']} files={res['files']} "
              f"stats={res['info']['stats']}")
        assert res["files"] >= 2  # rotated at least once: every file carries its own definitions
        assert cpu.with_python > 500 and wall.with_python > 50
        assert cpu.rate >= 0.99, cpu
        assert wall.rate >= 0.99, wall
        # asprof_emit_jfr_event reports success even when it drops: count both sides.
        assert res["found"] <= res["emitted"]
        assert res["found"] >= 0.99 * res["emitted"]

    @needs_lib
    @pytest.mark.parametrize("version", VERSIONS)
    def test_fidelity_alpha_beta(version, fidelity_runs):
        res = fidelity_runs(version)
        a, b = fidelity_split(res)
        share = 100.0 * a / max(1, a + b)
        print(f"\n{version}: alpha {a} beta {b} -> alpha {share:.1f}%")
        assert a + b > 300
        assert abs(share - 75.0) <= 5.0

    @needs_lib
    @pytest.mark.parametrize("version", VERSIONS)
    def test_mixed_stack_alpha_zlib_deflate(version, fidelity_runs):
        res = fidelity_runs(version)
        tid = res["info"]["tids"]["fidelity"]
        pat = re.compile(r"\.alpha \([^;]*\);(?:[^;]*;)*?zlib_compress[^;]*;(?:[^;]*;)*?deflate")
        alpha = [ln for ln in thread_lines(res["collapsed"]["cpu"], tid) if ".alpha (" in ln]
        if alpha and not any(_python_after_native(ln) for ln in alpha):
            pytest.skip("this interpreter's eval loop has no symbol async-profiler can name (a stripped build, "
                        "e.g. Debian's python3.14 without debug symbols): Python frames cannot be spliced in")
        lines = [ln for ln in thread_lines(res["collapsed"]["cpu"], tid) if pat.search(ln)]
        assert lines, "no alpha -> zlib.compress -> deflate stack"
        # Python frames replaced the eval loop: no _PyEval_EvalFrameDefault left on those stacks
        assert not any("_PyEval_EvalFrameDefault" in ln for ln in lines)
        # the root of the thread's stack is native (clone/start_thread), Python in the middle
        assert any("start_thread" in ln for ln in lines)

    @needs_lib
    @pytest.mark.parametrize("version", VERSIONS)
    def test_recursion_truncated_and_flagged(version, fidelity_runs):
        res = fidelity_runs(version)
        tid = res["info"]["tids"]["deep"]
        lines = [ln for ln in thread_lines(res["python_only"], tid) if ".recurse (" in ln]
        assert lines
        flagged = [ln for ln in lines if "[truncated Python stack]" in ln]
        assert sum(map(_weight, flagged)) >= 0.9 * sum(map(_weight, lines))
        depth = max(ln.count(".recurse (") for ln in flagged)
        assert 100 <= depth <= 128

    @needs_lib
    @pytest.mark.parametrize("version", VERSIONS)
    def test_asyncio_coroutines(version, fidelity_runs):
        res = fidelity_runs(version)
        tid = res["info"]["tids"]["asyncio"]
        lines = thread_lines(res["collapsed"]["cpu"], tid)
        crunch = [ln for ln in lines if ".crunch (" in ln]
        assert crunch, "no coroutine frames"
        assert any(".pipeline (" in ln for ln in crunch) or any("_run_once" in ln for ln in crunch)

    @needs_lib
    @pytest.mark.parametrize("version", VERSIONS)
    def test_python_only_view(version, fidelity_runs):
        res = fidelity_runs(version)
        tid = res["info"]["tids"]["fidelity"]
        lines = thread_lines(res["python_only"], tid)
        alpha = [ln for ln in lines if ".alpha (" in ln]
        assert alpha and not any("zlib_compress" in ln or "start_thread" in ln for ln in alpha)

    @needs_lib
    def test_off_by_option(tmp_path):
        python = _prepared("%d.%d" % sys.version_info[:2])
        r = run_child(python, "fidelity", str(tmp_path), 2, {"ASPROF_TEST_PYFRAMES": "0"})
        assert r.returncode == 0, r.stderr
        res = analyse(str(tmp_path))
        assert res["found"] == 0 and res["info"]["stats"] is None
        assert res["cpu"].with_python == 0

    @needs_lib
    def test_timestamp_join_rate(tmp_path):
        """The join used with async-profiler 4.0-4.4 (sample_counter is an event counter there):
        the handler's own timestamp against the sample's startTime. Forced here on 4.5."""
        python = _prepared("%d.%d" % sys.version_info[:2])
        r = run_child(python, "fidelity", str(tmp_path), 4, {"ASPROF_PYFRAMES_JOIN": "timestamp"})
        assert r.returncode == 0, r.stderr
        res = analyse(str(tmp_path))
        cpu, wall = res["cpu"], res["wall"]
        print(f"\ntimestamp join: cpu {cpu} rate={cpu.rate:.4f}; wall {wall} rate={wall.rate:.4f}")
        assert cpu.exact == 0 and cpu.timestamp > 300
        assert cpu.rate >= 0.98 and wall.rate >= 0.98
        a, b = fidelity_split(res)
        assert abs(100.0 * a / max(1, a + b) - 75.0) <= 5.0

    @needs_lib
    @pytest.mark.parametrize("env", [{"PYTHONFAULTHANDLER": "1"}, {"ASPROF_TEST_LATE_FAULTHANDLER": "1"}])
    def test_with_faulthandler(tmp_path, env):
        """faulthandler before us (we chain to it) or after us (the guard gets back in front)."""
        python = _prepared("%d.%d" % sys.version_info[:2])
        r = run_child(python, "fidelity", str(tmp_path), 3, env)
        assert r.returncode == 0, r.stderr
        res = analyse(str(tmp_path))
        st = res["info"]["stats"]
        print(f"\n{env}: cpu rate {res['cpu'].rate:.4f}, no_guard={st['no_guard']}, "
              f"reinstalled={st['guard_reinstalled']}")
        assert res["cpu"].rate >= 0.95
        if "ASPROF_TEST_LATE_FAULTHANDLER" in env:
            assert st["guard_reinstalled"] >= 1

    SOAK = os.environ.get("ASPROF_SOAK") == "1"

    @needs_lib
    @pytest.mark.parametrize("version", VERSIONS if SOAK else ("%d.%d" % sys.version_info[:2],))
    def test_safety_soak(version, tmp_path):
        """Thread churn, code churn, GC pressure, generators, subprocess and fork in a loop under
        1 ms CPU / 10 ms wall sampling: no crash, no hang, no EINTR reaching Python code."""
        python = _prepared(version)
        seconds = int(os.environ.get("ASPROF_SOAK_SECONDS", "600" if SOAK else "15"))
        t0 = time.monotonic()
        r = run_child(python, "soak", str(tmp_path), seconds, timeout=seconds * 3 + 120)
        took = time.monotonic() - t0
        assert r.returncode == 0, f"exit {r.returncode} after {took:.0f}s:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
        with open(tmp_path / "info.json") as f:
            info = json.load(f)
        print(f"\n{version}: soak {seconds}s took {took:.0f}s, stats {info['stats']}")
        assert info["eintr"] == 0 and not info["errors"], info
        st = info["stats"]
        assert st["samples"] > 100 and st["emitted_samples"] > 100
        res = analyse(str(tmp_path))
        assert res["cpu"].rate >= 0.98, res["cpu"]


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "child":
        _child(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "build":
        for v, p in interpreters():
            print(v, p, build_for(p) or "ok")
    else:
        print(__doc__)
