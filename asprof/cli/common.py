"""Options shared by ``asprof convert`` and ``asprof top``, and the progress indicator."""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import IO, TYPE_CHECKING, Any, Callable, Dict, List, Optional, Union

from asprof.jfr.inputs import DEFAULT_LIMITS, ReadLimits
from asprof.jfr.profile import Profile, TimeSpec
from asprof.jfr.reader import Recording, open_recording

if TYPE_CHECKING:  # pragma: no cover
    from datetime import datetime, timedelta

__all__ = ["add_input_args", "add_profile_args", "open_inputs", "read_limits", "profile_from_args", "parse_time", "Progress"]

_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ns|us|ms|s|m|h)?$")
_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_time(text: str) -> Union[datetime, timedelta, "_TimeOfDay"]:
    """A ``--from``/``--to`` value.

    * ``N`` (milliseconds, as in async-profiler's converter) or ``N<unit>`` with
      unit ns/us/ms/s/m/h: offset from the start of the recording; negative
      values count back from its end. A bare number of 1.5e12 or more is an
      absolute time in epoch milliseconds.
    * ``YYYY-MM-DDTHH:MM:SS[.f][Z|+HH:MM]``: absolute (local time without a zone).
    * ``HH:MM[:SS[.f]]``: that time of day (local), on the recording's first day.
    """
    from datetime import datetime, timedelta, timezone

    s = text.strip()
    m = _DURATION.match(s)
    if m:
        value = float(m.group(1))
        unit = m.group(2)
        if unit is None:
            if value >= 1.5e12:
                return datetime.fromtimestamp(value / 1000.0, tz=timezone.utc)
            unit = "ms"
        return timedelta(seconds=value * _UNITS[unit])
    if re.match(r"^\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?$", s):
        parts = s.split(":")
        sec = float(parts[2]) if len(parts) > 2 else 0.0
        return _TimeOfDay(int(parts[0]), int(parts[1]), sec)
    try:
        iso = s[:-1] + "+00:00" if s.endswith("Z") else s
        return datetime.fromisoformat(iso)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r} (use e.g. 1500ms, 10s, -30s, 12:34:56 or 2024-01-02T12:34:56Z)") from None


class _TimeOfDay:
    def __init__(self, h: int, m: int, s: float) -> None:
        self.h, self.m, self.s = h, m, s

    def on(self, start_nanos: int) -> "datetime":
        from datetime import datetime

        day = datetime.fromtimestamp(start_nanos / 1e9).astimezone()
        return day.replace(hour=self.h, minute=self.m, second=int(self.s),
                           microsecond=int(round((self.s % 1) * 1e6)))


def _resolve_time(spec: Any, rec: Recording) -> TimeSpec:
    if isinstance(spec, _TimeOfDay):
        return spec.on(rec.start_nanos)
    return spec  # type: ignore[no-any-return]


def add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IN",
                   help=".jfr file, S3 reporter .zip, gzipped JFR, or a directory of them "
                        "(several are merged in time order)")
    g = p.add_argument_group("read limits (hostile or damaged inputs stop with one line; see docs/reading-profiles.md)")
    g.add_argument("--max-size", type=_size_arg, default=None, metavar="SIZE",
                   help="largest input or zip entry after decompression (default 1GiB, or $ASPROF_READ_MAX_SIZE)")
    g.add_argument("--max-ratio", type=_positive(float), default=None, metavar="N",
                   help="largest decompressed/compressed ratio past 16 MiB (default 50)")
    g.add_argument("--max-files", type=_positive(int), default=None, metavar="N",
                   help="most profiles read from one directory, entries in one zip (default 10000)")


def _size_arg(text: str) -> int:
    from asprof.autostart.values import parse_size

    v = parse_size(text)
    if v is None or v < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 512m, 2GiB or a number of bytes)")
    return int(v)


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            v = None
        if v is None or not v > 0 or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(f"invalid value {text!r} (a positive number)")
        return v

    return parse


def read_limits(args: argparse.Namespace) -> ReadLimits:
    """The read limits of the command line: ``--max-size`` (else ``ASPROF_READ_MAX_SIZE``),
    ``--max-ratio``, ``--max-files``; the reader's defaults for the rest."""
    from asprof.cli import CliError

    d = DEFAULT_LIMITS
    size = getattr(args, "max_size", None)
    if size is None:
        env = os.environ.get("ASPROF_READ_MAX_SIZE", "").strip()
        if env:
            try:
                size = _size_arg(env)
            except argparse.ArgumentTypeError:
                raise CliError(f"invalid ASPROF_READ_MAX_SIZE={env!r}: use e.g. 512m, 2GiB or a number of bytes",
                               2) from None
    ratio = getattr(args, "max_ratio", None)
    files = getattr(args, "max_files", None)
    return ReadLimits(max_size=size or d.max_size, max_ratio=ratio or d.max_ratio,
                      ratio_floor=d.ratio_floor, max_files=files or d.max_files)


