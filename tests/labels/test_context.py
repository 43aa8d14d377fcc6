"""asprof.labels and friends (issue #15): contextvars semantics, the C slot the signal handlers
read, the step hook, the bounded registry, the event payloads, the middleware."""
from __future__ import annotations

import asyncio
import asyncio.events
import logging
import threading
import time
from typing import Any, Dict, List

import pytest

import asprof
from asprof import context as ctxmod
from asprof.context import _ctx, labels, registry, steps
from asprof.context.middleware import ASGILabels, WSGILabels
from asprof.jfrio import ctxevents


def slot_labels() -> Dict[str, str]:
    """What a signal handler interrupting this thread now would record, as a dict."""
    sid = _ctx.current_label()
    ls = registry.get(sid) if sid else None
    return dict(ls.pairs) if ls is not None else {}


def test_with_nests_and_restores() -> None:
    assert asprof.get_labels() == {}
    with asprof.labels(endpoint="/a", tenant="acme") as got:
        assert got == {"endpoint": "/a", "tenant": "acme"}
        assert slot_labels() == got
        with labels(endpoint="/b", tenant=None):
            assert asprof.get_labels() == {"endpoint": "/b"}
            assert slot_labels() == {"endpoint": "/b"}
        assert slot_labels() == {"endpoint": "/a", "tenant": "acme"}
    assert asprof.get_labels() == {} and _ctx.current_label() == 0


def test_same_labels_same_id_values_are_strings() -> None:
    with labels(a=1, b="x") as d1:
        i1 = _ctx.current_label()
    with labels(b="x", a="1") as d2:
        i2 = _ctx.current_label()
    assert d1 == d2 == {"a": "1", "b": "x"} and i1 == i2 != 0


def test_decorator_sync_and_async() -> None:
    @labels(job="sync")
    def f() -> Dict[str, str]:
        return asprof.get_labels()

    @labels(job="async")
    async def g() -> Dict[str, str]:
        await asyncio.sleep(0)
        return slot_labels()

    assert f() == {"job": "sync"}
    assert asyncio.run(g()) == {"job": "async"}
    assert asprof.get_labels() == {}


def test_set_and_reset() -> None:
    tok = asprof.set_labels(endpoint="/x")
    assert slot_labels() == {"endpoint": "/x"}
    asprof.reset_labels(tok)
    assert slot_labels() == {}


def test_bad_keys_and_too_many() -> None:
    with pytest.raises(ValueError):
        labels(**{"": "x"})
    with pytest.raises(ValueError):
        with labels(**{f"k{i}": i for i in range(ctxmod.MAX_LABELS + 1)}):
            pass


def test_each_thread_has_its_own() -> None:
    seen: Dict[str, Dict[str, str]] = {}
    barrier = threading.Barrier(2)

    def run(name: str) -> None:
        with labels(worker=name):
            barrier.wait()
            time.sleep(0.01)
            seen[name] = slot_labels()

    ts = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert seen == {"a": {"worker": "a"}, "b": {"worker": "b"}}


def test_tasks_switching_under_the_step_hook() -> None:
    """Each task step sees its own task's labels in the slot; without the hook a switch is seen
    as 'no labels' (the Context check), never as the other task's."""
    assert steps.install(10**9)
    try:
        seen: List[tuple] = []

        async def worker(name: str) -> None:
            with labels(task=name):
                for _ in range(5):
                    seen.append((name, slot_labels().get("task")))
                    await asyncio.sleep(0)

        async def main() -> None:
            await asyncio.gather(*(worker(f"t{i}") for i in range(4)))

        asyncio.run(main())
        assert seen and all(a == b for a, b in seen), seen
    finally:
        steps.uninstall()
    # unhooked: a task resumed after another one set its labels is never given the other's
    seen2: List[tuple] = []

    async def worker2(name: str) -> None:
        with labels(task=name):
            for _ in range(5):
                seen2.append((name, slot_labels().get("task")))
                await asyncio.sleep(0)

    async def main2() -> None:
        await asyncio.gather(*(worker2(f"t{i}") for i in range(4)))

    asyncio.run(main2())
    assert all(b in (a, None) for a, b in seen2), seen2


def test_simulated_sample_counts_and_reads_label() -> None:
    n0 = _ctx.thread_samples()
    with labels(x="1"):
        sid = _ctx.simulate_sample()
    assert registry.get(sid) is not None and dict(registry.get(sid).pairs) == {"x": "1"}  # type: ignore[union-attr]
    assert _ctx.thread_samples() == n0 + 1


