"""The reader's model on crafted and real inputs: chunks, pools, events, inputs (.zip, dirs)."""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest

import asprof.jfr as J
from asprof.jfr import FrameType

import jfr_builder as B
from conftest import recording_bytes, unpack_recording


def simple() -> bytes:
    s = B.Simple()
    s.thread(7, "main")
    s.thread(8, "worker")
    s.exec_sample(1000, 7, ["main", "work", "leaf"])
    s.exec_sample(1001, 8, ["main", "other"])
    s.wall_sample(1002, 7, ["main", "sleep"], samples=5)
    s.malloc(1003, 7, ["main", "alloc"], 0x1000, 100)
    s.malloc(1004, 7, ["main", "alloc2"], 0x2000, 50)
    s.free(1005, 7, 0x1000)
    return s.build()


def test_counts_threads_and_stacks_of_a_crafted_chunk() -> None:
    rec = J.open(simple())
    assert len(rec.chunks) == 1
    counts = {k: n for k, (n, _b) in rec.counts.items()}
    assert counts == {"jdk.Metadata": 1, "jdk.CheckPoint": 1, "jdk.ExecutionSample": 2,
                      "profiler.WallClockSample": 1, "profiler.Malloc": 2, "profiler.Free": 1}
    assert sorted(t.name for t in rec.threads) == ["main", "worker"]
    ev = next(rec.events(["jdk.ExecutionSample"]))
    assert ev.thread is not None and ev.thread.name == "main" and ev.thread.label == "[main tid=7]"
    st = ev.stack_trace
    assert st is not None
    assert [f.name for f in st.frames] == ["leaf", "work", "main"]  # leaf first
    assert all(f.type == FrameType.NATIVE and f.owner == "libapp.so" for f in st.frames)
    assert ev["state"] == "STATE_DEFAULT"


def test_timestamps_in_ticks_and_wall_time() -> None:
    rec = J.open(B.Simple().build(start_nanos=10**18, start_ticks=500, ticks_per_second=2_000_000_000))
    c = rec.chunks[0]
    assert c.ticks_to_nanos(500) == 10**18
    assert c.ticks_to_nanos(2_500) == 10**18 + 1000
    assert c.nanos_to_ticks(10**18 + 1000) == 2_500
    s = B.Simple()
    s.thread(1, "t")
    s.exec_sample(3_000_000_500, 1, ["a"])
    ev = next(J.open(s.build(start_ticks=500, ticks_per_second=10**9, start_nanos=10**18)).events())
    assert ev.ticks == 3_000_000_500 and ev.time_ns == 10**18 + 3 * 10**9


def test_profiles_of_each_kind() -> None:
    rec = J.open(simple())
    assert J.to_collapsed(rec.samples("cpu")) == "main;other 1\nmain;work;leaf 1\n"
    assert J.to_collapsed(rec.samples("wall")) == "main;sleep 5\n"
    assert J.to_collapsed(rec.samples("nativemem")) == "main;alloc 100\nmain;alloc2 50\n"
    assert J.to_collapsed(rec.samples("nativemem", count=True)) == "main;alloc 1\nmain;alloc2 1\n"
    assert J.to_collapsed(rec.samples("leaks", tail=0)) == "main;alloc2 50\n"
    assert J.to_collapsed(rec.samples("cpu", by_thread=True)) == \
        "[main tid=7];main;work;leaf 1\n[worker tid=8];main;other 1\n"
    assert rec.samples("auto").kind == "cpu"


