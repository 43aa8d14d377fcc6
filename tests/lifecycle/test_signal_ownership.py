"""Signal ownership (issue #13): an application that installs its own SIGPROF / SIGALRM handlers
and timers, before or after profiling starts, keeps its signals, and profiling goes on.

Each case is a child interpreter (signal dispositions are process-wide) that burns ~1 s of CPU on
its main thread at a 1 ms CPU interval and checks, for both engines (async-profiler's cases skip,
saying why, when it is not installed):
- CPU samples >= 80% of the main thread's CPU time / interval;
- the application's handlers got their own signals (its ITIMER_PROF and ITIMER_REAL ticks);
- exactly one WARNING on the ``asprof`` logger when a profiling signal was taken (none otherwise),
  naming the signal and the handler; the conflict counted in the report metadata.
"""
from __future__ import annotations

import json
from typing import Any, Dict

import pytest

from conftest import REAL_LIB, run_python

ENGINES = [
    pytest.param("builtin", id="builtin"),
    pytest.param("async-profiler", id="async-profiler", marks=pytest.mark.skipif(
        REAL_LIB is None, reason="async-profiler (libasyncProfiler.so) is not installed: its signal "
                                 "ownership cases are skipped; install it (see README) to run them")),
]

CHILD = r"""
import ctypes, json, logging, os, signal, sys, time

MODE, ENGINE = sys.argv[1], sys.argv[2]
INTERVAL = 0.001
records = []

class Capture(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))

log = logging.getLogger("asprof")
log.addHandler(Capture())
log.setLevel(logging.INFO)

import asprof
from asprof.jfr import open_recording

got = {"prof": 0, "alrm": 0}

def on_prof(signum, frame):
    got["prof"] += 1

def on_alrm(signum, frame):
    got["alrm"] += 1

def python_handlers():
    signal.signal(signal.SIGPROF, on_prof)
    signal.signal(signal.SIGALRM, on_alrm)
    signal.setitimer(signal.ITIMER_PROF, 0.02, 0.02)
    signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)

def alarm_only():
    signal.signal(signal.SIGALRM, on_alrm)
    signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)

def native_handler():
    # a native handler that is not asprof's: libc's getpid (harmless, async-signal-safe)
    libc = ctypes.CDLL(None, use_errno=True)
    class SA(ctypes.Structure):
        _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                    ("restorer", ctypes.c_void_p)]
    sa = SA()
    sa.handler = ctypes.cast(libc.getpid, ctypes.c_void_p).value
    sa.flags = 0x10000000  # SA_RESTART
    assert libc.sigaction(signal.SIGPROF, ctypes.byref(sa), None) == 0, ctypes.get_errno()

install = {"none": None, "alarm": alarm_only, "before": python_handlers, "after": python_handlers,
           "native": native_handler, "restore": None}[MODE]

def burn(seconds):
    # pure Python work (no system calls): what CPU sampling sees whole
    t = time.thread_time()
    while time.thread_time() - t < seconds:
        x = 0
        for i in range(20000):
            x += i

reports = []

class Keep(asprof.Reporter):
    def report(self, jfr, metadata):
        reports.append((jfr, metadata.signal_conflicts))
    def report_blocking(self, jfr, metadata):
        self.report(jfr, metadata)

if MODE == "before":
    install()
profiler = asprof.Profiler(reporter=Keep(), reporting_interval=60.0, agent_metadata=asprof.NoMetadata(),
                          options=asprof.ProfilerOptions(
    cpu_interval=INTERVAL, wall_interval=0.1, engine=ENGINE))
running = profiler.start()
burn(0.1)
if MODE in ("after", "native", "alarm"):
    install()
restore_ok = None
wall0, cpu0 = time.monotonic(), time.thread_time()
if MODE == "restore":
    # a timeout helper's pattern: save the previous handler, put it back when done (CPython says
    # SIG_DFL for SIGPROF, whatever is installed in C)
    for _ in range(10):
        old = signal.signal(signal.SIGPROF, on_prof)
        signal.setitimer(signal.ITIMER_PROF, 0.02, 0.02)
        burn(0.05)
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, old)
        burn(0.05)
    restore_ok = signal.getsignal(signal.SIGPROF) == signal.SIG_DFL
else:
    burn(1.0)
cpu, wall = time.thread_time() - cpu0 + 0.1, time.monotonic() - wall0
signal.setitimer(signal.ITIMER_PROF, 0, 0)
signal.setitimer(signal.ITIMER_REAL, 0, 0)
running.stop()
samples = 0
settings = []
for jfr, _ in reports:
    rec = open_recording(jfr)
    samples += rec.counts.get("jdk.ExecutionSample", (0, 0))[0]
    settings.append(rec.setting("signalConflicts"))
print(json.dumps({"samples": samples, "expected": cpu / INTERVAL, "cpu": cpu, "wall": wall, "got": got,
                  "warnings": [m for lvl, m in records if lvl == "WARNING"],
                  "conflicts": max((c for _, c in reports), default=None), "settings": settings,
                  "restore_ok": restore_ok, "final": int(signal.getsignal(signal.SIGPROF))
                  if isinstance(signal.getsignal(signal.SIGPROF), int) else "handler"}))
"""


def run_case(mode: str, engine: str) -> Dict[str, Any]:
    r = run_python(CHILD.replace("sys.argv[1], sys.argv[2]", f"{mode!r}, {engine!r}"), timeout=120)
    assert r.returncode == 0, f"the child died (status {r.returncode}): {r.stderr[-3000:]}"
    out: Dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def assert_sampled(out: Dict[str, Any]) -> None:
    assert out["samples"] >= 0.8 * out["expected"], (
        f"{out['samples']} CPU samples for {out['cpu']:.2f} s of CPU at 1 ms (expected >= 80% of "
        f"{out['expected']:.0f}): {out}")


