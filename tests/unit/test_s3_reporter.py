"""S3Reporter against a real S3-compatible server (moto's server mode) on loopback.

Every upload is a real boto3 call over HTTP to a server in a subprocess, which
the outage tests kill, freeze and restart. The server journals every object it
accepts (tests/aws_test_servers.py), so "every profile arrives exactly once,
in order" is checked against what it really received, across restarts.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from conftest import REAL_LIB

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asprof.metadata import AgentMetadata, Ec2Metadata, FargateMetadata, NoMetadata, ReportMetadata  # noqa: E402
from asprof.reporter.s3 import (  # noqa: E402
    JFR_ENTRY,
    METADATA_ENTRY,
    S3Reporter,
    metadata_json,
    object_key,
    profile_zip,
)

from aws_test_servers import ACCOUNT_ID, AWS_TEST_ENV, S3Server, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "asprof-profiles"


def _missing_s3_deps() -> Optional[str]:
    import importlib.util

    missing = []
    for m in ("boto3", "moto", "flask", "flask_cors"):
        try:
            found = importlib.util.find_spec(m) is not None  # without importing it
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(m)
    if missing:
        return f"{', '.join(missing)} not installed (pip install -e '.[test]')"
    return None


MISSING = _missing_s3_deps()
requires_s3_deps = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
T0 = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
FAST: Dict[str, Any] = dict(retry_initial_delay=0.05, retry_max_delay=0.2, drain_timeout=20.0)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in AWS_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "ECS_CONTAINER_METADATA_URI_V4"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    if MISSING is not None:
        pytest.skip(MISSING)
    server = S3Server(str(tmp_path / "s3"), buckets=[BUCKET])
    os.makedirs(server.workdir, exist_ok=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def reporters() -> Iterator[List[S3Reporter]]:
    made: List[S3Reporter] = []
    yield made
    for r in made:
        r.close(timeout=1.0)


def make_reporter(s3: S3Server, reporters: List[S3Reporter], **kw: Any) -> S3Reporter:
    args: Dict[str, Any] = dict(FAST)
    args.update(kw)
    owner = args.pop("bucket_owner", ACCOUNT_ID)
    bucket = args.pop("bucket", BUCKET)
    group = args.pop("profiling_group", "pg")
    if "client" not in args:
        args.setdefault("client_kwargs", s3.client_kwargs(read_timeout=args.pop("read_timeout", 5.0)))
    r = S3Reporter(bucket, owner, group, **args)
    reporters.append(r)
    return r


def md(i: int = 0, *, instance: Any = None, pid: int = 4242, seconds: float = 30.0, interval: float = 30.0,
       ) -> ReportMetadata:
    end = T0 + timedelta(seconds=seconds * i)
    return ReportMetadata(instance or NoMetadata(), end - timedelta(seconds=interval), end, interval, pid)


def jfr(i: int) -> bytes:
    # Not a real JFR (the real engine test below uploads real ones): distinct bytes per profile.
    return b"FLR\0" + f"profile {i} ".encode() * 200


def unzip(body: bytes) -> Tuple[List[zipfile.ZipInfo], Dict[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        infos = zf.infolist()
        return infos, {i.filename: zf.read(i) for i in infos}


def received(s3: S3Server) -> List[Tuple[str, bytes]]:
    """(key, JFR) of each object the server(s) accepted, in order."""
    return [(e["key"], unzip(e["body"])[1][JFR_ENTRY]) for e in s3.journal()]


def wait_until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ----------------------------------------------------------------------------- format (no server)


def test_key_matches_the_rust_agent() -> None:
    # The Rust agent's own test examples (src/reporter/s3.rs).
    assert object_key("pg", md(instance=Ec2Metadata("0", "us-east-1", "i-0", "c5.4xlarge"), pid=7)) == \
        "profile_pg_ec2_i-0__7_2025-01-02T03-04-05Z.zip"
    task = "arn:aws:ecs:us-east-1:123456789012:task/profiler-metadata-cluster/5261e761e0e2a3d92da3f02c8e5bab1f"
    fargate = FargateMetadata("123456789012", "us-east-1", task, "arn:aws:ecs:us-east-1:123456789012:cluster/c")
    assert object_key("pg", md(instance=fargate, pid=7)) == (
        "profile_pg_ecs_arn:aws:ecs:us-east-1:123456789012:task-profiler-metadata-cluster-"
        "5261e761e0e2a3d92da3f02c8e5bab1f__7_2025-01-02T03-04-05Z.zip")
    assert object_key("pg", md(pid=7)) == "profile_pg_unknown___7_2025-01-02T03-04-05Z.zip"
    # '_' in ids becomes '-' so that '_' stays the separator; the prefix goes on top.
    weird = Ec2Metadata("0", "r", "i_0/x", "t")
    assert object_key("pg", md(instance=weird, pid=7), "team/a/") == \
        "team/a/profile_pg_ec2_i-0-x__7_2025-01-02T03-04-05Z.zip"
    assert object_key("pg", md(pid=7), suffix=2) == "profile_pg_unknown___7_2025-01-02T03-04-05Z-2.zip"


def test_a_host_names_its_key_part_by_either_name() -> None:
    class Rack(AgentMetadata):  # the current name
        @property
        def s3_key_part(self) -> str:
            return "rack_r7_"

    class OldRack(AgentMetadata):  # written against the former name
        @property
        def machine(self) -> str:
            return "rack_r8_"

    assert Rack().machine == "rack_r7_"
    assert object_key("pg", md(instance=Rack(), pid=7)) == "profile_pg_rack_r7__7_2025-01-02T03-04-05Z.zip"
    assert object_key("pg", md(instance=OldRack(), pid=7)) == "profile_pg_rack_r8__7_2025-01-02T03-04-05Z.zip"


def test_key_time_is_the_profiles_end_in_utc() -> None:
    end = datetime(2024, 12, 31, 23, 59, 59, 999000, tzinfo=timezone(timedelta(hours=2)))
    m = ReportMetadata(NoMetadata(), end - timedelta(seconds=30), end, 30.0, 1)
    assert object_key("g", m).endswith("_1_2024-12-31T21-59-59Z.zip")


def test_metadata_json_is_the_rust_agents_compact_form() -> None:
    m = md(1, interval=30.0)
    start_ms = int((m.start - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds() * 1000)
    assert metadata_json(m) == (
        f'{{"start":{start_ms},"end":{start_ms + 30000},"reporting_interval":30000}}').encode()
    assert json.loads(metadata_json(md(interval=0.25)))["reporting_interval"] == 250
    # User metadata rides along under "extra", leaving the Rust agent's fields as they are.
    tagged = md(instance=NoMetadata(extra={"service": "api", "env": "prod"}))
    doc = json.loads(metadata_json(tagged))
    assert doc["extra"] == {"service": "api", "env": "prod"}
    assert list(doc)[:3] == ["start", "end", "reporting_interval"]


def test_zip_holds_the_jfr_then_metadata_both_deflated() -> None:
    body = profile_zip(jfr(1), md(1))
    infos, files = unzip(body)
    assert [i.filename for i in infos] == [JFR_ENTRY, METADATA_ENTRY]
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in infos)
    assert files[JFR_ENTRY] == jfr(1)
    assert files[METADATA_ENTRY] == metadata_json(md(1))
    assert profile_zip(jfr(1), md(1)) == body  # deterministic: a retry sends the same bytes
    # A 1970 profile time still makes a valid zip (zip dates start in 1980).
    old = ReportMetadata(NoMetadata(), datetime(1970, 1, 1, tzinfo=timezone.utc),
                         datetime(1970, 1, 1, 0, 0, 1, tzinfo=timezone.utc), 1.0, 1)
    assert unzip(profile_zip(b"x", old))[1][JFR_ENTRY] == b"x"


@requires_s3_deps
def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="12-digit"):
        S3Reporter(BUCKET, "not-an-account", "pg")
    with pytest.raises(ValueError, match="profiling group"):
        S3Reporter(BUCKET, ACCOUNT_ID, "")
    with pytest.raises(ValueError, match="bucket"):
        S3Reporter("", ACCOUNT_ID, "pg")
    with pytest.raises(ValueError, match="either client"):
        S3Reporter(BUCKET, ACCOUNT_ID, "pg", client=object(), client_kwargs={"region_name": "x"})
    with pytest.raises(ValueError, match="retry"):
        S3Reporter(BUCKET, ACCOUNT_ID, "pg", retry_initial_delay=0)


# ----------------------------------------------------------------------------- imports


def _run(code: str, **env: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    e = dict(os.environ)
    e.update(AWS_TEST_ENV)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, env=e, cwd=str(ROOT))


@requires_s3_deps
def test_boto3_is_imported_only_when_an_s3_reporter_is_made() -> None:
    r = _run("""
        import sys
        import asprof, asprof.metadata.aws, asprof.reporter, asprof.reporter.s3
        from asprof.reporter import S3Reporter
        assert not [m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')], sorted(sys.modules)
        S3Reporter('b', '123456789012', 'pg')
        assert 'boto3' in sys.modules
        print('ok')
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_without_boto3_the_error_says_which_extra_to_install() -> None:
    r = _run("""
        import sys
        sys.modules['boto3'] = None  # as if not installed
        from asprof.reporter import S3Reporter
        try:
            S3Reporter('b', '123456789012', 'pg')
        except ImportError as e:
            print(e)
    """)
    assert r.returncode == 0, r.stderr
    assert "asprof[s3]" in r.stdout


# ----------------------------------------------------------------------------- uploads


def test_upload_key_zip_and_metadata(s3: S3Server, reporters: List[S3Reporter]) -> None:
    r = make_reporter(s3, reporters, key_prefix="prod/")
    instance = Ec2Metadata("111122223333", "eu-west-1", "i-0abc", "m5.large", extra={"service": "api"})
    meta = md(1, instance=instance, pid=321)
    r.report(jfr(1), meta)
    assert r.flush(20)
    key = "prod/profile_pg_ec2_i-0abc__321_2025-01-02T03-04-35Z.zip"
    client = s3.client()
    assert [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET)["Contents"]] == [key]
    obj = client.get_object(Bucket=BUCKET, Key=key)
    assert obj["ContentType"] == "application/zip"
    infos, files = unzip(obj["Body"].read())
    assert [i.filename for i in infos] == [JFR_ENTRY, METADATA_ENTRY]
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in infos)
    assert files[JFR_ENTRY] == jfr(1)
    doc = json.loads(files[METADATA_ENTRY])
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    assert doc["start"] == (meta.start - epoch) // timedelta(milliseconds=1)
    assert doc["end"] == (meta.end - epoch) // timedelta(milliseconds=1) == 1735787075678
    assert doc["reporting_interval"] == 30000
    assert doc["extra"] == {"service": "api"}
    (entry,) = s3.journal()
    assert entry["if_none_match"] == "*"  # never overwrites
    assert r.uploaded_count == 1 and r.lost_count == 0 and r.dropped_count == 0


