"""Which interpreters get Python stacks (issue #14): CPython 3.9-3.14 with the GIL; a free-threaded
build or an unknown future version is refused with one log line, and the package still works.

No free-threaded or 3.15 interpreter exists here, so the run-time detection is driven with a fake
configuration (``Py_GIL_DISABLED`` from sysconfig, the version tuple)."""
from __future__ import annotations

import logging
import sysconfig
import types
from typing import Any

import pytest

import asprof.pyframes as pyframes
from asprof.pyframes import SUPPORTED_VERSIONS, attach_capture, free_threaded, unsupported_reason


def test_supported_range_is_3_9_to_3_14() -> None:
    assert SUPPORTED_VERSIONS == ((3, 9), (3, 14))
    for minor in range(9, 15):
        assert unsupported_reason("cpython", (3, minor, 0), gil_disabled=False) is None


@pytest.mark.parametrize("version", [(3, 15, 0), (3, 16, 1), (4, 0, 0), (3, 8, 18)])
def test_unknown_version_refused_with_reason(version: tuple) -> None:
    why = unsupported_reason("cpython", version, gil_disabled=False)
    assert why is not None
    assert "3.9 to 3.14" in why and ".".join(map(str, version)) in why


def test_other_implementation_refused() -> None:
    why = unsupported_reason("pypy", (3, 10, 14), gil_disabled=False)
    assert why is not None and "pypy 3.10.14" in why


def test_free_threaded_refused_even_on_a_known_version() -> None:
    why = unsupported_reason("cpython", (3, 14, 0), gil_disabled=True)
    assert why is not None and "free-threaded" in why and "native stacks are profiled" in why


def test_free_threaded_from_config_var() -> None:
    assert free_threaded(1) is True
    # this interpreter is not free-threaded: the config says 0 and the GIL is on
    assert free_threaded(0) is False
    assert free_threaded() is False


def test_free_threaded_when_gil_disabled_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A free-threaded build whose configuration variable cannot be read: sys._is_gil_enabled()."""
    import sys

    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    assert free_threaded(0) is True


def _fake_info() -> Any:
    return types.SimpleNamespace(version="4.5", version_tuple=(4, 5), path="/nonexistent/libasyncProfiler.so",
                                 capabilities=frozenset({"user_events", "thread_local_data"}))


def test_attach_capture_refuses_free_threaded(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: 1 if name == "Py_GIL_DISABLED" else real(name))
    monkeypatch.setattr(pyframes, "_capture", None)
    with caplog.at_level(logging.INFO, logger="asprof"):
        assert attach_capture(_fake_info()) is None
    lines = [r.getMessage() for r in caplog.records if "Python frames are off" in r.getMessage()]
    assert len(lines) == 1 and "free-threaded" in lines[0]


def test_attach_capture_refuses_a_future_version(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(pyframes, "unsupported_reason",
                        lambda: unsupported_reason("cpython", (3, 15, 0), gil_disabled=False))
    monkeypatch.setattr(pyframes, "_capture", None)
    with caplog.at_level(logging.INFO, logger="asprof"):
        assert attach_capture(_fake_info()) is None
    lines = [r.getMessage() for r in caplog.records if "Python frames are off" in r.getMessage()]
    assert len(lines) == 1 and "3.15.0" in lines[0]


def test_builtin_engine_says_why_it_has_no_python_stacks(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The built-in engine built without the frame walker (free-threaded, unknown version) or
    refused by the layout check still records native leaf frames, and says so once."""
    _builtin = pytest.importorskip("asprof.engines._builtin", reason="asprof.engines._builtin is not built")
    from asprof.engines.builtin import BuiltinEngine
    from asprof.options import ProfilerOptions

    monkeypatch.setattr(_builtin, "python_frames", False)
    monkeypatch.setattr(_builtin, "python_frames_off", "a test reason")
    with caplog.at_level(logging.INFO, logger="asprof"):
        BuiltinEngine(ProfilerOptions(cstack="no"), explicit=False)
    lines = [r.getMessage() for r in caplog.records if "no Python stacks" in r.getMessage()]
    assert len(lines) == 1 and "a test reason" in lines[0]


def test_builtin_module_reports_its_walker() -> None:
    _builtin = pytest.importorskip("asprof.engines._builtin", reason="asprof.engines._builtin is not built")
    if unsupported_reason() is None:
        # a supported interpreter: the walker is built and the layout check passed (3.14: the
        # offsets compiled in match _PyRuntime.debug_offsets)
        assert _builtin.python_frames is True and _builtin.python_frames_off is None
    else:
        assert _builtin.python_frames is False and isinstance(_builtin.python_frames_off, str)


def test_builtin_engine_unavailable_on_free_threaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not built there (setup.py) and never imported: an extension that does not declare itself
    free-threading safe would turn the GIL back on."""
    from asprof.engines import builtin

    monkeypatch.setattr(pyframes, "free_threaded", lambda config_var=None: True)
    why = builtin.unavailable_reason()
    assert why is not None and "free-threaded" in why


def test_setup_builds_only_declared_extensions_when_free_threaded() -> None:
    """setup.py: on a free-threaded build only asprof._native (declared safe) and the offline
    reader are built; the walker is refused for 3.15+ and free-threaded builds alike."""
    import ast
    import os

    src = open(os.path.join(os.path.dirname(__file__), "..", "..", "setup.py")).read()
    tree = ast.parse(src)
    names = {n.targets[0].id for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
    assert {"FREE_THREADED", "WALKER_VERSIONS"} <= names
    for ext in ("builtin_extensions", "context_extensions", "signals_extensions"):
        node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == ext)
        assert "not FREE_THREADED" in ast.get_source_segment(src, node)
    ns: dict = {}
    exec(compile(ast.Module([n for n in tree.body if isinstance(n, ast.Import)] + [
        n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.Assign))
        and getattr(n, "name", getattr(getattr(n, "targets", [None])[0], "id", "")) in ("WALKER_VERSIONS", "_walker_refusal")
    ], type_ignores=[]), "setup.py", "exec"), ns)
    assert ns["_walker_refusal"]() is None  # this interpreter: supported
    ns["sysconfig"] = types.SimpleNamespace(get_config_var=lambda name: 1)
    assert "free-threaded" in ns["_walker_refusal"]()
    ns["sys"] = types.SimpleNamespace(implementation=types.SimpleNamespace(name="cpython"), version_info=(3, 15, 0),
                                      platform="linux")
    assert "3.15" in ns["_walker_refusal"]()


def test_packaging_covers_every_supported_version() -> None:
    """Classifiers, the cibuildwheel matrix and the test workflow list each supported CPython
    (3.9-3.14); no free-threaded wheel is built (the frame walk is refused there)."""
    import os
    import re

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    with open(os.path.join(root, "pyproject.toml")) as f:
        pyproject = f.read()
    with open(os.path.join(root, ".github", "workflows", "tests.yml")) as f:
        workflow = f.read()
    build = re.search(r'^build = "([^"]*)"', pyproject, re.M)
    skip = re.search(r'^skip = "([^"]*)"', pyproject, re.M)
    matrix = re.search(r"python: \[([^\]]*)\]", workflow)
    assert build and skip and matrix
    lo, hi = SUPPORTED_VERSIONS
    for minor in range(lo[1], hi[1] + 1):
        assert f'"Programming Language :: Python :: 3.{minor}"' in pyproject
        assert f"cp3{minor}-*" in build.group(1).split()
        assert f'"3.{minor}"' in matrix.group(1)
    assert "cp31?t-*" in skip.group(1).split()
