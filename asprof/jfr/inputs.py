"""Reading the inputs of the offline reader with limits: files, directories, zips, gzip, bytes.

Profiles come from S3 buckets and colleagues' laptops, so every input is treated as hostile:

- only regular files, directories, zip and gzip files are read. What a path names is checked
  with ``stat`` first and again, race-free, with ``fstat`` on a descriptor opened with
  ``O_NONBLOCK`` (opening a FIFO for reading would otherwise block forever); a FIFO, socket or
  device is refused with one line, and so is a symlink loop;
- a directory is listed, not walked: its ``.jfr``, ``.zip`` and ``.gz`` files (hidden ones
  left out), at most :attr:`ReadLimits.max_files` of them;
- zip and gzip content is inflated in blocks, never trusting a size a header declares: each zip
  entry and each whole input stop at :attr:`ReadLimits.max_size` bytes, and once past
  :attr:`ReadLimits.ratio_floor` bytes the output may not exceed :attr:`ReadLimits.max_ratio`
  times the compressed bytes actually consumed (real JFR compresses 2.5-4x; a deflate bomb is
  ~1000x, so it stops after ``ratio_floor`` bytes). Zip entries must be stored or deflated
  (bzip2 and lzma inflate without an output bound in :mod:`zipfile`); the central directory may
  list at most ``max_files`` entries (checked before :mod:`zipfile` parses it). Entry names are
  never used as paths; a container inside a container is refused.

Peak memory is therefore the real profile (plus one block), not what a header claims. Every
problem is a :class:`~asprof.jfr.errors.JfrError` naming the input.
"""
from __future__ import annotations

import io
import json
import logging
import os
import stat
import struct
import warnings as _warnings
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from asprof.jfr.errors import JfrError

__all__ = ["ReadLimits", "ReadTotals", "DEFAULT_LIMITS", "LoadedInput", "check_path", "list_dir", "load_path", "load_bytes",
           "PROFILE_SUFFIXES"]

log = logging.getLogger("asprof.jfr")

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
GZIP_MAGIC = b"\x1f\x8b"
JFR_MAGIC = b"FLR\x00"
#: The names a directory listing picks up.
PROFILE_SUFFIXES = (".jfr", ".zip", ".gz")
_BLOCK = 1 << 20
_ZIP_BLOCK = 64 << 10
_META_MAX = 1 << 20  # metadata.json of an S3 reporter zip: a few hundred bytes in practice


@dataclass(frozen=True)
class ReadLimits:
    """Limits applied to every input of :func:`asprof.jfr.open_recording`.

    The defaults are far above any real profile (a 30 s report is 0.1-10 MB; a JFR compresses
    2.5-4x) and far below what hurts a laptop.
    """

    #: Bytes after decompression, per zip entry and per input (file, zip, gzip): 1 GiB.
    max_size: int = 1 << 30
    #: Largest inflated/compressed ratio, checked once an entry or input is past ``ratio_floor``.
    max_ratio: float = 50.0
    #: Inflated bytes below which the ratio is not checked (small, very regular files are fine).
    ratio_floor: int = 16 << 20
    #: Profiles read from one directory, and entries listed in one zip's central directory.
    max_files: int = 10_000

    def __post_init__(self) -> None:
        if self.max_size <= 0 or self.max_ratio <= 0 or self.ratio_floor < 0 or self.max_files <= 0:
            raise ValueError(f"invalid read limits {self!r}")


DEFAULT_LIMITS = ReadLimits()

#: What one input gives: JFR bytes, the report metadata of an S3 zip (or None), warnings.
LoadedInput = Tuple[Any, Optional[Dict[str, Any]], List[str]]


