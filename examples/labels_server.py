"""A tiny ASGI service on asyncio streams (no dependency), labelled by route (issue #15).

    python examples/labels_server.py [--engine builtin|async-profiler|auto|none] [--out DIR]
                                     [--cpu-interval S] [--wall-interval S] [--no-steps] [--no-labels]

Prints ``PORT <n>`` on stdout once listening on 127.0.0.1. Routes (GET):

- ``/checkout``: burns ``CHECKOUT_MS`` of CPU; ``/search``: burns ``SEARCH_MS``;
- ``?stall=MS`` on any route: the handler also blocks the event loop for MS ms in
  ``blocking_call`` (``time.sleep``: an injected stall);
- ``/truth``: JSON of what the service measured: CPU seconds per route (thread CPU time of the
  whole request, what its labels cover), the stalls (monotonic start and duration, ns); ``/quit``: stops.

At ``/quit`` the profiler is stopped (its last report is written to ``--out``). Used by
tests/labels and benchmarks/labels_overhead.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, Awaitable, Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHECKOUT_MS = 4.0
SEARCH_MS = 1.0
ROUTES = {"/checkout": CHECKOUT_MS, "/search": SEARCH_MS}

cpu_by_route: Dict[str, float] = {r: 0.0 for r in ROUTES}
stalls: List[Tuple[int, int]] = []
requests = 0


def burn(ms: float) -> int:
    end = time.thread_time() + ms / 1000.0
    x = 0
    while time.thread_time() < end:
        for i in range(200):
            x += i * i
    return x


def blocking_call(ms: float) -> None:
    t0 = time.monotonic_ns()
    time.sleep(ms / 1000.0)
    stalls.append((t0, time.monotonic_ns() - t0))


async def app(scope: Dict[str, Any], receive: Callable[[], Awaitable[Any]],
              send: Callable[[Any], Awaitable[None]]) -> None:
    global requests
    path = scope["path"]
    query = dict(p.partition("=")[::2] for p in scope["query_string"].decode().split("&") if p)
    body = b"ok"
    if path in ROUTES:
        burn(ROUTES[path])
        requests += 1
        if "stall" in query:
            blocking_call(float(query["stall"]))
    elif path == "/truth":
        body = json.dumps({"cpu": cpu_by_route, "stalls": stalls, "requests": requests}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


async def serve_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     asgi: Callable[..., Awaitable[None]], stop: asyncio.Event) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            method, target, _ = line.decode("latin-1").split(" ", 2)
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            path, _, qs = target.partition("?")
            if path == "/quit":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                stop.set()
                break
            out: Dict[str, Any] = {}

            async def receive() -> Dict[str, Any]:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(msg: Dict[str, Any], out: Dict[str, Any] = out) -> None:
                out.setdefault("status", msg.get("status"))
                if msg["type"] == "http.response.body":
                    out["body"] = msg.get("body", b"")

            scope = {"type": "http", "method": method, "path": path, "query_string": qs.encode(), "headers": []}
            await asgi(scope, receive, send)
            b = out.get("body", b"")
            writer.write(b"HTTP/1.1 %d OK\r\nContent-Length: %d\r\n\r\n" % (out.get("status") or 200, len(b)) + b)
            await writer.drain()
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main_async(asgi: Callable[..., Awaitable[None]]) -> None:
    stop = asyncio.Event()
    server = await asyncio.start_server(lambda r, w: serve_conn(r, w, asgi, stop), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    async with server:
        await stop.wait()


def timed(inner: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """The truth: thread CPU time of each route's whole request (what its labels cover; the
    app never suspends inside, so no other task's CPU is counted)."""
    async def wrapper(scope: Dict[str, Any], receive: Callable[[], Awaitable[Any]],
                      send: Callable[[Any], Awaitable[None]]) -> None:
        t0 = time.thread_time()
        await inner(scope, receive, send)
        if scope["path"] in cpu_by_route:
            cpu_by_route[scope["path"]] += time.thread_time() - t0
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="builtin")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-interval", type=float, default=0.001)
    ap.add_argument("--wall-interval", type=float, default=0.01)
    ap.add_argument("--no-steps", action="store_true")
    ap.add_argument("--no-labels", action="store_true")
    ap.add_argument("--uvloop", action="store_true")
    a = ap.parse_args()
    asgi: Callable[..., Awaitable[None]] = app
    if not a.no_labels:
        from asprof.context.middleware import ASGILabels

        asgi = ASGILabels(app, method=False)
    asgi = timed(asgi)
    running = None
    if a.engine != "none":
        import asprof

        reporter = asprof.LocalReporter(a.out) if a.out else None
        profiler = asprof.Profiler(reporter=reporter, reporting_interval=600.0, options=asprof.ProfilerOptions(
            cpu_interval=a.cpu_interval, wall_interval=a.wall_interval, engine=a.engine,
            asyncio_steps=not a.no_steps))
        running = profiler.start()
    try:
        asyncio.run(main_async(asgi))
    finally:
        if running is not None:
            running.stop()


if __name__ == "__main__":
    main()
