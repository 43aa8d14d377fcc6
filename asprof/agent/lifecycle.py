"""Starting the agent and the process life-cycle hooks: the final report at interpreter
exit and on SIGTERM, and pausing / restarting around ``os.fork()``."""
from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from types import FrameType
from typing import Optional

from asprof import osthreads
from asprof.agent import loop
from asprof.agent.loop import EXIT_TIMEOUT, _Agent, _Config
from asprof.errors import ProfilerAlreadyRunningError

__all__ = ["launch", "restore_sigterm"]

logger = logging.getLogger("asprof")


def launch(config: _Config) -> _Agent:
    _install_hooks()
    with loop._state_lock:
        active = loop._active
        if active is not None and active.pid == os.getpid() and not active.done.is_set():
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
        loop._active = agent
        try:
            agent.thread.start()
        except BaseException:
            loop._active = None
            engine.stop()
            engine.close()
            raise
    _install_sigterm()
    return agent



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
    with loop._state_lock:
        agent = loop._active
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


def restore_sigterm() -> None:
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
    agent = loop._active
    if agent is None or agent.pid != os.getpid() or agent.done.is_set():
        return
    _forking = agent
    try:
        agent.fork_ok = agent.engine.before_fork() and not agent.stop_requested
    except Exception:  # noqa: BLE001 - never break the application's fork
        logger.exception("preparing the profiler for fork failed")
        agent.fork_ok = False
    loop.import_guard.acquire()  # no import of the agent thread's is half done in the child


def _after_fork_in_parent() -> None:
    global _forking
    agent, _forking = _forking, None
    if agent is not None:
        loop.import_guard.release()
        try:
            agent.engine.after_fork_in_parent()
        except Exception:  # noqa: BLE001
            logger.exception("resuming the profiler after fork failed")


def _after_fork_in_child() -> None:
    # The agent thread does not exist here, and the parent's recording files are
    # guarded by the native core. Start this process's own agent if safe.
    global _forking
    loop._state_lock = osthreads.Lock()
    loop.import_guard = osthreads.Lock()  # its holder, if any, is the parent's
    parent, _forking = _forking, None
    inherited = loop._active
    loop._active = None
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
        config = config.replace(reporter=reporter, metadata=parent.metadata)
        launch(config)  # runs detached until stop_profiling() or exit
        _report_at_multiprocessing_exit()
        logger.info("forked child %d profiles itself", os.getpid())
    except Exception as e:  # noqa: BLE001 - the child must run regardless
        logger.warning("the forked child %d could not start profiling: %s", os.getpid(), e)