def shown(text: str, limit: int = 200) -> str:
    """``text`` fit for a one-line message: control characters escaped, at most ``limit`` chars."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


# ---------------------------------------------------------------- what a path names

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _refusal(mode: int) -> Optional[str]:
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"is {what}: only regular files, directories, zip and gzip files are read"


def _os_error(e: OSError, path: str, doing: str = "cannot read") -> JfrError:
    import errno

    if e.errno == errno.ELOOP:
        return JfrError("symlink loop (too many levels of symbolic links)", None, path)
    if e.errno == errno.ENOENT:
        return JfrError("no such file or directory", None, path)
    return JfrError(f"{doing}: {e.strerror or e}", None, path)


def check_path(path: str) -> os.stat_result:
    """``stat`` of ``path`` when it is a regular file or a directory; else a one-line JfrError."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _os_error(e, path) from None
    why = _refusal(st.st_mode)
    if why:
        raise JfrError(why, None, path)
    return st


def _open_regular(path: str) -> Tuple[io.BufferedIOBase, os.stat_result]:
    """A file object of the regular file ``path``: stat first, then opened with O_NONBLOCK
    (never blocks on a FIFO swapped in meanwhile) and checked again with fstat."""
    check_path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _os_error(e, path) from None
    try:
        st = os.fstat(fd)
        why = "is a directory" if stat.S_ISDIR(st.st_mode) else _refusal(st.st_mode)
        if why:
            raise JfrError(why, None, path)
        return io.open(fd, "rb", closefd=True), st
    except BaseException:
        os.close(fd)
        raise


def list_dir(path: str, limits: ReadLimits = DEFAULT_LIMITS) -> Tuple[List[str], List[str]]:
    """The profiles of a directory (``.jfr``, ``.zip``, ``.gz``; hidden names left out; not
    recursive), sorted, and warnings for entries skipped (not regular files, symlink loops).
    Raises JfrError when there are more than ``limits.max_files`` or none."""
    files: List[str] = []
    skipped: List[str] = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                name = entry.name
                if name.startswith(".") or not name.endswith(PROFILE_SUFFIXES):
                    continue
                full = os.path.join(path, name)
                try:
                    st = os.stat(full)
                    why = "is a directory" if stat.S_ISDIR(st.st_mode) else _refusal(st.st_mode)
                except OSError as e:
                    why = _os_error(e, full).reason
                if why:
                    skipped.append(f"{shown(full)}: {why}; skipped")
                    continue
                files.append(full)
                if len(files) > limits.max_files:
                    raise JfrError(f"directory holds more than {limits.max_files} profiles "
                                   "(read fewer at a time, or raise --max-files)", None, path)
    except OSError as e:
        raise _os_error(e, path, "cannot list directory") from None
    if not files:
        why = f" ({skipped[0]})" if skipped else ""
        raise JfrError(f"directory holds no readable .jfr, .zip or .gz profiles{why}", None, path)
    return sorted(files), skipped


# ---------------------------------------------------------------- bounded inflation

class _Counting:
    """A seekable binary file that counts the bytes read through it (compressed bytes consumed)."""

    def __init__(self, f: io.BufferedIOBase) -> None:
        self._f = f
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self.count += len(b)
        return b

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True


class _Budget:
    """Inflated output checked against a size cap and the compression ratio; the compressed
    bytes consumed are those read through ``counter`` since the budget was made."""

    def __init__(self, label: str, limits: ReadLimits, what: str, counter: _Counting,
                 max_size: Optional[int] = None) -> None:
        self.label = label
        self.limits = limits
        self.what = what
        self.counter = counter
        self.origin = counter.count
        self.max_size = limits.max_size if max_size is None else max_size
        self.out = 0

    def add(self, n: int) -> None:
        self.out += n
        lim = self.limits
        if self.out > self.max_size:
            raise JfrError(f"{self.what} inflates to more than {_size(self.max_size)} "
                           "(the read limit; raise it with --max-size or ASPROF_READ_MAX_SIZE)", None, self.label)
        consumed = self.counter.count - self.origin
        if self.out > lim.ratio_floor and self.out > lim.max_ratio * max(consumed, 1):
            raise JfrError(f"{self.what} inflates more than {lim.max_ratio:g} times its compressed size "
                           f"({_size(self.out)} from {_size(consumed)}): a decompression bomb? "
                           "(raise the limit with --max-ratio)", None, self.label)


