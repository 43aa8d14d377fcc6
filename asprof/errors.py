"""Exceptions raised by asprof: one tree rooted at :class:`AsprofError`.

``except asprof.AsprofError`` catches every error asprof raises on purpose::

    AsprofError
    ├── LibraryNotFoundError (also OSError)      async-profiler not found
    ├── UnsupportedVersionError                  async-profiler too old
    ├── ProfilerError                            async-profiler refused a command
    ├── ProfilerAlreadyRunningError              one profiler per process
    ├── ConfigError (also ValueError)            asprof.autostart.config: a bad ASPROF_* value
    ├── ReporterError                            asprof.reporter.base (MultiReporterError below it)
    ├── MetadataUnavailable                      asprof.metadata.aws: no instance metadata here
    ├── ChunkError (also ValueError)             asprof.engines.settings_chunk: an unexpected chunk
    ├── JfrError (also ValueError)               asprof.jfr.errors: a malformed recording
    └── CliError                                 asprof.cli: a user-facing command error

The subclasses live beside the code that raises them; this module imports nothing of asprof.
"""
from __future__ import annotations

from typing import Sequence, Tuple


class AsprofError(Exception):
    """Base class of asprof's errors."""


class LibraryNotFoundError(AsprofError, OSError):
    """libasyncProfiler.so could not be loaded.

    ``tried`` lists each place looked at with what happened there.
    """

    def __init__(self, tried: Sequence[Tuple[str, str]]) -> None:
        self.tried = list(tried)
        lines = "\n".join(f"  - {where}: {what}" for where, what in self.tried)
        super().__init__(
            "could not load async-profiler (libasyncProfiler.so). Tried:\n"
            f"{lines}\n"
            "Install async-profiler 3.0 or later (https://github.com/async-profiler/async-profiler/releases: "
            "unpack it and put lib/libasyncProfiler.so on the linker's path, e.g. /usr/local/lib, then run "
            "ldconfig), or point ASPROF_LIB or Profiler(library_path=...) at the file."
        )


class UnsupportedVersionError(AsprofError):
    """The async-profiler found is too old for this agent."""


class ProfilerError(AsprofError):
    """async-profiler refused a command or failed; the message is its own."""


class ProfilerAlreadyRunningError(AsprofError):
    """A profiler is already running in this process (async-profiler is process-global)."""
