"""Under gevent's monkey.patch_all() asprof's threads stay real OS threads (issue #13): a CPU-bound
application that never yields still gets a report every interval, the overhead guard counts only
asprof's threads, and the process is not renamed. Both engines; skipped without gevent."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from conftest import REAL_LIB, run_python

gevent = pytest.importorskip("gevent", reason="gevent is not installed (pip install gevent): gevent tests skipped")

APP = """
from gevent import monkey
monkey.patch_all()
import json, logging, os, sys, time
logging.basicConfig(level=logging.INFO)
import asprof
from asprof import osthreads

def comm(tid):
    return open(f"/proc/self/task/{tid}/comm").read().strip()

main_before = comm(os.getpid())
out = OUT
p = asprof.start_profiling(asprof.LocalReporter(out), reporting_interval=0.3,
                           options=asprof.ProfilerOptions(engine=ENGINE, cpu_interval=0.01),
                           max_cpu_percent=50)
# CPU-bound, never yields to gevent's hub: only a real OS thread can report meanwhile.
t0 = time.monotonic()
x = 0
files = 0
while time.monotonic() - t0 < 30:
    for _ in range(20000):
        x += 1
    files = len([n for n in os.listdir(out) if n.endswith(".jfr")])
    if files >= 4:
        break
threads = {int(t): comm(t) for t in os.listdir("/proc/self/task")}
result = dict(files_while_busy=files, main_before=main_before, main_after=comm(os.getpid()),
              proc_comm=open("/proc/self/comm").read().strip(), running=p.running, patched=osthreads.patched(),
              agent_tids=[t for t, n in threads.items() if n == "asprof-agent"], pid=os.getpid(),
              own=sorted(set(n for n in threads.values() if n.startswith("asprof"))))
p.stop()
result["files_after_stop"] = len(os.listdir(out))
print(json.dumps(result))
"""


def _run(tmp_path: Path, engine: str) -> Dict[str, Any]:
    out = tmp_path / "out"
    code = APP.replace("OUT", repr(str(out))).replace("ENGINE", repr(engine))
    r = run_python(code, timeout=90)
    assert r.returncode == 0, r.stderr
    got: Dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    got["stderr"] = r.stderr
    return got


def _check(got: Dict[str, Any]) -> None:
    assert got["patched"] is True
    assert got["files_while_busy"] >= 4, got  # reports kept coming while the application never yielded
    assert got["running"] is True and "overhead guard" not in got["stderr"], got["stderr"]
    assert got["main_after"] == got["main_before"] == got["proc_comm"] != "asprof-agent"
    assert len(got["agent_tids"]) == 1 and got["agent_tids"][0] != got["pid"]  # its own OS thread
    assert got["files_after_stop"] > got["files_while_busy"]  # the last profile at stop


def test_builtin_engine_under_gevent(tmp_path: Path) -> None:
    got = _run(tmp_path, "builtin")
    _check(got)
    assert "asprof-collect" in got["own"]


@pytest.mark.skipif(REAL_LIB is None, reason="async-profiler is not installed")
def test_async_profiler_engine_under_gevent(tmp_path: Path) -> None:
    _check(_run(tmp_path, "async-profiler"))


@pytest.mark.parametrize("engine", ["builtin", "async-profiler"])
def test_patched_after_profiling_started(tmp_path: Path, engine: str) -> None:
    """As under `asprof run` with a gevent worker: profiling starts, then the program patches.
    Reports go on while it never yields, stop() works, nothing is printed (threading would print a
    KeyError when a thread started before the patching exits)."""
    if engine == "async-profiler" and REAL_LIB is None:
        pytest.skip("async-profiler is not installed")
    out = tmp_path / "out"
    r = run_python(f"""
        import json, os, time
        import asprof
        p = asprof.start_profiling(asprof.LocalReporter({str(out)!r}), reporting_interval=0.3,
                                   options=asprof.ProfilerOptions(engine={engine!r}))
        from gevent import monkey
        monkey.patch_all()
        t0 = time.monotonic()
        files = 0
        while time.monotonic() - t0 < 30 and files < 3:
            sum(range(20000))
            files = len(os.listdir({str(out)!r}))
        stopped = p.stop(10)
        print(json.dumps({{"files": files, "stopped": stopped, "comm": open("/proc/self/comm").read().strip()}}))
        """, timeout=90)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["files"] >= 3 and got["stopped"] is True and got["comm"] != "asprof-agent", got
    assert r.stderr == "", r.stderr


def test_s3_uploader_runs_on_a_real_thread_under_gevent(tmp_path: Path) -> None:
    pytest.importorskip("boto3", reason="boto3 is not installed")
    r = run_python("""
        from gevent import monkey
        monkey.patch_all()
        import json, os, time
        from datetime import datetime, timezone
        from asprof.metadata import NoMetadata, ReportMetadata
        from asprof.reporter.s3 import S3Reporter

        class Client:
            def __init__(self):
                self.tids = []
            def put_object(self, **kw):
                self.tids.append(__import__("threading").get_native_id())

        c = Client()
        r = S3Reporter("bucket", "123456789012", "pg", client=c)
        t = datetime(2025, 1, 2, tzinfo=timezone.utc)
        r.report(b"JFR", ReportMetadata(NoMetadata(), t, t, 30.0))
        deadline = time.monotonic() + 20
        while not c.tids and time.monotonic() < deadline:
            sum(range(10000))  # busy, never yielding
        print(json.dumps({"tids": c.tids, "pid": os.getpid()}))
        r.close(5)
        """, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(got["tids"]) == 1 and got["tids"][0] != got["pid"]


def test_osthreads_without_patching_are_threadings_own() -> None:
    import threading

    from asprof import osthreads

    if osthreads.patched():
        pytest.skip("this test process is monkey-patched")
    t = osthreads.Thread(lambda: None, "x")
    assert isinstance(t, threading.Thread) and t.daemon
    assert isinstance(osthreads.Event(), threading.Event)
    assert isinstance(osthreads.Condition(), threading.Condition)


def test_osthreads_primitives_under_patching() -> None:
    """Condition, Event, join and is_alive of the real-thread implementation."""
    r = run_python("""
        from gevent import monkey
        monkey.patch_all()
        import json, os, time, threading
        from asprof import osthreads
        cond, ev, seen = osthreads.Condition(), osthreads.Event(), []
        def work():
            seen.append(threading.get_native_id())
            with cond:
                ok = cond.wait(10)
            seen.append(ok)
            ev.set()
        t = osthreads.Thread(work, "w")
        t.start()
        assert t.is_alive() and t.native_id != os.getpid()
        while len(seen) < 1:
            pass
        time.sleep(0.05)
        with cond:
            cond.notify_all()
        assert ev.wait(10)
        t.join(10)
        with cond:
            timed_out = cond.wait(0.01)
        print(json.dumps({"alive": t.is_alive(), "seen": seen, "pid": os.getpid(), "timed_out": timed_out,
                          "type": type(t).__name__}))
        """, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["type"] == "_OSThread" and got["alive"] is False and got["timed_out"] is False
    assert got["seen"][0] != got["pid"] and got["seen"][1] is True


GUNICORN_APP = """
import os, time