def add_profile_args(p: argparse.ArgumentParser) -> None:
    kinds = p.add_argument_group("profile kind (default: cpu, or the first kind the recording has)")
    k = kinds.add_mutually_exclusive_group()
    k.add_argument("--cpu", dest="kind", action="store_const", const="cpu",
                   help="CPU samples (jdk.ExecutionSample)")
    k.add_argument("--wall", dest="kind", action="store_const", const="wall",
                   help="wall-clock samples (profiler.WallClockSample)")
    k.add_argument("--nativemem", dest="kind", action="store_const", const="nativemem",
                   help="native memory: bytes allocated (profiler.Malloc)")
    k.add_argument("--leaks", "--leak", dest="kind", action="store_const", const="leaks",
                   help="native memory leaks: allocations never freed")
    k.add_argument("--alloc", dest="kind", action="store_const", const="alloc",
                   help="Python allocations: estimated bytes allocated (jdk.ObjectAllocationSample; "
                        "--count: objects)")
    k.add_argument("--live", dest="kind", action="store_const", const="live",
                   help="Python live heap: estimated bytes still allocated at the newest report of each "
                        "process (profiler.LiveObject; --count: objects)")
    p.set_defaults(kind="auto")
    f = p.add_argument_group("filters")
    f.add_argument("--threads", "-t", action="store_true", help="split the profile per thread")
    f.add_argument("--thread", action="append", metavar="NAME", default=None,
                   help="only samples of this thread (name, regex of the whole name, or tid); repeatable")
    f.add_argument("--from", dest="from_", type=parse_time, metavar="TIME",
                   help="start of the time range: offset from the start (1500ms, 10s; a bare number is ms) or from "
                        "the end (--from=-30s), or a date/time (2024-01-02T12:34:56Z, 12:34:56)")
    f.add_argument("--to", type=parse_time, metavar="TIME", help="end of the time range (like --from)")
    f.add_argument("--include", "-I", action="append", metavar="REGEX",
                   help="only stacks with a frame whose whole name matches REGEX; repeatable")
    f.add_argument("--exclude", "-X", action="append", metavar="REGEX",
                   help="drop stacks with a frame whose whole name matches REGEX; repeatable")
    f.add_argument("--where", action="append", metavar="LABEL=VALUE", default=None,
                   help="only samples whose request label LABEL is VALUE (asprof.labels; "
                        "LABEL= : samples without that label); repeatable")
    f.add_argument("--count", action="store_true",
                   help="weigh each event 1 (e.g. number of allocations instead of bytes; "
                        "--alloc/--live: the estimated number of objects)")
    f.add_argument("--tail", type=_ratio, default=0.1, metavar="RATIO",
                   help="leaks: ignore allocations in the last RATIO of the recording (default 10%%)")
    s = p.add_argument_group("Python frames (CPython profiles recorded with python_frames)")
    v = s.add_mutually_exclusive_group()
    v.add_argument("--python-only", dest="python", action="store_const", const="python", default="mixed",
                   help="only the Python frames of each stack")
    v.add_argument("--native-only", dest="python", action="store_const", const="native",
                   help="the native stacks as async-profiler recorded them")


def _ratio(text: str) -> float:
    try:
        v = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid ratio {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError("ratio must be between 0 and 1 (or 0% and 100%)")
    return v


class Progress:
    """A one-line progress indicator on stderr, only when it is a terminal."""

    def __init__(self, stream: Optional[IO[str]] = None, min_bytes: int = 4 << 20) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_bytes = min_bytes
        self._last = 0.0
        self._shown = False
        self._t0 = time.monotonic()

    def reading(self, done: int, total: int) -> None:
        if not self.enabled or total < self.min_bytes:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        pct = min(100.0, 100.0 * done / total) if total else 100.0
        self._write(f"reading profile... {pct:.0f}%")

    def stage(self, text: str) -> None:
        if self.enabled and self._shown:
            self._write(text)

    def _write(self, text: str) -> None:
        self._shown = True
        try:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
        except OSError:
            self.enabled = False

    def done(self) -> None:
        if self.enabled and self._shown:
            try:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            except OSError:
                pass
        self._shown = False


def open_inputs(inputs: List[str], progress: Optional[Progress] = None,
                limits: Optional[ReadLimits] = None) -> Recording:
    """The recording of the command line's inputs, read within ``limits`` (see :func:`read_limits`)."""
    cb: Optional[Callable[[int, int], None]] = progress.reading if progress is not None else None
    return open_recording(inputs if len(inputs) > 1 else inputs[0], cb, limits)


def profile_from_args(rec: Recording, args: argparse.Namespace) -> Profile:
    return rec.samples(
        args.kind,
        threads=args.thread,
        start=_resolve_time(args.from_, rec),
        end=_resolve_time(args.to, rec),
        include=args.include,
        exclude=args.exclude,
        by_thread=args.threads,
        count=args.count,
        tail=args.tail,
        python=getattr(args, "python", "mixed"),
        where=_where(args),
        by_label=getattr(args, "by_label", None),
        with_labels=bool(getattr(args, "with_labels", False)),
    )


def _where(args: argparse.Namespace) -> Optional[Dict[str, str]]:
    from asprof.jfr.labels import parse_where

    return parse_where(getattr(args, "where", None)) or None
