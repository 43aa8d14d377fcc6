"""Process life-cycle: kill switches, overhead guard, exit paths, signals and forks."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import pytest

import asprof
from asprof.engines.base import TickResult

from conftest import child_env, requires_real
from fakes import Collecting, FakeEngine

pytestmark = pytest.mark.usefixtures("no_profiler")


def test_env_kill_switch_wins_over_code(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("ASPROF_ENABLED", "false")
    engine = FakeEngine()
    running = asprof.Profiler(Collecting(), reporting_interval=0.1, engine=engine).start()
    assert not running.running and running.stop() is True
    assert not engine.running
    assert "disabled by ASPROF_ENABLED=false" in caplog.text
    monkeypatch.setenv("ASPROF_ENABLED", "1")
    asprof.Profiler(Collecting(), reporting_interval=0.1, engine=FakeEngine()).start().stop()


def test_kill_switch_file_stops_within_an_interval(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    switch = tmp_path / "asprof-off"
    reporter = Collecting()
    running = asprof.Profiler(reporter, reporting_interval=0.1, engine=FakeEngine(), kill_switch_file=switch).start()
    reporter.wait_for(1)
    switch.touch()
    assert running._agent is not None and running._agent.done.wait(2)
    assert "kill switch file" in caplog.text
    assert reporter.payloads[-1].startswith(b"JFR")  # the last profile is still delivered
    # present at start: nothing starts
    engine = FakeEngine()
    assert not asprof.Profiler(Collecting(), engine=engine, kill_switch_file=switch).start().running
    assert not engine.running


class BusyEngine(FakeEngine):
    def __init__(self, burn: float = 0.0, memory: Optional[int] = None) -> None:
        super().__init__()
        self.burn, self.memory = burn, memory

    def tick(self) -> TickResult:
        end = time.thread_time() + self.burn
        while time.thread_time() < end:
            pass
        return super().tick()

    def memory_bytes(self) -> Optional[int]:
        return self.memory


def test_overhead_guard_cpu(caplog: pytest.LogCaptureFixture) -> None:
    reporter = Collecting()
    running = asprof.Profiler(reporter, reporting_interval=0.1, engine=BusyEngine(burn=0.05),
                              max_cpu_percent=5.0).start()
    assert running._agent is not None and running._agent.done.wait(3)
    assert "overhead guard" in caplog.text and "of a CPU" in caplog.text
    assert reporter.payloads  # what was recorded is still reported


def test_overhead_guard_memory(caplog: pytest.LogCaptureFixture) -> None:
    running = asprof.Profiler(Collecting(), reporting_interval=0.1, engine=BusyEngine(memory=50 << 20),
                              max_memory_mb=10).start()
    assert running._agent is not None and running._agent.done.wait(3)
    assert "holds 50.0 MB, over the 10.0 MB limit" in caplog.text
    with pytest.raises(ValueError, match="max_memory_mb"):
        asprof.Profiler(max_memory_mb=0)
    with pytest.raises(ValueError, match="max_cpu_percent"):
        asprof.Profiler(max_cpu_percent=-1)


def test_extra_metadata_is_carried_in_the_report() -> None:
    reporter = Collecting()
    with asprof.Profiler(reporter, reporting_interval=5, engine=FakeEngine(),
                         extra_metadata={"service": "checkout", "env": "prod"}).start():
        pass
    (_, md), = reporter.reports
    assert isinstance(md.instance, asprof.NoMetadata)
    assert dict(md.instance.extra) == {"service": "checkout", "env": "prod"}
    with pytest.raises(ValueError, match="extra_metadata"):
        asprof.Profiler(extra_metadata={"service": 1})  # type: ignore[dict-item]


def _child(code: str, stub: Path, out: Path, **kw: object) -> subprocess.Popen:
    script = f"""
import os, sys, signal, threading, time, asprof
out = {str(out)!r}
def profiler():
    return asprof.Profiler(asprof.LocalReporter(out), reporting_interval=30, library_path={str(stub)!r})
