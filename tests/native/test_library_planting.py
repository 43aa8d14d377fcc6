"""A libasyncProfiler.so planted in the working directory is never loaded (issue #13).

The planted library is a real shared object whose constructor writes a marker file: if
any dlopen reached it, the marker exists. Each LD_LIBRARY_PATH is given to a fresh child
interpreter (the dynamic linker reads it at process start).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import _compiler, run_python

PLANT = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *p = getenv("PLANT_MARKER");
    FILE *f = p ? fopen(p, "a") : NULL;
    if (f) { fputs("planted library loaded\n", f); fclose(f); }
}
"""

# Every value that names the working directory, directly or by an empty entry.
LD_PATHS = ["", ":", ":/nonexistent", "/nonexistent:", "/nonexistent::/x", ".", "./", "lib/..", "libdir",
            ";", " "]

CHILD = """
import json, sys
from asprof.engines.asyncprofiler import load_library
from asprof.errors import LibraryNotFoundError
try:
    lib, info = load_library()
    print(json.dumps({"path": info.path}))
except LibraryNotFoundError as e:
    print(json.dumps({"error": str(e)}))
except ValueError as e:
    print(json.dumps({"error": str(e)}))
"""


@pytest.fixture(scope="module")
def planted_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler to build the planted library")
    d = tmp_path_factory.mktemp("plant")
    src = d / "plant.c"
    src.write_text(PLANT)
    out = d / "libasyncProfiler.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out


@pytest.fixture
def workdir(tmp_path: Path, planted_so: Path) -> Path:
    """A working directory holding the planted library (also in ./libdir)."""
    wd = tmp_path / "cwd"
    (wd / "libdir").mkdir(parents=True)
    shutil.copy(planted_so, wd / "libasyncProfiler.so")
    shutil.copy(planted_so, wd / "libdir" / "libasyncProfiler.so")
    return wd


def _run(wd: Path, marker: Path, **env: str) -> dict:
    r = run_python(CHILD, cwd=wd, PLANT_MARKER=str(marker), **env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_positive_control_the_planted_library_writes_its_marker(workdir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    _run(workdir, marker, ASPROF_LIB=str(workdir / "libasyncProfiler.so"))
    assert marker.exists(), "the planted library did not run its constructor: this test could not fail"


@pytest.mark.parametrize("ld_path", LD_PATHS)
def test_no_ld_library_path_value_loads_the_planted_library(workdir: Path, tmp_path: Path, ld_path: str) -> None:
    marker = tmp_path / "marker"
    got = _run(workdir, marker, LD_LIBRARY_PATH=ld_path)
    assert not marker.exists(), f"LD_LIBRARY_PATH={ld_path!r} loaded a library from the working directory"
    if "path" in got:
        assert os.path.isabs(got["path"]) and not got["path"].startswith(str(workdir))


@pytest.mark.parametrize("value", ["libasyncProfiler.so", "./libasyncProfiler.so", "libdir/libasyncProfiler.so"])
def test_relative_asprof_lib_is_refused(workdir: Path, tmp_path: Path, value: str) -> None:
    marker = tmp_path / "marker"
    got = _run(workdir, marker, ASPROF_LIB=value, LD_LIBRARY_PATH=":")
    assert not marker.exists()
    assert "not an absolute path: refused" in got["error"]


def test_blank_asprof_lib_is_unset(workdir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    got = _run(workdir, marker, ASPROF_LIB="   ", LD_LIBRARY_PATH=":")
    assert not marker.exists()
    # searched as if unset: no complaint about the value (where nothing is installed, the
    # not-found message still suggests setting ASPROF_LIB)
    err = got.get("error", "")
    assert "ASPROF_LIB must be" not in err and "not an absolute path" not in err and "'   '" not in err, err


def test_start_profiling_auto_never_loads_the_planted_library(workdir: Path, tmp_path: Path) -> None:
    """The whole start path (engine choice, auto fallback) under the worst LD_LIBRARY_PATH."""
    marker = tmp_path / "marker"
    r = run_python(f"""
        import asprof
        p = asprof.start_profiling(reporter=asprof.LocalReporter({str(tmp_path / 'out')!r}))
        p.stop()
        """, cwd=workdir, PLANT_MARKER=str(marker), LD_LIBRARY_PATH=":.:libdir")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()


def test_native_core_refuses_a_relative_path() -> None:
    from asprof import _native

    with pytest.raises(OSError, match="not an absolute path"):
        _native.Library.open("libasyncProfiler.so")


def test_linker_cache_parser_finds_libc() -> None:
    from asprof.engines.linker_search import cache_entries, search

    if not os.path.exists("/etc/ld.so.cache"):
        pytest.skip("no /etc/ld.so.cache")
    libc = cache_entries("libc.so.6")
    assert libc and all(os.path.isabs(p) for p in libc)
    assert list(search("libc.so.6", {"LD_LIBRARY_PATH": ":.:rel"}))[0] == libc[0]


def test_positive_control_a_bare_soname_dlopen_would_load_it(workdir: Path, tmp_path: Path) -> None:
    """The hazard is real here: the dynamic linker's own search of the soname reaches the
    working directory through an empty LD_LIBRARY_PATH entry (what asprof no longer does)."""
    marker = tmp_path / "marker"
    r = run_python("import ctypes; ctypes.CDLL('libasyncProfiler.so')", cwd=workdir, PLANT_MARKER=str(marker),
                   LD_LIBRARY_PATH=":/nonexistent")
    assert r.returncode == 0, r.stderr
    assert marker.exists()


def test_linker_cache_parser_agrees_with_ldconfig() -> None:
    """Every soname of /etc/ld.so.cache resolves to the paths `ldconfig -p` prints, in its order."""
    import shutil as _shutil

    from asprof.engines.linker_search import cache_entries

    ldconfig = _shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
    if ldconfig is None or not os.path.exists("/etc/ld.so.cache"):
        pytest.skip("no ldconfig or /etc/ld.so.cache")
    expected: dict = {}
    for line in subprocess.run([ldconfig, "-p"], capture_output=True, text=True, check=True).stdout.splitlines()[1:]:
        name, sep, path = line.strip().partition(" => ")
        if sep:
            expected.setdefault(name.split(" (")[0], []).append(path)
    assert expected
    wrong = {n: (p, cache_entries(n)) for n, p in expected.items() if cache_entries(n) != list(dict.fromkeys(p))}
    assert not wrong, list(wrong.items())[:5]
