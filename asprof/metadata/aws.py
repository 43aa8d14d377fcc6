"""AWS host metadata auto-detection: EC2 (IMDSv2) and ECS/Fargate (task metadata v4).

The agent calls :func:`detect_agent_metadata` on its own thread, on the first
report, when no custom metadata was given. It never raises, is bounded in time
(about 1 s per request, 2 s when nothing answers), and logs one line when it
falls back to :class:`~asprof.metadata.NoMetadata`.

Order: the ECS task metadata endpoint when ``$ECS_CONTAINER_METADATA_URI_V4``
is set (only ECS sets it; the task is a finer identity than the instance it
runs on, and Fargate has no IMDS), otherwise EC2's IMDS.

IMDS goes through botocore's own client (``botocore.utils.IMDSFetcher``: the
IMDSv2 token, the IMDSv1 fallback unless disabled, and the standard settings
``AWS_EC2_METADATA_DISABLED``, ``AWS_EC2_METADATA_SERVICE_ENDPOINT``,
``AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE``, ``AWS_EC2_METADATA_V1_DISABLED``
and their ``~/.aws/config`` equivalents) when botocore is installed; without it
a small urllib IMDSv2 client honours the same environment variables. botocore
is imported only inside the detection, never when this module is imported.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Mapping, Optional, Tuple

from asprof.errors import AsprofError
from asprof.metadata import AgentMetadata, Ec2Metadata, FargateMetadata, NoMetadata

__all__ = ["detect_agent_metadata", "MetadataUnavailable"]

log = logging.getLogger("asprof.metadata.aws")

#: Seconds for one request to a metadata endpoint.
DEFAULT_TIMEOUT = 1.0

_IDENTITY_PATH = "latest/dynamic/instance-identity/document"
_TOKEN_PATH = "latest/api/token"
_TOKEN_TTL = "21600"
_IMDS_IPV4 = "http://169.254.169.254/"
_IMDS_IPV6 = "http://[fd00:ec2::254]/"
_MAX_BODY = 1 << 20  # metadata documents are a few KiB

# Set to False (tests) to use the urllib IMDS client even when botocore is installed.
USE_BOTOCORE = True


class MetadataUnavailable(AsprofError):
    """An endpoint did not give usable metadata; the message says why."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        # True when an endpoint answered with something unusable (worth a warning),
        # False when there was simply nothing there (not on AWS, disabled).
        self.answered = answered


