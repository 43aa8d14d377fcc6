"""asprof.jfrio.writer: one self-contained chunk, read back by asprof's reader, the JDK `jfr`
tool and async-profiler's converter (the last two where installed)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import asprof.jfr
from asprof.jfrio.writer import (
    FRAME_NATIVE,
    FRAME_PYTHON,
    KIND_CPU,
    KIND_WALL,
    SAMPLE,
    STATE_RUNNABLE,
    STATE_SLEEPING,
    ChunkWriter,
    Field,
    clock_pair,
    varint,
)

from jfr_tools import JFR_TOOL, JFRCONV, NO_JDK, NO_JFRCONV, asprof_collapsed, jfr, jfrconv_collapsed

MAIN_TID, WORKER_TID = 4242, 4243


def _chunk(n_cpu: int = 30, n_wall: int = 20, start_ticks: int = 0) -> Tuple[bytes, Dict[str, int]]:
    """A chunk with two stacks, CPU and wall samples of two threads; returns the expected totals."""
    wall_ns, mono = clock_pair()
    if start_ticks:
        mono = start_ticks
    w = ChunkWriter(wall_ns, mono)
    w.recording_info("asprof")
    w.system_info()
    w.setting("jdk.ExecutionSample", "interval", "10000000")
    w.setting("jdk.ExecutionSample", "wall", "100000000")
    w.setting("jdk.ActiveRecording", "engine", "builtin")
    fib = w.python_method("examples.demo", "fib")
    work = w.python_method("examples.demo", "work")
    mod = w.python_method("__main__", "<module>")
    deflate = w.native_method("/usr/lib/x86_64-linux-gnu/libz.so.1", "deflate")
    deep = w.stack([(fib, 22, FRAME_PYTHON), (fib, 22, FRAME_PYTHON), (work, 27, FRAME_PYTHON),
                    (mod, 40, FRAME_PYTHON)])
    native = w.stack([(deflate, 0, FRAME_NATIVE), (work, 29, FRAME_PYTHON), (mod, 40, FRAME_PYTHON)])
    recs = bytearray()
    for i in range(n_cpu):
        recs += SAMPLE.pack(mono + 1_000_000 * i, MAIN_TID if i % 3 else WORKER_TID, i % 2, KIND_CPU, 0, 0)
    for i in range(n_wall):
        recs += SAMPLE.pack(mono + 1_000_000 * i + 500, WORKER_TID, 0, KIND_WALL,
                            STATE_SLEEPING if i % 2 else STATE_RUNNABLE, 0)
    assert w.samples_from(bytes(recs), [deep, native]) == n_cpu + n_wall
    w.thread(MAIN_TID, "MainThread")
    return w.finish(thread_name=lambda tid: "worker" if tid == WORKER_TID else ""), {
        "cpu": n_cpu, "wall": n_wall, "fib": (n_cpu + 1) // 2, "deflate": n_cpu // 2}


def _write(tmp_path: Path, data: bytes, name: str = "w.jfr") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_varint_matches_jfr_encoding() -> None:
    assert varint(0) == b"\x00" and varint(127) == b"\x7f" and varint(128) == b"\x80\x01"
    assert len(varint(-1)) == 9 and len(varint((1 << 56) - 1)) == 8


def test_round_trip_through_asprof_reader() -> None:
    data, want = _chunk()
    rec = asprof.jfr.open(data)
    threads = {t.os_thread_id: t.os_name for t in rec.threads}
    assert threads == {MAIN_TID: "MainThread", WORKER_TID: "worker"}
    assert rec.setting("engine") == "builtin" and rec.setting("interval") == "10000000"
    cpu = asprof_collapsed(rec, "cpu")
    assert sum(cpu.values()) == want["cpu"]
    assert cpu["__main__.<module>;examples.demo.work;examples.demo.fib;examples.demo.fib"] == want["fib"]
    assert cpu["__main__.<module>;examples.demo.work;deflate"] == want["deflate"]
    assert sum(asprof_collapsed(rec, "wall").values()) == want["wall"]


def test_fast_path_handles_large_monotonic_clocks() -> None:
    """CLOCK_MONOTONIC past 6.5 days takes the 8-byte timestamp branch: same events."""
    data, want = _chunk(start_ticks=30 * 24 * 3600 * 10**9)
    rec = asprof.jfr.open(data)
    assert sum(asprof_collapsed(rec, "cpu").values()) == want["cpu"]
    assert sum(asprof_collapsed(rec, "wall").values()) == want["wall"]


def test_bad_sample_records_are_refused() -> None:
    w = ChunkWriter(*clock_pair())
    with pytest.raises(ValueError, match="stack 3"):
        w.samples_from(SAMPLE.pack(1, 1, 3, KIND_CPU, 0, 0), [1, 2])
    with pytest.raises(ValueError, match="kind 7"):
        w.samples_from(SAMPLE.pack(1, 1, 0, 7, 0, 0), [1])


def test_user_declared_event_type() -> None:
    w = ChunkWriter(*clock_pair())
    w.declare_event("asprof.Note", [Field("startTime", "long", "Start Time", 0x10),
                                    Field("eventThread", "java.lang.Thread", "Thread", 0x1),
                                    Field("text", "java.lang.String", "Text")], label="Note")
    w.event("asprof.Note", w.start_ticks, MAIN_TID, "hello")
    with pytest.raises(ValueError, match="fields"):
        w.event("asprof.Note", 1, 2)
    with pytest.raises(ValueError, match="other fields"):
        w.declare_event("asprof.Note", [Field("x", "int")])
    rec = asprof.jfr.open(w.finish())
    assert rec.counts["asprof.Note"][0] == 1


@pytest.mark.skipif(JFR_TOOL is None, reason=NO_JDK)
def test_jdk_jfr_reads_the_chunk(tmp_path: Path) -> None:
    data, want = _chunk()
    p = _write(tmp_path, data)
    summary = jfr("summary", str(p))
    counts = {ln.split()[0]: int(ln.split()[1]) for ln in summary.splitlines()
              if len(ln.split()) == 3 and ln.split()[1].isdigit()}
    assert counts["jdk.ExecutionSample"] == want["cpu"] and counts["profiler.WallClockSample"] == want["wall"]
    assert counts["jdk.ActiveSetting"] == 3 and counts["jdk.OSInformation"] == 1
    printed = jfr("print", "--events", "jdk.ExecutionSample", "--stack-depth", "64", str(p))
    assert "examples.demo.fib() line: 22" in printed
    assert "__main__.<module>() line: 40" in printed
    assert "libz.so.1.deflate()" in printed
    assert 'sampledThread = "MainThread"' in printed and 'sampledThread = "worker"' in printed
    assert 'state = "STATE_DEFAULT"' in printed


@pytest.mark.skipif(JFRCONV is None, reason=NO_JFRCONV)
def test_async_profiler_converter_reads_the_chunk(tmp_path: Path) -> None:
    data, want = _chunk()
    p = _write(tmp_path, data)
    for kind, total in (("--cpu", want["cpu"]), ("--wall", want["wall"])):
        lines: List[str] = jfrconv_collapsed(p, kind).splitlines()
        got = {ln.rpartition(" ")[0]: int(ln.rpartition(" ")[2]) for ln in lines}
        assert sum(got.values()) == total, kind
    cpu = jfrconv_collapsed(p, "--cpu")
    assert f"__main__.<module>;examples.demo.work;examples.demo.fib;examples.demo.fib {want['fib']}" in cpu
    assert f"__main__.<module>;examples.demo.work;deflate {want['deflate']}" in cpu


def test_batches_with_their_own_ids_in_one_chunk_and_skipped_threads() -> None:
    """Stack ids are local to each samples_from call (the engine adds a batch every few
    seconds to the same report); samples of skip_tids are left out."""
    w = ChunkWriter(*clock_pair())
    a = w.stack([(w.python_method("m", "a"), 1, FRAME_PYTHON)])
    b = w.stack([(w.python_method("m", "b"), 2, FRAME_PYTHON)])
    t0 = w.start_ticks
    # batch 1: id 0 -> a; batch 2: id 0 -> b
    assert w.samples_from(SAMPLE.pack(t0 + 1, MAIN_TID, 0, KIND_CPU, 0, 0) * 3, [a]) == 3
    recs = SAMPLE.pack(t0 + 2, MAIN_TID, 0, KIND_CPU, 0, 0) * 2 + SAMPLE.pack(t0 + 3, WORKER_TID, 0, KIND_CPU, 0, 0)
    assert w.samples_from(recs, [b], skip_tids={WORKER_TID}) == 2
    cpu = asprof_collapsed(asprof.jfr.open(w.finish()), "cpu")
    assert cpu == {"m.a": 3, "m.b": 2}
