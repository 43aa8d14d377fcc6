"""The agent loop: a background thread that rotates and reports profiles.

``Profiler(...).start()`` starts async-profiler and an ``asprof-agent``
daemon thread. Every ``reporting_interval`` the thread rotates the recording
(stop → swap → start, in C without the GIL) and hands the finished JFR to the
reporter. Application threads never wait for a tick. ``stop()`` makes a final
tick, waits (bounded) for the last report and returns; a new profiler may
then start, with other options.

Process life-cycle:
- interpreter exit: the last profile is reported synchronously, bounded;
- SIGTERM with no handler of the application's: the last profile is reported,
  then the process dies of SIGTERM as it would have;
- ``os.fork()``: async-profiler is paused around the fork (the parent resumes
  on the same file); the child starts its own agent, with its own files and
  pid, when it can safely do so, and says so in one log line when not.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from datetime import datetime
from types import FrameType, TracebackType
from typing import Any, Callable, Dict, Mapping, Optional, Type, Union

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
_FALSE = {"0", "false", "no", "off", "disabled"}
_OWN_THREADS = ("asprof-agent", "async-profiler", "asprof-pyframes")

_state_lock = threading.Lock()
_active: Optional["_Agent"] = None  # async-profiler is process-global: one at a time
_default: Optional["RunningProfiler"] = None  # the handle of start_profiling()


def _positive(name: str, value: object, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or math.isinf(v) or v < minimum:
        raise ValueError(f"{name} must be a finite number ≥ {minimum}, got {value!r}")
    return v


def disabled_by_environment() -> Optional[str]:
    """The ASPROF_ENABLED value that turns profiling off, or None."""
    value = os.environ.get("ASPROF_ENABLED")
    if value is not None and value.strip().lower() in _FALSE:
        return value
    return None


def _name_os_thread(name: str) -> None:
    try:
        from asprof._native import set_thread_name

        set_thread_name(name)
    except ImportError:  # a pure-Python engine in tests
        pass


def _own_cpu_seconds() -> float:
    """CPU time of the agent's and async-profiler's threads, from /proc/self/task."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() not in _OWN_THREADS:
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class _Config:
    """What the agent needs to run, and to start again in a forked child."""

    reporter: Reporter
    interval: float
    metadata: Optional[AgentMetadata]
    extra_metadata: Mapping[str, str]
    kill_switch_file: Optional[str]
    max_cpu_percent: Optional[float]
    max_memory_mb: Optional[float]
    engine_factory: Callable[[], Engine]


class _Agent:
    """State shared by the handle and the agent thread (no reference to the handle)."""

    def __init__(self, engine: Engine, config: _Config) -> None:
        self.engine = engine
        self.config = config
        self.reporter = config.reporter
        self.interval = config.interval
        self.metadata = config.metadata
        self.pid = os.getpid()
        self.cond = threading.Condition()
        self.stop_requested = False
        self.at_exit = False
        self.done = threading.Event()
        self.recording_since = ReportMetadata.now()
        self.fork_ok = False
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
            cpu_mark = (_own_cpu_seconds(), time.monotonic()) if self.config.max_cpu_percent else None
            while True:
                with self.cond:
                    while not self.stop_requested:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self.cond.wait(left)
                    if self.stop_requested:
                        break
                if self._kill_switch():
                    break
                if not self._tick():
                    return  # engine failure: nothing is recording any more
                cpu_mark = self._guard(cpu_mark)
                if cpu_mark is False:
                    break
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

    def _kill_switch(self) -> bool:
        path = self.config.kill_switch_file
        if path and os.path.exists(path):
            logger.warning("kill switch file %s exists: profiling stops", path)
            return True
        return False

    def _guard(self, mark: Any) -> Any:
        """Stops profiling when the agent's own CPU or memory passes its limit."""
        cfg = self.config
        if cfg.max_memory_mb is not None:
            used = self.engine.memory_bytes()
            if used is not None and used > cfg.max_memory_mb * 1024 * 1024:
                logger.error("overhead guard: the profiler holds %.1f MB, over the %.1f MB limit; profiling stops",
                             used / 1048576, cfg.max_memory_mb)
                return False
        if mark and cfg.max_cpu_percent is not None:
            cpu, now = _own_cpu_seconds(), time.monotonic()
            elapsed = now - mark[1]
            if elapsed > 0:
                percent = 100.0 * (cpu - mark[0]) / elapsed
                if percent > cfg.max_cpu_percent:
                    logger.error("overhead guard: the profiler used %.2f%% of a CPU over the last %.1f s, over "
                                 "the %.2f%% limit; profiling stops", percent, elapsed, cfg.max_cpu_percent)
                    return False
            return (cpu, now)
        return mark

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
            extra = self.config.extra_metadata
            if extra:
                try:
                    md = dataclasses.replace(md, extra={**getattr(md, "extra", {}), **extra})  # type: ignore[type-var]
                except TypeError:
                    logger.warning("%s is not a dataclass: extra metadata %s not added", type(md).__name__,
                                   sorted(extra))
            self.metadata = md
        return self.metadata

    def _report(self, jfr: bytes, start: datetime, end: datetime, blocking: bool) -> None:
        md = ReportMetadata(self._instance(), start, end, self.interval)
        try:
            if blocking:
                self.reporter.report_blocking(jfr, md)
            else:
                self.reporter.report(jfr, md)
        except NotImplementedError:
            logger.warning("%r cannot report while the interpreter exits: the last profile (%d bytes) is lost; "
                           "call stop() before exiting to deliver it", self.reporter, len(jfr))
        except Exception as e:  # noqa: BLE001 - reporter errors never stop profiling
            logger.error("%r failed to report a profile (%d bytes): %s", self.reporter, len(jfr), e)


