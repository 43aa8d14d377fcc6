"""``asprof run`` / ``python -m asprof run``: the program runs with profiling on,
its arguments untouched, its exit status and signals its own; sitecustomize
chaining; options → ASPROF_* variables; mistakes on the command line."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from asprof.cli import main as cli_main
from asprof.cli import run as cli_run

from conftest import child_env, requires_real

SCRIPT = """
import json, os, sys, time
t = time.monotonic()
while time.monotonic() - t < float(os.environ.get("BUSY", "0.6")):
    sum(i * i for i in range(2000))
import asprof.auto
p = asprof.auto.profiler
print(json.dumps({
    "argv": sys.argv, "pid": os.getpid(), "running": bool(p and p.running),
    "env": {k: v for k, v in os.environ.items() if k.startswith("ASPROF_")},
    "boot_on_path": any(x.rstrip(os.sep).endswith(os.path.join("autostart", "bootstrap")) for x in sys.path),
    "sitecustomize": getattr(sys.modules.get("sitecustomize"), "__file__", None),
    "executable": sys.executable,
}))
sys.stdout.flush()
sys.exit(int(os.environ.get("EXIT", "0")))
"""


def asprof_run(args: List[str], *, cwd: Path, timeout: float = 60, input: Optional[str] = None,
               **env: str) -> subprocess.CompletedProcess:
    """``python -m asprof run ARGS``; ``python`` in ARGS is found on PATH, where it is this interpreter."""
    bindir = cwd / ".bin"
    if not (bindir / "python").exists():
        bindir.mkdir(exist_ok=True)
        (bindir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bindir / "python").chmod(0o755)
    e = child_env(**env)
    e["PATH"] = f"{bindir}{os.pathsep}{e.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", "asprof", "run", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd, input=input)


def report(r: subprocess.CompletedProcess) -> Dict[str, Any]:
    line = [x for x in r.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)  # type: ignore[no-any-return]


def stub_profiles(directory: Path, pid: int) -> List[Path]:
    files = sorted(directory.glob(f"*_{pid}.jfr")) + sorted(directory.glob(f"*_{pid}-*.jfr"))
    for f in files:
        assert re.fullmatch(rf"STUBJFR start=(\d+) pid={pid}\nEND start=\1\n", f.read_text()), f
    return files


@pytest.fixture
def script(tmp_path: Path) -> Path:
    p = tmp_path / "app.py"
    p.write_text(SCRIPT)
    return p


def test_script_with_arguments_untouched_and_exit_status(tmp_path: Path, script: Path, stub_lib: Path) -> None:
    args = ["--port", "8000", "", "two words", "--", "-m", "x", "ünïcode", "$HOME", "*", "--interval", "1h"]
    r = asprof_run(["--reporter", "out", "--interval", "200ms", "--lib", str(stub_lib), "--",
                    "python", str(script), *args], cwd=tmp_path, EXIT="7")
    assert r.returncode == 7, r.stderr
    rep = report(r)
    assert rep["argv"] == [str(script), *args]
    assert rep["running"] and not rep["boot_on_path"]
    assert rep["env"]["ASPROF_REPORTER"] == str(tmp_path / "out")  # made absolute
    assert rep["env"]["ASPROF_REPORTING_INTERVAL"] == "200ms"
    assert len(stub_profiles(tmp_path / "out", rep["pid"])) >= 2
    assert r.stderr == ""


def test_module_with_dash_m(tmp_path: Path, stub_lib: Path) -> None:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(SCRIPT)
    r = asprof_run(["--interval", "200ms", "--", "-m", "mypkg", "a", "-m", "--x=1"], cwd=tmp_path,
                   ASPROF_LIB=str(stub_lib), EXIT="3")
    assert r.returncode == 3, r.stderr
    rep = report(r)
    assert rep["argv"] == [str(pkg / "__main__.py"), "a", "-m", "--x=1"]
    assert rep["executable"] == sys.executable
    assert rep["running"]
    assert stub_profiles(tmp_path / "profiles", rep["pid"])


def test_bare_script_and_dash_c_use_this_interpreter(tmp_path: Path, script: Path, stub_lib: Path) -> None:
    r = asprof_run(["--", "app.py", "x"], cwd=tmp_path, ASPROF_LIB=str(stub_lib), BUSY="0")
    assert r.returncode == 0, r.stderr
    assert report(r)["argv"] == ["app.py", "x"] and report(r)["running"]
    r = asprof_run(["--", "-c", "import asprof.auto, sys; print(asprof.auto.profiler.running, sys.argv)", "y"],
                   cwd=tmp_path, ASPROF_LIB=str(stub_lib))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True ['-c', 'y']"


def test_without_the_double_dash(tmp_path: Path, script: Path, stub_lib: Path) -> None:
    r = asprof_run(["--lib", str(stub_lib), sys.executable, str(script), "--lib", "other"], cwd=tmp_path, BUSY="0")
    assert r.returncode == 0, r.stderr
    assert report(r)["argv"] == [str(script), "--lib", "other"]


def test_exit_by_signal_and_signals_reach_the_program(tmp_path: Path, stub_lib: Path) -> None:
    code = textwrap.dedent("""
        import os, signal, sys, time
        def on_term(signum, frame):  # os.write: the signal may land inside print()'s flush (3.14)
            os.write(1, b"got SIGTERM in %d\\n" % os.getpid())
            sys.exit(42)
        signal.signal(signal.SIGTERM, on_term)
        print("ready", os.getpid(), flush=True)
        time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "asprof", "run", "--", "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=child_env(ASPROF_LIB=str(stub_lib), ASPROF_REPORTING_INTERVAL="200ms"))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        assert int(line.split()[1]) == proc.pid  # exec: the program is this very process
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 42, err
    assert f"got SIGTERM in {proc.pid}" in out
    files = stub_profiles(tmp_path / "profiles", proc.pid)
    assert files  # the app's own handler ran, and the last profile was written at exit

    # a program killed by a signal: the same status as without the wrapper
    r = asprof_run(["--", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], cwd=tmp_path,
                   ASPROF_LIB=str(stub_lib))
    assert r.returncode == -signal.SIGKILL


