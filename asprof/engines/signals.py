"""Who owns the profiling signals (issue #13).

An application, or one of its libraries (a statistical profiler, a timeout helper, a test
runner), may install its own handler for a signal the engine samples with. Without care that
silently ends sampling: async-profiler's perf events stop at their first overflow that its own
handler does not see. What asprof does about it:

- **async-profiler** (:class:`AsyncProfilerSignals`): after each start, the signals async-profiler's
  handlers (or csrc/pyframes' in front of them) hold are watched by the ``asprof-sigwatch`` thread
  (csrc/signals/sigwatch.c) every 100 ms. A handler that took one over is kept, behind a
  trampoline put in front: async-profiler's own signals (perf-event overflows of its descriptors,
  its CPU timers, its wall-clock ``tgkill``) go to asprof's chain, every other one (the
  application's ``setitimer``, ``kill``, ``sigqueue``) to the application's handler; the perf
  events that stopped meanwhile are re-armed. A handler installed *before* start is left alone:
  async-profiler samples with another signal (its ``getProfilingSignal``: SIGSTKFLT, SIGPWR, ...).
- **built-in engine** (``csrc/builtin``): its sampler thread puts its handler back in front every
  100 ms and passes every signal that is not its own to the handler it found (by ``si_code`` and
  the value its timers and wall signals carry); this module names that handler in the warning.

Either way: one WARNING per signal and process, naming the signal and the handler's owner
(``dladdr`` of its address; CPython's handler is reported as the Python function given to
``signal.signal()``), and a counter of conflicts (``signal_conflicts``) in the engine, in each
report's :class:`~asprof.metadata.ReportMetadata` and, for the built-in engine, in the JFR
(``jdk.ActiveRecording`` setting ``signalConflicts``). ``asprof doctor`` lists the handlers
(:func:`handler_report`).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

__all__ = ["AsyncProfilerSignals", "Conflicts", "address_owner", "foreign_at_start", "handler_report", "owner",
           "signal_name", "REPORTED_SIGNALS"]

logger = logging.getLogger("asprof")

#: The signals ``asprof doctor`` reports: the profiling signals and the timer signal.
REPORTED_SIGNALS: Tuple[int, ...] = (int(signal.SIGPROF), int(signal.SIGVTALRM), int(signal.SIGALRM))

_warned: Dict[int, Set[int]] = {}  # pid -> signals warned about in that process


def _ext() -> Any:
    """The C part (``asprof.engines._signals``), or None where it is not built."""
    try:
        from asprof.engines import _signals
    except ImportError:
        return None
    return _signals


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        if signal.SIGRTMIN <= sig <= signal.SIGRTMAX:
            return f"SIGRTMIN+{sig - signal.SIGRTMIN}"
        return f"signal {sig}"


def _python_handler(sig: int) -> Optional[str]:
    """The Python function ``signal.signal()`` installed for sig, described, or None."""
    try:
        h = signal.getsignal(sig)
    except (ValueError, OSError):
        return None
    if not callable(h):
        return None
    mod = getattr(h, "__module__", None) or "?"
    name = getattr(h, "__qualname__", None) or getattr(h, "__name__", None) or repr(h)
    return f"{mod}.{name}"


def owner(info: Dict[str, Any], sig: Optional[int] = None) -> str:
    """Who a handler (``_signals.handler_info`` / ``address_info``) belongs to, in words."""
    kind = info.get("kind")
    if kind == "default":
        return "the default action (SIG_DFL)"
    if kind == "ignore":
        if sig is not None and sig in _wanted_default:
            return "signal.signal(..., SIG_DFL) (SIG_IGN in its place while asprof samples with it: " \
                   "the default action would end the process)"
        return "SIG_IGN (ignored)"
    if info.get("asprof"):
        return "asprof"
    if info.get("python"):
        fn = _python_handler(sig) if sig is not None else None
        if fn is not None:
            return f"a Python signal.signal() handler ({fn})"
        return "a Python signal.signal() handler"
    obj = info.get("object")
    sym = info.get("symbol")
    where = f"{sym} in {obj}" if sym and obj else obj or f"address {int(info.get('address', 0)):#x}"
    return f"a native handler ({where})"


def address_owner(address: int, sig: Optional[int] = None) -> str:
    """Who the handler at ``address`` belongs to, in words."""
    ext = _ext()
    if ext is None:
        return f"a handler at {address:#x}"
    return owner(ext.address_info(address), sig)


def _is_asprof_object(path: Optional[str]) -> bool:
    """An object of asprof's (its extensions) or async-profiler's library."""
    if not path:
        return False
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    real = os.path.realpath(path)
    return real.startswith(os.path.realpath(pkg) + os.sep) or os.path.basename(real).startswith("libasyncProfiler")


def handler_report(signals: Sequence[int] = REPORTED_SIGNALS) -> List[Dict[str, Any]]:
    """The current handler of each signal in this process: ``signal``, ``name``, ``kind``,
    ``owner`` (words), ``asprof`` (bool: one of asprof's or async-profiler's). Empty where the
    C part is not built."""
    ext = _ext()
    if ext is None:
        return []
    out = []
    for sig in signals:
        try:
            info = ext.handler_info(int(sig))
        except (OSError, ValueError):
            continue
        mine = bool(info.get("asprof")) or (info.get("kind") == "handler" and _is_asprof_object(info.get("object")))
        out.append({"signal": int(sig), "name": signal_name(int(sig)), "kind": info.get("kind"),
                    "owner": "asprof" if mine else owner(info, int(sig)), "asprof": mine})
    return out


# -- Python's signal.signal() while asprof samples with the signal ------------------------------
#
# CPython does not know about handlers installed in C: for SIGPROF it reports SIG_DFL even while
# asprof's handler is in place. A program (or a timeout helper) that saves the "previous" handler
# and puts it back later thus sets SIG_DFL, and the next profiling signal (a perf-event overflow,
# a timer) would end the process. While asprof samples with a signal, ``_signal.signal`` (which
# ``signal.signal`` calls) is wrapped: SIG_DFL becomes SIG_IGN for real (the application's own
# signals are dropped either way; asprof's keep coming through the trampoline), the application
# still sees SIG_DFL (``getsignal``, the value returned next time), and SIG_DFL is put back when
# asprof stops sampling with the signal. Any handler set from Python is also checked at once (not
# at the next 100 ms check), so the application's handler sees none of asprof's signals.

_sampling: Dict[int, List[Callable[[], None]]] = {}  # signal -> each sampling engine's resync
_wanted_default: Set[int] = set()  # signals the application set to SIG_DFL (SIG_IGN for real)
_orig: Dict[str, Any] = {}


def _is_default(handler: object) -> bool:
    return isinstance(handler, int) and not isinstance(handler, bool) and int(handler) == int(signal.SIG_DFL)


def _guarded_signal(signalnum: int, handler: Any) -> Any:
    orig = _orig["signal"]
    sig = int(signalnum)
    if sig not in _sampling:
        _wanted_default.discard(sig)
        return orig(signalnum, handler)
    was_default = sig in _wanted_default
    if _is_default(handler):
        prev = orig(signalnum, int(signal.SIG_IGN))
        _wanted_default.add(sig)
    else:
        prev = orig(signalnum, handler)
        _wanted_default.discard(sig)
    for resync in list(_sampling.get(sig, ())):
        try:
            resync()  # asprof's handler in front now, not at the next 100 ms check
        except Exception:  # noqa: BLE001 - the watcher does it within 100 ms
            pass
    if was_default and isinstance(prev, int) and int(prev) == int(signal.SIG_IGN):
        return int(signal.SIG_DFL)
    return prev


def _guarded_getsignal(signalnum: int) -> Any:
    h = _orig["getsignal"](signalnum)
    if int(signalnum) in _wanted_default and isinstance(h, int) and int(h) == int(signal.SIG_IGN):
        return int(signal.SIG_DFL)
    return h


def sampling_with(sigs: Sequence[int], resync: Callable[[], None]) -> None:
    """An engine samples with these signals now (until :func:`not_sampling_with`); ``resync``
    puts its handler back in front (and re-arms what stopped) after Python code set one."""
    import importlib

    _signal: Any = importlib.import_module("_signal")  # what signal.signal/getsignal call
    if "signal" not in _orig:
        _orig["signal"] = _signal.signal
        _orig["getsignal"] = _signal.getsignal
        try:
            _signal.signal = _guarded_signal
            _signal.getsignal = _guarded_getsignal
        except (AttributeError, TypeError):  # a read-only module: nothing wrapped
            logger.debug("signal.signal could not be wrapped")
    for sig in sigs:
        _sampling.setdefault(int(sig), []).append(resync)


def not_sampling_with(sigs: Sequence[int], resync: Callable[[], None]) -> None:
    """The engine stopped sampling with these signals: SIG_DFL back where the application set it."""
    ext = _ext()
    for sig in sigs:
        left = [r for r in _sampling.get(int(sig), []) if r != resync]
        if left:
            _sampling[int(sig)] = left
            continue
        _sampling.pop(int(sig), None)
        if int(sig) in _wanted_default and ext is not None:
            try:
                info = ext.handler_info(int(sig))
                # SIG_IGN in its place, or CPython's handler that the built-in engine put back
                if info.get("kind") == "ignore" or info.get("python"):
                    ext.set_default(int(sig))
            except (OSError, ValueError):
                pass


class Conflicts:
    """Counts signal conflicts and logs one WARNING per signal and process (later ones: INFO)."""

    def __init__(self) -> None:
        self.count = 0

    def report(self, sig: int, message: str) -> None:
        self.count += 1
        warned = _warned.setdefault(os.getpid(), set())
        if sig in warned:
            logger.info("%s", message)
        else:
            warned.add(sig)
            logger.warning("%s", message)


def foreign_at_start(sig: int, own_bases: Sequence[int] = ()) -> Optional[str]:
    """Who holds sig now, when it is neither the default, ignored, nor asprof's: else None."""
    ext = _ext()
    if ext is None:
        return None
    try:
        info = ext.handler_info(sig)
    except (OSError, ValueError):
        return None
    if info.get("kind") != "handler" or info.get("asprof") or int(info.get("base", 0)) in own_bases:
        return None
    if _is_asprof_object(info.get("object")):
        return None
    return owner(info, sig)


