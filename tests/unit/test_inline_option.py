"""``ProfilerOptions(python_frames_inline=...)`` and the engine's use of it (issue #12), without a
profiler: the option's values, and a report that cannot be rewritten reported as recorded."""
from __future__ import annotations

import logging

import pytest

from asprof.engines.asyncprofiler import NativeEngine
from asprof.jfrio.inline import SETTING, inline_python_frames
from asprof.options import ProfilerOptions

from conftest import recording_bytes


def test_the_option() -> None:
    assert ProfilerOptions().python_frames_inline is True
    assert ProfilerOptions(python_frames_inline=False).python_frames_inline is False
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="python_frames_inline"):
            ProfilerOptions(python_frames_inline=bad)  # type: ignore[arg-type]


def _engine(inline: bool) -> NativeEngine:
    """The engine's rewrite step alone (no library, no session)."""
    e = NativeEngine.__new__(NativeEngine)
    e._inline = inline
    e._inline_fn = None
    e._load_inline()
    return e


def test_reports_are_rewritten_when_on() -> None:
    data = recording_bytes("multi-chunk")
    out = _engine(True)._inline_report(data)
    import asprof.jfr as J

    assert J.open(out).setting(SETTING) == "true"
    assert out == inline_python_frames(data)


def test_reports_are_left_alone_when_off() -> None:
    data = recording_bytes("multi-chunk")
    assert _engine(False)._inline_report(data) is data


def test_a_report_that_cannot_be_rewritten_is_reported_as_recorded(caplog: pytest.LogCaptureFixture) -> None:
    data = recording_bytes("multi-chunk")
    broken = data[:-40]  # its last chunk cut short
    caplog.set_level(logging.WARNING, logger="asprof")
    assert _engine(True)._inline_report(broken) is broken
    lines = [r for r in caplog.records if r.name == "asprof"]
    assert len(lines) == 1 and "reported as recorded" in lines[0].getMessage()


def test_a_surprise_in_the_rewrite_is_one_log_line_too(caplog: pytest.LogCaptureFixture) -> None:
    e = _engine(True)

    def boom(data: bytes) -> bytes:
        raise MemoryError()

    e._inline_fn = boom
    caplog.set_level(logging.WARNING, logger="asprof")
    assert e._inline_report(b"FLR\0data") == b"FLR\0data"
    assert len([r for r in caplog.records if r.name == "asprof"]) == 1
