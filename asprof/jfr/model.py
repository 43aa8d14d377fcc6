"""Value types of the JFR reader: frames, threads, stack traces, events, settings."""
from __future__ import annotations

import enum
from typing import Any, Dict, NamedTuple, Optional, Protocol, Tuple

__all__ = ["FrameType", "Frame", "Thread", "StackTrace", "Event", "Setting", "FRAME_SUFFIX"]


class FrameType(enum.IntEnum):
    """Kind of a stack frame, as async-profiler numbers them (``jdk.types.FrameType``)."""

    INTERPRETED = 0
    JIT_COMPILED = 1
    INLINED = 2
    NATIVE = 3
    CPP = 4
    KERNEL = 5
    C1_COMPILED = 6
    #: Python-level frames (joined in from another source, not written by async-profiler)
    PYTHON = 7
    UNKNOWN = -1

    @classmethod
    def from_name(cls, name: Optional[str]) -> "FrameType":
        return _FRAME_TYPE_NAMES.get(name or "", FrameType.UNKNOWN)

    @property
    def is_java(self) -> bool:
        return self in (FrameType.INTERPRETED, FrameType.JIT_COMPILED, FrameType.INLINED, FrameType.C1_COMPILED)


_FRAME_TYPE_NAMES = {
    "Interpreted": FrameType.INTERPRETED,
    "JIT compiled": FrameType.JIT_COMPILED,
    "Inlined": FrameType.INLINED,
    "Native": FrameType.NATIVE,
    "C++": FrameType.CPP,
    "Kernel": FrameType.KERNEL,
    "C1 compiled": FrameType.C1_COMPILED,
    "Python": FrameType.PYTHON,
}

#: Suffix that async-profiler's collapsed output appends per frame type.
FRAME_SUFFIX = {
    FrameType.INTERPRETED: "_[0]",
    FrameType.JIT_COMPILED: "_[j]",
    FrameType.INLINED: "_[i]",
    FrameType.NATIVE: "",
    FrameType.CPP: "",
    FrameType.KERNEL: "_[k]",
    FrameType.C1_COMPILED: "_[1]",
    FrameType.PYTHON: "",
    FrameType.UNKNOWN: "",
}


class Frame(NamedTuple):
    """One frame of a stack trace.

    ``method`` is the method or symbol name; ``owner`` the class (Java) or the
    library basename (native code, ``""`` when unknown). ``name`` is the
    display name that async-profiler's converter prints: the method alone for
    native/C++/kernel frames, ``Class.method`` for Java frames.
    """

    name: str
    method: str
    owner: str
    type: FrameType
    line: int = 0
    bci: int = 0

    @property
    def is_native(self) -> bool:
        return self.type in (FrameType.NATIVE, FrameType.CPP, FrameType.KERNEL)

    def __str__(self) -> str:
        return self.name


class Thread(NamedTuple):
    """A thread of the Thread constant pool. ``key`` is what events refer to
    (the OS thread id for async-profiler)."""

    key: int
    os_name: Optional[str]
    os_thread_id: int
    java_name: Optional[str] = None
    java_thread_id: int = 0

    @property
    def name(self) -> str:
        return self.java_name or self.os_name or f"[tid={self.os_thread_id}]"

    @property
    def tid(self) -> int:
        return self.os_thread_id or self.key

    @property
    def label(self) -> str:
        """The thread frame async-profiler's converter uses: ``[name tid=N]``."""
        name = self.java_name if self.java_name is not None else self.os_name
        if name is None:
            return f"[tid={self.key}]"
        return name if name.startswith("[tid=") else f"[{name} tid={self.key}]"


class StackTrace(NamedTuple):
    """A stack trace; ``frames[0]`` is the leaf (innermost) frame."""

    key: int
    frames: Tuple[Frame, ...]
    truncated: bool = False



class Setting(NamedTuple):
    """A ``jdk.ActiveSetting`` event: ``event_id`` is the type id the setting belongs to."""

    event_id: int
    name: str
    value: Optional[str]


class _EventChunk(Protocol):
    """What an :class:`Event` asks of its chunk (:class:`asprof.jfr.chunk.Chunk`)."""

    def ticks_to_nanos(self, ticks: int) -> int: ...

    def resolve(self, value: Any) -> Any: ...

    def thread(self, key: int) -> "Thread": ...

    def stack_trace(self, key: int) -> Optional["StackTrace"]: ...


class Event:
    """One event, decoded generically from its chunk's metadata.

    ``raw`` holds the fields as read (constant-pool references unresolved);
    ``values`` resolves them (threads, stack traces, strings, nested pools),
    in the shape ``jfr print --json`` uses. ``ticks``/``time_ns`` are the
    event's ``startTime`` in ticks and in nanoseconds since the epoch.
    """

    __slots__ = ("type", "type_id", "chunk", "offset", "raw")

    def __init__(self, type: str, type_id: int, chunk: _EventChunk, offset: int, raw: Dict[str, Any]) -> None:
        self.type = type
        self.type_id = type_id
        self.chunk = chunk
        self.offset = offset
        self.raw = raw

    def __repr__(self) -> str:
        return f"Event({self.type!r}, offset={self.offset}, ticks={self.ticks})"

    @property
    def ticks(self) -> Optional[int]:
        t = self.raw.get("startTime")
        return t if isinstance(t, int) else None

    @property
    def time_ns(self) -> Optional[int]:
        t = self.ticks
        return None if t is None else self.chunk.ticks_to_nanos(t)

    @property
    def values(self) -> Dict[str, Any]:
        return {k: self.chunk.resolve(v) for k, v in self.raw.items()}

    def __getitem__(self, name: str) -> Any:
        return self.chunk.resolve(self.raw[name])

    def get(self, name: str, default: Any = None) -> Any:
        if name not in self.raw:
            return default
        return self.chunk.resolve(self.raw[name])

    @property
    def thread(self) -> Optional[Thread]:
        for name in ("sampledThread", "eventThread"):
            ref = self.raw.get(name)
            if ref is not None:
                return self.chunk.thread(getattr(ref, "key", ref))
        return None

    @property
    def stack_trace(self) -> Optional[StackTrace]:
        ref = self.raw.get("stackTrace")
        if ref is None:
            return None
        return self.chunk.stack_trace(getattr(ref, "key", ref))
