"""Against the real async-profiler (skipped, with the reason shown, when it is not installed).

Each scenario runs in a child interpreter: async-profiler is process-global, and
the child's stdout/stderr show whether anything leaked onto them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from conftest import JFR_TOOL, check_jfr, requires_real

pytestmark = requires_real

WORKLOAD = """
import json, os, sys, threading, time, zlib, hashlib

def alpha(n):
    x = 0
    for i in range(n):
        x += i * i
    return x

def native_work():
    data = os.urandom(200_000)
    zlib.compress(data, 6)
    hashlib.sha256(data).hexdigest()
    json.dumps([{"k": i, "v": str(i)} for i in range(2000)])

def busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        alpha(20_000)
        native_work()

def sleeper(stop):
    stop.wait()
"""


RUN_SCRIPT = WORKLOAD + """
import asprof
out, result = sys.argv[1], sys.argv[2]
def fds():
    return sorted(os.listdir("/proc/self/fd"))
def threads():
    return sorted(os.listdir("/proc/self/task"))
asprof.library_info()
fds0, threads0 = fds(), threads()
stop = threading.Event()
bg = [threading.Thread(target=busy, args=(3.2,)), threading.Thread(target=sleeper, args=(stop,))]
profiler = asprof.Profiler(asprof.LocalReporter(out), reporting_interval=1.0,
                           options=asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.05))
running = profiler.start()
for t in bg: t.start()
busy(3.2)
t0 = time.monotonic()
ok = running.stop(timeout=10)
stop_seconds = time.monotonic() - t0
stop.set()
for t in bg: t.join()
# a joined thread's task can stay listed for a moment after pthread_join returns (the kernel
# wakes the joiner before it reaps the task): a thread left behind stays, one that ended goes
deadline = time.monotonic() + 2
while threads() != threads0 and time.monotonic() < deadline:
    time.sleep(0.01)
json.dump({"ok": ok, "stop_seconds": stop_seconds, "fds_before": fds0, "fds_after": fds(),
           "threads_before": threads0, "threads_after": threads()}, open(result, "w"))
"""


def test_profiles_a_real_workload_with_rotations(tmp_path: Path) -> None:
    out, result = tmp_path / "profiles", tmp_path / "result.json"
    r = subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, str(out), str(result)],
        capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", "async-profiler wrote to the application's stdout/stderr"
    res = json.loads(result.read_text())
    assert res["ok"] and res["stop_seconds"] < 1.0
    assert res["fds_after"] == res["fds_before"], "a descriptor was left behind"
    assert res["threads_after"] == res["threads_before"], "a thread was left behind"
    files = sorted(out.glob("*.jfr"))
    assert len(files) >= 3, files  # three ticks at 1 s plus the final profile
    counts = [check_jfr(f) for f in files]
    if JFR_TOOL is not None:
        for f, c in zip(files, counts):
            assert c.get("jdk.ExecutionSample", 0) > 0, (f.name, c)
            assert c.get("profiler.WallClockSample", 0) > 0, (f.name, c)


def _env(**extra: str) -> Dict[str, str]:
    from conftest import child_env

    return child_env(**extra)


FORK_SCRIPT = WORKLOAD + """
import asprof
out = sys.argv[1]
running = asprof.Profiler(asprof.LocalReporter(out), reporting_interval=0.5,
                          options=asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.05)).start()

def child_exits_normally():
    pid = os.fork()
    if pid == 0:
        busy(0.2)
        sys.exit(0)   # a normal exit runs async-profiler's atexit hook in the child
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status

busy(0.3)
child_exits_normally()     # while the parent records
busy(0.8)                  # the parent rotates meanwhile
child_exits_normally()     # finished files exist now
busy(0.8)
assert running.stop(timeout=10)
"""


def test_forked_children_exiting_normally_leave_the_parents_files_valid(tmp_path: Path) -> None:
    out = tmp_path / "profiles"
    r = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(out)], capture_output=True, text=True,
                       timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.jfr"))
    assert len(files) >= 3
    for f in files:
        c = check_jfr(f)
        if JFR_TOOL is not None:
            # one checkpoint per chunk (the fork adds a chunk: stop, fork, resume);
            # a child's stop would add a checkpoint of its own
            assert c.get("jdk.CheckPoint") == c["chunks"], (f.name, c)
    # the children profiled themselves, with their own pid in the file name
    pids = {f.stem.split("_")[1].split("-")[0] for f in files}
    assert len(pids) == 3, pids


DEBIAN_PYTHON = Path("/usr/bin/python3")


def _debian_python_can_import_asprof() -> bool:
    if not DEBIAN_PYTHON.exists():
        return False
    r = subprocess.run([str(DEBIAN_PYTHON), "-c", "import asprof._native"], capture_output=True, env=_env(), timeout=60)
    return r.returncode == 0


@pytest.mark.skipif(not _debian_python_can_import_asprof(),
                    reason="/usr/bin/python3 (libpython linked into the executable) is absent or cannot "
                    "import this build of asprof")
def test_nativemem_is_refused_where_it_would_crash_the_interpreter(tmp_path: Path) -> None:
    code = """
import asprof
try:
    asprof.Profiler(reporting_interval=1, options=asprof.ProfilerOptions(native_mem="10m")).start()
except asprof.ProfilerError as e:
    print("REFUSED", e)
else:
    print("STARTED")
"""
    r = subprocess.run([str(DEBIAN_PYTHON), "-c", code], capture_output=True, text=True, timeout=60,
                       env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # alive: no SIGSEGV
    assert r.stdout.startswith("REFUSED"), r.stdout
    assert "libpython linked into its executable" in r.stdout and "force_native_mem=True" in r.stdout


def test_nativemem_works_where_libpython_is_shared(tmp_path: Path) -> None:
    code = WORKLOAD + """
import asprof
from asprof.engines.asyncprofiler import nativemem_hazard
assert nativemem_hazard() is None, nativemem_hazard()
out = sys.argv[1]
with asprof.Profiler(asprof.LocalReporter(out), reporting_interval=30,
                     options=asprof.ProfilerOptions(native_mem="64k")).start():
    busy(0.5)
"""
    out = tmp_path / "profiles"
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120, env=_env())
    if "nativemem_hazard() is None" in r.stderr:
        pytest.skip("this interpreter embeds libpython; covered by the refusal test")
    assert r.returncode == 0, r.stderr
    files = list(out.glob("*.jfr"))
    assert len(files) == 1
    c = check_jfr(files[0])
    if JFR_TOOL is not None:
        assert c.get("profiler.Malloc", 0) > 0, c
