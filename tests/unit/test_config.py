"""Configuration from the environment (asprof/autostart/config.py, docs/configuration.md):
each ASPROF_* variable valid and invalid, the one-line error that leaves the
agent off while the program runs, the kill switches, logging, import asprof.auto."""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

import asprof
from asprof.autostart import start as config_mod
from asprof.autostart.config import VARIABLES, ConfigError, EnvConfig, parse_duration
from asprof.autostart.start import profiler_options, start_from_environment

from conftest import ROOT, requires_real, run_python

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

S3_BASE = {"ASPROF_REPORTER": "s3://my-bucket/some/prefix", "ASPROF_S3_BUCKET_OWNER": "123456789012",
           "ASPROF_PROFILING_GROUP": "grp"}


def parse(**env: str) -> EnvConfig:
    return EnvConfig.from_environ(env)


# ---------------------------------------------------------------- parsing, variable by variable

def test_defaults() -> None:
    cfg = parse()
    assert cfg.enabled and cfg.directory == "profiles" and cfg.s3_bucket is None
    assert cfg.reporting_interval == 30.0 and cfg.cpu_interval == 0.1 and cfg.wall_interval == 1.0
    assert cfg.native_mem is None and cfg.cstack == "dwarf" and cfg.all_user and not cfg.force_native_mem
    assert cfg.extra_metadata == {} and cfg.kill_switch_file is None
    assert cfg.max_cpu_percent is None and cfg.max_memory_mb is None and cfg.log_level is None
    assert profiler_options(cfg) == asprof.ProfilerOptions()


