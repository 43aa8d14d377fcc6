"""``asprof doctor``: what the agent would do here and why not; never prints secrets;
works without async-profiler, saying what is missing and how to fix it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from asprof.cli import doctor as cli_doctor

from conftest import child_env, requires_real

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEDOCTOR0001", "AWS_SECRET_ACCESS_KEY": "doctor/SECRET+value/xyz123",
           "AWS_SESSION_TOKEN": "doctorSessionTokenValue987"}
NO_AWS = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
          "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def doctor(*args: str, cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    e = child_env(**{**NO_AWS, **env})
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "ECS_CONTAINER_METADATA_URI_V4", "AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        if k not in env:
            e.pop(k, None)
    return subprocess.run([sys.executable, "-m", "asprof", "doctor", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd)


def checks(r: subprocess.CompletedProcess) -> Dict[str, Dict[str, Any]]:
    data = json.loads(r.stdout)
    return {f"{c['section']}/{c['name']}": c for c in data["checks"]}


def test_text_report_with_a_library(tmp_path: Path, stub_lib: Path) -> None:
    r = doctor("--offline", cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_SERVICE="svc")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for section in ("Python", "Configuration", "async-profiler", "CPU sampling", "Native memory", "Container",
                    "Directories", "S3", "Host metadata"):
        assert f"\n{section}\n" in f"\n{out}", section
    assert f"library: {stub_lib}, version 4.5, optional features: thread_local_data, user_events" in out
    assert "perf_event_paranoid: " in out
    assert "engine: perf_events" in out or "engine: ctimer" in out
    assert f"profiles: {tmp_path / 'profiles'} would be created" in out
    assert "metadata: service=svc" in out
    assert out.rstrip().splitlines()[-1].startswith("Profiling would start: CPU samples")
    assert str(tmp_path / "profiles") in out.rstrip().splitlines()[-1]
    assert not (tmp_path / "profiles").exists()  # doctor creates nothing
    assert r.stderr == ""


def test_json_report(tmp_path: Path, stub_lib: Path) -> None:
    r = doctor("--json", "--offline", cwd=tmp_path, ASPROF_LIB=str(stub_lib))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["would_profile"] is True
    c = checks(r)
    assert c["async-profiler/library"]["status"] == "ok"
    assert c["CPU sampling/engine"]["status"] in ("ok", "warn")
    assert {"section", "name", "status", "detail", "fix"} <= set(c["Container/memory"])


def test_without_async_profiler_says_what_is_missing_and_how_to_fix_it(tmp_path: Path) -> None:
    r = doctor("--offline", cwd=tmp_path, ASPROF_LIB=str(tmp_path / "missing" / "libasyncProfiler.so"))
    assert r.returncode == 1
    assert "[FAIL] library: libasyncProfiler.so not found" in r.stdout
    assert "fix: install async-profiler" in r.stdout and "ASPROF_LIB" in r.stdout
    assert "Profiling would NOT start: " in r.stdout and "async-profiler not found" in r.stdout
    assert "CPU sampling" in r.stdout and "Container" in r.stdout  # the other checks still run


def test_without_any_library_on_the_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASPROF_LIB", raising=False)
    monkeypatch.setattr("asprof.engines.asyncprofiler._candidates", lambda path: [("bundled copy", str(tmp_path / "none.so"))])
    d = cli_doctor.diagnose({"ASPROF_ENGINE": "async-profiler"}, offline=True)
    assert not d.would_profile
    lib = [c for c in d.checks if c.name == "library"][0]
    assert lib.status == "fail" and "none.so" in lib.detail and lib.fix and "install" in lib.fix
    eng = [c for c in d.checks if c.section == "Engine"][0]
    assert eng.status == "fail" and "ASPROF_ENGINE=async-profiler" in eng.detail


def test_without_async_profiler_auto_says_the_builtin_engine_runs_and_why(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """issue #11: auto falls back to the built-in engine; the doctor says which engine and why."""
    from asprof.engines.builtin import unavailable_reason

    if unavailable_reason() is not None:
        pytest.skip(f"the built-in engine is unavailable: {unavailable_reason()}")
    monkeypatch.delenv("ASPROF_LIB", raising=False)
    monkeypatch.setattr("asprof.engines.asyncprofiler._candidates", lambda path: [("bundled copy", str(tmp_path / "none.so"))])
    d = cli_doctor.diagnose({}, offline=True)
    lib = [c for c in d.checks if c.name == "library"][0]
    assert lib.status == "warn" and "none.so" in lib.detail
    eng = [c for c in d.checks if c.section == "Engine"][0]
    assert eng.status == "ok" and eng.detail.startswith("builtin: auto, because async-profiler does not load")
    assert d.would_profile and "by the builtin engine" in d.summary


