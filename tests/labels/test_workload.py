"""The held-out checks of issue #15, on loopback: a tiny ASGI service (examples/labels_server.py)
with two routes of known CPU cost and injected stalls of known length, profiled by each engine.

- ``asprof top --by endpoint`` splits the routes' CPU as the service timed it (±3 points);
- ``asprof longsteps --min 50ms`` lists the stalls (>= 95%, durations within 10% of the
  blocking call's measured duration) with the blocking call's frames, and no step shorter than
  the threshold.
"""
from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from conftest import REAL_LIB, ROOT, child_env

SERVER = ROOT / "examples" / "labels_server.py"
# Stalls long enough that the step around one (the request's 1 ms of work + the stall) is within
# 10% of the stall even when this shared machine preempts the service for a few ms; 22 of them,
# so ">= 95%" can be told from "all but two".
STALL_MS = 150.0
STALL_EVERY = 20


def _load(port: int, seconds_requests: int, conn_id: int, stall: bool) -> None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for i in range(seconds_requests):
        path = "/checkout" if i % 3 == 0 else "/search"
        if stall and i % STALL_EVERY == STALL_EVERY - 1:
            path = f"/search?stall={STALL_MS:g}"  # the stall after 1 ms of work
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        assert r.status == 200
    c.close()


def _get(port: int, path: str) -> bytes:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    body = c.getresponse().read()
    c.close()
    return body


def run_service(engine: str, out: Path, requests: int = 450) -> Dict[str, Any]:
    """Runs the service under ``engine``, loads it from two connections; returns its truth."""
    proc = subprocess.Popen([sys.executable, str(SERVER), "--engine", engine, "--out", str(out),
                             "--cpu-interval", "0.001", "--wall-interval", "0.01"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.match(r"PORT (\d+)", line)
        assert m, f"service did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        port = int(m.group(1))
        threads = [threading.Thread(target=_load, args=(port, requests, k, k == 0)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        truth: Dict[str, Any] = json.loads(_get(port, "/truth"))
        _get(port, "/quit")
        proc.wait(60)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        return truth
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def asprof_cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "asprof", *args], capture_output=True, text=True, timeout=300,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    return r.stdout


def by_label_table(text: str) -> Dict[str, float]:
    """The ``samples % value`` rows of ``asprof top --by LABEL``."""
    out: Dict[str, float] = {}
    for line in text.splitlines()[2:]:
        m = re.match(r"^\s*(\d+)\s+([\d.]+)%\s+(.+)$", line)
        if not m:
            break
        out[m.group(3)] = float(m.group(2))
    return out


def longsteps_entries(text: str) -> List[Tuple[float, str]]:
    """(duration ms, the entry's text) per step printed by ``asprof longsteps``."""
    entries: List[Tuple[float, str]] = []
    for block in re.split(r"\n(?=#\d+ )", text):
        m = re.match(r"#\d+\s+([\d.]+) ms", block)
        if m:
            entries.append((float(m.group(1)), block))
    return entries


ENGINES = ["builtin", pytest.param("async-profiler", marks=pytest.mark.skipif(
    REAL_LIB is None, reason="async-profiler is not installed: its run of the workload is skipped"))]


@pytest.mark.parametrize("engine", ENGINES)
def test_routes_and_stalls(engine: str, tmp_path: Path) -> None:
    truth = run_service(engine, tmp_path)
    assert list(tmp_path.glob("*.jfr")), "no report written"
    # -- labels: each route's share of the routes' CPU, as the service timed it --
    cpu = truth["cpu"]
    total = cpu["/checkout"] + cpu["/search"]
    table = by_label_table(asprof_cli("top", str(tmp_path), "--cpu", "--by", "endpoint", "-n", "0"))
    assert "/checkout" in table and "/search" in table, table
    labelled = table["/checkout"] + table["/search"]
    # unlabelled: the event loop and HTTP parsing between requests (6-11% here)
    assert table.get("<none>", 0.0) < 25.0, table
    for route in ("/checkout", "/search"):
        got = 100.0 * table[route] / labelled
        want = 100.0 * cpu[route] / total
        assert abs(got - want) <= 3.0, (route, got, want, table, cpu)
    # -- steps: every injected stall, with the blocking call's frames, nothing shorter --
    stalls = truth["stalls"]
    assert stalls, truth
    text = asprof_cli("longsteps", str(tmp_path), "--min", "50ms", "--stack-depth", "60")
    entries = longsteps_entries(text)
    assert all(d >= 50.0 for d, _t in entries), text
    found = [d for d, block in entries if "blocking_call" in block]
    # every stall is listed with the blocking call's frames; its step lasts the stall plus the
    # request's own ms: >= 95% of the stalls have a step of their own within 10% of the blocking
    # call's duration as the service measured it (time.sleep can overshoot: the truth is what it took)
    timed = sorted(d / 1e6 for _t0, d in stalls)
    # (a step preempted right after a stall can show the stall's stack again: the built-in engine
    # repeats an idle-looking thread's last sleeping stack; so count the stall-long ones)
    # (>= 95% listed with the blocking call's frames, as the issue asks: with other work on the
    # machine the built-in engine's sampler has been seen to miss the sleeping stack of 1 in 22)
    long_enough = [d for d in found if d >= 0.95 * min(timed)]
    assert len(long_enough) >= 0.95 * len(stalls), (found, timed, text[:3000])
    # one step per stall: each stall takes the closest step not yet taken, within 10%
    left = sorted(found)
    matched = 0
    for t in timed:
        near = [d for d in left if abs(d - t) <= 0.1 * t]
        if near:
            left.remove(min(near, key=lambda d: abs(d - t)))
            matched += 1
    print(f"{engine}: {matched}/{len(stalls)} stalls matched, steps {found}, stalls {timed}")
    assert len(stalls) >= 20 and matched >= 0.95 * len(stalls), (matched, len(stalls), found, timed)