VALID: List[Any] = [
    # (environment, attribute, expected value)
    ({"ASPROF_ENABLED": "1"}, "enabled", True),
    ({"ASPROF_ENABLED": " Yes "}, "enabled", True),
    ({"ASPROF_ENABLED": "on"}, "enabled", True),
    ({"ASPROF_ENABLED": "0"}, "enabled", False),
    ({"ASPROF_ENABLED": "FALSE"}, "enabled", False),
    ({"ASPROF_ENABLED": "off"}, "enabled", False),
    ({"ASPROF_ENABLED": "no"}, "enabled", False),
    ({"ASPROF_ENABLED": ""}, "enabled", True),
    ({"ASPROF_REPORTER": "/var/profiles"}, "directory", "/var/profiles"),
    ({"ASPROF_REPORTER": "./out"}, "directory", "./out"),
    ({"ASPROF_REPORTER": "file:///var/profiles"}, "directory", "/var/profiles"),
    ({"ASPROF_REPORTER": "file://localhost/var/my%20profiles"}, "directory", "/var/my profiles"),
    ({"ASPROF_REPORTER": "local:/data/p"}, "directory", "/data/p"),
    ({"ASPROF_REPORTER": "~/p"}, "directory", os.path.expanduser("~/p")),
    (S3_BASE, "s3_bucket", "my-bucket"),
    (S3_BASE, "s3_prefix", "some/prefix/"),
    ({**S3_BASE, "ASPROF_REPORTER": "s3://my-bucket"}, "s3_prefix", ""),
    ({**S3_BASE, "ASPROF_REPORTER": "S3://my-bucket/p/"}, "s3_prefix", "p/"),
    (S3_BASE, "directory", None),
    (S3_BASE, "s3_bucket_owner", "123456789012"),
    (S3_BASE, "profiling_group", "grp"),
    ({**S3_BASE, "ASPROF_PROFILING_GROUP": "", "ASPROF_SERVICE": "checkout"}, "profiling_group", "checkout"),
    ({**S3_BASE, "ASPROF_S3_REGION": "eu-west-1"}, "s3_region", "eu-west-1"),
    ({**S3_BASE, "ASPROF_S3_ENDPOINT_URL": "http://127.0.0.1:9000"}, "s3_endpoint_url", "http://127.0.0.1:9000"),
    ({**S3_BASE, "ASPROF_S3_SPOOL_DIR": "/var/spool/asprof"}, "s3_spool_dir", "/var/spool/asprof"),
    ({"ASPROF_REPORTING_INTERVAL": "30"}, "reporting_interval", 30.0),
    ({"ASPROF_REPORTING_INTERVAL": "10s"}, "reporting_interval", 10.0),
    ({"ASPROF_REPORTING_INTERVAL": "500ms"}, "reporting_interval", 0.5),
    ({"ASPROF_REPORTING_INTERVAL": "2m"}, "reporting_interval", 120.0),
    ({"ASPROF_REPORTING_INTERVAL": "1h"}, "reporting_interval", 3600.0),
    ({"ASPROF_REPORTING_INTERVAL": " 1.5 s "}, "reporting_interval", 1.5),
    ({"ASPROF_CPU_INTERVAL": "10ms"}, "cpu_interval", 0.01),
    ({"ASPROF_CPU_INTERVAL": "0.005"}, "cpu_interval", 0.005),
    ({"ASPROF_CPU_INTERVAL": "250us"}, "cpu_interval", 250e-6),
    ({"ASPROF_CPU_INTERVAL": "1e-3"}, "cpu_interval", 1e-3),
    ({"ASPROF_WALL_INTERVAL": "100ms"}, "wall_interval", 0.1),
    ({"ASPROF_WALL_INTERVAL": "off"}, "wall_interval", None),
    ({"ASPROF_WALL_INTERVAL": "none"}, "wall_interval", None),
    ({"ASPROF_NATIVE_MEM": "10m"}, "native_mem", 10 << 20),
    ({"ASPROF_NATIVE_MEM": "512KB"}, "native_mem", 512 << 10),
    ({"ASPROF_NATIVE_MEM": "1048576"}, "native_mem", 1 << 20),
    ({"ASPROF_NATIVE_MEM": "1GiB"}, "native_mem", 1 << 30),
    ({"ASPROF_NATIVE_MEM": "all"}, "native_mem", 0),
    ({"ASPROF_NATIVE_MEM": "off"}, "native_mem", None),
    ({"ASPROF_PYTHON_ALLOC": "512k"}, "python_alloc", 512 << 10),  # issue #16
    ({"ASPROF_PYTHON_ALLOC": "65536"}, "python_alloc", 65536),
    ({"ASPROF_PYTHON_ALLOC": "on"}, "python_alloc", 512 << 10),
    ({"ASPROF_PYTHON_ALLOC": "off"}, "python_alloc", None),
    ({"ASPROF_FORCE_NATIVE_MEM": "true"}, "force_native_mem", True),
    ({"ASPROF_FORCE_NATIVE_MEM": "0"}, "force_native_mem", False),
    ({"ASPROF_CSTACK": "FP"}, "cstack", "fp"),
    ({"ASPROF_CSTACK": "no"}, "cstack", "no"),
    ({"ASPROF_ENGINE": "builtin"}, "engine", "builtin"),  # issue #11
    ({"ASPROF_ENGINE": " Async-Profiler "}, "engine", "async-profiler"),
    ({"ASPROF_ENGINE": "auto"}, "engine", "auto"),
    ({}, "python_frames_inline", True),  # issue #12
    ({"ASPROF_PYTHON_FRAMES_INLINE": "false"}, "python_frames_inline", False),
    ({"ASPROF_PYTHON_FRAMES_INLINE": " On "}, "python_frames_inline", True),
    ({"ASPROF_PYTHON_FRAMES_INLINE": ""}, "python_frames_inline", True),
    ({"ASPROF_ALL_USER": "false"}, "all_user", False),
    ({"ASPROF_LIB": sys.executable}, "library_path", sys.executable),
    ({"ASPROF_LOG_LEVEL": "debug"}, "log_level", logging.DEBUG),
    ({"ASPROF_LOG_LEVEL": "WARN"}, "log_level", logging.WARNING),
    ({"ASPROF_LOG_LEVEL": "error"}, "log_level", logging.ERROR),
    ({"ASPROF_LOG_LEVEL": "off"}, "log_level", logging.CRITICAL + 10),
    ({"ASPROF_SERVICE": "checkout"}, "extra_metadata", {"service": "checkout"}),
    ({"ASPROF_VERSION": "1.2.3"}, "extra_metadata", {"version": "1.2.3"}),
    ({"ASPROF_ENV": "prod"}, "extra_metadata", {"env": "prod"}),
    ({"ASPROF_TAGS": "team=payments, region=eu-west-1,k8s.io/pod=web-1 ,"}, "extra_metadata",
     {"team": "payments", "region": "eu-west-1", "k8s.io/pod": "web-1"}),
    ({"ASPROF_TAGS": "expr=a=b,empty="}, "extra_metadata", {"expr": "a=b", "empty": ""}),
    ({"ASPROF_TAGS": "service=tagged,x=1", "ASPROF_SERVICE": "explicit"}, "extra_metadata",
     {"service": "explicit", "x": "1"}),
    ({"ASPROF_FILE_MODE": "640"}, "file_mode", 0o640),
    ({"ASPROF_FILE_MODE": "0o644"}, "file_mode", 0o644),
    ({"ASPROF_FILE_MODE": " 0600 "}, "file_mode", 0o600),
    ({"ASPROF_FILE_MODE": ""}, "file_mode", 0o600),
    ({"ASPROF_KILL_SWITCH_FILE": "/etc/asprof/off"}, "kill_switch_file", "/etc/asprof/off"),
    ({"ASPROF_KILL_SWITCH_FILE": "rel/off"}, "kill_switch_file", os.path.abspath("rel/off")),
    ({"ASPROF_MAX_CPU_PERCENT": "5"}, "max_cpu_percent", 5.0),
    ({"ASPROF_MAX_CPU_PERCENT": "2.5%"}, "max_cpu_percent", 2.5),
    ({"ASPROF_MAX_CPU_PERCENT": "150"}, "max_cpu_percent", 150.0),
    ({"ASPROF_MAX_MEMORY_MB": "256"}, "max_memory_mb", 256.0),
    ({"ASPROF_MAX_MEMORY_MB": "256MB"}, "max_memory_mb", 256.0),
    ({"ASPROF_MAX_MEMORY_MB": "1GB"}, "max_memory_mb", 1024.0),
    ({"ASPROF_MAX_MEMORY_MB": "0.5"}, "max_memory_mb", 0.5),
]


