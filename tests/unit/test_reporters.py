"""LocalReporter and MultiReporter."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import pytest

import asprof
from asprof.metadata import NoMetadata, ReportMetadata
from asprof.reporter.multi import MultiReporterError

END = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)


def meta(end: datetime = END, pid: int = 4242) -> ReportMetadata:
    return ReportMetadata(NoMetadata(), end.replace(second=0), end, 30.0, pid)


def test_local_file_name_is_utc_time_and_pid(tmp_path: Path) -> None:
    r = asprof.LocalReporter(tmp_path / "new" / "dir")  # created if missing
    r.report(b"JFR-bytes", meta())
    assert [p.name for p in (tmp_path / "new" / "dir").iterdir()] == ["2025-01-02T03-04-05Z_4242.jfr"]
    assert (tmp_path / "new" / "dir" / "2025-01-02T03-04-05Z_4242.jfr").read_bytes() == b"JFR-bytes"


def test_local_never_overwrites(tmp_path: Path) -> None:
    r = asprof.LocalReporter(tmp_path)
    for i in range(3):
        r.report(f"profile {i}".encode(), meta())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["2025-01-02T03-04-05Z_4242-1.jfr", "2025-01-02T03-04-05Z_4242-2.jfr",
                     "2025-01-02T03-04-05Z_4242.jfr"]
    contents = sorted(p.read_bytes() for p in tmp_path.iterdir())
    assert contents == [b"profile 0", b"profile 1", b"profile 2"]


def test_local_processes_sharing_a_directory_do_not_collide(tmp_path: Path) -> None:
    r = asprof.LocalReporter(tmp_path)
    r.report(b"a", meta(pid=1))
    r.report(b"b", meta(pid=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2025-01-02T03-04-05Z_1.jfr", "2025-01-02T03-04-05Z_2.jfr"]


def test_local_leaves_no_partial_files(tmp_path: Path) -> None:
    r = asprof.LocalReporter(tmp_path)
    r.report_blocking(b"x" * 100000, meta())
    assert all(re.fullmatch(r"[0-9TZ-]+_4242\.jfr", p.name) for p in tmp_path.iterdir())


def test_local_naive_and_non_utc_times_are_named_in_utc(tmp_path: Path) -> None:
    from datetime import timedelta

    r = asprof.LocalReporter(tmp_path)
    r.report(b"x", meta(end=END.astimezone(timezone(timedelta(hours=2)))))
    assert [p.name for p in tmp_path.iterdir()] == ["2025-01-02T03-04-05Z_4242.jfr"]


def test_local_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="cannot create directory"):
        asprof.LocalReporter(f / "sub")
    with pytest.raises(ValueError, match="not a directory"):
        asprof.LocalReporter(f)
    with pytest.raises(ValueError, match="LocalReporter"):
        asprof.LocalReporter("/proc/asprof-cannot-be-here")


def test_local_disappearing_directory_raises_reporter_error(tmp_path: Path) -> None:
    d = tmp_path / "d"
    r = asprof.LocalReporter(d)
    d.rmdir()
    with pytest.raises(asprof.ReporterError, match="cannot write"):
        r.report(b"x", meta())


class Recording(asprof.Reporter):
    def __init__(self, fail: bool = False) -> None:
        self.got: List[bytes] = []
        self.fail = fail
        self.closed: Optional[float] = None

    def report(self, jfr: bytes, metadata: ReportMetadata) -> None:
        if self.fail:
            raise OSError("unreachable")
        self.got.append(jfr)

    def close(self, timeout: Optional[float] = None) -> None:
        self.closed = timeout


def test_multi_every_reporter_gets_every_profile_despite_failures() -> None:
    a, bad, b = Recording(), Recording(fail=True), Recording()
    m = asprof.MultiReporter([a, bad, b])
    with pytest.raises(MultiReporterError) as err:
        m.report(b"P1", meta())
    assert a.got == b.got == [b"P1"]
    assert len(err.value.errors) == 1 and err.value.errors[0][0] is bad
    assert "unreachable" in str(err.value)
    m.close(5.0)
    assert a.closed is not None and b.closed is not None and a.closed <= 5.0


def test_multi_blocking_report_and_metadata_wish(tmp_path: Path) -> None:
    local = asprof.LocalReporter(tmp_path)
    m = asprof.MultiReporter([local, Recording()])
    with pytest.raises(MultiReporterError):  # Recording has no blocking variant
        m.report_blocking(b"P", meta())
    assert len(list(tmp_path.iterdir())) == 1
    assert m.wants_host_metadata is True
    assert asprof.MultiReporter([local]).wants_host_metadata is False


def test_multi_validates_its_reporters() -> None:
    with pytest.raises(ValueError):
        asprof.MultiReporter([])
    with pytest.raises(TypeError):
        asprof.MultiReporter([object()])  # type: ignore[list-item]


def test_multi_gives_a_forked_child_each_reporters_child_copy(tmp_path: Path) -> None:
    class Threaded(Recording):
        def for_child_process(self) -> "Threaded":
            return Threaded()

    local, threaded = asprof.LocalReporter(tmp_path), Threaded()
    child = asprof.MultiReporter([local, threaded]).for_child_process()
    assert isinstance(child, asprof.MultiReporter)
    assert child.reporters[0] is local and isinstance(child.reporters[1], Threaded)
    assert child.reporters[1] is not threaded
