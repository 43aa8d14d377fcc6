"""Rotation without stopping (async-profiler's ``dump``), through the native core against
the stand-in library in its chunked mode (STUB_CHUNKS): which bytes are handed over, that
nothing is lost or handed over twice when a dump fails or the file is not JFR chunks, and
the settings chunk that opens every report (on async-profiler's own recordings)."""
from __future__ import annotations

import logging
import os
import re
import struct
from pathlib import Path
from typing import Iterator, List

import pytest

import asprof
from asprof import _native
from asprof.engines.asyncprofiler import load_library
from asprof.engines.settings_chunk import KEEP, ChunkError, chunks, largest_pool, settings_chunk, with_settings

from conftest import engine_recordings, recording_bytes

OPTIONS = asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.1, python_frames=False)


@pytest.fixture
def chunked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("STUB_FAIL_START", "STUB_FAIL_STOP", "STUB_FAIL_DUMP", "STUB_LOG_WARN", "STUB_VERSION",
                "ASPROF_LIB", "STUB_COMMANDS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("STUB_CHUNKS", "1")
    yield


def texts(data: bytes) -> List[str]:
    """The stand-in's text of each chunk (headers checked and stripped)."""
    out = []
    for off, size, cpool in chunks(data):
        body = data[off + 68:off + size]
        assert body.endswith(b"POOL\n") and cpool == size - 5
        out.append(body[:-5].decode())
    return out


def session(stub_lib: Path) -> "_native.Session":
    lib, _ = load_library(str(stub_lib))
    return _native.Session(lib, OPTIONS.start_command(), "warn")


def test_dump_hands_over_each_finished_chunk_once(stub_lib: Path, chunked: None) -> None:
    s = session(stub_lib)
    assert s.start()[0] is None
    first, err, _ = s.dump()
    assert err is None and texts(first) == [f"STUBJFR start=1 pid={os.getpid()}\nDUMP 1\n"]
    second, err, _ = s.dump()
    assert err is None and texts(second) == ["DUMP 2\n"]
    assert s.active_size() == 68  # only the chunk in progress is left to hand over
    # a full rotation hands over what no dump did, and starts the other file afresh
    first_file = s.active_fd
    rest, err, _ = s.full_rotation()
    assert err is None and texts(rest) == ["END start=1\n"]
    assert s.active_fd != first_file and os.fstat(first_file).st_size == 0  # read, then emptied
    third, err, _ = s.dump()
    assert err is None and texts(third) == [f"STUBJFR start=2 pid={os.getpid()}\nDUMP 3\n"]
    assert s.stop()[0] is None
    assert texts(s.read_active()) == ["END start=2\n"]
    assert s.close()[0] is False


def test_a_failed_dump_hands_over_nothing_and_loses_nothing(stub_lib: Path, chunked: None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    s = session(stub_lib)
    s.start()
    monkeypatch.setenv("STUB_FAIL_DUMP", "1")
    data, err, _ = s.dump()
    assert data == b"" and err == "Stub: dump failed on demand"
    monkeypatch.delenv("STUB_FAIL_DUMP")
    data, err, _ = s.dump()
    assert err is None and texts(data) == [f"STUBJFR start=1 pid={os.getpid()}\nDUMP 2\n"]
    s.stop()
    s.close()


def test_a_file_that_is_not_jfr_chunks_is_refused_and_kept_whole(stub_lib: Path, chunked: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STUB_CHUNKS")
    s = session(stub_lib)
    s.start()
    monkeypatch.setenv("STUB_CHUNKS", "1")  # dump works, but the file holds plain text
    data, err, _ = s.dump()
    assert data == b"" and err == "the recording file is not made of JFR chunks"
    s.stop()
    assert s.read_active().startswith(b"STUBJFR start=1")  # everything is still there
    s.close()


def test_dump_when_not_running_is_an_error(stub_lib: Path, chunked: None) -> None:
    s = session(stub_lib)
    assert s.dump()[1] == "the profiler is not running"
    s.close()


def test_engine_falls_back_to_full_rotations_when_dump_cannot_be_used(
        stub_lib: Path, chunked: None, caplog: pytest.LogCaptureFixture) -> None:
    # The stand-in's chunks have no JFR metadata: no settings chunk can be made from them,
    # so the engine rotates by stopping and restarting, and every byte still arrives once.
    caplog.set_level(logging.DEBUG, logger="asprof")
    got = engine_recordings(stub_lib, OPTIONS, 2)
    pid = os.getpid()
    assert [texts(g or b"") for g in got] == [
        [f"STUBJFR start=1 pid={pid}\nDUMP 1\n", "END start=1\n"],
        [f"STUBJFR start=2 pid={pid}\nEND start=2\n"],
        [f"STUBJFR start=3 pid={pid}\nEND start=3\n"],
    ]
    assert any("rotating by stopping and restarting" in r.getMessage() for r in caplog.records)


# -- the settings chunk, on async-profiler's own recordings ------------------------------

# cpu-wall-dwarf, nativemem, user-events: one chunk each, settings and samples (tests/data/README.md);
# multi-chunk: an agent's report, whose first chunk is itself a settings chunk.
@pytest.mark.parametrize("name", ["cpu-wall-dwarf", "nativemem", "user-events", "multi-chunk"])
def test_settings_chunk_keeps_the_settings_and_no_sample(name: str) -> None:
    import asprof.jfr

    data = recording_bytes(name)
    off, size, _ = next(chunks(data))
    first = data[off:off + size]
    settings = settings_chunk(first)
    rec = asprof.jfr.open(settings)
    kept = {t for t, (n, _) in rec.counts.items() if n}
    assert "jdk.ActiveSetting" in kept
    assert kept <= KEEP | {"jdk.Metadata", "jdk.CheckPoint"}, kept
    original = asprof.jfr.open(first)
    assert [(s.name, s.value) for s in rec.settings] == [(s.name, s.value) for s in original.settings]
    # a report: the settings chunk dated like the data, then the data
    report = with_settings(settings, first)
    both = asprof.jfr.open(report)
    assert both.chunks[0].start_nanos == both.chunks[1].start_nanos and both.chunks[0].duration_nanos == 0
    for kind in ("cpu", "wall", "nativemem"):
        if original.counts.get({"cpu": "jdk.ExecutionSample", "wall": "profiler.WallClockSample",
                                "nativemem": "profiler.Malloc"}[kind], (0, 0))[0]:
            a, b = original.samples(kind), both.samples(kind)
            assert a.total == b.total and a.interval_ns == b.interval_ns


def test_settings_chunk_takes_the_clock_of_the_data() -> None:
    """The recording's first chunk measures the tick rate over a moment; a later chunk, over
    seconds. The JDK converts a chunk's ticks with the rate of the chunk before it when their
    metadata is the same, so the settings chunk must carry the data's rate (and start)."""
    import asprof.jfr

    import jfr_builder as B

    data = recording_bytes("cpu-wall-dwarf")
    off, size, _ = next(chunks(data))
    settings = settings_chunk(data[off:off + size])
    s = B.Simple()
    s.thread(1, "main")
    s.exec_sample(5000, 1, ["main", "work"])
    later = s.build(start_nanos=2 * 10**18, start_ticks=123_456, ticks_per_second=2_100_000_017)
    rec = asprof.jfr.open(with_settings(settings, later))
    first, second = rec.chunks
    assert asprof.jfr.open(settings).chunks[0].ticks_per_second != 2_100_000_017
    assert (first.start_nanos, first.start_ticks, first.ticks_per_second) == (2 * 10**18, 123_456, 2_100_000_017)
    assert (second.start_nanos, second.start_ticks, second.ticks_per_second) == (2 * 10**18, 123_456, 2_100_000_017)


def test_settings_chunk_is_read_by_the_jdk(tmp_path: Path) -> None:
    from conftest import JFR_TOOL

    if JFR_TOOL is None:
        pytest.skip("the JDK's jfr tool is not installed")
    import subprocess

    data = recording_bytes("cpu-wall-dwarf")
    off, size, _ = next(chunks(data))
    path = tmp_path / "report.jfr"
    path.write_bytes(with_settings(settings_chunk(data[off:off + size]), data[off:off + size]))
    out = subprocess.run([str(JFR_TOOL), "summary", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"jdk\.ActiveSetting\s+[1-9]", out.stdout)


@pytest.mark.parametrize("bad", [b"", b"FLR\0", b"FLR\0" + b"\0" * 64, b"garbage" * 20])
def test_malformed_chunks_give_a_clear_error(bad: bytes) -> None:
    with pytest.raises(ChunkError):
        settings_chunk(bad)
    assert largest_pool(bad) == 0


def test_truncated_and_corrupted_chunks_never_crash_or_hang() -> None:
    data = recording_bytes("cpu-wall-dwarf")
    off, size, _ = next(chunks(data))
    first = bytearray(data[off:off + size])
    for cut in (69, 100, 1000, len(first) // 2, len(first) - 1):
        with pytest.raises(ChunkError):
            settings_chunk(bytes(first[:cut]))
    meta = struct.unpack_from(">q", first, 24)[0]
    for pos in range(meta, min(meta + 400, len(first)), 7):  # inside the metadata
        bad = bytearray(first)
        bad[pos] ^= 0xFF
        try:
            settings_chunk(bytes(bad))
        except ChunkError:
            pass