""" + code
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=child_env(), **kw)  # type: ignore[call-overload]


def _wait_ready(p: subprocess.Popen) -> None:
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "ready", (line, p.stderr.read() if p.stderr else "")


def _run_until_exit(script: str, stub_lib: Path, out: Path, sig: Optional[int] = None) -> Tuple[int, str]:
    """Runs ``script`` in a child until it prints "ready", sends ``sig`` if given, waits for
    its exit: (exit status, stderr)."""
    p = _child(script, stub_lib, out)
    _wait_ready(p)
    if sig is not None:
        p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    return p.returncode, err


def test_sigterm_delivers_the_last_profile_once_and_dies_of_sigterm(stub_lib: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, err = _run_until_exit("""
profiler().start().detach()
print("ready", flush=True)
time.sleep(60)
""", stub_lib, out, signal.SIGTERM)
    assert rc == -signal.SIGTERM, err
    files = list(out.glob("*.jfr"))
    assert len(files) == 1, files  # once, never twice
    assert files[0].read_bytes().count(b"END") == 1
    assert "Traceback" not in err


def test_the_applications_sigterm_handler_is_kept(stub_lib: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, err = _run_until_exit("""
def on_term(signum, frame):
    sys.exit(3)          # the application's own graceful shutdown
signal.signal(signal.SIGTERM, on_term)
profiler().start().detach()
print("ready", flush=True)
time.sleep(60)
""", stub_lib, out, signal.SIGTERM)
    assert rc == 3, err
    assert len(list(out.glob("*.jfr"))) == 1, err  # reported at exit, once


def test_sys_exit_in_a_thread_and_normal_exit(stub_lib: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, err = _run_until_exit("""
r = profiler().start()
r.detach()
t = threading.Thread(target=sys.exit, args=(5,))
t.start(); t.join()
assert r.running
print("ready", flush=True)
""", stub_lib, out)
    assert rc == 0, err
    assert len(list(out.glob("*.jfr"))) == 1


def test_os_exit_leaves_nothing_behind_and_does_not_hang(stub_lib: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, err = _run_until_exit("""
profiler().start().detach()
print("ready", flush=True)
os._exit(7)
""", stub_lib, out)
    assert rc == 7, err
    assert list(out.glob("*")) == []  # the recording was unnamed: nothing to clean up


def test_forked_child_profiles_itself_and_the_parent_resumes(stub_lib: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = _child("""
r = profiler().start()
pid = os.fork()
if pid == 0:
    assert asprof.stop_profiling(timeout=10)   # the child's own profiler
    sys.exit(0)
_, status = os.waitpid(pid, 0)
assert status == 0, status
assert r.running
r.stop()
print("ready", pid, flush=True)
""", stub_lib, out)
    stdout, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    child_pid = int(stdout.split()[1])
    files = {f.name.split("_")[1].split(".")[0]: f.read_bytes() for f in out.glob("*.jfr")}
    assert set(files) == {str(p.pid), str(child_pid)}, files
    parent = files[str(p.pid)]
    # paused around the fork and resumed on the same file; the child never wrote into it
    assert parent.startswith(b"STUBJFR") and b"RESUMED" in parent and b"ATEXIT" not in parent
    assert files[str(child_pid)].startswith("STUBJFR start=".encode())


@requires_real
def test_a_hundred_forks_in_a_loop(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = """
import os, sys, time, asprof
out = sys.argv[1]
r = asprof.Profiler(asprof.LocalReporter(out), reporting_interval=1.0,
                    options=asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.05)).start()
for i in range(100):
    pid = os.fork()
    if pid == 0:
        sum(range(20000))
        sys.exit(0)          # a normal exit: the child's own final report
    _, status = os.waitpid(pid, 0)
    assert status == 0, (i, status)
assert r.running
assert r.stop(timeout=10)
"""
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=240,
                       env=child_env())
    assert p.returncode == 0, p.stderr
    files = list(out.glob("*.jfr"))
    pids = {f.name.split("_")[1].split(".")[0].split("-")[0] for f in files}
    assert len(pids) == 101, len(pids)  # the parent and every child, each with its own files
    from conftest import check_jfr

    for f in files[:: max(1, len(files) // 10)]:
        check_jfr(f)
