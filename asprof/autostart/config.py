"""Configuration from the environment: the ``ASPROF_*`` variables.

``start_from_environment()`` is what ``import asprof.auto`` and
``asprof run`` use: it reads the variables (see :data:`VARIABLES` and
docs/configuration.md), builds a :class:`~asprof.Profiler` and starts it.
It never raises: an invalid value gives one log line naming the variable and
the value, profiling stays off, and the application goes on.

``EnvConfig.from_environ()`` parses without starting anything (it raises
:class:`ConfigError`); ``build_profiler()`` returns the configured
``Profiler`` for code that wants to start it itself.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
import re
import sys
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple

if TYPE_CHECKING:
    from asprof.profiler import Profiler, RunningProfiler
    from asprof.options import ProfilerOptions
    from asprof.reporter.base import Reporter

__all__ = [
    "ConfigError",
    "EnvConfig",
    "Variable",
    "VARIABLES",
    "build_profiler",
    "start_from_environment",
    "auto_start",
    "parse_duration",
    "parse_bool",
]

logger = logging.getLogger("asprof")

PREFIX = "ASPROF_"
DEFAULT_DIRECTORY = "profiles"
DEFAULT_REPORTING_INTERVAL = 30.0
MIN_REPORTING_INTERVAL = 0.1
MAX_REPORTING_INTERVAL = 24 * 3600.0
_MAX_PROFILER_INTERVAL = 3600.0

_TRUE = frozenset({"1", "true", "yes", "on", "enabled"})
_FALSE = frozenset({"0", "false", "no", "off", "disabled"})
_OFF = frozenset({"off", "none", "no", "false", "disabled"})
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([-+]?[0-9]{1,3}))?\s*([a-zµ]*)$")
_DURATION_UNITS = {
    "": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hour": 3600.0, "hours": 3600.0,
}
_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)$")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
}
_MB_UNITS = {"": 1.0, "m": 1.0, "mb": 1.0, "mib": 1.0, "k": 1 / 1024, "kb": 1 / 1024, "kib": 1 / 1024,
             "g": 1024.0, "gb": 1024.0, "gib": 1024.0}
_NUMBER = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)$")
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_ACCOUNT_ID = re.compile(r"^[0-9]{12}$")
_MAX_TAG_VALUE = 256


class ConfigError(ValueError):
    """An ``ASPROF_*`` variable has a value that cannot be used."""

    def __init__(self, variable: str, value: Optional[str], reason: str) -> None:
        self.variable = variable
        self.value = value
        self.reason = reason
        shown = f"{variable}={value!r}" if value is not None else variable
        super().__init__(f"invalid {shown}: {reason}")


@dataclass(frozen=True)
class Variable:
    """One documented environment variable (the table of docs/configuration.md)."""

    name: str
    default: str
    meaning: str
    cli: Optional[str] = None  # the `asprof run` option that sets it


VARIABLES: Tuple[Variable, ...] = (
    Variable("ASPROF_ENABLED", "`1`",
             "`0`/`false`/`no`/`off` turns profiling off: a kill switch that wins over code "
             "(`Profiler.start()` too); `1`/`true`/`yes`/`on` leaves it on.", "`--disable` (sets 0)"),
    Variable("ASPROF_REPORTER", "`profiles`",
             "Where profiles go: a directory (`/var/profiles`, `./profiles`, `file:///var/profiles`, "
             "`local:/var/profiles`; created if missing), or `s3://bucket/prefix` (S3, needs "
             "`asprof[s3]`, `ASPROF_S3_BUCKET_OWNER` and a profiling group).", "--reporter"),
    Variable("ASPROF_S3_BUCKET_OWNER", "—",
             "With `s3://`: the 12-digit AWS account id that must own the bucket (ExpectedBucketOwner).",
             "--s3-bucket-owner"),
    Variable("ASPROF_PROFILING_GROUP", "`ASPROF_SERVICE`",
             "With `s3://`: the profiling group in the object keys (no `/`).", "--profiling-group"),
    Variable("ASPROF_S3_REGION", "boto3's",
             "With `s3://`: the bucket's region (else boto3's usual chain: `AWS_REGION`, config file).",
             "--s3-region"),
    Variable("ASPROF_S3_ENDPOINT_URL", "—",
             "With `s3://`: another S3 endpoint (`http://` or `https://`), e.g. a VPC endpoint or a local S3.",
             "--s3-endpoint-url"),
    Variable("ASPROF_S3_SPOOL_DIR", "in memory",
             "With `s3://`: a private directory where profiles wait for upload, surviving restarts.",
             "--s3-spool-dir"),
    Variable("ASPROF_REPORTING_INTERVAL", "`30s`",
             "Time between profiles: a duration, `30`, `30s`, `500ms`, `2m` (a bare number is seconds; "
             "0.1 s to 24 h).", "--interval"),
    Variable("ASPROF_CPU_INTERVAL", "`100ms`",
             "CPU time between CPU samples: a duration (`10ms`, `0.01`; 1 µs to 1 h).", "--cpu-interval"),
    Variable("ASPROF_WALL_INTERVAL", "`1s`",
             "Time between wall-clock samples of each thread: a duration (1 ms to 1 h), or `off`.",
             "--wall-interval"),
    Variable("ASPROF_NATIVE_MEM", "`off`",
             "Native memory sampling: bytes between samples (`10m`, `512k`, `1048576`), `all` for every "
             "allocation, or `off`. Refused on interpreters where it would crash (see `asprof doctor`).",
             "--native-mem"),
    Variable("ASPROF_FORCE_NATIVE_MEM", "`false`",
             "`true` samples native memory even where it is known to crash the interpreter.", None),
    Variable("ASPROF_CSTACK", "`dwarf`",
             "How native stacks are walked: `dwarf`, `fp` or `no`.", "--cstack"),
    Variable("ASPROF_ALL_USER", "`true`",
             "`true` leaves kernel frames out of CPU stacks (async-profiler's `alluser`).", None),
    Variable("ASPROF_LIB", "bundled, then the linker's search",
             "Path of `libasyncProfiler.so` (must exist).", "--lib"),
    Variable("ASPROF_LOG_LEVEL", "`warning`",
             "Level of the `asprof` logger: `debug`, `info`, `warning`, `error`, `critical`, `off`. "
             "Until the application configures logging, asprof's lines go to stderr.", "--log-level"),
    Variable("ASPROF_SERVICE", "—",
             "Service name, in the report metadata as `service` (and the default profiling group).",
             "--service"),
    Variable("ASPROF_VERSION", "—", "Service version, in the report metadata as `version`.",
             "--service-version"),
    Variable("ASPROF_ENV", "—", "Deployment environment (`prod`, `staging`...), in the report metadata as `env`.",
             "--env"),
    Variable("ASPROF_TAGS", "—",
             "More metadata: `key=value,key=value` (keys: letters, digits, `_.:/-`; values without `,`). "
             "`ASPROF_SERVICE`/`VERSION`/`ENV` win over tags of the same name.", "--tag"),
    Variable("ASPROF_KILL_SWITCH_FILE", "—",
             "A path checked at every tick: while the file exists profiling stops (within one interval) "
             "or does not start.", "--kill-switch-file"),
    Variable("ASPROF_MAX_CPU_PERCENT", "no limit",
             "Overhead guard: stop (with a log line) when the agent's and async-profiler's threads use more "
             "than this % of one core (`5`, `5%`).", "--max-cpu-percent"),
    Variable("ASPROF_MAX_MEMORY_MB", "no limit",
             "Overhead guard: stop (with a log line) when async-profiler's memory passes this many MiB "
             "(`256`, `256MB`, `1GB`).", "--max-memory-mb"),
)
KNOWN = frozenset(v.name for v in VARIABLES)


# ---------------------------------------------------------------- value parsers


def parse_bool(text: str) -> Optional[bool]:
    """``1/true/yes/on/enabled`` → True, ``0/false/no/off/disabled`` → False, else None."""
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    return None


def parse_duration(text: str) -> Optional[float]:
    """Seconds from ``30``, ``30s``, ``1.5s``, ``500ms``, ``250us``, ``2m``, ``1h``; None if invalid."""
    m = _DURATION.fullmatch(text.strip().lower())
    if not m:
        return None
    unit = _DURATION_UNITS.get(m.group(3))
    if unit is None:
        return None
    number = float(m.group(1) + (f"e{m.group(2)}" if m.group(2) else ""))
    value = number * unit
    if math.isnan(value) or math.isinf(value):
        return None
    return value


def _size_bytes(text: str) -> Optional[float]:
    m = _SIZE.fullmatch(text.strip().lower())
    if not m:
        return None
    unit = _SIZE_UNITS.get(m.group(2))
    if unit is None:
        return None
    return float(m.group(1)) * unit


def _fmt_seconds(v: float) -> str:
    if v >= 1 or v == 0:
        return f"{v:g}s"
    if v >= 1e-3:
        return f"{v * 1e3:g}ms"
    return f"{v * 1e6:g}us"


# ---------------------------------------------------------------- the configuration


@dataclass(frozen=True)
class EnvConfig:
    """The agent's configuration as read from ``ASPROF_*`` variables."""

    enabled: bool = True
    reporter: str = DEFAULT_DIRECTORY  # as given (normalised), for messages
    directory: Optional[str] = DEFAULT_DIRECTORY  # a local reporter's directory, or None
    s3_bucket: Optional[str] = None
    s3_prefix: str = ""
    s3_bucket_owner: Optional[str] = None
    profiling_group: Optional[str] = None
    s3_region: Optional[str] = None
    s3_endpoint_url: Optional[str] = None
    s3_spool_dir: Optional[str] = None
    reporting_interval: float = DEFAULT_REPORTING_INTERVAL
    cpu_interval: float = 0.1
    wall_interval: Optional[float] = 1.0
    native_mem: Optional[int] = None
    force_native_mem: bool = False
    cstack: str = "dwarf"
    all_user: bool = True
    library_path: Optional[str] = None
    log_level: Optional[int] = None
    extra_metadata: Mapping[str, str] = field(default_factory=dict)
    kill_switch_file: Optional[str] = None
    max_cpu_percent: Optional[float] = None
    max_memory_mb: Optional[float] = None
    #: The ASPROF_* variables that were set (name → raw value), known or not.
    given: Mapping[str, str] = field(default_factory=dict)

    # ---- parsing

    @classmethod
    def from_environ(cls, environ: Optional[Mapping[str, str]] = None) -> "EnvConfig":
        """Parses ``environ`` (default ``os.environ``); raises :class:`ConfigError` at the first bad value.

        With ``ASPROF_ENABLED`` off nothing else is checked: the kill switch
        works whatever the other variables say.
        """
        env = os.environ if environ is None else environ
        given = {k: v for k, v in env.items() if k.startswith(PREFIX)}
        p = _Parser(given)
        enabled = p.enabled()
        if not enabled:
            return cls(enabled=False, given=given)
        log_level = p.log_level()
        reporter, directory, s3 = p.reporter()
        service = p.text("ASPROF_SERVICE")
        extra = p.extra_metadata(service)
        s3_fields: Dict[str, Any] = {}
        if s3 is not None:
            bucket, prefix = s3
            owner = p.text("ASPROF_S3_BUCKET_OWNER")
            if owner is None:
                raise ConfigError("ASPROF_S3_BUCKET_OWNER", given.get("ASPROF_S3_BUCKET_OWNER"),
                                  f"required with ASPROF_REPORTER={reporter!r}: the 12-digit AWS account id "
                                  "that owns the bucket")
            if not _ACCOUNT_ID.fullmatch(owner):
                raise ConfigError("ASPROF_S3_BUCKET_OWNER", given["ASPROF_S3_BUCKET_OWNER"],
                                  "expected a 12-digit AWS account id")
            group = p.text("ASPROF_PROFILING_GROUP")
            group_var = "ASPROF_PROFILING_GROUP"
            if group is None:
                group, group_var = service, "ASPROF_SERVICE"
            if group is None:
                raise ConfigError("ASPROF_PROFILING_GROUP", given.get("ASPROF_PROFILING_GROUP"),
                                  f"required with ASPROF_REPORTER={reporter!r} (or set ASPROF_SERVICE)")
            if "/" in group or not group.isprintable():
                raise ConfigError(group_var, given[group_var],
                                  "a profiling group must not contain '/' or control characters")
            endpoint = p.text("ASPROF_S3_ENDPOINT_URL")
            if endpoint is not None:
                u = urllib.parse.urlsplit(endpoint)
                if u.scheme not in ("http", "https") or not u.netloc:
                    raise ConfigError("ASPROF_S3_ENDPOINT_URL", given["ASPROF_S3_ENDPOINT_URL"],
                                      "expected an http:// or https:// URL")
            region = p.text("ASPROF_S3_REGION")
            if region is not None and not re.fullmatch(r"[a-z0-9-]{2,40}", region):
                raise ConfigError("ASPROF_S3_REGION", given["ASPROF_S3_REGION"],
                                  "expected an AWS region name such as us-east-1")
            s3_fields = dict(s3_bucket=bucket, s3_prefix=prefix, s3_bucket_owner=owner, profiling_group=group,
                             s3_region=region, s3_endpoint_url=endpoint,
                             s3_spool_dir=p.path("ASPROF_S3_SPOOL_DIR"))
        cfg = cls(
            enabled=True,
            reporter=reporter,
            directory=directory,
            reporting_interval=p.duration("ASPROF_REPORTING_INTERVAL", DEFAULT_REPORTING_INTERVAL,
                                          MIN_REPORTING_INTERVAL, MAX_REPORTING_INTERVAL),
            cpu_interval=p.duration("ASPROF_CPU_INTERVAL", 0.1, 1e-6, _MAX_PROFILER_INTERVAL),
            wall_interval=p.duration_or_off("ASPROF_WALL_INTERVAL", 1.0, 1e-3, _MAX_PROFILER_INTERVAL),
            native_mem=p.native_mem(),
            force_native_mem=p.boolean("ASPROF_FORCE_NATIVE_MEM", False),
            cstack=p.choice("ASPROF_CSTACK", "dwarf", ("dwarf", "fp", "no")),
            all_user=p.boolean("ASPROF_ALL_USER", True),
            library_path=p.library(),
            log_level=log_level,
            extra_metadata=extra,
            kill_switch_file=p.path("ASPROF_KILL_SWITCH_FILE"),
            max_cpu_percent=p.percent("ASPROF_MAX_CPU_PERCENT"),
            max_memory_mb=p.megabytes("ASPROF_MAX_MEMORY_MB"),
            given=given,
            **s3_fields,
        )
        cfg.options()  # cross-checks by ProfilerOptions itself
        return cfg

    @property
    def unknown_variables(self) -> List[str]:
        """``ASPROF_*`` variables set but not known (typos), sorted."""
        return sorted(k for k in self.given if k not in KNOWN)

    # ---- building

    def options(self) -> "ProfilerOptions":
        from asprof.options import ProfilerOptions

        try:
            return ProfilerOptions(
                cpu_interval=self.cpu_interval,
                wall_interval=self.wall_interval,
                native_mem=self.native_mem,
                all_user=self.all_user,
                cstack=self.cstack,
                force_native_mem=self.force_native_mem,
            )
        except ValueError as e:  # pragma: no cover - every value was checked above
            raise ConfigError("ASPROF_*", None, str(e)) from e

    def make_reporter(self) -> "Reporter":
        """The reporter; raises ConfigError naming ASPROF_REPORTER when it cannot be made."""
        if self.s3_bucket is not None:
            try:
                from asprof.reporter.s3 import S3Reporter

                kwargs: Dict[str, Any] = {}
                if self.s3_region:
                    kwargs["region_name"] = self.s3_region
                if self.s3_endpoint_url:
                    kwargs["endpoint_url"] = self.s3_endpoint_url
                assert self.s3_bucket_owner is not None and self.profiling_group is not None
                return S3Reporter(self.s3_bucket, self.s3_bucket_owner, self.profiling_group,
                                  key_prefix=self.s3_prefix, client_kwargs=kwargs or None,
                                  spool_dir=self.s3_spool_dir)
            except (ImportError, ValueError, TypeError, OSError) as e:
                raise ConfigError("ASPROF_REPORTER", self.reporter, _one_line(e)) from e
        from asprof.reporter.local import LocalReporter

        try:
            return LocalReporter(self.directory or DEFAULT_DIRECTORY)
        except (ValueError, OSError) as e:
            raise ConfigError("ASPROF_REPORTER", self.reporter, _one_line(e)) from e

    def profiler(self) -> "Profiler":
        """A :class:`~asprof.Profiler` with this configuration (not started)."""
        from asprof.profiler import Profiler

        if self.native_mem is not None and not self.force_native_mem:
            from asprof.engines.asyncprofiler import nativemem_hazard

            hazard = nativemem_hazard()
            if hazard is not None:
                raise ConfigError("ASPROF_NATIVE_MEM", self.given.get("ASPROF_NATIVE_MEM"),
                                  f"native memory sampling refused: {hazard}; unset it, or set "
                                  "ASPROF_FORCE_NATIVE_MEM=true to try anyway")
        return Profiler(
            self.make_reporter(),
            reporting_interval=self.reporting_interval,
            options=self.options(),
            extra_metadata=dict(self.extra_metadata),
            library_path=self.library_path,
            kill_switch_file=self.kill_switch_file,
            max_cpu_percent=self.max_cpu_percent,
            max_memory_mb=self.max_memory_mb,
        )

    def describe(self) -> List[Tuple[str, str]]:
        """(setting, value) pairs, for ``asprof doctor``; nothing secret is in them."""
        rows = [("enabled", "yes" if self.enabled else "no (ASPROF_ENABLED)")]
        if not self.enabled:
            return rows
        if self.s3_bucket is not None:
            where = f"S3 s3://{self.s3_bucket}/{self.s3_prefix}  owner {self.s3_bucket_owner}, " \
                    f"group {self.profiling_group}"
            if self.s3_region:
                where += f", region {self.s3_region}"
            if self.s3_endpoint_url:
                where += f", endpoint {self.s3_endpoint_url}"
            if self.s3_spool_dir:
                where += f", spool {self.s3_spool_dir}"
        else:
            where = f"directory {os.path.abspath(self.directory or DEFAULT_DIRECTORY)}"
        rows.append(("reporter", where))
        rows.append(("reporting interval", _fmt_seconds(self.reporting_interval)))
        rows.append(("cpu interval", _fmt_seconds(self.cpu_interval)))
        rows.append(("wall interval", "off" if self.wall_interval is None else _fmt_seconds(self.wall_interval)))
        rows.append(("native memory", "off" if self.native_mem is None else
                     ("every allocation" if self.native_mem == 0 else f"every {self.native_mem} bytes")))
        rows.append(("native stacks", f"cstack={self.cstack}, {'no ' if self.all_user else ''}kernel frames"))
        if self.extra_metadata:
            rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in sorted(self.extra_metadata.items()))))
        if self.kill_switch_file:
            state = "present: profiling would NOT start" if os.path.exists(self.kill_switch_file) else "absent"
            rows.append(("kill switch file", f"{self.kill_switch_file} ({state})"))
        if self.max_cpu_percent is not None:
            rows.append(("overhead guard, CPU", f"{self.max_cpu_percent:g}% of one core"))
        if self.max_memory_mb is not None:
            rows.append(("overhead guard, memory", f"{self.max_memory_mb:g} MiB"))
        return rows


