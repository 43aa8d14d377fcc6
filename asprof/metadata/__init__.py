"""Who produced a profile (host metadata) and when (report metadata).

``AgentMetadata`` describes the machine and process; reporters use it to name
and annotate what they write (the S3 reporter puts it into the object key).
Auto-detection on AWS lives in :mod:`asprof.metadata.aws` and is loaded lazily on the
first report, never at start-up. May import: :mod:`asprof.errors` only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional

if TYPE_CHECKING:
    from datetime import datetime

__all__ = [
    "AgentMetadata",
    "Ec2Metadata",
    "FargateMetadata",
    "NoMetadata",
    "ReportMetadata",
]


def _key_part(value: str) -> str:
    # The Rust agent replaces '/' and '_' in ids so that '_' stays the separator.
    return value.replace("/", "-").replace("_", "-")


class AgentMetadata:
    """Base class of host metadata. Subclass it to describe other hosts.

    ``extra`` carries user metadata (service name, version, environment,
    tags): string keys and values that reporters pass along unchanged.
    """

    extra: Mapping[str, str]

    @property
    def s3_key_part(self) -> str:
        """This host's part of an S3 object key (``profile_{group}_{this}_{pid}_{time}.zip``),
        formatted as the Rust agent does, e.g. ``ec2_i-0abc_``. Override it to name other hosts."""
        return "unknown__"

    @property
    def machine(self) -> str:
        """The former name of :attr:`s3_key_part` (kept: subclasses may override it)."""
        return self.s3_key_part


@dataclass(frozen=True)
class Ec2Metadata(AgentMetadata):
    """An EC2 instance, as described by IMDS's instance identity document."""

    aws_account_id: str
    aws_region_id: str
    ec2_instance_id: str
    ec2_instance_type: str
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def s3_key_part(self) -> str:
        return f"ec2_{_key_part(self.ec2_instance_id)}_"


@dataclass(frozen=True)
class FargateMetadata(AgentMetadata):
    """An ECS task (Fargate or EC2 launch type), from the task metadata endpoint."""

    aws_account_id: str
    aws_region_id: str
    ecs_task_arn: str
    ecs_cluster_arn: str
    cpu_limit: Optional[float] = None
    memory_limit: Optional[int] = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def s3_key_part(self) -> str:
        return f"ecs_{_key_part(self.ecs_task_arn)}_"


@dataclass(frozen=True)
class NoMetadata(AgentMetadata):
    """No host information (not on AWS, or detection failed)."""

    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportMetadata:
    """What a reporter gets with each profile.

    ``start`` and ``end`` are timezone-aware UTC datetimes bounding the
    recording; ``reporting_interval`` is the configured interval in seconds;
    ``pid`` is the process that recorded the profile.
    """

    instance: AgentMetadata
    start: datetime
    end: datetime
    reporting_interval: float
    pid: int = field(default_factory=os.getpid)
    #: issue #13: profiling signals found held by a handler that is not asprof's (the application's
    #: signal.signal()/sigaction on SIGPROF, ...), since profiling started in this process.
    signal_conflicts: int = 0

    @staticmethod
    def now() -> datetime:
        """The current time, UTC (``datetime`` is imported here, not at start-up)."""
        from datetime import datetime, timezone

        return datetime.now(timezone.utc)

    @staticmethod
    def at(timestamp: float) -> datetime:
        """A ``time.time()`` timestamp as a UTC datetime."""
        from datetime import datetime, timezone

        return datetime.fromtimestamp(timestamp, timezone.utc)
