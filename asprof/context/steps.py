"""asyncio event-loop steps (issue #15): the Python counterpart of the Rust agent's pollcatch.

:func:`install` wraps ``asyncio.events.Handle._run``, which the standard event loop calls for
every callback and every task step it runs. Around each one:

- before: the per-thread slot (``asprof.context._ctx``) gets the step's Context and its label
  set (what the samples taken during the step record), the start time and the thread's sample
  count;
- after: the step is recorded only when a sample of the thread was taken during it (the
  engines' signal handlers count them in the slot) or when it lasted at least the threshold
  (the wall interval: async-profiler records idle threads' wall samples without interrupting
  them, so a step blocked in a system call has no handler call). The cost of a step without
  a sample: a few thread-local reads and two clock reads (the second a coarse one), in C.

A recorded step is (thread, start, end, samples, label set, name): the task's name and its
coroutine for a task step, else the callback's name. Recorded steps wait in a bounded buffer
(:data:`MAX_PENDING`; overflow counted, logged once per report) until the engine writes them
into the next report as ``asprof.Step`` events (:mod:`asprof.jfrio.ctxevents`).

uvloop runs callbacks in C and cannot be hooked: :func:`check_loops` says so once in the log.
"""
from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import Any, Callable, Deque, List, Optional, Tuple

from asprof.context import _VAR, native_slot

__all__ = ["install", "uninstall", "installed", "drain", "MAX_PENDING", "step_name", "clock_offset"]

log = logging.getLogger("asprof")

#: Recorded steps kept between two reports, at most.
MAX_PENDING = 20000

StepRecord = Tuple[int, int, int, int, int, str]  # tid, start mono ns, end mono ns, samples, label, name

_pending: Deque[StepRecord] = collections.deque()
_dropped = 0
_lock = threading.Lock()
_orig: Optional[Callable[[Any], None]] = None
_uvloop_said = False


def step_name(handle: Any) -> str:
    """What ran in a step: ``task <name> <coroutine>`` or the callback's qualified name."""
    cb = getattr(handle, "_callback", None)
    owner = getattr(cb, "__self__", None)
    get_name = getattr(owner, "get_name", None)
    get_coro = getattr(owner, "get_coro", None)
    if get_name is not None and get_coro is not None:
        try:
            coro = get_coro()
            cq = getattr(coro, "__qualname__", None) or type(coro).__name__
            return f"task {get_name()} {cq}"
        except Exception:  # noqa: BLE001 - a name is a nicety
            pass
    fn = getattr(cb, "__func__", cb)
    q = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(cb).__name__
    mod = getattr(fn, "__module__", None)
    return f"{mod}.{q}" if mod else str(q)


def _record(handle: Any) -> None:
    global _dropped
    try:
        tid, start, end, samples, label = native_slot.last_step()  # type: ignore[union-attr]
        if not label:  # labels set during the step (a middleware's first step): those at its end
            ctx = getattr(handle, "_context", None)
            ls = ctx.get(_VAR) if ctx is not None else None
            label = int(ls) if ls is not None else 0
        if len(_pending) >= MAX_PENDING:
            _dropped += 1
            return
        _pending.append((tid, start, end, samples, label, step_name(handle)))
    except Exception:  # noqa: BLE001 - never break the event loop
        pass


class _Raiser:
    """A stand-in ``Handle._context`` whose ``run`` raises the exception the step raised; the
    rest is the handle's Context (for an exception handler that looks at it)."""

    __slots__ = ("exc", "ctx")

    def __init__(self, exc: BaseException, ctx: Any) -> None:
        self.exc: Optional[BaseException] = exc
        self.ctx = ctx

    def run(self, *args: Any) -> Any:
        exc, self.exc = self.exc, None
        if exc is None:  # a later run: the Context's own (3.12+ run the loop's exception handler in it)
            return self.ctx.run(*args)
        raise exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ctx, name)

    def __getitem__(self, var: Any) -> Any:
        return self.ctx[var]

    def __contains__(self, var: Any) -> bool:
        return var in self.ctx

    def __iter__(self) -> Any:
        return iter(self.ctx)

    def __len__(self) -> int:
        return len(self.ctx)


def _step_failed(orig: Callable[[Any], None], handle: Any, exc: BaseException) -> None:
    """The C hook ran a step (``handle._context.run(handle._callback, *handle._args)``) and it
    raised ``exc``: the original ``_run`` handles it as it would have (its message, the loop's
    exception handler: whatever this Python version does), its ``run`` re-raising ``exc``."""
    ctx = handle._context
    handle._context = _Raiser(exc, ctx)
    try:
        orig(handle)
    finally:
        handle._context = ctx


def _make_run(orig: Callable[[Any], None], record: bool = True) -> Callable[[Any], None]:
    enter = native_slot.enter  # type: ignore[union-attr]
    leave = native_slot.leave  # type: ignore[union-attr]
    var = _VAR

    if record:
        def _run(self: Any) -> None:
            ctx = self._context
            enter(ctx, ctx.get(var))
            orig(self)
            if leave():
                _record(self)
    else:  # labels only: the slot follows task switches, no step is recorded
        def _run(self: Any) -> None:
            ctx = self._context
            enter(ctx, ctx.get(var))
            orig(self)

    _run.__qualname__ = "Handle._run"
    _run.__wrapped__ = orig  # type: ignore[attr-defined]
    return _run


