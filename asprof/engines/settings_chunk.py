"""The settings chunk that opens every report of a recording rotated with ``dump``.

async-profiler writes a recording's settings (``jdk.ActiveSetting``: intervals, events),
the OS, CPU and runtime facts and the native libraries only into the first chunk of a
recording; the chunks that ``dump`` opens later carry samples only. Tools need the settings
(``jfrconv --heatmap`` and OTLP conversion read the sampling interval from them, as do
asprof's own views), so each report after the first is prefixed with a copy of the first
chunk stripped down to those events: the *settings chunk*.

Small and self-contained on purpose: the agent uses it at every full start, so it does not
import the JFR reader. The events kept are chosen by class name, read from the chunk's own
metadata.
"""
from __future__ import annotations

import struct
from typing import Dict, FrozenSet, Iterator, List, Optional, Tuple

from asprof.jfrio import decode
from asprof.jfrio.decode import HEADER_SIZE as HEADER
from asprof.jfrio.decode import ChunkError
from asprof.jfrio.decode import jfr_string as _string
from asprof.jfrio.decode import varint as _varint

__all__ = ["settings_chunk", "with_settings", "chunks", "largest_pool", "ChunkError", "KEEP"]

# Facts about the recording, not samples: what a report needs to be read on its own.
KEEP = frozenset({
    "jdk.ActiveRecording",
    "jdk.ActiveSetting",
    "jdk.OSInformation",
    "jdk.CPUInformation",
    "jdk.JVMInformation",
    "jdk.InitialSystemProperty",
    "jdk.NativeLibrary",
})


def chunks(data: bytes) -> Iterator[Tuple[int, int, int]]:
    """(offset, size, constant pool offset) of each chunk of ``data``."""
    for off, h in decode.chunks(data):
        yield off, h.size, h.cpool_offset


def _class_ids(b: bytes, meta: int, names: FrozenSet[str]) -> Dict[int, str]:
    """Type id -> name of the metadata's classes called one of ``names``."""
    i = meta
    _, i = _varint(b, i)          # event size
    etype, i = _varint(b, i)
    if etype != 0:
        raise ChunkError("the metadata offset does not point at the metadata event")
    for _ in range(3):            # start, duration, metadata id
        _, i = _varint(b, i)
    count, i = _varint(b, i)
    strings: List[Optional[str]] = []
    for _ in range(count):
        s, i = _string(b, i)
        strings.append(s)
    found: Dict[int, str] = {}
    # Elements: name, attributes (key, value string indexes), children. Iterative walk.
    pending = 1
    while pending:
        pending -= 1
        name_idx, i = _varint(b, i)
        nattr, i = _varint(b, i)
        attrs: Dict[str, Optional[str]] = {}
        for _ in range(nattr):
            k, i = _varint(b, i)
            v, i = _varint(b, i)
            if k < len(strings) and v < len(strings):
                attrs[strings[k] or ""] = strings[v]
        nchildren, i = _varint(b, i)
        pending += nchildren
        if name_idx < len(strings) and strings[name_idx] == "class" and attrs.get("name") in names:
            try:
                found[int(attrs.get("id") or "")] = str(attrs["name"])
            except ValueError:
                pass
    return found


def settings_chunk(first: bytes) -> bytes:
    """The first chunk of a recording with only its metadata, constant pool and the
    events in :data:`KEEP`. Raises :class:`ChunkError` on anything else than a
    complete chunk."""
    if not first:
        raise ChunkError("no chunk")
    h = decode.read_header(first)
    size, cpool, meta = h.size, h.cpool_offset, h.meta_offset
    b = first[:size]
    if not HEADER <= meta < size:
        raise ChunkError("metadata offset outside the chunk")
    try:
        keep = set(_class_ids(b, meta, KEEP)) | {0, 1}  # metadata and constant pools
        out = bytearray(b[:HEADER])
        new_meta = new_cpool = 0
        i = HEADER
        while i < size:
            esize, j = _varint(b, i)
            etype, _ = _varint(b, j)
            if esize <= 0 or i + esize > size:
                raise ChunkError(f"bad event size at byte {i}")
            if etype in keep:
                if i == meta:
                    new_meta = len(out)
                if i == cpool:
                    new_cpool = len(out)
                out += b[i:i + esize]
            i += esize
    except IndexError:
        raise ChunkError("truncated event") from None
    if not new_meta or not new_cpool:
        raise ChunkError("metadata or constant pool not found among the events")
    # One constant pool, the last (its delta to the next is 0): offsets just move.
    struct.pack_into(">qqq", out, 8, len(out), new_cpool, new_meta)
    return bytes(out)


def with_settings(settings: bytes, data: bytes) -> bytes:
    """``settings`` (a settings chunk) dated like the first chunk of ``data``, then ``data``.

    Its clock too (ticks per second): the JDK's reader keeps the first chunk's tick
    conversion for the next chunks when their metadata is the same, so a settings chunk
    with the recording's first (less precise) tick rate would shift every timestamp of
    the data as the JDK reads it (by ~0.1 ms per second of report)."""
    if not data:
        return b""
    if len(data) < HEADER or len(settings) < HEADER:
        return settings + data
    out = bytearray(settings)
    try:
        h = decode.read_header(data)
    except ChunkError:
        return settings + data
    struct.pack_into(">qqqq", out, 32, h.start_nanos, 0, h.start_ticks, h.ticks_per_second)
    return bytes(out) + data


def largest_pool(data: bytes) -> int:
    """Size of the largest constant pool among the chunks of ``data`` (0 if unreadable).

    async-profiler repeats every stack trace it has seen since the recording started in
    each chunk's pool; a growing pool is the sign that a full rotation is due."""
    try:
        return max((size - cpool for _, size, cpool in chunks(data)), default=0)
    except ChunkError:
        return 0
