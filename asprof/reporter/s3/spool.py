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
import stat
import time
import uuid
from dataclasses import dataclass, field
from typing import Deque, List, Optional, Set, Tuple

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
_STALE_TEMP_SECONDS = 3600.0


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
        self.directory = _private_directory(directory)
        self.bucket = destination[0]
        self.tag = hashlib.sha256("\0".join(destination).encode("utf-8")).hexdigest()[:12]
        self.max_profiles = max_profiles
        self.max_bytes = max_bytes
        self._seq = 0
        self._claimed: Optional[_Entry] = None
        self._remove_stale_temps()

    # -- writing (agent thread)

    def put(self, entry: _Entry, end_ns: int) -> int:
        self._seq += 1
        name = f"{max(end_ns, 0):020d}-{self._seq % 10**10:010d}-{entry.id}-{self.tag}.asprof-s3"
        header = json.dumps({"id": entry.id, "key": entry.key, "bucket": entry.bucket}).encode("utf-8")
        data = _SPOOL_MAGIC + header + b"\n" + entry.body
        final = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f".tmp-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
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

    def _remove_stale_temps(self) -> None:
        now = time.time()
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name.startswith(".tmp-"):
                path = os.path.join(self.directory, name)
                try:
                    if now - os.lstat(path).st_mtime > _STALE_TEMP_SECONDS:
                        os.unlink(path)
                except OSError:
                    pass


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


def _private_directory(directory: str) -> str:
    """Create (0700) or check the spool directory: ours, and writable by nobody else."""
    path = os.path.abspath(directory)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ValueError(f"S3Reporter: cannot create spool directory {path!r}: {e.strerror}") from e
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"S3Reporter: spool directory {path!r} is not a directory")
    if st.st_uid != os.geteuid():
        raise ValueError(
            f"S3Reporter: spool directory {path!r} belongs to uid {st.st_uid}, not to this process "
            f"(uid {os.geteuid()}); use a private directory")
    if st.st_mode & 0o077:
        log.warning("S3 spool directory %s was accessible to other users (mode %o); setting it to 0700",
                    path, stat.S_IMODE(st.st_mode))
        try:
            os.chmod(path, 0o700)
        except OSError as e:
            raise ValueError(f"S3Reporter: cannot make spool directory {path!r} private: {e.strerror}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"S3Reporter: spool directory {path!r} is not writable by this process")
    return path