class _Deferred:
    """Until the application imports asyncio: a ``sys.meta_path`` finder that lets
    ``asyncio.events`` load as usual and hooks it right after. asprof itself never imports
    asyncio (with its ssl, socket and subprocess modules: ~10 MB and ~40 ms at start)."""

    def __init__(self, threshold_ns: int, record: bool) -> None:
        self.threshold_ns, self.record = threshold_ns, record

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "asyncio.events":
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookAfter(spec.loader, self)
        return spec

    def loaded(self) -> None:
        _forget_deferred()
        try:
            install(self.threshold_ns, self.record)
        except Exception:  # noqa: BLE001 - never fail the application's import for it
            log.warning("asprof: could not hook the asyncio event loop", exc_info=True)


class _HookAfter:
    """The loader of ``asyncio.events``, and our hook once it has run."""

    def __init__(self, inner: Any, deferred: _Deferred) -> None:
        self._inner, self._deferred = inner, deferred

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        self._deferred.loaded()

    def __getattr__(self, name: str) -> Any:  # get_source & co., for tracebacks
        return getattr(self._inner, name)


_deferred: Optional[_Deferred] = None


def _forget_deferred() -> None:
    global _deferred
    with _lock:
        if _deferred is not None:
            try:
                sys.meta_path.remove(_deferred)
            except ValueError:
                pass
            _deferred = None


def install(threshold_ns: int, record: bool = True) -> bool:
    """Hooks the standard event loop's steps (idempotent); when the application has not imported
    asyncio yet, as soon as it does. ``record``: record steps (else the hook only keeps the
    labels' slot in sync with task switches). False, with one log line, when the C slot is not
    built here."""
    global _orig, _deferred
    if native_slot is None:
        log.info("asprof: asyncio step events and labels in samples are off: asprof.context._ctx is not built")
        return False
    native_slot.set_step_threshold(max(1, int(threshold_ns)))
    if "asyncio.events" not in sys.modules:
        with _lock:
            if _deferred is None:
                _deferred = _Deferred(threshold_ns, record)
                sys.meta_path.insert(0, _deferred)
            else:
                _deferred.threshold_ns, _deferred.record = threshold_ns, _deferred.record or record
        if "asyncio.events" not in sys.modules:  # (imported meanwhile: hook it now)
            return True
        _forget_deferred()
    with _lock:
        if _orig is not None:
            return True
        import asyncio.events  # noqa: F401 - (already loaded when hooked right after its import)

        # from sys.modules: right after asyncio.events ran, the asyncio package is still being
        # initialised and has no `events` attribute yet
        handle = sys.modules["asyncio.events"].Handle
        orig = handle._run
        if getattr(orig, "__wrapped__", None) is not None and orig.__qualname__ == "Handle._run" and \
                getattr(orig, "__module__", "") == __name__:
            return True
        make = getattr(native_slot, "make_run", None)
        # in C where built (one method descriptor: no Python frame per step), else the wrapper
        if make is None:
            hook = _make_run(orig, record)
        else:
            try:
                hook = make(handle, orig, _VAR, _record if record else None, _step_failed)
            except TypeError:  # an extension built before the step ran in C: it calls _run
                hook = make(handle, orig, _VAR, _record if record else None)
        _orig = orig
        handle._run = hook
    check_loops()
    return True


def uninstall() -> None:
    global _orig
    _forget_deferred()
    with _lock:
        if _orig is None:
            return
        sys.modules["asyncio.events"].Handle._run = _orig
        _orig = None


def installed() -> bool:
    """Hooked, or waiting for the application to import asyncio."""
    return _orig is not None or _deferred is not None


def check_loops() -> None:
    """One log line when uvloop is in use: its loop runs callbacks in C, out of our hook."""
    global _uvloop_said
    if not _uvloop_said and "uvloop" in sys.modules:
        _uvloop_said = True
        log.info("asprof: uvloop's event loop is not hooked: no asyncio step events for its loops, and "
                 "labels set in its tasks reach samples only until it switches to another task "
                 "(the standard asyncio loop is hooked)")


def clock_offset() -> int:
    """epoch ns - CLOCK_MONOTONIC ns now."""
    a = time.time_ns()
    m = time.monotonic_ns()
    b = time.time_ns()
    return (a + b) // 2 - m


def drain() -> Tuple[List[StepRecord], int]:
    """The steps recorded since the last drain, and how many did not fit."""
    global _dropped
    out: List[StepRecord] = []
    pop = _pending.popleft
    try:
        while True:
            out.append(pop())
    except IndexError:
        pass
    dropped, _dropped = _dropped, 0
    if dropped:
        log.warning("asprof: %d asyncio step events did not fit in the buffer (%d) since the last report",
                    dropped, MAX_PENDING)
    check_loops()
    return out, dropped
