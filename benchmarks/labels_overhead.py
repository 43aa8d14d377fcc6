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

On a shared machine those sequential runs differ by 10-25%; the numbers to trust come from
**same-CPU pairs**:

    python benchmarks/labels_overhead.py --pairs [--rounds 5] [--engine auto]
        [--workloads asyncio:/ping,asyncio:/search,wsgi:/ping] [--configs profiler/profiler,labels/profiler,labels/none]

Each pair: two servers (a configuration and its base) started together, every thread of both
pinned to one CPU (0 or 1 in turn) at nice -20, each loaded by its own generator process pinned
to the other CPU with the same number of requests (one connection, request/response in turn),
the two windows started together. The measure is each server's process CPU time (all threads:
the profiler's included) per request; printed per row: the median of the per-pair ratios to the
base, their IQR and the microseconds per request added; ``X/X`` is the A/A row (the method's
noise).
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
from typing import Callable, Dict, List, Tuple

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


# ---- same-CPU pairs (--pairs): the measure that holds on a noisy shared machine ----

#: A server of the pairs mode: the asyncio service (examples/labels_server.py) or the threaded
#: WSGI one, with a control thread on stdin: "cpu" -> "CPU <process CPU ns, all threads>".
PAIR_SERVER = r'''
import os, runpy, sys, threading, time
kind, config, engine, root, out = sys.argv[1:6]
def control():
    for line in sys.stdin:
        if line.strip() == "cpu":
            sys.stdout.write("CPU %d\n" % time.process_time_ns())
            sys.stdout.flush()
        else:
            break
    os._exit(0)
threading.Thread(target=control, daemon=True).start()
if kind == "asyncio":
    args = ["--out", out, "--engine", "none" if config == "none" else engine,
            "--cpu-interval", "0.01", "--wall-interval", "0.1"]
    # labels: the middleware + the step hook; mw: the middleware alone (the labels-only hook);
    # steps: the step hook alone; passmw: an empty ASGI middleware in its place (what any costs)
    # varmw: an empty middleware that sets and resets a ContextVar per request (the floor of any
    # contextvar-based request label)
    if config in ("passmw", "varmw"):
        import contextvars
        import asprof.context.middleware as mw
        var = contextvars.ContextVar("bench")
        class Pass:
            def __init__(self, app, **kw):
                self.app = app
            async def __call__(self, scope, receive, send):
                await self.app(scope, receive, send)
        class Var(Pass):
            async def __call__(self, scope, receive, send):
                t = var.set(scope["path"])
                try:
                    await self.app(scope, receive, send)
                finally:
                    var.reset(t)
        mw.ASGILabels = Pass if config == "passmw" else Var
    args += {"labels": [], "mw": ["--no-steps"], "steps": ["--no-labels"], "passmw": ["--no-steps"],
             "varmw": ["--no-steps"]}.get(
        config, ["--no-labels", "--no-steps"])
    sys.argv = [os.path.join(root, "examples", "labels_server.py")] + args
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    sys.argv = ["wsgi", engine, config]
    # (its main thread waits for ever: stdin is the control thread's)
    exec(os.environ["WSGI_SERVER"].replace("sys.stdin.readline()", "threading.Event().wait()"))
'''

#: A load generator of the pairs mode: ``conns`` keep-alive connections (one epoll loop) or, for
#: a server that closes after each response, ``conns`` threads with a connection per request.
#: ``warm`` requests, then "ready"; on a line "go", exactly ``n`` requests, then "done <s>".
PAIR_GEN = r'''
import re, selectors, socket, sys, threading, time
port, path, n, conns, keep, warm = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    sys.argv[5] == "1", int(sys.argv[6])
CL = re.compile(rb"Content-Length: (\d+)", re.I)
req = ("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path).encode()
def connect():
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s
socks = [connect() for _ in range(conns)] if keep else []
for s in socks:
    s.setblocking(False)
def run_keep(total):
    sel = selectors.DefaultSelector()
    bufs = {}
    sent = done = 0
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
        bufs[s] = b""
        if sent < total:
            s.send(req)
            sent += 1
    while done < total:
        for key, _ in sel.select():
            s = key.fileobj
            buf = bufs[s] + s.recv(65536)
            while True:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    break
                m = CL.search(buf, 0, i)
                end = i + 4 + (int(m.group(1)) if m else 0)
                if len(buf) < end:
                    break
                buf = buf[end:]
                done += 1
                if sent < total:
                    s.send(req)
                    sent += 1
            bufs[s] = buf
    sel.close()
def run_close(total):
    left = [total]
    lock = threading.Lock()
    def one():
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            s = connect()
            s.sendall(req)
            while s.recv(65536):
                pass
            s.close()
    ts = [threading.Thread(target=one) for _ in range(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
run = run_keep if keep else run_close
run(warm)
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
run(n)
print("done %.6f" % (time.perf_counter() - t0), flush=True)
'''