def test_invalid_configuration(tmp_path: Path, stub_lib: Path) -> None:
    r = doctor("--offline", cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_WALL_INTERVAL="often")
    assert r.returncode == 1
    assert "[FAIL] ASPROF_WALL_INTERVAL: invalid ASPROF_WALL_INTERVAL='often'" in r.stdout
    assert r.stdout.rstrip().endswith("Profiling would NOT start: invalid ASPROF_WALL_INTERVAL")


def test_disabled_and_kill_switch(tmp_path: Path, stub_lib: Path) -> None:
    r = doctor("--offline", cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_ENABLED="0")
    assert r.returncode == 1 and "disabled by ASPROF_ENABLED" in r.stdout
    (tmp_path / "off").write_text("")
    r = doctor("--offline", cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_KILL_SWITCH_FILE=str(tmp_path / "off"))
    assert r.returncode == 1 and "kill switch file present" in r.stdout


def test_unwritable_profiles_directory(tmp_path: Path, stub_lib: Path) -> None:
    (tmp_path / "file").write_text("")
    r = doctor("--offline", cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_REPORTER=str(tmp_path / "file" / "p"))
    assert r.returncode == 1
    assert f"[FAIL] profiles: {tmp_path / 'file'} is not a directory" in r.stdout


def test_unknown_variable_is_a_warning(tmp_path: Path, stub_lib: Path) -> None:
    r = doctor("--offline", cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_INTERVAL="5s")
    assert r.returncode == 0
    assert "[warn] ASPROF_INTERVAL: unknown variable" in r.stdout


def test_secrets_are_never_printed(tmp_path: Path, stub_lib: Path) -> None:
    pytest.importorskip("boto3")
    env = {**SECRETS, "ASPROF_LIB": str(stub_lib), "ASPROF_REPORTER": "s3://bucket/p",
           "ASPROF_S3_BUCKET_OWNER": "123456789012", "ASPROF_PROFILING_GROUP": "g", "AWS_DEFAULT_REGION": "us-east-1"}
    for args in (("--offline",), ("--timeout", "0.2"), ("--json", "--offline")):
        r = doctor(*args, cwd=tmp_path, **env)
        text = r.stdout + r.stderr
        for secret in SECRETS.values():
            assert secret not in text
            assert secret[:8] not in text
        assert r.returncode == 0, text
        assert "credentials" in text and ("source: environment variables" in text or "source: env" in text)


def test_s3_without_credentials(tmp_path: Path, stub_lib: Path) -> None:
    pytest.importorskip("boto3")
    r = doctor("--timeout", "0.2", cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_REPORTER="s3://bucket/p",
               ASPROF_S3_BUCKET_OWNER="123456789012", ASPROF_SERVICE="svc")
    assert r.returncode == 1
    assert "[FAIL] credentials: none found" in r.stdout and "S3 reporter unusable" in r.stdout


