"""Fakes shared by the tests: an engine that produces b"JFR0", b"JFR1"... and a reporter that collects."""
from __future__ import annotations

import threading
import time
from typing import List, Optional, Tuple

import asprof
from asprof.engines.base import Engine, TickResult
from asprof.errors import ProfilerError
from asprof.metadata import ReportMetadata


class FakeEngine(Engine):
    """Produces recordings b"JFR0", b"JFR1", ... one per start."""

    def __init__(self, *, fail_start: bool = False, tick_error_at: Optional[int] = None,
                 tick_crash_at: Optional[int] = None, restart_error_at: Optional[int] = None,
                 fail_stop: bool = False, tick_delay: float = 0.0) -> None:
        self.count = 0
        self.running = False
        self.closed = False
        self.ticks = 0
        self.tick_threads: List[str] = []
        self.fail_start = fail_start
        self.tick_error_at = tick_error_at
        self.tick_crash_at = tick_crash_at
        self.restart_error_at = restart_error_at
        self.fail_stop = fail_stop
        self.tick_delay = tick_delay

    def start(self) -> None:
        if self.fail_start:
            raise ProfilerError("async-profiler could not start: no perf events")
        self.running = True

    def _finish(self) -> bytes:
        data = f"JFR{self.count}".encode()
        self.count += 1
        return data

    def tick(self) -> TickResult:
        self.ticks += 1
        self.tick_threads.append(threading.current_thread().name)
        time.sleep(self.tick_delay)
        if self.ticks == self.tick_error_at:
            raise ProfilerError("async-profiler could not stop: Profiler is not active")
        if self.ticks == self.tick_crash_at:
            raise RuntimeError("bug in the tick")
        data = self._finish()
        if self.ticks == self.restart_error_at:
            self.running = False
            return TickResult(data, ProfilerError("async-profiler could not restart: boom"))
        return TickResult(data)

    def stop(self) -> Optional[bytes]:
        if not self.running:
            return None
        if self.fail_stop:
            raise ProfilerError("async-profiler could not stop: stuck")
        self.running = False
        return self._finish()

    def close(self) -> None:
        self.closed = True


class Collecting(asprof.Reporter):
    wants_host_metadata = False

    def __init__(self, fail_first: int = 0, delay: float = 0.0) -> None:
        self.reports: List[Tuple[bytes, ReportMetadata]] = []
        self.blocking: List[bytes] = []
        self.fail_first = fail_first
        self.delay = delay
        self.closed = False
        self.cond = threading.Condition()

    def report(self, jfr: bytes, metadata: ReportMetadata) -> None:
        time.sleep(self.delay)
        with self.cond:
            if self.fail_first > 0:
                self.fail_first -= 1
                raise OSError("disk full")
            self.reports.append((jfr, metadata))
            self.cond.notify_all()

    def report_blocking(self, jfr: bytes, metadata: ReportMetadata) -> None:
        self.blocking.append(jfr)
        self.report(jfr, metadata)

    def close(self, timeout: Optional[float] = None) -> None:
        self.closed = True

    def wait_for(self, n: int, timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.reports) >= n, timeout), self.reports

    @property
    def payloads(self) -> List[bytes]:
        return [r[0] for r in self.reports]