PAIR_NICE = -20


def _pinned(cpu: int) -> Callable[[], None]:
    """preexec_fn: every thread of the child on ``cpu`` (threads inherit it), at nice -20 where allowed."""
    def pre() -> None:
        os.sched_setaffinity(0, {cpu})
        try:
            os.setpriority(os.PRIO_PROCESS, 0, PAIR_NICE)
        except OSError:
            pass
    return pre


def _ask_cpu(proc: "subprocess.Popen[str]") -> int:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("cpu\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line.startswith("CPU "):
        raise RuntimeError(f"server answered {line!r}")
    return int(line.split()[1])


def run_pair(kind: str, path: str, configs: Tuple[str, str], engine: str, n: int, conns: int, cpu: int,
             out: str) -> List[float]:
    """Two servers (``configs``) started together, every thread of both on ``cpu``, each loaded by its
    own generator process on the other CPU with exactly ``n`` requests, the two windows started
    together. Returns each server's CPU ns per request (process CPU time: all its threads)."""
    other = 1 - cpu
    # glibc's malloc thresholds fixed for every server alike: left dynamic, asyncio's 256 KiB recv
    # buffers are mmapped/unmapped or the heap top trimmed and faulted back per request depending
    # on what else the process allocated (an unprofiled server measured 30% *more* CPU per request
    # than a profiled one, all of it page faults and TLB flushes)
    env = dict(os.environ, PYTHONPATH=ROOT, ROOT=ROOT, OUT=out, WSGI_SERVER=WSGI_SERVER,
               MALLOC_MMAP_THRESHOLD_="4194304", MALLOC_TRIM_THRESHOLD_="33554432")
    servers: List["subprocess.Popen[str]"] = []
    gens: List["subprocess.Popen[str]"] = []
    try:
        for c in configs:
            servers.append(subprocess.Popen([sys.executable, "-c", PAIR_SERVER, kind, c, engine, ROOT, out],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True, env=env,
                                            preexec_fn=_pinned(cpu)))
        ports = []
        for c, s in zip(configs, servers):
            assert s.stdout is not None
            m = re.match(r"PORT (\d+)", s.stdout.readline())
            if not m:
                raise RuntimeError(f"{kind}/{c}: the server did not start")
            ports.append(int(m.group(1)))
        keep = "1" if kind == "asyncio" else "0"
        warm = max(200, n // 10)
        for port in ports:
            gens.append(subprocess.Popen([sys.executable, "-c", PAIR_GEN, str(port), path, str(n), str(conns), keep,
                                          str(warm)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         preexec_fn=_pinned(other)))
        for g in gens:
            assert g.stdout is not None
            if g.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{kind}: a load generator failed")
        c0 = [_ask_cpu(s) for s in servers]
        for g in gens:
            assert g.stdin is not None
            g.stdin.write("go\n")
            g.stdin.flush()
        for g in gens:
            assert g.stdout is not None
            if not g.stdout.readline().startswith("done"):
                raise RuntimeError(f"{kind}: a load generator failed")
        c1 = [_ask_cpu(s) for s in servers]
        return [(b - a) / n for a, b in zip(c0, c1)]
    finally:
        for p in gens + servers:
            if p.poll() is None:
                p.kill()
            p.wait()


#: Requests per server per pair, by workload (about 1-2 s of one server's CPU).
PAIR_REQUESTS = {"asyncio:/ping": 15000, "asyncio:/search": 1200, "wsgi:/ping": 4000, "wsgi:/search": 1200}


def pairs_main(workloads: List[str], pairs: List[Tuple[str, str]], rounds: int, engine: str, conns: int,
               requests: int, out: str) -> None:
    import random

    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        print("SKIPPED: the pairs need CPUs 0 and 1")
        return
    rng = random.Random(15)
    print(f"same-CPU pairs: {rounds} rounds x {len(pairs)} pairs per workload, shuffled per round. A pair: two servers "
          "started together, every thread of both pinned to one CPU (0 or 1 in turn), each loaded by its own "
          "generator process on the other CPU with the same number of requests, windows started together; "
          f"nice {PAIR_NICE} where allowed (uid {os.getuid()}). The measure: server process CPU time (all threads) "
          "per request. Engine " + engine + ", CPU interval 10 ms, wall 100 ms.", flush=True)
    for wl in workloads:
        kind, path = wl.split(":", 1)
        n = requests or PAIR_REQUESTS.get(wl, 2000)
        res: Dict[Tuple[str, str], List[Tuple[float, float]]] = {p: [] for p in pairs}
        for r in range(rounds):
            order = list(pairs)
            rng.shuffle(order)
            for p in order:
                # the configuration under test first or second, in turn
                flip = (r // 2) % 2 == 1
                got = run_pair(kind, path, (p[1], p[0]) if flip else p, engine, n, conns, r % 2, out)
                x, base = (got[1], got[0]) if flip else (got[0], got[1])
                res[p].append((x, base))
                print(f"  {wl} round {r + 1} {p[0]:>8} vs {p[1]:<8} {x / 1e3:7.2f} vs {base / 1e3:7.2f} us CPU/req "
                      f"({(x / base - 1) * 100:+.2f}%)  load {os.getloadavg()[0]:.1f}", flush=True)

        def q(xs: List[float], f: float) -> float:
            ys = sorted(xs)
            return ys[min(len(ys) - 1, max(0, round(f * (len(ys) - 1))))]

        print(f"\n{wl}: {n} requests per server per pair, {rounds} pairs per row")
        print(f"  {'configuration':<20} {'us CPU/req':>10} {'base us':>8} {'vs base':>8} {'IQR %':>16} {'us/req added':>12}")
        for p in pairs:
            rs = [(x / b - 1) * 100 for x, b in res[p]]
            xs = statistics.median(x for x, _ in res[p]) / 1e3
            bs = statistics.median(b for _, b in res[p]) / 1e3
            added = statistics.median((x - b) / 1e3 for x, b in res[p])
            tag = " (A/A)" if p[0] == p[1] else ""
            print(f"  {p[0] + ' vs ' + p[1] + tag:<20} {xs:10.2f} {bs:8.2f} {statistics.median(rs):+7.2f}% "
                  f"{q(rs, .25):+7.2f} .. {q(rs, .75):+5.2f} {added:+12.3f}")
        print(flush=True)


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
    ap.add_argument("--conns", type=int, default=0,
                    help="connections per load generator (default 4; --pairs: 1, request/response in turn, so "
                         "every request wakes the server: the same path whatever the two servers' speeds)")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--only", default="micro,asyncio,wsgi")
    ap.add_argument("--pairs", action="store_true",
                    help="same-CPU pairs (the trustworthy measure on a shared machine): server CPU per request")
    ap.add_argument("--workloads", default="asyncio:/ping,asyncio:/search,wsgi:/ping",
                    help="--pairs: KIND:ROUTE,... (kind asyncio or wsgi; /ping: no work, /search: 1 ms of CPU)")
    ap.add_argument("--configs", default="profiler/profiler,labels/profiler,labels/none",
                    help="--pairs: X/BASE,... (none, profiler, labels; asyncio also mw: the middleware "
                         "without step events, steps: step events without the middleware, passmw: an empty ASGI "
                         "middleware: the floor of any middleware, varmw: the same setting a ContextVar per request); "
                         "X/X is the A/A row")
    ap.add_argument("--requests", type=int, default=0, help="--pairs: requests per server per pair")
    a = ap.parse_args()
    import shutil
    import tempfile

    out = tempfile.mkdtemp(prefix="asprof-bench-labels-")
    if a.pairs:
        try:
            pairs_main([w for w in a.workloads.split(",") if w],
                       [(c.split("/")[0], c.split("/")[1]) for c in a.configs.split(",") if c],
                       a.rounds, a.engine, a.conns or 1, a.requests, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return 0
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
            got = {c: run_one(kind, c, a.engine, a.route, a.seconds, a.conns or 4, out) for c in order}
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
