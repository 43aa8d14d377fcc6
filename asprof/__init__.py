"""asprof: continuous profiling for Python services, built on async-profiler.

    import asprof
    asprof.start_profiling()        # a JFR profile in ./profiles every 30 s
    ...
    asprof.stop_profiling()         # the last profile is flushed

or, with explicit control::

    profiler = asprof.Profiler(reporter=asprof.LocalReporter("/var/profiles"),
                               reporting_interval=30.0,
                               options=asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.1))
    with profiler.start():
        ...
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from asprof.context import clear_labels, get_labels, labels, reset_labels, set_labels
    from asprof.engines.asyncprofiler import LibraryInfo
    from asprof.errors import (
        AsprofError,
        LibraryNotFoundError,
        ProfilerAlreadyRunningError,
        ProfilerError,
        UnsupportedVersionError,
    )
    from asprof.metadata import AgentMetadata, Ec2Metadata, FargateMetadata, NoMetadata, ReportMetadata
    from asprof.options import ProfilerOptions
    from asprof.profiler import Profiler, RunningProfiler, start_profiling, stop_profiling
    from asprof.reporter import LocalReporter, MultiReporter, Reporter, ReporterError
    from asprof.reporter.s3 import S3Reporter

# Names are imported on first use (PEP 562): `import asprof` stays cheap, and
# boto3 is imported only when an S3 reporter is used.
_LAZY = {
    "Profiler": "asprof.profiler",
    "RunningProfiler": "asprof.profiler",
    "start_profiling": "asprof.profiler",
    "stop_profiling": "asprof.profiler",
    "AsprofError": "asprof.errors",
    "LibraryNotFoundError": "asprof.errors",
    "ProfilerAlreadyRunningError": "asprof.errors",
    "ProfilerError": "asprof.errors",
    "UnsupportedVersionError": "asprof.errors",
    "AgentMetadata": "asprof.metadata",
    "Ec2Metadata": "asprof.metadata",
    "FargateMetadata": "asprof.metadata",
    "NoMetadata": "asprof.metadata",
    "ReportMetadata": "asprof.metadata",
    "ProfilerOptions": "asprof.options",
    "Reporter": "asprof.reporter.base",
    "ReporterError": "asprof.reporter.base",
    "LocalReporter": "asprof.reporter.local",
    "MultiReporter": "asprof.reporter.multi",
    "S3Reporter": "asprof.reporter.s3",
    # issue #15: request labels (docs/labels.md)
    "labels": "asprof.context",
    "set_labels": "asprof.context",
    "reset_labels": "asprof.context",
    "get_labels": "asprof.context",
    "clear_labels": "asprof.context",
}

__version__ = "0.1.0"

__all__ = [
    "Profiler",
    "RunningProfiler",
    "ProfilerOptions",
    "start_profiling",
    "stop_profiling",
    "library_info",
    "Reporter",
    "ReporterError",
    "LocalReporter",
    "MultiReporter",
    "S3Reporter",
    "AgentMetadata",
    "Ec2Metadata",
    "FargateMetadata",
    "NoMetadata",
    "ReportMetadata",
    "AsprofError",
    "LibraryNotFoundError",
    "UnsupportedVersionError",
    "ProfilerError",
    "ProfilerAlreadyRunningError",
    "labels",
    "set_labels",
    "reset_labels",
    "get_labels",
    "clear_labels",
]


def library_info(path: Optional[str] = None) -> "LibraryInfo":
    """Loads async-profiler (see :func:`asprof.engines.asyncprofiler.load_library`) and describes it:
    path, version, optional features. Raises LibraryNotFoundError."""
    from asprof.engines.asyncprofiler import load_library

    return load_library(path)[1]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asprof' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> "list[str]":
    return sorted(set(globals()) | set(_LAZY))
