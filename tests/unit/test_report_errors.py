"""A failing reporter is logged without flooding (issue #13): the first error, a summary every
10 minutes while it goes on, the new error when it changes, one line when it recovers."""
from __future__ import annotations

import logging
from typing import List

import pytest

from asprof.agent.errorlog import SUMMARY_SECONDS, ReportErrorLog


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> ReportErrorLog:
    caplog.set_level(logging.DEBUG, logger="asprof.test")
    clock = Clock()
    return ReportErrorLog(logging.getLogger("asprof.test"), "Rep()", clock=clock)


def tick(log: ReportErrorLog, seconds: float = 30.0) -> None:
    log.clock.t += seconds  # type: ignore[attr-defined]


def test_the_same_error_at_every_tick_is_one_line_then_a_summary_every_10_minutes(
        log: ReportErrorLog, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(60):  # 30 minutes of 30 s ticks
        log.failed("disk full", 100)
        tick(log)
    got = lines(caplog)
    assert len(got) == 3, got  # the first, then one summary per 10 minutes
    assert got[0].startswith("Rep() failed to report a profile (100 bytes): disk full")
    assert "summarised every 10 min" in got[0]
    assert got[1].startswith("Rep() still fails to report: 20 profile(s) (2000 bytes) not reported in the last 600 s")
    assert "21 in a row" in got[1] and got[1].endswith("disk full")
    assert len(lines(caplog, logging.DEBUG)) == 60  # each failure is still there at debug level


def test_a_new_error_is_logged_when_it_changes(log: ReportErrorLog, caplog: pytest.LogCaptureFixture) -> None:
    log.failed("disk full", 1)
    tick(log)
    log.failed("disk full", 1)
    tick(log)
    log.failed("permission denied", 1)
    tick(log)
    log.failed("permission denied", 1)
    got = lines(caplog)
    assert len(got) == 2
    assert "with another error: permission denied (3 failed in a row)" in got[1]


def test_recovery_is_one_line_and_a_later_failure_is_logged_again(
        log: ReportErrorLog, caplog: pytest.LogCaptureFixture) -> None:
    log.succeeded()
    assert lines(caplog) == []  # nothing to say while all is well
    for _ in range(4):
        log.failed("disk full", 10)
        tick(log)
    log.succeeded()
    log.succeeded()
    got = lines(caplog)
    assert len(got) == 2
    assert got[1] == "Rep() reports again, after 4 failed report(s) (40 bytes) over 120 s; last error: disk full"
    log.failed("disk full", 10)
    assert lines(caplog)[-1].startswith("Rep() failed to report a profile (10 bytes): disk full")


def test_summary_period_is_the_documented_ten_minutes() -> None:
    assert SUMMARY_SECONDS == 600.0
