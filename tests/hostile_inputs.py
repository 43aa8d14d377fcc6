"""Hostile inputs for the offline reader, generated on the fly (small on disk).

Each builder writes one input under a directory and returns its path; :data:`HOSTILE` names
them all. Used by tests/jfr/test_hostile_inputs.py (every one through the CLI, in a child
process whose time and peak RSS are measured) and by tests/fuzz (the containers).

Bombs are built from raw deflate segments: a megabyte of zeros deflated once and ended with a
full flush is a byte-aligned run of blocks that can be repeated, so a 2 GiB entry costs
~2 MB on disk and no time to make.
"""
from __future__ import annotations

import gzip
import io
import os
import socket
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import jfr_builder as B

MiB = 1 << 20
GiB = 1 << 30


def good_jfr() -> bytes:
    s = B.Simple()
    s.thread(1, "main")
    s.exec_sample(10, 1, ["main", "a", "b"])
    s.wall_sample(11, 1, ["main", "c"], samples=2)
    return s.build()


def deflate_zeros(total: int, head: bytes = b"") -> Tuple[bytes, int]:
    """Raw deflate of ``head`` followed by zeros up to ``total`` bytes (a multiple of 1 MiB):
    (stream, crc32; the crc is 0 above 64 MiB, where the reader must stop long before it)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head + bytes(MiB - len(head))) + c.flush(zlib.Z_FULL_FLUSH)
    c2 = zlib.compressobj(9, zlib.DEFLATED, -15)
    seg = c2.compress(bytes(MiB)) + c2.flush(zlib.Z_FULL_FLUSH)
    n = total // MiB
    out = first + seg * (n - 1) + c2.flush(zlib.Z_FINISH)
    crc = zlib.crc32(head + bytes(total - len(head))) if total <= 64 * MiB else 0
    return out, crc


def raw_zip(entries: List[Tuple[str, int, bytes, int, int]], comment: bytes = b"",
            count_override: Optional[int] = None) -> bytes:
    """A zip from (name, method, stored bytes, crc32, declared uncompressed size) entries,
    written by hand so sizes and counts may lie."""
    out = io.BytesIO()
    central = io.BytesIO()
    for name, method, data, crc, usize in entries:
        nb = name.encode("utf-8")
        off = out.tell()
        out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0x800, method, 0, 0x21, crc,
                              len(data), usize & 0xFFFFFFFF, len(nb), 0))
        out.write(nb)
        out.write(data)
        central.write(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0x800, method, 0, 0x21, crc,
                                  len(data), usize & 0xFFFFFFFF, len(nb), 0, 0, 0, 0, 0, off))
        central.write(nb)
    cd = central.getvalue()
    cd_off = out.tell()
    out.write(cd)
    n = len(entries) if count_override is None else count_override
    out.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n & 0xFFFF, n & 0xFFFF, len(cd), cd_off, len(comment)))
    out.write(comment)
    return out.getvalue()


def _write(d: Path, name: str, data: bytes) -> str:
    p = d / name
    p.write_bytes(data)
    return str(p)


# ---------------------------------------------------------------- the inputs

def zip_bomb(d: Path) -> str:
    """2 MB on disk, one entry inflating to 2 GiB (the issue's bomb.zip)."""
    data, crc = deflate_zeros(2 * GiB - MiB, good_jfr()[:68])
    return _write(d, "bomb.zip", raw_zip([("async_profiler_dump_0.jfr", 8, data, crc, 2 * GiB - MiB)]))


def zip_bomb_small_declared(d: Path) -> str:
    """The same bomb declaring 1 KiB uncompressed and 1 KiB compressed (sizes that lie)."""
    data, crc = deflate_zeros(1 * GiB, good_jfr()[:68])
    z = bytearray(raw_zip([("x.jfr", 8, data, crc, 1024)]))
    return _write(d, "liar.zip", bytes(z))


def zip_bomb_not_jfr(d: Path) -> str:
    """2 GiB of zeros (no JFR header): stopped at the first bytes."""
    data, crc = deflate_zeros(2 * GiB)
    return _write(d, "zeros.zip", raw_zip([("async_profiler_dump_0.jfr", 8, data, crc, 2 * GiB)]))


def gzip_bomb_not_jfr(d: Path) -> str:
    data, _ = deflate_zeros(2 * GiB)
    return _write(d, "zeros.jfr.gz", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + data + struct.pack("<II", 0, 0))


def zip_many_entries(d: Path) -> str:
    """A central directory listing 100,000 entries (zipfile would build an object for each)."""
    one = ("a.jfr", 0, b"", 0, 0)
    return _write(d, "many.zip", raw_zip([one] * 100_000))


def zip_overlapping(d: Path) -> str:
    """2,000 central-directory entries sharing one 15 MiB kernel (a non-recursive bomb: each
    entry stays under the ratio floor, the zip as a whole does not)."""
    data, crc = deflate_zeros(15 * MiB, good_jfr()[:68])
    z = raw_zip([("k.jfr", 8, data, crc, 15 * MiB)])
    # rebuild with 2000 central entries all pointing at offset 0
    cd_entry_start = z.index(b"PK\x01\x02")
    eocd = z.index(b"PK\x05\x06")
    entry = z[cd_entry_start:eocd]
    body = z[:cd_entry_start]
    names = []
    for _ in range(2000):
        nb = b"k.jfr"
        e = bytearray(entry[:46])
        struct.pack_into("<H", e, 28, len(nb))
        names.append(bytes(e) + nb)
    cd = b"".join(names)
    eocd_rec = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 2000, 2000, len(cd), len(body), 0)
    return _write(d, "overlap.zip", body + cd + eocd_rec)