@pytest.mark.parametrize("env,attr,expected", VALID, ids=lambda v: None if isinstance(v, dict) else None)
def test_valid(env: Dict[str, str], attr: str, expected: Any) -> None:
    cfg = EnvConfig.from_environ(env)
    value = getattr(cfg, attr)
    if isinstance(expected, float):
        assert value == pytest.approx(expected)
    else:
        assert value == expected


INVALID: List[Any] = [
    # (environment, the variable the error names)
    ({"ASPROF_ENABLED": "maybe"}, "ASPROF_ENABLED"),
    ({"ASPROF_ENABLED": "2"}, "ASPROF_ENABLED"),
    ({"ASPROF_REPORTER": "http://example.com/p"}, "ASPROF_REPORTER"),
    ({"ASPROF_REPORTER": "file://otherhost/p"}, "ASPROF_REPORTER"),
    ({"ASPROF_REPORTER": "local:"}, "ASPROF_REPORTER"),
    ({"ASPROF_REPORTER": "s3://"}, "ASPROF_REPORTER"),
    ({"ASPROF_REPORTER": "s3://a/p", "ASPROF_S3_BUCKET_OWNER": "123456789012",
      "ASPROF_PROFILING_GROUP": "g"}, "ASPROF_REPORTER"),  # a one-letter bucket
    ({**S3_BASE, "ASPROF_REPORTER": "s3://b-u-c/p{x}"}, "ASPROF_REPORTER"),
    ({"ASPROF_REPORTER": "/tmp/x\x01"}, "ASPROF_REPORTER"),
    ({"ASPROF_REPORTER": "s3://bucket/p", "ASPROF_PROFILING_GROUP": "g"}, "ASPROF_S3_BUCKET_OWNER"),
    ({**S3_BASE, "ASPROF_S3_BUCKET_OWNER": "12345"}, "ASPROF_S3_BUCKET_OWNER"),
    ({**S3_BASE, "ASPROF_S3_BUCKET_OWNER": "my-account"}, "ASPROF_S3_BUCKET_OWNER"),
    ({**S3_BASE, "ASPROF_PROFILING_GROUP": ""}, "ASPROF_PROFILING_GROUP"),
    ({**S3_BASE, "ASPROF_PROFILING_GROUP": "a/b"}, "ASPROF_PROFILING_GROUP"),
    ({**S3_BASE, "ASPROF_PROFILING_GROUP": "", "ASPROF_SERVICE": "a/b"}, "ASPROF_SERVICE"),
    ({**S3_BASE, "ASPROF_S3_REGION": "Europe West"}, "ASPROF_S3_REGION"),
    ({**S3_BASE, "ASPROF_S3_ENDPOINT_URL": "127.0.0.1:9000"}, "ASPROF_S3_ENDPOINT_URL"),
    ({**S3_BASE, "ASPROF_S3_ENDPOINT_URL": "ftp://h"}, "ASPROF_S3_ENDPOINT_URL"),
    ({**S3_BASE, "ASPROF_S3_SPOOL_DIR": "/x\x02y"}, "ASPROF_S3_SPOOL_DIR"),
    ({"ASPROF_REPORTING_INTERVAL": "30x"}, "ASPROF_REPORTING_INTERVAL"),
    ({"ASPROF_REPORTING_INTERVAL": "-5"}, "ASPROF_REPORTING_INTERVAL"),
    ({"ASPROF_REPORTING_INTERVAL": "0"}, "ASPROF_REPORTING_INTERVAL"),
    ({"ASPROF_REPORTING_INTERVAL": "10ms"}, "ASPROF_REPORTING_INTERVAL"),
    ({"ASPROF_REPORTING_INTERVAL": "2d"}, "ASPROF_REPORTING_INTERVAL"),
    ({"ASPROF_REPORTING_INTERVAL": "nan"}, "ASPROF_REPORTING_INTERVAL"),
    ({"ASPROF_REPORTING_INTERVAL": "inf"}, "ASPROF_REPORTING_INTERVAL"),
    ({"ASPROF_REPORTING_INTERVAL": "1e400"}, "ASPROF_REPORTING_INTERVAL"),
    ({"ASPROF_REPORTING_INTERVAL": "off"}, "ASPROF_REPORTING_INTERVAL"),
    ({"ASPROF_CPU_INTERVAL": "fast"}, "ASPROF_CPU_INTERVAL"),
    ({"ASPROF_CPU_INTERVAL": "10000000"}, "ASPROF_CPU_INTERVAL"),  # nanoseconds meant: 115 days
    ({"ASPROF_CPU_INTERVAL": "0"}, "ASPROF_CPU_INTERVAL"),
    ({"ASPROF_CPU_INTERVAL": "100ns"}, "ASPROF_CPU_INTERVAL"),
    ({"ASPROF_WALL_INTERVAL": "0"}, "ASPROF_WALL_INTERVAL"),
    ({"ASPROF_WALL_INTERVAL": "10us"}, "ASPROF_WALL_INTERVAL"),
    ({"ASPROF_WALL_INTERVAL": "sometimes"}, "ASPROF_WALL_INTERVAL"),
    ({"ASPROF_NATIVE_MEM": "0"}, "ASPROF_NATIVE_MEM"),
    ({"ASPROF_NATIVE_MEM": "lots"}, "ASPROF_NATIVE_MEM"),
    ({"ASPROF_NATIVE_MEM": "10q"}, "ASPROF_NATIVE_MEM"),
    ({"ASPROF_NATIVE_MEM": "1.5"}, "ASPROF_NATIVE_MEM"),
    ({"ASPROF_NATIVE_MEM": "-1m"}, "ASPROF_NATIVE_MEM"),
    ({"ASPROF_PYTHON_ALLOC": "lots"}, "ASPROF_PYTHON_ALLOC"),  # issue #16
    ({"ASPROF_PYTHON_ALLOC": "1.5"}, "ASPROF_PYTHON_ALLOC"),
    ({"ASPROF_PYTHON_ALLOC": "-1m"}, "ASPROF_PYTHON_ALLOC"),
    ({"ASPROF_PYTHON_ALLOC": "2TiB"}, "ASPROF_PYTHON_ALLOC"),
    ({"ASPROF_FORCE_NATIVE_MEM": "please"}, "ASPROF_FORCE_NATIVE_MEM"),
    ({"ASPROF_CSTACK": "lbr"}, "ASPROF_CSTACK"),
    ({"ASPROF_ENGINE": "pyspy"}, "ASPROF_ENGINE"),  # issue #11
    ({"ASPROF_PYTHON_FRAMES_INLINE": "sometimes"}, "ASPROF_PYTHON_FRAMES_INLINE"),  # issue #12
    ({"ASPROF_PYTHON_FRAMES_INLINE": "2"}, "ASPROF_PYTHON_FRAMES_INLINE"),
    ({"ASPROF_ALL_USER": "kernel"}, "ASPROF_ALL_USER"),
    ({"ASPROF_LIB": "/nonexistent/libasyncProfiler.so"}, "ASPROF_LIB"),
    ({"ASPROF_LIB": "/"}, "ASPROF_LIB"),
    ({"ASPROF_LOG_LEVEL": "verbose"}, "ASPROF_LOG_LEVEL"),
    ({"ASPROF_SERVICE": "x" * 300}, "ASPROF_SERVICE"),
    ({"ASPROF_SERVICE": "tab\there"}, "ASPROF_SERVICE"),
    ({"ASPROF_VERSION": "v" * 300}, "ASPROF_VERSION"),
    ({"ASPROF_ENV": "e" * 300}, "ASPROF_ENV"),
    ({"ASPROF_TAGS": "novalue"}, "ASPROF_TAGS"),
    ({"ASPROF_TAGS": "=v"}, "ASPROF_TAGS"),
    ({"ASPROF_TAGS": "bad key=v"}, "ASPROF_TAGS"),
    ({"ASPROF_TAGS": "k=" + "v" * 300}, "ASPROF_TAGS"),
    ({"ASPROF_KILL_SWITCH_FILE": "/tmp/\x07"}, "ASPROF_KILL_SWITCH_FILE"),
    ({"ASPROF_FILE_MODE": "rw-r-----"}, "ASPROF_FILE_MODE"),
    ({"ASPROF_FILE_MODE": "666"}, "ASPROF_FILE_MODE"),  # others could write
    ({"ASPROF_FILE_MODE": "700"}, "ASPROF_FILE_MODE"),  # executable
    ({"ASPROF_FILE_MODE": "400"}, "ASPROF_FILE_MODE"),  # the owner could not write
    ({"ASPROF_FILE_MODE": "8"}, "ASPROF_FILE_MODE"),
    ({"ASPROF_LIB": "lib/libasyncProfiler.so"}, "ASPROF_LIB"),  # relative: refused
    ({"ASPROF_MAX_CPU_PERCENT": "0"}, "ASPROF_MAX_CPU_PERCENT"),
    ({"ASPROF_MAX_CPU_PERCENT": "-3"}, "ASPROF_MAX_CPU_PERCENT"),
    ({"ASPROF_MAX_CPU_PERCENT": "five"}, "ASPROF_MAX_CPU_PERCENT"),
    ({"ASPROF_MAX_CPU_PERCENT": "nan"}, "ASPROF_MAX_CPU_PERCENT"),
    ({"ASPROF_MAX_MEMORY_MB": "0"}, "ASPROF_MAX_MEMORY_MB"),
    ({"ASPROF_MAX_MEMORY_MB": "lots"}, "ASPROF_MAX_MEMORY_MB"),
    ({"ASPROF_MAX_MEMORY_MB": "256 bytes"}, "ASPROF_MAX_MEMORY_MB"),
    ({"ASPROF_MAX_MEMORY_MB": "-1"}, "ASPROF_MAX_MEMORY_MB"),
]


