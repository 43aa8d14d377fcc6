"""The native core against a stand-in libasyncProfiler.so (tests/stub/fake_asprof.c):
the real dlopen/dlsym path, the rotation through /proc/self/fd/N, version checks,
optional symbols, and failures on demand."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator

import pytest

import asprof
from asprof.engines import asyncprofiler as engine_mod
from asprof.engines.asyncprofiler import NativeEngine
from asprof.errors import LibraryNotFoundError, ProfilerError, UnsupportedVersionError

from conftest import engine_recordings, run_python

OPTIONS = asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.1)


def open_fds() -> Dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


@pytest.fixture
def stub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    commands = tmp_path / "commands.txt"
    monkeypatch.setenv("STUB_COMMANDS", str(commands))
    for var in ("STUB_FAIL_START", "STUB_FAIL_STOP", "STUB_LOG_WARN", "STUB_VERSION", "ASPROF_LIB"):
        monkeypatch.delenv(var, raising=False)
    yield commands


def test_rotation_hands_over_each_finished_recording(stub_lib: Path, stub_env: Path) -> None:
    got = engine_recordings(stub_lib, OPTIONS, 3)
    pid = os.getpid()
    assert got == [f"STUBJFR start={i} pid={pid}\nEND start={i}\n".encode() for i in (1, 2, 3, 4)]
    commands = stub_env.read_text().splitlines()
    starts = [c for c in commands if c.startswith("start,")]
    assert len(starts) == 4
    # the seed's command, the file as /proc/self/fd/N (alternating between two), and the log arguments
    assert all(c.startswith(OPTIONS.start_command() + ",file=/proc/self/fd/") for c in starts)
    assert len({c.split("file=")[1].split(",")[0] for c in starts}) == 2
    assert all(",log=/proc/self/fd/" in c and ",loglevel=" in c for c in commands if not c.startswith("status,log=stderr"))


def test_library_info_and_capabilities(stub_builds: Dict[str, Path], tmp_path: Path, stub_env: Path) -> None:
    full = tmp_path / "full.so"
    shutil.copy(stub_builds["full"], full)
    info = asprof.library_info(str(full))
    assert info.path == str(full) and info.version == "4.5" and info.version_tuple == (4, 5)
    assert info.has_thread_local_data and info.has_user_events
    old = tmp_path / "old.so"
    shutil.copy(stub_builds["no_optional"], old)
    info = asprof.library_info(str(old))
    assert info.capabilities == frozenset()


def test_too_old_version_is_refused(stub_lib: Path, stub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUB_VERSION", "2.9")
    with pytest.raises(UnsupportedVersionError, match=r"2\.9.*3\.0 or later"):
        asprof.library_info(str(stub_lib))


def test_library_without_the_api_is_refused(stub_builds: Dict[str, Path], stub_env: Path) -> None:
    with pytest.raises(LibraryNotFoundError, match="does not export asprof_execute.*3.0") as e:
        asprof.library_info(str(stub_builds["no_execute"]))
    assert "Install async-profiler" in str(e.value)


def test_missing_library_lists_every_place_tried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ASPROF_LIB", raising=False)
    monkeypatch.setattr(engine_mod, "SONAME", "libasyncProfilerNotThere.so")
    monkeypatch.setattr(engine_mod, "_BUNDLED", str(tmp_path / "bundled" / "libasyncProfiler.so"))
    with pytest.raises(LibraryNotFoundError) as e:
        asprof.library_info()
    text = str(e.value)
    assert "bundled copy" in text and "no such file" in text
    assert "dynamic linker search (libasyncProfilerNotThere.so)" in text
    assert "never the current directory" in text  # searched by asprof, absolute paths only
    assert "ASPROF_LIB" in text and "ldconfig" in text
    with pytest.raises(LibraryNotFoundError, match="library_path argument.*no such file"):
        asprof.library_info(str(tmp_path / "nope.so"))
    monkeypatch.setenv("ASPROF_LIB", str(tmp_path / "env.so"))
    with pytest.raises(LibraryNotFoundError, match="ASPROF_LIB.*no such file"):
        asprof.library_info()


def test_a_file_that_is_not_a_library(tmp_path: Path) -> None:
    bogus = tmp_path / "libasyncProfiler.so"
    bogus.write_bytes(b"not an ELF file at all" * 10)
    with pytest.raises(LibraryNotFoundError, match="invalid ELF header|file too short"):
        asprof.library_info(str(bogus))


def test_discovery_order(stub_builds: Dict[str, Path], tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        shutil.copy(stub_builds["full"], d / "libasyncProfiler.so")
    code = "import asprof; print(asprof.library_info({arg}).path)"
    # explicit path beats ASPROF_LIB
    r = run_python(code.format(arg=repr(str(a / "libasyncProfiler.so"))), ASPROF_LIB=str(b / "libasyncProfiler.so"))
    assert r.stdout.strip() == str(a / "libasyncProfiler.so"), r.stderr
    # ASPROF_LIB beats the linker's search
    r = run_python(code.format(arg=""), ASPROF_LIB=str(b / "libasyncProfiler.so"), LD_LIBRARY_PATH=str(a))
    assert r.stdout.strip() == str(b / "libasyncProfiler.so"), r.stderr
    # the soname through the dynamic linker's search path
    r = run_python(code.format(arg=""), LD_LIBRARY_PATH=str(a))
    assert r.stdout.strip() == str(a / "libasyncProfiler.so"), r.stderr
    # never the current directory
    r = run_python(code.format(arg=""), cwd=a, LD_LIBRARY_PATH="")
    assert r.stdout.strip() != str(a / "libasyncProfiler.so")


def test_messages_go_to_logging_never_to_stdout(stub_lib: Path, stub_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("STUB_LOG_WARN", "perf_event_open for TID 42 failed")
    caplog.set_level(logging.WARNING, logger="asprof")
    eng = NativeEngine(OPTIONS, str(stub_lib))
    eng.start()
    eng.tick()
    eng.stop()
    eng.close()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    msgs = [r for r in caplog.records if r.name == "asprof.async-profiler"]
    assert msgs and all(r.levelno == logging.WARNING for r in msgs)
    assert msgs[0].getMessage() == "perf_event_open for TID 42 failed"


def test_stop_failure_leaks_the_files_on_purpose(stub_lib: Path, stub_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    eng = NativeEngine(OPTIONS, str(stub_lib))
    fds = eng._session.fds
    eng.start()
    monkeypatch.setenv("STUB_FAIL_STOP", "all")
    with pytest.raises(ProfilerError, match="could not stop: Stub: stop failed on demand"):
        eng.tick()
    eng.close()
    assert "left open on purpose" in caplog.text
    still = open_fds()
    assert all(fd in still for fd in fds), (fds, still)
    # and the profiler can still be stopped and the files still read: nothing was reused
    monkeypatch.delenv("STUB_FAIL_STOP")


def test_start_failure_is_raised_with_async_profilers_message(stub_lib: Path, stub_env: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUB_FAIL_START", "1")
    with pytest.raises(ProfilerError, match="could not start: Stub: start failed on demand"):
        asprof.Profiler(reporting_interval=1, library_path=str(stub_lib)).start()
    assert not any(t.name == "asprof-agent" for t in __import__("threading").enumerate())


def test_no_descriptor_is_left_after_a_clean_stop(stub_lib: Path, stub_env: Path) -> None:
    asprof.library_info(str(stub_lib))  # loading is once per process: not part of a run
    before = set(open_fds())
    eng = NativeEngine(OPTIONS, str(stub_lib))
    eng.start()
    eng.tick()
    eng.stop()
    eng.close()
    assert set(open_fds()) <= before


def test_profiler_with_local_reporter_end_to_end(stub_lib: Path, stub_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = asprof.Profiler(asprof.LocalReporter(out), reporting_interval=0.2, options=OPTIONS, library_path=stub_lib)
    with p.start():
        import time

        time.sleep(0.7)
    files = sorted(out.iterdir())
    assert len(files) >= 3
    bodies = [f.read_bytes() for f in files]
    assert all(b.startswith(b"STUBJFR start=") and b.endswith(b"\n") and b.count(b"END") == 1 for b in bodies)


def test_start_profiling_defaults_to_profiles_in_the_working_directory(stub_lib: Path, tmp_path: Path) -> None:
    r = run_python(f"""
        import time, asprof
        asprof.start_profiling(reporting_interval=0.2, library_path={str(stub_lib)!r})
        time.sleep(0.5)
        assert asprof.stop_profiling(timeout=5)
        assert asprof.stop_profiling() is True  # idempotent
        """, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "profiles").glob("*.jfr"))) >= 2


FORK_SCRIPT = """
import os, sys, time
import asprof
from asprof.engines.asyncprofiler import NativeEngine
eng = NativeEngine(asprof.ProfilerOptions(), {lib!r})
eng.start()
recordings = []

