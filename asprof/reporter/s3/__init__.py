"""S3Reporter: uploads each profile to S3 the way the async-profiler Rust agent does.

:mod:`~asprof.reporter.s3.format` is the object (key, zip, ``metadata.json``),
:mod:`~asprof.reporter.s3.spool` the bounded queue of profiles waiting for upload,
:mod:`~asprof.reporter.s3.uploader` the reporter and its upload thread. boto3 (the ``s3``
extra) is imported when an S3Reporter is made, never before. May import:
:mod:`asprof.reporter.base`, :mod:`asprof.reporter.local`, :mod:`asprof.metadata`,
:mod:`asprof.errors`.
"""
from __future__ import annotations

from asprof.reporter.s3.format import JFR_ENTRY, METADATA_ENTRY, metadata_json, object_key, profile_zip
from asprof.reporter.s3.uploader import S3Reporter

__all__ = ["S3Reporter", "object_key", "metadata_json", "profile_zip", "JFR_ENTRY", "METADATA_ENTRY"]