def test_uploads_run_on_the_reporters_own_daemon_thread(s3: S3Server, reporters: List[S3Reporter]) -> None:
    import boto3

    kwargs = s3.client_kwargs()
    client = boto3.session.Session().client("s3", **kwargs)
    threads: List[Tuple[str, bool]] = []
    client.meta.events.register(
        "before-send.s3.PutObject",
        lambda **_: threads.append((threading.current_thread().name, threading.current_thread().daemon)))
    r = make_reporter(s3, reporters, client=client)
    r.report(jfr(1), md(1))
    r.report(jfr(2), md(2))
    assert r.flush(20)
    assert threads == [("asprof-s3", True)] * 2
    assert len(s3.journal()) == 2


def test_report_never_waits_for_the_network(s3: S3Server, reporters: List[S3Reporter]) -> None:
    r = make_reporter(s3, reporters, read_timeout=30.0)
    s3.freeze()  # connections hang: an upload would take the full read timeout
    try:
        for i in range(3):
            r.report(jfr(i), md(i))  # returns at once
        assert r.pending_count == 3 and s3.journal() == []
    finally:
        s3.thaw()
    assert r.flush(40)
    assert [j for _, j in received(s3)] == [jfr(i) for i in range(3)]


def test_wrong_bucket_owner_is_a_clear_error_logged_once_and_not_retried(
        s3: S3Server, reporters: List[S3Reporter], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="asprof")
    r = make_reporter(s3, reporters, bucket_owner="111111111111")
    r.report(jfr(1), md(1))
    r.report(jfr(2), md(2))
    assert r.flush(20)
    assert s3.journal() == []
    assert r.lost_count == 2 and r.uploaded_count == 0
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1, [rec.getMessage() for rec in errors]
    message = errors[0].getMessage()
    assert "AccessDenied" in message and "ExpectedBucketOwner=111111111111" in message
    assert "will not be retried" in message
    assert not [rec for rec in caplog.records if "will retry" in rec.getMessage()]


