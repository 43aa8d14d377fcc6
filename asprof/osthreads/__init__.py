"""Real OS threads and locks for asprof's own threads, whatever ``threading`` was patched to.

Under gevent's ``monkey.patch_all()`` (or eventlet's ``monkey_patch()``) ``threading.Thread``
makes a greenlet on the calling thread: asprof's agent would run on the application's main
thread (renaming the process ``asprof-agent``, its CPU counted as the application's and the
application's as its own) and only when the application yields — never, for CPU-bound code.
So asprof's threads (``asprof-agent``, ``asprof-collect``, ``asprof-s3``...) and the locks,
conditions and events they share with the application's threads come from here:

- not patched: exactly ``threading``'s classes (nothing changes);
- patched: threads started with the original ``_thread.start_new_thread`` (from
  ``gevent.monkey.get_original`` or ``eventlet.patcher.original``, else what ``_thread`` held
  when this module was first imported), and locks from the original ``allocate_lock``, with
  a small Condition/Event built on them. asprof may be imported before or after patching:
  the choice is made each time a thread or lock is made.

Imports nothing from asprof (the lowest layer).
"""
from __future__ import annotations

import _thread
import collections
import sys
import threading
import types
from typing import Any, Callable, Deque, Dict, Optional

__all__ = ["patched", "Thread", "Lock", "Condition", "Event", "is_current", "main_thread_native"]

_NAMES = ("start_new_thread", "allocate_lock", "get_ident", "get_native_id")
_AT_IMPORT: Dict[str, Any] = {n: getattr(_thread, n, None) for n in _NAMES}


def _is_builtin(f: Any) -> bool:
    return isinstance(f, types.BuiltinFunctionType)


def _originals() -> Optional[Dict[str, Any]]:
    """The original ``_thread`` functions when ``_thread`` is monkey-patched, else None."""
    if _is_builtin(getattr(_thread, "start_new_thread", None)) and _is_builtin(getattr(_thread, "allocate_lock", None)):
        return None
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        try:
            got = {n: monkey.get_original("_thread", n) for n in _NAMES}
            if _is_builtin(got["start_new_thread"]):
                return got
        except Exception:  # noqa: BLE001 - another gevent version: try the others
            pass
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None:
        try:
            mod = patcher.original("_thread")
            got = {n: getattr(mod, n, None) for n in _NAMES}
            if _is_builtin(got["start_new_thread"]):
                return got
        except Exception:  # noqa: BLE001
            pass
    if _is_builtin(_AT_IMPORT["start_new_thread"]):
        return _AT_IMPORT  # imported before the patching
    return None


def patched() -> bool:
    """Whether ``_thread`` is monkey-patched (and asprof uses the originals)."""
    return _originals() is not None


def Lock() -> Any:  # noqa: N802 - the name of threading's
    o = _originals()
    return threading.Lock() if o is None else o["allocate_lock"]()


class _Condition:
    """threading.Condition on original locks (the patched one's waiters are green)."""

    def __init__(self, o: Dict[str, Any], lock: Any = None) -> None:
        self._alloc = o["allocate_lock"]
        self._lock = lock if lock is not None else self._alloc()
        self._waiters: Deque[Any] = collections.deque()

    def __enter__(self) -> bool:
        return bool(self._lock.acquire())

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return bool(self._lock.acquire(blocking, timeout))

    def release(self) -> None:
        self._lock.release()

    def wait(self, timeout: Optional[float] = None) -> bool:
        waiter = self._alloc()
        waiter.acquire()
        self._waiters.append(waiter)
        self._lock.release()
        got = False
        try:
            if timeout is None:
                got = bool(waiter.acquire())
            elif timeout > 0:
                got = bool(waiter.acquire(True, timeout))
            else:
                got = bool(waiter.acquire(False))
            return got
        finally:
            self._lock.acquire()
            if not got:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass

    def notify(self, n: int = 1) -> None:
        while n > 0 and self._waiters:
            self._waiters.popleft().release()
            n -= 1

    def notify_all(self) -> None:
        self.notify(len(self._waiters))


