"""The Reporter interface."""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Optional

from asprof.errors import AsprofError

if TYPE_CHECKING:
    from asprof.metadata import ReportMetadata


class ReporterError(AsprofError):
    """A reporter could not deliver a profile."""


class Reporter(abc.ABC):
    """Receives every finished profile.

    ``report`` runs on the agent's thread, never on an application thread.
    It should hand slow work (network uploads) to its own thread so the next
    tick is not delayed; raising an exception logs it and profiling goes on.

    ``report_blocking`` is used for the last profile when the interpreter is
    exiting: it must finish synchronously and promptly. The default raises
    ``NotImplementedError`` and the agent logs that the last profile is lost.

    ``wants_host_metadata``: when no metadata was given, the agent detects
    the host (AWS) lazily before the first report only if this is True.

    ``close`` is called once when the profiler stops, after the last report:
    flush what is pending within ``timeout`` seconds (None: the reporter's
    own bound) and release resources.
    """

    wants_host_metadata: bool = True

    @abc.abstractmethod
    def report(self, jfr: bytes, metadata: ReportMetadata) -> None:
        """Deliver one finished JFR recording."""

    def report_blocking(self, jfr: bytes, metadata: ReportMetadata) -> None:
        """Deliver the last recording synchronously (at interpreter exit)."""
        raise NotImplementedError(f"{type(self).__name__} cannot report synchronously")

    def close(self, timeout: Optional[float] = None) -> None:  # noqa: B027 - a no-op unless overridden
        """Flush pending work (bounded by ``timeout`` seconds) and release resources."""

    def for_child_process(self) -> "Reporter":
        """The reporter a forked child process uses (it profiles itself).

        The default, this same object, suits reporters without threads or
        connections. Reporters with background threads must return a fresh
        reporter: threads do not survive fork().
        """
        return self
