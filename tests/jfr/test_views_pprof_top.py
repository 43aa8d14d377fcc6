"""pprof (decoded with an independent protobuf reader written here) and the top table."""
from __future__ import annotations

import gzip
from typing import Any, Dict, List, Tuple

import asprof.jfr as J

import jfr_builder as B
from conftest import recording_bytes


def _varint(b: bytes, i: int) -> Tuple[int, int]:
    shift = v = 0
    while True:
        x = b[i]
        i += 1
        v |= (x & 0x7F) << shift
        if x < 0x80:
            return v, i
        shift += 7


def decode(b: bytes) -> Dict[int, List[Any]]:
    """A generic protobuf decoder: field number -> list of values (bytes for length-delimited)."""
    out: Dict[int, List[Any]] = {}
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        out.setdefault(field, []).append(v)
    return out


def packed(b: bytes) -> List[int]:
    vals, i = [], 0
    while i < len(b):
        v, i = _varint(b, i)
        vals.append(v)
    return vals


def read_pprof(data: bytes) -> Dict[str, Any]:
    p = decode(gzip.decompress(data))
    strings = [s.decode() for s in p[6]]
    funcs = {decode(f)[1][0]: strings[decode(f)[2][0]] for f in p.get(5, [])}
    locs = {}
    for raw in p.get(4, []):
        loc = decode(raw)
        line = decode(loc[4][0])
        locs[loc[1][0]] = funcs[line[1][0]]
    samples = []
    for raw in p.get(2, []):
        s = decode(raw)
        names = [locs[i] for i in packed(s[1][0])]
        labels = {strings[decode(lb)[1][0]]: strings[decode(lb)[2][0]] for lb in s.get(3, [])}
        samples.append((tuple(names), tuple(packed(s[2][0])), labels))
    types = [(strings[decode(t)[1][0]], strings[decode(t)[2][0]]) for t in p[1]]
    return {"types": types, "samples": samples, "time": p.get(9, [0])[0], "duration": p.get(10, [0])[0],
            "period": p.get(12, [0])[0], "default": strings[p[14][0]] if 14 in p else None}


def rec() -> J.Recording:
    s = B.Simple()
    s.thread(1, "main")
    s.thread(2, "bg")
    s.exec_sample(10, 1, ["main", "a", "b"])
    s.exec_sample(11, 1, ["main", "a", "b"])
    s.exec_sample(12, 2, ["main", "c"])
    s.malloc(13, 1, ["main", "alloc"], 0x10, 100)
    s.malloc(14, 1, ["main", "alloc"], 0x20, 28)
    return J.open(s.build(start_nanos=1_700_000_000_000_000_000, duration_nanos=5_000_000_000))


def test_cpu_pprof() -> None:
    prof = rec().samples("cpu")
    prof.interval_ns = 10_000_000
    p = read_pprof(J.to_pprof(prof))
    assert p["types"] == [("samples", "count"), ("cpu", "nanoseconds")]
    assert sorted(p["samples"]) == [(("b", "a", "main"), (2, 20_000_000), {}), (("c", "main"), (1, 10_000_000), {})]
    assert p["time"] == 1_700_000_000_000_000_000 and p["duration"] == 5_000_000_000
    assert p["period"] == 10_000_000 and p["default"] == "cpu"


def test_nativemem_pprof_and_thread_labels() -> None:
    p = read_pprof(J.to_pprof(rec().samples("nativemem", by_thread=True)))
    assert p["types"] == [("allocations", "count"), ("space", "bytes")]
    assert p["samples"] == [(("alloc", "main"), (2, 128), {"thread": "main tid=1"})]


def test_pprof_is_deterministic_gzip() -> None:
    prof = rec().samples("cpu")
    assert J.to_pprof(prof) == J.to_pprof(prof)
    assert J.to_pprof(prof)[:2] == b"\x1f\x8b"


def test_pprof_of_a_real_recording_sums_up() -> None:
    r = J.open(recording_bytes("cpu-wall-dwarf"))
    prof = r.samples("wall")
    p = read_pprof(J.to_pprof(prof))
    assert sum(v[0] for _n, v, _l in p["samples"]) == prof.total
    assert all(v[1] == v[0] * prof.interval_ns for _n, v, _l in p["samples"])


def test_top_self_and_total() -> None:
    prof = rec().samples("cpu")
    rows = J.top(prof, 10)
    by = {e.name: e for e in rows}
    assert by["b"].self == 2 and by["b"].total == 2
    assert by["main"].self == 0 and by["main"].total == 3 and by["main"].total_pct == 100.0
    assert rows[0].name == "b"
    assert [e.name for e in J.top(prof, 3, by="total")] == ["main", "b", "a"]  # ties: more self first
    text = J.format_top(prof, 5)
    assert "self%" in text and "b" in text and "3 events" in text


def test_top_counts_recursive_frames_once() -> None:
    s = B.Simple()
    s.thread(1, "t")
    s.exec_sample(1, 1, ["f", "f", "f"])
    prof = J.open(s.build()).samples("cpu")
    (e,) = J.top(prof)
    assert e.name == "f" and e.self == 1 and e.total == 1


def test_top_bytes_are_human_readable() -> None:
    text = J.format_top(rec().samples("nativemem"))
    assert "128 B" in text
