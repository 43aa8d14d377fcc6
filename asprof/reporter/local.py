"""LocalReporter: one JFR file per profile in a directory."""
from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Union

from asprof.reporter.base import Reporter, ReporterError

if TYPE_CHECKING:
    from datetime import datetime

    from asprof.metadata import ReportMetadata

_MAX_SUFFIX = 1000


def profile_time(t: datetime) -> str:
    """UTC time to the second with ':' as '-', as the Rust agent names files."""
    from datetime import timezone  # on the reporting thread: importing asprof stays cheap

    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")


class LocalReporter(Reporter):
    """Writes each profile to ``{directory}/{YYYY-MM-DDTHH-MM-SSZ}_{pid}.jfr``.

    The time is the end of the recording, in UTC. The process id keeps
    processes sharing a directory apart; an existing file is never
    overwritten (a ``-N`` suffix is added instead). Files appear atomically:
    a reader never sees a partly written profile. The directory is created if
    missing; an unusable directory is an error when the reporter is made.
    """

    wants_host_metadata = False

    def __init__(self, directory: Union[str, "os.PathLike[str]"] = "profiles") -> None:
        path = os.path.abspath(os.fspath(directory))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"LocalReporter: {path!r} is not a directory")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ValueError(f"LocalReporter: cannot create directory {path!r}: {e.strerror}") from e
        if not os.path.isdir(path):
            raise ValueError(f"LocalReporter: {path!r} is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"LocalReporter: directory {path!r} is not writable by this process")
        self.directory = path

    def __repr__(self) -> str:
        return f"LocalReporter({self.directory!r})"

    def report(self, jfr: bytes, metadata: ReportMetadata) -> None:
        self.write(jfr, metadata)

    def report_blocking(self, jfr: bytes, metadata: ReportMetadata) -> None:
        self.write(jfr, metadata)

    def write(self, jfr: bytes, metadata: ReportMetadata) -> str:
        """Write one profile and return its path."""
        stem = f"{profile_time(metadata.end)}_{metadata.pid}"
        tmp = self._write_temp(jfr, stem)
        try:
            for n in range(_MAX_SUFFIX):
                name = f"{stem}.jfr" if n == 0 else f"{stem}-{n}.jfr"
                final = os.path.join(self.directory, name)
                try:
                    os.link(tmp, final)  # fails if the name exists: never overwrites
                    return final
                except FileExistsError:
                    continue
            raise ReporterError(f"LocalReporter: too many profiles named {stem}*.jfr in {self.directory}")
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _write_temp(self, jfr: bytes, stem: str) -> str:
        for n in range(_MAX_SUFFIX):
            tmp = os.path.join(self.directory, f".{stem}.{n}.partial")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
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
                os.close(fd)
                os.unlink(tmp)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ReporterError(f"LocalReporter: no space left in {self.directory}") from e
                raise ReporterError(f"LocalReporter: writing {tmp}: {e.strerror}") from e
            os.close(fd)
            return tmp
        raise ReporterError(f"LocalReporter: cannot create a temporary file in {self.directory}")


