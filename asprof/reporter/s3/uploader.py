"""S3Reporter: uploads each profile to S3 the way the async-profiler Rust agent does.

One object per profile, a zip holding ``async_profiler_dump_0.jfr`` and
``metadata.json`` (``{"start":ms,"end":ms,"reporting_interval":ms}``), both
deflated, written with PutObject (``ExpectedBucketOwner``, content type
``application/zip``) under the key
``{key_prefix}profile_{group}_{machine}_{pid}_{time}.zip``.

Beyond the Rust agent: uploads run on a daemon thread (``asprof-s3``); a
failed upload is retried with exponential backoff and jitter while profiles
wait, in order, in a bounded spool (memory, or a private directory that
survives restarts); an object is never overwritten (``If-None-Match: *``),
and two profiles never share a key.

boto3 (the ``s3`` extra) is imported when an S3Reporter is made, never before.
See docs/s3.md.
"""
from __future__ import annotations

import collections
import importlib
import logging
import os
import random
import re
import time
import uuid
from datetime import timedelta
from typing import Any, Dict, Mapping, Optional, Set, Tuple, Union

from asprof import osthreads
from asprof.metadata import ReportMetadata
from asprof.reporter.base import Reporter, ReporterError
from asprof.reporter.s3.format import (
    _EPOCH,
    JFR_ENTRY,
    METADATA_ENTRY,
    _utc,
    metadata_json,
    object_key,
    profile_zip,
)
from asprof.reporter.s3.spool import _DirSpool, _Entry, _MemorySpool

__all__ = ["S3Reporter", "object_key", "metadata_json", "profile_zip", "JFR_ENTRY", "METADATA_ENTRY"]

log = logging.getLogger("asprof.s3")

#: User metadata on each object (``x-amz-meta-asprof-profile-id``): a random id per
#: profile, so a retried upload recognises its own object and never duplicates it.
PROFILE_ID_METADATA = "asprof-profile-id"

_MAX_KEY_SUFFIX = 100
_REMEMBERED_KEYS = 4096
_ACCOUNT_ID = re.compile(r"\d{12}")

# ------------------------------------------------------------------ errors

# S3 error codes that a later attempt can fix; any other 4xx answer is permanent.
_TRANSIENT_CODES = frozenset({
    "RequestTimeout", "RequestTimeTooSkewed", "ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired",
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "OperationAborted", "ConditionalRequestConflict", "InternalError", "ServiceUnavailable",
})
_PERMANENT_HINTS = {
    "AccessDenied": "check the bucket owner (ExpectedBucketOwner={owner}) and that the credentials "
                    "allow s3:PutObject on the bucket",
    "NoSuchBucket": "the bucket does not exist",
    "AllAccessDisabled": "all access to the bucket is disabled",
    "InvalidAccessKeyId": "the access key id is not known to S3",
    "SignatureDoesNotMatch": "the secret key does not match",
    "InvalidBucketName": "the bucket name is not valid",
}


class _Stopped(Exception):
    """The reporter was closed before the request was sent."""