class ReadTotals:
    """The inflated and compressed bytes of all the compressed inputs of one recording: the
    ratio check applies to their sums too, so a directory of 10,000 small bombs, each under the
    ratio floor on its own, stops once their sum passes it. Plain files do not count (they
    would dilute the ratio)."""

    def __init__(self, limits: ReadLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.out = 0
        self.consumed = 0  # compressed bytes of the inputs done
        self.counter: Optional[_Counting] = None
        self._origin = 0
        self._label = ""

    def bind(self, counter: "_Counting", label: str) -> None:
        """The input being read now (its compressed bytes are read through ``counter``)."""
        self.counter, self._origin, self._label = counter, counter.count, label

    def release(self) -> None:
        if self.counter is not None:
            self.consumed += self.counter.count - self._origin
            self.counter = None

    def add(self, n: int) -> None:
        self.out += n
        lim = self.limits
        consumed = self.consumed + (self.counter.count - self._origin if self.counter is not None else 0)
        if self.out > lim.ratio_floor and self.out > lim.max_ratio * max(consumed, 1):
            raise JfrError(f"the compressed inputs inflate more than {lim.max_ratio:g} times their size together "
                           f"({_size(self.out)} from {_size(consumed)}): decompression bombs? "
                           "(raise the limit with --max-ratio)", None, self._label)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} bytes"


def _inflate(read: Callable[[int], bytes], budgets: List[Any],
             progress: Optional[Callable[[int], None]], block_size: int = _BLOCK,
             head: Optional[Callable[[bytes], None]] = None) -> bytearray:
    """Read blocks from ``read`` into one bytearray, each block checked against ``budgets``
    before it is kept (so at most one block past a limit is ever held); ``head(first 4 bytes)``
    as soon as there are 4 (what is not a JFR stops at once, not after inflating)."""
    out = bytearray()
    while True:
        block = read(block_size)
        if not block:
            return out
        for b in budgets:
            b.add(len(block))
        out += block
        if head is not None and len(out) >= 4:
            head(bytes(out[:4]))
            head = None
        if progress is not None:
            progress(budgets[0].counter.count)


def _jfr_head(what: str, label: str) -> Callable[[bytes], None]:
    """A check of the first bytes of ``what``: a JFR chunk, not another container."""
    def check(head: bytes) -> None:
        if head.startswith((ZIP_MAGIC, EMPTY_ZIP_MAGIC, GZIP_MAGIC)):
            kind = "gzip" if head.startswith(GZIP_MAGIC) else "zip"
            raise JfrError(f"{what} is itself a {kind} file: containers inside containers are not read", None, label)
        if head != JFR_MAGIC:
            raise JfrError(f"{what} is not a JFR file (bad magic, expected 'FLR\\0')", None, label)

    return check


# ---------------------------------------------------------------- gzip

def _read_gzip(f: io.BufferedIOBase, label: str, limits: ReadLimits,
               progress: Optional[Callable[[int], None]], totals: Optional[ReadTotals] = None) -> bytearray:
    import gzip
    import zlib

    counter = _Counting(f)
    budget = _Budget(label, limits, "the gzip content", counter)
    budgets: List[Any] = [budget]
    if totals is not None:
        totals.bind(counter, label)
        budgets.append(totals)
    try:
        with gzip.GzipFile(fileobj=counter, mode="rb") as g:
            data = _inflate(g.read, budgets, progress, head=_jfr_head("the gzip content", label))
    except JfrError:
        raise
    except EOFError:
        raise JfrError("truncated gzip file (it ends before its end-of-stream marker)", None, label) from None
    except (OSError, zlib.error, ValueError) as e:
        raise JfrError(f"not a valid gzip file ({shown(str(e))})", None, label) from None
    finally:
        if totals is not None:
            totals.release()
    return data


# ---------------------------------------------------------------- zip

