"""The agent loop, driven by a fake engine (the seed's tests are the model)."""
from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import List

import pytest

import asprof
from asprof.errors import ProfilerAlreadyRunningError, ProfilerError
from asprof.metadata import NoMetadata, ReportMetadata

from conftest import run_python
from fakes import Collecting, FakeEngine

pytestmark = pytest.mark.usefixtures("no_profiler")
INTERVAL = 0.1


def start(engine: FakeEngine, reporter: asprof.Reporter, **kw: object) -> asprof.RunningProfiler:
    return asprof.Profiler(reporter, reporting_interval=INTERVAL, engine=engine, **kw).start()  # type: ignore[arg-type]


def test_reports_arrive_in_order_and_stop_delivers_the_last() -> None:
    engine, reporter = FakeEngine(), Collecting()
    running = start(engine, reporter)
    reporter.wait_for(3)
    assert running.stop(timeout=5)
    assert not running.running
    payloads = reporter.payloads
    assert payloads == [f"JFR{i}".encode() for i in range(len(payloads))]
    assert len(payloads) >= 4  # three ticks and the final profile
    # consecutive profiles cover contiguous time, each as long as an interval
    metas = [m for _, m in reporter.reports]
    for a, b in zip(metas, metas[1:]):
        assert a.end == b.start
    assert all(m.reporting_interval == INTERVAL and isinstance(m.instance, NoMetadata) for m in metas)
    assert engine.closed and reporter.closed
    assert set(engine.tick_threads) == {"asprof-agent"}  # never the caller's thread


def test_agent_thread_is_a_named_daemon_and_goes_away() -> None:
    running = start(FakeEngine(), Collecting())
    threads = [t for t in threading.enumerate() if t.name == "asprof-agent"]
    assert len(threads) == 1 and threads[0].daemon
    running.stop()
    assert not any(t.name == "asprof-agent" for t in threading.enumerate())


def test_context_manager_stops() -> None:
    reporter = Collecting()
    with start(FakeEngine(), reporter) as running:
        assert running.running
    assert not running.running
    assert reporter.payloads == [b"JFR0"]


def test_dropping_the_handle_stops_with_a_final_report() -> None:
    from asprof.agent.loop import current

    reporter = Collecting()
    start(FakeEngine(), reporter)
    gc.collect()
    running_agent = current()
    assert running_agent is None or running_agent.done.wait(5)
    reporter.wait_for(1)
    assert reporter.payloads[-1].startswith(b"JFR")


def test_detached_handle_keeps_running_until_stop_profiling() -> None:
    reporter = Collecting()
    start(FakeEngine(), reporter).detach()
    gc.collect()
    reporter.wait_for(2)
    assert asprof.stop_profiling(timeout=5)
    n = len(reporter.reports)
    time.sleep(3 * INTERVAL)
    assert len(reporter.reports) == n


def test_an_exception_in_the_agent_thread_ends_cleanly_with_the_last_profile(caplog: pytest.LogCaptureFixture) -> None:
    engine, reporter = FakeEngine(tick_crash_at=2), Collecting()
    running = start(engine, reporter)
    assert running._agent.done.wait(5)
    assert "unexpected error in the agent thread" in caplog.text
    assert reporter.payloads == [b"JFR0", b"JFR1"]  # the tick before, then the final stop
    assert engine.closed and not engine.running


def test_start_error_raises_and_leaves_nothing_running() -> None:
    engine = FakeEngine(fail_start=True)
    with pytest.raises(ProfilerError, match="could not start"):
        start(engine, Collecting())
    assert engine.closed
    assert not any(t.name == "asprof-agent" for t in threading.enumerate())
    start(FakeEngine(), Collecting()).stop()  # the next one starts fine


def test_stop_error_is_logged_and_the_last_profile_reported_lost(caplog: pytest.LogCaptureFixture) -> None:
    reporter = Collecting()
    running = start(FakeEngine(fail_stop=True), reporter)
    assert running.stop(timeout=5)
    assert "the last profile is lost" in caplog.text
    assert reporter.payloads == []


def test_engine_error_in_a_tick_stops_the_agent(caplog: pytest.LogCaptureFixture) -> None:
    engine, reporter = FakeEngine(tick_error_at=2), Collecting()
    running = start(engine, reporter)
    assert running._agent.done.wait(5)
    assert not running.running
    assert "could not stop" in caplog.text and "profiling stops" in caplog.text
    assert reporter.payloads[0] == b"JFR0"


