"""pprof output: a gzipped ``perftools.profiles.Profile`` protobuf.

Read by ``go tool pprof``, Grafana Pyroscope and other pprof tooling. The
protobuf wire format is written by hand (profile.proto is small and stable),
so no protobuf dependency is needed.

Sample values: ``[samples/count, cpu|wall/nanoseconds]`` for cpu and wall
(time = samples x sampling interval, when the recording names it),
``[allocations/count, space/bytes]`` for nativemem and leaks, Go's ``[alloc_objects/count,
alloc_space/bytes]`` for alloc and ``[inuse_objects/count, inuse_space/bytes]`` for live
(Python allocations, issue #16; objects are estimates). With per-thread
profiles the thread becomes a ``thread`` label instead of a root frame.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from asprof.jfr.profile import THREAD, Profile

__all__ = ["to_pprof", "encode_profile"]


def _varint(out: bytearray, v: int) -> None:
    v &= (1 << 64) - 1
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _key(out: bytearray, field: int, wire: int) -> None:
    _varint(out, (field << 3) | wire)


def _int_field(out: bytearray, field: int, v: int) -> None:
    if v:
        _key(out, field, 0)
        _varint(out, v)


def _bytes_field(out: bytearray, field: int, data: bytes) -> None:
    _key(out, field, 2)
    _varint(out, len(data))
    out += data


def _packed(out: bytearray, field: int, values: List[int]) -> None:
    if not values:
        return
    body = bytearray()
    for v in values:
        _varint(body, v)
    _bytes_field(out, field, bytes(body))


class _Strings:
    def __init__(self) -> None:
        self.index: Dict[str, int] = {"": 0}
        self.table: List[str] = [""]

    def __call__(self, s: str) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.table)
            self.table.append(s)
        return i


def _value_type(strings: _Strings, vtype: str, unit: str) -> bytes:
    b = bytearray()
    _int_field(b, 1, strings(vtype))
    _int_field(b, 2, strings(unit))
    return bytes(b)


def encode_profile(profile: Profile) -> bytes:
    """The uncompressed protobuf bytes of ``profile``."""
    strings = _Strings()
    out = bytearray()
    kind = profile.kind
    interval = profile.interval_ns
    if kind in ("nativemem", "leaks"):
        types = [("allocations", "count"), ("space", "bytes")]
    elif kind in ("alloc", "live"):  # issue #16: Go's names, so that pprof picks the right defaults
        pre = "alloc" if kind == "alloc" else "inuse"
        types = [(f"{pre}_objects", "count"), (f"{pre}_space", "bytes")]
    else:
        types = [("samples", "count"), (kind, "nanoseconds")]
    for vt, unit in types:
        _bytes_field(out, 1, _value_type(strings, vt, unit))

    loc_of: Dict[int, int] = {}       # frame id -> location id
    func_of: Dict[str, int] = {}      # name -> function id
    # issue #15: a profile built with_labels carries each sample's request labels
    rows = ([(st, pairs, wc) for (st, pairs), wc in profile.labelled.items()] if profile.labelled
            else [(st, (), wc) for st, wc in profile.stacks.items()])
    for stack, pairs, (weight, count) in rows:
        labels: List[Tuple[str, str]] = list(pairs)
        frames = list(stack)
        if frames and profile.frames[frames[0]][1] == THREAD:
            labels.append(("thread", profile.frames[frames[0]][0].strip("[]")))
            frames = frames[1:]
        locs = []
        for fid in reversed(frames):  # leaf first
            lid = loc_of.get(fid)
            if lid is None:
                lid = loc_of[fid] = len(loc_of) + 1
            locs.append(lid)
        if kind in ("nativemem", "leaks", "alloc", "live"):
            values = [count, weight] if profile.unit == "bytes" else [weight, weight]
        else:
            values = [weight, weight * interval if interval else 0]
        s = bytearray()
        _packed(s, 1, locs)
        _packed(s, 2, values)
        for k, v in labels:
            lb = bytearray()
            _int_field(lb, 1, strings(k))
            _int_field(lb, 2, strings(v))
            _bytes_field(s, 3, bytes(lb))
        _bytes_field(out, 2, bytes(s))

    m = bytearray()
    _int_field(m, 1, 1)
    _int_field(m, 5, strings("async-profiler"))
    _int_field(m, 7, 1)  # has_functions
    _bytes_field(out, 3, bytes(m))

    for fid, lid in loc_of.items():
        name = profile.frames[fid][0]
        fn = func_of.get(name)
        if fn is None:
            fn = func_of[name] = len(func_of) + 1
        loc = bytearray()
        _int_field(loc, 1, lid)
        _int_field(loc, 2, 1)
        line = bytearray()
        _int_field(line, 1, fn)
        _bytes_field(loc, 4, bytes(line))
        _bytes_field(out, 4, bytes(loc))
    for name, fn in func_of.items():
        f = bytearray()
        _int_field(f, 1, fn)
        _int_field(f, 2, strings(name))
        _int_field(f, 3, strings(name))
        _bytes_field(out, 5, bytes(f))

    if kind in ("cpu", "wall") and interval:
        period_type = _value_type(strings, kind, "nanoseconds")
    else:
        period_type = b""
    comment = strings(f"asprof {kind} profile of {profile.source}")
    default_type = strings(types[1][0])
    for s_ in strings.table:
        _bytes_field(out, 6, s_.encode("utf-8"))
    _int_field(out, 9, profile.start_nanos)
    _int_field(out, 10, max(0, profile.end_nanos - profile.start_nanos))
    if period_type:
        _bytes_field(out, 11, period_type)
        _int_field(out, 12, interval or 0)
    _packed(out, 13, [comment])
    _int_field(out, 14, default_type)
    return bytes(out)


def to_pprof(profile: Profile) -> bytes:
    """The profile as gzipped pprof (``.pb.gz``) bytes."""
    import gzip

    return gzip.compress(encode_profile(profile), compresslevel=6, mtime=0)