def detect_agent_metadata(
    extra: Mapping[str, str] = {},  # noqa: B006 - never mutated
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> AgentMetadata:
    """Detect the AWS host this process runs on; :class:`NoMetadata` when not on AWS.

    ``extra`` (user metadata: service, version, tags...) is attached to the
    result. Never raises; each request is bounded by ``timeout`` seconds.
    """
    extra = dict(extra)
    reasons: List[str] = []
    answered = False
    try:
        ecs_uri = os.environ.get("ECS_CONTAINER_METADATA_URI_V4", "").strip()
        if ecs_uri:
            try:
                return ecs_metadata(ecs_uri, extra, timeout)
            except MetadataUnavailable as e:
                # $ECS_CONTAINER_METADATA_URI_V4 says this is ECS: any failure is worth a warning.
                reasons.append(f"ECS task metadata: {e}")
                answered = True
        else:
            try:
                return ec2_metadata(extra, timeout)
            except MetadataUnavailable as e:
                reasons.append(f"EC2 IMDS: {e}")
                answered = answered or e.answered
    except Exception as e:  # noqa: BLE001 - detection must never stop profiling
        reasons.append(f"unexpected {type(e).__name__}: {e}")
        answered = True
    level = logging.WARNING if answered else logging.INFO
    log.log(level, "no AWS host metadata (%s); profiles are named 'unknown__'", "; ".join(reasons))
    return NoMetadata(extra=extra)


# ---------------------------------------------------------------------------- ECS


def ecs_metadata(base_uri: str, extra: Mapping[str, str], timeout: float = DEFAULT_TIMEOUT) -> FargateMetadata:
    """Read ``{base_uri}/task`` (ECS task metadata endpoint v4)."""
    url = base_uri.rstrip("/") + "/task"
    if not url.startswith(("http://", "https://")):
        raise MetadataUnavailable(f"$ECS_CONTAINER_METADATA_URI_V4 is not an http URL: {base_uri!r}", True)
    status, body = _http("GET", url, {}, timeout)
    if status != 200:
        raise MetadataUnavailable(f"GET {url} answered HTTP {status}", True)
    doc = _json_object(body, url)
    task_arn = doc.get("TaskARN")
    if not isinstance(task_arn, str) or not task_arn:
        raise MetadataUnavailable(f"{url}: no TaskARN in the task metadata", True)
    region, account = _arn_region_account(task_arn)
    cluster = doc.get("Cluster")
    limits = doc.get("Limits")
    cpu: Optional[float] = None
    memory: Optional[int] = None
    if isinstance(limits, dict):
        if isinstance(limits.get("CPU"), (int, float)) and not isinstance(limits.get("CPU"), bool):
            cpu = float(limits["CPU"])
        if isinstance(limits.get("Memory"), (int, float)) and not isinstance(limits.get("Memory"), bool):
            memory = int(limits["Memory"])
    md = FargateMetadata(
        aws_account_id=account,
        aws_region_id=region,
        ecs_task_arn=task_arn,
        ecs_cluster_arn=cluster if isinstance(cluster, str) else "",
        cpu_limit=cpu,
        memory_limit=memory,
        extra=dict(extra),
    )
    log.debug("ECS task metadata: %r", md)
    return md


def _arn_region_account(arn: str) -> Tuple[str, str]:
    # arn:partition:service:region:account-id:resource
    parts = arn.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or not parts[3] or not parts[4]:
        raise MetadataUnavailable(f"TaskARN is not an ARN with a region and an account: {arn!r}", True)
    return parts[3], parts[4]


# ---------------------------------------------------------------------------- EC2


def ec2_metadata(extra: Mapping[str, str], timeout: float = DEFAULT_TIMEOUT) -> Ec2Metadata:
    """Read IMDS's instance identity document (IMDSv2 token first)."""
    body = _identity_document(timeout)
    doc = _json_object(body, "the instance identity document")
    values: Dict[str, str] = {}
    for name in ("accountId", "region", "instanceId", "instanceType"):
        v = doc.get(name)
        if not isinstance(v, str) or not v:
            raise MetadataUnavailable(f"the instance identity document has no {name}", True)
        values[name] = v
    md = Ec2Metadata(
        aws_account_id=values["accountId"],
        aws_region_id=values["region"],
        ec2_instance_id=values["instanceId"],
        ec2_instance_type=values["instanceType"],
        extra=dict(extra),
    )
    log.debug("EC2 instance metadata: %r", md)
    return md


def _identity_document(timeout: float) -> bytes:
    botocore_utils: Any = None
    if USE_BOTOCORE:
        try:
            botocore_utils = importlib.import_module("botocore.utils")
            importlib.import_module("botocore.session")
        except ImportError:
            botocore_utils = None
    if botocore_utils is not None:
        return _identity_document_botocore(botocore_utils, timeout)
    return _identity_document_urllib(timeout)


def _identity_document_botocore(utils: Any, timeout: float) -> bytes:
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "false").lower() == "true":
        raise MetadataUnavailable("disabled by AWS_EC2_METADATA_DISABLED")
    session_mod: Any = importlib.import_module("botocore.session")
    exceptions: Any = importlib.import_module("botocore.exceptions")
    try:
        session = session_mod.Session()
        config = {
            "ec2_metadata_service_endpoint": session.get_config_variable("ec2_metadata_service_endpoint"),
            "ec2_metadata_service_endpoint_mode": utils.resolve_imds_endpoint_mode(session),
            "ec2_metadata_v1_disabled": session.get_config_variable("ec2_metadata_v1_disabled"),
        }
    except exceptions.BotoCoreError as e:
        raise MetadataUnavailable(f"invalid IMDS configuration: {e}", True) from e

    class IdentityFetcher(utils.IMDSFetcher):  # type: ignore[misc]
        # The same pattern as botocore's own InstanceMetadataRegionFetcher.
        def fetch(self) -> Any:
            token = self._fetch_metadata_token()
            # No retry on an answer: one request, and its status is checked below.
            return self._get_request(url_path=_IDENTITY_PATH, retry_func=lambda response: False, token=token)

    try:
        fetcher = IdentityFetcher(timeout=timeout, num_attempts=1, config=config)
    except exceptions.BotoCoreError as e:
        raise MetadataUnavailable(f"invalid IMDS configuration: {e}", True) from e
    try:
        response = fetcher.fetch()
    except fetcher._RETRIES_EXCEEDED_ERROR_CLS as e:
        raise MetadataUnavailable(f"no answer from {fetcher.get_base_url()}") from e
    except exceptions.BotoCoreError as e:
        raise MetadataUnavailable(f"{fetcher.get_base_url()}: {e}", True) from e
    if response.status_code != 200 or not response.content:
        url = fetcher.get_base_url().rstrip("/") + "/" + _IDENTITY_PATH
        raise MetadataUnavailable(f"GET {url} answered HTTP {response.status_code}", True)
    return bytes(response.content)