def test_filters_threads_time_include_exclude() -> None:
    rec = J.open(simple())
    assert J.to_collapsed(rec.samples("cpu", threads=["worker"])) == "main;other 1\n"
    assert J.to_collapsed(rec.samples("cpu", threads=[7])) == "main;work;leaf 1\n"
    assert J.to_collapsed(rec.samples("cpu", threads="w.*")) == "main;other 1\n"
    s = B.Simple()
    s.thread(1, "t")
    s.exec_sample(1000, 1, ["early"])
    s.exec_sample(1000 + 2 * 10**9, 1, ["late"])
    timed = J.open(s.build(duration_nanos=3 * 10**9))
    from datetime import datetime, timedelta, timezone
    assert J.to_collapsed(timed.samples("cpu", start=1.0)) == "late 1\n"
    assert J.to_collapsed(timed.samples("cpu", end=1)) == "early 1\n"
    assert J.to_collapsed(timed.samples("cpu", start=-1.5)) == "late 1\n"  # from the end
    assert J.to_collapsed(timed.samples("cpu", start=timedelta(seconds=3))) == ""
    t0 = datetime.fromtimestamp(timed.start_nanos / 1e9, tz=timezone.utc)
    assert J.to_collapsed(timed.samples("cpu", start=t0 + timedelta(seconds=1))) == "late 1\n"
    assert J.to_collapsed(rec.samples("cpu", include="work")) == "main;work;leaf 1\n"
    assert J.to_collapsed(rec.samples("cpu", include="wor")) == ""  # whole-name match, as jfrconv
    assert J.to_collapsed(rec.samples("cpu", exclude=".*ea.*")) == "main;other 1\n"
    assert J.to_collapsed(rec.samples("cpu", include="main", exclude="leaf")) == "main;other 1\n"
    with pytest.raises(ValueError, match="invalid regular expression"):
        rec.samples("cpu", include="(")
    with pytest.raises(ValueError, match="unknown profile kind"):
        rec.samples("bogus")  # ("alloc" is a kind since issue #16)


def test_stack_hook_can_replace_stacks() -> None:
    rec = J.open(simple())

    def hook(chunk, thread_key, ticks, frames):  # type: ignore[no-untyped-def]
        if thread_key == 8:
            return [J.Frame("py_leaf", "py_leaf", "app.py", FrameType.INTERPRETED),
                    J.Frame("py_main", "py_main", "app.py", FrameType.INTERPRETED)]
        return None

    out = J.to_collapsed(rec.samples("cpu", stack_hook=hook))
    assert out == "main;work;leaf 1\npy_main_[0];py_leaf_[0] 1\n"


def test_all_string_encodings_and_primitive_fields() -> None:
    classes = B.standard_classes() + [
        B.Class(300, "test.Everything", [
            B.Field("startTime", B.T_LONG), B.Field("b", B.T_BOOLEAN), B.Field("y", B.T_BYTE),
            B.Field("s", B.T_SHORT), B.Field("c", B.T_CHAR), B.Field("i", B.T_INT), B.Field("l", B.T_LONG),
            B.Field("f", B.T_FLOAT), B.Field("d", B.T_DOUBLE), B.Field("s0", B.T_STRING),
            B.Field("s1", B.T_STRING), B.Field("s2", B.T_STRING), B.Field("s3", B.T_STRING),
            B.Field("s4", B.T_STRING), B.Field("s5", B.T_STRING), B.Field("arr", B.T_INT, array=True),
            B.Field("st", 301), B.Field("cp", B.T_STRING, cp=True),
        ], super_type="jdk.jfr.Event"),
        B.Class(301, "test.Inline", [B.Field("x", B.T_INT), B.Field("name", B.T_STRING)]),
    ]
    import struct

    body = (B.varint(1000) + b"\x01" + b"\xfe" + B.varint(0xFFFF) + B.varint(ord("Z")) + B.varint(0xFFFFFFFF)
            + B.varint(2**63 + 5) + struct.pack(">f", 1.5) + struct.pack(">d", -2.25)
            + b"\x00" + b"\x01" + b"\x02" + B.varint(9) + B.utf8("h\u00e9llo \u2603") + B.chars("ch\u00e4rs\U0001F600")
            + B.latin1("l\u00e4tin") + B.varint(3) + B.varint(1) + B.varint(2) + B.varint(3)
            + B.varint(42) + B.utf8("inner") + B.varint(9))
    data = B.chunk([B.event(300, body)], classes=classes, pools=[(B.T_STRING, [(9, B.utf8("pooled"))])])
    ev = next(J.open(data).events(["test.Everything"]))
    v = ev.values
    assert v["b"] is True and v["y"] == -2 and v["s"] == -1 and v["c"] == "Z" and v["i"] == -1
    assert v["l"] == -(2**63) + 5 and v["f"] == 1.5 and v["d"] == -2.25
    assert v["s0"] is None and v["s1"] == "" and v["s2"] == "pooled"
    assert v["s3"] == "h\u00e9llo \u2603" and v["s4"] == "ch\u00e4rs\U0001F600" and v["s5"] == "l\u00e4tin"
    assert v["arr"] == [1, 2, 3] and v["st"] == {"x": 42, "name": "inner"} and v["cp"] == "pooled"


