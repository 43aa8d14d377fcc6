"""A minimal JFR chunk walker for the benchmarks: event counts and chunk times.

It reads only what the benchmarks need — each chunk's header (start time and
duration) and the number of events of each type, named from the chunk's
metadata — so that the benchmarks do not depend on the full reader in
``asprof.jfr``. Malformed input raises ``ValueError``.

    python benchmarks/sample_count.py FILE.jfr ...   # prints the counts
"""
from __future__ import annotations

import struct
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["Chunk", "read_chunks", "count_events", "SAMPLE_TYPES"]

SAMPLE_TYPES = ("jdk.ExecutionSample", "profiler.WallClockSample")

_HEADER = struct.Struct(">4sHHqqqqqqqi")  # 68 bytes
_MAGIC = b"FLR\x00"


@dataclass
class Chunk:
    start_ns: int  # wall-clock time of the chunk's start, ns since the epoch
    duration_ns: int
    counts: "Counter[str]" = field(default_factory=Counter)  # event type name -> number of events
    # time (ns since the epoch) of the first and last event of each SAMPLE_TYPES type
    first_ns: Dict[str, int] = field(default_factory=dict)
    last_ns: Dict[str, int] = field(default_factory=dict)
    # events of each SAMPLE_TYPES type whose time falls in the window given to read_chunks
    in_window: "Counter[str]" = field(default_factory=Counter)
    # every event time of each SAMPLE_TYPES type, when read_chunks was asked to keep them
    times: Dict[str, List[int]] = field(default_factory=dict)

    @property
    def end_ns(self) -> int:
        return self.start_ns + self.duration_ns


class _Reader:
    __slots__ = ("buf", "pos", "compressed")

    def __init__(self, buf: bytes, pos: int, compressed: bool) -> None:
        self.buf = buf
        self.pos = pos
        self.compressed = compressed

    def varint(self) -> int:
        if not self.compressed:
            v: int = struct.unpack_from(">i", self.buf, self.pos)[0]
            self.pos += 4
            return v
        result = 0
        shift = 0
        buf = self.buf
        for _ in range(9):
            if self.pos >= len(buf):
                raise ValueError("truncated varint")
            b = buf[self.pos]
            self.pos += 1
            if shift == 56:  # the 9th byte holds 8 bits
                return result | (b << 56)
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7
        return result

    def string(self) -> str:
        enc = self.buf[self.pos]
        self.pos += 1
        if enc in (0, 1):
            return ""
        if enc == 2:  # constant pool reference: not used in metadata
            self.varint()
            return ""
        n = self.varint()
        if enc == 3:
            s = self.buf[self.pos:self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return s
        if enc == 4:
            return "".join(chr(self.varint()) for _ in range(n))
        if enc == 5:
            s = self.buf[self.pos:self.pos + n].decode("latin-1")
            self.pos += n
            return s
        raise ValueError(f"unknown string encoding {enc}")


def _metadata_classes(r: _Reader) -> Dict[int, str]:
    """Parses a metadata event body (after size and type id) into {type id: name}."""
    r.varint()  # start time
    r.varint()  # duration
    r.varint()  # metadata id
    strings = [r.string() for _ in range(r.varint())]
    classes: Dict[int, str] = {}

    def element() -> None:
        name = strings[r.varint()]
        attrs = {}
        for _ in range(r.varint()):
            k = strings[r.varint()]
            attrs[k] = strings[r.varint()]
        if name == "class" and "id" in attrs and "name" in attrs:
            classes[int(attrs["id"])] = attrs["name"]
        for _ in range(r.varint()):
            element()

    element()
    return classes


def read_chunks(data: bytes, window: Optional[Tuple[int, int]] = None,
                keep_times: bool = False) -> List[Chunk]:
    """Every chunk of a JFR recording, with its event counts by type name.

    ``window``: (from, to) in ns since the epoch: also count the samples
    taken in that interval. ``keep_times``: keep the time of every sample.
    """
    chunks: List[Chunk] = []
    off = 0
    while off < len(data):
        if len(data) - off < _HEADER.size:
            raise ValueError(f"truncated chunk header at {off}")
        header: Tuple[bytes, int, int, int, int, int, int, int, int, int, int] = _HEADER.unpack_from(data, off)
        (magic, major, _minor, size, _cp, meta, start_ns, duration_ns, start_ticks, tps, features) = header
        if magic != _MAGIC:
            raise ValueError(f"bad magic at {off}")
        if major not in (1, 2) or size < _HEADER.size or off + size > len(data):
            raise ValueError(f"bad chunk header at {off} (version {major}, size {size})")
        compressed = bool(features & 1) or major >= 2
        end = off + size
        # type names from the metadata event
        r = _Reader(data, off + meta, compressed)
        r.varint()  # size
        if r.varint() != 0:
            raise ValueError(f"no metadata event at {off + meta}")
        names = _metadata_classes(r)
        timed = {tid for tid, n in names.items() if n in SAMPLE_TYPES}
        first: Dict[int, int] = {}
        last: Dict[int, int] = {}
        raw_times: Dict[int, List[int]] = {tid: [] for tid in timed}
        factor = 1e9 / tps if tps > 0 else 0.0

        def to_ns(ticks: int, start_ns: int = start_ns, start_ticks: int = start_ticks, factor: float = factor) -> int:
            return start_ns + int((ticks - start_ticks) * factor)

        # the window in ticks of this chunk, to compare without converting every sample
        lo: Optional[float] = None
        hi = 0.0
        if window is not None and factor > 0:
            lo = start_ticks + (window[0] - start_ns) / factor
            hi = start_ticks + (window[1] - start_ns) / factor
        in_window: "Counter[int]" = Counter()
        # walk the events
        counts: "Counter[int]" = Counter()
        pos = off + _HEADER.size
        while pos < end:
            r.pos = pos
            esize = r.varint()
            if esize <= 0 or pos + esize > end:
                raise ValueError(f"bad event size {esize} at {pos}")
            tid = r.varint()
            counts[tid] += 1
            if tid in timed:  # the first field of async-profiler's samples: start time, in ticks
                t = r.varint()
                if tid not in first or t < first[tid]:
                    first[tid] = t
                if tid not in last or t > last[tid]:
                    last[tid] = t
                if lo is not None and lo <= t <= hi:
                    in_window[tid] += 1
                if keep_times:
                    raw_times[tid].append(t)
            pos += esize
        named: "Counter[str]" = Counter()
        for tid, n in counts.items():
            if tid == 0:
                named["jdk.Metadata"] += n
            elif tid == 1:
                named["jdk.CheckPoint"] += n
            else:
                named[names.get(tid, f"type#{tid}")] += n
        chunks.append(Chunk(start_ns, duration_ns, named,
                            {names[t]: to_ns(v) for t, v in first.items()},
                            {names[t]: to_ns(v) for t, v in last.items()},
                            Counter({names[t]: n for t, n in in_window.items()}),
                            {names[t]: sorted(to_ns(v) for v in vs) for t, vs in raw_times.items()}
                            if keep_times else {}))
        off = end
    return chunks


def count_events(data: bytes, window: Optional[Tuple[int, int]] = None) -> Tuple["Counter[str]", List[Chunk]]:
    chunks = read_chunks(data, window)
    total: "Counter[str]" = Counter()
    for c in chunks:
        total.update(c.counts)
    return total, chunks


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            total, chunks = count_events(f.read())
        print(f"{path}: {len(chunks)} chunk(s)")
        for name, n in total.most_common():
            print(f"  {name:40s} {n}")
