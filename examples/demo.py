"""Profiles a small mixed workload for a few seconds and writes JFR files.

    python examples/demo.py [seconds] [output-directory]

Each second a profile lands in the directory (default ./profiles); the
reporting interval is shortened from the production default (30 s) so the
demo finishes quickly. It says which engine recorded them: async-profiler where
it is installed, else asprof's built-in engine (``ASPROF_ENGINE=builtin`` or
``async-profiler`` picks one).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
import zlib

import asprof


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def work(until: float) -> None:
    while time.monotonic() < until:
        fib(18)
        data = os.urandom(100_000)
        zlib.compress(data)
        hashlib.sha256(data).digest()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    out = sys.argv[2] if len(sys.argv) > 2 else "profiles"
    reporter = asprof.LocalReporter(out)
    profiler = asprof.Profiler(reporter, reporting_interval=1.0,
                               options=asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.1))
    until = time.monotonic() + seconds
    with profiler.start() as running:
        engine = running.engine  # "async-profiler" or "builtin" (asprof's own sampler)
        helper = threading.Thread(target=work, args=(until,), name="worker")
        helper.start()
        work(until)
        helper.join()
    files = sorted(os.listdir(reporter.directory))
    print(f"engine: {engine}" + (" (asprof's own sampler; `asprof doctor` says why)" if engine == "builtin" else ""))
    print(f"{len(files)} profiles in {reporter.directory}:")
    for name in files:
        print(f"  {name}  {os.path.getsize(os.path.join(reporter.directory, name))} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