def test_missing_bucket_is_permanent(s3: S3Server, reporters: List[S3Reporter],
                                     caplog: pytest.LogCaptureFixture) -> None:
    r = make_reporter(s3, reporters, bucket="no-such-bucket-here")
    r.report(jfr(1), md(1))
    assert r.flush(20)
    assert r.lost_count == 1
    assert any("NoSuchBucket" in rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR)


def test_two_profiles_never_share_a_key_and_nothing_is_overwritten(
        s3: S3Server, reporters: List[S3Reporter]) -> None:
    client = s3.client()
    base = "profile_pg_unknown___4242_2025-01-02T03-04-05Z"
    client.put_object(Bucket=BUCKET, Key=base + ".zip", Body=b"someone else's")
    r = make_reporter(s3, reporters)
    same_second = [md(0), md(0, seconds=0), ReportMetadata(NoMetadata(), T0, T0 + timedelta(milliseconds=200), 0.2,
                                                           4242)]
    for i, m in enumerate(same_second):
        r.report(jfr(i), m)
    assert r.flush(20)
    assert client.get_object(Bucket=BUCKET, Key=base + ".zip")["Body"].read() == b"someone else's"
    got = [(e["key"], unzip(e["body"])[1][JFR_ENTRY]) for e in s3.journal()[1:]]  # [0]: the test's own
    assert [k for k, _ in got] == [f"{base}-1.zip", f"{base}-2.zip", f"{base}-3.zip"]
    assert [j for _, j in got] == [jfr(0), jfr(1), jfr(2)]