def test_unknown_event_types_are_skipped_by_their_size() -> None:
    classes = B.standard_classes() + [B.Class(400, "vendor.Custom", [B.Field("startTime", B.T_LONG),
                                                                    B.Field("blob", B.T_STRING)],
                                              super_type="jdk.jfr.Event")]
    s = B.Simple()
    s.thread(1, "t")
    s.exec_sample(10, 1, ["a"])
    evs = [B.event(400, B.varint(5) + B.utf8("x" * 300))] + s.events + [B.event(400, B.varint(6) + B.utf8("y"))]
    s.events = evs
    data = s.build()
    # rebuild with the extra class declared
    data = B.chunk(evs, classes=classes, pools=[(B.T_FRAME_TYPE, [(3, B.utf8("Native"))])])
    rec = J.open(data)
    assert rec.counts["vendor.Custom"][0] == 2
    assert [e["blob"] for e in rec.events(["vendor.Custom"])] == ["x" * 300, "y"]
    assert rec.samples("cpu").total == 1


def test_older_writer_with_fewer_fields_and_newer_with_more() -> None:
    # WallClockSample without timeSpan (async-profiler < 4.3) and with an extra trailing field
    for extra in (False, True):
        classes = B.standard_classes()
        wall = next(c for c in classes if c.name == "profiler.WallClockSample")
        wall.fields = [f for f in wall.fields if f.name != "timeSpan"]
        if extra:
            wall.fields.append(B.Field("future", B.T_STRING))
        body = B.varint(5) + B.varint(1) + B.varint(0) + B.varint(2) + B.varint(7)
        if extra:
            body += B.utf8("whatever")
        rec = J.open(B.chunk([B.event(B.T_WALL, body)], classes=classes))
        prof = rec.samples("wall")
        assert prof.total == 7 and prof.total_count == 1


def test_java_frames_like_the_jdk_writes_them() -> None:
    """Without a 'Kernel' frame type (a JDK recording), Native frames are Java native methods."""
    s = B.Simple()
    s.thread(1, "main")
    s.exec_sample(1, 1, [("run", "java/lang/Thread", 1), ("read0", "sun/nio/ch/IOUtil", 3)])
    data = s.build()
    rec = J.open(data)
    # async-profiler file (has Kernel type): native frames print the method only
    assert J.to_collapsed(rec.samples("cpu")) == "java/lang/Thread.run_[j];read0 1\n"
    frame_types_without_kernel = [(k, v) for k, v in B.FRAME_TYPES if v != "Kernel"]
    orig = B.FRAME_TYPES
    try:
        B.FRAME_TYPES = frame_types_without_kernel
        rec2 = J.open(s.build())
    finally:
        B.FRAME_TYPES = orig
    assert J.to_collapsed(rec2.samples("cpu")) == "java/lang/Thread.run_[j];sun/nio/ch/IOUtil.read0 1\n"


def test_java_frame_types_merge_and_take_the_majority_suffix() -> None:
    s = B.Simple()
    s.thread(1, "main")
    for _ in range(3):
        s.exec_sample(1, 1, [("a", "pkg/A", 2)])  # inlined
    s.exec_sample(1, 1, [("a", "pkg/A", 1)])  # JIT
    s.exec_sample(1, 1, [("b", "pkg/B", 0)])  # interpreted
    s.exec_sample(1, 1, [("k", "", 5)])  # kernel
    rec = J.open(s.build())
    assert J.to_collapsed(rec.samples("cpu")) == "k_[k] 1\npkg/A.a_[i] 4\npkg/B.b_[0] 1\n"


def test_bytes_zip_directory_and_list_inputs(tmp_path: Path) -> None:
    data = simple()
    p = tmp_path / "a.jfr"
    p.write_bytes(data)
    z = tmp_path / "profile_pg_unknown___1_2024-01-01T00-00-00Z.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("async_profiler_dump_0.jfr", data)
        zf.writestr("metadata.json", json.dumps({"start": 1, "end": 2, "reporting_interval": 30000}))
    rz = J.open(z)
    assert rz.report_metadata == {"start": 1, "end": 2, "reporting_interval": 30000}
    assert rz.samples("cpu").total == 2
    assert J.open(z.read_bytes()).samples("cpu").total == 2
    d = tmp_path / "dir"
    d.mkdir()
    (d / "1.jfr").write_bytes(data)
    (d / "2.zip").write_bytes(z.read_bytes())
    (d / "notes.txt").write_text("ignored")
    rd = J.open(d)
    assert len(rd.chunks) == 2 and rd.samples("cpu").total == 4
    assert len(J.open([p, p]).chunks) == 2
    assert len(J.open(str(p)).chunks) == 1


