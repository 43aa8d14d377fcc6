"""Prefork servers and multiprocessing: real gunicorn (a tiny WSGI app, 2 sync
workers) under load from a second process on loopback, with the agent started
in the master (``asprof run``, or ``start_profiling()`` before the fork: the
common mistake) or in a ``post_fork`` hook; workers killed and respawned;
multiprocessing with fork and spawn; a hundred forks in a loop. Every worker
must produce valid profiles carrying its own pid, nothing may hang (every
wait is bounded), and no file may be corrupted.

Each scenario runs with the stand-in library and, when installed, with the
real async-profiler."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

from conftest import REAL_LIB, child_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

gunicorn = pytest.importorskip("gunicorn")

INTERVAL = "500ms"
FILE_NAME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ_(\d+)(?:-\d+)?\.jfr$")


@pytest.fixture(params=["stub", "real", "builtin"])
def lib(request: pytest.FixtureRequest) -> Iterator[Dict[str, str]]:
    """The engine setting for the scenario: the stand-in, the real library (found by the loader),
    or the built-in engine (ASPROF_ENGINE=builtin, issue #11; its reports are real JFR)."""
    if request.param == "stub":
        yield {"ASPROF_LIB": str(request.getfixturevalue("stub_lib")), "KIND": "stub"}
    elif request.param == "builtin":
        from asprof.engines.builtin import unavailable_reason

        if unavailable_reason() is not None:
            pytest.skip(f"the built-in engine is unavailable: {unavailable_reason()}")
        yield {"ASPROF_ENGINE": "builtin", "KIND": "builtin"}
    else:
        if REAL_LIB is None:
            pytest.skip("async-profiler is not installed")
        yield {"KIND": "real"}


def profiles_by_pid(directory: Path) -> Dict[int, List[Path]]:
    out: Dict[int, List[Path]] = {}
    for f in sorted(directory.iterdir()):
        if f.name.startswith("."):
            continue  # a partial file of a process killed while writing (never a .jfr name)
        m = FILE_NAME.match(f.name)
        assert m, f"unexpected file {f.name}"
        out.setdefault(int(m.group(1)), []).append(f)
    return out


def stub_starts(path: Path, pid: int) -> List[int]:
    """The stand-in's recording: ``STUBJFR start=N pid=P`` / ``END start=N``, then one
    ``RESUMED start=M pid=P`` / ``END start=M`` pair per fork the recording was paused
    for; nothing else (an ``ATEXIT`` line would be a child writing into it). Returns
    the start numbers."""
    lines = path.read_text().splitlines()
    assert lines and len(lines) % 2 == 0, (path.name, lines)
    starts = []
    for i in range(0, len(lines), 2):
        head = "STUBJFR" if i == 0 else "RESUMED"
        m = re.fullmatch(rf"{head} start=(\d+) pid={pid}", lines[i])
        assert m and lines[i + 1] == f"END start={m.group(1)}", (path.name, lines)
        starts.append(int(m.group(1)))
    return starts


def check_profile(path: Path, pid: int, kind: str, deep: bool = False) -> None:
    """A complete profile of process ``pid``."""
    data = path.read_bytes()
    if kind == "stub":
        stub_starts(path, pid)
        return
    assert data[:4] == b"FLR\0", path.name
    if deep:
        from conftest import check_jfr

        check_jfr(path)
    else:
        import struct

        off = 0
        while off < len(data):
            major, minor, size, cp, meta = struct.unpack_from(">HHqqq", data, off + 4)
            assert major == 2 and 0 < size <= len(data) - off and cp > 0 and meta > 0, (path.name, off)
            off += size


def check_all(directory: Path, pids: Set[int], kind: str, killed: Set[int] = frozenset()) -> Dict[int, List[Path]]:  # type: ignore[assignment]
    found = profiles_by_pid(directory)
    missing = {p for p in pids if p not in killed and not found.get(p)}
    assert not missing, f"no profile from {sorted(missing)}; found {sorted(found)}"
    for pid, files in found.items():
        for i, f in enumerate(files):
            check_profile(f, pid, kind, deep=(i == 0 and pid in pids))
    return found


# ---------------------------------------------------------------- gunicorn

APP = """
import os

def app(environ, start_response):
    n = 0
    for i in range(20000):
        n += i * i
    body = ("%d\\n" % os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""

CONFIG = """
import os
bind = "127.0.0.1:" + os.environ["TEST_PORT"]
workers = 2
worker_class = "sync"
timeout = 30
graceful_timeout = 10
loglevel = "warning"
PIDS = os.environ["TEST_PIDS"]

def post_worker_init(worker):
    open(os.path.join(PIDS, "worker-%d" % os.getpid()), "w").close()
"""

CONFIG_START_IN_MASTER = """
import asprof
asprof.start_profiling(asprof.LocalReporter(os.environ["TEST_PROFILES"]), reporting_interval=0.5,
                       library_path=os.environ.get("ASPROF_LIB") or None)
"""

CONFIG_POST_FORK = """
def post_fork(server, worker):
    from asprof.autostart.start import start_from_environment
    start_from_environment()
"""

LOAD = """
import json, sys, time, urllib.request
port, seconds = int(sys.argv[1]), float(sys.argv[2])
pids, errors, n = {}, 0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5) as r:
            pid = r.read().decode().strip()
            pids[pid] = pids.get(pid, 0) + 1
            n += 1
    except Exception:
        errors += 1
        time.sleep(0.01)