class _Parser:
    """Reads one variable at a time; raises ConfigError naming it."""

    def __init__(self, given: Mapping[str, str]) -> None:
        self.given = given

    def text(self, name: str) -> Optional[str]:
        """The stripped value; None when unset or empty (empty means "not set")."""
        raw = self.given.get(name)
        if raw is None:
            return None
        value = raw.strip()
        if not value:
            return None
        if not value.isprintable():
            raise ConfigError(name, raw, "contains control characters")
        return value

    def enabled(self) -> bool:
        value = self.text("ASPROF_ENABLED")
        if value is None:
            return True
        b = parse_bool(value)
        if b is None:
            raise ConfigError("ASPROF_ENABLED", self.given["ASPROF_ENABLED"],
                              "expected 1/true/yes/on or 0/false/no/off")
        return b

    def boolean(self, name: str, default: bool) -> bool:
        value = self.text(name)
        if value is None:
            return default
        b = parse_bool(value)
        if b is None:
            raise ConfigError(name, self.given[name], "expected true/false (1/0, yes/no, on/off)")
        return b

    def choice(self, name: str, default: str, choices: Tuple[str, ...]) -> str:
        value = self.text(name)
        if value is None:
            return default
        if value.lower() not in choices:
            raise ConfigError(name, self.given[name], f"expected one of {', '.join(choices)}")
        return value.lower()

    def log_level(self) -> Optional[int]:
        value = self.text("ASPROF_LOG_LEVEL")
        if value is None:
            return None
        level = _LEVELS.get(value.lower())
        if level is None:
            raise ConfigError("ASPROF_LOG_LEVEL", self.given["ASPROF_LOG_LEVEL"],
                              "expected debug, info, warning, error, critical or off")
        return level

    def duration(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self.duration_or_off(name, default, minimum, maximum, allow_off=False)
        assert value is not None
        return value

    def duration_or_off(self, name: str, default: Optional[float], minimum: float, maximum: float,
                        allow_off: bool = True) -> Optional[float]:
        value = self.text(name)
        if value is None:
            return default
        if allow_off and value.lower() in _OFF:
            return None
        seconds = parse_duration(value)
        off = " or off" if allow_off else ""
        if seconds is None:
            raise ConfigError(name, self.given[name],
                              f"expected a duration such as 30s, 500ms, 2m or a number of seconds{off}")
        if seconds == 0 and allow_off:
            raise ConfigError(name, self.given[name], "use 'off' to turn it off")
        if not minimum <= seconds <= maximum:
            raise ConfigError(name, self.given[name],
                              f"must be between {_fmt_seconds(minimum)} and {_fmt_seconds(maximum)}{off}")
        return seconds

    def native_mem(self) -> Optional[int]:
        name = "ASPROF_NATIVE_MEM"
        value = self.text(name)
        if value is None or value.lower() in _OFF:
            return None
        if value.lower() == "all":
            return 0
        n = _size_bytes(value)
        if n is None or n != int(n):
            raise ConfigError(name, self.given[name],
                              "expected bytes between samples such as 10m, 512k, 1048576, or 'all', or 'off'")
        if n == 0:
            raise ConfigError(name, self.given[name],
                              "ambiguous: use 'off' to turn native memory sampling off, 'all' to record "
                              "every allocation")
        if n >= 1 << 50:
            raise ConfigError(name, self.given[name], "too large")
        return int(n)

    def percent(self, name: str) -> Optional[float]:
        value = self.text(name)
        if value is None:
            return None
        number = value[:-1].strip() if value.endswith("%") else value
        if not _NUMBER.fullmatch(number) or not 0 < float(number) <= 10000:
            raise ConfigError(name, self.given[name],
                              "expected a percentage of one core above 0, such as 5 or 2.5%")
        return float(number)

    def megabytes(self, name: str) -> Optional[float]:
        value = self.text(name)
        if value is None:
            return None
        m = _SIZE.fullmatch(value.lower())
        unit = None if m is None else _MB_UNITS.get(m.group(2))
        mb = None if m is None or unit is None else float(m.group(1)) * unit
        if mb is None or not mb > 0 or math.isinf(mb):
            raise ConfigError(name, self.given[name],
                              "expected a size in MiB above 0, such as 256, 256MB or 1GB")
        return mb

    def path(self, name: str) -> Optional[str]:
        value = self.text(name)
        if value is None:
            return None
        return os.path.abspath(os.path.expanduser(value))

    def library(self) -> Optional[str]:
        path = self.path("ASPROF_LIB")
        if path is None:
            return None
        if not os.path.isfile(path):
            raise ConfigError("ASPROF_LIB", self.given["ASPROF_LIB"],
                              "no such file (the path of libasyncProfiler.so)")
        return path

    def reporter(self) -> Tuple[str, Optional[str], Optional[Tuple[str, str]]]:
        """(normalised text, local directory or None, (bucket, key prefix) or None)."""
        name = "ASPROF_REPORTER"
        value = self.text(name)
        if value is None:
            return DEFAULT_DIRECTORY, DEFAULT_DIRECTORY, None
        raw = self.given[name]
        low = value.lower()
        if low.startswith("s3://"):
            rest = value[5:]
            bucket, _, prefix = rest.partition("/")
            if not _BUCKET.fullmatch(bucket):
                raise ConfigError(name, raw, "expected s3://bucket or s3://bucket/prefix with a valid bucket name")
            prefix = prefix.strip("/")
            if "//" in prefix or any(c in prefix for c in "\\{}^%`[]\"<>~#|"):
                raise ConfigError(name, raw, "the key prefix has characters S3 keys should not contain")
            return value, None, (bucket, prefix + "/" if prefix else "")
        if low.startswith("file:"):
            u = urllib.parse.urlsplit(value)
            if u.netloc not in ("", "localhost") or not u.path:
                raise ConfigError(name, raw, "expected file:///absolute/path")
            directory = urllib.parse.unquote(u.path)
        elif low.startswith("local:"):
            directory = value[6:].strip()
            if not directory:
                raise ConfigError(name, raw, "expected local:/path/to/directory")
        elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
            raise ConfigError(name, raw, "unsupported destination: use a directory, file:///path or "
                                         "s3://bucket/prefix")
        else:
            directory = value
        directory = os.path.expanduser(directory)
        return value, directory, None

    def extra_metadata(self, service: Optional[str]) -> Dict[str, str]:
        extra: Dict[str, str] = {}
        tags = self.text("ASPROF_TAGS")
        if tags is not None:
            for item in tags.split(","):
                item = item.strip()
                if not item:
                    continue
                key, sep, val = item.partition("=")
                key, val = key.strip(), val.strip()
                if not sep or not _TAG_KEY.fullmatch(key):
                    raise ConfigError("ASPROF_TAGS", self.given["ASPROF_TAGS"],
                                      f"bad tag {item!r}: expected key=value[,key=value...] with keys made of "
                                      "letters, digits and _.:/-")
                if len(val) > _MAX_TAG_VALUE:
                    raise ConfigError("ASPROF_TAGS", self.given["ASPROF_TAGS"],
                                      f"the value of tag {key!r} is longer than {_MAX_TAG_VALUE} characters")
                extra[key] = val
        for name, key in (("ASPROF_SERVICE", "service"), ("ASPROF_VERSION", "version"), ("ASPROF_ENV", "env")):
            value = service if name == "ASPROF_SERVICE" else self.text(name)
            if value is None:
                continue
            if len(value) > _MAX_TAG_VALUE:
                raise ConfigError(name, self.given[name], f"longer than {_MAX_TAG_VALUE} characters")
            extra[key] = value
        return extra


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# ---------------------------------------------------------------- logging


class _FallbackHandler(logging.Handler):
    """asprof's log lines on stderr until the application configures logging.

    Attached to the ``asprof`` logger by :func:`start_from_environment`; it
    writes nothing once the root logger has a handler (the line then reaches
    the application's handlers by propagation), so nothing is printed twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("asprof[%(process)d]: %(levelname)s: %(message)s"))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.name != "asprof" and record.name.startswith("asprof."):
            head, sep, rest = text.partition(f"{record.levelname}: ")
            text = f"{head}{sep}{record.name[7:]}: {rest}"  # e.g. "async-profiler: ..."
        return text

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        try:
            stream = sys.stderr
            if stream is None:
                return
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the application
            pass


def _install_logging(level: Optional[int]) -> None:
    log = logging.getLogger("asprof")
    if level is not None:
        log.setLevel(level)
    if not any(isinstance(h, _FallbackHandler) for h in log.handlers):
        handler = _FallbackHandler()
        handler.setLevel(logging.NOTSET)
        log.addHandler(handler)
        if level is None and log.level == logging.NOTSET:
            # Without ASPROF_LOG_LEVEL: warnings and errors, as Python's own default.
            handler.setLevel(logging.WARNING)


def _early_log_level(env: Mapping[str, str]) -> Optional[int]:
    raw = env.get("ASPROF_LOG_LEVEL")
    return None if raw is None else _LEVELS.get(raw.strip().lower())


# ---------------------------------------------------------------- entry points


def build_profiler(environ: Optional[Mapping[str, str]] = None) -> Optional["Profiler"]:
    """The Profiler configured by the environment; None when ASPROF_ENABLED is off.

    Raises :class:`ConfigError` for an invalid value (the reporter is made here:
    an unusable directory or a missing boto3 is such an error).
    """
    cfg = EnvConfig.from_environ(environ)
    return cfg.profiler() if cfg.enabled else None


def start_from_environment(environ: Optional[Mapping[str, str]] = None) -> Optional["RunningProfiler"]:
    """Starts profiling as the ``ASPROF_*`` variables say; never raises.

    Returns the running profiler (detached: it runs until
    :func:`asprof.stop_profiling` or exit), or None when profiling did not
    start: disabled, an invalid value (one error line naming the variable),
    async-profiler missing or refusing to start, or a profiler already running.
    """
    env = os.environ if environ is None else environ
    try:
        _install_logging(_early_log_level(env))
        cfg = EnvConfig.from_environ(env)
        if not cfg.enabled:
            logger.info("profiling is disabled by ASPROF_ENABLED=%s", env.get("ASPROF_ENABLED"))
            return None
        unknown = cfg.unknown_variables
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, sorted(KNOWN), n=1)
                hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
            logger.warning("ignoring unknown variable%s %s", "s" if len(hints) > 1 else "", ", ".join(hints))
        handle = cfg.profiler().start()
    except ConfigError as e:
        logger.error("%s; profiling is off", e)
        return None
    except Exception as e:  # noqa: BLE001 - the application must start whatever happens here
        from asprof.errors import LibraryNotFoundError, ProfilerAlreadyRunningError

        if isinstance(e, ProfilerAlreadyRunningError):
            logger.info("a profiler is already running in this process; the ASPROF_* configuration is not "
                        "applied again")
        elif isinstance(e, LibraryNotFoundError):
            tried = "; ".join(f"{where}: {what}" for where, what in e.tried)
            logger.error("async-profiler (libasyncProfiler.so) not found (tried %s); install it or set "
                         "ASPROF_LIB to its path; profiling is off", tried)
        else:
            logger.error("profiling is off: %s", _one_line(e))
            logger.debug("details", exc_info=True)
        return None
    if not handle.running:
        return None  # the kill switch: Profiler.start() said so in its own log line
    handle.detach()
    return handle


_auto_lock = threading.Lock()
_auto: Dict[int, Optional["RunningProfiler"]] = {}


def auto_start() -> Optional["RunningProfiler"]:
    """:func:`start_from_environment` once per process (what ``import asprof.auto`` runs)."""
    pid = os.getpid()
    with _auto_lock:
        if pid not in _auto:
            _auto[pid] = start_from_environment()
        return _auto[pid]
