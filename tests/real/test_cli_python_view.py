"""The CLI's Python-frame views on a real profile: mixed (default), --python-only, --native-only."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import child_env, requires_real

APP = """
import sys, time, zlib, os, asprof
def alpha():
    return sum(i * i for i in range(20000))
with asprof.Profiler(asprof.LocalReporter(sys.argv[1]), reporting_interval=30,
                     options=asprof.ProfilerOptions(cpu_interval=0.002, wall_interval=0.05)).start():
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        alpha()
        zlib.compress(os.urandom(20000))
"""


def _record(app: str, tmp_path: Path) -> Path:
    """Runs a profiled program in a child interpreter; returns its profile directory."""
    out = tmp_path / "profiles"
    r = subprocess.run([sys.executable, "-c", app, str(out)], capture_output=True, text=True, timeout=120,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    return out


@requires_real
def test_python_views_from_the_command_line(tmp_path: Path) -> None:
    out = _record(APP, tmp_path)
    views = {}
    for flag in ("", "--python-only", "--native-only"):
        target = tmp_path / f"v{flag}.txt"
        cmd = [sys.executable, "-m", "asprof", "convert", str(out), "-o", str(target), "--format", "collapsed", "--cpu"]
        p = subprocess.run(cmd + ([flag] if flag else []), capture_output=True, text=True, timeout=120, env=child_env())
        assert p.returncode == 0, p.stderr
        views[flag] = target.read_text()
    mixed, python, native = views[""], views["--python-only"], views["--native-only"]
    # the agent's reports have their Python frames inline (issue #12): ``module.qualname`` frames
    assert "__main__.alpha" in mixed and "Py_RunMain" in mixed            # both kinds of frames
    assert "__main__.alpha" in python and "Py_RunMain" not in python      # Python only
    assert "__main__.alpha" not in native and "_PyEval_EvalFrameDefault" in native  # as recorded
    # alpha -> zlib: one mixed stack holds the Python caller and the native callee
    # (deflate: libz's exported symbol; zlib_compress has no symbol in a stripped interpreter
    # with zlib built in, as Debian's python3.14)
    assert any("__main__.<module>" in line and ("zlib_compress" in line or ";deflate" in line)
               for line in mixed.splitlines())


FORK_APP = """
import os, sys, time, asprof
def alpha():
    return sum(i * i for i in range(20000))
r = asprof.Profiler(asprof.LocalReporter(sys.argv[1]), reporting_interval=30,
                    options=asprof.ProfilerOptions(cpu_interval=0.002, wall_interval=0.05)).start()
pid = os.fork()
end = time.monotonic() + 1.0
while time.monotonic() < end:
    alpha()
if pid == 0:
    sys.exit(0)
os.waitpid(pid, 0)
r.stop()
"""


@requires_real
def test_a_forked_child_records_python_frames_too(tmp_path: Path) -> None:
    files = sorted(_record(FORK_APP, tmp_path).glob("*.jfr"))
    assert len({f.name.split("_")[1] for f in files}) == 2, files  # parent and child
    import asprof.jfr

    for f in files:
        collapsed = asprof.jfr.to_collapsed(asprof.jfr.open(str(f)).samples("cpu"))
        # by samples, not distinct stacks: the agent's own start-up (imports on its thread) makes
        # many distinct stacks of few samples, more of them on a loaded machine
        weights = [(line, int(line.rsplit(" ", 1)[1])) for line in collapsed.splitlines() if line]
        total = sum(n for _line, n in weights)
        with_alpha = sum(n for line, n in weights if "__main__.alpha" in line)
        assert total > 0 and with_alpha >= total // 2, (f.name, with_alpha, total, collapsed[:500])