@pytest.mark.parametrize("env,variable", INVALID)
def test_invalid_names_the_variable_and_the_value(env: Dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        EnvConfig.from_environ(env)
    e = info.value
    assert e.variable == variable
    assert variable in str(e)
    if variable in env:
        assert repr(env[variable]) in str(e)
    assert "\n" not in str(e)


def test_every_documented_variable_is_tested_valid_and_invalid() -> None:
    valid = {k for env, _, _ in VALID for k in env}
    invalid = {v for _, v in INVALID}
    names = {v.name for v in VARIABLES}
    assert names - valid == set()
    assert names - invalid == set()


def test_the_kill_switch_wins_over_invalid_values() -> None:
    cfg = parse(ASPROF_ENABLED="0", ASPROF_REPORTING_INTERVAL="bogus", ASPROF_LIB="/nope")
    assert not cfg.enabled


def test_unknown_variables_are_reported() -> None:
    cfg = parse(ASPROF_REPORTING_INTERVALS="5s", ASPROF_LIB=sys.executable)
    assert cfg.unknown_variables == ["ASPROF_REPORTING_INTERVALS"]


@pytest.mark.parametrize("text,seconds", [("30", 30), ("30s", 30), ("500ms", 0.5), ("1.5m", 90), ("2h", 7200),
                                          (".5", 0.5), ("100us", 1e-4), ("100µs", 1e-4), ("5 sec", 5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "1.2.3", "10 parsecs", "-1", "1e", "0x10", "1,5"])
def test_parse_duration_rejects(text: str) -> None:
    assert parse_duration(text) is None


def test_the_docs_table_lists_every_variable() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    rows = set(re.findall(r"^\| `(ASPROF_[A-Z0-9_]+)` \|", doc, re.M))
    assert rows == {v.name for v in VARIABLES}


# ---------------------------------------------------------------- building the Profiler

def test_profiler_gets_every_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an interpreter with libpython linked into its executable (Debian's python3.14) refuses
    # ASPROF_NATIVE_MEM (tested elsewhere); here every setting must reach the Profiler
    monkeypatch.setattr("asprof.engines.asyncprofiler.nativemem_hazard", lambda: None)
    env = {
        "ASPROF_REPORTER": str(tmp_path / "p"), "ASPROF_REPORTING_INTERVAL": "2s",
        "ASPROF_CPU_INTERVAL": "10ms", "ASPROF_WALL_INTERVAL": "50ms", "ASPROF_NATIVE_MEM": "1m",
        "ASPROF_CSTACK": "fp", "ASPROF_ALL_USER": "0", "ASPROF_SERVICE": "svc", "ASPROF_VERSION": "9",
        "ASPROF_ENV": "test", "ASPROF_TAGS": "a=1", "ASPROF_KILL_SWITCH_FILE": str(tmp_path / "off"),
        "ASPROF_MAX_CPU_PERCENT": "3", "ASPROF_MAX_MEMORY_MB": "64",
    }
    p = config_mod.build_profiler(env)
    assert p is not None
    assert isinstance(p.reporter, asprof.LocalReporter) and p.reporter.directory == str(tmp_path / "p")
    assert (tmp_path / "p").is_dir()
    assert p.reporting_interval == 2.0
    assert p.options == asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.05, native_mem=1 << 20,
                                               cstack="fp", all_user=False)
    assert dict(p.extra_metadata) == {"service": "svc", "version": "9", "env": "test", "a": "1"}
    assert p.kill_switch_file == str(tmp_path / "off")
    assert p.max_cpu_percent == 3.0 and p.max_memory_mb == 64.0
    assert config_mod.build_profiler({"ASPROF_ENABLED": "off"}) is None


def test_s3_reporter_from_environment(tmp_path: Path) -> None:
    pytest.importorskip("boto3")
    env = {**S3_BASE, "ASPROF_S3_REGION": "eu-west-1", "ASPROF_S3_ENDPOINT_URL": "http://127.0.0.1:1",
           "ASPROF_S3_SPOOL_DIR": str(tmp_path / "spool")}
    p = config_mod.build_profiler(env)
    assert p is not None
    r: Any = p.reporter
    try:
        assert type(r).__name__ == "S3Reporter"
        assert (r.bucket, r.bucket_owner, r.profiling_group, r.key_prefix) == \
            ("my-bucket", "123456789012", "grp", "some/prefix/")
        assert r._client_kwargs == {"region_name": "eu-west-1", "endpoint_url": "http://127.0.0.1:1"}
        assert r.spool_dir is not None and r.spool_dir.startswith(str(tmp_path / "spool"))
    finally:
        r.close(0)


def test_unusable_directory_is_an_error_naming_the_reporter(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as info:
        config_mod.build_profiler({"ASPROF_REPORTER": str(tmp_path / "file" / "sub")})
    assert info.value.variable == "ASPROF_REPORTER"


# ---------------------------------------------------------------- start_from_environment, in this process

@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k in list(os.environ):
        if k.startswith("ASPROF_") or k.startswith("STUB_"):
            monkeypatch.delenv(k)
    logger = logging.getLogger("asprof")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def asprof_records(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("asprof") and r.levelno >= level]


@pytest.mark.parametrize("env,variable", [e for e in INVALID if e[1] != "ASPROF_LOG_LEVEL"][::3])
def test_start_with_an_invalid_value_logs_one_line_and_stays_off(
        env: Dict[str, str], variable: str, caplog: pytest.LogCaptureFixture, clean_env: None,
        no_profiler: None, stub_lib: Path) -> None:
    caplog.set_level(logging.DEBUG, logger="asprof")
    assert start_from_environment({"ASPROF_LIB": str(stub_lib), **env}) is None
    lines = asprof_records(caplog)
    assert len(lines) == 1, [r.getMessage() for r in lines]
    msg = lines[0].getMessage()
    assert lines[0].levelno == logging.ERROR
    assert variable in msg and "profiling is off" in msg
    if variable in env:
        assert repr(env[variable]) in msg
    from asprof.agent.loop import current

    assert current() is None


def test_start_from_environment_runs_and_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 clean_env: None, no_profiler: None, stub_lib: Path) -> None:
    caplog.set_level(logging.INFO, logger="asprof")
    out = tmp_path / "out"
    handle = start_from_environment({"ASPROF_LIB": str(stub_lib), "ASPROF_REPORTER": f"file://{out}",
                                     "ASPROF_REPORTING_INTERVAL": "200ms", "ASPROF_SERVICE": "svc"})
    assert handle is not None and handle.running
    try:
        deadline = time.monotonic() + 10
        while len(list(out.glob("*.jfr"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert asprof.stop_profiling(10)
    files = sorted(out.glob("*.jfr"))
    assert len(files) >= 2
    assert all(f.name.endswith(f"_{os.getpid()}.jfr") or f"_{os.getpid()}-" in f.name for f in files)
    assert all(f.read_bytes().startswith(b"STUBJFR") for f in files)
    assert not asprof_records(caplog)


def test_library_missing_is_one_line(caplog: pytest.LogCaptureFixture, clean_env: None, no_profiler: None,
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG, logger="asprof")
    monkeypatch.setattr("asprof.engines.asyncprofiler._candidates", lambda path: [("bundled copy", str(tmp_path / "none.so"))])
    # issue #11: with ASPROF_ENGINE=auto the built-in engine runs instead (tests/builtin/test_choice.py)
    assert start_from_environment({"ASPROF_REPORTER": str(tmp_path / "p"), "ASPROF_ENGINE": "async-profiler"}) is None
    lines = asprof_records(caplog)
    assert len(lines) == 1 and "not found" in lines[0].getMessage()
    assert "\n" not in lines[0].getMessage()


def test_disabled_logs_and_starts_nothing(caplog: pytest.LogCaptureFixture, clean_env: None,
                                          no_profiler: None, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG, logger="asprof")
    assert start_from_environment({"ASPROF_ENABLED": "false", "ASPROF_REPORTER": str(tmp_path / "p")}) is None
    assert not (tmp_path / "p").exists()
    assert [r.getMessage() for r in asprof_records(caplog, logging.INFO)] == \
        ["profiling is disabled by ASPROF_ENABLED=false"]


def test_env_kill_switch_wins_over_code(clean_env: None, no_profiler: None, stub_lib: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASPROF_ENABLED", "0")
    handle = asprof.Profiler(asprof.LocalReporter(tmp_path / "p"), library_path=stub_lib,
                             reporting_interval=0.1).start()
    assert not handle.running
    time.sleep(0.3)
    assert list((tmp_path / "p").iterdir()) == []


def test_kill_switch_file_present_at_start(clean_env: None, no_profiler: None, stub_lib: Path,
                                           tmp_path: Path) -> None:
    (tmp_path / "off").write_text("")
    assert start_from_environment({"ASPROF_LIB": str(stub_lib), "ASPROF_REPORTER": str(tmp_path / "p"),
                                   "ASPROF_KILL_SWITCH_FILE": str(tmp_path / "off")}) is None


def test_unknown_variable_warns_with_a_suggestion(caplog: pytest.LogCaptureFixture, clean_env: None,
                                                  no_profiler: None, stub_lib: Path, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG, logger="asprof")
    handle = start_from_environment({"ASPROF_LIB": str(stub_lib), "ASPROF_REPORTER": str(tmp_path),
                                     "ASPROF_REPORTNG_INTERVAL": "1s"})
    try:
        assert handle is not None and handle.running
    finally:
        asprof.stop_profiling(10)
    warnings = [r.getMessage() for r in asprof_records(caplog)]
    assert warnings == ["ignoring unknown variable ASPROF_REPORTNG_INTERVAL (did you mean "
                        "ASPROF_REPORTING_INTERVAL?)"]


def test_already_running_is_not_an_error(caplog: pytest.LogCaptureFixture, clean_env: None, no_profiler: None,
                                         stub_lib: Path, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG, logger="asprof")
    asprof.start_profiling(asprof.LocalReporter(tmp_path), library_path=stub_lib)
    try:
        assert start_from_environment({"ASPROF_LIB": str(stub_lib), "ASPROF_REPORTER": str(tmp_path)}) is None
        assert not asprof_records(caplog)
    finally:
        asprof.stop_profiling(10)


# ---------------------------------------------------------------- in a fresh interpreter: import asprof.auto

APP = """
import os, sys, time
import asprof.auto
import asprof.auto  # idempotent
from asprof.autostart import start
assert start.auto_start() is asprof.auto.profiler
print("service ran", os.getpid(), asprof.auto.profiler is not None and asprof.auto.profiler.running)
sys.stdout.flush()
time.sleep(float(os.environ.get("APP_SECONDS", "0")))
"""


def asprof_lines(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if line.startswith("asprof[")]


@pytest.mark.parametrize("env,variable", [e for e in INVALID if e[1] not in ("ASPROF_LOG_LEVEL",)][::4])
def test_auto_with_invalid_value_one_stderr_line_and_the_service_runs(
        env: Dict[str, str], variable: str, tmp_path: Path) -> None:
    r = run_python(APP, timeout=60, cwd=tmp_path, **env)
    assert r.returncode == 0, r.stderr
    assert "service ran" in r.stdout and r.stdout.strip().endswith("False")
    lines = asprof_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert variable in lines[0] and "ERROR" in lines[0] and "profiling is off" in lines[0]
    assert r.stderr.strip() == lines[0]  # nothing else: no traceback
    assert not (tmp_path / "profiles").exists()


def test_auto_invalid_log_level_is_one_line(tmp_path: Path) -> None:
    r = run_python(APP, timeout=60, cwd=tmp_path, ASPROF_LOG_LEVEL="chatty")
    assert r.returncode == 0 and r.stdout.strip().endswith("False")
    assert len(asprof_lines(r.stderr)) == 1 and "ASPROF_LOG_LEVEL='chatty'" in r.stderr


def test_auto_starts_quietly_and_writes_profiles(tmp_path: Path, stub_lib: Path) -> None:
    r = run_python(APP, timeout=60, cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_REPORTING_INTERVAL="200ms",
                   APP_SECONDS="0.7")
    assert r.returncode == 0, r.stderr
    pid = r.stdout.split()[2]
    assert r.stdout.strip().endswith("True")
    assert r.stderr == ""  # the default level: only warnings and errors
    files = list((tmp_path / "profiles").glob(f"*_{pid}*.jfr"))
    assert len(files) >= 2  # rotated ones, and the last one at exit
    for f in files:
        assert re.fullmatch(rf"STUBJFR start=(\d+) pid={pid}\nEND start=\1\n", f.read_text()), f.read_text()


def test_auto_log_level_info_goes_to_stderr_until_logging_is_configured(tmp_path: Path, stub_lib: Path) -> None:
    code = APP + """
import logging
logging.basicConfig(format="APP %(name)s %(message)s", level=logging.INFO)
import asprof
asprof.stop_profiling()
"""
    r = run_python(code, timeout=60, cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_LOG_LEVEL="info")
    assert r.returncode == 0, r.stderr
    started = [line for line in r.stderr.splitlines() if "profiling started" in line]
    assert len(started) == 1 and started[0].startswith("asprof[") and "INFO" in started[0]
    stopped = [line for line in r.stderr.splitlines() if "profiling stopped" in line]
    assert stopped == ["APP asprof profiling stopped"]  # once: through the application's handler only


def test_auto_disabled(tmp_path: Path, stub_lib: Path) -> None:
    r = run_python(APP, timeout=60, cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_ENABLED="0",
                   ASPROF_LOG_LEVEL="info")
    assert r.returncode == 0 and r.stdout.strip().endswith("False")
    assert asprof_lines(r.stderr) == [line for line in r.stderr.splitlines() if line]
    assert "disabled by ASPROF_ENABLED=0" in r.stderr
    assert not (tmp_path / "profiles").exists()


def test_kill_switch_file_stops_within_one_interval(tmp_path: Path, stub_lib: Path) -> None:
    code = """
import os, sys, time
import asprof.auto
p = asprof.auto.profiler
assert p is not None and p.running
time.sleep(0.5)
open(os.environ["ASPROF_KILL_SWITCH_FILE"], "w").close()
t0 = time.monotonic()
while p.running and time.monotonic() - t0 < 10:
    time.sleep(0.01)
print("stopped after", round(time.monotonic() - t0, 3), "running", p.running)
"""
    r = run_python(code, timeout=60, cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_REPORTING_INTERVAL="300ms",
                   ASPROF_KILL_SWITCH_FILE=str(tmp_path / "kill"))
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert words[-1] == "False" and float(words[2]) < 2 * 0.3 + 0.6, r.stdout  # one interval, and slack
    assert "kill switch" in r.stderr


def test_native_memory_refused_where_it_would_crash(tmp_path: Path, stub_lib: Path) -> None:
    python = "/usr/bin/python3"
    probe = "from asprof.engines.asyncprofiler import nativemem_hazard; print(nativemem_hazard() is not None)"
    if not os.path.exists(python) or run_python(probe, python=python).stdout.strip() != "True":
        pytest.skip("no interpreter with libpython linked into its executable here")
    r = run_python(APP, python=python, cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_NATIVE_MEM="10m")
    assert r.returncode == 0 and "service ran" in r.stdout
    lines = asprof_lines(r.stderr)
    assert len(lines) == 1 and "ASPROF_NATIVE_MEM='10m'" in lines[0] and "ASPROF_FORCE_NATIVE_MEM" in lines[0]


@requires_real
def test_memory_guard_from_the_environment(tmp_path: Path) -> None:
    code = """
import time
import asprof.auto
p = asprof.auto.profiler
t0 = time.monotonic()
while p is not None and p.running and time.monotonic() - t0 < 10:
    time.sleep(0.01)
print("running", p is not None and p.running)
"""
    r = run_python(code, timeout=60, cwd=tmp_path, ASPROF_REPORTING_INTERVAL="200ms", ASPROF_MAX_MEMORY_MB="0.01")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "running False"
    assert "overhead guard" in r.stderr


def test_s3_metadata_json_carries_the_extra_keys(tmp_path: Path, stub_lib: Path) -> None:
    pytest.importorskip("boto3")
    pytest.importorskip("moto")
    import io
    import json
    import zipfile

    from aws_test_servers import ACCOUNT_ID, AWS_TEST_ENV, S3Server

    server = S3Server(str(tmp_path / "s3"), buckets=["profiles-bucket"])
    server.start()
    try:
        code = "import asprof.auto, time; time.sleep(0.5)"
        r = run_python(code, timeout=90, cwd=tmp_path, ASPROF_LIB=str(stub_lib), **AWS_TEST_ENV,
                       ASPROF_REPORTER="s3://profiles-bucket/team/app", ASPROF_S3_BUCKET_OWNER=ACCOUNT_ID,
                       ASPROF_S3_ENDPOINT_URL=server.endpoint_url, ASPROF_S3_REGION="us-east-1",
                       ASPROF_SERVICE="checkout", ASPROF_VERSION="1.2.3", ASPROF_ENV="prod",
                       ASPROF_TAGS="team=payments", ASPROF_REPORTING_INTERVAL="200ms")
        assert r.returncode == 0, r.stderr
        entries = server.journal()
    finally:
        server.close()
    assert entries, r.stderr
    for e in entries:
        assert e["key"].startswith("team/app/profile_checkout_unknown__")
        with zipfile.ZipFile(io.BytesIO(e["body"])) as z:
            meta = json.loads(z.read("metadata.json"))
        assert {"start", "end", "reporting_interval"} <= set(meta)
        assert meta["reporting_interval"] == 200
        assert meta["extra"] == {"service": "checkout", "version": "1.2.3", "env": "prod", "team": "payments"}
