"""Hostile inputs through the reading verbs: each ends within 10 s, with a one-line error
naming what is wrong, in a child whose peak RSS stays under 512 MiB (issue #13).

The inputs (tests/hostile_inputs.py) are generated on the fly: bombs of 2 GiB inflated cost
~2 MB on disk. Each runs ``python -m asprof summary`` in a child; its peak RSS and CPU time are
the ``ru_maxrss`` and ``ru_utime + ru_stime`` that ``wait4`` returns for it. The 10 s bound is
on CPU time (the test machine may be loaded many times over); a child still running after
WALL_LIMIT seconds of wall-clock time (blocked, e.g. on a FIFO) is killed and the test fails.
Below them: the limits through the API and the command-line options.
"""
from __future__ import annotations

import gzip
import io
import os
import sys
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import hostile_inputs as H
import pytest

import asprof.jfr as J
from asprof.jfr import JfrError, ReadLimits

ROOT = Path(__file__).resolve().parents[2]
TIME_LIMIT = 10.0   # CPU seconds
WALL_LIMIT = 60.0   # a child still running then is killed
RSS_LIMIT_MIB = 512

#: What the one line must say for each hostile input (a fragment of the reason).
EXPECTED: Dict[str, str] = {
    "zip_bomb": "inflates more than 50 times its compressed size",
    "zip_bomb_small_declared": "Bad CRC-32",
    "zip_bomb_not_jfr": "zip entry async_profiler_dump_0.jfr is not a JFR file",
    "gzip_bomb_not_jfr": "the gzip content is not a JFR file",
    "zip_many_entries": "entries in a",
    "zip_overlapping": "the zip inflates more than 50 times",
    "zip_nested": "is itself a zip file",
    "zip_of_zips": "zip holds no .jfr file",
    "zip_control_chars": "uses compression method 14",
    "zip_bzip2": "uses compression method 12",
    "zip_truncated": "not a valid zip file",
    "zip_huge_eocd_count": "zip lists 4611686018427387904 entries",
    "gzip_bomb": "the gzip content inflates more than 50 times",
    "gzip_members": "the gzip content inflates more than 50 times",
    "directory_of_small_bombs": "the compressed inputs inflate more than 50 times their size together",
    "gzip_truncated": "truncated gzip file",
    "gzip_of_zip": "the gzip content is itself a zip file",
    "gzip_garbage": "not a valid gzip file",
    "fifo": "is a FIFO (named pipe)",
    "fifo_in_directory": "is a FIFO (named pipe)",
    "socket_file": "is a socket",
    "char_device": "is a character device",
    "symlink_loop": "symlink loop",
    "symlink_loop_pair": "symlink loop",
    "directory_of_loops": "symlink loop",
    "directory_many_files": "more than 10000 profiles",
    "jfr_truncated": "incomplete chunk",
    "jfr_huge_chunk_size": "header says 9223372036854775807 bytes",
    "jfr_huge_string_count": "metadata string count 1152921504606846976 exceeds",
    "jfr_huge_string_length": "string byte count 4611686018427387904 exceeds",
    "jfr_huge_utf16_length": "string char count 1099511627776 exceeds",
    "jfr_huge_pool_count": "constant pool count 1152921504606846976 exceeds",
    "not_a_profile": "not a JFR file",
    "jfr_empty_frames": "stack frames of a type without fields",
    "jfr_empty_frames_generic": "array of 6000 elements of a type that takes no bytes",
}


def run_cli(*argv: str, env: Optional[Dict[str, str]] = None) -> Tuple[int, str, float, float]:
    """``python -m asprof ARGV`` in a child: (exit status, stderr, CPU seconds, peak RSS in MiB),
    measured by H.run_measured (a launcher: the child's own peak, not pytest's). Killed (status
    -9) after WALL_LIMIT seconds."""
    code, err, _, cpu, rss = H.run_measured([sys.executable, "-m", "asprof", *argv], WALL_LIMIT,
                                            dict(os.environ, **(env or {})), str(ROOT))
    return code, err, cpu, rss


def test_the_measure_is_the_childs_own_peak() -> None:
    """A child allocating 200 MB measures more than 200 MB; a small one less than 100 MB,
    whatever the size of this (pytest) process."""
    big = H.run_measured([sys.executable, "-c", "b = bytearray(200 << 20)"])
    small = H.run_measured([sys.executable, "-c", "pass"])
    assert big[0] == 0 and big[4] > 200 and small[0] == 0 and small[4] < 100, (big, small)