class _Permanent(Exception):
    """An upload error that retrying cannot fix."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _client_error_info(e: BaseException) -> Optional[Tuple[str, int, str]]:
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    error = response.get("Error") or {}
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
    code = str(error.get("Code") or status)
    return code, int(status), str(error.get("Message") or "")


def _is_permanent(code: str, status: int) -> bool:
    if code in _TRANSIENT_CODES:
        return False
    return 400 <= status < 500 and status not in (408, 409, 412, 429)


# ------------------------------------------------------------------ reporter


class S3Reporter(Reporter):
    """Uploads each profile to ``s3://{bucket}/{key_prefix}profile_{group}_{machine}_{pid}_{time}.zip``.

    ``bucket_owner`` is the 12-digit account id that must own the bucket
    (sent as ``ExpectedBucketOwner``). Credentials and region come from
    boto3's standard chain, or from ``session`` (a ``boto3.session.Session``),
    ``client`` (a ready S3 client) or ``client_kwargs`` (passed to
    ``session.client("s3", ...)``: ``region_name``, ``endpoint_url``,
    ``config``...). The client is made on the upload thread, so a slow
    credential lookup never delays the application.

    Profiles wait for upload in a spool bounded by ``max_spool_profiles`` and
    ``max_spool_bytes`` (the oldest are dropped, and logged, beyond it): in
    memory, or in ``spool_dir`` (a private directory; what is left there at
    stop is uploaded by the next S3Reporter using it). Failed uploads are
    retried with exponential backoff from ``retry_initial_delay`` up to
    ``retry_max_delay`` seconds, with jitter. ``drain_timeout`` bounds the
    wait for pending uploads at stop when the caller gives no timeout.
    """

    def __init__(
        self,
        bucket: str,
        bucket_owner: str,
        profiling_group: str,
        *,
        key_prefix: str = "",
        session: Any = None,
        client: Any = None,
        client_kwargs: Optional[Mapping[str, Any]] = None,
        spool_dir: Union[str, "os.PathLike[str]", None] = None,
        max_spool_profiles: int = 120,
        max_spool_bytes: int = 64 * 1024 * 1024,
        retry_initial_delay: float = 1.0,
        retry_max_delay: float = 60.0,
        drain_timeout: float = 10.0,
    ) -> None:
        # What a forked child needs to build its own reporter (for_child_process).
        self._init_args: Dict[str, Any] = dict(
            bucket=bucket, bucket_owner=bucket_owner, profiling_group=profiling_group, key_prefix=key_prefix,
            session=session, client=client, client_kwargs=client_kwargs, spool_dir=spool_dir,
            max_spool_profiles=max_spool_profiles, max_spool_bytes=max_spool_bytes,
            retry_initial_delay=retry_initial_delay, retry_max_delay=retry_max_delay, drain_timeout=drain_timeout)
        try:
            importlib.import_module("boto3")
        except ImportError as e:
            raise ImportError("S3Reporter needs boto3: pip install 'asprof[s3]'") from e
        if not isinstance(bucket, str) or not bucket or "/" in bucket:
            raise ValueError(f"S3Reporter: invalid bucket name {bucket!r}")
        if not isinstance(bucket_owner, str) or not _ACCOUNT_ID.fullmatch(bucket_owner):
            raise ValueError(f"S3Reporter: bucket_owner must be a 12-digit AWS account id, not {bucket_owner!r}")
        if not isinstance(profiling_group, str) or not profiling_group or "/" in profiling_group:
            raise ValueError(f"S3Reporter: invalid profiling group name {profiling_group!r} (non-empty, no '/')")
        if not isinstance(key_prefix, str):
            raise TypeError("S3Reporter: key_prefix must be a string")
        if client is not None and (session is not None or client_kwargs):
            raise ValueError("S3Reporter: give either client, or session and/or client_kwargs, not both")
        if max_spool_profiles < 1 or max_spool_bytes < 1:
            raise ValueError("S3Reporter: the spool bounds must be positive")
        if not 0 < retry_initial_delay <= retry_max_delay:
            raise ValueError("S3Reporter: need 0 < retry_initial_delay <= retry_max_delay")
        if drain_timeout < 0:
            raise ValueError("S3Reporter: drain_timeout must be >= 0")
        self.bucket = bucket
        self.bucket_owner = bucket_owner
        self.profiling_group = profiling_group
        self.key_prefix = key_prefix
        self.retry_initial_delay = float(retry_initial_delay)
        self.retry_max_delay = float(retry_max_delay)
        self.drain_timeout = float(drain_timeout)
        self._session = session
        self._user_client = client
        self._client_kwargs = dict(client_kwargs or {})
        self._client: Any = client
        self.spool_dir: Optional[str] = None
        self._spool: Union[_MemorySpool, _DirSpool]
        if spool_dir is not None:
            self._spool = _DirSpool(os.fspath(spool_dir), (bucket, bucket_owner), max_spool_profiles, max_spool_bytes)
            self.spool_dir = self._spool.directory
        else:
            self._spool = _MemorySpool(max_spool_profiles, max_spool_bytes)
        #: Profiles uploaded, dropped because the spool was full, and lost
        #: (permanent errors, or still pending at stop without a spool directory).
        self.uploaded_count = 0
        self.dropped_count = 0
        self.lost_count = 0
        self._closed = False
        self._exit_deadline: Optional[float] = None
        self._init_threading()
        self._use_if_none_match = True
        # Keys this reporter wrote: never offered to another profile, even if the
        # server forgot them (a key is unique without relying on the server alone).
        self._used_keys: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self._logged: Set[str] = set()
        self._failures = 0

    def _init_threading(self) -> None:
        self._pid = os.getpid()
        # osthreads: a real OS thread and locks even under gevent/eventlet monkey-patching
        self._cond = osthreads.Condition(osthreads.Lock())
        self._thread: Optional[Any] = None
        self._stop_now = False  # the worker exits at its next step
        self._idle = False  # the worker found nothing to upload since the last report

    def __repr__(self) -> str:
        return f"S3Reporter(bucket={self.bucket!r}, profiling_group={self.profiling_group!r})"

    # -- Reporter interface

    def for_child_process(self) -> "S3Reporter":
        """A forked child gets its own reporter: the upload thread does not survive
        fork(), and profiles queued in the parent stay the parent's to send. A
        client or session given by the caller is reused; pass client_kwargs instead
        to get a fresh client in each process."""
        return S3Reporter(**self._init_args)

    def report(self, jfr: bytes, metadata: ReportMetadata) -> None:
        """Queue one profile for upload; returns at once (the upload runs on ``asprof-s3``)."""
        self._enqueue(jfr, metadata)
        self._ensure_worker()

    def report_blocking(self, jfr: bytes, metadata: ReportMetadata) -> None:
        """Queue the last profile and wait (at most ``drain_timeout``) until everything is uploaded."""
        self._enqueue(jfr, metadata)
        deadline = time.monotonic() + self.drain_timeout
        self._exit_deadline = deadline  # close() right after this waits no longer than this
        if self._ensure_worker():
            self._wait_idle(deadline)
        else:  # no thread can be started (interpreter shutdown): upload here
            self._drain_inline(deadline)

    def close(self, timeout: Optional[float] = None) -> None:
        """Give pending uploads ``timeout`` seconds (default ``drain_timeout``), then report what is left.

        Without a spool directory what is left is lost (and counted in
        ``lost_count``); with one it stays there for the next start. No new
        request starts after close() returns; one already sent may still
        complete (a lost profile it delivers is then counted as uploaded).
        """
        self._check_fork()
        budget = self.drain_timeout if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + budget
        if self._exit_deadline is not None:
            deadline = min(deadline, self._exit_deadline)
        with self._cond:
            if self._closed:
                return
            self._closed = True
            thread = self._thread if self._thread is not None and self._thread.is_alive() else None
        drained = True
        if thread is not None:
            # Keep a little of the budget to let the thread let go of its entry.
            drained = self._wait_idle(deadline - min(0.1, budget / 4))
        elif isinstance(self._spool, _MemorySpool) and self._spool.pending():
            self._drain_inline(deadline)
        with self._cond:
            self._stop_now = True
            self._cond.notify_all()
        if thread is not None and not osthreads.is_current(thread):
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            if isinstance(self._spool, _MemorySpool):
                left = self._spool.entries()
                for e in left:
                    e.reported_lost = True
                self.lost_count += len(left)
                if left:
                    log.warning("%d profile(s) could not be uploaded to S3 before stop and are lost "
                                "(configure spool_dir to keep them for the next start)", len(left))
            elif not drained:
                log.warning("%d profile(s) not yet uploaded to S3 at stop; left in %s for the next start",
                            self._spool.pending(), self._spool.directory)
            if self.dropped_count or self.lost_count:
                log.info("S3 reporter stopped: %d uploaded, %d dropped (spool full), %d lost",
                         self.uploaded_count, self.dropped_count, self.lost_count)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until no queued profile is left to upload; True if so within ``timeout`` seconds."""
        deadline = time.monotonic() + (self.drain_timeout if timeout is None else timeout)
        with self._cond:
            self._idle = False  # the worker looks again (a spool directory may have new files)
            self._cond.notify_all()
        if not self._ensure_worker():
            return self._spool.pending() == 0
        return self._wait_idle(deadline)

    @property
    def pending_count(self) -> int:
        """Profiles waiting for upload (in the spool, including one being uploaded)."""
        with self._cond:
            return self._spool.pending()

    # -- queueing (agent thread)

    def _enqueue(self, jfr: bytes, metadata: ReportMetadata) -> None:
        self._check_fork()
        if self._closed:
            raise ReporterError("S3Reporter is closed")
        entry = _Entry(
            id=uuid.uuid4().hex,
            key=object_key(self.profiling_group, metadata, self.key_prefix),
            bucket=self.bucket,
            body=profile_zip(jfr, metadata),
        )
        with self._cond:
            if isinstance(self._spool, _DirSpool):
                end_ns = (_utc(metadata.end) - _EPOCH) // timedelta(microseconds=1) * 1000
                try:
                    dropped = self._spool.put(entry, end_ns)
                except OSError as e:
                    self.lost_count += 1
                    raise ReporterError(
                        f"S3Reporter: cannot write to the spool directory {self._spool.directory}: "
                        f"{e.strerror or e}; profile lost") from e
            else:
                dropped = self._spool.put(entry)
            self._idle = False
            if dropped:
                self.dropped_count += dropped
                log.warning("S3 spool full (max %d profiles, %d bytes): dropped the %d oldest profile(s), "
                            "%d dropped in all", self._spool.max_profiles, self._spool.max_bytes, dropped,
                            self.dropped_count)
            self._cond.notify_all()

    def _check_fork(self) -> None:
        if self._pid == os.getpid():
            return
        # A forked child: fresh lock and thread; the parent's pending profiles stay the parent's.
        self._init_threading()
        self._spool.after_fork()
        self.uploaded_count = self.dropped_count = self.lost_count = 0
        if self._user_client is None:
            self._client = None  # never share connection pools with the parent

    def _ensure_worker(self) -> bool:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return True
            if self._stop_now:
                return False
            thread = osthreads.Thread(self._run, "asprof-s3")
            try:
                thread.start()
            except RuntimeError:  # interpreter shutting down
                return False
            self._thread = thread
            return True

    def _wait_idle(self, deadline: float) -> bool:
        with self._cond:
            while not self._idle:
                if self._stop_now or self._thread is None or not self._thread.is_alive():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    # -- uploading (worker thread, or inline at interpreter exit)

    def _run(self) -> None:
        entry: Optional[_Entry] = None
        try:
            while True:
                with self._cond:
                    if self._stop_now:
                        return
                    while entry is None:
                        entry = self._spool.claim()
                        if entry is None:
                            self._idle = True
                            self._cond.notify_all()
                            self._cond.wait()
                            if self._stop_now:
                                return
                finished = self._attempt(entry)
                with self._cond:
                    self._cond.notify_all()
                if finished:
                    entry = None
                else:
                    self._backoff()  # then the same entry again: uploads stay in order
        except BaseException:  # noqa: BLE001 - never let the thread die silently
            log.exception("S3 upload thread failed; profiles wait in the spool")
        finally:
            with self._cond:
                if entry is not None:
                    self._spool.release(entry)
                self._idle = True  # nothing more will happen here
                self._cond.notify_all()

    def _drain_inline(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            with self._cond:
                entry = self._spool.claim()
            if entry is None:
                return
            if not self._attempt(entry):
                left = deadline - time.monotonic()
                if left <= 0:
                    with self._cond:
                        self._spool.release(entry)
                    return
                time.sleep(min(left, self._delay()))

    def _backoff(self) -> None:
        delay = self._delay()
        with self._cond:
            end = time.monotonic() + delay
            while not self._stop_now:
                left = end - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _delay(self) -> float:
        exp = min(self._failures - 1, 30)
        base = min(self.retry_max_delay, self.retry_initial_delay * float(2 ** max(exp, 0)))
        return base * random.uniform(0.5, 1.0)

    def _attempt(self, entry: _Entry) -> bool:
        """Upload one entry; True when it is finished with (uploaded, or given up for good)."""
        try:
            key = self._upload(entry)
        except _Stopped:
            return False
        except _Permanent as e:
            with self._cond:
                self._spool.done(entry)
                self.lost_count += 1
            self._failures = 0
            self._log_once(f"permanent:{e.code}", logging.ERROR,
                           "S3 upload to bucket %s failed and will not be retried: %s; profile dropped "
                           "(%d lost so far; later profiles are each tried once)", self.bucket, e, self.lost_count)
            log.debug("S3 upload of %s failed permanently: %s", entry.key, e)
            return True
        except Exception as e:  # noqa: BLE001 - transient by default: keep the profile
            self._failures += 1
            with self._cond:
                waiting = self._spool.pending()
            if self._failures == 1:
                log.warning("S3 upload to bucket %s failed, will retry with backoff (%d profile(s) waiting): %s",
                            self.bucket, waiting, _describe(e))
            else:
                log.debug("S3 upload attempt %d failed (%d waiting): %s", self._failures, waiting, _describe(e))
            return False
        with self._cond:
            self._spool.done(entry)
            self.uploaded_count += 1
            if entry.reported_lost:
                self.lost_count -= 1
                log.info("a profile reported lost at stop was uploaded after all: %s", key)
        if self._failures:
            log.info("S3 uploads work again after %d failed attempt(s)", self._failures)
            self._failures = 0
        log.debug("uploaded s3://%s/%s", self.bucket, key)
        return True

    def _get_client(self) -> Any:
        if self._client is None:
            boto3: Any = importlib.import_module("boto3")
            config_mod: Any = importlib.import_module("botocore.config")
            kwargs = dict(self._client_kwargs)
            config = config_mod.Config(
                connect_timeout=5, read_timeout=30, retries={"total_max_attempts": 1, "mode": "standard"})
            if kwargs.get("config") is not None:
                config = config.merge(kwargs["config"])
            kwargs["config"] = config
            session = self._session if self._session is not None else boto3.session.Session()
            try:
                self._client = session.client("s3", **kwargs)
            except (ValueError, TypeError) as e:
                raise _Permanent("InvalidConfiguration", f"cannot make an S3 client: {e}") from e
        return self._client

    def _upload(self, entry: _Entry) -> str:
        """PutObject without ever overwriting; returns the key used."""
        key = self._put(entry)
        self._used_keys[key] = None
        while len(self._used_keys) > _REMEMBERED_KEYS:
            self._used_keys.popitem(last=False)
        return key

    def _put(self, entry: _Entry) -> str:
        client = self._get_client()
        suffix = 0
        vanished = 0
        while suffix < _MAX_KEY_SUFFIX:
            if self._stop_now:
                raise _Stopped()  # no new request after close() has returned
            key = entry.key if suffix == 0 else _suffixed(entry.key, suffix)
            if key in self._used_keys and key not in entry.ambiguous_keys:
                suffix += 1  # an earlier profile of this process (same second) has it
                continue
            if not self._use_if_none_match:
                state = self._existing(client, key, entry)
                if state == "ours":
                    return key
                if state == "other":
                    suffix += 1
                    continue
            args: Dict[str, Any] = dict(
                Bucket=self.bucket, Key=key, Body=entry.body, ContentType="application/zip",
                ExpectedBucketOwner=self.bucket_owner, Metadata={PROFILE_ID_METADATA: entry.id},
            )
            if self._use_if_none_match:
                args["IfNoneMatch"] = "*"
            try:
                client.put_object(**args)
                return key
            except Exception as e:
                info = _client_error_info(e)
                if info is None:
                    if _may_have_been_sent(e):
                        entry.ambiguous_keys.add(key)
                    raise
                code, status, message = info
                if status == 412 or code == "PreconditionFailed":
                    state = self._existing(client, key, entry)
                    if state == "ours":
                        return key
                    if state == "gone" and vanished < 3:
                        vanished += 1
                        continue
                    suffix += 1
                    continue
                if self._use_if_none_match and (status == 501 or code == "NotImplemented"):
                    log.warning("the S3 server does not support conditional writes (If-None-Match); "
                                "checking for existing objects before each upload instead")
                    self._use_if_none_match = False
                    continue
                if _is_permanent(code, status):
                    hint = _PERMANENT_HINTS.get(code, "")
                    text = f"{code} (HTTP {status}): {message}" if message else f"{code} (HTTP {status})"
                    if hint:
                        text += "; " + hint.format(owner=self.bucket_owner)
                    raise _Permanent(code, text) from e
                raise
        raise _Permanent("TooManyKeys", f"{_MAX_KEY_SUFFIX} keys like {entry.key} are taken")

    def _existing(self, client: Any, key: str, entry: _Entry) -> str:
        """Is there an object at key: 'ours' (this profile, an earlier attempt), 'other', or 'gone'?"""
        try:
            head = client.head_object(Bucket=self.bucket, Key=key, ExpectedBucketOwner=self.bucket_owner)
        except Exception as e:
            info = _client_error_info(e)
            if info is None:
                raise
            code, status, _ = info
            if status == 404 or code in ("404", "NoSuchKey", "NotFound"):
                return "gone"
            if status == 403:
                # Not allowed to read it (write-only credentials). If an earlier attempt at
                # this key may have succeeded, it is this profile; otherwise another one.
                return "ours" if key in entry.ambiguous_keys else "other"
            raise
        metadata = head.get("Metadata") or {}
        return "ours" if metadata.get(PROFILE_ID_METADATA) == entry.id else "other"

    def _log_once(self, what: str, level: int, msg: str, *args: Any) -> None:
        if what not in self._logged:
            self._logged.add(what)
            log.log(level, msg, *args)
        else:
            log.debug(msg, *args)


def _suffixed(key: str, n: int) -> str:
    stem = key[: -len(".zip")] if key.endswith(".zip") else key
    return f"{stem}-{n}.zip"


def _may_have_been_sent(e: BaseException) -> bool:
    # Connection refused / connect timeout: the request never left. Anything else
    # (read timeout, connection reset mid-response...) may have been stored.
    name = type(e).__name__
    return name not in ("EndpointConnectionError", "ConnectTimeoutError", "NoCredentialsError",
                        "PartialCredentialsError", "ParamValidationError")


def _describe(e: BaseException) -> str:
    info = _client_error_info(e)
    if info is not None:
        code, status, message = info
        return f"{code} (HTTP {status}) {message}".strip()
    return f"{type(e).__name__}: {e}"