def _zip_entry_count(f: io.BufferedIOBase, size: int, label: str, limits: ReadLimits) -> None:
    """Refuse a zip whose central directory lists more than ``max_files`` entries, before
    :mod:`zipfile` builds an object for each (from the end-of-central-directory record)."""
    tail = min(size, 22 + 65535 + 20)
    f.seek(size - tail)
    buf = f.read(tail)
    # where zipfile looks: a record without comment at the very end, else the last signature
    i = len(buf) - 22 if buf[-22:-18] == EMPTY_ZIP_MAGIC and buf[-2:] == b"\0\0" else buf.rfind(EMPTY_ZIP_MAGIC)
    if i < 0 or len(buf) - i < 22:
        return  # zipfile says what is wrong
    _, _, _, entries, cd_size, _, _ = struct.unpack_from("<HHHHIIH", buf, i + 4)
    if (entries == 0xFFFF or cd_size == 0xFFFFFFFF) and i >= 20 and buf[i - 20:i - 16] == b"PK\x06\x07":
        (z64_off,) = struct.unpack_from("<Q", buf, i - 20 + 8)
        if 0 <= z64_off <= size - 56:
            f.seek(z64_off)
            rec = f.read(56)
            if rec[:4] == b"PK\x06\x06":
                entries, cd_size, _ = struct.unpack_from("<QQQ", rec, 32)
    if entries > limits.max_files or cd_size > limits.max_files * 1024:
        raise JfrError(f"zip lists {entries} entries in a {_size(cd_size)} central directory; at most "
                       f"{limits.max_files} are read (raise --max-files)", None, label)


def _read_zip(f: io.BufferedIOBase, size: int, label: str, limits: ReadLimits,
              progress: Optional[Callable[[int], None]], totals: Optional[ReadTotals] = None) -> LoadedInput:
    warnings: List[str] = []
    counter = _Counting(f)
    try:
        _zip_entry_count(f, size, label, limits)
    except (OSError, struct.error) as e:
        raise JfrError(f"not a valid zip file ({shown(str(e))})", None, label) from None
    try:
        zf = zipfile.ZipFile(counter)
    except zipfile.BadZipFile as e:
        raise JfrError(f"not a valid zip file ({shown(str(e))})", None, label) from None
    except (OSError, ValueError, EOFError, struct.error, NotImplementedError, KeyError, IndexError) as e:
        raise JfrError(f"not a valid zip file ({shown(str(e))})", None, label) from None
    total = _Budget(label, limits, "the zip", counter)
    if totals is not None:
        totals.bind(counter, label)
    try:
        # zipfile's own warnings (3.14: "Overlapped entries ... (possible zip bomb)") would be a
        # second line on stderr: the limits here refuse such a file in one
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            return _zip_content(zf, counter, label, limits, total, progress, totals, warnings)
    finally:
        if totals is not None:
            totals.release()


def _zip_content(zf: zipfile.ZipFile, counter: _Counting, label: str, limits: ReadLimits, total: _Budget,
                 progress: Optional[Callable[[int], None]], totals: Optional[ReadTotals],
                 warnings: List[str]) -> LoadedInput:
    with zf:
        infos = zf.infolist()
        jfrs = [i for i in infos if i.filename == "async_profiler_dump_0.jfr"] or \
            sorted((i for i in infos if i.filename.endswith(".jfr") and not i.is_dir()), key=lambda i: i.filename)
        if not jfrs:
            raise JfrError("zip holds no .jfr file (expected async_profiler_dump_0.jfr)", None, label)
        parts: List[bytearray] = []
        for info in jfrs:
            parts.append(_read_entry(zf, info, counter, label, limits, total, progress, totals=totals))
        meta: Optional[Dict[str, Any]] = None
        mi = next((i for i in infos if i.filename == "metadata.json"), None)
        if mi is not None:
            try:
                raw = _read_entry(zf, mi, counter, label, limits, None, None, _META_MAX)
                m = json.loads(raw.decode("utf-8"))
                meta = m if isinstance(m, dict) else None
                if meta is None:
                    raise ValueError("not an object")
            except (JfrError, ValueError, UnicodeDecodeError, RecursionError) as e:
                why = e.reason if isinstance(e, JfrError) else "not valid JSON"
                msg = f"{shown(label)}: metadata.json ignored: {why}"
                log.warning("%s", msg)
                warnings.append(msg)
                meta = None
    if len(parts) == 1:
        return parts[0], meta, warnings
    data = parts[0]
    for p in parts[1:]:
        data += p
        p.clear()
    return data, meta, warnings


