"""The built-in engine's ITIMER_PROF fallback and an application that re-arms ITIMER_PROF (issue #13).

There is one ITIMER_PROF per process: the application's setitimer replaces the engine's. Its ticks
then go both to the engine (samples at the application's interval) and to the application's
handler; when the application disarms it, the engine arms its own again."""
from __future__ import annotations

import json

import pytest

from conftest import run_python

CHILD = r"""
import json, signal, time
from asprof.engines import _builtin as b
got = [0]
def on_prof(signum, frame):
    got[0] += 1
def burn(seconds):
    t = time.thread_time()
    while time.thread_time() - t < seconds:
        x = 0
        for i in range(20000):
            x += i
mode = b.start(1000000, 0, 128, "process")
burn(0.2)
signal.signal(signal.SIGPROF, on_prof)
signal.setitimer(signal.ITIMER_PROF, 0.01, 0.01)
c0 = time.thread_time()
burn(0.5)
shared_cpu = time.thread_time() - c0
st = b.stats()
shared = {"taken": st["itimer_taken"], "shared": st["itimer_shared"], "app": got[0], "cpu": shared_cpu}
signal.setitimer(signal.ITIMER_PROF, 0, 0)
time.sleep(0.3)  # the sampler's check (every 100 ms) arms the engine's own again
s0, g0 = b.stats()["samples"], got[0]
burn(0.3)
st = b.stats()
after = {"shared": st["itimer_shared"], "samples": st["samples"] - s0, "app": got[0] - g0}
b.stop()
print(json.dumps({"mode": mode, "shared": shared, "after": after}))
"""


def test_an_application_itimer_prof_is_shared_then_given_back() -> None:
    pytest.importorskip("asprof.engines._builtin")
    r = run_python(CHILD, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mode"] == "itimer", out
    shared, after = out["shared"], out["after"]
    assert shared["taken"] == 1 and shared["shared"] == 1, out
    assert shared["app"] >= 0.5 * shared["cpu"] / 0.01, out  # the application's ticks reach its handler
    assert after["shared"] == 0 and after["samples"] > 0, out  # the engine's own ITIMER_PROF again
    assert after["app"] == 0, out  # and its ticks are not the application's
