"""Loopback AWS endpoints for the S3 reporter and metadata tests (not a test module).

- ``S3Server``: a real S3-compatible HTTP server (moto's server mode) in a
  subprocess on 127.0.0.1, so that it can be killed (SIGKILL), frozen
  (SIGSTOP) and restarted. A thin WSGI layer in front of moto adds what moto
  does not do and the tests need: ``ExpectedBucketOwner`` is enforced the way
  S3 does it (403 AccessDenied), and every stored object is journaled to disk
  (key, metadata, bytes) so that a test sees everything the server accepted,
  across kills and restarts.
- ``MetadataServer``: an HTTP server in a thread emulating EC2's IMDS (IMDSv2
  tokens) and the ECS task metadata endpoint, with failure modes.

Run ``python aws_test_servers.py s3 --port N --journal DIR`` to start the S3
server by hand; it prints ``LISTENING <port>`` when ready.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional

ACCOUNT_ID = "123456789012"  # moto's default account: owner of every bucket it creates
REGION = "us-east-1"

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


# --------------------------------------------------------------------------- S3


class S3Server:
    """moto's S3 in a subprocess on loopback; killable and restartable on the same port."""

    def __init__(self, workdir: str, buckets: Iterable[str] = ()) -> None:
        self.workdir = workdir
        self.buckets = list(buckets)  # created at every (re)start, before the server listens
        self.journal_dir = os.path.join(workdir, "journal")
        os.makedirs(self.journal_dir, exist_ok=True)
        self.port = 0
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._log = open(os.path.join(workdir, "s3-server.log"), "ab")

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ)
        env.update(AWS_TEST_ENV)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "s3", "--port", str(self.port),
             "--journal", self.journal_dir] + [a for b in self.buckets for a in ("--bucket", b)],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.PIPE, env=env,
        )
        stdout = self.proc.stdout
        assert stdout is not None
        # readline blocks, so watch the clock from a helper thread.
        result: List[bytes] = []
        reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = result[0] if result else b""
        if not line.startswith(b"LISTENING "):
            self.kill()
            raise RuntimeError(f"S3 test server did not start (see {self._log.name}): {line!r}")
        self.port = int(line.split()[1])

    def kill(self) -> None:
        """SIGKILL: the server and everything it stored are gone (the journal stays)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            for stream in (self.proc.stdout, self.proc.stdin):
                if stream is not None:
                    stream.close()
        self.proc = None

    def restart(self) -> None:
        """A new, empty server on the same port (retried while the port is still held)."""
        self.kill()
        for _ in range(50):
            try:
                self.start()
                return
            except RuntimeError:
                time.sleep(0.1)
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.kill()
        self._log.close()

    def client(self) -> Any:
        """A boto3 client for the test's own checks (not the reporter's)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION,
        ).client("s3", endpoint_url=self.endpoint_url,
                 config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def client_kwargs(self, read_timeout: float = 5.0) -> Dict[str, Any]:
        """What the reporter under test is given."""
        from botocore.config import Config

        return {
            "endpoint_url": self.endpoint_url,
            "region_name": REGION,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "config": Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=read_timeout),
        }

    def control(self, **settings: float) -> None:
        """Set test controls of the running server (see _S3Journal)."""
        import urllib.parse
        import urllib.request

        query = urllib.parse.urlencode(settings)
        with urllib.request.urlopen(f"{self.endpoint_url}{CONTROL_PATH}?{query}", timeout=10) as r:
            assert r.read() == b"ok"

    def journal(self) -> List[Dict[str, Any]]:
        """Every PutObject the server(s) accepted, in order: key, bucket, metadata, sha256, body."""
        entries = []
        path = os.path.join(self.journal_dir, "journal.jsonl")
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a write cut short by a kill
                e = json.loads(line)
                with open(os.path.join(self.journal_dir, e["file"]), "rb") as body:
                    e["body"] = body.read()
                entries.append(e)
        return entries


CONTROL_PATH = "/_asprof_test_control"


