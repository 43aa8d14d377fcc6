"""The built-in engine end to end, in child interpreters (issue #11): the README's demo, each
report a self-contained recording the JDK ``jfr`` tool (where installed) and ``asprof convert``
read; the agent's guarantees with engine="builtin" (nothing printed, kill switch, overhead
guard counting the sampler thread, a clean stop).

Fork, pre-fork servers and the final report at exit/SIGTERM run with the built-in engine in
tests/lifecycle (parametrized over the engine)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import asprof.jfr
from asprof.engines.builtin import unavailable_reason

from conftest import check_jfr

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=f"the built-in engine is unavailable: {unavailable_reason()}")


def _env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASPROF_")}
    env.update(extra)
    return env


def _child(script: str, env: Optional[Dict[str, str]] = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=env if env is not None else _env(), timeout=timeout, cwd=str(ROOT))


def _reports(d: Path) -> List[Path]:
    return sorted(d.glob("*.jfr"))


def test_the_demo_with_the_builtin_engine(tmp_path: Path) -> None:
    out = tmp_path / "profiles"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "3", str(out)], capture_output=True,
                       text=True, env=_env(ASPROF_ENGINE="builtin"), timeout=120, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "engine: builtin" in r.stdout, r.stdout
    reports = _reports(out)
    assert len(reports) >= 2, r.stdout  # several ticks, then the final report
    cpu_total = 0
    for p in reports:  # each report alone is a complete recording
        counts = check_jfr(p)
        assert counts["chunks"] == 1
        rec = asprof.jfr.open(p)
        assert rec.setting("engine") == "builtin"
        assert rec.counts.get("profiler.WallClockSample", (0, 0))[0] > 0, p.name
        cpu_total += rec.counts.get("jdk.ExecutionSample", (0, 0))[0]
        conv = subprocess.run([sys.executable, "-m", "asprof", "convert", str(p), "-o", "-", "--format", "collapsed"],
                              capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
        assert conv.returncode == 0, conv.stderr
    assert cpu_total > 0
    cpu = asprof.jfr.to_collapsed(asprof.jfr.open(out).samples("cpu"))
    assert "__main__.fib" in cpu and "__main__.work" in cpu and "__main__.main" in cpu
    # The demo's worker thread is named as the application named it
    assert "worker" in {t.name for t in asprof.jfr.open(out).threads}


def test_nothing_printed_final_report_at_exit_and_no_thread_left(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _child(f"""
        import threading, time, asprof
        asprof.start_profiling(asprof.LocalReporter({str(out)!r}), reporting_interval=60,
                               options=asprof.ProfilerOptions(engine="builtin", cpu_interval=0.005,
                                                              wall_interval=0.05))
        t = time.monotonic() + 0.8
        while time.monotonic() < t:
            sum(i * i for i in range(1000))
        asprof.stop_profiling()
        import os
        comms = set()
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{{tid}}/comm") as f:
                comms.add(f.read().strip())
        names = [th.name for th in threading.enumerate()]
        assert "asprof-sampler" not in comms and "asprof-agent" not in comms, comms
        assert names == ["MainThread"], names
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""  # the agent never prints
    reports = _reports(out)
    assert len(reports) == 1  # the final report, 60 s before the first tick
    assert asprof.jfr.open(reports[0]).counts["jdk.ExecutionSample"][0] > 0


def test_kill_switch_stops_the_builtin_engine(tmp_path: Path) -> None:
    out, switch = tmp_path / "out", tmp_path / "switch"
    r = _child(f"""
        import os, threading, time, asprof
        p = asprof.Profiler(asprof.LocalReporter({str(out)!r}), reporting_interval=0.2,
                            kill_switch_file={str(switch)!r},
                            options=asprof.ProfilerOptions(engine="builtin", wall_interval=0.05))
        running = p.start()
        time.sleep(0.5)
        open({str(switch)!r}, "w").close()
        t = time.monotonic() + 10
        while running.running and time.monotonic() < t:
            time.sleep(0.05)
        print("stopped" if not running.running else "still running")
        comms = set()
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{{tid}}/comm") as f:
                comms.add(f.read().strip())
        print("sampler left" if "asprof-sampler" in comms else "no sampler")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["stopped", "no", "sampler"], r.stdout + r.stderr


def test_overhead_guard_counts_the_sampler_thread_and_stops_the_engine(tmp_path: Path) -> None:
    # The sampler signals every thread each wall interval: with 40 threads at 1 ms it uses CPU of
    # its own, which the guard's account (agent.loop._own_cpu_seconds) includes; over 0.5% of a
    # core in all, the guard stops profiling with an ERROR line.
    r = _child(f"""
        import logging, os, threading, time, asprof
        from asprof.agent import loop
        logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")
        stop = threading.Event()
        threads = [threading.Thread(target=stop.wait) for _ in range(40)]
        for t in threads:
            t.start()
        p = asprof.Profiler(asprof.LocalReporter({str(tmp_path / "out")!r}), reporting_interval=1.5,
                            max_cpu_percent=0.5,
                            options=asprof.ProfilerOptions(engine="builtin", wall_interval=0.001))
        running = p.start()
        time.sleep(1.0)
        def sampler_cpu():
            for tid in os.listdir("/proc/self/task"):
                try:
                    with open(f"/proc/self/task/{{tid}}/comm") as f:
                        if f.read().strip() != "asprof-sampler":
                            continue
                    with open(f"/proc/self/task/{{tid}}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                except OSError:
                    pass
            return None
        mine = sampler_cpu()
        own = loop._own_cpu_seconds()
        print("sampler", mine, "counted", own >= (mine or 0) > 0)
        t = time.monotonic() + 20
        while running.running and time.monotonic() < t:
            time.sleep(0.1)
        stop.set()
        print("stopped" if not running.running else "still running")
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].endswith("counted True"), r.stdout
    assert lines[1] == "stopped", r.stdout + r.stderr
    assert "overhead guard" in r.stderr


def test_the_readme_demo_on_a_machine_without_async_profiler(tmp_path: Path) -> None:
    # The README's first command with the default engine (auto) where async-profiler cannot be
    # found: the real loader looks where nothing is, and the demo records with the built-in engine.
    out = tmp_path / "profiles"
    r = _child(f"""
        import sys, runpy
        import asprof.engines.asyncprofiler as ap
        ap._BUNDLED = "/nonexistent/asprof-test/libasyncProfiler.so"
        ap.SONAME = "libasyncProfiler-asprof-test-missing.so"
        sys.argv = ["demo.py", "2", {str(out)!r}]
        runpy.run_path({str(ROOT / "examples" / "demo.py")!r}, run_name="__main__")
    """)
    assert r.returncode == 0, r.stderr
    assert "engine: builtin" in r.stdout, r.stdout
    assert "built-in" in r.stderr  # the demo logs INFO: the one line saying why
    cpu = asprof.jfr.to_collapsed(asprof.jfr.open(out).samples("cpu"))
    assert "__main__.fib" in cpu and "__main__.work" in cpu