@pytest.mark.parametrize("engine", ENGINES)
def test_no_handler_of_the_application_no_warning(engine: str) -> None:
    out = run_case("none", engine)
    assert_sampled(out)
    assert out["warnings"] == [] and out["conflicts"] == 0, out


@pytest.mark.parametrize("engine", ENGINES)
def test_sigalrm_of_the_application_is_no_conflict(engine: str) -> None:
    out = run_case("alarm", engine)
    assert_sampled(out)
    assert out["got"]["alrm"] >= 0.5 * out["wall"] / 0.02, out  # its ITIMER_REAL ticks, all its own
    assert out["warnings"] == [] and out["conflicts"] == 0, out


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("engine", ENGINES)
def test_python_handlers_and_timers_keep_their_signals(engine: str, when: str) -> None:
    out = run_case(when, engine)
    assert_sampled(out)
    # the application's own ticks reached its handlers: ITIMER_PROF counts CPU time, ITIMER_REAL wall time
    assert out["got"]["prof"] >= 0.5 * out["cpu"] / 0.02, out
    assert out["got"]["alrm"] >= 0.5 * out["wall"] / 0.02, out
    assert len(out["warnings"]) == 1, out
    warning = out["warnings"][0]
    assert "SIGPROF" in warning and "on_prof" in warning and "signal.signal()" in warning, warning
    assert out["conflicts"] >= 1, out
    if engine == "builtin":
        assert out["settings"] and all(s is not None and int(s) >= 1 for s in out["settings"][-1:]), out


@pytest.mark.parametrize("engine", ENGINES)
def test_native_handler_is_named(engine: str) -> None:
    out = run_case("native", engine)
    assert_sampled(out)
    assert len(out["warnings"]) == 1, out
    assert "SIGPROF" in out["warnings"][0] and "getpid" in out["warnings"][0] and "libc" in out["warnings"][0], out


@pytest.mark.parametrize("engine", ENGINES)
def test_saved_and_restored_default_does_not_end_the_process(engine: str) -> None:
    # CPython reports SIG_DFL for SIGPROF while asprof's handler is in place: putting that back
    # must not leave the default action (termination) under a profiling signal
    out = run_case("restore", engine)
    assert out["restore_ok"] is True, out  # the application still sees what it set
    assert out["got"]["prof"] > 0, out
    assert out["samples"] >= 0.8 * out["expected"], out
    assert len(out["warnings"]) == 1, out
    if engine == "async-profiler":
        assert out["final"] == 0, out  # SIG_DFL for real once profiling stopped


CHAINING_HANDLER = r"""
#include <signal.h>
#include <string.h>
static struct sigaction old;
static volatile long n;
/* a native handler that passes every signal on to the handler it replaced, as libraries do */
static void h(int sig, siginfo_t *si, void *uc) {
    n++;
    if (old.sa_flags & SA_SIGINFO) {
        if (old.sa_sigaction) old.sa_sigaction(sig, si, uc);
    } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
        old.sa_handler(sig);
    }
}
int install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = h;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGPROF, &sa, &old);
}
long count(void) { return n; }
"""

CHAIN_CHILD = r"""
import ctypes, json, logging, signal, sys, time
records = []
class Capture(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))
logging.getLogger("asprof").addHandler(Capture())
import asprof
from asprof.jfr import open_recording
lib = ctypes.CDLL(LIB)
reports = []
class Keep(asprof.Reporter):
    def report(self, jfr, metadata):
        reports.append(jfr)
    def report_blocking(self, jfr, metadata):
        self.report(jfr, metadata)
def burn(seconds):
    t = time.thread_time()
    while time.thread_time() - t < seconds:
        x = 0
        for i in range(20000):
            x += i
running = asprof.Profiler(reporter=Keep(), reporting_interval=60.0, agent_metadata=asprof.NoMetadata(),
                          options=asprof.ProfilerOptions(cpu_interval=0.001, wall_interval=0.1, engine=ENGINE)).start()
assert lib.install() == 0
burn(0.3)  # asprof back in front, this handler behind it
assert lib.install() == 0  # again: it now saved asprof's handler in front, and chains to it
signal.setitimer(signal.ITIMER_PROF, 0.02, 0.02)
cpu0 = time.thread_time()
burn(1.0)
cpu = time.thread_time() - cpu0 + 0.3
signal.setitimer(signal.ITIMER_PROF, 0, 0)
running.stop()
samples = sum(open_recording(j).counts.get("jdk.ExecutionSample", (0, 0))[0] for j in reports)
print(json.dumps({"samples": samples, "expected": cpu / 0.001, "cpu": cpu, "app": lib.count(),
                  "warnings": [m for lvl, m in records if lvl == "WARNING"]}))
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_a_handler_chaining_back_to_asprof_does_not_loop(engine: str, tmp_path: Any) -> None:
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the chaining handler")
    src, lib = tmp_path / "chain.c", tmp_path / "libchain.so"
    src.write_text(CHAINING_HANDLER)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(src)], check=True)
    r = run_python(CHAIN_CHILD.replace("LIB)", f"{str(lib)!r})").replace("engine=ENGINE", f"engine={engine!r}"),
                   timeout=120)
    assert r.returncode == 0, f"the child died (status {r.returncode}): {r.stderr[-3000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert_sampled(out)
    assert out["app"] >= 0.5 * out["cpu"] / 0.02, out  # its own ITIMER_PROF ticks (and no endless recursion)
    assert len(out["warnings"]) == 1 and "libchain.so" in out["warnings"][0], out
