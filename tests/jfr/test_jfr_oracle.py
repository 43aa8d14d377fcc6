"""The reader against the JDK's own ``jfr`` tool on every real fixture.

For each real recording in ``tests/data`` (async-profiler 4.5 on CPython, recorded
through asprof: CPU and wall with DWARF and frame-pointer stacks, native memory,
user events, an agent report with its Python-frame side events; see
tests/data/README.md), two of them concatenated, and a recording of the JDK's
own Flight Recorder: the number of events per type, every decoded field
of every event (threads, strings, numbers, settings, user-event payloads) and
the frames of every stack equal what ``jfr print --json`` reports; event
timestamps agree to within a microsecond.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest

import asprof.jfr as J

from conftest import RECORDINGS, unpack_recording

# the shipped recordings (tests/data/*.jfr.gz), and two of them concatenated (made at test time)
INPUTS = [f"{name}.jfr" for name in RECORDINGS] + ["concatenated.jfr"]
CONCATENATED = ["cpu-wall-fp", "user-events"]
JAVA = shutil.which("java")
if JAVA:
    INPUTS.append("jdk-recording.jfr")  # a recording written by the JDK's own Flight Recorder

_BURN = """
public class Burn {
    public static void main(String[] a) {
        long x = 0, end = System.currentTimeMillis() + 700;
        while (System.currentTimeMillis() < end)
            for (int i = 0; i < 100000; i++) x += Integer.toString(i).hashCode();
        System.out.println(x);
    }
}
"""


def _jfr_tool() -> str:
    for cand in sorted(Path("/usr/lib/jvm").glob("*/bin/jfr")) if Path("/usr/lib/jvm").exists() else []:
        return str(cand)
    return shutil.which("jfr") or ""


JFR = _jfr_tool()

pytestmark = pytest.mark.skipif(not JFR, reason="no JDK 'jfr' tool installed: the JDK oracle cannot run")

# Fields whose JSON form is a formatted time or duration (compared separately or skipped).
_TIME_FIELDS = {"startTime", "timeSpan", "duration", "recordingStart", "recordingDuration", "maxAge",
                "flushInterval"}


def _materialize(name: str, tmp: Path) -> Path:
    if name.removesuffix(".jfr") in RECORDINGS:
        return unpack_recording(name.removesuffix(".jfr"), tmp)
    out = tmp / name
    if name == "jdk-recording.jfr":
        src = tmp / "Burn.java"
        src.write_text(_BURN)
        subprocess.run([JAVA or "java", f"-XX:StartFlightRecording=filename={out},settings=profile", str(src)],
                       check=True, capture_output=True, timeout=300, cwd=tmp)
    else:
        out.write_bytes(b"".join(unpack_recording(part, tmp).read_bytes() for part in CONCATENATED))
    return out


@pytest.fixture(scope="module", params=INPUTS)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("oracle")
    path = _materialize(request.param, tmp)
    # The JDK resolves constant-pool keys across chunks, which mixes up two unrelated
    # recordings glued together: its oracle for the concatenation is that of the parts.
    parts = [tmp / f"{part}.jfr" for part in CONCATENATED] if path.name == "concatenated.jfr" else [path]
    jdk = []
    for part in parts:
        out = subprocess.run([JFR, "print", "--json", "--stack-depth", "2048", str(part)],
                             check=True, capture_output=True, timeout=300)
        jdk += json.loads(out.stdout)["recording"]["events"]
    return path, jdk, J.open(str(path))


_TIMELIKE = re.compile(r"^-?P(T|\d)|^\d{4}-\d\d-\d\dT")


def _time_keys(v: Any, out: Set[str]) -> Set[str]:
    """Names of fields that the JDK prints as timestamps or durations (Timestamp/Timespan)."""
    if isinstance(v, dict):
        for k, x in v.items():
            if isinstance(x, str) and _TIMELIKE.match(x):
                out.add(k)
            _time_keys(x, out)
    elif isinstance(v, list):
        for x in v:
            _time_keys(x, out)
    return out


def _canon(v: Any, drop: Set[str]) -> Any:
    if isinstance(v, dict):
        return {k: _canon(x, drop) for k, x in v.items() if k not in drop}
    if isinstance(v, list):
        return [_canon(x, drop) for x in v]
    if isinstance(v, float):
        return float(f"{v:.5g}") if math.isfinite(v) else str(v)
    return v


def _key(v: Any, drop: Set[str] = _TIME_FIELDS) -> str:
    return json.dumps(_canon(v, drop), sort_keys=True, ensure_ascii=False)


def _iso_ns(s: str) -> int:
    # e.g. 2026-11-25T19:39:08.078552219Z
    base, _, frac = s.rstrip("Z").partition(".")
    dt = datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000_000 + int((frac + "000000000")[:9])


def test_event_counts_per_type(pair: Any) -> None:
    path, jdk, rec = pair
    expected = Counter(e["type"] for e in jdk)
    ours = Counter({k: n for k, (n, _b) in rec.counts.items() if k not in ("jdk.Metadata", "jdk.CheckPoint")})
    assert ours == expected
    assert Counter(e.type for e in rec.events()) == expected


def test_every_event_decodes_like_the_jdk(pair: Any) -> None:
    path, jdk, rec = pair
    drop = _time_keys([e["values"] for e in jdk], set(_TIME_FIELDS))
    by_type: Dict[str, Counter[str]] = {}
    for e in jdk:
        by_type.setdefault(e["type"], Counter())[_key(e["values"], drop)] += 1
    mine: Dict[str, Counter[str]] = {}
    for ev in rec.events():
        mine.setdefault(ev.type, Counter())[_key(ev.values, drop)] += 1
    assert set(mine) == set(by_type)
    for t in by_type:
        assert mine[t] == by_type[t], f"{path.name}: {t} events differ"


def test_stack_frames_equal_the_jdk(pair: Any) -> None:
    """The frames of every sample's stack (leaf first) as (library/class, method, type, line)."""
    path, jdk, rec = pair

    def frames_of(st: Any) -> tuple:
        return tuple((f["method"]["type"]["name"] if f["method"] and f["method"]["type"] else None,
                      f["method"]["name"] if f["method"] else None, f["type"], f["lineNumber"])
                     for f in (st or {}).get("frames", []))

    expected = Counter((e["type"], frames_of(e["values"].get("stackTrace")))
                       for e in jdk if "stackTrace" in e["values"])
    ours: Counter[tuple] = Counter()
    for ev in rec.events():
        if "stackTrace" not in ev.raw:
            continue
        st = ev.stack_trace
        ours[(ev.type, tuple((f.owner, f.method, ev.chunk.pool("jdk.types.FrameType").get(
            ev.chunk.stacks.ftype[ev.chunk.stacks.starts[ev.chunk.stacks.index[st.key]] + i]), f.line)
            for i, f in enumerate(st.frames)) if st else ())] += 1
    assert ours == expected
    assert sum(n for (t, fr), n in expected.items() if fr) > 0