class _S3Journal:
    """WSGI middleware in front of moto (runs in the server subprocess).

    Test controls, set with ``GET /_asprof_test_control?name=value``:
    ``slow_put=SECONDS`` and ``slow_put_count=N`` (the next N stored objects are
    answered that late: stored, but the client may time out first),
    ``deny_head=1`` (HeadObject answers 403, as for write-only credentials),
    ``no_conditional=1`` (PutObject with If-None-Match answers 501 NotImplemented,
    as some S3-compatible servers do).
    """

    def __init__(self, app: Callable[..., Any], journal_dir: str) -> None:
        self.app = app
        self.journal_dir = journal_dir
        self.lock = threading.Lock()
        self.controls: Dict[str, float] = {"slow_put": 0.0, "slow_put_count": 0, "deny_head": 0,
                                           "no_conditional": 0}

    def _control(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        from urllib.parse import parse_qsl

        for k, v in parse_qsl(environ.get("QUERY_STRING", "")):
            self.controls[k] = float(v)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    def _error(self, start_response: Callable[..., Any], status: str, code: str, method: str) -> Iterable[bytes]:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{code}</Message><RequestId>asprof-test</RequestId></Error>").encode()
        start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [b""] if method == "HEAD" else [body]

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        if environ.get("PATH_INFO") == CONTROL_PATH:
            return self._control(environ, start_response)
        if method == "HEAD" and self.controls["deny_head"]:
            return self._error(start_response, "403 Forbidden", "AccessDenied", method)
        if method == "PUT" and self.controls["no_conditional"] and environ.get("HTTP_IF_NONE_MATCH"):
            return self._error(start_response, "501 Not Implemented", "NotImplemented", method)
        owner = environ.get("HTTP_X_AMZ_EXPECTED_BUCKET_OWNER")
        if owner is not None and owner != ACCOUNT_ID:
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                "<Message>Access Denied</Message><RequestId>asprof-test</RequestId></Error>"
            ).encode()
            start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                              ("Content-Length", str(len(body)))])
            return [body]
        path = environ.get("PATH_INFO", "")
        parts = path.lstrip("/").split("/", 1)
        is_put_object = (method == "PUT" and len(parts) == 2 and parts[1] and not environ.get("QUERY_STRING"))
        status_holder: List[str] = []

        def capture(status: str, headers: Any, exc_info: Any = None) -> Any:
            status_holder.append(status)
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        result = self.app(environ, capture)
        if is_put_object and status_holder and status_holder[0].startswith("200"):
            body = b"".join(result)
            self._record(parts[0], _unquote(parts[1]), environ)
            with self.lock:
                slow = self.controls["slow_put_count"] > 0
                if slow:
                    self.controls["slow_put_count"] -= 1
            if slow:
                time.sleep(self.controls["slow_put"])  # stored, but the answer comes late
            return [body]
        return result  # type: ignore[no-any-return]

    def _record(self, bucket: str, key: str, environ: Dict[str, Any]) -> None:
        from moto.backends import get_backend

        obj = get_backend("s3")[ACCOUNT_ID]["global"].get_object(bucket, key)
        assert obj is not None
        data = bytes(obj.value)
        name = f"{uuid.uuid4().hex}.bin"
        with open(os.path.join(self.journal_dir, name), "wb") as f:
            f.write(data)
        entry = {
            "bucket": bucket, "key": key, "file": name, "sha256": hashlib.sha256(data).hexdigest(),
            "metadata": dict(obj.metadata), "content_type": obj.content_type if hasattr(obj, "content_type")
            else environ.get("CONTENT_TYPE"), "if_none_match": environ.get("HTTP_IF_NONE_MATCH"),
        }
        with self.lock, open(os.path.join(self.journal_dir, "journal.jsonl"), "ab") as f:
            f.write(json.dumps(entry).encode() + b"\n")
            f.flush()


def _unquote(s: str) -> str:
    from urllib.parse import unquote

    return unquote(s)


