"""Python frames inline (issue #12): asprof.jfrio.inline, the offline ``convert --format jfr``
and what other tools read of the result, without a profiler.

Inputs: the shipped agent report ``multi-chunk`` (async-profiler 4.5, Python frames on: its
stacks joined from ``asprof.Py*`` side events), the other shipped recordings (no side events:
written again unchanged), and small recordings built here whose side events exercise each rule
of the join (exact, timestamp, carried, unmatched, truncated, unknown code). Oracles: asprof's
own join (``asprof convert`` of the original file), async-profiler's ``jfrconv`` and the JDK
``jfr`` tool (each skipped, saying why, when not installed).
"""
from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import pytest

import asprof.jfr as J
from asprof.jfr.model import FrameType
from asprof.jfrio.inline import (
    SETTING,
    STATS_EVENT,
    ChunkError,
    Inliner,
    InlineStats,
    has_python_stacks,
    inline_python_frames,
)

from conftest import RECORDINGS, child_env, recording_bytes
from jfr_builder import T_USER, T_USER_TYPE, Simple, chunk, event, latin1, utf8, varint

_JVM = Path("/usr/lib/jvm")
JFR_TOOL = next(iter(sorted(_JVM.glob("*/bin/jfr"))), None) if _JVM.exists() else None
JFRCONV = shutil.which("jfrconv")
needs_jdk = pytest.mark.skipif(JFR_TOOL is None, reason="no JDK `jfr` tool in /usr/lib/jvm: the JDK oracle is skipped")
needs_jfrconv = pytest.mark.skipif(JFRCONV is None, reason="async-profiler's jfrconv is not installed: skipped")

EVAL = "_PyEval_EvalFrameDefault"
_FILE_LINE = re.compile(r" \([^()]*:\d+\)$")


# ---------------------------------------------------------------------- helpers


def collapsed(text: str) -> Counter[str]:
    """Collapsed stacks -> samples; Python frames without asprof's ``(file:line)``: the inline
    form names them ``module.qualname`` as every JFR tool prints them."""
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if not line.strip():
            continue
        stack, _, n = line.rpartition(" ")
        out[";".join(_FILE_LINE.sub("", f) for f in stack.split(";"))] += int(n)
    return out


def asprof_view(data: bytes, kind: str = "cpu", python: str = "mixed") -> Counter[str]:
    rec = J.open(data)
    return collapsed(J.to_collapsed(rec.samples(kind, python=python)))