class RunningProfiler:
    """Handle of a running profiler.

    ``stop()`` ends profiling after a final report. Use it as a context
    manager to stop on exit. Dropping the handle also stops the profiler
    (asynchronously, with a final report) unless ``detach()`` was called.
    A handle returned while profiling is disabled is never running.
    """

    def __init__(self, agent: Optional[_Agent]) -> None:
        self._agent = agent
        self._detached = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RunningProfiler {state} pid={os.getpid() if self._agent is None else self._agent.pid}>"

    @property
    def running(self) -> bool:
        """True until the agent thread has finished (after stop() or an engine failure)."""
        a = self._agent
        return a is not None and not a.done.is_set() and a.pid == os.getpid()

    def stop(self, timeout: Optional[float] = DEFAULT_STOP_TIMEOUT) -> bool:
        """Stops profiling: a final tick, then the last report.

        Waits up to ``timeout`` seconds (None: no limit) for the last report and
        returns True when everything finished in time. Calling it again is harmless.
        """
        a = self._agent
        if a is None:
            return True
        if a.pid != os.getpid():
            logger.info("stop() in a forked child: that profiler belongs to the parent process")
            return True
        a.request_stop()
        finished = a.wait(timeout)
        if not finished and threading.current_thread() is not a.thread:
            logger.warning("the last report did not finish within %s s; it goes on in the background", timeout)
        _restore_sigterm()
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
    - ``extra_metadata``: string pairs (service, version, environment, tags)
      added to the metadata's ``extra``.
    - ``library_path``: an explicit ``libasyncProfiler.so``.
    - ``kill_switch_file``: when this file exists, profiling stops at the next tick.
    - ``max_cpu_percent``: stop when the agent's and async-profiler's threads use
      more than this share of one CPU over a reporting interval.
    - ``max_memory_mb``: stop when async-profiler's buffers and the recording pass this.
    """

    def __init__(
        self,
        reporter: Optional[Reporter] = None,
        *,
        reporting_interval: float = DEFAULT_REPORTING_INTERVAL,
        options: Optional[ProfilerOptions] = None,
        agent_metadata: Optional[AgentMetadata] = None,
        extra_metadata: Optional[Mapping[str, str]] = None,
        library_path: Optional[Union[str, "os.PathLike[str]"]] = None,
        kill_switch_file: Optional[Union[str, "os.PathLike[str]"]] = None,
        max_cpu_percent: Optional[float] = None,
        max_memory_mb: Optional[float] = None,
        engine: Optional[Engine] = None,
    ) -> None:
        if reporter is not None and not isinstance(reporter, Reporter):
            raise TypeError(f"reporter must be an asprof.Reporter, got {reporter!r}")
        if options is not None and not isinstance(options, ProfilerOptions):
            raise TypeError(f"options must be asprof.ProfilerOptions, got {options!r}")
        if agent_metadata is not None and not isinstance(agent_metadata, AgentMetadata):
            raise TypeError(f"agent_metadata must be an asprof.AgentMetadata, got {agent_metadata!r}")
        extra: Dict[str, str] = {}
        for k, v in (extra_metadata or {}).items():
            if not isinstance(k, str) or not isinstance(v, str) or not k:
                raise ValueError(f"extra_metadata must map non-empty strings to strings, got {k!r}: {v!r}")
            extra[k] = v
        self.reporting_interval = _positive("reporting_interval", reporting_interval, MIN_REPORTING_INTERVAL)
        self.max_cpu_percent = None if max_cpu_percent is None else _positive("max_cpu_percent", max_cpu_percent, 1e-6)
        self.max_memory_mb = None if max_memory_mb is None else _positive("max_memory_mb", max_memory_mb, 1e-6)
        self.reporter = reporter
        self.options = options if options is not None else ProfilerOptions()
        self.agent_metadata = agent_metadata
        self.extra_metadata = extra
        self.library_path = None if library_path is None else os.fspath(library_path)
        self.kill_switch_file = None if kill_switch_file is None else os.fspath(kill_switch_file)
        self._engine = engine

    def _config(self, reporter: Reporter) -> _Config:
        engine, options, path = self._engine, self.options, self.library_path

        def factory() -> Engine:
            return engine if engine is not None else NativeEngine(options, path)

        return _Config(reporter, self.reporting_interval, self.agent_metadata,
                       self.extra_metadata, self.kill_switch_file,
                       self.max_cpu_percent, self.max_memory_mb, factory)

    def start(self) -> RunningProfiler:
        """Starts async-profiler and the agent thread.

        Raises :class:`~asprof.errors.LibraryNotFoundError`, :class:`ProfilerError`
        (async-profiler refused to start) or :class:`ProfilerAlreadyRunningError`.
        With ``ASPROF_ENABLED=0`` in the environment, or the kill-switch file
        present, nothing starts: one log line, and a handle that is not running.
        """
        off = disabled_by_environment()
        if off is not None:
            logger.warning("profiling is disabled by ASPROF_ENABLED=%s", off)
            return RunningProfiler(None)
        if self.kill_switch_file and os.path.exists(self.kill_switch_file):
            logger.warning("profiling is disabled: kill switch file %s exists", self.kill_switch_file)
            return RunningProfiler(None)
        reporter = self.reporter if self.reporter is not None else LocalReporter("profiles")
        agent = _launch(self._config(reporter))
        logger.info("profiling started, a profile every %g s to %r", self.reporting_interval, reporter)
        return RunningProfiler(agent)


def _launch(config: _Config) -> _Agent:
    global _active
    _install_hooks()
    with _state_lock:
        if _active is not None and _active.pid == os.getpid() and not _active.done.is_set():
            raise ProfilerAlreadyRunningError(
                "a profiler is already running in this process (async-profiler is process-global); stop it first"
            )
        engine = config.engine_factory()
        try:
            engine.start()
        except BaseException:
            engine.close()
            raise
        agent = _Agent(engine, config)
        _active = agent
        try:
            agent.thread.start()
        except BaseException:
            _active = None
            engine.stop()
            engine.close()
            raise
    _install_sigterm()
    return agent


def start_profiling(
    reporter: Optional[Reporter] = None,
    *,
    reporting_interval: float = DEFAULT_REPORTING_INTERVAL,
    options: Optional[ProfilerOptions] = None,
    agent_metadata: Optional[AgentMetadata] = None,
    extra_metadata: Optional[Mapping[str, str]] = None,
    library_path: Optional[Union[str, "os.PathLike[str]"]] = None,
    kill_switch_file: Optional[Union[str, "os.PathLike[str]"]] = None,
    max_cpu_percent: Optional[float] = None,
    max_memory_mb: Optional[float] = None,
) -> RunningProfiler:
    """Starts profiling the whole process until :func:`stop_profiling` or exit.

    Profiles go to ``reporter`` (default: JFR files in ``./profiles``) every
    ``reporting_interval`` seconds. At interpreter exit the last profile is
    reported; forked children (gunicorn workers, multiprocessing) profile
    themselves. The arguments are :class:`Profiler`'s. Raises like
    :meth:`Profiler.start`.
    """
    global _default
    handle = Profiler(
        reporter,
        reporting_interval=reporting_interval,
        options=options,
        agent_metadata=agent_metadata,
        extra_metadata=extra_metadata,
        library_path=library_path,
        kill_switch_file=kill_switch_file,
        max_cpu_percent=max_cpu_percent,
        max_memory_mb=max_memory_mb,
    ).start()
    handle.detach()
    _default = handle
    return handle


def stop_profiling(timeout: Optional[float] = DEFAULT_STOP_TIMEOUT) -> bool:
    """Stops the running profiler (the one of :func:`start_profiling`, or any).

    Returns True when the last report finished within ``timeout``; True too
    when nothing was running.
    """
    global _default
    with _state_lock:
        agent = _active
    _default = None
    if agent is None or agent.pid != os.getpid() or agent.done.is_set():
        return True
    return RunningProfiler(agent).stop(timeout)


# ---- process life-cycle hooks ----

_hooks_installed = False
_sigterm_installed = False


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_at_exit)
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def _final_report_now(timeout: float) -> None:
    with _state_lock:
        agent = _active
    if agent is None or agent.pid != os.getpid() or agent.done.is_set():
        return
    agent.request_stop(at_exit=True)
    if not agent.done.wait(timeout):
        logger.warning("the last profile was not reported within %s s of exit", timeout)


def _report_at_multiprocessing_exit() -> None:
    """multiprocessing's forked children leave through os._exit(): atexit never runs
    there. They do call threading._shutdown() first (every CPython 3.9-3.13), which
    runs the functions given to threading._register_atexit."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        return
    try:
        register(_at_exit)
    except Exception:  # noqa: BLE001 - e.g. the interpreter is already shutting down
        logger.debug("could not register the final report with threading", exc_info=True)


