"""Reporters: where finished profiles go.

A reporter receives each finished JFR recording with its
:class:`~asprof.metadata.ReportMetadata`. ``LocalReporter`` writes files,
``MultiReporter`` fans out, ``S3Reporter`` uploads (imported lazily, it needs
the ``s3`` extra). One module (or package) per destination. May import:
:mod:`asprof.metadata`, :mod:`asprof.errors`; never the agent, the engines or the reader.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asprof.reporter.base import Reporter, ReporterError

if TYPE_CHECKING:
    from asprof.reporter.local import LocalReporter
    from asprof.reporter.multi import MultiReporter
    from asprof.reporter.s3 import S3Reporter

__all__ = ["Reporter", "ReporterError", "LocalReporter", "MultiReporter", "S3Reporter"]


def __getattr__(name: str) -> Any:
    # Imported on first use: a profiler that reports to a directory never imports the others.
    if name == "LocalReporter":
        from asprof.reporter.local import LocalReporter

        return LocalReporter
    if name == "MultiReporter":
        from asprof.reporter.multi import MultiReporter

        return MultiReporter
    if name == "S3Reporter":
        from asprof.reporter.s3 import S3Reporter

        return S3Reporter
    raise AttributeError(f"module 'asprof.reporter' has no attribute {name!r}")
