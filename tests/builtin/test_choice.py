"""Engine choice (asprof/engines/choice.py): ProfilerOptions(engine=...), ASPROF_ENGINE, auto.

async-profiler is hidden honestly through choice.py's seam (``_async_profiler_engine`` /
``_load_async_profiler`` raise what a machine without it raises), so these tests pass whether or
not async-profiler is installed here; the one test of the real discovery asserts whichever
outcome this machine gives."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import pytest

import asprof
from asprof.engines import choice
from asprof.engines.builtin import BuiltinEngine, unavailable_reason
from asprof.errors import LibraryNotFoundError
from asprof.options import ProfilerOptions

UNAVAILABLE = unavailable_reason()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"built-in engine unavailable: {UNAVAILABLE}")
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


def test_auto_profiles_with_the_builtin_engine(no_async_profiler: None, no_profiler: None, tmp_path: Path,
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


def test_explicit_async_profiler_keeps_library_not_found(no_async_profiler: None) -> None:
    with pytest.raises(LibraryNotFoundError):
        choice.make_engine(ProfilerOptions(engine="async-profiler"))


def test_a_library_asked_for_by_path_stays_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ASPROF_ENGINE", raising=False)
    with pytest.raises((LibraryNotFoundError, ImportError)):
        choice.make_engine(ProfilerOptions(), str(tmp_path / "missing" / "libasyncProfiler.so"))


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


def test_invalid_asprof_engine_names_the_variable(monkeypatch: pytest.MonkeyPatch, no_profiler: None,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("ASPROF_ENGINE", "pyspy")
    with pytest.raises(ValueError, match="ASPROF_ENGINE must be one of auto, async-profiler, builtin"):
        choice.make_engine(ProfilerOptions())
    with pytest.raises(ValueError, match="ASPROF_ENGINE"):
        asprof.Profiler(asprof.LocalReporter(tmp_path)).start()


def test_the_choice_sticks_for_forked_children(no_async_profiler: None) -> None:
    factory = choice.EngineFactory(ProfilerOptions(), None)
    factory().close()
    assert factory.chosen == "builtin"


def test_describe_for_doctor(no_async_profiler: None, monkeypatch: pytest.MonkeyPatch) -> None:
    name, why = choice.describe()
    assert name == "builtin" and why.startswith("auto: async-profiler does not load (not found")
    monkeypatch.setenv("ASPROF_ENGINE", "async-profiler")
    name, why = choice.describe()
    assert name == "none" and "ASPROF_ENGINE" in why


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
