"""Python frames inline (issue #12) in the agent's reports, with the real async-profiler.

A child interpreter runs a small workload under the agent, Python frames on: once with
``python_frames_inline=False`` (the report as async-profiler and the capture wrote it, with the
side events), once with the default (each report rewritten on the agent thread). Both are read
by async-profiler's ``jfrconv --cpu`` (collapsed) and by the JDK ``jfr print``: the workload's
Python functions appear with their callers, the stacks and totals are those ``asprof convert``
gives for the recorded file, and the totals are the recording's.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Dict

import pytest

import asprof.jfr as J
from asprof.jfrio.inline import SETTING, inline_python_frames

from conftest import child_env, requires_real

_JVM = Path("/usr/lib/jvm")
JFR_TOOL = next(iter(sorted(_JVM.glob("*/bin/jfr"))), None) if _JVM.exists() else None
JFRCONV = shutil.which("jfrconv")
needs_tools = pytest.mark.skipif(JFR_TOOL is None or JFRCONV is None,
                                 reason="needs async-profiler's jfrconv and the JDK `jfr` tool (/usr/lib/jvm)")

APP = """
import sys, time, zlib, os, asprof
def inner(n):
    return sum(i * i for i in range(n))
def outer():
    inner(20000)
    zlib.compress(os.urandom(30000))
opts = asprof.ProfilerOptions(cpu_interval=0.002, wall_interval=0.05, **eval(sys.argv[2]))
with asprof.Profiler(asprof.LocalReporter(sys.argv[1]), reporting_interval=30, options=opts).start():
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        outer()
"""
_FILE_LINE = re.compile(r" \([^()]*:\d+\)$")


def record(tmp_path: Path, name: str, options: str) -> Path:
    out = tmp_path / name
    r = subprocess.run([sys.executable, "-c", APP, str(out), options], capture_output=True, text=True,
                       timeout=120, env=child_env())
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.jfr"))
    assert len(files) == 1, files
    return files[0]


def collapsed(text: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.strip():
            stack, _, n = line.rpartition(" ")
            out[";".join(_FILE_LINE.sub("", f) for f in stack.split(";"))] += int(n)
    return out


def jfrconv(path: Path, kind: str = "cpu") -> Counter[str]:
    out = path.with_suffix(f".{kind}.txt")
    r = subprocess.run([str(JFRCONV), f"--{kind}", "-o", "collapsed", str(path), str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr or r.stdout
    return collapsed(out.read_text())


def asprof_convert(path: Path, kind: str = "cpu") -> Counter[str]:
    out = path.with_suffix(f".asprof.{kind}.collapsed")
    r = subprocess.run([sys.executable, "-m", "asprof", "convert", str(path), f"--{kind}", "-o", str(out)],
                       capture_output=True, text=True, timeout=120, env=child_env())
    assert r.returncode == 0, r.stderr
    return collapsed(out.read_text())


def jfr_counts(path: Path) -> Dict[str, int]:
    assert JFR_TOOL is not None
    text = subprocess.run([str(JFR_TOOL), "summary", str(path)], capture_output=True, text=True, timeout=120,
                          check=True).stdout
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+([\w.]+)\s+(\d+)\s+\d+\s*$", text, re.M)}


def callers_of_inner(stacks: Counter[str]) -> int:
    """Samples in which ``inner`` runs called by ``outer``, called by the module."""
    return sum(n for s, n in stacks.items() if re.search(r"__main__\.<module>;__main__\.outer;__main__\.inner(;|$)", s))


@requires_real
@needs_tools
def test_a_recorded_report_rewritten_reads_as_asprof_joins_it(tmp_path: Path) -> None:
    raw = record(tmp_path, "raw", "{'python_frames_inline': False}")
    rec = J.open(str(raw))
    assert rec.setting(SETTING) is None and rec.counts.get("profiler.UserEvent", (0, 0))[0] > 0
    inline = tmp_path / "inline.jfr"
    inline.write_bytes(inline_python_frames(raw.read_bytes()))
    for kind in ("cpu", "wall"):
        want = asprof_convert(raw, kind)
        got = jfrconv(inline, kind)
        assert got == want, kind                                  # the same stacks and totals
        assert sum(got.values()) == rec.samples(kind).total       # the recording's
    assert callers_of_inner(jfrconv(inline)) > 0


@requires_real
@needs_tools
def test_the_agents_reports_are_inline_by_default(tmp_path: Path) -> None:
    path = record(tmp_path, "agent", "{}")
    rec = J.open(str(path))
    assert rec.setting(SETTING) == "true"
    cpu = jfrconv(path)
    assert callers_of_inner(cpu) >= sum(cpu.values()) // 10, sorted(cpu.items(), key=lambda kv: -kv[1])[:5]
    assert cpu == asprof_convert(path)
    assert sum(cpu.values()) == jfr_counts(path)["jdk.ExecutionSample"] == rec.samples("cpu").total
    assert sum(jfrconv(path, "wall").values()) == rec.samples("wall").total
    assert JFR_TOOL is not None
    text = subprocess.run([str(JFR_TOOL), "print", "--events", "jdk.ExecutionSample", "--stack-depth", "64",
                           str(path)], capture_output=True, text=True, timeout=120, check=True).stdout
    # a Python frame, then its caller, each with its line
    assert re.search(r"__main__\.inner\(\)\s+line: \d+\s*\n\s*__main__\.outer\(\)\s+line: \d+", text), text[:3000]
