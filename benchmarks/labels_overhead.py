"""Overhead of request labels and asyncio step events (issue #15), one command:

    python benchmarks/labels_overhead.py [--rounds 5] [--seconds 3] [--route /ping] [--engine auto]

Two services under a loopback load generator (its own process, keep-alive connections):

- **asyncio**: examples/labels_server.py (an ASGI app on asyncio streams);
- **wsgi**: a threaded WSGI server (``wsgiref`` + ``ThreadingMixIn``, a thread per connection).

Configurations, each a fresh server process, run in a rotated order every round:
``none`` (no profiler), ``profiler`` (profiling, labels and step hooks off), ``labels``
(profiling + the labels middleware + the asyncio step hook). Printed: requests per second per
configuration (median over rounds) and the medians of the per-round ratios
``labels / profiler`` (target: within 2%) and ``profiler / none``. Not a test.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("none", "profiler", "labels")

WSGI_SERVER = r'''
import os, sys, time, threading
sys.path.insert(0, os.environ["ROOT"])
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIServer, WSGIRequestHandler, make_server
engine, config = sys.argv[1], sys.argv[2]

def burn(ms):
    end = time.thread_time() + ms / 1000.0
    while time.thread_time() < end:
        pass

def app(environ, start_response):
    if environ.get("PATH_INFO") == "/search":
        burn(1.0)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]

class Quiet(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass

class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

if config == "labels":
    from asprof.context.middleware import WSGILabels
    app = WSGILabels(app, method=False)
running = None
if config != "none":
    import asprof
    running = asprof.Profiler(reporter=asprof.LocalReporter(os.environ["OUT"]), reporting_interval=30.0,
        options=asprof.ProfilerOptions(engine=engine, asyncio_steps=config == "labels")).start()
srv = make_server("127.0.0.1", 0, app, server_class=Server, handler_class=Quiet)
print("PORT", srv.server_port, flush=True)
threading.Thread(target=srv.serve_forever, daemon=True).start()
sys.stdin.readline()
if running is not None:
    running.stop()
'''


def _client(port: int, path: str, seconds: float, conns: int, result: List[int], keepalive: bool = True) -> None:
    """``conns`` connections sending requests one after the other for ``seconds``; without
    ``keepalive`` (wsgiref closes after each response) a connection per request."""
    req = f"GET {path} HTTP/1.1\r\nHost: x\r\n{'' if keepalive else 'Connection: close' + chr(13) + chr(10)}\r\n".encode()
    counts = [0] * conns
    stop = time.monotonic() + seconds

    def connect() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def one(i: int) -> None:
        s = connect()
        buf = b""
        try:
            while time.monotonic() < stop:
                if not keepalive and counts[i]:
                    s.close()
                    s = connect()
                    buf = b""
                s.sendall(req)
                while True:
                    m = re.search(rb"Content-Length: (\d+)\r\n\r\n", buf, re.I)
                    if m and len(buf) >= m.end() + int(m.group(1)):
                        buf = buf[m.end() + int(m.group(1)):]
                        break
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                counts[i] += 1
        finally:
            s.close()

    ts = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    result.append(sum(counts))


def _cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process pid."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(kind: str, config: str, engine: str, path: str, seconds: float, conns: int,
            out: str) -> Tuple[float, float]:
    """(requests per second, server CPU microseconds per request)."""
    env = dict(os.environ, PYTHONPATH=ROOT, ROOT=ROOT, OUT=out)
    if kind == "asyncio":
        args = [sys.executable, os.path.join(ROOT, "examples", "labels_server.py"), "--out", out,
                "--engine", "none" if config == "none" else engine, "--cpu-interval", "0.01", "--wall-interval", "0.1"]
        if config != "labels":
            args += ["--no-labels", "--no-steps"]
    else:
        args = [sys.executable, "-c", WSGI_SERVER, engine, config]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        m = re.match(r"PORT (\d+)", proc.stdout.readline())
        if not m:
            raise RuntimeError(f"{kind}/{config}: the server did not start")
        port = int(m.group(1))
        warm: List[int] = []
        _client(port, path, 0.5, conns, warm, kind == "asyncio")
        got: List[int] = []
        # the client runs in this process, the server in its own (2 processes on 2 cores)
        c0 = _cpu(proc.pid)
        _client(port, path, seconds, conns, got, kind == "asyncio")
        c1 = _cpu(proc.pid)
        if kind == "asyncio":
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET /quit HTTP/1.1\r\n\r\n")
                    s.recv(100)
            except OSError:
                pass
        else:
            proc.stdin.write("\n")
            proc.stdin.flush()
        proc.wait(30)
        return got[0] / seconds, (c1 - c0) * 1e6 / max(1, got[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def micro(n: int = 20000, repeats: int = 7) -> None:
    """ns per event-loop step (a chain of call_soon callbacks) without and with the step hook,
    in this process; best of ``repeats``."""
    import asyncio

    from asprof.context import steps

    def bench() -> float:
        loop = asyncio.new_event_loop()
        left = [n]
        done = loop.create_future()

        def cb() -> None:
            left[0] -= 1
            if left[0]:
                loop.call_soon(cb)
            else:
                done.set_result(None)

        t0 = time.perf_counter_ns()
        loop.call_soon(cb)
        loop.run_until_complete(done)
        dt = (time.perf_counter_ns() - t0) / n
        loop.close()
        return dt

    results: Dict[str, List[float]] = {"off": [], "hook (labels only)": [], "hook + steps": []}
    for _ in range(repeats):
        results["off"].append(bench())
        steps.install(10**9, record=False)
        results["hook (labels only)"].append(bench())
        steps.uninstall()
        steps.install(10**9)
        results["hook + steps"].append(bench())
        steps.uninstall()
    base = min(results["off"])
    print("micro: ns per event-loop step (best of %d x %d steps)" % (repeats, n))
    for k, v in results.items():
        print(f"  {k:<20} {min(v):7.0f} ns  (+{min(v) - base:.0f} ns)")
    print(flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--route", default="/ping", help="/ping (no work: worst case) or /search (1 ms of CPU)")
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--only", default="micro,asyncio,wsgi")
    a = ap.parse_args()
    import tempfile

    out = tempfile.mkdtemp(prefix="asprof-bench-labels-")
    for kind in a.only.split(","):
        if kind == "micro":
            micro()
            continue
        rps: Dict[str, List[float]] = {c: [] for c in CONFIGS}
        cpr: Dict[str, List[float]] = {c: [] for c in CONFIGS}
        ratios: Dict[str, List[float]] = {"labels/profiler": [], "profiler/none": []}
        cratios: Dict[str, List[float]] = {"labels/profiler": [], "profiler/none": []}
        for r in range(a.rounds):
            order = CONFIGS[r % 3:] + CONFIGS[: r % 3]
            got = {c: run_one(kind, c, a.engine, a.route, a.seconds, a.conns, out) for c in order}
            for c in CONFIGS:
                rps[c].append(got[c][0])
                cpr[c].append(got[c][1])
            for k, (x, y) in (("labels/profiler", ("labels", "profiler")), ("profiler/none", ("profiler", "none"))):
                ratios[k].append(got[x][0] / got[y][0])
                cratios[k].append(got[x][1] / got[y][1])
            print(f"{kind} round {r + 1}: " + ", ".join(f"{c} {got[c][0]:.0f} req/s {got[c][1]:.0f} us CPU/req"
                                                     for c in order), flush=True)
        print(f"\n{kind} ({a.route}, engine {a.engine}, {a.rounds} rounds of {a.seconds:g} s):")
        for c in CONFIGS:
            print(f"  {c:<9} median {statistics.median(rps[c]):8.0f} req/s  {statistics.median(cpr[c]):7.1f} "
                  "us of server CPU per request")
        for title, rs in (("throughput", ratios), ("server CPU per request", cratios)):
            for k, v in rs.items():
                med = statistics.median(v)
                print(f"  {title:<22} {k:<16} median ratio {med:.4f} ({(med - 1) * 100:+.2f}%)  per round: "
                      + " ".join(f"{x:.3f}" for x in v))
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
