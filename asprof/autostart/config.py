"""The ``ASPROF_*`` environment variables: the one table of them and their parsing.

:data:`VARIABLES` is the table of docs/configuration.md (:data:`INTERNAL_VARIABLES` the test
knobs); :meth:`EnvConfig.from_environ` parses them, raising :class:`ConfigError` naming the
variable. The grammar of the values and the limits of the intervals are in
:mod:`asprof.autostart.values` (re-exported here), shared with :mod:`asprof.options`,
:mod:`asprof.profiler` and the engines, which read the three variables they need at run time
through it. Starting a profiler from all this is :mod:`asprof.autostart.start`.

May import: :mod:`asprof.autostart.values`, :mod:`asprof.errors` (it sits below
:mod:`asprof.options`).
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from asprof.autostart.values import (
    _OFF,
    DEFAULT_CPU_INTERVAL,
    DEFAULT_REPORTING_INTERVAL,
    DEFAULT_WALL_INTERVAL,
    ENGINE_NAMES,
    MAX_PROFILER_INTERVAL,
    MAX_REPORTING_INTERVAL,
    MIN_CPU_INTERVAL,
    MIN_REPORTING_INTERVAL,
    MIN_WALL_INTERVAL,
    disabled_by_environment,
    file_mode_problem,
    format_seconds,
    library_from_environment,
    parse_bool,
    parse_duration,
    parse_file_mode,
    parse_size,
)
from asprof.errors import AsprofError

__all__ = [
    "ConfigError",
    "EnvConfig",
    "Variable",
    "VARIABLES",
    "INTERNAL_VARIABLES",
    "KNOWN",
    "parse_duration",
    "parse_bool",
    "parse_size",
    "disabled_by_environment",
    "library_from_environment",
]

PREFIX = "ASPROF_"
DEFAULT_DIRECTORY = "profiles"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}
_NUMBER = r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)$"
_TAG_KEY = r"^[A-Za-z0-9_.:/-]{1,128}$"
_BUCKET = r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$"
_ACCOUNT_ID = r"^[0-9]{12}$"
_MAX_TAG_VALUE = 256


class ConfigError(AsprofError, ValueError):
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
    Variable("ASPROF_FILE_MODE", "`600`",
             "Mode of the profiles a local reporter writes, in octal: `600` (only this user), `640` or "
             "`644` for a reader of another user (a sidecar); a directory asprof creates gets read and search "
             "for the same users. Group and others may never write.", "--file-mode"),
    Variable("ASPROF_S3_SPOOL_DIR", "in memory",
             "With `s3://`: a private directory where profiles wait for upload, surviving restarts (created "
             "0700; an existing one must be this user's, not a symlink, and reachable by no one else).",
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
    Variable("ASPROF_PYTHON_ALLOC", "`off`",
             "Python allocation sampling with Python stacks, and the live heap (docs/memory.md): bytes "
             "allocated between two samples on average (`512k`, `1m`, `65536`), `on` for 512k, or `off`.",
             "--python-alloc"),
    Variable("ASPROF_CSTACK", "`dwarf`",
             "How native stacks are walked: `dwarf`, `fp` or `no`.", "--cstack"),
    Variable("ASPROF_ALL_USER", "`true`",
             "`true` leaves kernel frames out of CPU stacks (async-profiler's `alluser`).", None),
    Variable("ASPROF_PYTHON_FRAMES_INLINE", "`true`",
             "With async-profiler: each report's stack traces carry the Python frames in place of the "
             "interpreter's `_PyEval_EvalFrameDefault` frames, so that every JFR tool (`jfrconv`, the JDK "
             "`jfr` tool, JMC) shows the Python code; `false` keeps them in asprof's own side events only "
             "(see python-frames.md)."),
    Variable("ASPROF_ENGINE", "`auto`",
             "What samples: `auto` (async-profiler when it loads, else the built-in engine, with one log "
             "line), `async-profiler` (an error when it is missing) or `builtin` (asprof's own sampler: "
             "CPU and wall-clock samples with Python stacks, no native memory).", "--engine"),
    Variable("ASPROF_LIB", "bundled, then the linker's search",
             "Absolute path of `libasyncProfiler.so` (must exist; a relative path is refused, blanks mean "
             "unset). Without it asprof resolves the linker's search itself (absolute `LD_LIBRARY_PATH` entries, "
             "`/etc/ld.so.cache`, system directories), never the working directory.", "--lib"),
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
#: Knobs for tests and benchmarks: known (no "unknown variable" warning), not in the user table.
INTERNAL_VARIABLES: Tuple[Variable, ...] = (
    Variable("ASPROF_PYFRAMES_JOIN", "exact on async-profiler 4.5+",
             "`timestamp`: join Python stacks to samples by timestamp, as on async-profiler 4.0-4.4 "
             "(tests of that join on 4.5)."),
    Variable("ASPROF_PYFRAMES_TIMING", "`0`",
             "`1`: the Python-frame capture times its signal-handler work (benchmarks/bench_pyframes.py)."),
    # read by the reading verbs (asprof convert/summary/top), not by the agent: docs/reading-profiles.md
    Variable("ASPROF_READ_MAX_SIZE", "`1GiB`",
             "Largest input or zip entry after decompression for `asprof convert/summary/top` "
             "(`--max-size` wins)."),
)
KNOWN = frozenset(v.name for v in VARIABLES + INTERNAL_VARIABLES)


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
    file_mode: int = 0o600
    reporting_interval: float = DEFAULT_REPORTING_INTERVAL
    cpu_interval: float = DEFAULT_CPU_INTERVAL
    wall_interval: Optional[float] = DEFAULT_WALL_INTERVAL
    native_mem: Optional[int] = None
    python_alloc: Optional[int] = None  # issue #16
    force_native_mem: bool = False
    cstack: str = "dwarf"
    all_user: bool = True
    engine: str = "auto"
    python_frames_inline: bool = True  # issue #12
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
            if not re.fullmatch(_ACCOUNT_ID, owner):
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
                import urllib.parse  # only here: it is slow to import, and S3 needs it anyway

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
            file_mode=p.file_mode(),
            reporting_interval=p.duration("ASPROF_REPORTING_INTERVAL", DEFAULT_REPORTING_INTERVAL,
                                          MIN_REPORTING_INTERVAL, MAX_REPORTING_INTERVAL),
            cpu_interval=p.duration("ASPROF_CPU_INTERVAL", DEFAULT_CPU_INTERVAL, MIN_CPU_INTERVAL,
                                    MAX_PROFILER_INTERVAL),
            wall_interval=p.duration_or_off("ASPROF_WALL_INTERVAL", DEFAULT_WALL_INTERVAL, MIN_WALL_INTERVAL,
                                            MAX_PROFILER_INTERVAL),
            native_mem=p.native_mem(),
            python_alloc=p.python_alloc(),
            force_native_mem=p.boolean("ASPROF_FORCE_NATIVE_MEM", False),
            cstack=p.choice("ASPROF_CSTACK", "dwarf", ("dwarf", "fp", "no")),
            all_user=p.boolean("ASPROF_ALL_USER", True),
            engine=p.choice("ASPROF_ENGINE", "auto", ENGINE_NAMES),
            python_frames_inline=p.boolean("ASPROF_PYTHON_FRAMES_INLINE", True),  # issue #12
            library_path=p.library(),
            log_level=log_level,
            extra_metadata=extra,
            kill_switch_file=p.path("ASPROF_KILL_SWITCH_FILE"),
            max_cpu_percent=p.percent("ASPROF_MAX_CPU_PERCENT"),
            max_memory_mb=p.megabytes("ASPROF_MAX_MEMORY_MB"),
            given=given,
            **s3_fields,
        )
        return cfg

    @property
    def unknown_variables(self) -> List[str]:
        """``ASPROF_*`` variables set but not known (typos), sorted."""
        return sorted(k for k in self.given if k not in KNOWN)

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
            where = f"directory {os.path.abspath(self.directory or DEFAULT_DIRECTORY)}, files {self.file_mode:03o}"
        rows.append(("reporter", where))
        rows.append(("reporting interval", format_seconds(self.reporting_interval)))
        rows.append(("cpu interval", format_seconds(self.cpu_interval)))
        rows.append(("wall interval", "off" if self.wall_interval is None else format_seconds(self.wall_interval)))
        rows.append(("native memory", "off" if self.native_mem is None else
                     ("every allocation" if self.native_mem == 0 else f"every {self.native_mem} bytes")))
        rows.append(("Python allocations", "off" if self.python_alloc is None else
                     f"every {self.python_alloc} bytes on average"))
        rows.append(("engine", self.engine))
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
                              f"must be between {format_seconds(minimum)} and {format_seconds(maximum)}{off}")
        return seconds

    def native_mem(self) -> Optional[int]:
        name = "ASPROF_NATIVE_MEM"
        value = self.text(name)
        if value is None or value.lower() in _OFF:
            return None
        if value.lower() == "all":
            return 0
        n = parse_size(value)
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

    def python_alloc(self) -> Optional[int]:  # issue #16
        name = "ASPROF_PYTHON_ALLOC"
        value = self.text(name)
        if value is None or value.lower() in _OFF:
            return None
        if value.lower() in ("on", "true", "yes", "1"):
            return 512 * 1024
        n = parse_size(value)
        if n is None or n != int(n) or n < 1:
            raise ConfigError(name, self.given[name],
                              "expected bytes between samples such as 512k, 1m, 65536, or 'on', or 'off'")
        if n > 1 << 40:
            raise ConfigError(name, self.given[name], "too large (at most 1 TiB)")
        return int(n)

    def percent(self, name: str) -> Optional[float]:
        value = self.text(name)
        if value is None:
            return None
        number = value[:-1].strip() if value.endswith("%") else value
        if not re.fullmatch(_NUMBER, number) or not 0 < float(number) <= 10000:
            raise ConfigError(name, self.given[name],
                              "expected a percentage of one core above 0, such as 5 or 2.5%")
        return float(number)

    def megabytes(self, name: str) -> Optional[float]:
        value = self.text(name)
        if value is None:
            return None
        size = parse_size(value, 1 << 20)
        mb = None if size is None else size / (1 << 20)
        if mb is None or not mb > 0 or math.isinf(mb):
            raise ConfigError(name, self.given[name],
                              "expected a size in MiB above 0, such as 256, 256MB or 1GB")
        return mb

    def path(self, name: str) -> Optional[str]:
        value = self.text(name)
        if value is None:
            return None
        return os.path.abspath(os.path.expanduser(value))

    def file_mode(self) -> int:
        name = "ASPROF_FILE_MODE"
        value = self.text(name)
        if value is None:
            return 0o600
        mode = parse_file_mode(value)
        if mode is None:
            raise ConfigError(name, self.given[name], "expected an octal file mode such as 600, 640 or 644")
        problem = file_mode_problem(mode)
        if problem is not None:
            raise ConfigError(name, self.given[name], problem)
        return mode

    def library(self) -> Optional[str]:
        try:
            path = library_from_environment(self.given) if self.text("ASPROF_LIB") is not None else None
        except ValueError:
            raise ConfigError("ASPROF_LIB", self.given["ASPROF_LIB"],
                              "a relative path is refused (it would be looked up in each process's working "
                              "directory): give the absolute path of libasyncProfiler.so") from None
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
            if not re.fullmatch(_BUCKET, bucket):
                raise ConfigError(name, raw, "expected s3://bucket or s3://bucket/prefix with a valid bucket name")
            prefix = prefix.strip("/")
            if "//" in prefix or any(c in prefix for c in "\\{}^%`[]\"<>~#|"):
                raise ConfigError(name, raw, "the key prefix has characters S3 keys should not contain")
            return value, None, (bucket, prefix + "/" if prefix else "")
        if low.startswith("file:"):
            import urllib.parse

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
                if not sep or not re.fullmatch(_TAG_KEY, key):
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


_fmt_seconds = format_seconds  # the former name (asprof doctor used it)