def test_failed_restart_still_reports_the_finished_profile(caplog: pytest.LogCaptureFixture) -> None:
    engine, reporter = FakeEngine(restart_error_at=1), Collecting()
    running = start(engine, reporter)
    assert running._agent.done.wait(5)
    assert reporter.payloads == [b"JFR0"]
    assert "could not restart" in caplog.text


def test_reporter_errors_do_not_stop_profiling(caplog: pytest.LogCaptureFixture) -> None:
    reporter = Collecting(fail_first=2)
    running = start(FakeEngine(), reporter)
    reporter.wait_for(2)
    running.stop()
    # issue #13: the same error twice is one ERROR line, then one line when reports go through again
    errors = [r.getMessage() for r in caplog.records if r.levelno >= 40 and "report" in r.getMessage()]
    assert len(errors) == 1 and "disk full" in errors[0], errors
    assert "reports again, after 2 failed report(s)" in caplog.text
    assert reporter.payloads[:2] == [b"JFR2", b"JFR3"]


def test_a_second_profiler_is_refused_and_a_new_one_may_follow_stop() -> None:
    first = start(FakeEngine(), Collecting())
    with pytest.raises(ProfilerAlreadyRunningError, match="already running"):
        start(FakeEngine(), Collecting())
    first.stop()
    reporter = Collecting()
    second = asprof.Profiler(reporter, reporting_interval=0.2, engine=FakeEngine(),
                             options=asprof.ProfilerOptions(cpu_interval=0.01)).start()
    second.stop()
    assert reporter.payloads == [b"JFR0"]


def test_stop_is_bounded_by_its_timeout_when_the_reporter_hangs() -> None:
    reporter = Collecting(delay=1.5)
    running = start(FakeEngine(), reporter)
    t = time.monotonic()
    assert running.stop(timeout=0.2) is False
    assert time.monotonic() - t < 1.0
    assert running._agent.done.wait(10)  # it finishes in the background
    assert reporter.payloads


def test_custom_metadata_is_passed_and_detection_is_lazy() -> None:
    md = asprof.Ec2Metadata("123456789012", "eu-west-1", "i-0abc", "m5.large", extra={"service": "api"})
    reporter = Collecting()
    reporter.wants_host_metadata = True
    with start(FakeEngine(), reporter, agent_metadata=md):
        pass
    (jfr, meta), = reporter.reports
    assert meta.instance is md and meta.instance.machine == "ec2_i-0abc_"
    import os

    assert meta.pid == os.getpid()


def test_stop_from_inside_a_reporter_does_not_deadlock() -> None:
    holder: List[asprof.RunningProfiler] = []

    class Stopper(Collecting):
        def report(self, jfr: bytes, metadata: ReportMetadata) -> None:
            super().report(jfr, metadata)
            holder[0].stop()

    reporter = Stopper()
    holder.append(start(FakeEngine(), reporter))
    assert holder[0]._agent.done.wait(5)
    assert reporter.payloads == [b"JFR0", b"JFR1"]


EXIT_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
sys.path.insert(0, {tests!r})
import asprof
from fakes import FakeEngine
reporter = {reporter}
asprof.Profiler(reporter, reporting_interval=60, engine=FakeEngine()).start().detach()
print("started", flush=True)
"""


def test_final_report_at_interpreter_exit(tmp_path: Path) -> None:
    tests = str(Path(__file__).resolve().parents[1])
    out = tmp_path / "profiles"
    r = run_python(EXIT_SCRIPT.format(tests=tests, reporter=f"asprof.LocalReporter({str(out)!r})"), timeout=30)
    assert r.returncode == 0, r.stderr
    files = list(out.glob("*.jfr"))
    assert len(files) == 1 and files[0].read_bytes() == b"JFR0"
    assert "Traceback" not in r.stderr


def test_reporter_without_blocking_report_says_the_last_profile_is_lost(tmp_path: Path) -> None:
    tests = str(Path(__file__).resolve().parents[1])
    reporter = ("type('Async', (asprof.Reporter,), {'wants_host_metadata': False, "
                "'report': lambda self, jfr, md: None})()")
    r = run_python(EXIT_SCRIPT.format(tests=tests, reporter=reporter), timeout=30)
    assert r.returncode == 0, r.stderr
    assert "the last profile" in r.stderr and "is lost" in r.stderr