print(json.dumps({"requests": n, "errors": errors, "pids": pids}))
"""


def agent_complaints(log: str) -> List[str]:
    """asprof's warnings and errors in a log, but for async-profiler's own note about a
    thread that exited while it was being attached (a harmless race of the real library)."""
    return [line for line in log.splitlines()
            if re.match(r"^asprof\[\d+\]: (WARNING|ERROR)", line)
            and not re.search(r"async-profiler: perf_event_open for TID \d+ failed: No such process$", line)]


def free_port() -> int:
    from aws_test_servers import free_port as fp

    return fp()


class Gunicorn:
    def __init__(self, tmp: Path, mode: str, lib: Dict[str, str]) -> None:
        self.tmp = tmp
        self.profiles = tmp / "profiles"
        self.pids_dir = tmp / "pids"
        self.pids_dir.mkdir()
        (tmp / "app.py").write_text(APP)
        config = CONFIG + {"run": "", "master": CONFIG_START_IN_MASTER, "post_fork": CONFIG_POST_FORK}[mode]
        (tmp / "gunicorn_conf.py").write_text(config)
        self.port = free_port()
        env = {k: v for k, v in lib.items() if k != "KIND"}
        self.kind = lib["KIND"]
        self.env = child_env(TEST_PORT=str(self.port), TEST_PIDS=str(self.pids_dir),
                             TEST_PROFILES=str(self.profiles), ASPROF_REPORTER=str(self.profiles),
                             ASPROF_REPORTING_INTERVAL=INTERVAL, ASPROF_LOG_LEVEL="info", **env)
        cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn_conf.py", "app:app"]
        if mode == "run":
            cmd = [sys.executable, "-m", "asprof", "run", "--"] + cmd
        self.log = open(tmp / "gunicorn.log", "wb")
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def workers(self) -> Set[int]:
        return {int(p.name.split("-")[1]) for p in self.pids_dir.iterdir()}

    def wait_workers(self, n: int, exclude: Set[int] = frozenset(), timeout: float = 30) -> Set[int]:  # type: ignore[assignment]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            alive = {p for p in self.workers() - exclude if _alive(p)}
            if len(alive) >= n:
                return alive
            time.sleep(0.05)
        raise AssertionError(f"gunicorn did not start {n} workers in {timeout} s\n{self.output()}")

    def load(self, seconds: float) -> "subprocess.Popen[str]":
        return subprocess.Popen([sys.executable, "-c", LOAD, str(self.port), str(seconds)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=child_env(), cwd=self.tmp)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"gunicorn did not stop within {timeout} s (hang)\n{self.output()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return (self.tmp / "gunicorn.log").read_text(errors="replace")[-6000:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def finish_load(load: "subprocess.Popen[str]", timeout: float = 60) -> Dict[str, object]:
    try:
        out, err = load.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        load.kill()
        load.communicate(timeout=10)
        raise AssertionError("the load generator hung") from None
    assert load.returncode == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[List[Gunicorn]]:
    servers: List[Gunicorn] = []
    yield servers
    for s in servers:
        s.kill()


@pytest.mark.parametrize("mode", ["run", "master", "post_fork"])
def test_gunicorn_every_worker_profiles_itself(mode: str, lib: Dict[str, str], tmp_path: Path,
                                               server_factory: List[Gunicorn]) -> None:
    g = Gunicorn(tmp_path, mode, lib)
    server_factory.append(g)
    workers = g.wait_workers(2)
    stats = finish_load(g.load(2.0))
    assert stats["requests"] and not stats["errors"], stats
    assert g.stop() == 0, g.output()
    out = g.output()
    assert "Traceback" not in out, out
    assert not agent_complaints(out), out
    pids = set(workers)
    if mode in ("run", "master"):
        pids.add(g.proc.pid)  # the master profiles itself too
    found = check_all(g.profiles, pids, g.kind)
    for w in workers:
        assert len(found[w]) >= 2, (w, found)  # rotated every 0.5 s, and the last one at exit
    if mode == "post_fork":
        assert g.proc.pid not in found
    # served pids are workers
    assert {int(p) for p in stats["pids"]} <= workers  # type: ignore[attr-defined]


def test_gunicorn_workers_killed_and_respawned(lib: Dict[str, str], tmp_path: Path,
                                               server_factory: List[Gunicorn]) -> None:
    g = Gunicorn(tmp_path, "run", lib)
    server_factory.append(g)
    first = g.wait_workers(2)
    load = g.load(4.0)
    time.sleep(1.2)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    replaced = g.wait_workers(1, exclude=first)  # gunicorn forks a new worker from the master
    time.sleep(1.5)
    stats = finish_load(load)
    assert stats["requests"], stats
    assert g.stop() == 0, g.output()
    out = g.output()
    assert "Traceback" not in out and not agent_complaints(out), out
    pids = first | replaced | {g.proc.pid}
    found = check_all(g.profiles, pids, g.kind, killed={victim})
    for w in replaced:
        assert len(found[w]) >= 2, (w, found)
    assert found.get(victim), "the killed worker had produced profiles before it was killed"


# ---------------------------------------------------------------- multiprocessing

MP_BUSY = """
def busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(2000))
    return os.getpid()
