"""ProfilerOptions: what async-profiler samples, validated before use.

Every value here ends up in async-profiler's command string
(``start,event=cpu,interval=...``), where a ``,`` or ``=`` would add
arguments of the caller's choosing. Values are therefore checked when the
options are built, and a bad one raises ``ValueError`` naming the option.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

from asprof.autostart.values import (
    DEFAULT_CPU_INTERVAL,
    DEFAULT_WALL_INTERVAL,
    ENGINE_NAMES,
    MAX_PROFILER_INTERVAL,
    MIN_CPU_INTERVAL,
    MIN_WALL_INTERVAL,
    parse_size,
)

__all__ = ["ProfilerOptions", "DEFAULT_CPU_INTERVAL", "DEFAULT_WALL_INTERVAL"]

_CSTACK = ("dwarf", "fp", "no")


def _interval(name: str, value: object, *, allow_none: bool = False, minimum: float = MIN_CPU_INTERVAL) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if v < minimum or v > MAX_PROFILER_INTERVAL:
        raise ValueError(f"{name} must be between {minimum:g} s and 1 hour, got {value!r} s")
    return v


def _native_mem(value: object) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"native_mem must be a byte count or a size like '10m', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"native_mem must not be negative, got {value!r}")
        return value
    if isinstance(value, str):
        size = None if any(c.isspace() for c in value) else parse_size(value)
        if size is None or size != int(size) or size >= 1 << 50:
            raise ValueError(
                f"native_mem must be a byte count or a size like '512k', '10m', '1g', got {value!r}"
            )
        return int(size)
    raise ValueError(f"native_mem must be a byte count or a size like '10m', got {value!r}")


#: The Python allocation sampling interval ``python_alloc=True`` / ``ASPROF_PYTHON_ALLOC=on`` means.
DEFAULT_PYTHON_ALLOC = 512 * 1024


def _python_alloc(value: object) -> Optional[int]:  # issue #16
    """None (off), or the mean number of bytes between two sampled Python allocations."""
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULT_PYTHON_ALLOC
    size: Optional[float] = None
    if isinstance(value, int):
        size = float(value)
    elif isinstance(value, str):
        t = value.strip().lower()
        if t in ("off", "false", "no", "0"):
            return None
        if t in ("on", "true", "yes"):
            return DEFAULT_PYTHON_ALLOC
        size = None if any(c.isspace() for c in value) else parse_size(value)
    if size is None or size != int(size) or not 1 <= size <= 1 << 40:
        raise ValueError(f"python_alloc must be None, True, or a byte interval (1 byte to 1 TiB) "
                         f"such as 524288 or '512k', got {value!r}")
    return int(size)


@dataclass(frozen=True)
class ProfilerOptions:
    """What the engine records (async-profiler, or the built-in engine: ``engine``).

    - ``cpu_interval``: seconds of CPU time between CPU samples (default 0.1).
    - ``wall_interval``: seconds between wall-clock samples of each thread
      (default 1.0); ``None`` turns wall-clock sampling off.
    - ``native_mem``: sample native allocations every that many bytes
      (an int, or a string such as ``"10m"``); ``0`` records every
      allocation; ``None`` (default) turns it off.
    - ``all_user``: leave kernel frames out of CPU stacks (async-profiler's
      ``alluser``). On by default: Python services rarely need kernel frames,
      and it saves memory and start-up time (see benchmarks/README.md).
    - ``cstack``: how native stacks are walked: ``"dwarf"`` (default; CPython
      is usually built without frame pointers), ``"fp"`` or ``"no"``.
    - ``force_native_mem``: sample native memory even on interpreters where
      async-profiler's malloc hooks are known to crash the process.
    - ``python_frames``: give every CPU and wall-clock sample the Python stack of the
      thread it interrupted (issue #5; needs async-profiler 4.1+ and CPython 3.9-3.13,
      otherwise off with one log line). On by default.
    - ``python_frames_inline`` (issue #12): with async-profiler, each report is rewritten (on
      the agent thread, before it reaches the reporter) so that its stack traces carry those
      Python frames in place of the interpreter's ``_PyEval_EvalFrameDefault`` frames: every
      JFR tool (``jfrconv``, the JDK ``jfr`` tool, JMC) then shows the Python code. A report
      that cannot be rewritten is reported as recorded, with one log line. On by default; the
      built-in engine's reports have their Python frames inline anyway.
    - ``engine``: what samples (issue #11): ``"auto"`` (default: async-profiler when it
      loads, else the built-in engine, with one log line), ``"async-profiler"`` or
      ``"builtin"`` (asprof's own sampler: CPU and wall-clock samples with Python stacks and
      the native leaf frame; no native memory). ``ASPROF_ENGINE`` applies when this is ``auto``.
    - ``python_alloc``: sample Python allocations (issue #16; see docs/memory.md): about one
      every that many bytes allocated (an int, or a string such as ``"512k"``; ``True`` means
      512 KiB), each with its Python stack, and report the sampled objects still alive; ``None``
      (default) turns it off. Works with both engines.
    - ``asyncio_steps`` (issue #15): hook the standard asyncio event loop and record each step
      (callback or task step) during which a sample was taken, for ``asprof longsteps``
      (docs/labels.md). On by default.
    - ``otel_span_ids`` (issue #15): while an OpenTelemetry span is active (``opentelemetry``
      importable), ``asprof.labels`` blocks also label their samples with its ``trace_id`` and
      ``span_id``. Off by default (one label set per span).
    """

    cpu_interval: float = DEFAULT_CPU_INTERVAL
    wall_interval: Optional[float] = DEFAULT_WALL_INTERVAL
    native_mem: Union[int, str, None] = None
    all_user: bool = True
    cstack: str = "dwarf"
    force_native_mem: bool = False
    python_frames: bool = True  # issue #5
    engine: str = "auto"  # issue #11
    asyncio_steps: bool = True  # issue #15
    otel_span_ids: bool = False  # issue #15
    python_alloc: Union[int, str, bool, None] = None  # issue #16
    python_frames_inline: bool = True  # issue #12

    def __post_init__(self) -> None:
        cpu = _interval("cpu_interval", self.cpu_interval)
        wall = _interval("wall_interval", self.wall_interval, allow_none=True, minimum=MIN_WALL_INTERVAL)
        mem = _native_mem(self.native_mem)
        if not isinstance(self.all_user, bool):
            raise ValueError(f"all_user must be True or False, got {self.all_user!r}")
        if not isinstance(self.force_native_mem, bool):
            raise ValueError(f"force_native_mem must be True or False, got {self.force_native_mem!r}")
        if not isinstance(self.python_frames, bool):  # issue #5
            raise ValueError(f"python_frames must be True or False, got {self.python_frames!r}")
        if not isinstance(self.python_frames_inline, bool):  # issue #12
            raise ValueError(f"python_frames_inline must be True or False, got {self.python_frames_inline!r}")
        for flag in ("asyncio_steps", "otel_span_ids"):  # issue #15
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if not isinstance(self.engine, str) or self.engine not in ENGINE_NAMES:  # issue #11
            raise ValueError(f"engine must be one of {', '.join(ENGINE_NAMES)}, got {self.engine!r}")
        if self.engine == "builtin" and mem is not None:
            raise ValueError(f"native_mem={self.native_mem!r} needs engine='async-profiler' (or 'auto'): "
                             "the built-in engine does not sample native memory")
        if not isinstance(self.cstack, str) or self.cstack not in _CSTACK:
            raise ValueError(f"cstack must be one of {', '.join(_CSTACK)}, got {self.cstack!r}")
        object.__setattr__(self, "cpu_interval", cpu)
        object.__setattr__(self, "wall_interval", wall)
        object.__setattr__(self, "native_mem", mem)
        object.__setattr__(self, "python_alloc", _python_alloc(self.python_alloc))  # issue #16

    @property
    def cpu_interval_ns(self) -> int:
        return max(1, round(self.cpu_interval * 1e9))

    @property
    def wall_interval_ms(self) -> Optional[int]:
        return None if self.wall_interval is None else max(1, round(self.wall_interval * 1e3))

    def start_command(self) -> str:
        """async-profiler's start command, without ``file=`` and the log arguments.

        The same format as the Rust agent:
        ``start,event=cpu,interval={ns},wall={ms}ms,jfr,cstack=dwarf[,nativemem={bytes}]``.
        """
        parts = ["start", "event=cpu", f"interval={self.cpu_interval_ns}"]
        wall_ms = self.wall_interval_ms
        if wall_ms is not None:
            parts.append(f"wall={wall_ms}ms")
        parts += ["jfr", f"cstack={self.cstack}"]
        if self.all_user:
            parts.append("alluser")
        if self.native_mem is not None:
            parts.append(f"nativemem={self.native_mem}")
        command = ",".join(parts)
        # Defence in depth: nothing above can contain these, by construction.
        assert not any(c in command for c in "\n\0") and "file=" not in command
        return command