def test_every_hostile_input_has_an_expectation() -> None:
    assert set(EXPECTED) == set(H.HOSTILE) - set(H.VALID)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hostile_input_is_refused_quickly_in_one_line_and_bounded_memory(name: str, tmp_path: Path) -> None:
    path = H.HOSTILE[name](tmp_path)
    code, err, seconds, rss = run_cli("summary", path)
    assert code == 1, f"{name}: exit {code} after {seconds:.1f} CPU s (killed at {WALL_LIMIT} s?) {err!r}"
    assert seconds < TIME_LIMIT, f"{name}: {seconds:.1f} CPU s"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("asprof: error: "), err
    assert EXPECTED[name] in lines[0], lines[0]
    assert rss < RSS_LIMIT_MIB, f"{name}: peak RSS {rss:.0f} MiB"


@pytest.mark.parametrize("name, verb", [("jfr_many_chunks", "summary"), ("jfr_fanout_refs", "summary"),
                                        ("jfr_deep_stack", "convert"), ("jfr_deep_json", "top")])
def test_valid_but_hostile_shapes_are_read_within_bounds(name: str, verb: str, tmp_path: Path) -> None:
    """5,000 small chunks (10 MB); a fan-out of references between pool entries (85 KB); one
    stack of 200,000 frames converted to folded stacks; Python-frame events with absurdly nested
    JSON and endless integers: read in time, in bounded memory."""
    path = H.HOSTILE[name](tmp_path)
    argv = ("convert", path, "-o", str(tmp_path / "out.collapsed")) if verb == "convert" else (verb, path)
    code, err, seconds, rss = run_cli(*argv)
    assert code == 0, f"{name}: exit {code} after {seconds:.1f} CPU s: {err}"
    assert seconds < TIME_LIMIT, f"{name}: {seconds:.1f} CPU s"
    assert rss < RSS_LIMIT_MIB, f"{name}: peak RSS {rss:.0f} MiB"
    if verb == "convert":
        assert (tmp_path / "out.collapsed").read_text().count(";") == 199_999


def test_pool_references_resolve_once_per_entry() -> None:
    rec = J.open(H.fanout_jfr(nthreads=50))
    threads = rec.threads
    assert len(threads) == 50 and {t.name for t in threads} == {f"t{i}" for i in range(1, 51)}


def test_a_bomb_through_convert_and_top(tmp_path: Path) -> None:
    bomb = H.zip_bomb(tmp_path)
    for argv in (("convert", bomb, "-o", str(tmp_path / "out.html")), ("top", bomb)):
        code, err, _, rss = run_cli(*argv)
        assert code == 1 and "inflates more than 50 times" in err and len(err.splitlines()) == 1, err
        assert rss < RSS_LIMIT_MIB
    assert not (tmp_path / "out.html").exists()


def test_size_cap_holds_when_the_ratio_is_raised(tmp_path: Path) -> None:
    code, err, _, rss = run_cli("summary", "--max-ratio", "100000", "--max-size", "64m", H.gzip_bomb(tmp_path))
    assert code == 1 and "inflates to more than 64 MiB" in err and "--max-size" in err, err
    assert rss < RSS_LIMIT_MIB


def test_traversal_names_are_read_in_memory_only(tmp_path: Path) -> None:
    """Entry names are never paths: nothing is written anywhere, the profile is read."""
    before = set(os.listdir("/tmp"))
    path = H.zip_traversal(tmp_path)
    code, err, _, _ = run_cli("summary", path)
    # both .jfr entries are read, in name order: the good one, then 8 bytes of junk (a warning)
    assert code == 0 and "8 trailing bytes after the last chunk ignored" in err, err
    assert "asprof-traversal.jfr" not in set(os.listdir("/tmp")) - before
    assert not Path("/etc/asprof-traversal.jfr").exists()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../../../tmp/asprof-traversal.jfr", H.good_jfr())
    rec = J.open(buf.getvalue())
    assert rec.counts["jdk.ExecutionSample"][0] == 1


# ---------------------------------------------------------------- limits through the API