def child_exits_normally():
    pid = os.fork()
    if pid == 0:
        sys.exit(0)          # normal exit: atexit hooks run in the child
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status

child_exits_normally()                  # while the parent records into the active file
recordings.append(eng.tick().recording)
child_exits_normally()                  # after a rotation: the finished file must stay as it is
recordings.append(eng.tick().recording)
recordings.append(eng.stop())
eng.close()
for r in recordings:
    sys.stdout.write(r.decode())
"""


def test_forked_child_exiting_normally_leaves_the_parents_files_alone(stub_lib: Path, stub_env: Path) -> None:
    r = run_python(FORK_SCRIPT.format(lib=str(stub_lib)), timeout=30)
    assert r.returncode == 0, r.stderr
    assert "ATEXIT" not in r.stdout, r.stdout  # the stand-in's atexit hook writes this into an active recording
    assert r.stdout.count("STUBJFR") == 3 and r.stdout.count("END") == 3


CHILD_FDS_SCRIPT = """
import os, sys
import asprof
from asprof.engines.asyncprofiler import NativeEngine
eng = NativeEngine(asprof.ProfilerOptions(python_frames=False), {lib!r})
eng.start()
fds = eng._session.fds
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    os.write(w, repr([os.readlink(f"/proc/self/fd/{{fd}}") for fd in fds]).encode())
    os._exit(0)
os.close(w)
child = os.read(r, 4096).decode()
os.waitpid(pid, 0)
parent = [os.readlink(f"/proc/self/fd/{{fd}}") for fd in fds]
eng.stop()
eng.close()
print(child)
print(repr(parent))
"""


def test_a_forked_child_holds_none_of_the_parents_recording_files(stub_lib: Path, stub_env: Path) -> None:
    # Otherwise a long-lived child (a pre-fork server's worker) would keep the parent's memory
    # files, and what they hold, alive after the parent has freed them.
    r = run_python(CHILD_FDS_SCRIPT.format(lib=str(stub_lib)), timeout=30)
    assert r.returncode == 0, r.stderr
    child, parent = (eval(line) for line in r.stdout.splitlines())
    assert child == ["/dev/null", "/dev/null"], child
    assert all(p != "/dev/null" for p in parent), parent
