"""Files and directories the reporters write (issue #13): private modes, existing directories
never changed, symlinks never followed, only our own files removed, abandoned .partial files
finished or removed."""
from __future__ import annotations

import fcntl
import logging
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pytest

import asprof
from asprof.metadata import NoMetadata, ReportMetadata
from asprof.reporter.files import directory_mode, secure_directory
from asprof.reporter.s3.spool import _DirSpool, _Entry
from tests.conftest import recording_bytes

END = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
DEST = ("bucket", "123456789012")
JFR = recording_bytes("multi-chunk")


def meta(pid: int = 4242) -> ReportMetadata:
    return ReportMetadata(NoMetadata(), END.replace(second=0), END, 30.0, pid)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The most permissive umask: modes must not come from it."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# ---------------------------------------------------------------- modes

def test_local_reporter_files_0600_and_created_directories_0700(tmp_path: Path, loose_umask: None) -> None:
    out = tmp_path / "a" / "b" / "profiles"
    r = asprof.LocalReporter(out)
    path = Path(r.write(JFR, meta()))
    assert mode(path) == 0o600
    assert mode(out) == mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700


@pytest.mark.parametrize("file_mode, dir_mode", [(0o640, 0o750), (0o644, 0o755), (0o600, 0o700)])
def test_file_mode_for_a_reader_of_another_user(tmp_path: Path, loose_umask: None, file_mode: int,
                                                dir_mode: int) -> None:
    out = tmp_path / "shared"
    r = asprof.LocalReporter(out, file_mode=file_mode)
    assert mode(Path(r.write(JFR, meta()))) == file_mode
    assert mode(out) == dir_mode == directory_mode(file_mode)


@pytest.mark.parametrize("bad", [0o666, 0o700, 0o400, 0o602, 0o1600])
def test_file_mode_never_lets_others_write_or_execute(tmp_path: Path, bad: int) -> None:
    with pytest.raises(ValueError, match="file mode .* is not allowed"):
        asprof.LocalReporter(tmp_path, file_mode=bad)
    with pytest.raises(TypeError):
        asprof.LocalReporter(tmp_path, file_mode="640")  # type: ignore[arg-type]


def test_file_mode_from_the_environment(tmp_path: Path, loose_umask: None) -> None:
    from asprof.autostart.config import EnvConfig
    from asprof.autostart.start import make_reporter

    cfg = EnvConfig.from_environ({"ASPROF_REPORTER": str(tmp_path / "p"), "ASPROF_FILE_MODE": "640"})
    r = make_reporter(cfg)
    assert isinstance(r, asprof.LocalReporter) and r.file_mode == 0o640
    assert mode(Path(r.write(JFR, meta()))) == 0o640


def test_spool_files_and_directory_private(tmp_path: Path, loose_umask: None) -> None:
    spool = _DirSpool(str(tmp_path / "new" / "spool"), DEST, 10, 1 << 30)
    spool.put(_Entry(id="0" * 32, key="k", bucket="bucket", body=b"zip"), 1)
    assert mode(tmp_path / "new") == mode(tmp_path / "new" / "spool") == 0o700
    (f,) = [p for p in (tmp_path / "new" / "spool").iterdir()]
    assert mode(f) == 0o600


# ---------------------------------------------------------------- existing directories are never changed

@pytest.mark.parametrize("dir_mode", [0o777, 0o1777, 0o770, 0o702])
def test_local_refuses_a_directory_others_can_write_and_leaves_it_alone(tmp_path: Path, dir_mode: int) -> None:
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, dir_mode)
    with pytest.raises(ValueError, match=r"can be reached by other users.*chmod go-w"):
        asprof.LocalReporter(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == dir_mode
    assert list(d.iterdir()) == []


def test_local_accepts_an_existing_readable_directory_unchanged(tmp_path: Path) -> None:
    d = tmp_path / "readable"
    d.mkdir()
    os.chmod(d, 0o755)
    r = asprof.LocalReporter(d)
    assert mode(Path(r.write(JFR, meta()))) == 0o600
    assert mode(d) == 0o755


@pytest.mark.parametrize("dir_mode", [0o777, 0o755, 0o750, 0o701])
def test_spool_refuses_a_directory_others_can_reach_and_leaves_it_alone(tmp_path: Path, dir_mode: int) -> None:
    d = tmp_path / "spool"
    d.mkdir()
    os.chmod(d, dir_mode)
    with pytest.raises(ValueError, match=r"spool directory .* can be reached by other users.*chmod 700"):
        _DirSpool(str(d), DEST, 10, 1 << 30)
    assert stat.S_IMODE(os.stat(d).st_mode) == dir_mode


@pytest.mark.parametrize("kind", ["spool", "local"])
def test_a_path_linking_to_a_shared_directory_leaves_its_mode_unchanged(tmp_path: Path, kind: str) -> None:
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    for target in (shared, private):  # even a link to a private directory is not followed
        link = tmp_path / f"link-{target.name}"
        link.symlink_to(target)
        with pytest.raises(ValueError, match="is a symbolic link"):
            if kind == "spool":
                _DirSpool(str(link), DEST, 10, 1 << 30)
            else:
                asprof.LocalReporter(link)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    assert list(shared.iterdir()) == [] and list(private.iterdir()) == []


def test_system_temp_directory_is_refused_unchanged() -> None:
    before = os.stat("/tmp")
    with pytest.raises(ValueError):
        _DirSpool("/tmp", DEST, 10, 1 << 30)
    with pytest.raises(ValueError):
        asprof.LocalReporter("/tmp")
    after = os.stat("/tmp")
    assert (before.st_mode, before.st_uid) == (after.st_mode, after.st_uid)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory of another user")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    for make in (lambda: asprof.LocalReporter(theirs), lambda: _DirSpool(str(theirs), DEST, 10, 1 << 30)):
        with pytest.raises(ValueError, match="belongs to uid 65534"):
            make()
    st = os.stat(theirs)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o700)


