"""Build script for the compiled parts of asprof.

Metadata lives in pyproject.toml; this file only declares the C/Cython
extensions, because setuptools cannot express them declaratively.
"""
from __future__ import annotations

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O2", "-g0", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden", "-std=gnu11"]

# The native core: csrc/ (plain C, no Python API) wrapped by asprof/_native.pyx.
native_core = Extension(
    "asprof._native",
    sources=["asprof/_native.pyx"] + sorted(glob.glob("csrc/core/*.c")),
    include_dirs=["csrc/core", "csrc/include"],
    libraries=["dl", "pthread"],
    extra_compile_args=CFLAGS,
    define_macros=[("_GNU_SOURCE", "1")],
)

# The JFR reader's hot loops (issue: read and view profiles).
jfr_extensions = [
    Extension(
        "asprof.jfr._parser",
        sources=["asprof/jfr/_parser.pyx"],
        libraries=["pthread"],  # the column fill of big chunks runs on two threads
        extra_compile_args=CFLAGS,
        define_macros=[("_GNU_SOURCE", "1")],
    )
] if os.path.exists(os.path.join(HERE, "asprof/jfr/_parser.pyx")) else []

# Python frames in samples (issue #5; owner: csrc/pyframes). Plain C, built per CPython
# version: it reads the interpreter's internal frame structures. Only where it is supported:
# CPython 3.9-3.14 with the GIL (issue #14: a free-threaded build, or a version the walk does
# not know, gets no frame walker, said here and by the agent at run time, one log line).
import platform  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402

WALKER_VERSIONS = ((3, 9), (3, 14))


def _walker_refusal() -> "str | None":
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    if not WALKER_VERSIONS[0] <= sys.version_info[:2] <= WALKER_VERSIONS[1]:
        return "CPython %d.%d is not one of 3.9-3.14" % sys.version_info[:2]
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "this is a free-threaded build (Py_GIL_DISABLED)"
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")):
        return f"{sys.platform}/{platform.machine()} is not Linux x86_64/aarch64"
    return None


_no_walker = _walker_refusal()
if _no_walker:
    sys.stderr.write(f"asprof: building without the Python-frame walker: {_no_walker}\n")

# A free-threaded build (issue #14): an extension that does not declare itself safe without the
# GIL turns the GIL back on when imported. Only asprof._native (a thin wrapper whose every call
# runs without the GIL, over csrc/core's own locks) is declared; the C modules that rely on the
# GIL (the built-in engine, labels, signal ownership) are not built there and the package runs
# without them (each import is optional); the offline reader's _parser is not declared either
# (it is never imported by the agent).
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
if FREE_THREADED:
    sys.stderr.write("asprof: free-threaded build: only asprof._native (async-profiler) is built for the agent\n")

pyframes_extensions = [
    Extension(
        "asprof._pyframes",
        sources=sorted(glob.glob("csrc/pyframes/*.c")),
        include_dirs=["csrc/pyframes", "csrc/include"],
        libraries=["dl", "pthread"],
        extra_compile_args=CFLAGS,
        define_macros=[("_GNU_SOURCE", "1")],
    )
] if _no_walker is None and glob.glob(os.path.join(HERE, "csrc/pyframes/*.c")) else []

# The built-in sampling engine (issue #11; owner: csrc/builtin). Every CPython 3.9+ on Linux
# x86_64/aarch64; the frame walker of csrc/pyframes only where it supports the interpreter
# (the _pyframes condition, and not the free-threaded build), native-leaf-only samples elsewhere.
_walker = bool(pyframes_extensions)
builtin_extensions = [
    Extension(
        "asprof.engines._builtin",
        sources=sorted(glob.glob("csrc/builtin/*.c")) + (
            ["csrc/pyframes/safeload.c", "csrc/pyframes/walk.c", "csrc/pyframes/sigcapture.c"] if _walker else []),
        include_dirs=["csrc/builtin", "csrc/pyframes", "csrc/include"],
        libraries=["dl", "pthread", "rt"],
        extra_compile_args=CFLAGS,
        define_macros=[("_GNU_SOURCE", "1")] + ([("ASPROF_WALKER", "1")] if _walker else []),
    )
] if (sys.implementation.name == "cpython" and sys.version_info[:2] >= (3, 9) and not FREE_THREADED
      and sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")
      and glob.glob(os.path.join(HERE, "csrc/builtin/*.c"))) else []

# Request labels and asyncio step events (issue #15; owner: csrc/context): the per-thread slot
# the engines' signal handlers read. Every CPython 3.9+ on Linux.
context_extensions = [
    Extension(
        "asprof.context._ctx",
        sources=["csrc/context/context.c"],
        include_dirs=["csrc/include"],
        libraries=["pthread"],
        extra_compile_args=CFLAGS,
        define_macros=[("_GNU_SOURCE", "1")],
    )
] if (sys.implementation.name == "cpython" and sys.platform.startswith("linux") and not FREE_THREADED
      and os.path.exists(os.path.join(HERE, "csrc/context/context.c"))) else []

# Python allocation sampling and the live heap (issue #16; owner: csrc/alloc). Needs the frame
# walker of csrc/pyframes (same condition as the built-in engine's walker).
alloc_extensions = [
    Extension(
        "asprof.engines._alloc",
        sources=sorted(glob.glob("csrc/alloc/*.c"))
        + ["csrc/pyframes/safeload.c", "csrc/pyframes/walk.c", "csrc/pyframes/sigcapture.c"],
        include_dirs=["csrc/alloc", "csrc/pyframes"],
        libraries=["dl", "pthread", "m"],
        extra_compile_args=CFLAGS,
        define_macros=[("_GNU_SOURCE", "1")],
    )
] if _walker and glob.glob(os.path.join(HERE, "csrc/alloc/*.c")) else []

# Who owns the profiling signals (issue #13; owner: csrc/signals): the forwarding trampoline
# and the asprof-sigwatch thread used with async-profiler, handler lookups for doctor.
signals_extensions = [
    Extension(
        "asprof.engines._signals",
        sources=["csrc/signals/sigwatch.c"],
        libraries=["dl", "pthread"],
        extra_compile_args=CFLAGS,
        define_macros=[("_GNU_SOURCE", "1")],
    )
] if (sys.implementation.name == "cpython" and sys.platform.startswith("linux") and not FREE_THREADED
      and os.path.exists(os.path.join(HERE, "csrc/signals/sigwatch.c"))) else []


def _cython_ft_directive() -> dict:
    """freethreading_compatible (Cython 3.1+) for asprof._native only (see FREE_THREADED)."""
    import Cython

    major, minor = (int(x) for x in Cython.__version__.split(".")[:2])
    return {"freethreading_compatible": True} if (major, minor) >= (3, 1) else {}


setup(
    ext_modules=cythonize(
        [native_core],
        language_level="3",
        compiler_directives={"embedsignature": True, **_cython_ft_directive()},
    ) + cythonize(
        jfr_extensions,
        language_level="3",
        compiler_directives={"embedsignature": True},
    ) + pyframes_extensions + builtin_extensions + context_extensions + alloc_extensions
    + signals_extensions,
)