@pytest.mark.parametrize("head", ["allowed", "denied"])
def test_a_retry_after_a_lost_answer_does_not_duplicate(s3: S3Server, reporters: List[S3Reporter],
                                                         head: str) -> None:
    # The server stores the object but answers after the client gave up (read
    # timeout). The retry finds the key taken and recognises its own profile: by
    # its id (HeadObject), or, when HeadObject is denied (write-only credentials),
    # because an earlier attempt at that very key may have arrived.
    s3.control(slow_put=2.0, slow_put_count=1, deny_head=1 if head == "denied" else 0)
    r = make_reporter(s3, reporters, read_timeout=0.5, retry_initial_delay=0.2, retry_max_delay=0.3)
    r.report(jfr(1), md(1))
    assert r.flush(20)
    key = "profile_pg_unknown___4242_2025-01-02T03-04-35Z.zip"
    assert [k for k, _ in received(s3)] == [key]
    assert [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]] == [key]
    assert r.uploaded_count == 1 and r._failures == 0


def test_a_key_taken_by_another_profile_without_head_permission(s3: S3Server, reporters: List[S3Reporter]) -> None:
    base = "profile_pg_unknown___4242_2025-01-02T03-04-35Z"
    s3.client().put_object(Bucket=BUCKET, Key=base + ".zip", Body=b"another process's profile")
    s3.control(deny_head=1)
    r = make_reporter(s3, reporters)
    r.report(jfr(1), md(1))
    assert r.flush(20)
    assert [e["key"] for e in s3.journal()] == [base + ".zip", base + "-1.zip"]


def test_a_server_without_conditional_writes_still_never_overwrites(
        s3: S3Server, reporters: List[S3Reporter], caplog: pytest.LogCaptureFixture) -> None:
    base = "profile_pg_unknown___4242_2025-01-02T03-04-35Z"
    s3.client().put_object(Bucket=BUCKET, Key=base + ".zip", Body=b"older")
    s3.control(no_conditional=1)
    r = make_reporter(s3, reporters)
    r.report(jfr(1), md(1))
    r.report(jfr(2), md(1))
    assert r.flush(20)
    got = s3.journal()[1:]
    assert [e["key"] for e in got] == [base + "-1.zip", base + "-2.zip"]
    assert [e["if_none_match"] for e in got] == [None, None]
    assert sum("conditional writes" in rec.getMessage() for rec in caplog.records) == 1


def test_a_hanging_server_is_retried_and_the_profile_arrives_once(
        s3: S3Server, reporters: List[S3Reporter]) -> None:
    r = make_reporter(s3, reporters, read_timeout=0.5, retry_initial_delay=0.3, retry_max_delay=0.5)
    s3.freeze()
    try:
        r.report(jfr(1), md(1))
        wait_until(lambda: r._failures >= 1, what="a timed out upload")
    finally:
        s3.thaw()
    assert r.flush(20)
    assert [j for _, j in received(s3)] == [jfr(1)]
    assert r.uploaded_count == 1


