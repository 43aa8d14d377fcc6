"""What the agent loop drives: the :class:`Engine` protocol and a tick's :class:`TickResult`.

An engine records samples and hands over finished JFR recordings; ``asyncprofiler.NativeEngine``
is async-profiler through the native core. Tests use fakes.
"""
from __future__ import annotations

from typing import Optional

from asprof.errors import ProfilerError

__all__ = ["Engine", "TickResult"]


class TickResult:
    """A finished recording (or None), and the error of the restart if any.

    A plain class, not a dataclass: this module is on the path of every ``start()``, and
    importing :mod:`dataclasses` or making one costs milliseconds there."""

    __slots__ = ("recording", "restart_error")

    def __init__(self, recording: Optional[bytes], restart_error: Optional[ProfilerError] = None) -> None:
        self.recording = recording
        self.restart_error = restart_error

    def __repr__(self) -> str:
        size = None if self.recording is None else len(self.recording)
        return f"TickResult(recording={size} bytes, restart_error={self.restart_error!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TickResult):
            return NotImplemented
        return (self.recording, self.restart_error) == (other.recording, other.restart_error)

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass it replaces


class Engine:
    """What the agent loop drives. ``NativeEngine`` is the real one; tests use fakes."""

    def start(self) -> None:
        """Starts recording; raises ProfilerError."""
        raise NotImplementedError

    def tick(self) -> TickResult:
        """Hands over what was recorded since the last tick (rotating the recording);
        raises ProfilerError when async-profiler cannot be stopped."""
        raise NotImplementedError

    def stop(self) -> Optional[bytes]:
        """Stops and returns the last recording (None if nothing was recorded)."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases resources; must not raise."""

    def before_fork(self) -> bool:
        """Called by the forking thread before os.fork(): make the child's copy of the
        engine safe to restart. Returns True when the child may profile itself."""
        return False

    def after_fork_in_parent(self) -> None:
        """Called in the parent after os.fork(): carry on recording."""

    def after_fork_in_child(self) -> None:
        """Called in the child after os.fork(): this engine now belongs to the parent."""

    def memory_bytes(self) -> Optional[int]:
        """Memory the engine holds (async-profiler's buffers and the recording), if known."""
        return None

    def signal_conflicts(self) -> int:
        """Profiling signals found held by a handler that is not the engine's (at start, or taken
        over while profiling), since the engine started (issue #13). 0 when none or unknown."""
        return 0

    def cpu_seconds_elsewhere(self) -> float:
        """CPU time the engine spent on threads that are not its own (a signal handler running
        on the application's threads), cumulative; the overhead guard adds it to its own
        threads' time. 0 when none or unknown."""
        return 0.0