def test_gzip_and_zip_inputs_read_like_the_plain_file(tmp_path: Path) -> None:
    data = H.good_jfr()
    (tmp_path / "a.jfr.gz").write_bytes(gzip.compress(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("async_profiler_dump_0.jfr", data)
        zf.writestr("metadata.json", b'{"start": 1, "end": 2}')
    (tmp_path / "b.zip").write_bytes(buf.getvalue())
    plain = J.open(data).counts
    assert J.open(tmp_path / "a.jfr.gz").counts == plain
    assert J.open(gzip.compress(data)).counts == plain
    z = J.open(tmp_path / "b.zip")
    assert z.counts == plain and z.report_metadata == {"start": 1, "end": 2}
    both = J.open(tmp_path)  # the directory: the gzip and the zip
    assert len(both.chunks) == 2


def test_size_cap_on_a_plain_file(tmp_path: Path) -> None:
    p = tmp_path / "a.jfr"
    p.write_bytes(H.good_jfr())
    with pytest.raises(JfrError, match="more than the read limit of 1000 bytes"):
        J.open(p, limits=ReadLimits(max_size=1000))
    assert J.open(p, limits=ReadLimits(max_size=len(H.good_jfr()))).chunks


def test_ratio_is_not_judged_below_the_floor() -> None:
    """A tiny, very regular input is fine: 1 MiB of padding after a JFR deflates ~1000x."""
    data = H.good_jfr()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.jfr", data)
    assert J.open(buf.getvalue(), limits=ReadLimits(max_ratio=1.0)).chunks
    g = gzip.compress(data + bytes(1 << 20))
    with pytest.raises(JfrError, match="inflates more than 1 times"):
        J.open(g, limits=ReadLimits(max_ratio=1.0, ratio_floor=4096))
    with pytest.raises(JfrError, match="trailing|not a JFR|incomplete|bad magic|chunk"):
        J.open(g)  # under the floor: inflated, then the padding is not JFR


def test_directory_file_cap_and_skipped_entries(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"p{i}.jfr").write_bytes(H.good_jfr())
    with pytest.raises(JfrError, match="more than 2 profiles"):
        J.open(tmp_path, limits=ReadLimits(max_files=2))
    os.symlink("loop.jfr", tmp_path / "loop.jfr")
    os.mkfifo(tmp_path / "pipe.jfr")
    (tmp_path / ".hidden.jfr").write_bytes(b"junk")  # hidden: not read
    rec = J.open(tmp_path)
    assert len(rec.chunks) == 3
    assert any("loop.jfr: symlink loop" in w for w in rec.warnings)
    assert any("pipe.jfr: is a FIFO" in w for w in rec.warnings)


def test_invalid_limits_are_refused() -> None:
    for bad in ({"max_size": 0}, {"max_ratio": 0}, {"max_files": 0}, {"ratio_floor": -1}):
        with pytest.raises(ValueError):
            ReadLimits(**bad)  # type: ignore[arg-type]


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Through the API too (opening a FIFO for reading would block until a writer comes)."""
    os.mkfifo(tmp_path / "p.jfr")
    with pytest.raises(JfrError, match="is a FIFO"):
        J.open(tmp_path / "p.jfr")


def test_a_directory_entry_named_like_a_profile_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "d.jfr").mkdir()
    (tmp_path / "ok.jfr").write_bytes(H.good_jfr())
    rec = J.open(tmp_path)
    assert len(rec.chunks) == 1 and any("d.jfr: is a directory" in w for w in rec.warnings)


# ---------------------------------------------------------------- command-line options

def test_cli_limit_options_and_environment(tmp_path: Path) -> None:
    p = tmp_path / "a.jfr"
    p.write_bytes(H.good_jfr())
    code, err, _, _ = run_cli("summary", "--max-size", "1k", str(p))
    assert code == 1 and "more than the read limit of 1 KiB" in err, err
    code, err, _, _ = run_cli("summary", str(p), env={"ASPROF_READ_MAX_SIZE": "1k"})
    assert code == 1 and "more than the read limit of 1 KiB" in err, err
    code, err, _, _ = run_cli("summary", "--max-size", "1m", str(p), env={"ASPROF_READ_MAX_SIZE": "1k"})
    assert code == 0, err  # the flag wins
    code, err, _, _ = run_cli("summary", str(p), env={"ASPROF_READ_MAX_SIZE": "lots"})
    assert code == 2 and "invalid ASPROF_READ_MAX_SIZE='lots'" in err and len(err.splitlines()) == 1, err
    for bad in (["--max-size", "0"], ["--max-ratio", "-1"], ["--max-files", "x"], ["--max-ratio", "nan"]):
        code, err, _, _ = run_cli("summary", *bad, str(p))
        assert code == 2 and len(err.splitlines()) == 1, (bad, err)


def test_directory_warnings_reach_stderr(tmp_path: Path) -> None:
    (tmp_path / "ok.jfr").write_bytes(H.good_jfr())
    os.symlink("loop.jfr", tmp_path / "loop.jfr")
    code, err, _, _ = run_cli("summary", str(tmp_path))
    assert code == 0 and "loop.jfr: symlink loop" in err, err


def test_a_file_name_with_control_characters_stays_one_line(tmp_path: Path) -> None:
    p = tmp_path / "evil\n\x1b[2Jname.jfr"
    p.write_bytes(b"junk")
    with pytest.raises(JfrError) as ei:
        J.open(p)
    assert "\n" not in str(ei.value) and "\x1b" not in str(ei.value) and "evil\\n\\x1b[2Jname.jfr" in str(ei.value)


def test_a_zip_needing_an_unknown_version_is_a_jfr_error() -> None:
    """zipfile raises NotImplementedError for it (found by tests/fuzz)."""
    import struct

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("async_profiler_dump_0.jfr", H.good_jfr())
    d = bytearray(buf.getvalue())
    struct.pack_into("<H", d, d.find(b"PK\x01\x02") + 6, 255)  # version needed to extract: 25.5
    with pytest.raises(JfrError, match="not a valid zip file"):
        J.open(bytes(d))


def test_leb128_integers_are_bounded() -> None:
    """The Python-frame events' integers: 64 bits at most; a long run of continuation bytes is
    malformed at once (unbounded, its decoding took time quadratic in its length)."""
    from asprof.jfrio.decode import ChunkError, uleb128

    assert uleb128(b"\xff" * 9 + b"\x01", 0) == ((1 << 64) - 1, 10)
    with pytest.raises(ChunkError, match="longer than 10 bytes"):
        uleb128(b"\xff" * 1_000_000 + b"\x00", 0)


def test_a_fifo_swapped_in_after_the_check_is_refused_without_blocking(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The race: the path passed the stat check, then became a FIFO. The O_NONBLOCK open returns
    at once and fstat on the descriptor refuses it (a plain open would block for a writer)."""
    import signal

    from asprof.jfr import inputs

    fifo = tmp_path / "p.jfr"
    os.mkfifo(fifo)
    monkeypatch.setattr(inputs, "check_path", lambda path: os.stat(__file__))  # "a regular file"

    def blocked(*_: object) -> None:
        raise AssertionError("opening the FIFO blocked")

    old = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(5)
    try:
        with pytest.raises(JfrError, match="is a FIFO"):
            inputs.load_path(str(fifo))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_stack_frames_with_fields_of_other_types() -> None:
    """A metadata declaring StackFrame.lineNumber a string (decoded by the generic path): the
    frame's line is 0, not a TypeError (found by tests/fuzz)."""
    import jfr_builder as B

    classes = [c for c in B.standard_classes() if c.id not in (B.T_STACK_FRAME, B.T_STACK_TRACE)]
    classes.append(B.Class(B.T_STACK_FRAME, "jdk.types.StackFrame", [
        B.Field("method", B.T_METHOD, cp=True), B.Field("lineNumber", B.T_STRING),
        B.Field("bytecodeIndex", B.T_LONG), B.Field("type", B.T_FRAME_TYPE, cp=True)]))
    classes.append(B.Class(B.T_STACK_TRACE, "jdk.types.StackTrace", [
        B.Field("truncated", B.T_BOOLEAN), B.Field("frames", B.T_STACK_FRAME, array=True),
        B.Field("tags", B.T_INT, array=True)]))  # an extra array: the generic decoder
    frame = B.varint(1) + B.utf8("line 7") + B.varint(1 << 63) + B.varint(3)
    pools = [
        (B.T_FRAME_TYPE, [(k, B.utf8(v)) for k, v in B.FRAME_TYPES]),
        (B.T_THREAD, [(1, B.thread_entry("main", 1))]),
        (B.T_STACK_TRACE, [(1, b"\x00" + B.varint(1) + frame + B.varint(0))]),
        (B.T_METHOD, [(1, B.method_entry(1, 2))]),
        (B.T_CLASS, [(1, B.class_entry(1))]),
        (B.T_SYMBOL, [(1, B.utf8("libapp.so")), (2, B.utf8("work"))]),
    ]
    ev = B.event(B.T_EXEC, B.varint(1001) + B.varint(1) + B.varint(1) + B.varint(0))
    rec = J.open(B.chunk([ev], classes, pools=pools))
    st = next(iter(rec.events(["jdk.ExecutionSample"]))).stack_trace
    assert st is not None and [(f.name, f.line) for f in st.frames] == [("work", 0)]
    assert J.to_collapsed(rec.samples("cpu")) == "work 1\n"
