"""vendor/async-profiler/bundle.py never bundles an unverified binary (issue #13). Offline:
a local tarball built here stands for the release."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "vendor" / "async-profiler" / "bundle.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("asprof_bundle", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bundle = _module()
VERSION = (ROOT / "vendor" / "async-profiler" / "VERSION").read_text().strip()
NAME = bundle.tarball_name(VERSION, "x86_64")


def _tarball(path: Path) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member, data in ((f"async-profiler-{VERSION}-linux-x64/lib/libasyncProfiler.so", b"\x7fELF fake"),
                             (f"async-profiler-{VERSION}-linux-x64/LICENSE", b"Apache 2.0")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def _sums(path: Path, line: str = "") -> Path:
    path.write_text("# sha256  tarball\n" + line)
    return path


def test_unpinned_tarball_is_refused_with_how_to_pin(tmp_path: Path) -> None:
    tar = tmp_path / NAME
    _tarball(tar)
    with pytest.raises(bundle.BundleError, match="no pinned digest.*SHA256SUMS.*ASPROF_BUNDLE_SHA256"):
        bundle.bundle(str(tmp_path / "out"), str(tar), environ={}, sums_path=str(_sums(tmp_path / "S")),
                      machine="x86_64")
    assert not (tmp_path / "out").exists()


def test_digest_pinned_in_sha256sums(tmp_path: Path) -> None:
    tar = tmp_path / NAME
    digest = _tarball(tar)
    sums = _sums(tmp_path / "S", f"{digest}  {NAME}\n")
    bundle.bundle(str(tmp_path / "out"), str(tar), environ={}, sums_path=str(sums), machine="x86_64")
    assert (tmp_path / "out" / "libasyncProfiler.so").read_bytes() == b"\x7fELF fake"
    assert (tmp_path / "out" / "LICENSE").exists()


def test_digest_from_the_environment_when_sha256sums_has_none(tmp_path: Path) -> None:
    tar = tmp_path / NAME
    digest = _tarball(tar)
    bundle.bundle(str(tmp_path / "out"), str(tar), environ={"ASPROF_BUNDLE_SHA256": digest.upper()},
                  sums_path=str(_sums(tmp_path / "S")), machine="x86_64")
    assert (tmp_path / "out" / "libasyncProfiler.so").exists()


@pytest.mark.parametrize("where", ["sums", "env"])
def test_mismatch_is_refused(tmp_path: Path, where: str) -> None:
    tar = tmp_path / NAME
    _tarball(tar)
    wrong = "0" * 64
    sums = _sums(tmp_path / "S", f"{wrong}  {NAME}\n" if where == "sums" else "")
    env = {"ASPROF_BUNDLE_SHA256": wrong} if where == "env" else {}
    with pytest.raises(bundle.BundleError, match="checksum mismatch"):
        bundle.bundle(str(tmp_path / "out"), str(tar), environ=env, sums_path=str(sums), machine="x86_64")
    assert not (tmp_path / "out").exists()


def test_environment_cannot_override_sha256sums(tmp_path: Path) -> None:
    tar = tmp_path / NAME
    digest = _tarball(tar)
    sums = _sums(tmp_path / "S", f"{'1' * 64}  {NAME}\n")
    with pytest.raises(bundle.BundleError, match="contradicts SHA256SUMS"):
        bundle.bundle(str(tmp_path / "out"), str(tar), environ={"ASPROF_BUNDLE_SHA256": digest},
                      sums_path=str(sums), machine="x86_64")


def test_malformed_environment_digest(tmp_path: Path) -> None:
    with pytest.raises(bundle.BundleError, match="not a sha256 digest"):
        bundle.expected_digest(NAME, {}, {"ASPROF_BUNDLE_SHA256": "abc"})


def test_command_line_exits_1_and_bundles_nothing_unpinned(tmp_path: Path) -> None:
    """The script as CI runs it, with the repository's SHA256SUMS (no upstream digest committed
    here means no pin) and a local tarball: exit status 1, one line saying how to pin."""
    tar = tmp_path / NAME
    digest = _tarball(tar)
    pinned = bundle.read_sums(str(ROOT / "vendor" / "async-profiler" / "SHA256SUMS"))
    if NAME in pinned:
        pytest.skip("SHA256SUMS pins this tarball: the fake one is refused by test_mismatch_is_refused")
    env = {k: v for k, v in os.environ.items() if k != "ASPROF_BUNDLE_SHA256"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--tarball", str(tar), str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "no pinned digest" in r.stderr and not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, str(SCRIPT), "--tarball", str(tar), str(tmp_path / "out")],
                       capture_output=True, text=True, env={**env, "ASPROF_BUNDLE_SHA256": digest}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "libasyncProfiler.so").exists()
