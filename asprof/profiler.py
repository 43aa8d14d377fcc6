"""The public entry points: :class:`Profiler` (a configuration), :class:`RunningProfiler`
(the handle of a running one), :func:`start_profiling` and :func:`stop_profiling`.

``Profiler(...).start()`` starts the engine (async-profiler, or the built-in engine where it
does not load: ``ProfilerOptions(engine=...)``, :mod:`asprof.engines.choice`) and the ``asprof-agent``
daemon thread (:mod:`asprof.agent`). Every ``reporting_interval`` the thread rotates the
recording and hands the finished JFR to the reporter. Application threads never wait for a
tick. ``stop()`` makes a final tick, waits (bounded) for the last report and returns; a new
profiler may then start, with other options.

Process life-cycle (:mod:`asprof.agent.lifecycle`):
- interpreter exit: the last profile is reported synchronously, bounded;
- SIGTERM with no handler of the application's: the last profile is reported,
  then the process dies of SIGTERM as it would have;
- ``os.fork()``: async-profiler is paused around the fork (the parent resumes
  on the same file); the child starts its own agent, with its own files and
  pid, when it can safely do so, and says so in one log line when not.
"""
from __future__ import annotations

import logging
import math
import os
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Dict, Mapping, Optional, Type, Union

from asprof import osthreads
from asprof.agent.lifecycle import launch, restore_sigterm
from asprof.agent.loop import DEFAULT_STOP_TIMEOUT, _Agent, _Config, current
from asprof.autostart.values import DEFAULT_REPORTING_INTERVAL, MIN_REPORTING_INTERVAL, disabled_by_environment
from asprof.engines.base import Engine
from asprof.options import ProfilerOptions
from asprof.reporter.base import Reporter

if TYPE_CHECKING:
    from asprof.metadata import AgentMetadata

__all__ = ["Profiler", "RunningProfiler", "start_profiling", "stop_profiling"]

logger = logging.getLogger("asprof")


_default: Optional["RunningProfiler"] = None  # the handle of start_profiling()


def _is_agent_metadata(value: object) -> bool:
    from asprof.metadata import AgentMetadata  # only when one is given: not imported at start

    return isinstance(value, AgentMetadata)


def _positive(name: str, value: object, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or math.isinf(v) or v < minimum:
        raise ValueError(f"{name} must be a finite number ≥ {minimum}, got {value!r}")
    return v


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

    @property
    def engine(self) -> Optional[str]:
        """The engine that samples: ``"async-profiler"``, ``"builtin"`` (issue #11), another
        engine's class name, or None when nothing runs."""
        a = self._agent
        if a is None:
            return None
        eng = a.engine
        name = getattr(eng, "name", None)
        if isinstance(name, str):
            return name
        return "async-profiler" if type(eng).__name__ == "NativeEngine" else type(eng).__name__

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
        if not finished and not osthreads.is_current(a.thread):
            logger.warning("the last report did not finish within %s s; it goes on in the background", timeout)
        restore_sigterm()
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
        if agent_metadata is not None and not _is_agent_metadata(agent_metadata):
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

        def fixed() -> Engine:
            assert engine is not None
            return engine

        if engine is None:
            from asprof.engines.choice import EngineFactory  # issue #11: auto, async-profiler, builtin

            factory: Callable[[], Engine] = EngineFactory(options, path)
        else:
            factory = fixed
        return _Config(reporter, self.reporting_interval, self.agent_metadata,
                       self.extra_metadata, self.kill_switch_file,
                       self.max_cpu_percent, self.max_memory_mb, factory)

    def start(self) -> RunningProfiler:
        """Starts the engine (``options.engine``: async-profiler, else the built-in one) and the
        agent thread.

        Raises :class:`~asprof.errors.LibraryNotFoundError`, :class:`ProfilerError`
        (the engine refused to start) or :class:`ProfilerAlreadyRunningError`;
        ``LibraryNotFoundError`` only when async-profiler was asked for (``engine="async-profiler"``
        or a ``library_path``/``ASPROF_LIB``) and does not load; ``ValueError`` for an invalid
        ``ASPROF_ENGINE``.
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
        if self.reporter is not None:
            reporter = self.reporter
        else:
            from asprof.reporter.local import LocalReporter

            reporter = LocalReporter("profiles")
        agent = launch(self._config(reporter))
        logger.info("profiling started, a profile every %g s to %r", self.reporting_interval, reporter)
        return RunningProfiler(agent)



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
    agent = current()
    _default = None
    if agent is None or agent.pid != os.getpid() or agent.done.is_set():
        return True
    return RunningProfiler(agent).stop(timeout)