def _imds_base_url() -> str:
    endpoint = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "").strip()
    if endpoint:
        if not endpoint.startswith(("http://", "https://")):
            raise MetadataUnavailable(f"AWS_EC2_METADATA_SERVICE_ENDPOINT is not an http URL: {endpoint!r}", True)
        return endpoint if endpoint.endswith("/") else endpoint + "/"
    mode = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "").strip().lower()
    if mode == "ipv6":
        return _IMDS_IPV6
    if mode not in ("", "ipv4"):
        raise MetadataUnavailable(f"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE must be IPv4 or IPv6, not {mode!r}", True)
    return _IMDS_IPV4


def _identity_document_urllib(timeout: float) -> bytes:
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "false").lower() == "true":
        raise MetadataUnavailable("disabled by AWS_EC2_METADATA_DISABLED")
    base = _imds_base_url()
    token: Optional[str] = None
    try:
        status, body = _http("PUT", base + _TOKEN_PATH, {"x-aws-ec2-metadata-token-ttl-seconds": _TOKEN_TTL}, timeout)
    except MetadataUnavailable:
        status, body = 0, b""
    if status == 200 and body:
        token = body.decode("ascii", "replace").strip()
    elif status == 400:
        raise MetadataUnavailable(f"{base} rejected the IMDSv2 token request (HTTP 400)", True)
    if token is None and os.environ.get("AWS_EC2_METADATA_V1_DISABLED", "false").lower() == "true":
        raise MetadataUnavailable(f"no IMDSv2 token from {base} and IMDSv1 is disabled")
    headers = {"x-aws-ec2-metadata-token": token} if token else {}
    status, body = _http("GET", base + _IDENTITY_PATH, headers, timeout)
    if status != 200 or not body:
        raise MetadataUnavailable(f"GET {base}{_IDENTITY_PATH} answered HTTP {status}", True)
    return body


# ---------------------------------------------------------------------------- HTTP


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, headers: Mapping[str, str], timeout: float) -> Tuple[int, bytes]:
    """One request; (status, body). Unreachable or timing out → MetadataUnavailable."""
    request = urllib.request.Request(url, method=method, headers=dict(headers))
    if method == "PUT":
        request.data = b""
    deadline = time.monotonic() + timeout
    try:
        with _NO_PROXY.open(request, timeout=timeout) as response:
            body = _read_bounded(response, deadline)
            return int(response.status), body
    except urllib.error.HTTPError as e:
        return int(e.code), b""
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise MetadataUnavailable(f"no answer from {url}: {reason}") from e


def _read_bounded(response: Any, deadline: float) -> bytes:
    # The socket timeout bounds each read; the deadline bounds a trickling body.
    chunks: List[bytes] = []
    size = 0
    while True:
        chunk = response.read(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_BODY:
            raise MetadataUnavailable("metadata response larger than 1 MiB", True)
        if time.monotonic() > deadline:
            raise MetadataUnavailable("metadata response took too long", True)


def _json_object(body: bytes, what: str) -> Dict[str, Any]:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise MetadataUnavailable(f"malformed JSON from {what}: {e}", True) from e
    if not isinstance(doc, dict):
        raise MetadataUnavailable(f"{what} is not a JSON object", True)
    return doc
