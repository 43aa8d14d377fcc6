"""Malformed input gives one clear JfrError (naming file, offset, problem) -- never a crash or hang."""
from __future__ import annotations

import struct
import time
import zipfile
from pathlib import Path

import pytest

import asprof.jfr as J
from asprof.jfr import JfrError

import jfr_builder as B


def good() -> bytes:
    s = B.Simple()
    s.thread(1, "main")
    s.exec_sample(10, 1, ["main", "a", "b"])
    s.wall_sample(11, 1, ["main", "c"], samples=2)
    s.malloc(12, 1, ["main", "m"], 0x10, 64)
    s.free(13, 1, 0x10)
    return s.build()


def read_all(data: bytes) -> None:
    rec = J.open(data)
    for kind in ("cpu", "wall", "nativemem", "leaks"):
        J.to_collapsed(rec.samples(kind, by_thread=True))
    for ev in rec.events():
        ev.values


def test_error_is_a_value_error_with_path_offset_and_reason(tmp_path: Path) -> None:
    p = tmp_path / "bad.jfr"
    p.write_bytes(b"NOPE" + good()[4:])
    with pytest.raises(JfrError) as ei:
        J.open(p)
    err = ei.value
    assert isinstance(err, ValueError)
    assert err.path == str(p) and err.offset == 0 and "not a JFR file" in err.reason
    assert str(err) == f"{p}: offset 0: not a JFR file (bad magic, expected 'FLR\\0')"
    assert "\n" not in str(err)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"FLR\x00\x00\x02", "truncated chunk header"),
    (b"PK\x03\x04garbage", "not a valid zip"),
])
def test_tiny_inputs(data: bytes, reason: str) -> None:
    with pytest.raises(JfrError, match=reason):
        J.open(data)