def _serve_s3(port: int, journal_dir: str, buckets: List[str]) -> None:
    import logging

    from moto.backends import get_backend
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for bucket in buckets:
        get_backend("s3")[ACCOUNT_ID]["global"].create_bucket(bucket, REGION)
    app = _S3Journal(DomainDispatcherApplication(create_backend_app), journal_dir)
    server = make_server("127.0.0.1", port, app, threaded=True)

    def exit_with_parent() -> None:
        # The test process holds our stdin: end of file means it is gone.
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    sys.stdout.write(f"LISTENING {server.server_address[1]}\n")
    sys.stdout.flush()
    server.serve_forever()


# --------------------------------------------------------------------------- IMDS and ECS


class MetadataServer:
    """IMDS (``/latest/...``) and ECS task metadata (``/v4/.../task``) on one loopback server.

    ``imds_mode``: "v2" (token required), "v1" (token PUT refused with 403, GET
    answers without it), "hang" (never answers), "malformed" (identity
    document is not JSON), "error" (500), "absent" (404 on everything).
    ``ecs_mode``: "ok", "hang", "malformed", "no-arn", "error".
    """

    def __init__(self) -> None:
        self.imds_mode = "v2"
        self.ecs_mode = "ok"
        self.identity: Dict[str, Any] = {
            "accountId": "111122223333", "region": "eu-west-1", "instanceId": "i-0abc123def456789a",
            "instanceType": "m5.large", "availabilityZone": "eu-west-1a", "architecture": "x86_64",
        }
        self.task: Dict[str, Any] = {
            "Cluster": "arn:aws:ecs:us-west-2:444455556666:cluster/prod_cluster",
            "TaskARN": "arn:aws:ecs:us-west-2:444455556666:task/prod_cluster/0123456789abcdef0123456789abcdef",
            "Family": "svc", "Revision": "3", "LaunchType": "FARGATE",
            "Limits": {"CPU": 0.25, "Memory": 512},
        }
        self.token = "token-" + uuid.uuid4().hex
        self.requests: List[str] = []
        self.release = threading.Event()  # set to free hanging handlers
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _hang(self) -> None:
                server.release.wait(30)

            def do_PUT(self) -> None:
                server.requests.append(f"PUT {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if self.path != "/latest/api/token":
                    return self._send(404)
                mode = server.imds_mode
                if mode == "hang":
                    return self._hang()
                if mode == "absent":
                    return self._send(404)
                if mode == "v1":
                    return self._send(403)
                if not self.headers.get("x-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(400)
                self._send(200, server.token.encode(), "text/plain")

            def do_GET(self) -> None:
                server.requests.append(f"GET {self.path}")
                if self.path.startswith("/latest/"):
                    return self._imds()
                if self.path.startswith("/v4/") and self.path.endswith("/task"):
                    return self._ecs()
                self._send(404)

            def _imds(self) -> None:
                mode = server.imds_mode
                if mode == "hang":
                    return self._hang()
                if mode == "absent":
                    return self._send(404)
                if mode == "error":
                    return self._send(500, b"oops", "text/plain")
                if mode == "v2" and self.headers.get("x-aws-ec2-metadata-token") != server.token:
                    return self._send(401)
                if self.path != "/latest/dynamic/instance-identity/document":
                    return self._send(404)
                if mode == "malformed":
                    return self._send(200, b'{"accountId": "1111', "text/plain")
                self._send(200, json.dumps(server.identity, indent=2).encode(), "text/plain")

            def _ecs(self) -> None:
                mode = server.ecs_mode
                if mode == "hang":
                    return self._hang()
                if mode == "error":
                    return self._send(500)
                if mode == "malformed":
                    return self._send(200, b"<html>not json</html>")
                task = dict(server.task)
                if mode == "no-arn":
                    task.pop("TaskARN")
                self._send(200, json.dumps(task).encode())

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="test-metadata-server", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("service", choices=["s3"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--journal", required=True)
    parser.add_argument("--bucket", action="append", default=[])
    args = parser.parse_args(argv)
    _serve_s3(args.port, args.journal, args.bucket)


if __name__ == "__main__":
    main()
