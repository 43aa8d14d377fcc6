"""BuiltinEngine (asprof/engines/builtin.py) and engine choice (asprof/engines/choice.py), from the
writer's side: a batch of the C module written as one self-contained JFR chunk; every report of
a real run read by async-profiler's converter and the JDK `jfr` tool (where installed); a forked
child profiling itself; the choice through choice.py's seam (async-profiler hidden whatever this
machine has). The end-to-end agent guarantees are in test_engine.py, the choice's real-loader
cases in test_choice.py, the C module in test_builtin_native.py."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import asprof
import asprof.jfr
from asprof.engines import choice
from asprof.engines.builtin import BuiltinEngine, _Names, unavailable_reason, unsupported_options
from asprof.errors import LibraryNotFoundError, ProfilerError
from asprof.jfrio.writer import KIND_CPU, KIND_WALL, SAMPLE, STATE_SLEEPING, clock_pair
from asprof.options import ProfilerOptions

from conftest import check_jfr, child_env
from jfr_tools import JFR_TOOL, JFRCONV, NO_JDK, NO_JFRCONV, ROOT, asprof_collapsed, jfr, jfrconv_collapsed

UNAVAILABLE = unavailable_reason()
needs_builtin = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"built-in engine unavailable: {UNAVAILABLE}")


def test_module_names_from_filenames() -> None:
    names = _Names()
    names._refresh()
    assert names.module(asprof.jfr.__file__) == "asprof.jfr"
    assert names.module(os.path.join(os.path.dirname(os.__file__), "nosuchmod_xyz.py")) == "nosuchmod_xyz"
    assert names.module("<string>") == "<string>"


def test_unsupported_options_are_named() -> None:
    assert unsupported_options(ProfilerOptions()) == []
    bad = unsupported_options(ProfilerOptions(native_mem="1m", cstack="fp", all_user=False))
    assert [b.split("=")[0] for b in bad] == ["native_mem", "cstack", "all_user"]


def test_invalid_engine_option_names_the_option() -> None:
    with pytest.raises(ValueError, match="engine must be one of auto, async-profiler, builtin"):
        ProfilerOptions(engine="py-spy")
    with pytest.raises(ValueError, match="native_mem"):
        ProfilerOptions(engine="builtin", native_mem="10m")


@needs_builtin
def test_explicit_builtin_refuses_options_it_cannot_honour(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ProfilerError, match="cstack='fp'"):
        BuiltinEngine(ProfilerOptions(cstack="fp"), explicit=True)
    caplog.set_level("INFO", logger="asprof")
    BuiltinEngine(ProfilerOptions(cstack="fp"), explicit=False).close()
    assert [r.getMessage() for r in caplog.records if "leaves out" in r.getMessage()]


@needs_builtin
def test_a_batch_is_one_self_contained_chunk() -> None:
    """A synthetic batch in the C module's format (codes, natives, stacks leaf first, packed
    samples) read back: Python frames module.qualname, native leaf, thread names, settings."""
    eng = BuiltinEngine(ProfilerOptions(cpu_interval=0.01, wall_interval=0.1))
    start = clock_pair()
    end = (start[0] + 10**9, start[1] + 10**9)
    codes = [("fib", "fib", os.path.join(str(ROOT), "examples", "demo.py"), 22),
             ("run", "Worker.run", "/nowhere/app/jobs.py", 10)]
    natives = [("deflate", "/usr/lib/libz.so.1"), ("0x7f00001234", "")]
    stacks = [(-1, 0, 0, 23, 0, 0, 1, 12), (-2, 0, 1, 0)]  # line 0: the code's first line
    tid = os.getpid()
    samples = b"".join([SAMPLE.pack(start[1] + 1000 * i, tid, i % 2, KIND_CPU, 0, 0) for i in range(10)]
                       + [SAMPLE.pack(start[1] + 5000, 999999, 1, KIND_WALL, STATE_SLEEPING, 0)])
    data = eng.write_chunk(start, end, codes, natives, stacks, samples, lost=3)
    eng.close()
    rec = asprof.jfr.open(data)
    cpu = asprof_collapsed(rec, "cpu")
    # an unnamed program counter becomes "[unknown]" ("[libname]" with a library): samples add up
    assert cpu == {"jobs.Worker.run;demo.fib;demo.fib;deflate": 5, "jobs.Worker.run;[unknown]": 5} or \
        cpu == {"jobs.Worker.run;examples.demo.fib;examples.demo.fib;deflate": 5, "jobs.Worker.run;[unknown]": 5}
    assert sum(asprof_collapsed(rec, "wall").values()) == 1
    names = {t.os_thread_id: t.os_name for t in rec.threads}
    assert names[tid] == "MainThread" and names[999999] == "[tid=999999]"
    assert rec.setting("engine") == "builtin" and rec.setting("lostSamples") == "3"
    assert rec.setting("interval") == "10000000" and rec.setting("wall") == "100000000"
    assert abs(rec.duration_nanos - 10**9) < 10**6


def _run_demo(tmp_path: Path, seconds: str = "3", **env: str) -> subprocess.CompletedProcess:
    out = tmp_path / "profiles"
    return subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), seconds, str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=child_env(**env))


@needs_builtin
@pytest.mark.skipif(JFRCONV is None, reason=NO_JFRCONV)
def test_jfrconv_reads_every_report(tmp_path: Path) -> None:
    r = _run_demo(tmp_path, "2", ASPROF_ENGINE="builtin")
    assert r.returncode == 0, r.stderr
    for f in sorted((tmp_path / "profiles").glob("*.jfr")):
        cpu = jfrconv_collapsed(f, "--cpu")
        total = sum(int(ln.rpartition(" ")[2]) for ln in cpu.splitlines())
        assert total == sum(asprof_collapsed(asprof.jfr.open(str(f)), "cpu").values()), f.name


FORK = """
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
import asprof
def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)
def spin(s):
    t = time.monotonic()
    while time.monotonic() - t < s:
        fib(15)
