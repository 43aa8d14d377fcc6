"""Python allocation sampling and the live heap (issue #16).

Each workload runs in a child interpreter (the allocator hooks are process-wide): it allocates
known byte amounts from two functions, frees a third function's objects before the report and
keeps a known leak; the parent reads the report as a user would (asprof.jfr, asprof top) and
checks the allocation shares (within 5 points of the truth), the leak's live bytes (within
10%), that the freed objects are not in the live view, fork and hook hygiene."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tests.conftest import JFR_TOOL, REAL_LIB, check_jfr

pytest.importorskip("asprof.engines._alloc", reason="the allocation sampler is not built for this interpreter")

ROOT = Path(__file__).resolve().parent.parent.parent

# The functions allocate only the objects counted (sizes precomputed, no temporaries): the truth is
# sys.getsizeof of each object, what the interpreter asks its allocator for.
WORKLOAD = r'''
import json, os, sys, time
import asprof
from asprof.options import ProfilerOptions
from asprof.reporter import LocalReporter

KEEP = []
SIZES_A = [1500 + (i % 7) * 100 for i in range(36000)]   # 3 parts of the churn
SIZES_B = [200 + i % 300 for i in range(40000)]          # 1 part, smaller objects
LEAK = 12000
FREED = 5000

def alloc_a():
    for size in SIZES_A:
        b = bytes(size)

def alloc_b():
    for size in SIZES_B:
        s = "y" * size

def leak():             # held until the report
    for _ in range(LEAK):
        KEEP.append(bytearray(2000))

def freed():            # allocated and dropped before the report
    tmp = [bytes(4000) for _ in range(FREED)]
    del tmp

def main(out, engine, interval):
    truth = {"alloc_a": sum(sys.getsizeof(bytes(n)) for n in SIZES_A),
             "alloc_b": sum(sys.getsizeof("y" * n) for n in SIZES_B),
             "leak": LEAK * sys.getsizeof(bytearray(2000)),
             "freed": FREED * sys.getsizeof(bytes(4000))}
    p = asprof.start_profiling(LocalReporter(out), options=ProfilerOptions(python_alloc=interval, engine=engine),
                               reporting_interval=3600)
    alloc_a(); alloc_b(); leak(); freed()
    from asprof.engines import _alloc
    via_pymalloc = _alloc.stats()["via_pymalloc"]
    asprof.stop_profiling()
    print(json.dumps({"truth": truth, "via_pymalloc": via_pymalloc}))
'''


def _run(code: str, *args: str, timeout: float = 120, pythonmalloc: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), ASPROF_LOG_LEVEL="warning")
    env.pop("ASPROF_ENABLED", None)
    env.pop("PYTHONMALLOC", None)
    if pythonmalloc:
        env["PYTHONMALLOC"] = pythonmalloc
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(ROOT))


def _workload(tmp_path: Path, engine: str, interval: str = "16k", pythonmalloc: str = "") -> Dict[str, Any]:
    out = tmp_path / "profiles"
    r = _run(WORKLOAD + "\nmain(sys.argv[1], sys.argv[2], sys.argv[3])\n", str(out), engine, interval,
             pythonmalloc=pythonmalloc)
    if engine == "async-profiler" and "LibraryNotFoundError" in r.stderr:
        pytest.skip("async-profiler does not load here")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    files = sorted(out.glob("*.jfr"))
    assert len(files) == 1, files
    return {"truth": got["truth"], "via_pymalloc": got["via_pymalloc"], "file": files[0]}


def _by_function(prof: Any, names: List[str]) -> Dict[str, int]:
    """Bytes of the stacks that pass through each function (total, as a flame graph shows it)."""
    out = {n: 0 for n in names}
    for frames, w in prof.items():
        seen = {f[0].rsplit(".", 1)[-1] for f in frames}
        for n in names:
            if n in seen:
                out[n] += w
    return out



# Over pymalloc (the default) the MEM/OBJ frees are not hooked: a sampled small block is taken from
# pymalloc's RAW side and its free seen by the RAW hook. PYTHONMALLOC=malloc: every domain's free
# hooked (any other allocator under ours).
@pytest.mark.parametrize("engine,pythonmalloc", [
    ("builtin", ""), ("builtin", "malloc"),
    pytest.param("async-profiler", "", marks=pytest.mark.skipif(REAL_LIB is None, reason="async-profiler is not installed"))])
def test_shares_live_bytes_and_freed_objects(tmp_path: Path, engine: str, pythonmalloc: str) -> None:
    from asprof.jfr import open_recording

    run = _workload(tmp_path, engine, pythonmalloc=pythonmalloc)
    assert run["via_pymalloc"] == (0 if pythonmalloc else 2)
    truth = run["truth"]
    rec = open_recording(str(run["file"]))
    names = ["alloc_a", "alloc_b", "leak", "freed"]
    alloc = _by_function(rec.samples("alloc"), names)
    total_truth = sum(truth.values())
    total_seen = sum(alloc.values())
    for n in names:  # shares of what the four functions allocated, within 5 points
        want = 100.0 * truth[n] / total_truth
        got = 100.0 * alloc[n] / total_seen
        assert abs(got - want) <= 5.0, f"{n}: {got:.1f}% of the allocations, truth {want:.1f}% ({alloc}, {truth})"
    live = _by_function(rec.samples("live"), names)
    assert abs(live["leak"] - truth["leak"]) <= 0.10 * truth["leak"], (live, truth)
    # freed before the report: large blocks (freed, alloc_a) and pymalloc's small ones (alloc_b)
    assert live["freed"] == 0 and live["alloc_a"] < 0.01 * truth["alloc_a"], live
    assert live["alloc_b"] < 0.01 * truth["alloc_b"], live
    # the estimated objects: the leak is 12000 bytearrays (object + buffer: 2 blocks each)
    objs = _by_function(rec.samples("live", count=True), ["leak"])["leak"]
    assert 0.7 * 24000 <= objs <= 1.3 * 24000, objs


def test_cli_views_and_jfr_tools(tmp_path: Path) -> None:
    run = _workload(tmp_path, "builtin", "64k")
    f = str(run["file"])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    top = subprocess.run([sys.executable, "-m", "asprof", "top", "--live", f, "-n", "3"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert top.returncode == 0, top.stderr
    assert "live profile" in top.stdout and top.stdout.splitlines()[2].endswith(".leak"), top.stdout
    for kind in ("--alloc", "--live"):
        for ext in (".collapsed", ".html", ".pb.gz"):
            out = tmp_path / f"view{kind}{ext}"
            r = subprocess.run([sys.executable, "-m", "asprof", "convert", kind, f, "-o", str(out)],
                               capture_output=True, text=True, env=env, timeout=120)
            assert r.returncode == 0, r.stderr
            assert out.stat().st_size > 0
    collapsed = (tmp_path / "view--live.collapsed").read_text()
    assert ".leak " in collapsed and ".freed" not in collapsed
    import gzip

    pb = gzip.decompress((tmp_path / "view--alloc.pb.gz").read_bytes())
    assert b"alloc_objects" in pb and b"alloc_space" in pb
    assert b"inuse_space" in gzip.decompress((tmp_path / "view--live.pb.gz").read_bytes())
    counts = check_jfr(run["file"])  # the JDK's jfr tool, when there is one
    if JFR_TOOL is not None:
        assert counts.get("jdk.ObjectAllocationSample", 0) > 0 and counts.get("profiler.LiveObject", 0) > 0


def test_fork_child_reports_its_own_heap(tmp_path: Path) -> None:
    code = textwrap.dedent(r'''
        import os, sys, json
        import asprof
        from asprof.options import ProfilerOptions
        from asprof.reporter import LocalReporter
        out = sys.argv[1]
        asprof.start_profiling(LocalReporter(out), options=ProfilerOptions(python_alloc="16k", engine="builtin"),
                               reporting_interval=3600)
        def parent_leak():
            return [bytearray(1000) for _ in range(20000)]
        def child_leak():
            return [bytearray(1000) for _ in range(10000)]
        held = parent_leak()
        pid = os.fork()
        if pid == 0:
            mine = child_leak()
            asprof.stop_profiling()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        asprof.stop_profiling()
        print(json.dumps({"child": pid, "status": status}))
    ''')
    out = tmp_path / "p"
    r = _run(code, str(out))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["status"] == 0
    from asprof.jfr import open_recording

    files = {int(p.stem.rsplit("_", 1)[1]): p for p in out.glob("*.jfr")}
    assert info["child"] in files and len(files) == 2, files
    child = _by_function(open_recording(str(files[info["child"]])).samples("live"), ["parent_leak", "child_leak"])
    parent_pid = next(p for p in files if p != info["child"])
    parent = _by_function(open_recording(str(files[parent_pid])).samples("live"), ["parent_leak", "child_leak"])
    held = 10000 * (sys.getsizeof(bytearray(1000)))
    assert abs(child["child_leak"] - held) <= 0.15 * held and child["parent_leak"] == 0, child
    assert abs(parent["parent_leak"] - 2 * held) <= 0.15 * 2 * held and parent["child_leak"] == 0, parent


def test_hooks_restored_or_left_as_pass_through() -> None:
    code = textwrap.dedent(r'''
        import tracemalloc
        from asprof.engines import _alloc
        _alloc.start(4096)
        assert _alloc.hooks() == (1, 1, 1)
        x = [str(i) * 10 for i in range(10000)]
        assert _alloc.stop() == 0 and _alloc.hooks() == (0, 0, 0)   # ours on top: removed
        _alloc.start(4096)
        tracemalloc.start()                     # wraps ours
        assert _alloc.stop() == 3               # left in tracemalloc's chain, passing calls on
        y = [str(i) * 10 for i in range(10000)]
        snap = tracemalloc.take_snapshot()      # tracemalloc still sees allocations through us
        assert sum(s.size for s in snap.statistics("filename")) > 100000
        _alloc.start(4096)                      # re-uses the hooks in the chain: no double count
        z = [bytes(100) for _ in range(20000)]
        codes, stacks, data, lost = _alloc.collect()
        assert len(data) // 44 > 0 and lost == 0
        assert _alloc.stop() == 3
        tracemalloc.stop()
        print("ok")
    ''')
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_frees_of_sampled_small_blocks_are_seen_whatever_is_underneath() -> None:
    """The live set drops sampled small objects when they are freed: over pymalloc (MEM/OBJ frees
    unhooked: the sampled blocks come back through the RAW hook), under tracemalloc started first
    (every free hooked), and after stop() the blocks taken from pymalloc's RAW side free normally."""
    code = textwrap.dedent(r'''
        import sys, tracemalloc
        from asprof.engines import _alloc
        if sys.argv[1] == "tracemalloc":
            tracemalloc.start()
        _alloc.start(4096)
        held = [str(i) * 3 for i in range(100000)]           # small objects, ~5 MB: ~1200 samples
        live = _alloc.stats()["live"]
        assert live > 500, live
        del held
        left = _alloc.stats()["live"]
        assert left < 0.05 * live, (live, left)
        kept = [(i, str(i)) for i in range(50000)]           # sampled, live at stop()
        out = {"via_pymalloc": _alloc.stats()["via_pymalloc"]}
        assert _alloc.stop() == 0
        del kept                                             # freed with our hooks gone
        more = [bytes(50) for _ in range(10000)]
        print(out["via_pymalloc"])
    ''')
    for mode, want in (("default", "2"), ("tracemalloc", "0")):
        r = _run(code, mode)
        assert r.returncode == 0 and r.stdout.strip() == want, (mode, r.stdout, r.stderr)


