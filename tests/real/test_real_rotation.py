"""Rotation on the real async-profiler (skipped, with the reason shown, when it is not
installed): ticks are dumps, so sampling never stops; every report carries the settings;
no sample is handed over twice or lost at a boundary; the recording file does not grow on
disk; full rotations (stop, swap, start) still happen when due."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from conftest import JFR_TOOL, child_env, requires_real

pytestmark = requires_real

SCRIPT = """
import json, os, sys, time, hashlib
import asprof
from asprof.engines import asyncprofiler as engine_mod
from asprof.engines.asyncprofiler import NativeEngine

out, age, pool = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
engine_mod.FULL_ROTATION_AGE_S = age
engine_mod.FULL_ROTATION_POOL_BYTES = pool

def busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        hashlib.sha256(os.urandom(4096)).digest()
        sum(i * i for i in range(2000))

# the side events themselves are checked here: reports as recorded, not rewritten inline
eng = NativeEngine(asprof.ProfilerOptions(cpu_interval=0.001, wall_interval=0.01, python_frames_inline=False))
eng.start()
files, active, disk = [], [], []
for i in range(8):
    busy(0.25)
    rec = eng.tick().recording
    st = os.fstat(eng._session.active_fd)
    active.append(eng._session.active_fd)
    disk.append({"allocated": st.st_blocks * 512, "size": st.st_size, "pending": eng._session.active_size(),
                 "can_free": eng._session.can_free_reported})
    files.append(rec)
busy(0.1)
files.append(eng.stop())
eng.close()
names = []
for i, data in enumerate(files):
    assert data, i
    p = os.path.join(out, f"{i:02d}.jfr")
    open(p, "wb").write(data)
    names.append(p)
json.dump({"files": names, "active": active, "disk": disk, "tid": __import__("threading").get_native_id()},
          open(os.path.join(out, "result.json"), "w"))
"""


def run(tmp_path: Path, age: float, pool: int) -> Dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(age), str(pool)],
                       capture_output=True, text=True, timeout=120, env=child_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    return json.loads((tmp_path / "result.json").read_text())


def samples_of(files: List[str], tid: int) -> List[List[int]]:
    """Per report: the times (ns) of the CPU samples of the thread ``tid``."""
    import asprof.jfr

    out = []
    for f in files:
        rec = asprof.jfr.open(f)
        times = [ev.time_ns for ev in rec.events(["jdk.ExecutionSample"])
                 if ev.thread is not None and ev.thread.os_thread_id == tid]
        out.append(sorted(times))
    return out


def check_reports(files: List[str]) -> None:
    import asprof.jfr
    from asprof.jfr.pystacks import JoinStats, python_stack_hook

    for f in files:
        rec = asprof.jfr.open(f)
        assert rec.setting("interval") == "1000000", f  # every report carries the settings
        assert rec.counts["jdk.ExecutionSample"][0] > 0, f
        stats = JoinStats()
        hook = python_stack_hook(rec, stats=stats)
        assert hook is not None, f"{f}: no Python stacks"
        rec.samples("cpu", stack_hook=hook)
        assert stats.rate > 0.95, (f, stats)
        if JFR_TOOL is not None:
            out = subprocess.run([str(JFR_TOOL), "summary", f], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and "jdk.ActiveSetting" in out.stdout, out.stderr


def check_continuity(files: List[str], tid: int) -> None:
    per_report = samples_of(files, tid)
    flat = [t for times in per_report for t in times]
    assert len(flat) == len(set(flat)), "a sample was handed over twice"
    for a, b in zip(per_report, per_report[1:]):
        assert a and b and a[-1] < b[0], "reports overlap"


def test_ticks_are_dumps_sampling_never_stops(tmp_path: Path) -> None:
    res = run(tmp_path, age=3600.0, pool=1 << 40)
    assert len(set(res["active"])) == 1, "a tick stopped and restarted async-profiler"
    check_reports(res["files"])
    check_continuity(res["files"], res["tid"])
    # The boundaries cost no samples: the busy thread's gaps across them are like any other.
    per_report = samples_of(res["files"], res["tid"])
    inner = sorted(b - a for times in per_report for a, b in zip(times, times[1:]))
    boundary = [b[0] - a[-1] for a, b in zip(per_report, per_report[1:])]
    assert max(boundary) <= max(inner[len(inner) * 99 // 100], 5_000_000) * 2, (boundary, inner[-5:])
    # What was handed over no longer takes disk space, although the file keeps its offsets.
    disk = res["disk"]
    assert disk[-1]["size"] > disk[0]["size"]
    if disk[-1]["can_free"]:
        for d in disk:
            assert d["allocated"] <= d["pending"] + 8192, d
    else:
        pytest.fail(f"the file system of the recording cannot punch holes: {disk[-1]}")


@pytest.mark.parametrize("age, pool", [(0.6, 1 << 40), (3600.0, 1)], ids=["by-age", "by-pool-size"])
def test_full_rotations_when_due_keep_every_report_whole(tmp_path: Path, age: float, pool: int) -> None:
    res = run(tmp_path, age=age, pool=pool)
    assert len(set(res["active"])) == 2, "no full rotation happened"
    check_reports(res["files"])
    check_continuity(res["files"], res["tid"])