p = asprof.Profiler(asprof.LocalReporter(sys.argv[1]), reporting_interval=0.5,
                    options=asprof.ProfilerOptions(cpu_interval=0.005, engine="builtin"))
with p.start():
    spin(0.6)
    pid = os.fork()
    if pid == 0:
        spin(1.0)
        asprof.stop_profiling(10)
        os._exit(0)
    spin(1.0)
    os.waitpid(pid, 0)
print("done", os.getpid(), pid)
"""


@needs_builtin
def test_fork_child_profiles_itself_with_the_builtin_engine(tmp_path: Path) -> None:
    out = tmp_path / "p"
    r = subprocess.run([sys.executable, "-c", FORK, str(out)], capture_output=True, text=True, timeout=120,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    parent, child = (int(x) for x in r.stdout.split()[1:3])
    files = sorted(out.glob("*.jfr"))
    by_pid: Dict[int, int] = {}
    for f in files:
        pid = int(re.search(r"_(\d+)(?:-\d+)?\.jfr$", f.name).group(1))  # type: ignore[union-attr]
        check_jfr(f)
        by_pid[pid] = by_pid.get(pid, 0) + sum(asprof_collapsed(asprof.jfr.open(str(f)), "cpu").values())
    assert by_pid.get(parent, 0) > 0 and by_pid.get(child, 0) > 0, (by_pid, r.stderr)


@needs_builtin
@pytest.mark.skipif(JFR_TOOL is None, reason=NO_JDK)
def test_jdk_jfr_prints_python_frames_of_a_real_report(tmp_path: Path) -> None:
    r = _run_demo(tmp_path, "2", ASPROF_ENGINE="builtin")
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "profiles").glob("*.jfr"))
    assert files
    printed = "".join(jfr("print", "--events", "jdk.ExecutionSample", "--stack-depth", "64", str(f)) for f in files)
    assert re.search(r"__main__\.fib\(\) line: \d+", printed)
    assert re.search(r"__main__\.work\(\) line: \d+", printed)
    assert 'state = "STATE_DEFAULT"' in printed and 'sampledThread = "worker"' in printed


# -- the choice through choice.py's seam ------------------------------------------------------

MISSING = LibraryNotFoundError([("the linker's search (libasyncProfiler.so)", "hidden by the test")])


@pytest.fixture
def no_async_profiler(monkeypatch: pytest.MonkeyPatch) -> None:
    def engine(options: ProfilerOptions, path: Optional[str]) -> object:
        raise MISSING

    def load(path: Optional[str]) -> str:
        raise MISSING

    monkeypatch.setattr(choice, "_async_profiler_engine", engine)
    monkeypatch.setattr(choice, "_load_async_profiler", load)
    monkeypatch.delenv("ASPROF_ENGINE", raising=False)
    monkeypatch.delenv("ASPROF_LIB", raising=False)


def _infos(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == "asprof" and r.levelno >= logging.INFO]


@needs_builtin
def test_auto_without_async_profiler_is_builtin_with_one_info_line(
        no_async_profiler: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="asprof")
    eng = choice.make_engine(ProfilerOptions())
    eng.close()
    assert isinstance(eng, BuiltinEngine)
    lines = _infos(caplog)
    assert len(lines) == 1, lines
    assert lines[0].startswith("engine: built-in (async-profiler does not load: not found; tried ")
    assert "hidden by the test" in lines[0]


@needs_builtin
def test_auto_profiles_with_the_builtin_engine_in_process(no_async_profiler: None, no_profiler: None, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asprof")
    running = asprof.Profiler(asprof.LocalReporter(tmp_path), reporting_interval=0.2,
                              options=ProfilerOptions(cpu_interval=0.001)).start()
    try:
        assert running.engine == "builtin"
        x = 0
        for i in range(300000):
            x += i * i
    finally:
        assert running.stop(10)
    files = list(tmp_path.glob("*.jfr"))
    assert files and all(f.read_bytes()[:4] == b"FLR\0" for f in files)
    assert sum("engine: built-in" in m for m in _infos(caplog)) == 1


@needs_builtin
def test_explicit_async_profiler_keeps_library_not_found(no_async_profiler: None) -> None:
    with pytest.raises(LibraryNotFoundError):
        choice.make_engine(ProfilerOptions(engine="async-profiler"))


@needs_builtin
def test_a_library_asked_for_by_path_stays_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ASPROF_ENGINE", raising=False)
    with pytest.raises((LibraryNotFoundError, ImportError)):
        choice.make_engine(ProfilerOptions(), str(tmp_path / "missing" / "libasyncProfiler.so"))


@needs_builtin
def test_asprof_engine_variable(no_async_profiler: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASPROF_ENGINE", "builtin")
    eng = choice.make_engine(ProfilerOptions())
    eng.close()
    assert isinstance(eng, BuiltinEngine)
    assert choice.requested_engine(ProfilerOptions()) == ("builtin", "ASPROF_ENGINE")
    # the options win over the variable
    assert choice.requested_engine(ProfilerOptions(engine="async-profiler"))[0] == "async-profiler"
    with pytest.raises(LibraryNotFoundError):
        choice.make_engine(ProfilerOptions(engine="async-profiler"))


@needs_builtin
def test_invalid_asprof_engine_names_the_variable(monkeypatch: pytest.MonkeyPatch, no_profiler: None,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("ASPROF_ENGINE", "pyspy")
    with pytest.raises(ValueError, match="ASPROF_ENGINE must be one of auto, async-profiler, builtin"):
        choice.make_engine(ProfilerOptions())
    with pytest.raises(ValueError, match="ASPROF_ENGINE"):
        asprof.Profiler(asprof.LocalReporter(tmp_path)).start()


@needs_builtin
def test_the_choice_sticks_for_forked_children(no_async_profiler: None) -> None:
    factory = choice.EngineFactory(ProfilerOptions(cstack="fp"), None)  # auto leaves cstack out, with a log line
    factory().close()
    assert factory.chosen == "builtin" and not factory.explicit
    factory().close()  # a forked child's engine: the same, and still lenient (no ProfilerError for cstack)


@needs_builtin
def test_describe_for_doctor(no_async_profiler: None, monkeypatch: pytest.MonkeyPatch) -> None:
    name, why = choice.describe()
    assert name == "builtin" and why.startswith("auto: async-profiler does not load (not found")
    monkeypatch.setenv("ASPROF_ENGINE", "async-profiler")
    name, why = choice.describe()
    assert name == "none" and "ASPROF_ENGINE" in why


@needs_builtin
def test_auto_on_this_machine(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The real discovery: async-profiler when it loads here, else builtin with the INFO line."""
    monkeypatch.delenv("ASPROF_ENGINE", raising=False)
    monkeypatch.delenv("ASPROF_LIB", raising=False)
    caplog.set_level(logging.INFO, logger="asprof")
    try:
        from asprof.engines.asyncprofiler import load_library

        load_library(None)
        loads = True
    except (LibraryNotFoundError, ImportError):
        loads = False
    except Exception:  # noqa: BLE001 - an unsupported version: auto falls back too
        loads = False
    eng = choice.make_engine(ProfilerOptions())
    eng.close()
    if loads:
        assert not isinstance(eng, BuiltinEngine)
        assert not any("engine: built-in" in m for m in _infos(caplog))
    else:
        assert isinstance(eng, BuiltinEngine)
        assert sum("engine: built-in" in m for m in _infos(caplog)) == 1


