"""The S3 object format, as the async-profiler Rust agent writes it: the key
``{key_prefix}profile_{group}_{machine}_{pid}_{time}.zip`` and the zip holding
``async_profiler_dump_0.jfr`` and ``metadata.json`` (``{"start":ms,"end":ms,"reporting_interval":ms}``),
both deflated.
"""
from __future__ import annotations

import io
import json
import zipfile
from datetime import datetime, timedelta, timezone
from typing import Any, Dict

from asprof.metadata import AgentMetadata, ReportMetadata
from asprof.reporter.local import profile_time

__all__ = ["object_key", "metadata_json", "profile_zip", "JFR_ENTRY", "METADATA_ENTRY"]

JFR_ENTRY = "async_profiler_dump_0.jfr"
METADATA_ENTRY = "metadata.json"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _ms(t: datetime) -> int:
    return (_utc(t) - _EPOCH) // timedelta(milliseconds=1)


def object_key(profiling_group: str, metadata: ReportMetadata, key_prefix: str = "", suffix: int = 0) -> str:
    """``{prefix}profile_{group}_{machine}_{pid}_{time}.zip``, time = the profile's end (UTC).

    ``suffix`` n > 0 gives ``..._{time}-{n}.zip``, used only when the plain key is
    already taken by another profile (same machine, pid and second).
    """
    time_part = profile_time(metadata.end)
    if suffix:
        time_part = f"{time_part}-{suffix}"
    host = metadata.instance
    # A subclass written against the former name overrides ``machine``: it still names the key.
    part = host.machine if type(host).machine is not AgentMetadata.machine else host.s3_key_part
    return f"{key_prefix}profile_{profiling_group}_{part}_{metadata.pid}_{time_part}.zip"


def metadata_json(metadata: ReportMetadata) -> bytes:
    """The Rust agent's compact ``metadata.json``; user metadata, if any, under ``"extra"``."""
    doc: Dict[str, Any] = {
        "start": _ms(metadata.start),
        "end": _ms(metadata.end),
        "reporting_interval": int(round(metadata.reporting_interval * 1000)),
    }
    extra = getattr(metadata.instance, "extra", None)
    if extra:
        doc["extra"] = {str(k): str(v) for k, v in extra.items()}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def profile_zip(jfr: bytes, metadata: ReportMetadata) -> bytes:
    """The uploaded object: the JFR then metadata.json, both deflated."""
    end = _utc(metadata.end)
    date_time = (end.year, end.month, end.day, end.hour, end.minute, end.second) if end.year >= 1980 else (
        1980, 1, 1, 0, 0, 0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in ((JFR_ENTRY, bytes(jfr)), (METADATA_ENTRY, metadata_json(metadata))):
            info = zipfile.ZipInfo(name, date_time=date_time)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