def Condition(lock: Any = None) -> Any:  # noqa: N802
    o = _originals()
    return threading.Condition(lock) if o is None else _Condition(o, lock)


class _Event:
    def __init__(self, o: Dict[str, Any]) -> None:
        self._cond = _Condition(o)
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False

    def wait(self, timeout: Optional[float] = None) -> bool:
        with self._cond:
            if not self._flag:
                self._cond.wait(timeout)
            return self._flag


def Event() -> Any:  # noqa: N802
    o = _originals()
    return threading.Event() if o is None else _Event(o)


class _OSThread:
    """The part of threading.Thread asprof uses, on a thread of the original ``_thread``."""

    daemon = True

    def __init__(self, o: Dict[str, Any], target: Callable[[], object], name: str) -> None:
        self._o = o
        self._target = target
        self.name = name
        self.ident: Optional[int] = None
        self.native_id: Optional[int] = None
        self._started = False
        self._running = o["allocate_lock"]()  # held from start() until the target has returned

    def start(self) -> None:
        if self._started:
            raise RuntimeError("threads can only be started once")
        ready = self._o["allocate_lock"]()
        ready.acquire()
        self._running.acquire()
        self._started = True
        try:
            self._o["start_new_thread"](self._bootstrap, (ready,))
        except BaseException:  # noqa: BLE001 - released, then re-raised as threading does
            self._running.release()
            self._started = False
            raise RuntimeError(f"cannot start thread {self.name}") from None
        ready.acquire()  # as threading.Thread.start: returns once the thread runs

    def _bootstrap(self, ready: Any) -> None:
        try:
            self.ident = self._o["get_ident"]()
            native = self._o.get("get_native_id")
            self.native_id = native() if native is not None else None
        finally:
            ready.release()
        try:
            self._target()
        except BaseException:  # noqa: BLE001 - asprof's targets log their own errors
            pass
        finally:
            self._running.release()

    def join(self, timeout: Optional[float] = None) -> None:
        if not self._started:
            raise RuntimeError("cannot join thread before it is started")
        if self.ident is not None and self.ident == self._o["get_ident"]():
            raise RuntimeError("cannot join current thread")
        if self._running.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            self._running.release()

    def is_alive(self) -> bool:
        if not self._started:
            return False
        if self._running.acquire(False):
            self._running.release()
            return False
        return True


class _Thread(threading.Thread):
    """threading.Thread, surviving a monkey-patching done while it runs (``asprof run``
    starts profiling before a gevent worker patches): its exit then looks itself up by the
    patched, green ``get_ident`` and threading would print a KeyError to stderr."""

    def _delete(self) -> None:
        try:
            super()._delete()  # type: ignore[misc]
        except KeyError:
            lock = getattr(threading, "_active_limbo_lock", None)
            active = getattr(threading, "_active", None)
            if lock is not None and isinstance(active, dict):
                with lock:
                    active.pop(self.ident, None)


def Thread(target: Callable[[], object], name: str) -> Any:  # noqa: N802
    """A daemon thread running ``target``; a real OS thread even under monkey-patching."""
    o = _originals()
    if o is None:
        return _Thread(target=target, name=name, daemon=True)
    return _OSThread(o, target, name)


def is_current(thread: Any) -> bool:
    """Whether the calling thread is ``thread`` (one made by :func:`Thread`)."""
    if isinstance(thread, _OSThread):
        return thread.ident is not None and thread.ident == thread._o["get_ident"]()
    return threading.current_thread() is thread


def main_thread_native() -> bool:
    """Whether the calling OS thread is the process's main thread (its tid is the pid)."""
    import os

    o = _originals() or _AT_IMPORT
    native = o.get("get_native_id")
    return native is not None and native() == os.getpid()