"""

MP_FORK = """
import json, multiprocessing as mp, os, sys, time
import asprof
""" + MP_BUSY + """
if __name__ == "__main__":
    asprof.start_profiling(asprof.LocalReporter(sys.argv[1]), reporting_interval=0.3,
                           library_path=os.environ.get("ASPROF_LIB") or None)
    ctx = mp.get_context(sys.argv[2])
    pool = ctx.Pool(2)
    pids = set(pool.map(busy, [0.5] * 6, chunksize=1))
    pool.close()
    pool.join()
    procs = [ctx.Process(target=busy, args=(0.8,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    print(json.dumps({"parent": os.getpid(), "pool": sorted(pids), "procs": [p.pid for p in procs],
                      "exitcodes": [p.exitcode for p in procs]}))
"""

MP_SPAWN = """
import json, multiprocessing as mp, os, sys, time
import asprof.auto   # in the main module: spawned children import it again and profile themselves
""" + MP_BUSY + """
if __name__ == "__main__":
    ctx = mp.get_context(sys.argv[2])
    with ctx.Pool(2) as pool:
        pids = set(pool.map(busy, [0.5] * 6, chunksize=1))
        pool.close()
        pool.join()
    procs = [ctx.Process(target=busy, args=(0.8,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    print(json.dumps({"parent": os.getpid(), "pool": sorted(pids), "procs": [p.pid for p in procs],
                      "exitcodes": [p.exitcode for p in procs]}))
"""


def run_mp(tmp_path: Path, code: str, method: str, lib: Dict[str, str], wrapper: bool = False) -> Dict[str, object]:
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(code))
    out = tmp_path / "profiles"
    cmd = [sys.executable, str(script), str(out), method]
    if wrapper:
        cmd = [sys.executable, "-m", "asprof", "run", "--"] + cmd
    env = {k: v for k, v in lib.items() if k != "KIND"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=child_env(ASPROF_REPORTER=str(out), ASPROF_REPORTING_INTERVAL="300ms", **env))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    result: Dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["exitcodes"] == [0, 0], result
    return result


def test_multiprocessing_fork(lib: Dict[str, str], tmp_path: Path) -> None:
    res = run_mp(tmp_path, MP_FORK, "fork", lib)
    pids = {res["parent"], *res["pool"], *res["procs"]}  # type: ignore[misc]
    assert len(pids) >= 4
    check_all(tmp_path / "profiles", pids, lib["KIND"])


@pytest.mark.parametrize("how", ["import_auto", "asprof_run"])
def test_multiprocessing_spawn(how: str, lib: Dict[str, str], tmp_path: Path) -> None:
    code = MP_SPAWN if how == "import_auto" else MP_SPAWN.replace("import asprof.auto", "import asprof")
    res = run_mp(tmp_path, code, "spawn", lib, wrapper=(how == "asprof_run"))
    pids = {res["parent"], *res["pool"], *res["procs"]}  # type: ignore[misc]
    assert len(pids) >= 4
    check_all(tmp_path / "profiles", pids, lib["KIND"])


# ---------------------------------------------------------------- a hundred forks

FORKS = """
import json, os, sys, time
import asprof
asprof.start_profiling(asprof.LocalReporter(sys.argv[1]), reporting_interval=0.25,
                       library_path=os.environ.get("ASPROF_LIB") or None)
t0 = time.monotonic()
children = []
for i in range(100):
    pid = os.fork()
    if pid == 0:
        x = sum(range(5000))
        if i % 3 == 0:
            os._exit(0)            # nothing to do, nothing corrupted
        elif i % 3 == 1:
            sys.exit(0)            # normal exit: the child's own last profile
        else:
            time.sleep(0.3)        # lives across a rotation
            sys.exit(0)
    children.append(pid)
bad = []
for pid in children:
    _, status = os.waitpid(pid, 0)
    if status != 0:
        bad.append((pid, status))
elapsed = time.monotonic() - t0
from asprof.agent.loop import current
running = current() is not None and not current().done.is_set()
asprof.stop_profiling(10)
print(json.dumps({"parent": os.getpid(), "children": children, "bad": bad, "elapsed": elapsed,
                  "running": running}))
"""


def test_a_hundred_forks_in_a_loop(stub_lib: Path, tmp_path: Path) -> None:
    """Concurrent children exiting every way; the stand-in shows the parent's recordings
    are continuous (the real library's sequential loop is in test_lifecycle.py)."""
    lib = {"ASPROF_LIB": str(stub_lib), "KIND": "stub"}
    script = tmp_path / "forks.py"
    script.write_text(FORKS)
    out = tmp_path / "profiles"
    env = {k: v for k, v in lib.items() if k != "KIND"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=child_env(**env))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["bad"] == [] and res["running"], res
    assert time.monotonic() - t0 < 90
    found = check_all(out, {res["parent"]}, lib["KIND"])
    children = set(res["children"])
    assert set(found) - {res["parent"]} <= children
    long_lived = {pid for i, pid in enumerate(res["children"]) if i % 3 == 2}
    assert long_lived <= set(found), sorted(long_lived - set(found))
    # the parent kept profiling across the forks, without a gap: with the stand-in, every
    # recording it started (or resumed after a fork) is in a delivered profile
    assert len(found[res["parent"]]) >= 2
    if lib["KIND"] == "stub":
        starts = sorted(n for f in found[res["parent"]] for n in stub_starts(f, res["parent"]))
        assert starts == list(range(1, len(starts) + 1)), starts
        resumed = sum(f.read_text().count("RESUMED") for f in found[res["parent"]])
        assert resumed == 100, resumed