def test_timestamps_match(pair: Any) -> None:
    path, jdk, rec = pair
    exp: Dict[str, List[int]] = {}
    for e in jdk:
        exp.setdefault(e["type"], []).append(_iso_ns(e["values"]["startTime"]))
    mine: Dict[str, List[int]] = {}
    for ev in rec.events():
        assert ev.time_ns is not None
        mine.setdefault(ev.type, []).append(ev.time_ns)
    for t, times in exp.items():
        a, b = sorted(times), sorted(mine[t])
        assert len(a) == len(b)
        worst = max(abs(x - y) for x, y in zip(a, b))
        assert worst <= 1000, f"{t}: timestamps differ by up to {worst} ns"


def test_fast_sample_columns_agree_with_generic_decoding(pair: Any) -> None:
    """The C scan (used by every view) sees the same samples as the generic decoder."""
    path, jdk, rec = pair
    for chunk in rec.chunks:
        cols = chunk.columns
        generic = [(ev.ticks, ev.raw["stackTrace"].key, ev.thread.key if ev.thread else 0)
                   for ev in chunk.events(["jdk.ExecutionSample", "jdk.NativeMethodSample", "profiler.WallClockSample",
                                                 "profiler.Malloc"])]
        fast = list(zip(cols.time, cols.stack, cols.thread))
        assert sorted(fast) == sorted(generic)
        frees = sum(1 for _ in chunk.events(["profiler.Free"]))
        assert sum(1 for r in cols.mem_row if r < 0) == frees


def test_threads_and_settings(pair: Any) -> None:
    path, jdk, rec = pair
    names = {(e["values"]["sampledThread"] or {}).get("osName") for e in jdk
             if e["values"].get("sampledThread")}
    assert names <= {t.os_name for t in rec.threads}
    settings = [(e["values"]["id"], e["values"]["name"], e["values"]["value"]) for e in jdk
                if e["type"] == "jdk.ActiveSetting"]
    assert Counter((s.event_id, s.name, s.value) for s in rec.settings) == Counter(settings)


def test_multi_chunk_inputs_have_several_chunks(pair: Any) -> None:
    path, jdk, rec = pair
    if path.name in ("two-chunks.jfr", "multi-chunk.jfr", "concatenated.jfr"):
        assert len(rec.chunks) == 2
        assert rec.chunks[0].start_nanos <= rec.chunks[1].start_nanos
