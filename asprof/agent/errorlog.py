"""Repeated reporter failures, logged without flooding: the first one, a summary every
``SUMMARY_SECONDS`` while the same error goes on, the new one when it changes, and one line
when reports go through again (issue #13)."""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

__all__ = ["ReportErrorLog", "SUMMARY_SECONDS"]

SUMMARY_SECONDS = 600.0


class ReportErrorLog:
    """The failing streak of one reporter (used on the agent thread only)."""

    def __init__(self, logger: logging.Logger, what: str, clock: Callable[[], float] = time.monotonic,
                 summary_seconds: float = SUMMARY_SECONDS) -> None:
        self.logger = logger
        self.what = what
        self.clock = clock
        self.summary_seconds = summary_seconds
        self.error: Optional[str] = None  # the error of the current streak
        self.failures = 0  # in the current streak
        self.lost_bytes = 0
        self.since = 0.0  # when the streak began
        self.unsummarised = 0  # failures since the last line logged
        self.unsummarised_bytes = 0
        self.last_line = 0.0

    def failed(self, error: str, size: int) -> None:
        now = self.clock()
        if self.error is None:
            self.since = now
            self.failures = 0
            self.lost_bytes = 0
        self.failures += 1
        self.lost_bytes += size
        if error != self.error:
            previous = self.error
            self.error = error
            self.last_line = now
            self.unsummarised = self.unsummarised_bytes = 0
            if previous is None:
                self.logger.error("%s failed to report a profile (%d bytes): %s (the same error again is summarised "
                                  "every %d min)", self.what, size, error, round(self.summary_seconds / 60))
            else:
                self.logger.error("%s failed to report a profile (%d bytes), with another error: %s (%d failed in "
                                  "a row)", self.what, size, error, self.failures)
            return
        self.unsummarised += 1
        self.unsummarised_bytes += size
        if now - self.last_line >= self.summary_seconds:
            self.logger.error("%s still fails to report: %d profile(s) (%d bytes) not reported in the last %.0f s, "
                              "%d in a row since the failures began: %s", self.what, self.unsummarised,
                              self.unsummarised_bytes, now - self.last_line, self.failures, error)
            self.last_line = now
            self.unsummarised = self.unsummarised_bytes = 0
        else:
            self.logger.debug("%s failed to report a profile (%d bytes): %s", self.what, size, error)

    def succeeded(self) -> None:
        if self.error is None:
            return
        self.logger.warning("%s reports again, after %d failed report(s) (%d bytes) over %.0f s; last error: %s",
                            self.what, self.failures, self.lost_bytes, self.clock() - self.since, self.error)
        self.error = None
        self.failures = self.lost_bytes = self.unsummarised = self.unsummarised_bytes = 0
