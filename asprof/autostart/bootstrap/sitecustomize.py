"""Loaded by Python's ``site`` at start-up when ``asprof run`` put this directory
on ``PYTHONPATH``: starts profiling from the ``ASPROF_*`` variables, then runs
the ``sitecustomize`` this one shadows (the next on ``sys.path``), if any.

This directory is removed from ``sys.path`` afterwards (it stays in
``PYTHONPATH``, so child Python processes are profiled too).
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _same(entry: object, here: str = _HERE) -> bool:
    try:
        return isinstance(entry, str) and os.path.abspath(entry or os.curdir) == here
    except (TypeError, ValueError):
        return False


def _chain() -> None:
    import importlib.machinery
    import importlib.util

    path = [p for p in sys.path if isinstance(p, str) and not _same(p)]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("sitecustomize", None)
        raise


def _start() -> None:
    try:
        import asprof.auto  # noqa: F401
    except Exception as e:  # noqa: BLE001 - never stop the program (e.g. asprof not installed for it)
        try:
            sys.stderr.write(f"asprof[{os.getpid()}]: ERROR: cannot start profiling in {sys.executable}: "
                             f"{type(e).__name__}: {e}\n")
        except Exception:  # noqa: BLE001
            pass


try:
    _start()
finally:
    sys.path[:] = [p for p in sys.path if not (isinstance(p, str) and _same(p))]
    _chain()
