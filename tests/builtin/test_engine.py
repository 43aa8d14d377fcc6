"""BuiltinEngine (asprof/engines/builtin.py): a batch of the C module written as one
self-contained JFR chunk; the engine end to end in child processes (the demo, several ticks,
fork). The C module's own behaviour is tested in test_builtin_native.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

import asprof.jfr
from asprof.engines.builtin import BuiltinEngine, _Names, unavailable_reason, unsupported_options
from asprof.errors import ProfilerError
from asprof.jfrio.writer import KIND_CPU, KIND_WALL, SAMPLE, STATE_SLEEPING, clock_pair
from asprof.options import ProfilerOptions

from conftest import check_jfr, child_env
from jfr_tools import JFRCONV, NO_JFRCONV, ROOT, jfrconv_collapsed

UNAVAILABLE = unavailable_reason()
needs_builtin = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"built-in engine unavailable: {UNAVAILABLE}")


def _collapsed(rec: asprof.jfr.Recording, kind: str) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for line in asprof.jfr.to_collapsed(rec.samples(kind)).splitlines():
        stack, _, n = line.rpartition(" ")
        out[stack] = out.get(stack, 0) + int(n)
    return out


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
    cpu = _collapsed(rec, "cpu")
    assert cpu == {"jobs.Worker.run;demo.fib;demo.fib;deflate": 5, "jobs.Worker.run;0x7f00001234": 5} or \
        cpu == {"jobs.Worker.run;examples.demo.fib;examples.demo.fib;deflate": 5, "jobs.Worker.run;0x7f00001234": 5}
    assert sum(_collapsed(rec, "wall").values()) == 1
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
def test_demo_with_the_builtin_engine(tmp_path: Path) -> None:
    """The README's first command with the built-in engine: several ticks, each a valid
    self-contained report; the demo's functions in the stacks; asprof convert reads them."""
    r = _run_demo(tmp_path, ASPROF_ENGINE="builtin")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().splitlines()[-1].startswith("engine: builtin")
    files = sorted((tmp_path / "profiles").glob("*.jfr"))
    assert len(files) >= 3, r.stdout
    for f in files:
        counts = check_jfr(f)
        assert counts["chunks"] == 1
        rec = asprof.jfr.open(str(f))
        assert rec.setting("engine") == "builtin"
    rec = asprof.jfr.open(str(tmp_path / "profiles"))
    cpu = _collapsed(rec, "cpu")
    assert any(re.search(r"__main__\.work;(.*;)?__main__\.fib", s) for s in cpu), list(cpu)[:5]
    assert sum(n for s, n in cpu.items() if "__main__.fib" in s) > 0
    wall = asprof.jfr.open(str(tmp_path / "profiles")).samples("wall", by_thread=True)
    text = asprof.jfr.to_collapsed(wall)
    assert "[worker tid=" in text and "[MainThread tid=" in text
    conv = subprocess.run([sys.executable, "-m", "asprof", "convert", str(tmp_path / "profiles"),
                           "-o", str(tmp_path / "out.collapsed")], capture_output=True, text=True,
                          timeout=120, env=child_env())
    assert conv.returncode == 0, conv.stderr
    assert "__main__.fib" in (tmp_path / "out.collapsed").read_text()
    if JFRCONV is not None:
        assert "__main__.fib" in jfrconv_collapsed(files[-1], "--cpu")


@needs_builtin
@pytest.mark.skipif(JFRCONV is None, reason=NO_JFRCONV)
def test_jfrconv_reads_every_report(tmp_path: Path) -> None:
    r = _run_demo(tmp_path, "2", ASPROF_ENGINE="builtin")
    assert r.returncode == 0, r.stderr
    for f in sorted((tmp_path / "profiles").glob("*.jfr")):
        cpu = jfrconv_collapsed(f, "--cpu")
        total = sum(int(ln.rpartition(" ")[2]) for ln in cpu.splitlines())
        assert total == sum(_collapsed(asprof.jfr.open(str(f)), "cpu").values()), f.name


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
        by_pid[pid] = by_pid.get(pid, 0) + sum(_collapsed(asprof.jfr.open(str(f)), "cpu").values())
    assert by_pid.get(parent, 0) > 0 and by_pid.get(child, 0) > 0, (by_pid, r.stderr)


HIDDEN_DEMO = """
import runpy, sys
from asprof.engines import choice
from asprof.errors import LibraryNotFoundError
def missing(options, path):
    raise LibraryNotFoundError([("the linker's search (libasyncProfiler.so)", "hidden by the test")])
choice._async_profiler_engine = missing  # a machine without async-profiler, whatever this one has
sys.argv = ["demo.py", "2", sys.argv[1]]
runpy.run_path({demo!r}, run_name="__main__")
"""


@needs_builtin
def test_readme_first_command_without_async_profiler(tmp_path: Path) -> None:
    """`python examples/demo.py 5 profiles` where async-profiler does not load: the built-in
    engine runs, one INFO line says why, the demo ends with the engine's name."""
    code = HIDDEN_DEMO.format(demo=str(ROOT / "examples" / "demo.py"))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "profiles")], capture_output=True, text=True,
                       timeout=120, env=child_env(ASPROF_ENGINE=""))
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().splitlines()[-1].startswith("engine: builtin")
    infos = [ln for ln in r.stderr.splitlines() if "engine: built-in (async-profiler does not load" in ln]
    assert len(infos) == 1, r.stderr
    files = sorted((tmp_path / "profiles").glob("*.jfr"))
    assert len(files) >= 2 and all(check_jfr(f)["chunks"] == 1 for f in files)