def test_directory_is_merged_in_time_order(tmp_path: Path) -> None:
    def at(start: int) -> bytes:
        s = B.Simple()
        s.thread(1, "t")
        s.exec_sample(1000, 1, [f"at{start}"])
        return s.build(start_nanos=start)

    (tmp_path / "b.jfr").write_bytes(at(10**18))          # earlier, though named later
    (tmp_path / "c.jfr").write_bytes(at(3 * 10**18))
    (tmp_path / "a.jfr").write_bytes(at(2 * 10**18))
    rec = J.open(tmp_path)
    assert [c.start_nanos for c in rec.chunks] == [10**18, 2 * 10**18, 3 * 10**18]
    assert rec.start_nanos == 10**18


def test_real_two_chunk_recording_with_leaks_across_chunks(tmp_path: Path) -> None:
    rec = J.open(unpack_recording("two-chunks", tmp_path))
    assert len(rec.chunks) == 2
    assert all(c.columns.mem_time for c in rec.chunks)  # malloc/free in both chunks
    leaks = rec.samples("leaks")
    assert leaks.total > 0 and leaks.total < rec.samples("nativemem").total
    settings = {s.name: s.value for s in rec.settings}
    assert settings["version"] == "4.5" and settings["engine"]


def test_user_events_and_logs() -> None:
    rec = J.open(recording_bytes("user-events"))
    evs = list(rec.events(["profiler.UserEvent"]))
    markers = [e["data"] for e in evs if e["type"] == "fixture.Marker"]
    # the recording's main thread sent "marker 0", "marker 1", ... every 50 ms for 1.5 s
    assert markers == [f"marker {i}" for i in range(len(markers))] and len(markers) >= 16
    assert all(e.time_ns and rec.start_nanos <= e.time_ns <= rec.end_nanos + 10**9 for e in evs)
    logs = list(rec.events(["profiler.Log"]))
    assert logs and all(isinstance(e["message"], str) and e["level"] in ("DEBUG", "INFO", "WARN") for e in logs)
    libs = [e["name"] for e in rec.events(["jdk.NativeLibrary"])]
    assert any("libpython" in n for n in libs)
    loads = [e["machineTotal"] for e in rec.events(["jdk.CPULoad"])]
    assert loads and all(0.0 <= x <= 1.0 for x in loads)


def test_recording_overview() -> None:
    rec = J.open(recording_bytes("cpu-wall-dwarf"))
    assert rec.duration_nanos > 10**9  # recorded for 1.6 s
    assert rec.setting("engine") == "perf_events"
    assert rec.setting("interval", 101) is not None
    prof = rec.samples("cpu")
    assert prof.interval_ns and prof.total == rec.counts["jdk.ExecutionSample"][0]
    wall = rec.samples("wall")
    assert wall.total >= wall.total_count == rec.counts["profiler.WallClockSample"][0]


def test_progress_is_reported(tmp_path: Path) -> None:
    seen = []
    J.open(simple(), progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1]


def test_open_accepts_path_like_and_io_free(tmp_path: Path) -> None:
    p = tmp_path / "x.jfr"
    p.write_bytes(simple())
    with J.open(os.fspath(p)) as rec:
        assert "x.jfr" in repr(rec)
    assert isinstance(io.BytesIO(simple()).getvalue(), bytes)


def test_two_threaded_fill_equals_one_thread() -> None:
    from asprof.jfr import _parser

    data = recording_bytes("nativemem")
    results = []
    try:
        for threshold in (1 << 40, 0):  # never / always two threads
            _parser.set_parallel_min_bytes(threshold)
            rec = J.open(data)
            cols = rec.chunks[0].columns
            assert _parser.last_fill_threads() == (1 if threshold else 2)
            results.append([list(a) for a in (cols.time, cols.thread, cols.stack, cols.state, cols.value, cols.kind,
                                              cols.mem_time, cols.mem_address, cols.mem_row)])
    finally:
        _parser.set_parallel_min_bytes(4 << 20)
    assert results[0] == results[1]
    assert len(results[0][6]) == J.open(data).counts["profiler.Malloc"][0] + J.open(data).counts["profiler.Free"][0]
