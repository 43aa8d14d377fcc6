"""The built-in engine gives each Python function its share of each thread's CPU time.

Runs benchmarks/attribution.py (two threads, two functions, a known split of each thread's
CPU time between them, measured with time.thread_time) for a few seconds in a child
interpreter with the built-in engine at 1 ms, and checks the per-thread shares read back
from the JFR reports with asprof.jfr. The bound here is loose (8 points) so that only gross
misattribution fails; the benchmark itself reports the deviation against the 3-point target.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "attribution.py"
BOUND_POINTS = 8.0


def _builtin_unavailable() -> str:
    """Why the built-in engine cannot run here ('' when it can)."""
    try:
        from asprof.engines import _builtin  # type: ignore[attr-defined]
    except ImportError as e:
        return f"the built-in engine's C module is not built ({e})"
    if not getattr(_builtin, "python_frames", False):
        return "the built-in engine captures no Python stacks on this interpreter"
    import asprof

    try:
        asprof.ProfilerOptions(engine="builtin")  # type: ignore[call-arg]
    except (TypeError, ValueError) as e:
        return f"ProfilerOptions(engine='builtin') is not accepted ({e})"
    return ""


@pytest.fixture(scope="module")
def result() -> Dict[str, Any]:
    why = _builtin_unavailable()
    if why:
        pytest.skip(why)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, str(SCRIPT), "--engine", "builtin", "--seconds", "3", "--json", "-"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out: Dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def test_every_thread_was_sampled(result: Dict[str, Any]) -> None:
    for label, t in result["threads"].items():
        # ~1.5 CPU-seconds per thread at 1 ms: a few hundred samples at the very least
        assert t["samples"] >= 0.3 * t["cpu_s"] / result["cpu_interval"], (label, t)


def test_shares_per_thread_and_function_match_the_measured_cpu_time(result: Dict[str, Any]) -> None:
    for label, t in result["threads"].items():
        for func, dev in t["deviation"].items():
            assert dev <= BOUND_POINTS, (
                f"thread {label}, {func}: engine {t['engine'][func]:.1f}% vs measured {t['truth'][func]:.1f}% "
                f"of the thread's CPU time ({t['samples']} samples)")