def _wall_signal(held: Sequence[int], wall: bool) -> int:
    """Which of the signals async-profiler's handlers hold is its wall-clock one (0: none).
    Its choice (os_linux.cpp, getProfilingSignal): CPU from SIGPROF, wall from SIGVTALRM,
    each going on through SIGSTKFLT, SIGPWR, SIGRTMIN... when taken, never the other's."""
    if signal.SIGVTALRM in held:
        return int(signal.SIGVTALRM)  # also CPU sampling's last resort (its wall-clock engine, CPU only)
    if not wall:
        return 0
    others = [s for s in held if s != signal.SIGPROF and s != signal.SIGALRM]
    if signal.SIGPROF in held and others:
        return others[0]
    order = [getattr(signal, "SIGSTKFLT", 16), signal.SIGPWR] + list(range(signal.SIGRTMIN, signal.SIGRTMAX + 1))
    ranked = sorted(others, key=lambda s: order.index(s) if s in order else 99)
    return ranked[1] if len(ranked) >= 2 else 0


class AsyncProfilerSignals:
    """The signals async-profiler samples with, watched (see the module docstring)."""

    def __init__(self, library_path: str, wall: bool) -> None:
        self._ext = _ext()
        self._library_path = library_path
        self._wall = wall
        self.conflicts = Conflicts()
        self._warned_start: Set[int] = set()
        self.watched: List[int] = []
        self._events_lost = int(self._ext.stats().get("events_lost", 0)) if self._ext is not None else 0

    def _bases(self) -> List[int]:
        ext = self._ext
        bases = []
        b = ext.object_base(self._library_path, "asprof_init")
        if b:
            bases.append(int(b))
        pf = sys.modules.get("asprof._pyframes")
        path = getattr(pf, "__file__", None)
        if path:
            b = ext.object_base(path, "PyInit__pyframes")
            if b:
                bases.append(int(b))
        return bases

    def after_start(self) -> None:
        """After each start of async-profiler (and each restart): watch the signals its handlers
        hold now; a profiling signal another handler held before the start is one conflict."""
        ext = self._ext
        if ext is None:
            return
        try:
            bases = self._bases()
            if not bases:
                logger.debug("signal ownership not watched: async-profiler's load address is unknown")
                return
            held = [s for s in _candidates() if _holds(ext, s, bases)]
            watched = list(ext.watch(bases, _wall_signal(held, self._wall)))
            sampling_with(watched, ext.check)
            not_sampling_with(self.watched, ext.check)
            self.watched = watched
        except Exception as e:  # noqa: BLE001 - profiling goes on without the watch
            logger.debug("signal ownership not watched: %r", e)
            return
        wanted = [int(signal.SIGPROF)] + ([int(signal.SIGVTALRM)] if self._wall else [])
        for sig in wanted:
            if sig in self.watched or sig in self._warned_start:
                continue
            who = foreign_at_start(sig, bases)
            if who is None:
                continue
            self._warned_start.add(sig)
            moved = [signal_name(s) for s in self.watched if s not in wanted]
            where = f"samples on {', '.join(moved)} instead" if moved else "samples on another signal"
            self.conflicts.report(sig, f"{signal_name(sig)} already has a handler that is not asprof's ({who}): "
                                       f"async-profiler leaves {signal_name(sig)} to it and {where}")

    def poll(self) -> None:
        """Logs the takeovers the watcher saw since the last poll (each tick)."""
        ext = self._ext
        if ext is None:
            return
        try:
            events = ext.poll()
        except Exception:  # noqa: BLE001
            return
        try:
            lost = int(ext.stats().get("events_lost", 0)) - self._events_lost
            self._events_lost += lost
            self.conflicts.count += max(0, lost)  # takeovers beyond the C queue: counted, not named
        except Exception:  # noqa: BLE001
            pass
        for sig, address, _flags in events:
            who = address_owner(address, sig)
            self.conflicts.report(sig, f"{signal_name(sig)} was taken over by {who} while profiling: asprof put "
                                       f"its handler back in front and passes the signals that are not its own "
                                       f"on to that handler (async-profiler's perf events that stopped meanwhile were "
                                       f"re-armed)")

    def stop(self) -> None:
        """After the final stop: the watcher ends, the application's handlers are given back."""
        if self._ext is None:
            return
        self.poll()
        try:
            self._ext.unwatch()
        except Exception:  # noqa: BLE001
            logger.debug("stopping the signal watcher failed", exc_info=True)
        not_sampling_with(self.watched, self._ext.check)
        self.watched = []

    def stats(self) -> Dict[str, Any]:
        return dict(self._ext.stats()) if self._ext is not None else {}


def _candidates() -> List[int]:
    """The signals async-profiler may sample with (and SIGALRM): as csrc/signals' candidate()."""
    fixed = [signal.SIGPROF, signal.SIGVTALRM, signal.SIGALRM, getattr(signal, "SIGSTKFLT", 16), signal.SIGPWR]
    return [int(s) for s in fixed] + list(range(int(signal.SIGRTMIN), min(int(signal.SIGRTMAX), 64) + 1))


def _holds(ext: Any, sig: int, bases: Sequence[int]) -> bool:
    try:
        info = ext.handler_info(sig)
    except (OSError, ValueError):
        return False
    return bool(info.get("trampoline")) or int(info.get("base", 0)) in bases