def test_refused_where_the_frame_layout_does_not_match(caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """pf_layout_check at import (3.14: the walker's offsets against _PyRuntime.debug_offsets): where
    it fails, allocation sampling is off with one WARNING saying why, and profiling goes on."""
    import logging

    from asprof.engines import _alloc, alloc
    from asprof.engines.base import Engine
    from asprof.options import ProfilerOptions

    assert _alloc.python_frames_off is None  # this interpreter: the walker was built for it, the check passed
    assert alloc.unavailable_reason() is None
    monkeypatch.setattr(_alloc, "python_frames_off", "this CPython's code_object.name is at 99")
    inner = Engine()
    with caplog.at_level(logging.WARNING, logger="asprof"):
        assert alloc.wrap(inner, ProfilerOptions(python_alloc="512k")) is inner
    assert [r.getMessage() for r in caplog.records] == [
        "Python allocation sampling is off: its frame walker cannot read this interpreter's frames: "
        "this CPython's code_object.name is at 99"]


def test_size_of_weight_inverts_the_sampling_weight() -> None:
    import math

    from asprof.jfr.allocations import size_of_weight

    for interval in (512 * 1024, 16384):
        for size in (16, 100, 4000, 100000, 5 << 20):
            w = size / -math.expm1(-size / interval)
            assert abs(size_of_weight(round(w), interval) - size) <= max(2.0, 0.001 * size)


def test_unavailable_is_one_log_line_and_profiling_goes_on(caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from asprof.engines import alloc
    from asprof.engines.base import Engine
    from asprof.options import ProfilerOptions

    monkeypatch.setattr(alloc, "unavailable_reason", lambda: "the frame walker does not support this Python")
    inner = Engine()
    with caplog.at_level(logging.WARNING, logger="asprof"):
        assert alloc.wrap(inner, ProfilerOptions(python_alloc="512k")) is inner
    assert [r.getMessage() for r in caplog.records] == [
        "Python allocation sampling is off: the frame walker does not support this Python"]
    assert alloc.wrap(inner, ProfilerOptions()) is inner  # off by default