def zip_nested(d: Path) -> str:
    """A zip whose .jfr entry is itself a zip bomb (nested containers)."""
    inner = open(zip_bomb(d), "rb").read()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("async_profiler_dump_0.jfr", inner)
    return _write(d, "nested.zip", buf.getvalue())


def zip_of_zips(d: Path) -> str:
    """42.zip-style: zips of zips, no .jfr at the top."""
    inner = open(zip_bomb(d), "rb").read()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(4):
            zf.writestr(f"lib{i}.zip", inner)
    return _write(d, "42.zip", buf.getvalue())


def zip_traversal(d: Path) -> str:
    """Entries named ../../x.jfr, /etc/x.jfr and with control characters: read in memory only."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("../../../../tmp/asprof-traversal.jfr", good_jfr())
        zf.writestr("/etc/asprof-traversal.jfr", b"FLR\x00junk")
        zf.writestr("metadata.json", b"{}")
    return _write(d, "traversal.zip", buf.getvalue())


def zip_control_chars(d: Path) -> str:
    """An entry name with a newline and an escape sequence (the error must stay one line)."""
    data = b"not a jfr"
    return _write(d, "ctl.zip", raw_zip([("evil\n\x1b[2Jname.jfr", 14, data, zlib.crc32(data), len(data))]))


def zip_bzip2(d: Path) -> str:
    """An entry compressed with bzip2 (zipfile inflates those without an output bound)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_BZIP2) as zf:
        zf.writestr("async_profiler_dump_0.jfr", bytes(8 * MiB))
    return _write(d, "bz.zip", buf.getvalue())


def zip_truncated(d: Path) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("async_profiler_dump_0.jfr", good_jfr() * 3)
    z = buf.getvalue()
    return _write(d, "cut.zip", z[: len(z) // 2])


def zip_huge_eocd_count(d: Path) -> str:
    """A zip64 end record claiming 2**62 entries."""
    z = raw_zip([("a.jfr", 0, b"", 0, 0)], count_override=0xFFFF)
    eocd = z.index(b"PK\x05\x06")
    z64 = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 1 << 62, 1 << 62, 1 << 40, 0)
    loc = struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd, 1)
    return _write(d, "z64.zip", z[:eocd] + z64 + loc + z[eocd:])