def jfrconv(path: Path, kind: str) -> Counter[str]:
    assert JFRCONV is not None
    out = path.with_suffix(f".{kind}.txt")
    r = subprocess.run([JFRCONV, f"--{kind}", "-o", "collapsed", str(path), str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr or r.stdout
    return collapsed(out.read_text())


def jfr_tool(*args: str) -> str:
    assert JFR_TOOL is not None
    r = subprocess.run([str(JFR_TOOL), *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr or r.stdout
    return r.stdout


def summary_counts(path: Path) -> Dict[str, int]:
    out = {}
    for line in jfr_tool("summary", str(path)).splitlines():
        m = re.match(r"^\s+([\w.]+)\s+(\d+)\s+\d+\s*$", line)
        if m and m.group(1) not in ("jdk.Metadata", "jdk.CheckPoint"):
            out[m.group(1)] = int(m.group(2))
    return out


def counts(data: bytes) -> Dict[str, int]:
    return {k: n for k, (n, _) in J.open(data).counts.items() if k not in ("jdk.Metadata", "jdk.CheckPoint")}


def user_events(data: bytes) -> List[Tuple[str, Any]]:
    return [(str(ev["type"]), ev["data"]) for ev in J.open(data).events(["profiler.UserEvent"])]


# ---------------------------------------------------------------------- built recordings


def uleb(v: int) -> bytes:
    out = bytearray()
    while True:
        c = v & 0x7F
        v >>= 7
        out.append(c | (0x80 if v else 0))
        if not v:
            return bytes(out)


def ustr(s: str) -> bytes:
    b = s.encode()
    return uleb(len(b)) + b


class PyRecording(Simple):
    """A recording of native stacks (``Simple``) plus asprof's Python-stack side events."""

    def __init__(self) -> None:
        super().__init__()
        self.user_types: Dict[str, int] = {}

    def user(self, t: int, tid: int, name: str, payload: bytes) -> None:
        key = self.user_types.setdefault(name, len(self.user_types) + 1)
        self.events.append(event(T_USER, varint(t) + varint(tid) + varint(key) + latin1(payload.decode("latin-1"))))

    def codes(self, t: int, codes: Sequence[Tuple[int, int, int, str, str]]) -> None:
        self.user(t, 0, "asprof.PyCode", b"\x01" + b"".join(uleb(c) + uleb(f) + uleb(g) + ustr(q) + ustr(fn)
                                                           for c, f, g, q, fn in codes))

    def modules(self, t: int, mods: Sequence[Tuple[int, str]]) -> None:
        self.user(t, 0, "asprof.PyModule", b"\x01" + b"".join(uleb(g) + ustr(n) for g, n in mods))

    def pystack(self, t: int, sid: int, entries: Sequence[Any], truncated: bool = False) -> None:
        """entries leaf first: (code id, line), "|" (a boundary between eval-loop calls), "?" (unknown code)."""
        body = uleb(sid) + uleb(int(truncated)) + uleb(len(entries))
        for e in entries:
            body += b"\x00" if e == "|" else b"\x01" if e == "?" else uleb(e[0] + 2) + uleb(e[1])
        self.user(t, 0, "asprof.PyStack", b"\x01" + body)

    def pysamples(self, t: int, samples: Sequence[Tuple[int, int, int, int, int]]) -> None:
        """(tid, sample counter, tsc, monotonic ns, stack id)"""
        self.user(t, 0, "asprof.PySample", b"\x01" + b"".join(b"".join(uleb(x) for x in s) for s in samples))

    def build(self, **kw: Any) -> bytes:
        from jfr_builder import (
            FRAME_TYPES,
            T_CLASS,
            T_FRAME_TYPE,
            T_METHOD,
            T_STACK_TRACE,
            T_STRING,
            T_SYMBOL,
            T_THREAD,
            T_THREAD_STATE,
            THREAD_STATES,
            class_entry,
            method_entry,
            stack_entry,
            thread_entry,
        )

        pools = [
            (T_FRAME_TYPE, [(k, utf8(v)) for k, v in FRAME_TYPES]),
            (T_THREAD_STATE, [(k, utf8(v)) for k, v in THREAD_STATES]),
            (T_THREAD, [(tid, thread_entry(name, tid)) for tid, name in self.threads.items()]),
            (T_STACK_TRACE, [(key, stack_entry([(self.methods[f], f[2]) for f in reversed(frames)]))
                             for frames, key in self.stacks.items()]),
            (T_METHOD, [(mk, method_entry(self.classes[owner], self.symbols[name]))
                        for (name, owner, _t), mk in self.methods.items()]),
            (T_CLASS, [(ck, class_entry(self.symbols[owner])) for owner, ck in self.classes.items()]),
            (T_SYMBOL, [(k, utf8(s)) for s, k in self.symbols.items()]),
            (T_STRING, [(0, utf8(None))]),
            (T_USER_TYPE, [(k, utf8(n)) for n, k in self.user_types.items()]),
        ]
        return chunk(self.events, pools=pools, **kw)


PY = ("_PyEval_EvalFrameDefault", "libpython3.11.so", 3)
NATIVE_STACK = ["start_thread", PY, "_PyEval_Vector", PY, "zlib_compress"]  # root first


def scenario() -> bytes:
    """One thread (7) running Python, one (8) native only; every rule of the join once."""
    r = PyRecording()
    r.thread(7, "worker")
    r.thread(8, "native")
    r.codes(10, [(1, 10, 100, "alpha", "/srv/app/alpha.py"), (2, 20, 100, "work", "/srv/app/alpha.py"),
                 (3, 1, 200, "<module>", "/srv/main.py")])
    r.modules(10, [(100, "app.alpha"), (200, "__main__")])
    # leaf first: alpha (line 12), work (line 25) | <module> (line 3)
    r.pystack(11, 1, [(1, 12), (2, 25), "|", (3, 3)])
    r.pystack(11, 2, [(1, 13), "?", "|", (3, 4)], truncated=True)
    r.exec_sample(2000, 7, NATIVE_STACK)          # exact (counter 2000)
    r.exec_sample(3000, 7, NATIVE_STACK)          # by timestamp: our tsc 3000 + 1500 ticks (1.5 ms)
    r.exec_sample(400_000_000, 7, NATIVE_STACK)   # none: carried from the last with this native stack
    r.exec_sample(300_000_000, 7, ["start_thread", PY, "select"])  # none, never seen: native frames kept
    r.exec_sample(6000, 8, ["start_thread", "compress"])    # a thread without Python
    r.wall_sample(7000, 7, NATIVE_STACK, samples=3)        # wall, exact, truncated stack 2
    r.malloc(7500, 7, NATIVE_STACK, 0x1000, 64)             # native memory: never joined
    r.pysamples(9000, [(7, 2000, 2000, 50, 1), (7, 0, 4500, 60, 1), (7, 7000, 7000, 70, 2)])
    r.user(9500, 7, "fixture.Marker", b"marker \xe9 0")
    r.user(9600, 0, "asprof.PyStats", b'{"samples": 3}')
    return r.build()


# ---------------------------------------------------------------------- the rewrite


def test_each_rule_of_the_join_gives_the_stack_asprofs_join_gives() -> None:
    data = scenario()
    stats = InlineStats()
    out = inline_python_frames(data, stats)
    assert (stats.exact, stats.timestamp, stats.carried) == (2, 1, 1)
    assert (stats.unmatched_python_threads, stats.no_python, stats.samples) == (1, 1, 6)
    assert stats.side_events == 5  # PyCode, PyModule, two PyStack, PySample
    for kind in ("cpu", "wall"):
        for view in ("mixed", "python", "native"):
            assert asprof_view(out, kind, view) == asprof_view(data, kind, view), (kind, view)
    cpu = asprof_view(out, "cpu")
    mixed = "start_thread;__main__.<module>;_PyEval_Vector;app.alpha.work;app.alpha.alpha;zlib_compress"
    assert cpu[mixed] == 3                                       # exact, timestamp, carried
    assert cpu[f"start_thread;{EVAL};select"] == 1                # unjoinable: native frames kept
    assert cpu["start_thread;compress"] == 1
    wall = asprof_view(out, "wall")
    # pystacks puts the mark of a truncated Python stack at the root
    assert wall == {"[truncated Python stack];start_thread;__main__.<module>;_PyEval_Vector;<unknown>;"
                    "app.alpha.alpha;zlib_compress": 3}


def test_python_frames_carry_module_qualname_and_the_current_line() -> None:
    rec = J.open(inline_python_frames(scenario()))
    ev = next(iter(rec.events(["jdk.ExecutionSample"])))
    frames = ev["stackTrace"]["frames"]
    got = [(f["method"]["type"]["name"], f["method"]["name"], f["lineNumber"], f["type"]) for f in frames]
    assert got == [("libapp.so", "zlib_compress", 0, "Native"), ("app.alpha", "alpha", 12, "Python"),
                   ("app.alpha", "work", 25, "Python"), ("libapp.so", "_PyEval_Vector", 0, "Native"),
                   ("__main__", "<module>", 3, "Python"), ("libapp.so", "start_thread", 0, "Native")]


def test_nothing_is_dropped_but_the_join_events() -> None:
    data = scenario()
    out = inline_python_frames(data)
    before, after = counts(data), counts(out)
    for t in ("jdk.ExecutionSample", "profiler.WallClockSample", "profiler.Malloc"):
        assert after[t] == before[t]
    assert J.open(out).samples("wall").total == J.open(data).samples("wall").total == 3  # weights kept
    kept = user_events(out)
    assert ("fixture.Marker", "marker \xe9 0") in kept and ("asprof.PyStats", '{"samples": 3}') in kept
    assert not [t for t, _ in kept if t in ("asprof.PyCode", "asprof.PyStack", "asprof.PySample", "asprof.PyModule")]
    stats = [json.loads(d) for t, d in kept if t == STATS_EVENT]
    assert stats == [{"exact": 2, "timestamp": 1, "carried": 1, "unmatched_python_threads": 1, "no_python": 1,
                      "samples": 6, "side_events": 5}]
    rec = J.open(out)
    assert rec.setting(SETTING) == "true"
    assert {t.os_name for t in rec.threads} >= {"worker", "native"}
    times = sorted(ev.time_ns for ev in rec.events(["jdk.ExecutionSample"]))
    assert times == sorted(ev.time_ns for ev in J.open(data).events(["jdk.ExecutionSample"]))


def test_a_recording_without_side_events_is_returned_as_is() -> None:
    data = recording_bytes("cpu-wall-dwarf")
    assert not has_python_stacks(data)
    assert inline_python_frames(data) is data


def test_an_inlined_recording_is_not_joined_again() -> None:
    once = inline_python_frames(scenario())
    assert not has_python_stacks(once)
    assert inline_python_frames(once) is once
    assert asprof_view(Inliner().rewrite(once, always=True)) == asprof_view(once)


def test_the_shipped_agent_report() -> None:
    data = recording_bytes("multi-chunk")
    stats = InlineStats()
    out = inline_python_frames(data, stats)
    assert stats.with_python >= 0.8 * stats.samples, stats
    for kind in ("cpu", "wall"):
        for view in ("mixed", "python", "native"):
            assert asprof_view(out, kind, view) == asprof_view(data, kind, view), (kind, view)
    assert any("__main__.python_burner.<locals>.fib" in s for s in asprof_view(out))


@pytest.mark.parametrize("name", [n for n in RECORDINGS if n != "multi-chunk"])
def test_recordings_without_python_stacks_written_again_read_the_same(name: str) -> None:
    data = recording_bytes(name)
    out = Inliner().rewrite(data, always=True)
    assert counts(out) == counts(data)
    for kind in ("cpu", "wall", "nativemem"):
        assert asprof_view(out, kind) == asprof_view(data, kind), kind


def test_malformed_input_raises_chunk_error_only() -> None:
    data = recording_bytes("multi-chunk")
    with pytest.raises(ChunkError):
        inline_python_frames(data[: len(data) // 2])
    rng = random.Random(12)
    for _ in range(40):
        b = bytearray(data)
        for _ in range(3):
            b[rng.randrange(68, len(b))] = rng.randrange(256)
        try:
            out = inline_python_frames(bytes(b))
        except ChunkError:
            continue
        assert isinstance(out, bytes)


def test_a_failed_file_leaves_the_inliner_as_it_was() -> None:
    inl = Inliner()
    with pytest.raises(ChunkError):
        inl.rewrite(scenario()[:-7])
    assert (inl.chunks, inl.key_base, inl.user_types, inl.stats.samples) == (0, 0, {}, 0)
    inl.rewrite(scenario())
    assert inl.chunks == 1 and inl.stats.samples == 6


# ---------------------------------------------------------------------- other tools


@needs_jfrconv
def test_jfrconv_prints_the_joined_stacks(tmp_path: Path) -> None:
    data = recording_bytes("multi-chunk")
    path = tmp_path / "inline.jfr"
    path.write_bytes(inline_python_frames(data))
    for kind in ("cpu", "wall"):
        got = jfrconv(path, kind)
        assert got == asprof_view(data, kind), kind          # the same stacks and totals
        assert sum(got.values()) == J.open(data).samples(kind).total
    cpu = jfrconv(path, "cpu")
    fib = [s for s in cpu if s.endswith("__main__.python_burner.<locals>.fib")]
    assert fib and all("threading.Thread.run;_PyEval_Vector;__main__.python_burner;" in s for s in fib)


@needs_jfrconv
def test_jfrconv_on_the_built_recording_and_lines(tmp_path: Path) -> None:
    path = tmp_path / "s.jfr"
    path.write_bytes(inline_python_frames(scenario()))
    assert jfrconv(path, "cpu") == asprof_view(scenario(), "cpu")
    out = tmp_path / "lines.txt"
    subprocess.run([str(JFRCONV), "--cpu", "--lines", "-o", "collapsed", str(path), str(out)], check=True,
                   capture_output=True, timeout=120)
    assert "__main__.<module>:3;_PyEval_Vector;app.alpha.work:25;app.alpha.alpha:12;zlib_compress" in out.read_text()


@needs_jdk
def test_the_jdk_tool_reads_it(tmp_path: Path) -> None:
    data = recording_bytes("multi-chunk")
    src, path = tmp_path / "in.jfr", tmp_path / "inline.jfr"
    src.write_bytes(data)
    path.write_bytes(inline_python_frames(data))
    before, after = summary_counts(src), summary_counts(path)
    for t in ("jdk.ExecutionSample", "profiler.WallClockSample", "jdk.NativeLibrary", "profiler.Log",
              "jdk.OSInformation", "jdk.CPUInformation", "jdk.ActiveRecording"):
        assert after.get(t) == before.get(t), t
    assert after["jdk.ActiveSetting"] == before["jdk.ActiveSetting"] + 1  # pythonFramesInline
    text = jfr_tool("print", "--events", "jdk.ExecutionSample", "--stack-depth", "64", str(path))
    assert re.search(r"__main__\.python_burner\.<locals>\.fib\(\)\s+line: \d+", text)
    assert re.search(r"__main__\.python_burner\(\)\s+line: \d+", text)
    assert "_PyEval_EvalFrameDefault" not in text.split("__main__.python_burner()")[0].rsplit("stackTrace", 1)[-1]


@needs_jdk
@needs_jfrconv
def test_several_files_in_one_output(tmp_path: Path) -> None:
    """Files rewritten one after the other into one recording: each keeps its own stacks."""
    names = ["multi-chunk", "two-chunks", "user-events"]
    inl = Inliner()
    out = b"".join(inl.rewrite(recording_bytes(n), always=True) for n in names)
    path = tmp_path / "all.jfr"
    path.write_bytes(out)
    for kind in ("cpu", "wall"):
        want: Counter[str] = Counter()
        for n in names:
            want += asprof_view(recording_bytes(n), kind)
        assert jfrconv(path, kind) == want, kind
        assert asprof_view(out, kind) == want, kind
    events = json.loads(jfr_tool("print", "--json", "--events", "jdk.ExecutionSample", "--stack-depth", "200",
                                 str(path)))["recording"]["events"]
    assert len(events) == sum(counts(recording_bytes(n))["jdk.ExecutionSample"] for n in names)


# ---------------------------------------------------------------------- asprof convert --format jfr


def run_cli(*args: str, cwd: "Path | None" = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asprof", "convert", *args], capture_output=True, text=True,
                          timeout=120, env=child_env(), cwd=cwd)


def test_convert_format_jfr_directory_zip_and_file(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jfr").write_bytes(recording_bytes("multi-chunk"))
    with zipfile.ZipFile(d / "b.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("async_profiler_dump_0.jfr", scenario())
        zf.writestr("metadata.json", "{}")
    out = tmp_path / "out.jfr"
    r = run_cli(str(d), "-o", str(out))                       # .jfr: the format from the extension
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    want = asprof_view(recording_bytes("multi-chunk")) + asprof_view(scenario())
    assert asprof_view(data) == want
    assert J.open(data).samples("wall").total == (J.open(recording_bytes("multi-chunk")).samples("wall").total
                                                  + J.open(scenario()).samples("wall").total)
    single = tmp_path / "single"
    r = run_cli(str(d / "a.jfr"), "-o", str(single), "--format", "jfr")
    assert r.returncode == 0, r.stderr
    assert asprof_view(single.read_bytes()) == asprof_view(recording_bytes("multi-chunk"))


def test_convert_format_jfr_never_overwrites_its_input(tmp_path: Path) -> None:
    src = tmp_path / "a.jfr"
    src.write_bytes(recording_bytes("multi-chunk"))
    r = run_cli(str(src), "-o", str(src))
    assert r.returncode != 0 and "overwrite" in r.stderr and "Traceback" not in r.stderr
    assert src.read_bytes() == recording_bytes("multi-chunk")
    r = run_cli(str(src), "--format", "jfr", cwd=tmp_path)     # default name: a.inline.jfr in the working directory
    assert r.returncode == 0, r.stderr
    assert asprof_view((tmp_path / "a.inline.jfr").read_bytes()) == asprof_view(recording_bytes("multi-chunk"))


def test_frame_types_in_asprofs_reader() -> None:
    c = J.open(inline_python_frames(scenario())).chunks[0]
    types = {f.name: f.type for key in c.stacks.index for st in [c.stack_trace(key)] if st is not None
             for f in st.frames}
    assert types["app.alpha.alpha"] == FrameType.PYTHON
    assert types["zlib_compress"] == FrameType.NATIVE
