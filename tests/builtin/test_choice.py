"""Engine choice (issue #11): ``ProfilerOptions(engine=...)``, ``ASPROF_ENGINE``, ``auto``'s
fallback to the built-in engine, and ``asprof doctor``'s engine line.

The machine running the tests may have async-profiler or not: where a test needs it missing,
the child interpreter makes the real loader look in places that do not exist (the bundled copy
and the soname searched by the dynamic linker) — the loader runs and misses, nothing is faked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

import asprof
from asprof.engines.builtin import unavailable_reason

ROOT = Path(__file__).resolve().parents[2]
needs_builtin = pytest.mark.skipif(unavailable_reason() is not None,
                                   reason=f"the built-in engine is unavailable: {unavailable_reason()}")

# Prepended to a child's script: async-profiler cannot be found (the real load_library runs).
HIDE_ASYNC_PROFILER = """
import asprof.engines.asyncprofiler as _ap
_ap._BUNDLED = "/nonexistent/asprof-test/libasyncProfiler.so"
_ap.SONAME = "libasyncProfiler-asprof-test-missing.so"
"""

# The child's logging: every record of the "asprof" logger, as JSON lines on stdout at exit.
LOG_CAPTURE = """
import atexit, json, logging
_records = []
class _H(logging.Handler):
    def emit(self, r):
        _records.append({"level": r.levelname, "msg": r.getMessage()})
logging.getLogger("asprof").addHandler(_H())
logging.getLogger("asprof").setLevel(logging.DEBUG)
atexit.register(lambda: print("LOGS " + json.dumps(_records)))
"""


def _env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASPROF_")}
    env.update(extra)
    return env


def _child(script: str, *, env: Optional[Dict[str, str]] = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=env if env is not None else _env(), timeout=timeout, cwd=str(ROOT))


def _logs(out: str) -> Any:
    line = next(ln for ln in out.splitlines() if ln.startswith("LOGS "))
    return json.loads(line[5:])


def test_an_invalid_engine_is_a_value_error_naming_the_option() -> None:
    with pytest.raises(ValueError, match="engine"):
        asprof.ProfilerOptions(engine="jvm")
    with pytest.raises(ValueError, match="engine"):
        asprof.ProfilerOptions(engine=None)  # type: ignore[arg-type]
    for name in ("auto", "async-profiler", "builtin"):
        assert asprof.ProfilerOptions(engine=name).engine == name
    assert asprof.ProfilerOptions().engine == "auto"


def test_an_invalid_asprof_engine_is_an_error_naming_the_variable() -> None:
    from asprof.autostart.config import ConfigError, EnvConfig

    with pytest.raises(ConfigError, match="ASPROF_ENGINE"):
        EnvConfig.from_environ({"ASPROF_ENGINE": "jvm"})


def _run_profiler(tmp_path: Path, options: str, prelude: str = "", env: Optional[Dict[str, str]] = None
                  ) -> subprocess.CompletedProcess[str]:
    """A child that profiles a busy loop for ~1 s into tmp_path/out and prints the engine
    setting of each report it wrote (read back with asprof.jfr)."""
    script = prelude + LOG_CAPTURE + f"""
import os, time, asprof, asprof.jfr
out = {str(tmp_path / "out")!r}
p = asprof.Profiler(asprof.LocalReporter(out), reporting_interval=0.5,
                    options=asprof.ProfilerOptions(cpu_interval=0.005, wall_interval=0.05{options}))
def spin():
    t = time.monotonic() + 1.2
    while time.monotonic() < t:
        sum(i * i for i in range(1000))
with p.start():
    spin()
for f in sorted(os.listdir(out)):
    print("ENGINE", asprof.jfr.open(os.path.join(out, f)).setting("engine"))
"""
    return _child(script, env=env)


@needs_builtin
def test_engine_builtin_is_used_even_where_async_profiler_loads(tmp_path: Path) -> None:
    r = _run_profiler(tmp_path, ', engine="builtin"')
    assert r.returncode == 0, r.stderr
    engines = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("ENGINE")]
    assert engines and set(engines) == {"builtin"}, r.stdout


@needs_builtin
def test_asprof_engine_variable_is_honoured(tmp_path: Path) -> None:
    r = _run_profiler(tmp_path, "", env=_env(ASPROF_ENGINE="builtin"))
    assert r.returncode == 0, r.stderr
    engines = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("ENGINE")]
    assert engines and set(engines) == {"builtin"}, r.stdout


@needs_builtin
def test_auto_falls_back_to_builtin_with_one_info_line_when_async_profiler_does_not_load(tmp_path: Path) -> None:
    r = _run_profiler(tmp_path, "", prelude=HIDE_ASYNC_PROFILER)
    assert r.returncode == 0, r.stderr
    engines = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("ENGINE")]
    assert engines and set(engines) == {"builtin"}, r.stdout
    logs = _logs(r.stdout)
    why = [x for x in logs if x["level"] == "INFO" and "built-in" in x["msg"]]
    assert len(why) == 1, logs
    assert "async-profiler" in why[0]["msg"]  # names why: async-profiler does not load
    assert not [x for x in logs if x["level"] in ("WARNING", "ERROR", "CRITICAL")], logs


def test_explicit_async_profiler_that_does_not_load_raises_library_not_found(tmp_path: Path) -> None:
    script = HIDE_ASYNC_PROFILER + f"""
import asprof
from asprof.errors import LibraryNotFoundError
p = asprof.Profiler(asprof.LocalReporter({str(tmp_path / "out")!r}),
                    options=asprof.ProfilerOptions(engine="async-profiler"))
try:
    p.start()
except LibraryNotFoundError as e:
    print("RAISED", type(e).__name__)
else:
    print("STARTED")
"""
    r = _child(script)
    assert r.returncode == 0, r.stderr
    assert "RAISED LibraryNotFoundError" in r.stdout, r.stdout + r.stderr


@needs_builtin
def test_engine_builtin_refuses_options_it_cannot_honour_naming_them() -> None:
    from asprof.engines.choice import make_engine
    from asprof.errors import AsprofError

    with pytest.raises((ValueError, AsprofError), match="native_mem"):
        make_engine(asprof.ProfilerOptions(engine="builtin", native_mem="10m"))
    with pytest.raises((ValueError, AsprofError), match="cstack"):
        make_engine(asprof.ProfilerOptions(engine="builtin", cstack="fp"))


@needs_builtin
def test_doctor_says_which_engine_would_run_and_why() -> None:
    r = subprocess.run([sys.executable, "-m", "asprof", "doctor"], capture_output=True, text=True,
                       env=_env(ASPROF_ENGINE="builtin"), timeout=120, cwd=str(ROOT))
    lines = [ln for ln in r.stdout.splitlines() if "engine" in ln.lower() and "builtin" in ln.replace("-", "")]
    assert lines, r.stdout
    r2 = _child(HIDE_ASYNC_PROFILER + "import sys\nfrom asprof.cli import main\nsys.exit(main(['doctor']))")
    lines2 = [ln for ln in r2.stdout.splitlines() if "built" in ln.lower() and "async-profiler" in ln]
    assert lines2, r2.stdout
