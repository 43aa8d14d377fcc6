"""LocalReporter: one JFR file per profile in a directory."""
from __future__ import annotations

import errno
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Tuple, Union

from asprof.reporter.base import Reporter, ReporterError
from asprof.reporter.files import (
    DEFAULT_FILE_MODE,
    RECOVERY_PERIOD,
    check_file_mode,
    create_locked,
    directory_mode,
    maybe_being_created,
    secure_directory,
    try_lock_abandoned,
)

if TYPE_CHECKING:
    from datetime import datetime

    from asprof.metadata import ReportMetadata

log = logging.getLogger("asprof")

_MAX_SUFFIX = 1000
#: What write() names a profile being written: ``.{stem}.{n}.{writer pid}.partial`` (stem = time_pid).
_PARTIAL = re.compile(r"^\.(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z_\d+)\.\d{1,3}\.(\d{1,10})\.partial$")
_MAX_RECOVER_BYTES = 1 << 30


def profile_time(t: datetime) -> str:
    """UTC time to the second with ':' as '-', as the Rust agent names files."""
    from datetime import timezone  # on the reporting thread: importing asprof stays cheap

    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")


class LocalReporter(Reporter):
    """Writes each profile to ``{directory}/{YYYY-MM-DDTHH-MM-SSZ}_{pid}.jfr``.

    The time is the end of the recording, in UTC. The process id keeps
    processes sharing a directory apart; an existing file is never
    overwritten (a ``-N`` suffix is added instead). Files appear atomically:
    a reader never sees a partly written profile. An unusable directory is an
    error when the reporter is made.

    Private by default: profiles are ``file_mode`` (0600: only this user reads
    them; 0640 or 0644 for a sidecar of another user), and a missing directory
    is created 0700 (group/others get read and search where ``file_mode`` lets
    them read). An existing directory is never changed: one that is a symbolic
    link, belongs to another user or that others can write in is refused.

    A profile being written is a hidden ``.{name}.N.{pid}.partial`` file locked by its
    writer. One left by a killed process is dealt with by the next report into
    the directory (the first report, then at most once a minute): renamed to its profile name when it holds complete JFR
    chunks, removed otherwise, with a log line either way.
    """

    wants_host_metadata = False

    def __init__(self, directory: Union[str, "os.PathLike[str]"] = "profiles", *,
                 file_mode: int = DEFAULT_FILE_MODE) -> None:
        self.file_mode = check_file_mode(file_mode, "LocalReporter")
        self.directory = secure_directory(directory, "LocalReporter", "directory",
                                          mode=directory_mode(self.file_mode), forbidden=0o022)
        self._next_recovery = 0.0  # monotonic time of the next look for abandoned .partial files

    def __repr__(self) -> str:
        return f"LocalReporter({self.directory!r})"

    def report(self, jfr: bytes, metadata: ReportMetadata) -> None:
        self.write(jfr, metadata)

    def report_blocking(self, jfr: bytes, metadata: ReportMetadata) -> None:
        self.write(jfr, metadata)

    def write(self, jfr: bytes, metadata: ReportMetadata) -> str:
        """Write one profile and return its path."""
        now = time.monotonic()
        if now >= self._next_recovery:  # before the first report, then at most once a minute
            self._next_recovery = now + RECOVERY_PERIOD
            self.recover_partials()
        stem = f"{profile_time(metadata.end)}_{metadata.pid}"
        tmp, fd = self._write_temp(jfr, stem)
        try:
            return self._publish(tmp, stem)
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            os.close(fd)  # the lock goes last: the .partial is never free while it has a name

    def _publish(self, tmp: str, stem: str) -> str:
        for n in range(_MAX_SUFFIX):
            name = f"{stem}.jfr" if n == 0 else f"{stem}-{n}.jfr"
            final = os.path.join(self.directory, name)
            try:
                os.link(tmp, final)  # fails if the name exists: never overwrites
                return final
            except FileExistsError:
                continue
        raise ReporterError(f"LocalReporter: too many profiles named {stem}*.jfr in {self.directory}")

    def _write_temp(self, jfr: bytes, stem: str) -> Tuple[str, int]:
        """(path, locked descriptor) of a new complete ``.partial`` file."""
        for n in range(_MAX_SUFFIX):
            tmp = os.path.join(self.directory, f".{stem}.{n}.{os.getpid()}.partial")
            try:
                fd = create_locked(tmp, self.file_mode)
            except FileExistsError:
                continue
            except OSError as e:
                raise ReporterError(f"LocalReporter: cannot write to {self.directory}: {e.strerror}") from e
            try:
                view = memoryview(jfr)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except OSError as e:
                os.unlink(tmp)
                os.close(fd)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ReporterError(f"LocalReporter: no space left in {self.directory}") from e
                raise ReporterError(f"LocalReporter: writing {tmp}: {e.strerror}") from e
            return tmp, fd
        raise ReporterError(f"LocalReporter: cannot create a temporary file in {self.directory}")

    def recover_partials(self) -> Tuple[int, int]:
        """Finish or remove the ``.partial`` files killed writers left in the directory;
        returns (recovered, removed). Files being written (locked), not ours, or not
        named as this reporter names them are left alone. Runs before the first report."""
        recovered = removed = 0
        try:
            names = os.listdir(self.directory)
        except OSError:
            return 0, 0
        for name in names:
            m = _PARTIAL.match(name)
            if m is None:
                continue
            path = os.path.join(self.directory, name)
            fd = try_lock_abandoned(path)
            if fd is None:
                continue
            try:
                outcome = self._recover_one(path, fd, m.group(1), int(m.group(2)))
            except OSError as e:
                log.warning("could not recover %s, left by a process killed while reporting: %s", path, e.strerror)
                continue
            finally:
                os.close(fd)
            if outcome == "recovered":
                recovered += 1
            elif outcome == "removed":
                removed += 1
        return recovered, removed

    def _recover_one(self, path: str, fd: int, stem: str, writer: int) -> str:
        st = os.fstat(fd)
        if maybe_being_created(st.st_size, st.st_mtime, writer):
            return "skipped"
        if st.st_nlink > 1:  # killed after the profile got its name: this is a second name for it
            os.unlink(path)
            log.info("removed %s: a second name of a profile already delivered (its writer was killed)", path)
            return "removed"
        complete = _complete_jfr(fd, st.st_size)
        if complete:
            os.fchmod(fd, self.file_mode)
            final = self._publish(path, stem)
            os.unlink(path)
            log.warning("recovered %s: a complete profile (%d bytes) left by a process killed while reporting it",
                        final, st.st_size)
            return "recovered"
        os.unlink(path)
        log.warning("removed %s: an incomplete profile (%d bytes) left by a process killed while writing it; "
                    "those samples are lost", path, st.st_size)
        return "removed"


def _complete_jfr(fd: int, size: int) -> bool:
    """Whether the file holds whole JFR chunks, end to end."""
    if size < 68 or size > _MAX_RECOVER_BYTES:
        return False
    data = os.pread(fd, size, 0)
    if len(data) != size:
        return False
    from asprof.jfrio.decode import ChunkError, chunks  # only when a killed writer left a file

    try:
        end = 0
        for off, header in chunks(data):
            if header.meta_offset <= 0 or header.meta_offset >= header.size:
                return False
            end = off + header.size
        return end == size
    except ChunkError:
        return False