def test_stdin_is_the_programs(tmp_path: Path, stub_lib: Path) -> None:
    r = asprof_run(["--", "-c", "print(input()[::-1])"], cwd=tmp_path, input="hello\n", ASPROF_LIB=str(stub_lib))
    assert r.returncode == 0 and r.stdout == "olleh\n", r.stderr


def test_an_existing_sitecustomize_still_runs(tmp_path: Path, script: Path, stub_lib: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE'] = 'ran'\nVALUE = 42\n")
    code = ("import os, sys, sitecustomize, asprof.auto; "
            "print(os.environ.get('USER_SITECUSTOMIZE'), sitecustomize.VALUE, sitecustomize.__file__, "
            "asprof.auto.profiler.running)")
    r = asprof_run(["--", "-c", code], cwd=tmp_path, ASPROF_LIB=str(stub_lib),
                   PYTHONPATH=f"{site}{os.pathsep}{child_env()['PYTHONPATH']}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ran", "42", str(site / "sitecustomize.py"), "True"]


def test_a_failing_sitecustomize_is_reported_as_python_does(tmp_path: Path, stub_lib: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("raise RuntimeError('broken site')\n")
    r = asprof_run(["--", "-c", "import asprof.auto; print('ran', asprof.auto.profiler.running)"], cwd=tmp_path,
                   ASPROF_LIB=str(stub_lib), PYTHONPATH=f"{site}{os.pathsep}{child_env()['PYTHONPATH']}")
    assert r.returncode == 0
    assert r.stdout.strip() == "ran True"
    assert "broken site" in r.stderr  # Python's own "Error in sitecustomize" report


def test_child_python_processes_are_profiled_too(tmp_path: Path, stub_lib: Path) -> None:
    code = textwrap.dedent("""
        import subprocess, sys, os
        child = subprocess.run([sys.executable, "-c",
            "import os, time, asprof.auto; print(os.getpid(), asprof.auto.profiler.running); time.sleep(0.5)"],
            capture_output=True, text=True, timeout=60)
        print(os.getpid(), child.stdout.strip())
    """)
    r = asprof_run(["--interval", "200ms", "--", "-c", code], cwd=tmp_path, ASPROF_LIB=str(stub_lib))
    assert r.returncode == 0, r.stderr
    parent, child, running = r.stdout.split()
    assert running == "True" and parent != child
    assert stub_profiles(tmp_path / "profiles", int(parent))
    assert stub_profiles(tmp_path / "profiles", int(child))


def test_options_become_variables_and_inherited_ones_are_kept(tmp_path: Path, script: Path,
                                                               stub_lib: Path) -> None:
    r = asprof_run(["--service", "checkout", "--service-version", "1.2", "--env", "prod", "--tag", "a=1",
                    "--tag", "b=2", "--cpu-interval", "10ms", "--wall-interval", "off", "--native-mem", "off",
                    "--log-level", "error", "--kill-switch-file", "kill", "--max-cpu-percent", "5",
                    "--max-memory-mb", "256", "--cstack", "fp", "--", "python", str(script)],
                   cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_TAGS="z=0", ASPROF_REPORTING_INTERVAL="1s",
                   BUSY="0")
    assert r.returncode == 0, r.stderr
    env = report(r)["env"]
    assert env == {
        "ASPROF_LIB": str(stub_lib), "ASPROF_REPORTING_INTERVAL": "1s", "ASPROF_SERVICE": "checkout",
        "ASPROF_VERSION": "1.2", "ASPROF_ENV": "prod", "ASPROF_TAGS": "z=0,a=1,b=2", "ASPROF_CPU_INTERVAL": "10ms",
        "ASPROF_WALL_INTERVAL": "off", "ASPROF_NATIVE_MEM": "off", "ASPROF_LOG_LEVEL": "error",
        "ASPROF_KILL_SWITCH_FILE": str(tmp_path / "kill"), "ASPROF_MAX_CPU_PERCENT": "5",
        "ASPROF_MAX_MEMORY_MB": "256", "ASPROF_CSTACK": "fp",
    }
    assert report(r)["running"]


def test_program_environment_is_idempotent_for_nested_runs(tmp_path: Path) -> None:
    boot = cli_run.bootstrap_dir()
    assert (Path(boot) / "sitecustomize.py").is_file()
    env = cli_run.program_environment({"ASPROF_REPORTER": "rel"}, [], base={"PYTHONPATH": "/a"})
    assert env["PYTHONPATH"] == f"{boot}{os.pathsep}/a"
    again = cli_run.program_environment({}, [], base=env)
    assert again["PYTHONPATH"] == env["PYTHONPATH"]
    assert env["ASPROF_REPORTER"] == os.path.abspath("rel")
    for given, expected in (("s3://b/p", "s3://b/p"), ("file:///x", "file:///x"),
                            ("local:rel", "local:" + os.path.abspath("rel"))):
        assert cli_run.program_environment({"ASPROF_REPORTER": given}, [], base={})["ASPROF_REPORTER"] == expected


def test_exec_is_given_the_command_untouched(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    calls: List[Any] = []

    def fake_exec(file: str, argv: List[str], env: Dict[str, str]) -> None:
        calls.append((file, argv, env))

    monkeypatch.setattr(os, "execvpe", fake_exec)
    monkeypatch.setattr(cli_run.run, "__defaults__", (fake_exec,))
    assert cli_main(["run", "--interval", "5s", "--", "gunicorn", "-w", "2", "--", "--interval"]) == 0
    file, argv, env = calls[0]
    assert file == "gunicorn" and argv == ["gunicorn", "-w", "2", "--", "--interval"]
    assert env["ASPROF_REPORTING_INTERVAL"] == "5s"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == cli_run.bootstrap_dir()


def test_mistakes_on_the_command_line(tmp_path: Path) -> None:
    r = asprof_run(["--interval", "3x", "--", "-c", "print('ran')"], cwd=tmp_path)
    assert r.returncode == 2 and "ran" not in r.stdout
    assert r.stderr.count("\n") == 1 and "--interval" in r.stderr and "'3x'" in r.stderr
    r = asprof_run(["--tag", "novalue", "--", "-c", "print('ran')"], cwd=tmp_path)
    assert r.returncode == 2 and "--tag" in r.stderr
    r = asprof_run([], cwd=tmp_path)
    assert r.returncode == 2 and "no program to run" in r.stderr
    r = asprof_run(["--", "no-such-command-asprof-test"], cwd=tmp_path)
    assert r.returncode == 127 and "command not found" in r.stderr
    (tmp_path / "noexec").write_text("#!/bin/sh\n")
    r = asprof_run(["--", str(tmp_path / "noexec")], cwd=tmp_path)
    assert r.returncode == 126 and "permission denied" in r.stderr


def test_an_invalid_inherited_variable_runs_the_program_unprofiled(tmp_path: Path, stub_lib: Path) -> None:
    r = asprof_run(["--", "-c", "import asprof.auto; print('ran', asprof.auto.profiler)"], cwd=tmp_path,
                   ASPROF_LIB=str(stub_lib), ASPROF_CPU_INTERVAL="abc")
    assert r.returncode == 0 and r.stdout.strip() == "ran None"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "ASPROF_CPU_INTERVAL='abc'" in lines[0] and "profiling is off" in lines[0]


def test_disabled(tmp_path: Path, stub_lib: Path) -> None:
    code = "import asprof.auto, time; print('ran', asprof.auto.profiler); time.sleep(0.3)"
    r = asprof_run(["--disable", "--interval", "100ms", "--", "-c", code], cwd=tmp_path, ASPROF_LIB=str(stub_lib))
    assert r.returncode == 0 and r.stdout.strip() == "ran None" and r.stderr == ""
    r = asprof_run(["--interval", "100ms", "--", "-c", code], cwd=tmp_path, ASPROF_LIB=str(stub_lib),
                   ASPROF_ENABLED="off")
    assert r.returncode == 0 and r.stdout.strip() == "ran None"
    assert not (tmp_path / "profiles").exists()


def test_asprof_not_importable_in_the_program(tmp_path: Path, stub_lib: Path) -> None:
    # Another interpreter without asprof: one line on stderr, the program runs.
    other = shutil.which("python3", path="/usr/bin:/bin")
    if other is None or os.path.realpath(other) == os.path.realpath(sys.executable):
        pytest.skip("no second interpreter")
    env = child_env(ASPROF_LIB=str(stub_lib))
    env["PYTHONPATH"] = cli_run.bootstrap_dir()  # asprof itself is not on the path
    r = subprocess.run([other, "-c", "print('ran')"], capture_output=True, text=True, timeout=60, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ran"
    assert len(r.stderr.splitlines()) == 1 and "cannot start profiling" in r.stderr


def test_console_script(tmp_path: Path, stub_lib: Path) -> None:
    exe = Path(sys.executable).parent / "asprof"
    if not exe.exists():
        pytest.skip("the asprof console script is not installed next to this interpreter (pip install -e .)")
    r = subprocess.run([str(exe), "run", "--", "-c", "import asprof.auto; print(asprof.auto.profiler.running)"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env=child_env(ASPROF_LIB=str(stub_lib)))
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


@requires_real
def test_real_async_profiler_under_run(tmp_path: Path, script: Path) -> None:
    from conftest import check_jfr

    r = asprof_run(["--interval", "500ms", "--cpu-interval", "10ms", "--", "python", str(script), "x"],
                   cwd=tmp_path, BUSY="1.2", EXIT="5")
    assert r.returncode == 5, r.stderr
    rep = report(r)
    assert rep["argv"] == [str(script), "x"] and rep["running"]
    files = sorted((tmp_path / "profiles").glob(f"*_{rep['pid']}*.jfr"))
    assert len(files) >= 2
    counts = check_jfr(max(files, key=lambda f: f.stat().st_size))
    assert counts.get("jdk.ExecutionSample", 0) > 0, counts
    assert r.stderr == ""
