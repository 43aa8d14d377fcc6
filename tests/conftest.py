"""Shared fixtures: the stand-in library, the real one, child interpreters."""
from __future__ import annotations

import ctypes.util
import gzip
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUB_SOURCE = Path(__file__).resolve().parent / "stub" / "fake_asprof.c"
ABI_INCLUDE = ROOT / "csrc" / "include"  # asprof_abi.h: the one declaration of the C API
JFR_TOOL = next(iter(sorted(Path("/usr/lib/jvm").glob("*/bin/jfr"))), None) if Path("/usr/lib/jvm").exists() else None


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


@pytest.fixture(scope="session")
def stub_builds(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """The stand-in library compiled in three variants: full, without the 4.x
    functions, and without asprof_execute."""
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler to build the stand-in libasyncProfiler.so")
    out = tmp_path_factory.mktemp("stub")
    builds = {}
    for name, flags in (("full", []), ("no_optional", ["-DSTUB_NO_OPTIONAL"]), ("no_execute", ["-DSTUB_NO_EXECUTE"])):
        d = out / name
        d.mkdir()
        target = d / "libasyncProfiler.so"
        subprocess.run([cc, "-shared", "-fPIC", "-O1", f"-I{ABI_INCLUDE}", *flags, "-o", str(target), str(STUB_SOURCE)],
                       check=True)
        builds[name] = target
    return builds


@pytest.fixture
def stub_lib(stub_builds: Dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the full stand-in: a new file is a new library instance
    (async-profiler and its stand-in are never unloaded), so each test starts clean."""
    target = tmp_path / "lib" / "libasyncProfiler.so"
    target.parent.mkdir()
    shutil.copy(stub_builds["full"], target)
    return target


def library_loads(target: str) -> bool:
    """Whether ``target`` (a path or a soname) really loads: a file that is there but is not a
    library (an empty file mounted over it, a broken copy) means "not installed" to the tests.
    Checked in a child interpreter, so the test process never loads async-profiler itself."""
    r = subprocess.run([sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(sys.argv[1])", target],
                       capture_output=True, timeout=60)
    return r.returncode == 0


def _real_library() -> Optional[str]:
    env = os.environ.get("ASPROF_LIB")
    if env and os.path.exists(env) and "stub" not in env:
        return env if library_loads(env) else None
    found = ctypes.util.find_library("asyncProfiler")
    return found if found is not None and library_loads(found) else None


REAL_LIB = _real_library()
requires_real = pytest.mark.skipif(
    REAL_LIB is None,
    reason="async-profiler (libasyncProfiler.so) is not installed: real-engine tests skipped; "
    "install it (see README) to run them",
)


def check_jfr(path: Path) -> Dict[str, int]:
    """Validates a JFR file and returns event counts per type.

    With a JDK: its `jfr summary` is the oracle. Without: the chunk headers must
    be finished and consistent (size, checkpoint and metadata offsets)."""
    data = path.read_bytes()
    assert data[:4] == b"FLR\0", f"{path.name}: not a JFR file"
    off = chunks = 0
    while off < len(data):
        chunks += 1
        major, minor, size, cp, meta = struct.unpack_from(">HHqqq", data, off + 4)
        assert major == 2 and 0 < size <= len(data) - off, f"{path.name}: bad chunk at {off}"
        assert cp > 0 and meta > 0, f"{path.name}: unfinished chunk at {off}"
        off += size
    if JFR_TOOL is None:
        return {"chunks": chunks}
    out = subprocess.run([str(JFR_TOOL), "summary", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"jfr summary {path.name}: {out.stderr or out.stdout}"
    counts = {"chunks": chunks}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def engine_recordings(lib: Path, options: Any, ticks: int) -> List[Optional[bytes]]:
    """What a NativeEngine on ``lib`` hands over: ``ticks`` ticks, then the final stop."""
    from asprof.engines.asyncprofiler import NativeEngine

    eng = NativeEngine(options, str(lib))
    eng.start()
    got = [eng.tick().recording for _ in range(ticks)]
    got.append(eng.stop())
    eng.close()
    return got


def child_env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("ASPROF_LIB", None)
    env.update(extra)
    return env


def run_python(code: str, *, timeout: float = 60, python: str = sys.executable, cwd: Optional[Path] = None,
               **env: str) -> subprocess.CompletedProcess:
    """Runs code in a child interpreter (bounded in time) and returns the result."""
    return subprocess.run(
        [python, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout, env=child_env(**env), cwd=cwd,
    )


@pytest.fixture
def no_profiler() -> Iterator[None]:
    """Fails a test that leaves a profiler running in this process."""
    yield
    from asprof.agent.loop import current

    active = current()
    if active is not None and not active.done.is_set():
        active.request_stop()
        active.done.wait(10)
        pytest.fail("the test left a profiler running")


# -- the real recordings shipped in tests/data (how each was made: tests/data/README.md) --------

DATA = Path(__file__).resolve().parent / "data"
# Names (without .jfr.gz) of the real async-profiler recordings in tests/data.
RECORDINGS = sorted(p.name[:-len(".jfr.gz")] for p in DATA.glob("*.jfr.gz"))


def recording_bytes(name: str) -> bytes:
    """The JFR bytes of tests/data/NAME.jfr.gz."""
    return gzip.decompress((DATA / f"{name}.jfr.gz").read_bytes())


def unpack_recording(name: str, directory: Path) -> Path:
    """tests/data/NAME.jfr.gz unpacked as DIRECTORY/NAME.jfr (once); returns its path."""
    out = directory / f"{name}.jfr"
    if not out.exists():
        out.write_bytes(recording_bytes(name))
    return out


@pytest.fixture
def recording(tmp_path: Path) -> Callable[[str], Path]:
    """``recording(NAME)``: tests/data/NAME.jfr.gz unpacked into the test's tmp_path (a Path)."""
    return lambda name: unpack_recording(name, tmp_path)