def gzip_bomb(d: Path) -> str:
    """A gzip of 2 GiB of zeros after a JFR header (~2 MB on disk)."""
    data, _ = deflate_zeros(2 * GiB, good_jfr()[:68])
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return _write(d, "bomb.jfr.gz", head + data + struct.pack("<II", 0, 0))


def gzip_members(d: Path) -> str:
    """Thousands of concatenated gzip members of 1 MiB of zeros each."""
    first = gzip.compress(good_jfr()[:68] + bytes(MiB), 9)
    one = gzip.compress(bytes(MiB), 9)
    return _write(d, "members.jfr.gz", first + one * 3000)


def directory_of_small_bombs(d: Path) -> str:
    """300 .jfr.gz files of 15 KB, each inflating to 15 MiB (under the ratio floor on its own):
    4.4 GiB together, 4.6 MB on disk."""
    sub = d / "bombs"
    sub.mkdir()
    data, crc = deflate_zeros(15 * MiB, good_jfr()[:68])
    one = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + data + struct.pack("<II", crc, 15 * MiB)
    for i in range(300):
        (sub / f"p{i:03d}.jfr.gz").write_bytes(one)
    return str(sub)


def gzip_truncated(d: Path) -> str:
    g = gzip.compress(good_jfr() * 50)
    return _write(d, "cut.jfr.gz", g[: len(g) // 2])


def gzip_of_zip(d: Path) -> str:
    return _write(d, "zip.gz", gzip.compress(open(zip_bomb(d), "rb").read(), 1))


def gzip_garbage(d: Path) -> str:
    return _write(d, "garbage.gz", b"\x1f\x8b\x08\x00" + os.urandom(2000))


def fifo(d: Path) -> str:
    p = d / "pipe.jfr"
    os.mkfifo(p)
    return str(p)


def fifo_in_directory(d: Path) -> str:
    sub = d / "dirfifo"
    sub.mkdir()
    os.mkfifo(sub / "pipe.jfr")
    return str(sub)


def socket_file(d: Path) -> str:
    p = d / "sock.jfr"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(p))
    s.close()  # the socket file stays
    return str(p)


def char_device(d: Path) -> str:
    return "/dev/zero"


def symlink_loop(d: Path) -> str:
    p = d / "loop.jfr"
    os.symlink(p.name, p)
    return str(p)


def symlink_loop_pair(d: Path) -> str:
    a, b = d / "a.jfr", d / "b.jfr"
    os.symlink(b.name, a)
    os.symlink(a.name, b)
    return str(a)


def directory_of_loops(d: Path) -> str:
    sub = d / "loops"
    sub.mkdir()
    os.symlink("x.jfr", sub / "x.jfr")
    os.symlink(".", sub / "self.zip")
    return str(sub)


def directory_many_files(d: Path) -> str:
    """More profiles than a directory walk reads (default cap 10,000)."""
    sub = d / "many"
    sub.mkdir()
    for i in range(10_001):
        (sub / f"p{i:05d}.jfr").touch()
    return str(sub)


def jfr_truncated(d: Path) -> str:
    return _write(d, "cut.jfr", good_jfr()[:200])


def _patched(offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(good_jfr())
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def jfr_huge_chunk_size(d: Path) -> str:
    return _write(d, "size.jfr", _patched(8, ">q", (1 << 63) - 1))


def _varint(v: int) -> bytes:
    out = bytearray()
    for _ in range(8):
        if v < 0x80:
            out.append(v)
            return bytes(out)
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v & 0xFF)
    return bytes(out)


def _event(content: bytes) -> bytes:
    """An event: its size (a varint counting itself) and ``content`` (type, fields)."""
    for width in range(1, 10):
        size = _varint(width + len(content))
        if len(size) == width:
            return size + content
    raise AssertionError("unreachable")


def _jfr_with_metadata_body(body: bytes) -> bytes:
    """A one-chunk JFR whose metadata event is ``body`` (start, duration, id, strings, ...)."""
    meta = _event(_varint(0) + body)
    cp = _event(_varint(1) + _varint(0) * 3 + b"\x00" + _varint(0))
    size = 68 + len(meta) + len(cp)
    head = struct.pack(">4sHHqqqqqqqI", b"FLR\x00", 2, 0, size, 68 + len(meta), 68, 10**18, 10**9, 0, 10**9, 1)
    return head + meta + cp


def jfr_huge_string_count(d: Path) -> str:
    """A metadata event claiming 2**60 strings."""
    body = _varint(0) + _varint(0) + _varint(0) + _varint(1 << 60) + b"\x03\x01a" * 8
    return _write(d, "strings.jfr", _jfr_with_metadata_body(body))


def jfr_huge_string_length(d: Path) -> str:
    """A metadata string claiming 2**62 bytes."""
    body = _varint(0) + _varint(0) + _varint(0) + _varint(1) + b"\x03" + _varint(1 << 62) + b"abc"
    return _write(d, "strlen.jfr", _jfr_with_metadata_body(body))


def jfr_huge_utf16_length(d: Path) -> str:
    """A UTF-16 metadata string claiming 2**40 characters."""
    body = _varint(0) + _varint(0) + _varint(0) + _varint(1) + b"\x04" + _varint(1 << 40) + b"a" * 64
    return _write(d, "utf16.jfr", _jfr_with_metadata_body(body))


def jfr_huge_pool_count(d: Path) -> str:
    """A checkpoint claiming 2**60 constant pools and 2**60 entries."""
    b = bytearray(good_jfr())
    cp_off = struct.unpack_from(">q", b, 16)[0]
    pos = cp_off
    for _ in range(5):  # size, type, start, duration, delta
        while b[pos] & 0x80:
            pos += 1
        pos += 1
    pos += 1  # flush flag? (varint: one byte when small)
    tail = _varint(1 << 60) + _varint(1 << 60) + _varint(1 << 60)
    b[pos:pos + len(tail)] = tail
    return _write(d, "pools.jfr", bytes(b))


def jfr_many_chunks(d: Path) -> str:
    """5,000 small complete chunks (each with its own metadata and constant pools: ~10 MB)."""
    return _write(d, "chunks.jfr", good_jfr() * 5000)


def fanout_jfr(nthreads: int = 2000, fan: int = 30, depth: int = 64) -> bytes:
    """Threads whose fields refer 30 times to a pool entry that refers 30 times to the next, 64
    deep: resolved as a tree, 30**64 values (85 KB)."""
    t_fan = 300
    classes = [c for c in B.standard_classes() if c.id != B.T_THREAD]
    classes.append(B.Class(B.T_THREAD, "java.lang.Thread", [B.Field("osName", B.T_STRING), B.Field("osThreadId", B.T_LONG)]
                           + [B.Field(f"f{i}", t_fan, cp=True) for i in range(fan)]))
    classes.append(B.Class(t_fan, "x.Fan", [B.Field(f"g{i}", t_fan, cp=True) for i in range(fan)]))
    fan_pool = [(k, B.varint(k + 1) * fan) for k in range(depth)]
    threads = [(t, B.utf8(f"t{t}") + B.varint(t) + B.varint(0) * fan) for t in range(1, nthreads + 1)]
    return B.chunk([], classes, pools=[(t_fan, fan_pool), (B.T_THREAD, threads)])


def jfr_fanout_refs(d: Path) -> str:
    """A reference fan-out in the constant pools (before: minutes per `asprof summary`)."""
    return _write(d, "fanout.jfr", fanout_jfr())


def jfr_deep_stack(d: Path, depth: int = 200_000) -> str:
    """One CPU sample whose stack has 200,000 frames (800 KB)."""
    nm = 50
    frames = b"".join(B.varint(1 + i % nm) + B.varint(0) + B.varint(0) + B.varint(3) for i in range(depth))
    pools = [
        (B.T_FRAME_TYPE, [(k, B.utf8(v)) for k, v in B.FRAME_TYPES]),
        (B.T_THREAD_STATE, [(k, B.utf8(v)) for k, v in B.THREAD_STATES]),
        (B.T_THREAD, [(1, B.thread_entry("main", 1))]),
        (B.T_STACK_TRACE, [(1, b"\x00" + B.varint(depth) + frames)]),
        (B.T_METHOD, [(1 + i, B.method_entry(1, 2 + i)) for i in range(nm)]),
        (B.T_CLASS, [(1, B.class_entry(1))]),
        (B.T_SYMBOL, [(1, B.utf8("libapp.so"))] + [(2 + i, B.utf8(f"f{i}")) for i in range(nm)]),
        (B.T_STRING, [(0, B.utf8(None))]),
    ]
    ev = B.event(B.T_EXEC, B.varint(1001) + B.varint(1) + B.varint(1) + B.varint(0))
    return _write(d, "deep.jfr", B.chunk([ev], pools=pools))


def _pool_of_empty_frames(generic: bool) -> bytes:
    """4,000 stacks of 6,000 frames of a StackFrame type without fields (frames that take no
    bytes): 21 KB that made 24M frames (543 MB). ``generic``: a StackFrame the fast path does
    not take (an array field elsewhere in StackTrace), the same through the generic decoder."""
    classes = [c for c in B.standard_classes() if c.id not in (B.T_STACK_FRAME, B.T_STACK_TRACE)]
    classes.append(B.Class(B.T_STACK_FRAME, "jdk.types.StackFrame", []))
    extra = [B.Field("tags", B.T_INT, array=True)] if generic else []
    classes.append(B.Class(B.T_STACK_TRACE, "jdk.types.StackTrace", [B.Field("truncated", B.T_BOOLEAN),
                                                                     B.Field("frames", B.T_STACK_FRAME, array=True)]
                           + extra))
    tail = B.varint(0) if generic else b""
    stacks = [(k, b"\x00" + B.varint(6000) + tail) for k in range(1, 4001)]
    return B.chunk([], classes, pools=[(B.T_STACK_TRACE, stacks)])


def jfr_empty_frames(d: Path) -> str:
    return _write(d, "empty-frames.jfr", _pool_of_empty_frames(False))


def jfr_empty_frames_generic(d: Path) -> str:
    return _write(d, "empty-frames-generic.jfr", _pool_of_empty_frames(True))


def jfr_deep_json(d: Path) -> str:
    """An asprof.PyStats user event whose JSON nests 200,000 arrays (json.loads raised
    RecursionError: a traceback) and an asprof.PyStack one of 100,000 continuation bytes."""
    s = B.Simple()
    s.thread(1, "main")
    s.exec_sample(1001, 1, ["main", "a"])
    s.events.append(B.event(B.T_USER, B.varint(1002) + B.varint(1) + B.varint(1) + B.utf8("[" * 200_000)))
    s.events.append(B.event(B.T_USER, B.varint(1003) + B.varint(1) + B.varint(2) + B.utf8("\x01" + "\xff" * 100_000)))
    pools = [
        (B.T_FRAME_TYPE, [(k, B.utf8(v)) for k, v in B.FRAME_TYPES]),
        (B.T_THREAD_STATE, [(k, B.utf8(v)) for k, v in B.THREAD_STATES]),
        (B.T_THREAD, [(1, B.thread_entry("main", 1))]),
        (B.T_STACK_TRACE, [(key, B.stack_entry([(s.methods[f], f[2]) for f in reversed(frames)]))
                           for frames, key in s.stacks.items()]),
        (B.T_METHOD, [(mk, B.method_entry(s.classes[owner], s.symbols[name])) for (name, owner, _t), mk in s.methods.items()]),
        (B.T_CLASS, [(ck, B.class_entry(s.symbols[owner])) for owner, ck in s.classes.items()]),
        (B.T_SYMBOL, [(k, B.utf8(x)) for x, k in s.symbols.items()]),
        (B.T_STRING, [(0, B.utf8(None))]),
        (B.T_USER_TYPE, [(1, B.utf8("asprof.PyStats")), (2, B.utf8("asprof.PyStack"))]),
    ]
    return _write(d, "deep-json.jfr", B.chunk(s.events, pools=pools))


def not_a_profile(d: Path) -> str:
    return _write(d, "random.jfr", os.urandom(4096))


HOSTILE: Dict[str, Callable[[Path], str]] = {f.__name__: f for f in (
    zip_bomb, zip_bomb_small_declared, zip_bomb_not_jfr, gzip_bomb_not_jfr, zip_many_entries, zip_overlapping, zip_nested, zip_of_zips,
    zip_control_chars, zip_bzip2, zip_truncated, zip_huge_eocd_count,
    gzip_bomb, gzip_members, directory_of_small_bombs, gzip_truncated, gzip_of_zip, gzip_garbage,
    fifo, fifo_in_directory, socket_file, char_device, symlink_loop, symlink_loop_pair, directory_of_loops,
    directory_many_files, jfr_truncated, jfr_huge_chunk_size, jfr_huge_string_count, jfr_huge_string_length,
    jfr_huge_utf16_length, jfr_huge_pool_count, jfr_many_chunks, not_a_profile, jfr_fanout_refs, jfr_deep_stack,
    jfr_empty_frames, jfr_empty_frames_generic, jfr_deep_json,
)}
#: Inputs that are valid JFR, hostile by their shape: read, within the same bounds.
VALID = ("jfr_many_chunks", "jfr_fanout_refs", "jfr_deep_stack", "jfr_deep_json")


#: Runs ``argv[2:]`` in a grandchild and writes "exit-status cpu-seconds peak-rss-kib" to argv[1].
#: Why a launcher: subprocess starts children with vfork, and Linux counts the RSS of the
#: parent's memory at exec into the child's ru_maxrss (a pytest process of 300 MB would make every
#: child look 300 MB big); a child forked from this small process starts from its size instead.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {ru.ru_utime + ru.ru_stime} {ru.ru_maxrss}")
"""


def run_measured(argv: List[str], wall_limit: float = 60.0, env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None) -> Tuple[int, str, float, float, float]:
    """``argv`` in a child: (exit status, stderr, wall seconds, CPU seconds, peak RSS in MiB).
    Killed (status -9) after ``wall_limit`` seconds."""
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryDirectory(prefix="asprof-measure-") as tmp:
        out = os.path.join(tmp, "usage")
        with open(os.path.join(tmp, "err"), "w+b") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen([argv[0], "-I", "-S", "-c", LAUNCHER, out, *argv], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd,
                                    start_new_session=True)
            try:
                proc.wait(timeout=wall_limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the launcher and the child it runs
                proc.wait()
            seconds = time.monotonic() - t0
            err.seek(0)
            text = err.read().decode("utf-8", "replace")
        try:
            with open(out) as f:
                code, cpu, rss = f.read().split()
        except (OSError, ValueError):
            return -9, text, seconds, 0.0, 0.0
        return int(code), text, seconds, float(cpu), int(rss) / 1024


def main() -> int:
    """``python tests/hostile_inputs.py [NAME...]``: each input through ``asprof summary`` in a
    child, with its exit status, wall and CPU time, peak RSS (wait4) and first line of stderr."""
    import sys
    import tempfile

    names = sys.argv[1:] or list(HOSTILE)
    with tempfile.TemporaryDirectory(prefix="asprof-hostile-") as tmp:
        for name in names:
            sub = Path(tmp) / name
            sub.mkdir()
            path = HOSTILE[name](sub)
            size = os.path.getsize(path) if os.path.isfile(path) else 0
            code, err, seconds, cpu, rss = run_measured([sys.executable, "-m", "asprof", "summary", path])
            line = err.strip().splitlines()[:1]
            print(f"{name:24s} {size / 1e6:6.2f} MB  exit {code}  {seconds:5.2f} s ({cpu:5.2f} s CPU)  "
                  f"{rss:6.1f} MiB  {line[0][:100] if line else ''}")
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