def test_metadata_endpoints(tmp_path: Path, stub_lib: Path) -> None:
    from aws_test_servers import MetadataServer

    server = MetadataServer()
    try:
        r = doctor("--json", cwd=tmp_path, ASPROF_LIB=str(stub_lib), AWS_EC2_METADATA_DISABLED="false",
                   AWS_EC2_METADATA_SERVICE_ENDPOINT=server.url)
        c = checks(r)["Host metadata/EC2 IMDS"]
        assert c["status"] == "ok" and "i-0abc123def456789a" in c["detail"] and "eu-west-1" in c["detail"]
        r = doctor("--json", cwd=tmp_path, ASPROF_LIB=str(stub_lib),
                   ECS_CONTAINER_METADATA_URI_V4=f"{server.url}/v4/abc")
        c = checks(r)["Host metadata/ECS task metadata"]
        assert c["status"] == "ok" and "task/prod_cluster" in c["detail"]
        server.ecs_mode = "hang"
        r = doctor("--json", "--timeout", "0.3", cwd=tmp_path, timeout=30, ASPROF_LIB=str(stub_lib),
                   ECS_CONTAINER_METADATA_URI_V4=f"{server.url}/v4/abc")
        c = checks(r)["Host metadata/ECS task metadata"]
        assert c["status"] == "warn"
    finally:
        server.close()


def test_cpu_engine_follows_perf_event_open() -> None:
    works, why = cli_doctor.perf_event_probe()
    d = cli_doctor.diagnose({}, offline=True)
    engine = [c for c in d.checks if c.section == "CPU sampling" and c.name == "engine"][0]
    if works:
        assert engine.status == "ok" and engine.detail.startswith("perf_events")
    else:
        assert engine.status == "warn" and engine.detail.startswith("ctimer") and why in engine.detail
        assert engine.fix and "perf_event_paranoid" in engine.fix


def test_unprivileged_user_sees_the_paranoid_consequence(tmp_path: Path, stub_lib: Path) -> None:
    setpriv = shutil.which("setpriv")
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid")
    if os.geteuid() != 0 or setpriv is None or not paranoid.exists() or int(paranoid.read_text()) < 2:
        pytest.skip("needs root, setpriv and perf_event_paranoid >= 2")
    lib = tmp_path / "lib2" / "libasyncProfiler.so"
    lib.parent.mkdir()
    shutil.copy(stub_lib, lib)
    for p in (tmp_path, lib.parent, lib):
        os.chmod(p, 0o755)
    ancestors: List[Path] = [p for p in tmp_path.parents if str(p) != "/"]
    modes = {p: p.stat().st_mode for p in ancestors}
    try:
        for p in ancestors:
            os.chmod(p, p.stat().st_mode | 0o005)
        env = child_env(ASPROF_LIB=str(lib), ASPROF_REPORTER=str(tmp_path / "p"), HOME=str(tmp_path), **NO_AWS)
        r = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                            "asprof", "doctor", "--json", "--offline"], capture_output=True, text=True, timeout=60,
                           env=env, cwd=tmp_path)
    finally:
        for p, m in modes.items():
            os.chmod(p, m)
    if r.returncode not in (0, 1) or not r.stdout.startswith("{"):
        pytest.skip(f"cannot run as nobody here: {r.stderr[-300:]}")
    c = checks(r)
    assert "unprivileged" in c["CPU sampling/perf_event_paranoid"]["detail"]
    assert c["CPU sampling/engine"]["detail"].startswith("ctimer")


@requires_real
def test_with_the_real_library(tmp_path: Path) -> None:
    r = doctor("--offline", cwd=tmp_path)
    assert r.returncode == 0, r.stdout
    assert "[ ok ] library: " in r.stdout and "libasyncProfiler.so, version " in r.stdout


def test_directories_the_reporters_would_refuse(tmp_path: Path, stub_lib: Path) -> None:
    """issue #13: doctor applies the reporters' rules (an existing directory others can write in, or
    a symlink, is refused, never changed) without touching anything."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    r = doctor("--json", "--offline", cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_REPORTER=str(shared))
    c = checks(r)["Directories/profiles"]
    assert c["status"] == "fail" and "can be reached by other users (mode 0777)" in c["detail"], c
    assert (shared.stat().st_mode & 0o777) == 0o777
    link = tmp_path / "link"
    link.symlink_to(shared)
    r = doctor("--json", "--offline", cwd=tmp_path, ASPROF_LIB=str(stub_lib), ASPROF_REPORTER=str(link))
    assert "is a symbolic link" in checks(r)["Directories/profiles"]["detail"]
