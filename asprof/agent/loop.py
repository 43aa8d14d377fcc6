"""The agent thread: every ``reporting_interval`` it rotates the engine's recording and
hands the finished JFR to the reporter; its guards (kill switch, CPU, memory) stop it.

Process-global state lives here too: async-profiler is process-global, so at most one
:class:`_Agent` runs per process (``current()``).
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from asprof import osthreads
from asprof.engines.base import Engine
from asprof.errors import ProfilerError
from asprof.reporter.base import Reporter

if TYPE_CHECKING:  # imported when the first report is made, on the agent thread
    from asprof.agent.errorlog import ReportErrorLog
    from asprof.metadata import AgentMetadata

__all__ = ["current", "DEFAULT_STOP_TIMEOUT", "EXIT_TIMEOUT"]

logger = logging.getLogger("asprof")

DEFAULT_STOP_TIMEOUT = 30.0
EXIT_TIMEOUT = 10.0
_OWN_THREADS = ("asprof-agent", "async-profiler", "asprof-pyframes", "asprof-sampler",
                "asprof-collect")

_state_lock = osthreads.Lock()
_active: Optional["_Agent"] = None  # async-profiler is process-global: one at a time


#: Held by the agent thread while it imports a module, and by the fork hooks across
#: ``os.fork()`` (after the engine's lock, the order the agent takes them in): a forked child
#: never inherits an import left half done by a thread that does not exist there, which would
#: block every later import of that module in the child.
import_guard = osthreads.Lock()


def _import_for_reports() -> None:
    """What reports need and start-up does not: imported on the agent thread at its first
    report (later calls find them loaded)."""
    with import_guard:
        import datetime  # noqa: F401

        import asprof.metadata  # noqa: F401


def current() -> Optional["_Agent"]:
    """The agent of this process (running or finishing), or None."""
    return _active


def _name_os_thread(name: str) -> None:
    if osthreads.main_thread_native():
        return  # never rename the process (a patched threading ran us on the main thread)
    try:
        from asprof._native import set_thread_name

        set_thread_name(name)
    except ImportError:  # a pure-Python engine in tests
        pass


def _wait_task_gone(native_id: Optional[int], limit: float = 0.5) -> None:
    """Python threads are detached: join() returns before the kernel task has exited. Wait
    (bounded) until /proc no longer lists it, so that nothing of ours is left when stop() returns."""
    if native_id is None:
        return
    deadline = time.monotonic() + limit
    while os.path.exists(f"/proc/self/task/{native_id}") and time.monotonic() < deadline:
        time.sleep(0.001)


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



class _Config:
    """What the agent needs to run, and to start again in a forked child (read-only by
    convention; :meth:`replace` makes a changed copy). Not a dataclass: see TickResult."""

    __slots__ = ("reporter", "interval", "metadata", "extra_metadata", "kill_switch_file", "max_cpu_percent",
                 "max_memory_mb", "engine_factory")

    def __init__(self, reporter: Reporter, interval: float, metadata: Optional[AgentMetadata],
                 extra_metadata: Mapping[str, str], kill_switch_file: Optional[str],
                 max_cpu_percent: Optional[float], max_memory_mb: Optional[float],
                 engine_factory: Callable[[], Engine]) -> None:
        self.reporter = reporter
        self.interval = interval
        self.metadata = metadata
        self.extra_metadata = extra_metadata
        self.kill_switch_file = kill_switch_file
        self.max_cpu_percent = max_cpu_percent
        self.max_memory_mb = max_memory_mb
        self.engine_factory = engine_factory

    def replace(self, **changes: Any) -> "_Config":
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return _Config(**values)


class _Agent:
    """State shared by the handle and the agent thread (no reference to the handle)."""

    def __init__(self, engine: Engine, config: _Config) -> None:
        self.engine = engine
        self.config = config
        self.reporter = config.reporter
        self.interval = config.interval
        self.metadata = config.metadata
        self.pid = os.getpid()
        # osthreads: a real OS thread and real locks even under gevent/eventlet monkey-patching
        self.cond = osthreads.Condition()
        self.stop_requested = False
        self.at_exit = False
        self.done = osthreads.Event()
        self.recording_since = time.time()  # a datetime when reported: no datetime import at start
        self.fork_ok = False
        self._error_log: Optional["ReportErrorLog"] = None  # made at the first reporter failure
        self.thread = osthreads.Thread(self._run, "asprof-agent")

    # ---- control, from any thread ----
    def request_stop(self, at_exit: bool = False) -> None:
        with self.cond:
            self.stop_requested = True
            self.at_exit = self.at_exit or at_exit
            self.cond.notify_all()

    def wait(self, timeout: Optional[float]) -> bool:
        if osthreads.is_current(self.thread):
            return False  # stop() called from a reporter: the loop ends after this report
        if not self.done.wait(timeout):
            return False
        self.thread.join(1.0)  # done is set as the thread's last step: a clean stop leaves no thread
        _wait_task_gone(self.thread.native_id)
        return True

    # ---- the agent thread ----
    def _run(self) -> None:
        try:
            _name_os_thread("asprof-agent")
            deadline = time.monotonic() + self.interval
            cpu_mark = (self._cpu_seconds(), time.monotonic()) if self.config.max_cpu_percent else None
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

    def _cpu_seconds(self) -> float:
        """The profiler's CPU time: its threads', and its engine's on other threads."""
        try:
            elsewhere = float(self.engine.cpu_seconds_elsewhere())
        except Exception:  # noqa: BLE001 - an engine (or a fake) without it
            elsewhere = 0.0
        return _own_cpu_seconds() + elsewhere

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
            cpu, now = self._cpu_seconds(), time.monotonic()
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
        end = time.time()
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
            self._report(recording, self.recording_since, time.time(), blocking=self.at_exit)

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
            from asprof.metadata import NoMetadata

            md: AgentMetadata = NoMetadata()
            if getattr(self.reporter, "wants_host_metadata", True):
                try:
                    with import_guard:
                        from asprof.metadata.aws import detect_agent_metadata

                    md = detect_agent_metadata()
                except ImportError:
                    pass
                except Exception as e:  # noqa: BLE001 - never stop profiling for metadata
                    logger.warning("host metadata detection failed (%s); using NoMetadata", e)
            extra = self.config.extra_metadata
            if extra:
                try:
                    import dataclasses

                    md = dataclasses.replace(md, extra={**getattr(md, "extra", {}), **extra})  # type: ignore[type-var]
                except TypeError:
                    logger.warning("%s is not a dataclass: extra metadata %s not added", type(md).__name__,
                                   sorted(extra))
            self.metadata = md
        return self.metadata

    def _report(self, jfr: bytes, start: float, end: float, blocking: bool) -> None:
        _import_for_reports()  # at the first report, not while start() returns (the GIL)
        from asprof.metadata import ReportMetadata

        try:
            conflicts = int(self.engine.signal_conflicts())  # issue #13
        except Exception:  # noqa: BLE001 - an engine (or a fake) without it
            conflicts = 0
        md = ReportMetadata(self._instance(), ReportMetadata.at(start), ReportMetadata.at(end), self.interval,
                            signal_conflicts=conflicts)
        try:
            if blocking:
                self.reporter.report_blocking(jfr, md)
            else:
                self.reporter.report(jfr, md)
        except NotImplementedError:
            logger.warning("%r cannot report while the interpreter exits: the last profile (%d bytes) is lost; "
                           "call stop() before exiting to deliver it", self.reporter, len(jfr))
        except Exception as e:  # noqa: BLE001 - reporter errors never stop profiling
            self._report_errors().failed(str(e), len(jfr))
        else:
            if self._error_log is not None:
                self._error_log.succeeded()

    def _report_errors(self) -> "ReportErrorLog":
        if self._error_log is None:
            with import_guard:
                from asprof.agent.errorlog import ReportErrorLog

            self._error_log = ReportErrorLog(logger, repr(self.reporter))
        return self._error_log

