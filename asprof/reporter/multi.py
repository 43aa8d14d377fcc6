"""MultiReporter: every reporter gets every profile."""
from __future__ import annotations

import time
from typing import Callable, Iterable, List, Optional, Tuple

from asprof.metadata import ReportMetadata
from asprof.reporter.base import Reporter, ReporterError


class MultiReporterError(ReporterError):
    """One or more reporters of a MultiReporter failed; ``errors`` lists them."""

    def __init__(self, errors: List[Tuple[Reporter, BaseException]]) -> None:
        self.errors = errors
        parts = "; ".join(f"{r!r}: {type(e).__name__}: {e}" for r, e in errors)
        super().__init__(f"{len(errors)} reporter(s) failed: {parts}")


class MultiReporter(Reporter):
    """Sends every profile to each of ``reporters``, in order.

    One failing reporter does not stop the others; the failures are raised
    together afterwards as a :class:`MultiReporterError`.
    """

    def __init__(self, reporters: Iterable[Reporter]) -> None:
        self.reporters = list(reporters)
        if not self.reporters:
            raise ValueError("MultiReporter needs at least one reporter")
        for r in self.reporters:
            if not isinstance(r, Reporter):
                raise TypeError(f"MultiReporter: {r!r} is not an asprof.Reporter")
        self.wants_host_metadata = any(r.wants_host_metadata for r in self.reporters)

    def __repr__(self) -> str:
        return f"MultiReporter({self.reporters!r})"

    def _each(self, call: Callable[[Reporter], None]) -> None:
        errors: List[Tuple[Reporter, BaseException]] = []
        for r in self.reporters:
            try:
                call(r)
            except Exception as e:  # noqa: BLE001 - aggregated below
                errors.append((r, e))
        if errors:
            raise MultiReporterError(errors)

    def report(self, jfr: bytes, metadata: ReportMetadata) -> None:
        self._each(lambda r: r.report(jfr, metadata))

    def report_blocking(self, jfr: bytes, metadata: ReportMetadata) -> None:
        self._each(lambda r: r.report_blocking(jfr, metadata))

    def for_child_process(self) -> "MultiReporter":
        return MultiReporter([r.for_child_process() for r in self.reporters])

    def close(self, timeout: Optional[float] = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout

        def close_one(r: Reporter) -> None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            r.close(left)

        self._each(close_one)
