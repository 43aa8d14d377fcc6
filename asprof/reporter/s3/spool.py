"""The S3 reporter's spool: profiles waiting for upload, oldest first, bounded in count and
bytes; in memory, or in a private directory that survives restarts (one locked file per profile).
"""
from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Deque, List, Optional, Set, Tuple

from asprof.reporter.files import (
    RECOVERY_PERIOD,
    create_locked,
    maybe_being_created,
    secure_directory,
    try_lock_abandoned,
)

log = logging.getLogger("asprof.s3")


@dataclass(eq=False)
class _Entry:
    id: str
    key: str  # the key without disambiguation suffix
    bucket: str
    body: bytes
    path: Optional[str] = None  # its file, in a directory spool
    fd: Optional[int] = None  # locked while this process uploads it (directory spool)
    claimed: bool = False
    reported_lost: bool = False  # counted as lost at stop while its upload was still running
    # Keys whose PutObject may have succeeded without our hearing it (timeout...).
    ambiguous_keys: Set[str] = field(default_factory=set)


class _MemorySpool:
    """Profiles waiting for upload, oldest first, bounded in count and bytes."""

    def __init__(self, max_profiles: int, max_bytes: int) -> None:
        self.max_profiles = max_profiles
        self.max_bytes = max_bytes
        self._entries: Deque[_Entry] = collections.deque()
        self._bytes = 0

    def put(self, entry: _Entry) -> int:
        """Add; drop the oldest unclaimed entries beyond the bound; return how many were dropped.

        The entry being uploaded and the new one are never dropped.
        """
        self._entries.append(entry)
        self._bytes += len(entry.body)
        dropped = 0
        while len(self._entries) > self.max_profiles or self._bytes > self.max_bytes:
            victim = next((e for e in self._entries if not e.claimed and e is not entry), None)
            if victim is None:
                break
            self.done(victim)
            dropped += 1
        return dropped

    def claim(self) -> Optional[_Entry]:
        for e in self._entries:
            if e.claimed:
                return e
        if self._entries:
            e = self._entries[0]
            e.claimed = True
            return e
        return None

    def done(self, entry: _Entry) -> None:
        try:
            self._entries.remove(entry)
        except ValueError:
            return
        self._bytes -= len(entry.body)

    def release(self, entry: _Entry) -> None:
        entry.claimed = False

    def pending(self) -> int:
        return len(self._entries)

    def entries(self) -> List[_Entry]:
        return list(self._entries)

    def after_fork(self) -> None:
        # The parent uploads its own profiles.
        self._entries.clear()
        self._bytes = 0


_SPOOL_MAGIC = b"ASPROF-S3-SPOOL 1\n"
_SPOOL_NAME = re.compile(r"^(\d{20})-(\d{10})-([0-9a-f]{32})-([0-9a-f]{12})\.asprof-s3$")
_PARTIAL_NAME = re.compile(r"^\.(.+)\.(\d{1,10})\.partial$")  # .{spool file name}.{writer pid}.partial
_MAX_RECOVER_BYTES = 1 << 30