def test_symlinked_parent_components_are_still_usable(tmp_path: Path) -> None:
    """Only the directory itself must not be a link (/var/run -> /run style parents are common)."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    assert secure_directory(tmp_path / "alias" / "profiles", "t") == str(tmp_path / "alias" / "profiles")
    assert mode(real / "profiles") == 0o700


# ---------------------------------------------------------------- only our own files are removed

def test_spool_cleanup_leaves_foreign_files(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    d.mkdir(mode=0o700)
    old = 1_000_000_000  # 2001: older than any age rule
    foreign = {
        ".tmp-deadbeef": b"someone's temp",  # the old naming: not provably ours
        ".tmp-" + "a" * 32: b"x",
        "notes.txt": b"x",
        "00000000000000000001-0000000001-" + "b" * 32 + "-000000000000.asprof-s3": b"other destination",
        ".00000000000000000001-0000000001-" + "c" * 32 + "-000000000000.asprof-s3.partial": b"other dest partial",
        ".random.partial": b"x",
    }
    for name, data in foreign.items():
        (d / name).write_bytes(data)
        os.utime(d / name, (old, old))
    os.chmod(d, 0o700)
    spool = _DirSpool(str(d), DEST, 10, 1 << 30)
    assert spool.recover_partials() == (0, 0)
    assert sorted(p.name for p in d.iterdir()) == sorted(foreign)


def test_a_partial_being_written_is_left_alone(tmp_path: Path) -> None:
    """Locked by a live writer (this process or another): neither finished nor removed."""
    out = tmp_path / "p"
    r = asprof.LocalReporter(out)
    partial = out / ".2025-01-02T03-04-05Z_77.0.3999999.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, JFR)
    try:
        assert r.recover_partials() == (0, 0)
        assert partial.exists()
    finally:
        os.close(fd)


DEAD_PID = 3999999  # above any pid in use here: a writer that is gone


def _abandon(directory: Path, data: bytes, pid: int = 77, writer: int = DEAD_PID) -> Path:
    p = directory / f".2025-01-02T03-04-05Z_{pid}.0.{writer}.partial"
    p.write_bytes(data)
    os.chmod(p, 0o644)
    return p


def test_an_abandoned_complete_partial_is_finished(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "p"
    out.mkdir(mode=0o700)
    _abandon(out, JFR)
    caplog.set_level(logging.INFO, logger="asprof")
    r = asprof.LocalReporter(out)
    assert r.recover_partials() == (1, 0)
    assert sorted(p.name for p in out.iterdir()) == ["2025-01-02T03-04-05Z_77.jfr"]
    assert (out / "2025-01-02T03-04-05Z_77.jfr").read_bytes() == JFR
    assert mode(out / "2025-01-02T03-04-05Z_77.jfr") == 0o600
    assert any("recovered" in rec.getMessage() and "killed" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("cut", [1, 67, 68, 1000, -1])
def test_an_abandoned_incomplete_partial_is_removed(tmp_path: Path, cut: int,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "p"
    out.mkdir(mode=0o700)
    p = _abandon(out, JFR[:cut])
    os.utime(p, (1_000_000_000, 1_000_000_000))  # an empty young file could be a writer about to lock it
    caplog.set_level(logging.INFO, logger="asprof")
    assert asprof.LocalReporter(out).recover_partials() == (0, 1)
    assert list(out.iterdir()) == []
    assert any("incomplete" in rec.getMessage() for rec in caplog.records)


def test_an_empty_partial_of_a_live_writer_is_left_until_it_is_old(tmp_path: Path) -> None:
    """Between creating and locking its file (microseconds) a writer's file is empty and unlocked:
    left alone while its writer lives and it is young; removed when its writer is gone."""
    out = tmp_path / "p"
    out.mkdir(mode=0o700)
    live = _abandon(out, b"", writer=os.getpid())
    assert asprof.LocalReporter(out).recover_partials() == (0, 0) and live.exists()
    os.utime(live, (1_000_000_000, 1_000_000_000))
    assert asprof.LocalReporter(out).recover_partials() == (0, 1) and not live.exists()
    _abandon(out, b"", writer=DEAD_PID)
    assert asprof.LocalReporter(out).recover_partials() == (0, 1)
    assert list(out.iterdir()) == []


def test_a_partial_already_published_is_removed_not_duplicated(tmp_path: Path) -> None:
    """Killed between link() and unlink(): the .partial is a second name of a delivered profile."""
    out = tmp_path / "p"
    out.mkdir(mode=0o700)
    p = _abandon(out, JFR)
    os.link(p, out / "2025-01-02T03-04-05Z_77.jfr")
    assert asprof.LocalReporter(out).recover_partials() == (0, 1)
    assert sorted(x.name for x in out.iterdir()) == ["2025-01-02T03-04-05Z_77.jfr"]


def test_recovery_runs_before_the_first_report(tmp_path: Path) -> None:
    out = tmp_path / "p"
    out.mkdir(mode=0o700)
    _abandon(out, JFR)
    r = asprof.LocalReporter(out)
    assert len(list(out.iterdir())) == 1  # nothing done on the application's thread at creation
    r.report(JFR, meta(pid=5))
    assert sorted(p.name for p in out.iterdir()) == ["2025-01-02T03-04-05Z_5.jfr", "2025-01-02T03-04-05Z_77.jfr"]


def test_a_symlink_named_like_a_partial_is_not_followed(tmp_path: Path) -> None:
    out = tmp_path / "p"
    out.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(JFR)
    (out / ".2025-01-02T03-04-05Z_77.0.3999999.partial").symlink_to(victim)
    assert asprof.LocalReporter(out).recover_partials() == (0, 0)
    assert victim.read_bytes() == JFR and (out / ".2025-01-02T03-04-05Z_77.0.3999999.partial").is_symlink()


def test_spool_partial_recovered_or_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from asprof.reporter.s3.format import profile_zip

    d = tmp_path / "spool"
    first = _DirSpool(str(d), DEST, 10, 1 << 30)
    body = profile_zip(JFR, meta())
    first.put(_Entry(id="1" * 32, key="k1", bucket="bucket", body=body), 10)
    first.put(_Entry(id="2" * 32, key="k2", bucket="bucket", body=body), 20)
    # Two profiles "killed before the rename": one complete, one cut in its zip.
    names = sorted(p.name for p in d.iterdir())
    os.rename(d / names[0], d / f".{names[0]}.{DEAD_PID}.partial")
    data = (d / names[1]).read_bytes()
    (d / names[1]).unlink()
    (d / f".{names[1]}.{DEAD_PID}.partial").write_bytes(data[: len(data) // 2])
    caplog.set_level(logging.INFO, logger="asprof.s3")
    second = _DirSpool(str(d), DEST, 10, 1 << 30)
    assert len(list(d.iterdir())) == 2  # nothing read on the application's thread at creation
    entry = second.claim()  # the upload thread's first look
    assert sorted(p.name for p in d.iterdir()) == [names[0]]
    assert entry is not None and entry.key == "k1" and entry.body == body
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "recovered" in messages and "1 profile lost" in messages


def test_a_long_running_reporter_looks_again_every_minute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process sharing the directory (a pre-fork server's worker) may be killed long after
    this reporter's first report: its .partial is dealt with at most a minute later."""
    import asprof.reporter.local as local

    clock = [1000.0]
    monkeypatch.setattr(local.time, "monotonic", lambda: clock[0])
    out = tmp_path / "p"
    r = asprof.LocalReporter(out)
    r.report(JFR, meta(pid=5))
    _abandon(out, JFR, pid=77)  # killed after our first report
    clock[0] += 30
    r.report(JFR, meta(pid=6))
    assert any(p.name.endswith(".partial") for p in out.iterdir())  # not yet: once a minute
    clock[0] += 31
    r.report(JFR, meta(pid=7))
    assert sorted(p.name for p in out.iterdir()) == [f"2025-01-02T03-04-05Z_{pid}.jfr" for pid in (5, 6, 7, 77)]


def test_started_from_the_environment_an_unsafe_directory_is_one_line_and_no_profiling(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """`asprof run --reporter /shared/dir`: the service runs unprofiled, with the reason and the fix."""
    from asprof.autostart.start import start_from_environment

    for k in list(os.environ):
        if k.startswith("ASPROF_"):
            monkeypatch.delenv(k)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    caplog.set_level(logging.WARNING, logger="asprof")
    logger = logging.getLogger("asprof")
    handlers, level = list(logger.handlers), logger.level
    try:
        assert start_from_environment({"ASPROF_REPORTER": str(shared), "ASPROF_ENGINE": "builtin"}) is None
    finally:
        logger.handlers[:] = handlers  # start_from_environment may add its stderr handler
        logger.setLevel(level)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("asprof") and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "can be reached by other users (mode 0777)" in lines[0] and "chmod go-w" in lines[0]
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o777 and list(shared.iterdir()) == []
