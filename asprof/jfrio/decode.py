"""Decoding JFR bytes in pure Python: chunk headers, varints, strings.

The one place these are written for Python code; the offline reader's hot loops are the
Cython module :mod:`asprof.jfr._parser`. Two integer encodings meet here:

- :func:`varint`: JFR's compressed integers (LEB128 with at most 9 bytes, the 9th carrying
  8 bits), used in every event and in the metadata;
- :func:`uleb128`: plain unbounded LEB128, the encoding of the payloads of asprof's own
  ``asprof.Py*`` user events (csrc/pyframes writes 64-bit values with up to 10 bytes).

They agree below 2**56 and differ above it, so each decoder is used for its own format.
Every malformed input raises :class:`ChunkError` (a ``ValueError``).
"""
from __future__ import annotations

import struct
from typing import Iterator, NamedTuple, Optional, Tuple

from asprof.errors import AsprofError

__all__ = ["ChunkError", "ChunkHeader", "HEADER_SIZE", "MAGIC", "chunks", "read_header", "varint",
           "jfr_string", "uleb128", "leb_string"]

MAGIC = b"FLR\0"
HEADER_SIZE = 68
_HEADER = struct.Struct(">4sHHqqqqqqqI")


class ChunkError(AsprofError, ValueError):
    """The bytes are not the complete JFR chunks async-profiler writes."""


class ChunkHeader(NamedTuple):
    """The fixed 68-byte header of a JFR chunk (offsets are from the chunk's start)."""

    major: int
    minor: int
    size: int
    cpool_offset: int
    meta_offset: int
    start_nanos: int
    duration_nanos: int
    start_ticks: int
    ticks_per_second: int
    features: int


def read_header(data: bytes, offset: int = 0) -> ChunkHeader:
    """The header of the chunk at ``offset``; raises :class:`ChunkError` when there is no
    complete chunk there (bad magic, a size or an offset outside the bytes)."""
    if len(data) - offset < HEADER_SIZE or data[offset:offset + 4] != MAGIC:
        raise ChunkError(f"no chunk header at byte {offset}")
    h = ChunkHeader(*_HEADER.unpack_from(data, offset)[1:])
    if h.size < HEADER_SIZE or h.size > len(data) - offset or not HEADER_SIZE <= h.cpool_offset < h.size:
        raise ChunkError(f"incomplete chunk at byte {offset}")
    return h


def chunks(data: bytes) -> Iterator[Tuple[int, ChunkHeader]]:
    """(offset, header) of each chunk of ``data``, in order."""
    off = 0
    while off < len(data):
        h = read_header(data, off)
        yield off, h
        off += h.size


def varint(b: bytes, i: int) -> Tuple[int, int]:
    """A JFR compressed integer at ``i``: (value, next index)."""
    v = shift = 0
    for _ in range(9):
        if i >= len(b):
            raise ChunkError("truncated integer")
        c = b[i]
        i += 1
        if shift == 56:
            return v | (c << 56), i
        v |= (c & 0x7F) << shift
        if not c & 0x80:
            return v, i
        shift += 7
    return v, i  # pragma: no cover - the loop returns at shift 56


def jfr_string(b: bytes, i: int) -> Tuple[Optional[str], int]:
    """A JFR string at ``i`` (encodings 0 null, 1 empty, 3 UTF-8, 4 UTF-16 chars, 5 Latin-1);
    a constant-pool reference (2) is not expected where this is used."""
    if i >= len(b):
        raise ChunkError("truncated string")
    enc = b[i]
    i += 1
    if enc == 0:
        return None, i
    if enc == 1:
        return "", i
    if enc in (3, 5):
        n, i = varint(b, i)
        if i + n > len(b):
            raise ChunkError("truncated string")
        return b[i:i + n].decode("utf-8" if enc == 3 else "latin-1", "replace"), i + n
    if enc == 4:
        n, i = varint(b, i)
        chars = []
        for _ in range(n):
            c, i = varint(b, i)
            chars.append(chr(c) if c < 0x110000 else "\ufffd")
        return "".join(chars), i
    raise ChunkError(f"string encoding {enc}")


#: The longest LEB128 integer read: 10 bytes hold 64 bits (csrc/pyframes writes at most that).
ULEB128_MAX_BYTES = 10


def uleb128(b: bytes, i: int) -> Tuple[int, int]:
    """A plain LEB128 unsigned integer of at most 64 bits at ``i``: (value, next index).
    Longer runs are malformed (unbounded, they cost time quadratic in their length)."""
    v = shift = 0
    for _ in range(ULEB128_MAX_BYTES):
        if i >= len(b):
            raise ChunkError("truncated integer")
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        if not c & 0x80:
            return v, i
        shift += 7
    raise ChunkError(f"integer longer than {ULEB128_MAX_BYTES} bytes")


def leb_string(b: bytes, i: int) -> Tuple[str, int]:
    """A string as csrc/pyframes writes it: LEB128 byte length, then UTF-8."""
    n, i = uleb128(b, i)
    if i + n > len(b):
        raise ChunkError("truncated string")
    return b[i:i + n].decode("utf-8", "replace"), i + n