def app(environ, start_response):
    # CPU-bound, never yields to gevent's hub, until this worker has 3 reports of its own
    # (asprof's agent must run beside it on a real OS thread), or 30 s.
    out, pid, t0, n = os.environ["TEST_PROFILES"], os.getpid(), time.monotonic(), 0
    while time.monotonic() - t0 < 30 and n < 3:
        sum(range(20000))
        n = len([f for f in os.listdir(out) if f.endswith("_%d.jfr" % pid)])
    comm = open("/proc/self/comm").read().strip()
    body = ("%d %d %s\\n" % (pid, n, comm)).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def test_gunicorn_gevent_worker_under_asprof_run(tmp_path: Path) -> None:
    """`asprof run -- gunicorn -k gevent`: profiling starts in the master, the worker forks and then
    patches; a request that computes without yielding still sees the worker's reports arrive."""
    pytest.importorskip("gunicorn", reason="gunicorn is not installed")
    import signal
    import subprocess
    import sys
    import urllib.request

    from aws_test_servers import free_port
    from conftest import child_env

    port = free_port()
    (tmp_path / "app.py").write_text(GUNICORN_APP)
    profiles = tmp_path / "profiles"
    env = child_env(TEST_PROFILES=str(profiles), ASPROF_REPORTER=str(profiles), ASPROF_REPORTING_INTERVAL="300ms",
                    ASPROF_ENGINE="builtin", ASPROF_LOG_LEVEL="warning")
    cmd = [sys.executable, "-m", "asprof", "run", "--", sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1",
           "-b", f"127.0.0.1:{port}", "--timeout", "60", "app:app"]
    log = open(tmp_path / "gunicorn.log", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        body = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=45) as r:
                    body = r.read().decode().strip()
            except OSError:
                assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()
                time.sleep(0.2)
        pid, n, comm = body.split()
        assert int(n) >= 3, body  # reports while the worker never yielded
        assert comm != "asprof-agent", body
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
    out = (tmp_path / "gunicorn.log").read_text(errors="replace")
    assert "Traceback" not in out and "KeyError" not in out, out