def test_steps_recorded_when_long_or_sampled() -> None:
    steps.drain()
    assert steps.install(20_000_000)  # 20 ms
    try:
        async def main() -> None:
            async def short() -> None:
                await asyncio.sleep(0)

            async def long() -> None:
                with labels(route="/slow"):
                    time.sleep(0.03)

            async def sampled() -> None:
                _ctx.simulate_sample()  # as a handler would during the step

            await asyncio.gather(short(), long(), sampled())

        asyncio.run(main())
        recs, dropped = steps.drain()
    finally:
        steps.uninstall()
    assert dropped == 0
    names = [r[5] for r in recs]
    assert any("long" in n for n in names) and any("sampled" in n for n in names), names
    assert not any(" short" in n for n in names), names
    long_rec = next(r for r in recs if "long" in r[5])
    tid, start, end, _n, label, _name = long_rec
    assert tid == threading.get_native_id() and end - start >= 30_000_000
    assert dict(registry.get(label).pairs) == {"route": "/slow"}  # type: ignore[union-attr]
    assert not steps.installed()
    assert asyncio.events.Handle._run.__qualname__ == "Handle._run" and \
        asyncio.events.Handle._run.__module__ == "asyncio.events"


def test_registry_caps_new_sets_per_report(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ctxmod, "MAX_NEW_SETS_PER_REPORT", 5)
    registry.rotate()
    with caplog.at_level(logging.WARNING, logger="asprof"):
        got = []
        for i in range(8):
            with labels(user=f"u{i}-{id(got)}") as d:
                got.append(d)
        registry.rotate()
        with labels(user=f"after-{id(got)}") as after:
            pass
    assert got[4] != {"asprof.overflow": "true"} and got[5:] == [{"asprof.overflow": "true"}] * 3
    assert after == {"user": f"after-{id(got)}"}
    assert sum("distinct label sets" in r.getMessage() for r in caplog.records) <= 1


def test_payloads_round_trip_and_bounded() -> None:
    sets = [(i, (("endpoint", f"/r{i}" * 100), ("tenant", "é"))) for i in range(2, 40)]
    payloads = ctxevents.encode_label_sets(sets)
    assert all(len(p) <= ctxevents.MAX_PAYLOAD for p in payloads) and len(payloads) > 1
    back: Dict[int, Any] = {}
    for p in payloads:
        back.update(ctxevents.decode_label_sets(p))
    assert back[2][1] == ("tenant", "é") and len(back[2][0][1].encode()) <= ctxevents.MAX_TEXT
    recs = [(7, 10**9 + i, 0, 10**9 + i, i % 3 + 1) for i in range(500)]
    assert [tuple(r) for p in ctxevents.encode_sample_labels(recs) for r in ctxevents.decode_sample_labels(p)] == recs
    st = [(7, 1000, 5000, 2, 3, "task Task-1 main")]
    (s1,) = [s for p in ctxevents.encode_steps(10**18, st) for s in ctxevents.decode_steps(p)]
    assert (s1.start_ns, s1.duration_ns, s1.samples, s1.label, s1.name) == (10**18 + 1000, 4000, 2, 3, st[0][5])
    with pytest.raises(ValueError):
        ctxevents.decode_steps(b"\x09abc")


def test_asgi_middleware_labels_by_route() -> None:
    seen: List[Dict[str, str]] = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(slot_labels())

    class Route:
        path = "/users/{id}"

    mw = ASGILabels(app)
    asyncio.run(mw({"type": "http", "path": "/users/7", "method": "GET", "route": Route()}, None, None))
    asyncio.run(mw({"type": "http", "path": "/health", "method": "POST"}, None, None))
    asyncio.run(mw({"type": "lifespan"}, None, None))
    assert seen == [{"endpoint": "/users/{id}", "method": "GET"}, {"endpoint": "/health", "method": "POST"}, {}]


def test_wsgi_middleware_covers_the_response_iteration() -> None:
    seen: List[Dict[str, str]] = []

    def app(environ: Dict[str, Any], start_response: Any) -> Any:
        seen.append(slot_labels())

        def body() -> Any:
            seen.append(slot_labels())
            yield b"x"
        return body()

    mw = WSGILabels(app, route=lambda env: "/items/{id}", method=False)
    assert list(mw({"PATH_INFO": "/items/3"}, lambda *a: None)) == [b"x"]
    assert seen == [{"endpoint": "/items/{id}"}] * 2
    assert slot_labels() == {}