def _at_exit() -> None:
    """Final blocking report at interpreter exit, bounded in time."""
    _final_report_now(EXIT_TIMEOUT)


def _on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
    """SIGTERM with no handler of the application's: report the last profile
    (once), then die of SIGTERM as the process would have."""
    try:
        _final_report_now(EXIT_TIMEOUT)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm() -> None:
    global _sigterm_installed
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _on_sigterm)
            _sigterm_installed = True
    except (ValueError, OSError):
        pass


def _restore_sigterm() -> None:
    global _sigterm_installed
    if not _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _sigterm_installed = False
    except (ValueError, OSError):
        pass


_forking: Optional[_Agent] = None


def _before_fork() -> None:
    global _forking
    _forking = None
    agent = _active
    if agent is None or agent.pid != os.getpid() or agent.done.is_set():
        return
    _forking = agent
    try:
        agent.fork_ok = agent.engine.before_fork() and not agent.stop_requested
    except Exception:  # noqa: BLE001 - never break the application's fork
        logger.exception("preparing the profiler for fork failed")
        agent.fork_ok = False


def _after_fork_in_parent() -> None:
    global _forking
    agent, _forking = _forking, None
    if agent is not None:
        try:
            agent.engine.after_fork_in_parent()
        except Exception:  # noqa: BLE001
            logger.exception("resuming the profiler after fork failed")


