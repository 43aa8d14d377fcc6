"""The agent loop: a background thread that rotates and reports profiles.

``Profiler(...).start()`` starts async-profiler and an ``asprof-agent``
daemon thread. Every ``reporting_interval`` the thread rotates the recording
(stop → swap → start, in C without the GIL) and hands the finished JFR to the
reporter. Application threads never wait for a tick. ``stop()`` makes a final
tick, waits (bounded) for the last report and returns; a new profiler may
then start, with other options.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
from types import TracebackType
from typing import Optional, Type, Union

from asprof.engine import Engine, NativeEngine
from asprof.errors import ProfilerAlreadyRunningError, ProfilerError
from asprof.metadata import AgentMetadata, NoMetadata, ReportMetadata
from asprof.options import ProfilerOptions
from asprof.reporter.base import Reporter
from asprof.reporter.local import LocalReporter

__all__ = ["Profiler", "RunningProfiler", "start_profiling", "stop_profiling"]

logger = logging.getLogger("asprof")

DEFAULT_REPORTING_INTERVAL = 30.0
DEFAULT_STOP_TIMEOUT = 30.0
EXIT_TIMEOUT = 10.0
MIN_REPORTING_INTERVAL = 0.1

_state_lock = threading.Lock()
_active: Optional["_Agent"] = None  # async-profiler is process-global: one at a time
_default: Optional["RunningProfiler"] = None  # the handle of start_profiling()


def _positive(name: str, value: object, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    v = float(value)
    if math.isnan(v) or math.isinf(v) or v < minimum:
        raise ValueError(f"{name} must be a finite number of seconds ≥ {minimum}, got {value!r}")
    return v


class _Agent:
    """State shared by the handle and the agent thread (no reference to the handle)."""

    def __init__(self, engine: Engine, reporter: Reporter, interval: float,
                 metadata: Optional[AgentMetadata]) -> None:
        self.engine = engine
        self.reporter = reporter
        self.interval = interval
        self.metadata = metadata
        self.pid = os.getpid()
        self.cond = threading.Condition()
        self.stop_requested = False
        self.at_exit = False
        self.done = threading.Event()
        self.recording_since = ReportMetadata.now()
        self.thread = threading.Thread(target=self._run, name="asprof-agent", daemon=True)

    # ---- control, from any thread ----
    def request_stop(self, at_exit: bool = False) -> None:
        with self.cond:
            self.stop_requested = True
            self.at_exit = self.at_exit or at_exit
            self.cond.notify_all()

    def wait(self, timeout: Optional[float]) -> bool:
        if threading.current_thread() is self.thread:
            return False  # stop() called from a reporter: the loop ends after this report
        return self.done.wait(timeout)

    # ---- the agent thread ----
    def _run(self) -> None:
        try:
            _name_os_thread("asprof-agent")
            deadline = time.monotonic() + self.interval
            while True:
                with self.cond:
                    while not self.stop_requested:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self.cond.wait(left)
                    if self.stop_requested:
                        break
                if not self._tick():
                    return  # engine failure: nothing is recording any more
                now = time.monotonic()
                deadline += self.interval
                if deadline <= now:  # a slow tick or report: skip missed ticks
                    deadline = now + self.interval
        except BaseException:  # noqa: BLE001 - the agent must never die silently
            logger.exception("unexpected error in the agent thread; stopping profiling")
        finally:
            try:
                self._final()
            finally:
                self._release()

    def _tick(self) -> bool:
        """One rotation; returns False when profiling cannot go on."""
        since = self.recording_since
        try:
            result = self.engine.tick()
        except ProfilerError as e:
            logger.error("%s; profiling stops", e)
            return False
        end = ReportMetadata.now()
        self.recording_since = end
        if result.recording:
            self._report(result.recording, since, end, blocking=False)
        if result.restart_error is not None:
            logger.error("%s; profiling stops (the last profile was reported)", result.restart_error)
            return False
        return True

    def _final(self) -> None:
        try:
            recording = self.engine.stop()
        except ProfilerError as e:
            logger.error("%s; the last profile is lost", e)
            return
        except Exception:  # noqa: BLE001
            logger.exception("stopping async-profiler failed; the last profile is lost")
            return
        if recording:
            self._report(recording, self.recording_since, ReportMetadata.now(), blocking=self.at_exit)

    def _release(self) -> None:
        global _active
        try:
            self.engine.close()
        except Exception:  # noqa: BLE001
            logger.exception("releasing the engine failed")
        try:
            self.reporter.close(EXIT_TIMEOUT if self.at_exit else DEFAULT_STOP_TIMEOUT)
        except Exception as e:  # noqa: BLE001
            logger.error("closing %r failed: %s", self.reporter, e)
        with _state_lock:
            if _active is self:
                _active = None
        self.done.set()
        logger.info("profiling stopped")

    def _instance(self) -> AgentMetadata:
        if self.metadata is None:
            # Loaded lazily on the first report, in this thread: start-up never waits for it.
            md: AgentMetadata = NoMetadata()
            if getattr(self.reporter, "wants_host_metadata", True):
                try:
                    from asprof.aws import detect_agent_metadata

                    md = detect_agent_metadata()
                except ImportError:
                    pass
                except Exception as e:  # noqa: BLE001 - never stop profiling for metadata
                    logger.warning("host metadata detection failed (%s); using NoMetadata", e)
            self.metadata = md
        return self.metadata

    def _report(self, jfr: bytes, start: object, end: object, blocking: bool) -> None:
        md = ReportMetadata(self._instance(), start, end, self.interval)  # type: ignore[arg-type]
        try:
            if blocking:
                self.reporter.report_blocking(jfr, md)
            else:
                self.reporter.report(jfr, md)
        except NotImplementedError:
            logger.warning("%r cannot report while the interpreter exits: the last profile "
                           "(%d bytes) is lost; call stop() before exiting to deliver it", self.reporter, len(jfr))
        except Exception as e:  # noqa: BLE001 - reporter errors never stop profiling
            logger.error("%r failed to report a profile (%d bytes): %s", self.reporter, len(jfr), e)


def _name_os_thread(name: str) -> None:
    try:
        from asprof._native import set_thread_name

        set_thread_name(name)
    except ImportError:  # a pure-Python engine in tests
        pass


class RunningProfiler:
    """Handle of a running profiler.

    ``stop()`` ends profiling after a final report. Use it as a context
    manager to stop on exit. Dropping the handle also stops the profiler
    (asynchronously, with a final report) unless ``detach()`` was called.
    """

    def __init__(self, agent: _Agent) -> None:
        self._agent = agent
        self._detached = False

    def __repr__(self) -> str:
        return f"<RunningProfiler {'running' if self.running else 'stopped'} pid={self._agent.pid}>"

    @property
    def running(self) -> bool:
        """True until the agent thread has finished (after stop() or an engine failure)."""
        return not self._agent.done.is_set() and self._agent.pid == os.getpid()

    def stop(self, timeout: Optional[float] = DEFAULT_STOP_TIMEOUT) -> bool:
        """Stops profiling: a final tick, then the last report.

        Waits up to ``timeout`` seconds (None: no limit) for the last report and
        returns True when everything finished in time. Calling it again is harmless.
        """
        if self._agent.pid != os.getpid():
            logger.info("stop() in a forked child: the profiler belongs to the parent process")
            return True
        self._agent.request_stop()
        finished = self._agent.wait(timeout)
        if not finished and threading.current_thread() is not self._agent.thread:
            logger.warning("the last report did not finish within %s s; it goes on in the background", timeout)
        return finished

    def detach(self) -> None:
        """Keep profiling after this handle is dropped (until stop_profiling() or exit)."""
        self._detached = True

    def __enter__(self) -> "RunningProfiler":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.stop()

    def __del__(self) -> None:
        agent = getattr(self, "_agent", None)
        if agent is not None and not self._detached and not agent.done.is_set() and agent.pid == os.getpid():
            agent.request_stop()  # never blocks: the agent thread does the final report


class Profiler:
    """A profiler configuration; ``start()`` runs it.

    - ``reporter``: where profiles go (default: ``LocalReporter("profiles")``).
    - ``reporting_interval``: seconds between profiles (default 30).
    - ``options``: what async-profiler samples (:class:`ProfilerOptions`).
    - ``agent_metadata``: host metadata for the reports; None detects it
      lazily on the first report (AWS) when the reporter uses it.
    - ``library_path``: an explicit ``libasyncProfiler.so``.
    """

    def __init__(
        self,
        reporter: Optional[Reporter] = None,
        *,
        reporting_interval: float = DEFAULT_REPORTING_INTERVAL,
        options: Optional[ProfilerOptions] = None,
        agent_metadata: Optional[AgentMetadata] = None,
        library_path: Optional[Union[str, "os.PathLike[str]"]] = None,
        engine: Optional[Engine] = None,
    ) -> None:
        if reporter is not None and not isinstance(reporter, Reporter):
            raise TypeError(f"reporter must be an asprof.Reporter, got {reporter!r}")
        if options is not None and not isinstance(options, ProfilerOptions):
            raise TypeError(f"options must be asprof.ProfilerOptions, got {options!r}")
        if agent_metadata is not None and not isinstance(agent_metadata, AgentMetadata):
            raise TypeError(f"agent_metadata must be an asprof.AgentMetadata, got {agent_metadata!r}")
        self.reporting_interval = _positive("reporting_interval", reporting_interval, MIN_REPORTING_INTERVAL)
        self.reporter = reporter
        self.options = options if options is not None else ProfilerOptions()
        self.agent_metadata = agent_metadata
        self.library_path = None if library_path is None else os.fspath(library_path)
        self._engine = engine

    def start(self) -> RunningProfiler:
        """Starts async-profiler and the agent thread.

        Raises :class:`~asprof.errors.LibraryNotFoundError`, :class:`ProfilerError`
        (async-profiler refused to start) or :class:`ProfilerAlreadyRunningError`.
        """
        global _active
        _install_hooks()
        with _state_lock:
            if _active is not None and _active.pid == os.getpid() and not _active.done.is_set():
                raise ProfilerAlreadyRunningError(
                    "a profiler is already running in this process (async-profiler is process-global); "
                    "stop it first"
                )
            reporter = self.reporter if self.reporter is not None else LocalReporter("profiles")
            engine = self._engine if self._engine is not None else NativeEngine(self.options, self.library_path)
            try:
                engine.start()
            except BaseException:
                engine.close()
                raise
            agent = _Agent(engine, reporter, self.reporting_interval, self.agent_metadata)
            _active = agent
            try:
                agent.thread.start()
            except BaseException:
                _active = None
                engine.stop()
                engine.close()
                raise
        logger.info("profiling started, a profile every %g s to %r", self.reporting_interval, reporter)
        return RunningProfiler(agent)


def start_profiling(
    reporter: Optional[Reporter] = None,
    *,
    reporting_interval: float = DEFAULT_REPORTING_INTERVAL,
    options: Optional[ProfilerOptions] = None,
    agent_metadata: Optional[AgentMetadata] = None,
    library_path: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> RunningProfiler:
    """Starts profiling the whole process until :func:`stop_profiling` or exit.

    Profiles go to ``reporter`` (default: JFR files in ``./profiles``) every
    ``reporting_interval`` seconds. At interpreter exit the last profile is
    reported. Raises like :meth:`Profiler.start`.
    """
    global _default
    handle = Profiler(
        reporter,
        reporting_interval=reporting_interval,
        options=options,
        agent_metadata=agent_metadata,
        library_path=library_path,
    ).start()
    handle.detach()
    _default = handle
    return handle


def stop_profiling(timeout: Optional[float] = DEFAULT_STOP_TIMEOUT) -> bool:
    """Stops the profiler started by :func:`start_profiling` (or any running one).

    Returns True when the last report finished within ``timeout``; True too
    when nothing was running.
    """
    global _default
    with _state_lock:
        agent = _active
    _default = None
    if agent is None or agent.pid != os.getpid():
        return True
    return RunningProfiler(agent).stop(timeout) if not agent.done.is_set() else True


_hooks_installed = False


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_at_exit)
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)


def _at_exit() -> None:
    """Final blocking report at interpreter exit, bounded in time."""
    with _state_lock:
        agent = _active
    if agent is None or agent.pid != os.getpid() or agent.done.is_set():
        return
    agent.request_stop(at_exit=True)
    if not agent.done.wait(EXIT_TIMEOUT):
        logger.warning("the last profile was not reported within %s s of exit", EXIT_TIMEOUT)


def _after_fork_in_child() -> None:
    # The agent thread does not exist in the child, and the parent's recording
    # files are guarded by the native core. The child starts with no profiler.
    global _active, _default
    _active = None
    _default = None
    _state_lock_reinit()


def _state_lock_reinit() -> None:
    global _state_lock
    _state_lock = threading.Lock()