COLLECTOR = """
import sys, time
import asprof.engines.builtin as b
import asprof.jfr
from asprof.options import ProfilerOptions
b.COLLECT_EVERY = 0.05
eng = b.BuiltinEngine(ProfilerOptions(cpu_interval=0.002, wall_interval=0.01))
eng.start()
t = time.monotonic() + 0.6
while time.monotonic() < t:
    sum(i * i for i in range(1000))
collects = eng._mod.stats()["collects"]
elsewhere = eng.cpu_seconds_elsewhere()  # the handler's time on this thread, for the overhead guard
data = eng.tick().recording
last = eng.stop()
eng.close()
open(sys.argv[1], "wb").write(data)
rec = asprof.jfr.open(data)
own = [t.os_name for t in rec.threads if (t.os_name or "").startswith("asprof-")]
assert not own, own  # the profiler's own threads are not the application's
print(collects, rec.counts["profiler.WallClockSample"][0], rec.setting("lostSamples"),
      asprof.jfr.open(last).counts["jdk.ExecutionSample"][0] >= 0 and 0 < elsewhere < 0.6)
"""


@needs_builtin
def test_samples_are_taken_between_ticks_into_the_same_report(tmp_path: Path) -> None:
    """The collector thread empties the C module's fixed buffers every COLLECT_EVERY seconds;
    everything it took lands in the tick's one report."""
    report = tmp_path / "report.jfr"
    r = subprocess.run([sys.executable, "-c", COLLECTOR, str(report)], capture_output=True, text=True, timeout=120,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    collects, wall, lost, ok = r.stdout.split()
    assert int(collects) >= 3, r.stdout  # several takes before the tick
    assert int(wall) >= 20 and lost == "0" and ok == "True", r.stdout  # 0.6 s of 10 ms wall samples in one report
    assert check_jfr(report)["chunks"] == 1  # the JDK's jfr summary where installed
    if JFRCONV is not None:
        assert jfrconv_collapsed(report, "--wall").strip()


ENDED = """
import sys, threading, time
import asprof.engines.builtin as b
import asprof.jfr
from asprof.options import ProfilerOptions
eng = b.BuiltinEngine(ProfilerOptions(cpu_interval=0.002, wall_interval=0.01))
eng.start()
def burn():
    t = time.monotonic() + 0.4
    while time.monotonic() < t:
        sum(i * i for i in range(1000))
th = threading.Thread(target=burn, name="short-lived")
th.start()
time.sleep(0.2)
eng.tick()  # the thread is seen alive here; it samples on into the next report, then ends
th.join()
time.sleep(0.1)
rec = asprof.jfr.open(eng.stop())
eng.close()
print(sorted(t.os_name for t in rec.threads))
"""


@needs_builtin
def test_a_thread_that_ended_before_the_report_keeps_its_name() -> None:
    r = subprocess.run([sys.executable, "-c", ENDED], capture_output=True, text=True, timeout=120, env=child_env())
    assert r.returncode == 0, r.stderr
    assert "'short-lived'" in r.stdout and "[tid=" not in r.stdout, r.stdout


@needs_builtin
def test_a_batch_that_cannot_be_written_is_counted_and_said(caplog: pytest.LogCaptureFixture) -> None:
    eng = BuiltinEngine(ProfilerOptions())
    start = clock_pair()
    w = eng._new_writer(start)
    bad = SAMPLE.pack(start[1] + 1, os.getpid(), 5, KIND_CPU, 0, 0) * 4  # stack 5 of a batch with none
    caplog.set_level(logging.ERROR, logger="asprof")
    eng._add_or_log(w, ([], [], [], bad, 0))
    eng.close()
    assert eng._lost == 4
    assert any("could not write a batch of 4 samples" in r.getMessage() for r in caplog.records)
    rec = asprof.jfr.open(eng._finish(w, start, eng._lost))
    assert rec.setting("lostSamples") == "4"