def _patch_header(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    d = bytearray(data)
    struct.pack_into(fmt, d, offset, value)
    return bytes(d)


@pytest.mark.parametrize("offset, fmt, value, reason", [
    (4, ">H", 1, "unsupported JFR version 1"),
    (8, ">q", 1 << 62, "incomplete chunk"),            # absurd chunk size
    (8, ">q", 10, "incomplete chunk"),                 # smaller than a header
    (16, ">q", 0, "not finished"),                     # constant pool offset 0: still recording
    (24, ">q", 0, "not finished"),
    (24, ">q", 1 << 40, "metadata offset .* outside the chunk"),
    (16, ">q", 1 << 40, "constant pool offset .* outside the chunk"),
    (56, ">q", 0, "ticks per second"),
    (64, ">I", 0, "uncompressed"),
])
def test_bad_headers(offset: int, fmt: str, value: int, reason: str) -> None:
    with pytest.raises(JfrError, match=reason):
        J.open(_patch_header(good(), offset, fmt, value))


def test_every_truncation_is_an_error() -> None:
    data = good()
    for n in range(1, len(data)):
        with pytest.raises(JfrError):
            read_all(data[:n])


def test_every_single_byte_corruption_is_read_or_rejected_quickly() -> None:
    data = good()
    t0 = time.monotonic()
    outcomes = {"ok": 0, "error": 0}
    for i in range(len(data)):
        for v in (0x00, 0x7F, 0x80, 0xFF, data[i] ^ 0x01):
            d = bytearray(data)
            d[i] = v
            try:
                read_all(bytes(d))
                outcomes["ok"] += 1
            except JfrError as e:
                assert "\n" not in str(e)
                outcomes["error"] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0
    assert time.monotonic() - t0 < 60


def test_absurd_counts_do_not_allocate() -> None:
    # an event whose array claims 2**60 elements, in a few bytes
    classes = B.standard_classes() + [B.Class(300, "test.Arr", [B.Field("startTime", B.T_LONG),
                                                               B.Field("xs", B.T_LONG, array=True)],
                                              super_type="jdk.jfr.Event")]
    data = B.chunk([B.event(300, B.varint(1) + B.varint(1 << 60))], classes=classes)
    rec = J.open(data)
    with pytest.raises(JfrError, match="array element count 1152921504606846976 exceeds"):
        list(rec.events(["test.Arr"]))
    # a constant pool claiming 2**40 entries
    data = B.chunk([], pools=[(B.T_SYMBOL, [])])
    d = bytearray(data)
    cp = struct.unpack_from(">q", d, 16)[0]
    tail = B.varint(B.T_SYMBOL) + B.varint(1 << 40)
    body = B.varint(0) + B.varint(0) + B.varint(0) + b"\x01" + B.varint(1) + tail
    ev = B.event(1, body, pad=True)
    d = d[:cp] + ev
    struct.pack_into(">q", d, 8, len(d))
    with pytest.raises(JfrError, match="constant pool entry count .* exceeds"):
        J.open(bytes(d))


def test_event_size_past_the_chunk() -> None:
    s = B.Simple()
    s.thread(1, "t")
    s.events.append(B.padded(1 << 30) + B.varint(101))
    with pytest.raises(JfrError, match="event size 1073741824 is invalid or exceeds the chunk"):
        J.open(s.build())
    s.events[-1] = b"\x00\x65"  # size 0
    with pytest.raises(JfrError, match="event size 0"):
        J.open(s.build())


def test_cyclic_inline_struct_is_bounded() -> None:
    classes = B.standard_classes() + [
        B.Class(300, "test.Node", [B.Field("next", 300)]),
        B.Class(301, "test.Ev", [B.Field("startTime", B.T_LONG), B.Field("node", 300)], super_type="jdk.jfr.Event"),
    ]
    data = B.chunk([B.event(301, B.varint(1) + b"\x00")], classes=classes)
    rec = J.open(data)
    with pytest.raises(JfrError, match="nested deeper than 32 .cyclic type"):
        list(rec.events(["test.Ev"]))
    # the same cyclic struct as a sample event field: decoding the samples rejects it, bounded
    classes2 = B.standard_classes()
    execs = next(c for c in classes2 if c.name == "jdk.ExecutionSample")
    execs.fields.append(B.Field("node", 300))
    classes2.append(B.Class(300, "test.Node", [B.Field("next", 300)]))
    rec2 = J.open(B.chunk([B.event(101, B.varint(1) + B.varint(1) + B.varint(0) + B.varint(0) + b"\x00")],
                          classes=classes2))
    with pytest.raises(JfrError, match="<bytes>: offset .*nested deeper"):
        rec2.samples("cpu")


def test_cyclic_constant_pool_references_resolve_to_none() -> None:
    classes = B.standard_classes() + [
        B.Class(300, "test.Loop", [B.Field("self", 300, cp=True), B.Field("name", B.T_STRING)]),
        B.Class(301, "test.Ev", [B.Field("startTime", B.T_LONG), B.Field("loop", 300, cp=True)],
                super_type="jdk.jfr.Event"),
    ]
    pools = [(300, [(1, B.varint(2) + B.utf8("one")), (2, B.varint(1) + B.utf8("two"))])]
    data = B.chunk([B.event(301, B.varint(1) + B.varint(1))], classes=classes, pools=pools)
    ev = next(J.open(data).events(["test.Ev"]))
    v = ev.values["loop"]
    assert v["name"] == "one" and v["self"]["name"] == "two" and v["self"]["self"] is None


def test_deep_metadata_nesting_is_rejected() -> None:
    with pytest.raises(JfrError, match="metadata elements nested deeper"):
        J.open(B.chunk([], meta_nest=40))
    J.open(B.chunk([], meta_nest=20))


def test_undeclared_types() -> None:
    classes = [c for c in B.standard_classes() if c.name != "jdk.types.FrameType"]
    with pytest.raises(JfrError, match="refers to undeclared class 24"):
        J.open(B.chunk([], classes=classes))
    with pytest.raises(JfrError, match="constant pool of undeclared type 999"):
        J.open(B.chunk([], pools=[(999, [])]))


def test_incomplete_last_chunk_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    data = good()
    rec = J.open(data + data[: len(data) // 2])
    assert len(rec.chunks) == 1
    assert rec.warnings and "chunk 2" in rec.warnings[0] and "incomplete" in rec.warnings[0]


def test_trailing_garbage_after_a_chunk() -> None:
    with pytest.raises(JfrError, match="not a JFR file"):
        J.open(good() + b"x" * 100)
    rec = J.open(good() + b"\x00" * 10)  # shorter than a header: ignored with a warning
    assert rec.warnings


def test_zip_without_jfr(tmp_path: Path) -> None:
    z = tmp_path / "x.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("metadata.json", "{}")
    with pytest.raises(JfrError, match="zip holds no .jfr file"):
        J.open(z)


def test_missing_paths_and_empty_directories(tmp_path: Path) -> None:
    with pytest.raises(JfrError, match="no such file"):
        J.open(tmp_path / "nope.jfr")
    with pytest.raises(JfrError, match="directory holds no readable .jfr, .zip or .gz"):
        J.open(tmp_path)


def test_invalid_string_encoding_names_the_offset() -> None:
    classes = B.standard_classes() + [B.Class(300, "test.S", [B.Field("startTime", B.T_LONG),
                                                             B.Field("s", B.T_STRING)], super_type="jdk.jfr.Event")]
    data = B.chunk([B.event(300, B.varint(1) + b"\x09")], classes=classes)
    with pytest.raises(JfrError, match=r"<bytes>: offset \d+: invalid string encoding 9"):
        list(J.open(data).events())