def test_report_blocking_uploads_before_returning(s3: S3Server, reporters: List[S3Reporter]) -> None:
    r = make_reporter(s3, reporters)
    r.report(jfr(1), md(1))
    r.report_blocking(jfr(2), md(2))
    assert [j for _, j in received(s3)] == [jfr(1), jfr(2)]
    r.close(5)
    assert r.lost_count == 0


# ----------------------------------------------------------------------------- outages


@pytest.mark.parametrize("spool", ["memory", "directory"])
def test_outage_kill_and_restart_every_profile_arrives_once_in_order(
        s3: S3Server, reporters: List[S3Reporter], tmp_path: Path, spool: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asprof")
    kw: Dict[str, Any] = {"spool_dir": tmp_path / "spool"} if spool == "directory" else {}
    r = make_reporter(s3, reporters, **kw)
    sent: List[bytes] = []

    def tick(i: int) -> None:
        sent.append(jfr(i))
        r.report(jfr(i), md(i))

    for i in range(3):
        tick(i)
    assert r.flush(20)
    s3.kill()  # S3 goes away mid-run
    for i in range(3, 9):  # profiling goes on: several ticks while it is down
        tick(i)
        time.sleep(0.05)
    wait_until(lambda: r._failures >= 2, what="failed uploads")
    assert r.pending_count == 6
    s3.restart()  # an empty server on the same port
    tick(9)
    assert r.flush(30)
    got = received(s3)
    assert [j for _, j in got] == sent  # each exactly once, in order
    assert len({k for k, _ in got}) == len(sent)
    assert r.uploaded_count == 10 and r.dropped_count == 0 and r.lost_count == 0
    messages = [rec.getMessage() for rec in caplog.records]
    assert sum("will retry" in m for m in messages) == 1
    assert any("work again" in m for m in messages)
    if spool == "directory":
        assert os.listdir(tmp_path / "spool") == []


@pytest.mark.parametrize("spool", ["memory", "directory"])
def test_a_full_spool_drops_the_oldest_and_says_how_many(
        s3: S3Server, reporters: List[S3Reporter], tmp_path: Path, spool: str,
        caplog: pytest.LogCaptureFixture) -> None:
    kw: Dict[str, Any] = {"spool_dir": tmp_path / "spool"} if spool == "directory" else {}
    r = make_reporter(s3, reporters, max_spool_profiles=3, **kw)
    s3.kill()
    r.report(jfr(0), md(0))
    wait_until(lambda: r._failures >= 1, what="a failed upload")  # profile 0 is being retried
    for i in range(1, 7):
        r.report(jfr(i), md(i))
    # Bound 3: profile 0 (in flight) and the newest two are kept; 1, 2, 3, 4 are dropped.
    assert r.dropped_count == 4
    drops = [rec.getMessage() for rec in caplog.records if "spool full" in rec.getMessage()]
    assert len(drops) == 4 and drops[-1].endswith("4 dropped in all")
    s3.restart()
    assert r.flush(30)
    assert [j for _, j in received(s3)] == [jfr(0), jfr(5), jfr(6)]


def test_spool_bound_in_bytes(s3: S3Server, reporters: List[S3Reporter]) -> None:
    size = len(profile_zip(jfr(1), md(1)))
    r = make_reporter(s3, reporters, max_spool_bytes=int(size * 3.5))
    s3.kill()
    r.report(jfr(0), md(0))
    wait_until(lambda: r._failures >= 1, what="a failed upload")
    for i in range(1, 5):
        r.report(jfr(i), md(i))
    assert r.dropped_count == 2  # room for 3: profile 0 (in flight) and the two newest
    s3.restart()
    assert r.flush(30)
    assert [j for _, j in received(s3)] == [jfr(0), jfr(3), jfr(4)]


def test_stop_while_s3_is_down_counts_the_lost_profiles(
        s3: S3Server, reporters: List[S3Reporter], caplog: pytest.LogCaptureFixture) -> None:
    r = make_reporter(s3, reporters)
    s3.kill()
    for i in range(3):
        r.report(jfr(i), md(i))
    t = time.monotonic()
    r.close(timeout=0.5)
    assert time.monotonic() - t < 10  # bounded (generous: no performance assertion)
    assert r.lost_count == 3
    assert any("3 profile(s) could not be uploaded" in rec.getMessage() for rec in caplog.records)
    wait_until(lambda: r._thread is None or not r._thread.is_alive(), what="the upload thread to end")


def test_close_is_bounded_when_the_server_hangs(s3: S3Server, reporters: List[S3Reporter]) -> None:
    r = make_reporter(s3, reporters, read_timeout=30.0)
    s3.freeze()
    try:
        r.report(jfr(1), md(1))
        t = time.monotonic()
        r.close(timeout=0.5)
        assert time.monotonic() - t < 10
        assert r.lost_count == 1
    finally:
        s3.thaw()


def test_spool_directory_survives_a_restart(s3: S3Server, reporters: List[S3Reporter], tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    spool = tmp_path / "spool"
    s3.kill()
    first = make_reporter(s3, reporters, spool_dir=spool)
    for i in range(3):
        first.report(jfr(i), md(i))
    first.close(timeout=0.3)
    assert first.lost_count == 0
    assert any("left in" in rec.getMessage() for rec in caplog.records)
    files = sorted(os.listdir(spool))
    assert len(files) == 3 and all(f.endswith(".asprof-s3") for f in files)
    assert all(stat.S_IMODE(os.stat(spool / f).st_mode) == 0o600 for f in files)
    s3.restart()
    second = make_reporter(s3, reporters, spool_dir=spool)  # the next start
    second.report(jfr(3), md(3))
    assert second.flush(30)
    assert [j for _, j in received(s3)] == [jfr(i) for i in range(4)]
    assert os.listdir(spool) == []


def test_reporters_sharing_a_spool_directory_upload_each_profile_once(
        s3: S3Server, reporters: List[S3Reporter], tmp_path: Path) -> None:
    # As several worker processes of one service configured alike would.
    spool = tmp_path / "spool"
    s3.kill()
    a = make_reporter(s3, reporters, spool_dir=spool)
    b = make_reporter(s3, reporters, spool_dir=spool)
    for i in range(6):
        (a if i % 2 else b).report(jfr(i), md(i, pid=100 + i % 2))
    s3.restart()
    assert a.flush(30) and b.flush(30)
    got = received(s3)
    assert sorted(j for _, j in got) == sorted(jfr(i) for i in range(6))
    assert len(got) == 6
    assert a.uploaded_count + b.uploaded_count == 6


@requires_s3_deps
def test_spool_directory_is_private(tmp_path: Path, reporters: List[S3Reporter],
                                    caplog: pytest.LogCaptureFixture) -> None:
    new = tmp_path / "new" / "spool"
    S3Reporter(BUCKET, ACCOUNT_ID, "pg", spool_dir=new)
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    # issue #13: an existing directory is never chmod-ed: refused, with the fix, and left as it was
    with pytest.raises(ValueError, match=r"can be reached by other users \(mode 0777\).*chmod 700"):
        S3Reporter(BUCKET, ACCOUNT_ID, "pg", spool_dir=open_dir)
    assert stat.S_IMODE(os.stat(open_dir).st_mode) == 0o777
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(ValueError, match="belongs to uid 65534"):
            S3Reporter(BUCKET, ACCOUNT_ID, "pg", spool_dir=theirs)


def test_a_corrupt_spool_file_is_dropped_with_a_warning(
        s3: S3Server, reporters: List[S3Reporter], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = tmp_path / "spool"
    s3.kill()
    first = make_reporter(s3, reporters, spool_dir=spool)
    first.report(jfr(0), md(0))
    first.report(jfr(1), md(1))
    first.close(timeout=0.2)
    oldest = sorted(os.listdir(spool))[0]
    (spool / oldest).write_bytes(b"garbage")
    s3.restart()
    second = make_reporter(s3, reporters, spool_dir=spool)
    second.report(jfr(2), md(2))
    assert second.flush(30)
    assert [j for _, j in received(s3)] == [jfr(1), jfr(2)]
    assert any("unreadable S3 spool file" in rec.getMessage() for rec in caplog.records)


@requires_s3_deps
def test_unreachable_endpoint_from_the_start(tmp_path: Path, reporters: List[S3Reporter]) -> None:
    # Nothing listens at all: connection refused, retried, then lost at stop.
    server = S3Server(str(tmp_path), buckets=[BUCKET])
    server.port = free_port()
    r = make_reporter(server, reporters)
    r.report(jfr(0), md(0))
    wait_until(lambda: r._failures >= 2, what="retries")
    r.close(timeout=0.1)
    server.close()
    assert r.lost_count == 1 and r.uploaded_count == 0


# ----------------------------------------------------------------------------- with the agent


AT_EXIT = """
import logging, sys
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, {tests!r})
import asprof
from asprof.reporter import S3Reporter
from fakes import FakeEngine
from botocore.config import Config
reporter = S3Reporter({bucket!r}, {owner!r}, "exit", client_kwargs=dict(
    endpoint_url={endpoint!r}, region_name="us-east-1",
    config=Config(s3={{"addressing_style": "path"}})))
asprof.Profiler(reporter, reporting_interval=60, engine=FakeEngine(),
                agent_metadata=asprof.NoMetadata()).start().detach()
print("started", flush=True)
"""


def test_last_profile_is_uploaded_at_interpreter_exit(s3: S3Server) -> None:
    code = AT_EXIT.format(tests=str(Path(__file__).resolve().parents[1]), bucket=BUCKET, owner=ACCOUNT_ID,
                          endpoint=s3.endpoint_url)
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    got = received(s3)
    assert [j for _, j in got] == [b"JFR0"], r.stderr
    assert got[0][0].startswith("profile_exit_unknown___")


def _real_library() -> Optional[str]:
    return REAL_LIB


def _profiler_api() -> Optional[str]:
    try:
        import asprof

        asprof.Profiler  # noqa: B018
        asprof.ProfilerOptions  # noqa: B018
    except (ImportError, AttributeError) as e:
        return f"asprof.Profiler is not available: {e}"
    if _real_library() is None:
        return "async-profiler (libasyncProfiler.so) is not installed"
    return None


@pytest.mark.skipif(_profiler_api() is not None, reason=str(_profiler_api()))
def test_real_profiles_through_an_outage_unzip_to_valid_jfr(s3: S3Server, tmp_path: Path) -> None:
    import asprof
    from asprof.reporter.base import Reporter

    class Recording(Reporter):
        wants_host_metadata = False

        def __init__(self) -> None:
            self.sent: List[Tuple[bytes, ReportMetadata]] = []

        def report(self, data: bytes, metadata: ReportMetadata) -> None:
            self.sent.append((data, metadata))

        def report_blocking(self, data: bytes, metadata: ReportMetadata) -> None:
            self.sent.append((data, metadata))

    reporter = S3Reporter(BUCKET, ACCOUNT_ID, "real", client_kwargs=s3.client_kwargs(), **FAST)
    recording = Recording()
    profiler = asprof.Profiler(reporter=asprof.MultiReporter([reporter, recording]), reporting_interval=0.5,
                               options=asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.1),
                               agent_metadata=NoMetadata(extra={"service": "test"}))

    def burn(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sum(i * i for i in range(2000))

    running = profiler.start()
    try:
        burn(1.2)
        s3.kill()
        burn(1.6)  # several ticks while S3 is down
        s3.restart()
        burn(0.6)
    finally:
        running.stop(timeout=30.0)
    got = s3.journal()
    assert len(recording.sent) >= 4
    assert [unzip(e["body"])[1][JFR_ENTRY] for e in got] == [d for d, _ in recording.sent]
    for (_, m), e in zip(recording.sent, got):
        stem = object_key("real", m)[: -len(".zip")]
        assert re.fullmatch(re.escape(stem) + r"(-\d+)?\.zip", e["key"]), (stem, e["key"])
    assert len({e["key"] for e in got}) == len(got)
    assert reporter.lost_count == 0 and reporter.dropped_count == 0
    for e in got:
        infos, files = unzip(e["body"])
        data = files[JFR_ENTRY]
        assert data[:4] == b"FLR\0"
        assert json.loads(files[METADATA_ENTRY])["extra"] == {"service": "test"}
        path = tmp_path / "p.jfr"
        path.write_bytes(data)
        import asprof.jfr

        recording_ = asprof.jfr.open(str(path))
        assert recording_ is not None
    # The JDK's own reader agrees, when there is one.
    jfr_tool = next(iter(sorted(Path("/usr/lib/jvm").glob("*/bin/jfr"))), None) \
        if Path("/usr/lib/jvm").exists() else None
    if jfr_tool is not None:
        path = tmp_path / "last.jfr"
        path.write_bytes(unzip(got[-2]["body"])[1][JFR_ENTRY])
        out = subprocess.run([str(jfr_tool), "summary", str(path)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "jdk.ExecutionSample" in out.stdout or "profiler.WallClockSample" in out.stdout
