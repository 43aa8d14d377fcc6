"""The process life-cycle of test_lifecycle.py with the built-in engine (issue #11): the last
profile at SIGTERM (once, then the process dies of SIGTERM as it would have), the application's
SIGTERM handler kept, os._exit leaving nothing behind, a forked child profiling itself while the
parent carries on — every report a valid JFR read by asprof."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Tuple

import pytest

import asprof.jfr
from asprof.engines.builtin import unavailable_reason

from conftest import check_jfr, child_env

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=f"the built-in engine is unavailable: {unavailable_reason()}")

PRELUDE = """
import os, sys, signal, threading, time, asprof
out = {out!r}
def profiler():
    return asprof.Profiler(asprof.LocalReporter(out), reporting_interval=30,
                           options=asprof.ProfilerOptions(engine="builtin", cpu_interval=0.005, wall_interval=0.05))
def burn(s):
    t = time.monotonic() + s
    while time.monotonic() < t:
        sum(i * i for i in range(1000))
"""


def _run(code: str, out: Path, sig: Optional[int] = None) -> Tuple[int, str, str]:
    p = subprocess.Popen([sys.executable, "-c", PRELUDE.format(out=str(out)) + code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=child_env())
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.startswith("ready"), (line, p.stderr.read() if p.stderr else "")
    if sig is not None:
        p.send_signal(sig)
    rest, err = p.communicate(timeout=60)
    return p.returncode, line + rest, err


def _samples(f: Path) -> int:
    counts = asprof.jfr.open(str(f)).counts
    return counts.get("jdk.ExecutionSample", (0, 0))[0] + counts.get("profiler.WallClockSample", (0, 0))[0]


def test_sigterm_delivers_the_last_profile_once_and_dies_of_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, _, err = _run("""
profiler().start().detach()
burn(0.5)
print("ready", flush=True)
time.sleep(60)
""", out, signal.SIGTERM)
    assert rc == -signal.SIGTERM, err
    files = list(out.glob("*.jfr"))
    assert len(files) == 1, files
    assert check_jfr(files[0])["chunks"] == 1 and _samples(files[0]) > 0
    assert err == ""  # nothing printed by the agent


def test_the_applications_sigterm_handler_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, _, err = _run("""
signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))
profiler().start().detach()
burn(0.3)
print("ready", flush=True)
time.sleep(60)
""", out, signal.SIGTERM)
    assert rc == 3, err
    files = list(out.glob("*.jfr"))
    assert len(files) == 1 and _samples(files[0]) > 0


def test_os_exit_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, _, err = _run("""
profiler().start().detach()
print("ready", flush=True)
os._exit(7)
""", out)
    assert rc == 7, err
    assert not out.exists() or list(out.iterdir()) == []


def test_forked_child_profiles_itself_and_the_parent_carries_on(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, stdout, err = _run("""
r = profiler().start()
burn(0.3)
pid = os.fork()
if pid == 0:
    burn(0.3)
    assert asprof.stop_profiling(timeout=10)
    os._exit(0)
burn(0.3)
_, status = os.waitpid(pid, 0)
assert status == 0 and r.running
r.stop()
print("ready", pid, flush=True)
""", out)
    assert rc == 0, err
    parent_pid = int(stdout.split()[1])
    by_pid = {f.name.split("_")[1].split(".")[0].split("-")[0]: f for f in out.glob("*.jfr")}
    assert str(parent_pid) in by_pid and len(by_pid) == 2, (by_pid, err)
    for f in by_pid.values():
        assert check_jfr(f)["chunks"] == 1 and _samples(f) > 0
