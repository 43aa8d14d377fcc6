"""Starting profiling from the environment: what ``import asprof.auto`` and ``asprof run``
run.

``start_from_environment()`` reads the ``ASPROF_*`` variables (:mod:`asprof.autostart.config`,
docs/configuration.md), builds a :class:`~asprof.Profiler` and starts it. It never raises: an
invalid value gives one log line naming the variable and the value, profiling stays off, and
the application goes on. ``build_profiler()`` returns the configured ``Profiler`` for code that
wants to start it itself.
"""
from __future__ import annotations

import difflib
import logging
import os
import sys
import threading
from typing import Any, Dict, Mapping, Optional

from asprof.autostart.config import _LEVELS, DEFAULT_DIRECTORY, KNOWN, ConfigError, EnvConfig, _one_line
from asprof.errors import LibraryNotFoundError, ProfilerAlreadyRunningError
from asprof.options import ProfilerOptions
from asprof.profiler import Profiler, RunningProfiler
from asprof.reporter.base import Reporter
from asprof.reporter.local import LocalReporter

__all__ = ["build_profiler", "start_from_environment", "auto_start", "make_profiler", "make_reporter",
           "profiler_options"]

logger = logging.getLogger("asprof")


# ---------------------------------------------------------------- building

def profiler_options(cfg: EnvConfig) -> ProfilerOptions:
    """The :class:`~asprof.ProfilerOptions` of ``cfg``."""
    try:
        return ProfilerOptions(
            cpu_interval=cfg.cpu_interval,
            wall_interval=cfg.wall_interval,
            native_mem=cfg.native_mem,
            python_alloc=cfg.python_alloc,
            all_user=cfg.all_user,
            cstack=cfg.cstack,
            engine=cfg.engine,
            python_frames_inline=cfg.python_frames_inline,  # issue #12
            force_native_mem=cfg.force_native_mem,
        )
    except ValueError as e:  # pragma: no cover - every value was checked above
        raise ConfigError("ASPROF_*", None, str(e)) from e

def make_reporter(cfg: EnvConfig) -> Reporter:
    """The reporter; raises ConfigError naming ASPROF_REPORTER when it cannot be made."""
    if cfg.s3_bucket is not None:
        try:
            from asprof.reporter.s3 import S3Reporter

            kwargs: Dict[str, Any] = {}
            if cfg.s3_region:
                kwargs["region_name"] = cfg.s3_region
            if cfg.s3_endpoint_url:
                kwargs["endpoint_url"] = cfg.s3_endpoint_url
            assert cfg.s3_bucket_owner is not None and cfg.profiling_group is not None
            return S3Reporter(cfg.s3_bucket, cfg.s3_bucket_owner, cfg.profiling_group,
                              key_prefix=cfg.s3_prefix, client_kwargs=kwargs or None,
                              spool_dir=cfg.s3_spool_dir)
        except (ImportError, ValueError, TypeError, OSError) as e:
            raise ConfigError("ASPROF_REPORTER", cfg.reporter, _one_line(e)) from e
    try:
        return LocalReporter(cfg.directory or DEFAULT_DIRECTORY, file_mode=cfg.file_mode)
    except (ValueError, OSError) as e:
        raise ConfigError("ASPROF_REPORTER", cfg.reporter, _one_line(e)) from e

def make_profiler(cfg: EnvConfig) -> Profiler:
    """A :class:`~asprof.Profiler` configured by ``cfg`` (not started)."""
    if cfg.native_mem is not None and not cfg.force_native_mem:
        from asprof.engines.asyncprofiler import nativemem_hazard

        hazard = nativemem_hazard()
        if hazard is not None:
            raise ConfigError("ASPROF_NATIVE_MEM", cfg.given.get("ASPROF_NATIVE_MEM"),
                              f"native memory sampling refused: {hazard}; unset it, or set "
                              "ASPROF_FORCE_NATIVE_MEM=true to try anyway")
    return Profiler(
        make_reporter(cfg),
        reporting_interval=cfg.reporting_interval,
        options=profiler_options(cfg),
        extra_metadata=dict(cfg.extra_metadata),
        library_path=cfg.library_path,
        kill_switch_file=cfg.kill_switch_file,
        max_cpu_percent=cfg.max_cpu_percent,
        max_memory_mb=cfg.max_memory_mb,
    )


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
    return make_profiler(cfg) if cfg.enabled else None


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
        handle = make_profiler(cfg).start()
    except ConfigError as e:
        logger.error("%s; profiling is off", e)
        return None
    except Exception as e:  # noqa: BLE001 - the application must start whatever happens here
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
