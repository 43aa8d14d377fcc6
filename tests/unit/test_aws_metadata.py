"""AWS host metadata detection against IMDS and ECS endpoints emulated on loopback.

169.254.169.254 is never contacted: every test points
AWS_EC2_METADATA_SERVICE_ENDPOINT at a loopback server or disables IMDS.
The EC2 tests run twice: through botocore's IMDS client and through the
urllib fallback used when botocore is not installed.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import asprof.metadata.aws as aws  # noqa: E402
from asprof.metadata import Ec2Metadata, FargateMetadata, NoMetadata, ReportMetadata  # noqa: E402
from asprof.metadata.aws import detect_agent_metadata  # noqa: E402

from aws_test_servers import MetadataServer, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TASK_ARN = "arn:aws:ecs:us-west-2:444455556666:task/prod_cluster/0123456789abcdef0123456789abcdef"

_AWS_VARS = (
    "AWS_EC2_METADATA_DISABLED", "AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE",
    "AWS_EC2_METADATA_V1_DISABLED", "ECS_CONTAINER_METADATA_URI_V4", "ECS_CONTAINER_METADATA_URI",
    "AWS_PROFILE", "AWS_METADATA_SERVICE_TIMEOUT", "AWS_METADATA_SERVICE_NUM_ATTEMPTS", "AWS_IMDS_USE_IPV6",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in _AWS_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    # Safety net: a test that forgets to point IMDS somewhere gets it disabled.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def server() -> Iterator[MetadataServer]:
    s = MetadataServer()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["botocore", "urllib"])
def imds_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "botocore":
        pytest.importorskip("botocore", reason="botocore is not installed: its IMDS client is not tested")
    monkeypatch.setattr(aws, "USE_BOTOCORE", request.param == "botocore")
    return str(request.param)


def use_imds(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED")
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)


def aws_logs(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("asprof") and r.levelno >= level]


# ----------------------------------------------------------------------------- EC2


def test_ec2_with_imdsv2(server: MetadataServer, monkeypatch: pytest.MonkeyPatch, imds_client: str,
                         caplog: pytest.LogCaptureFixture) -> None:
    use_imds(monkeypatch, server.url)
    md = detect_agent_metadata({"service": "api"})
    assert md == Ec2Metadata("111122223333", "eu-west-1", "i-0abc123def456789a", "m5.large",
                             extra={"service": "api"})
    assert md.machine == "ec2_i-0abc123def456789a_"
    assert server.requests == ["PUT /latest/api/token", "GET /latest/dynamic/instance-identity/document"]
    assert aws_logs(caplog) == []


def test_ec2_endpoint_with_trailing_slash(server: MetadataServer, monkeypatch: pytest.MonkeyPatch,
                                          imds_client: str) -> None:
    use_imds(monkeypatch, server.url + "/")
    assert isinstance(detect_agent_metadata(), Ec2Metadata)


def test_imdsv1_fallback_and_its_switch(server: MetadataServer, monkeypatch: pytest.MonkeyPatch,
                                        imds_client: str) -> None:
    server.imds_mode = "v1"  # the token request is refused, plain GETs work
    use_imds(monkeypatch, server.url)
    assert isinstance(detect_agent_metadata(), Ec2Metadata)
    monkeypatch.setenv("AWS_EC2_METADATA_V1_DISABLED", "true")
    assert isinstance(detect_agent_metadata(), NoMetadata)


def test_imds_disabled_by_the_standard_variable(server: MetadataServer, monkeypatch: pytest.MonkeyPatch,
                                                imds_client: str, caplog: pytest.LogCaptureFixture) -> None:
    use_imds(monkeypatch, server.url)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    caplog.set_level(logging.INFO, logger="asprof")
    md = detect_agent_metadata({"env": "dev"})
    assert md == NoMetadata(extra={"env": "dev"})
    assert server.requests == []
    (line,) = aws_logs(caplog)
    assert "AWS_EC2_METADATA_DISABLED" in line.getMessage() and line.levelno == logging.INFO


def test_nothing_answers(monkeypatch: pytest.MonkeyPatch, imds_client: str,
                         caplog: pytest.LogCaptureFixture) -> None:
    use_imds(monkeypatch, f"http://127.0.0.1:{free_port()}")  # connection refused
    caplog.set_level(logging.INFO, logger="asprof")
    md = detect_agent_metadata()
    assert isinstance(md, NoMetadata) and md.machine == "unknown__"
    (line,) = aws_logs(caplog)  # one line, and not a scary one
    assert line.levelno == logging.INFO and "no AWS host metadata" in line.getMessage()


def test_hanging_imds_is_bounded(server: MetadataServer, monkeypatch: pytest.MonkeyPatch, imds_client: str,
                                 caplog: pytest.LogCaptureFixture) -> None:
    server.imds_mode = "hang"
    use_imds(monkeypatch, server.url)
    caplog.set_level(logging.INFO, logger="asprof")
    t = time.monotonic()
    md = detect_agent_metadata(timeout=0.3)
    assert isinstance(md, NoMetadata)
    assert time.monotonic() - t < 10  # bounded (token + one GET, each 0.3 s; generous margin)
    assert len(aws_logs(caplog)) == 1


def test_hanging_imds_with_the_default_timeout(server: MetadataServer, monkeypatch: pytest.MonkeyPatch,
                                               imds_client: str) -> None:
    server.imds_mode = "hang"
    use_imds(monkeypatch, server.url)
    t = time.monotonic()
    assert isinstance(detect_agent_metadata(), NoMetadata)
    assert time.monotonic() - t < 10  # about 2 s: the brief's bound, with margin for a loaded machine


@pytest.mark.parametrize("mode,words", [("malformed", "malformed JSON"), ("error", "HTTP 500"),
                                        ("absent", "HTTP 404")])
def test_bad_imds_answers_give_a_clear_warning(server: MetadataServer, monkeypatch: pytest.MonkeyPatch,
                                               imds_client: str, caplog: pytest.LogCaptureFixture,
                                               mode: str, words: str) -> None:
    server.imds_mode = mode
    use_imds(monkeypatch, server.url)
    assert isinstance(detect_agent_metadata(), NoMetadata)
    (line,) = aws_logs(caplog)
    assert line.levelno == logging.WARNING and words in line.getMessage(), line.getMessage()


def test_identity_document_without_an_instance_id(server: MetadataServer, monkeypatch: pytest.MonkeyPatch,
                                                  imds_client: str, caplog: pytest.LogCaptureFixture) -> None:
    del server.identity["instanceId"]
    use_imds(monkeypatch, server.url)
    assert isinstance(detect_agent_metadata(), NoMetadata)
    assert "instanceId" in aws_logs(caplog)[0].getMessage()


def test_invalid_endpoint_setting_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch, imds_client: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    use_imds(monkeypatch, "not a url")
    assert isinstance(detect_agent_metadata(), NoMetadata)
    (line,) = aws_logs(caplog)
    assert line.levelno == logging.WARNING


def test_ipv6_endpoint_mode_for_the_urllib_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")
    assert aws._imds_base_url() == "http://[fd00:ec2::254]/"
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:1")
    assert aws._imds_base_url() == "http://127.0.0.1:1/"  # an explicit endpoint wins


# ----------------------------------------------------------------------------- ECS / Fargate


def test_fargate_task(server: MetadataServer, monkeypatch: pytest.MonkeyPatch,
                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", server.url + "/v4/0123abcd-task")
    md = detect_agent_metadata({"service": "api"})
    assert md == FargateMetadata(
        aws_account_id="444455556666", aws_region_id="us-west-2", ecs_task_arn=TASK_ARN,
        ecs_cluster_arn="arn:aws:ecs:us-west-2:444455556666:cluster/prod_cluster", cpu_limit=0.25,
        memory_limit=512, extra={"service": "api"})
    # '/' and '_' become '-', ':' stays (the Rust agent's key).
    assert md.machine == ("ecs_arn:aws:ecs:us-west-2:444455556666:task-prod-cluster-"
                          "0123456789abcdef0123456789abcdef_")
    assert server.requests == ["GET /v4/0123abcd-task/task"]  # IMDS is not tried on ECS
    assert aws_logs(caplog) == []


def test_ecs_task_without_limits(server: MetadataServer, monkeypatch: pytest.MonkeyPatch) -> None:
    del server.task["Limits"]
    monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", server.url + "/v4/x/")
    md = detect_agent_metadata()
    assert isinstance(md, FargateMetadata) and md.cpu_limit is None and md.memory_limit is None


@pytest.mark.parametrize("mode,words", [("malformed", "malformed JSON"), ("no-arn", "no TaskARN"),
                                        ("error", "HTTP 500")])
def test_bad_ecs_answers_give_a_clear_warning(server: MetadataServer, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture, mode: str, words: str) -> None:
    server.ecs_mode = mode
    monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", server.url + "/v4/x")
    assert isinstance(detect_agent_metadata(), NoMetadata)
    (line,) = aws_logs(caplog)
    assert line.levelno == logging.WARNING and words in line.getMessage(), line.getMessage()


def test_malformed_task_arn(server: MetadataServer, monkeypatch: pytest.MonkeyPatch,
                            caplog: pytest.LogCaptureFixture) -> None:
    server.task["TaskARN"] = "not-an-arn"
    monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", server.url + "/v4/x")
    assert isinstance(detect_agent_metadata(), NoMetadata)
    assert "not an ARN" in aws_logs(caplog)[0].getMessage()


def test_hanging_ecs_endpoint_is_bounded(server: MetadataServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.ecs_mode = "hang"
    monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", server.url + "/v4/x")
    t = time.monotonic()
    assert isinstance(detect_agent_metadata(timeout=0.3), NoMetadata)
    assert time.monotonic() - t < 10


def test_unreachable_ecs_endpoint_warns(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", f"http://127.0.0.1:{free_port()}/v4/x")
    assert isinstance(detect_agent_metadata(), NoMetadata)
    (line,) = aws_logs(caplog)
    assert line.levelno == logging.WARNING  # the variable says ECS: its absence is worth a warning


# ----------------------------------------------------------------------------- robustness


def test_detection_never_raises(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def boom(*_: object, **__: object) -> Ec2Metadata:
        raise RuntimeError("bug")

    monkeypatch.setattr(aws, "ec2_metadata", boom)
    assert isinstance(detect_agent_metadata({"a": "b"}), NoMetadata)
    (line,) = aws_logs(caplog)
    assert "RuntimeError: bug" in line.getMessage()


def _run(code: str, **env: str) -> "subprocess.CompletedProcess[str]":
    e = {k: v for k, v in os.environ.items() if k not in _AWS_VARS}
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, env=e, cwd=str(ROOT))


def test_importing_asprof_aws_does_not_import_botocore() -> None:
    r = _run("""
        import sys
        import asprof, asprof.metadata.aws
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_ec2_detection_without_botocore_installed(server: MetadataServer) -> None:
    r = _run("""
        import sys
        sys.modules['botocore'] = None  # as if not installed
        from asprof.metadata.aws import detect_agent_metadata
        print(detect_agent_metadata().machine)
        assert 'boto3' not in sys.modules
    """, AWS_EC2_METADATA_SERVICE_ENDPOINT=server.url, AWS_CONFIG_FILE=os.devnull)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ec2_i-0abc123def456789a_"
    assert "PUT /latest/api/token" in server.requests


def _fake_engine_available() -> Optional[str]:
    try:
        import asprof  # noqa: F401

        from fakes import FakeEngine  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"the agent or its test engine is not available: {e}"
    return None


@pytest.mark.skipif(_fake_engine_available() is not None, reason=str(_fake_engine_available()))
def test_the_agent_detects_lazily_on_its_own_thread(server: MetadataServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import asprof

    from fakes import FakeEngine

    class Collect(asprof.Reporter):
        def __init__(self) -> None:
            self.metadata: List[ReportMetadata] = []

        def report(self, jfr: bytes, metadata: ReportMetadata) -> None:
            self.metadata.append(metadata)

    use_imds(monkeypatch, server.url)
    reporter = Collect()
    running = asprof.Profiler(reporter, reporting_interval=0.3, engine=FakeEngine()).start()
    try:
        assert server.requests == []  # start-up does not wait for (or even begin) detection
        deadline = time.monotonic() + 20
        while len(reporter.metadata) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        running.stop(timeout=10)
    assert reporter.metadata and all(isinstance(m.instance, Ec2Metadata) for m in reporter.metadata)
    assert server.requests.count("GET /latest/dynamic/instance-identity/document") == 1  # once, cached