def _after_fork_in_child() -> None:
    # The agent thread does not exist here, and the parent's recording files are
    # guarded by the native core. Start this process's own agent if safe.
    global _active, _default, _state_lock, _forking
    _state_lock = threading.Lock()
    parent, _forking = _forking, None
    inherited = _active
    _default = None
    _active = None
    if parent is None:
        if inherited is not None and not inherited.done.is_set():
            # forked by C code (uwsgi's workers, for instance) without Python's
            # before-fork hooks: async-profiler was not paused, and restarting an
            # instance inherited while running deadlocks.
            logger.warning("process %d was forked without os.fork() while profiling: it does not profile. "
                           "Start the agent in each worker instead (e.g. uwsgi --lazy-apps with "
                           "import asprof.auto)", os.getpid())
        return
    try:
        parent.engine.after_fork_in_child()
    except Exception:  # noqa: BLE001
        pass
    if not parent.fork_ok:
        logger.warning("this process was forked while profiling but the profiler could not be paused: "
                       "it does not profile (start the agent in the child, e.g. a post-fork hook)")
        return
    config = parent.config
    try:
        reporter = config.reporter.for_child_process()
        config = dataclasses.replace(config, reporter=reporter, metadata=parent.metadata)
        child = _launch(config)
        _default = RunningProfiler(child)
        _default.detach()
        _report_at_multiprocessing_exit()
        logger.info("forked child %d profiles itself", os.getpid())
    except Exception as e:  # noqa: BLE001 - the child must run regardless
        logger.warning("the forked child %d could not start profiling: %s", os.getpid(), e)