class _DirSpool:
    """Profiles waiting for upload as files in a private directory.

    One file per profile, written atomically (temporary file, fsync, rename),
    named ``{end ns}-{seq}-{id}-{destination}.asprof-s3`` so that name order is
    upload order. A process uploading a file holds an flock on it, so several
    processes (or a later start) can share the directory: each file is
    uploaded by one of them. Only files for this reporter's bucket and owner
    (the destination tag) are touched.
    """

    def __init__(self, directory: str, destination: Tuple[str, str], max_profiles: int, max_bytes: int) -> None:
        self.directory = secure_directory(directory, "S3Reporter", "spool directory", mode=0o700, forbidden=0o077)
        self.bucket = destination[0]
        self.tag = hashlib.sha256("\0".join(destination).encode("utf-8")).hexdigest()[:12]
        self.max_profiles = max_profiles
        self.max_bytes = max_bytes
        self._seq = 0
        self._claimed: Optional[_Entry] = None
        # Abandoned .partial files are looked for off the application's thread: at the first
        # put (agent thread) or claim (upload thread), then at most once a minute.
        self._next_recovery = 0.0

    # -- writing (agent thread)

    def _recover_due(self) -> None:
        now = time.monotonic()
        if now >= self._next_recovery:  # a process sharing the directory may have been killed since
            self._next_recovery = now + RECOVERY_PERIOD
            self.recover_partials()

    def put(self, entry: _Entry, end_ns: int) -> int:
        self._recover_due()
        self._seq += 1
        name = f"{max(end_ns, 0):020d}-{self._seq % 10**10:010d}-{entry.id}-{self.tag}.asprof-s3"
        header = json.dumps({"id": entry.id, "key": entry.key, "bucket": entry.bucket}).encode("utf-8")
        data = _SPOOL_MAGIC + header + b"\n" + entry.body
        final = os.path.join(self.directory, name)
        # Named after the file it becomes (only this destination's spool recovers it) and
        # locked until renamed: a later spool finishes or removes it if this process is killed.
        tmp = os.path.join(self.directory, f".{name}.{os.getpid()}.partial")
        fd = create_locked(tmp, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                os.rename(tmp, final)
            finally:
                os.close(fd)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        entry.path = final
        _fsync_dir(self.directory)
        return self._enforce_bound(keep=final)

    def _own_files(self) -> List[str]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(n for n in names if (m := _SPOOL_NAME.match(n)) is not None and m.group(4) == self.tag)

    def _enforce_bound(self, keep: str) -> int:
        files = []
        for name in self._own_files():
            path = os.path.join(self.directory, name)
            try:
                files.append((path, os.stat(path).st_size))
            except OSError:
                continue
        dropped = 0
        total = sum(size for _, size in files)
        count = len(files)
        for path, size in files:
            if count <= self.max_profiles and total <= self.max_bytes:
                break
            if path == keep or (self._claimed is not None and self._claimed.path == path):
                continue
            if self._remove_unless_locked(path):
                dropped += 1
                count -= 1
                total -= size
        return dropped

    def _remove_unless_locked(self, path: str) -> bool:
        """Delete a spool file unless some process is uploading it."""
        fd = _lock_spool_file(path)
        if fd is None:
            return False
        try:
            os.unlink(path)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    # -- uploading (worker thread)

    def claim(self) -> Optional[_Entry]:
        if self._claimed is not None:
            return self._claimed
        self._recover_due()
        for name in self._own_files():
            entry = self._open(os.path.join(self.directory, name))
            if entry is not None:
                entry.claimed = True
                self._claimed = entry
                return entry
        return None

    def _open(self, path: str) -> Optional[_Entry]:
        fd = _lock_spool_file(path)
        if fd is None:
            return None
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            entry = _parse_spool_file(data, path, fd)
        except (OSError, ValueError) as e:
            log.warning("removing unreadable S3 spool file %s: %s (1 profile lost)", path, e)
            try:
                os.unlink(path)
            except OSError:
                pass
            os.close(fd)
            return None
        if entry.bucket != self.bucket:
            os.close(fd)
            return None
        return entry

    def done(self, entry: _Entry) -> None:
        if entry.path is not None:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
        self.release(entry)

    def release(self, entry: _Entry) -> None:
        entry.claimed = False
        if entry.fd is not None:
            os.close(entry.fd)
            entry.fd = None
        if self._claimed is entry:
            self._claimed = None

    def pending(self) -> int:
        return len(self._own_files())

    def after_fork(self) -> None:
        # The parent keeps its lock: our copy of the descriptor must not release it later.
        if self._claimed is not None and self._claimed.fd is not None:
            os.close(self._claimed.fd)
            self._claimed.fd = None
        self._claimed = None

    def recover_partials(self) -> Tuple[int, int]:
        """Finish or remove the ``.partial`` files of this destination that a killed writer
        left; returns (recovered, removed). Only files named as this spool names them, of
        this user, not locked by a live writer, are touched; anything else is left alone."""
        recovered = removed = 0
        try:
            names = os.listdir(self.directory)
        except OSError:
            return 0, 0
        for name in names:
            m = _PARTIAL_NAME.match(name)
            if m is None or (n := _SPOOL_NAME.match(m.group(1))) is None or n.group(4) != self.tag:
                continue
            path = os.path.join(self.directory, name)
            fd = try_lock_abandoned(path)
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                if maybe_being_created(st.st_size, st.st_mtime, int(m.group(2))):
                    continue
                reason = _spool_file_problem(fd, st.st_size)
                final = os.path.join(self.directory, m.group(1))
                if reason is None:
                    os.link(path, final)  # never replaces: the name is unique to that profile
                    os.unlink(path)
                    recovered += 1
                    log.warning("recovered %s: a complete profile left by a process killed while spooling it; "
                                "it will be uploaded", final)
                else:
                    os.unlink(path)
                    removed += 1
                    log.warning("removed %s, left by a process killed while spooling it: %s (1 profile lost)",
                                path, reason)
            except OSError as e:
                log.warning("could not recover %s, left by a killed process: %s", path, e.strerror or e)
            finally:
                os.close(fd)
        if recovered:
            _fsync_dir(self.directory)
        return recovered, removed


def _spool_file_problem(fd: int, size: int) -> Optional[str]:
    """Why the spool file is not a complete profile, or None when it is one."""
    if size > _MAX_RECOVER_BYTES:
        return f"too large ({size} bytes)"
    data = os.pread(fd, size, 0)
    try:
        entry = _parse_spool_file(data, "", -1)
    except (ValueError, UnicodeDecodeError) as e:
        return f"incomplete ({size} bytes: {e})"
    import io
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(entry.body)) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        return f"incomplete ({size} bytes: {e})"
    return None if bad is None else f"damaged entry {bad}"


def _parse_spool_file(data: bytes, path: str, fd: int) -> _Entry:
    if not data.startswith(_SPOOL_MAGIC):
        raise ValueError("not an asprof S3 spool file")
    end = data.find(b"\n", len(_SPOOL_MAGIC))
    if end < 0:
        raise ValueError("truncated header")
    header = json.loads(data[len(_SPOOL_MAGIC):end].decode("utf-8"))
    if not isinstance(header, dict) or not all(isinstance(header.get(k), str) for k in ("id", "key", "bucket")):
        raise ValueError("malformed header")
    return _Entry(id=header["id"], key=header["key"], bucket=header["bucket"], body=data[end + 1:], path=path, fd=fd)


def _lock_spool_file(path: str) -> Optional[int]:
    """A descriptor of the spool file at ``path``, locked for this process, or None when
    it is gone, locked by another process (which is uploading it), or was replaced."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(path, fd):  # not uploaded and removed meanwhile
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _same_file(path: str, fd: int) -> bool:
    try:
        a = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    b = os.fstat(fd)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