def _read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, counter: _Counting, label: str, limits: ReadLimits,
                total: Optional[_Budget], progress: Optional[Callable[[int], None]],
                max_size: Optional[int] = None, totals: Optional[ReadTotals] = None) -> bytearray:
    name = shown(info.filename)
    if info.flag_bits & 0x1:
        raise JfrError(f"zip entry {name} is encrypted", None, label)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise JfrError(f"zip entry {name} uses compression method {info.compress_type}; "
                       "only stored and deflated entries are read", None, label)
    import zlib

    budget = _Budget(label, limits, f"zip entry {name}", counter, max_size)
    budgets: List[Any] = [budget] if total is None else [budget, total]
    if totals is not None:
        budgets.append(totals)
    try:
        with zf.open(info) as ef:
            # small reads: zipfile reads as many compressed bytes as output asked for, and the
            # ratio is judged on what was read
            data = _inflate(ef.read, budgets, progress, _ZIP_BLOCK,
                            _jfr_head(f"zip entry {name}", label) if max_size is None else None)
    except JfrError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError, NotImplementedError,
            struct.error, KeyError, IndexError) as e:
        raise JfrError(f"cannot read zip entry {name} ({shown(str(e)) or type(e).__name__})", None, label) from None
    return data


# ---------------------------------------------------------------- one input

def _load(f: io.BufferedIOBase, size: int, label: str, limits: ReadLimits,
          progress: Optional[Callable[[int], None]], by_name_zip: bool,
          totals: Optional[ReadTotals] = None) -> LoadedInput:
    head = f.read(4)
    f.seek(0)
    if head.startswith(GZIP_MAGIC):
        return _read_gzip(f, label, limits, progress, totals), None, []
    if head in (ZIP_MAGIC, EMPTY_ZIP_MAGIC) or (by_name_zip and not head.startswith(JFR_MAGIC)):
        return _read_zip(f, size, label, limits, progress, totals)
    if len(head) == 4 and head != JFR_MAGIC:  # the parser's message, before reading the rest
        raise JfrError("not a JFR file (bad magic, expected 'FLR\\0')", 0, label)
    if size > limits.max_size:
        raise JfrError(f"file is {_size(size)}, more than the read limit of {_size(limits.max_size)} "
                       "(raise it with --max-size or ASPROF_READ_MAX_SIZE)", None, label)
    blob = bytearray(size)
    view = memoryview(blob)
    got = 0
    try:
        while got < size:
            n = f.readinto(view[got:got + 16 * _BLOCK])
            if not n:
                break
            got += n
            if progress is not None:
                progress(got)
    finally:
        view.release()
    if got < size:
        del blob[got:]  # the file shrank while being read
    return blob, None, []


def load_path(path: str, limits: ReadLimits = DEFAULT_LIMITS,
              progress: Optional[Callable[[int], None]] = None,
              totals: Optional[ReadTotals] = None) -> LoadedInput:
    """The JFR bytes of the regular file ``path`` (a .jfr, an S3 reporter zip, a gzip);
    ``totals``: the sums over all the inputs of one recording."""
    f, st = _open_regular(path)
    with f:
        try:
            return _load(f, st.st_size, path, limits, progress, path.endswith(".zip"), totals)
        except OSError as e:
            raise _os_error(e, path) from None


def load_bytes(data: Any, limits: ReadLimits = DEFAULT_LIMITS, label: str = "<bytes>",
               totals: Optional[ReadTotals] = None) -> LoadedInput:
    """The JFR bytes of in-memory ``data`` (a JFR, a zip, or gzip)."""
    head = bytes(data[:4])
    if head.startswith(GZIP_MAGIC) or head in (ZIP_MAGIC, EMPTY_ZIP_MAGIC):
        return _load(io.BytesIO(data), len(data), label, limits, None, False, totals)
    return bytes(data), None, []