def test_otel_span_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """otel_span_ids: labels() blocks get the active span's ids; off without opentelemetry."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # not importable
    assert ctxmod.enable_otel(True) is False
    span = types.SimpleNamespace(get_span_context=lambda: types.SimpleNamespace(
        is_valid=True, trace_id=0xABC, span_id=0x12))
    trace = types.ModuleType("opentelemetry.trace")
    trace.get_current_span = lambda: span  # type: ignore[attr-defined]
    pkg = types.ModuleType("opentelemetry")
    pkg.trace = trace  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "opentelemetry", pkg)
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", trace)
    try:
        assert ctxmod.enable_otel(True) is True
        with labels(endpoint="/x") as d:
            assert d == {"endpoint": "/x", "trace_id": f"{0xABC:032x}", "span_id": f"{0x12:016x}"}
    finally:
        ctxmod.enable_otel(False)
    with labels(endpoint="/x") as d:
        assert d == {"endpoint": "/x"}


def test_without_step_events_the_hook_comes_with_the_first_labels() -> None:
    """asyncio_steps=False: no step is recorded, but once labels are used the event loop is
    hooked so that each task's samples still get its own labels."""
    from asprof.context.report import ContextEvents

    ce = ContextEvents(steps=False, threshold_ns=1)
    ce.start()
    try:
        assert not steps.installed()
        seen: List[tuple] = []

        async def worker(name: str) -> None:
            with labels(task=name):
                for _ in range(3):
                    seen.append((name, slot_labels().get("task")))
                    await asyncio.sleep(0)

        async def main() -> None:
            await asyncio.gather(*(worker(f"t{i}") for i in range(3)))

        asyncio.run(main())
        assert steps.installed() and all(a == b for a, b in seen), seen
        assert steps.drain() == ([], 0)  # threshold 1 ns: would have recorded every step
    finally:
        ce.stop()
    assert not steps.installed() and ctxmod.on_first_use is None


def test_cached_pushes_follow_the_current_labels_and_value_types() -> None:
    # the pushes' cache is keyed by the labels and the current set: the same labels() object
    # entered under different outer labels, and equal values of different types (1, True, 1.0),
    # each give their own set, on the slot too
    inner = labels(x=1)
    for outer in ("a", "b", "a"):
        with labels(outer=outer):
            with inner as got:
                assert got == {"outer": outer, "x": "1"} and slot_labels() == got
            assert slot_labels() == {"outer": outer}
    for v, text in ((1, "1"), (True, "True"), (1.0, "1.0"), (1, "1")):
        with labels(x=v) as got:
            assert got == {"x": text} and slot_labels() == {"x": text}
    assert _ctx.current_label() == 0


def test_step_hook_keeps_asyncio_exception_handling() -> None:
    # the C hook runs the step itself: a callback's exception still reaches the loop's exception
    # handler as without asprof (same message, exception and handle), KeyboardInterrupt still
    # stops the loop, and the handle keeps its Context
    def run() -> List[Any]:
        got: List[Any] = []
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(lambda _l, c: got.append((c["message"], c["exception"].args, c["handle"])))

        def bad(x: int) -> None:
            raise ValueError(x)

        def interrupt() -> None:
            raise KeyboardInterrupt

        h = loop.call_soon(bad, 7)
        loop.call_soon(loop.stop)
        loop.run_forever()
        loop.call_soon(interrupt)
        with pytest.raises(KeyboardInterrupt):
            loop.run_forever()
        loop.close()
        assert got and got[0][2] is h and type(h._context).__name__ == "Context"
        return [(m.split(" at ")[0], a) for m, a, _h in got]

    without = run()
    steps.install(10**9)
    try:
        assert type(asyncio.events.Handle.__dict__["_run"]).__name__ == "method_descriptor"  # the C hook
        hooked = run()
    finally:
        steps.uninstall()
    # the message as this Python version writes it (3.14 leaves the arguments out unless in debug mode)
    assert hooked == without
    assert len(without) == 1 and without[0][1] == (7,)
    assert without[0][0].startswith("Exception in callback test_step_hook_keeps_asyncio_exception_handling."
                                    "<locals>.run.<locals>.bad(")
