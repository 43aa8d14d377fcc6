"""One exception tree: every error asprof raises on purpose is an AsprofError (issue #10),
and keeps the standard base it had, so existing ``except ValueError`` / ``except OSError``
handlers still catch it."""
from __future__ import annotations

from typing import Tuple, Type

import pytest

import asprof
from asprof.autostart.config import ConfigError
from asprof.cli import CliError
from asprof.engines.settings_chunk import ChunkError
from asprof.errors import (
    AsprofError,
    LibraryNotFoundError,
    ProfilerAlreadyRunningError,
    ProfilerError,
    UnsupportedVersionError,
)
from asprof.jfr.errors import JfrError
from asprof.metadata.aws import MetadataUnavailable
from asprof.reporter.base import ReporterError
from asprof.reporter.multi import MultiReporterError


@pytest.mark.parametrize("error,also", [
    (LibraryNotFoundError([("here", "missing")]), (OSError,)),
    (UnsupportedVersionError("old"), ()),
    (ProfilerError("refused"), ()),
    (ProfilerAlreadyRunningError("running"), ()),
    (ConfigError("ASPROF_X", "y", "bad"), (ValueError,)),
    (ReporterError("failed"), ()),
    (MetadataUnavailable("no IMDS"), ()),
    (ChunkError("bad chunk"), (ValueError,)),
    (JfrError("bad", 3, "x.jfr"), (ValueError,)),
    (CliError("usage", 2), ()),
])
def test_every_error_is_an_asprof_error_and_keeps_its_base(error: Exception,
                                                           also: Tuple[Type[BaseException], ...]) -> None:
    with pytest.raises(AsprofError):
        raise error
    for base in also:
        with pytest.raises(base):
            raise error


def test_the_reporter_errors_share_the_root() -> None:
    assert issubclass(MultiReporterError, ReporterError)
    assert asprof.ReporterError is ReporterError and issubclass(asprof.ReporterError, asprof.AsprofError)
