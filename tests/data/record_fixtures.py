"""Re-records the real JFR fixtures in tests/data (see README.md there) with async-profiler through asprof.

Needs the real libasyncProfiler.so and an interpreter that loads libpython as a shared library (for
native memory). Run from the repository root, one fixture per fresh interpreter:

    .venv/bin/python tests/data/record_fixtures.py NAME [NAME ...]     # or: all

Each fixture is gzip-compressed into tests/data/NAME.jfr.gz. The workload (three threads, as in
every fixture): the main thread compresses random bytes (native code), a thread runs pure Python,
a third waits on a queue (idle: wall-clock samples only).
"""
from __future__ import annotations

import ctypes
import gzip
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

import asprof  # noqa: E402
from asprof.engines.asyncprofiler import NativeEngine, load_library  # noqa: E402


def python_burner(stop: threading.Event) -> None:
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    while not stop.is_set():
        fib(18)


def waiter(stop: threading.Event, q: "queue.Queue[int]") -> None:
    while not stop.is_set():
        try:
            q.get(timeout=0.05)
        except queue.Empty:
            pass


LEAKED: List[bytearray] = []  # still allocated when the recording stops


def allocator(stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        buf = bytearray(4096 + (i % 64) * 1024)  # a native malloc per buffer, freed at once
        if i % 50 == 0:
            LEAKED.append(buf)  # ... except every 50th: leaks
        i += 1
        if i % 200 == 0:
            time.sleep(0.001)


def workload(seconds: float, extra: Optional[Callable[[threading.Event], None]] = None,
             on_main: Optional[Callable[[int], None]] = None) -> None:
    stop = threading.Event()
    q: "queue.Queue[int]" = queue.Queue()
    threads = [threading.Thread(target=python_burner, args=(stop,), name="py-burner"),
               threading.Thread(target=waiter, args=(stop, q), name="waiter")]
    if extra is not None:
        threads.append(threading.Thread(target=extra, args=(stop,), name="allocator"))
    for t in threads:
        t.start()
    data = os.urandom(1 << 16)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        zlib.compress(data, 6)
        if on_main is not None:
            on_main(n)
        n += 1
    stop.set()
    for t in threads:
        t.join()


def one_chunk(options: asprof.ProfilerOptions, seconds: float,
              extra: Optional[Callable[[threading.Event], None]] = None,
              on_main: Optional[Callable[[int], None]] = None) -> bytes:
    """One recording as async-profiler writes it, in one chunk: the engine's full-rotation
    path (no dump), started, the workload, stopped."""
    engine = NativeEngine(options)
    engine._disable_dump("fixture: one chunk")
    engine.start()
    try:
        workload(seconds, extra, on_main)
        data = engine.stop()
    finally:
        engine.close()
    assert data
    return data


def user_events() -> bytes:
    lib = ctypes.CDLL(load_library()[1].path)  # the library the engine loads (the same handle)
    lib.asprof_register_jfr_event.restype = ctypes.c_int
    lib.asprof_register_jfr_event.argtypes = [ctypes.c_char_p]
    lib.asprof_emit_jfr_event.restype = ctypes.c_char_p
    lib.asprof_emit_jfr_event.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    sent = [0]
    key = [-1]
    last = [0.0]

    def marker(_n: int) -> None:
        if key[0] < 0:
            key[0] = lib.asprof_register_jfr_event(b"fixture.Marker")
        if time.monotonic() - last[0] >= 0.05:
            payload = f"marker {sent[0]}".encode()
            err = lib.asprof_emit_jfr_event(key[0], payload, len(payload))
            assert err is None, err
            sent[0] += 1
            last[0] = time.monotonic()

    opts = asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.1, python_frames=False)
    data = one_chunk(opts, 1.5, on_main=marker)
    print(f"user-events: {sent[0]} markers", file=sys.stderr)
    return data


def agent_report() -> bytes:
    """The agent's second report with default options but the intervals (Python frames on):
    a settings chunk, then the data chunk of a dump."""
    with tempfile.TemporaryDirectory() as d:
        opts = asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.1)
        with asprof.Profiler(asprof.LocalReporter(d), reporting_interval=1.0, options=opts).start():
            workload(2.5)
        files = sorted(Path(d).glob("*.jfr"))
        assert len(files) >= 2, files
        return files[1].read_bytes()


RECIPES: Dict[str, Callable[[], bytes]] = {
    "cpu-wall-dwarf": lambda: one_chunk(
        asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.1, cstack="dwarf", python_frames=False), 1.6),
    "cpu-wall-fp": lambda: one_chunk(
        asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.1, cstack="fp", python_frames=False), 1.0),
    "nativemem": lambda: one_chunk(
        asprof.ProfilerOptions(cpu_interval=0.01, wall_interval=0.1, native_mem="256k", python_frames=False),
        0.6, extra=allocator),
    "user-events": user_events,
    "multi-chunk": agent_report,
}


def main(argv: List[str]) -> int:
    names = list(RECIPES) if argv == ["all"] else argv
    if len(names) > 1:  # one fresh interpreter each: async-profiler is loaded once per process
        for name in names:
            subprocess.run([sys.executable, __file__, name], check=True)
        return 0
    (name,) = names
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asprof.async-profiler").setLevel(logging.DEBUG)  # its debug log: profiler.Log events
    data = RECIPES[name]()
    out = HERE / f"{name}.jfr.gz"
    out.write_bytes(gzip.compress(data, 9, mtime=0))
    print(f"{out.name}: {len(data)} bytes, {out.stat().st_size} gzipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
