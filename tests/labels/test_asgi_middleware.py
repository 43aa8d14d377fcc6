"""The ASGI labels middleware (issue #15): what an ASGI server and application rely on, for the C
call (``_ctx.ASGILabels``, where built) and the Python one alike: labels for the whole request
and only for it, whatever the application does (suspends, raises, returns, is cancelled), the
await protocol kept (send / throw / close), each task its own labels."""
from __future__ import annotations

import asyncio
import gc
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

import asprof
from asprof.context import _ctx, registry
from asprof.context import middleware as mw
from asprof.context.report import ContextEvents

IMPLS: List[Any] = [pytest.param(mw._PyASGILabels, id="python")]
if mw._CLabels is not None:
    IMPLS.append(pytest.param(mw._CLabels, id="c"))
else:  # pragma: no cover - the extension is built wherever the tests run in CI
    IMPLS.append(pytest.param(None, id="c", marks=pytest.mark.skip(reason="asprof.context._ctx not built")))


@pytest.fixture(autouse=True)
def hooked_loop() -> Iterator[None]:
    """As while profiling: the event loop's steps keep the thread's slot on the running task's
    labels (asprof.context.steps)."""
    ce = ContextEvents(steps=True, threshold_ns=10**12)
    ce.start()
    try:
        yield
    finally:
        ce.stop()


def slot() -> Dict[str, str]:
    """What a signal handler interrupting this thread now would record."""
    sid = _ctx.current_label()
    ls = registry.get(sid) if sid else None
    return dict(ls.pairs) if ls is not None else {}


def now() -> Dict[str, Any]:
    """The labels of the current context and of the thread's slot."""
    return {"var": asprof.get_labels(), "slot": slot()}


def http(path: str = "/items", method: str = "GET", **extra: Any) -> Dict[str, Any]:
    return {"type": "http", "path": path, "method": method, **extra}


def test_the_c_call_is_the_one_used_where_built() -> None:
    if mw._CLabels is None:
        pytest.skip("asprof.context._ctx not built")
    assert mw.ASGILabels is mw._CLabels
    m = mw.ASGILabels(lambda s, r, se: None)
    assert (m.key, m.method, m.route) == ("endpoint", True, mw.asgi_route)
    assert mw.ASGILabels.__module__ == "asprof.context.middleware"
    import inspect

    assert list(inspect.signature(mw.ASGILabels).parameters) == ["app", "route", "key", "method"]

    class Sub(mw.ASGILabels):  # type: ignore[misc,valid-type]
        pass

    seen: List[Dict[str, str]] = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(slot())

    asyncio.run(Sub(app, method=False)(http("/sub"), None, None))
    assert seen == [{"endpoint": "/sub"}]


@pytest.mark.parametrize("impl", IMPLS)
def test_labels_for_the_whole_request_across_suspensions(impl: Any) -> None:
    seen: List[Dict[str, Any]] = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> str:
        seen.append(now())
        await asyncio.sleep(0)
        seen.append(now())
        await send({"type": "http.response.start"})
        seen.append(now())
        return "done"

    sent: List[Any] = []

    async def send(msg: Any) -> None:
        await asyncio.sleep(0)
        sent.append(msg)

    async def main() -> Any:
        with asprof.labels(tenant="acme"):
            r = await impl(app)(http("/items", "POST"), None, send)
            after = now()
        return r, after

    r, after = asyncio.run(main())
    want = {"endpoint": "/items", "method": "POST", "tenant": "acme"}
    assert r == "done" and sent == [{"type": "http.response.start"}]
    assert seen == [{"var": want, "slot": want}] * 3
    assert after == {"var": {"tenant": "acme"}, "slot": {"tenant": "acme"}}
    assert now() == {"var": {}, "slot": {}}


@pytest.mark.parametrize("impl", IMPLS)
def test_each_concurrent_request_has_its_own(impl: Any) -> None:
    seen: Dict[str, List[Dict[str, Any]]] = {}

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        for _ in range(5):
            seen.setdefault(scope["path"], []).append(now())
            await asyncio.sleep(0)

    m = impl(app, method=False)

    async def main() -> None:
        # a task per request (created from the call: the labels are pushed in the task)
        await asyncio.gather(*(asyncio.ensure_future(m(http(f"/r{i}"), None, None)) for i in range(4)))

    asyncio.run(main())
    assert sorted(seen) == ["/r0", "/r1", "/r2", "/r3"]
    for path, got in seen.items():
        assert got == [{"var": {"endpoint": path}, "slot": {"endpoint": path}}] * 5


@pytest.mark.parametrize("impl", IMPLS)
def test_an_exception_goes_through_and_the_labels_are_popped(impl: Any) -> None:
    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        await asyncio.sleep(0)
        raise KeyError("boom")

    async def main() -> Dict[str, Any]:
        with pytest.raises(KeyError, match="boom") as ei:
            await impl(app)(http(), None, None)
        # the traceback still reaches the application's frame
        assert any(tb.tb_frame.f_code.co_name == "app" for tb in _walk(ei.value.__traceback__))
        return now()

    assert asyncio.run(main()) == {"var": {}, "slot": {}}


def _walk(tb: Any) -> List[Any]:
    out = []
    while tb is not None:
        out.append(tb)
        tb = tb.tb_next
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_cancelled_requests_pop_their_labels(impl: Any) -> None:
    started = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        started.append(now())
        await asyncio.sleep(30)

    async def request(m: Any) -> Dict[str, Any]:
        try:
            await m(http("/slow"), None, None)
        except asyncio.CancelledError:
            return now()  # (the task goes on after catching it: the labels must be gone)
        raise AssertionError("not cancelled")

    async def main() -> Dict[str, Any]:
        t = asyncio.ensure_future(request(impl(app, method=False)))
        await asyncio.sleep(0.01)
        t.cancel()
        return await t

    assert asyncio.run(main()) == {"var": {}, "slot": {}}
    assert started == [{"var": {"endpoint": "/slow"}, "slot": {"endpoint": "/slow"}}]


@pytest.mark.parametrize("impl", IMPLS)
def test_other_scopes_pass_through_unlabelled(impl: Any) -> None:
    seen: List[Dict[str, Any]] = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(now())

    m = impl(app)
    asyncio.run(m({"type": "lifespan"}, None, None))
    asyncio.run(m(http("/ws", type="websocket"), None, None))
    asyncio.run(m(http("/r", route="/r/{id}"), None, None))
    asyncio.run(m(http(""), None, None))  # an empty path is "/"
    assert [s["slot"] for s in seen] == [{}, {"endpoint": "/ws", "method": "GET"},
                                         {"endpoint": "/r/{id}", "method": "GET"}, {"endpoint": "/", "method": "GET"}]


@pytest.mark.parametrize("impl", IMPLS)
def test_route_function_and_key(impl: Any) -> None:
    seen: List[Dict[str, str]] = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(slot())

    def route(scope: Dict[str, Any]) -> str:
        return "/users/{id}" if scope["path"].startswith("/users/") else scope["path"]

    m = impl(app, route=route, key="route", method=False)
    for p in ("/users/1", "/users/2", "/other"):
        asyncio.run(m(http(p), None, None))
    assert seen == [{"route": "/users/{id}"}] * 2 + [{"route": "/other"}]
    with pytest.raises(ValueError):
        impl(app, key="")
    with pytest.raises(TypeError):
        impl(app, route="/fixed")
    assert impl(app, route=None).route is mw.asgi_route


@pytest.mark.parametrize("impl", IMPLS)
def test_nested_middlewares_compose(impl: Any) -> None:
    seen: List[Dict[str, str]] = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(slot())

    m = impl(impl(app, key="inner", method=False), key="outer")
    asyncio.run(m(http("/x", "PUT"), None, None))
    assert seen == [{"inner": "/x", "outer": "/x", "method": "PUT"}]


@pytest.mark.parametrize("impl", IMPLS)
def test_the_await_protocol(impl: Any) -> None:
    """A server may drive the request by hand: send, throw, close, as on a coroutine."""
    class Gate:
        def __await__(self) -> Any:
            got = yield "suspended"
            return got

    log: List[Any] = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> str:
        try:
            got = await Gate()
            log.append(("got", got, slot()))
            got = await Gate()
            return f"returned {got}"
        finally:
            log.append(("finally", slot()))

    m = impl(app, method=False)
    # send: values in, the application's value out as StopIteration.value
    c = m(http("/a"), None, None)
    assert c.send(None) == "suspended" and slot() == {"endpoint": "/a"}
    assert c.send(1) == "suspended"
    with pytest.raises(StopIteration) as si:
        c.send(2)
    assert si.value.value == "returned 2" and slot() == {}
    assert log == [("got", 1, {"endpoint": "/a"}), ("finally", {"endpoint": "/a"})]
    # throw: into the application, which may handle it; the labels popped when it ends
    log.clear()
    c = m(http("/b"), None, None)
    c.send(None)
    with pytest.raises(ZeroDivisionError):
        c.throw(ZeroDivisionError("x"))
    assert slot() == {} and log == [("finally", {"endpoint": "/b"})]
    # close: the application's finally runs; closing twice, or before starting, is harmless
    log.clear()
    c = m(http("/c"), None, None)
    c.send(None)
    c.close()
    c.close()
    assert slot() == {} and log == [("finally", {"endpoint": "/c"})]
    c = m(http("/d"), None, None)
    c.close()
    assert log == [("finally", {"endpoint": "/c"})] and slot() == {}  # never started: nothing ran
    with pytest.raises(RuntimeError):
        c.send(None)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_applications_give_clear_errors(impl: Any) -> None:
    def not_async(scope: Dict[str, Any], receive: Any, send: Any) -> int:
        return 3

    async def main(app: Callable[..., Any]) -> None:
        await impl(app)(http(), None, None)

    with pytest.raises(TypeError, match="await"):
        asyncio.run(main(not_async))
    assert slot() == {} and asprof.get_labels() == {}

    def broken(scope: Dict[str, Any], receive: Any, send: Any) -> Any:
        raise OSError("app factory failed")

    with pytest.raises(OSError, match="factory"):
        asyncio.run(main(broken))
    assert slot() == {} and asprof.get_labels() == {}


@pytest.mark.parametrize("impl", IMPLS)
def test_requests_cached_and_not_cached_give_the_same_labels(impl: Any) -> None:
    """The cache (route, method, current labels) never serves one request another's labels."""
    seen: List[Dict[str, str]] = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(slot())

    m = impl(app)
    want: List[Dict[str, str]] = []
    for outer in (None, "a", "b", None, "a"):
        for path, method in (("/x", "GET"), ("/x", "POST"), ("/y", "GET"), ("/x", "GET")):
            async def one(outer: Optional[str] = outer, path: str = path, method: str = method) -> None:
                if outer is None:
                    await m(http(path, method), None, None)
                else:
                    with asprof.labels(tenant=outer):
                        await m(http(path, method), None, None)
            asyncio.run(one())
            w = {"endpoint": path, "method": method}
            if outer is not None:
                w["tenant"] = outer
            want.append(w)
    assert seen == want


def test_abandoned_requests_are_collected() -> None:
    """A request whose task is dropped mid-way (its loop closed) is freed: no cycle kept alive."""
    import weakref

    class Marker:
        pass

    refs: List[Any] = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        m = Marker()
        refs.append(weakref.ref(m))
        await asyncio.sleep(30)

    for impl in (p.values[0] for p in IMPLS if p.values[0] is not None):
        loop = asyncio.new_event_loop()
        try:
            task = loop.create_task(impl(app)(http(), None, None))
            loop.run_until_complete(asyncio.sleep(0.01))
            assert not task.done()
        finally:
            loop.close()
        del task
    gc.collect()
    assert refs and all(r() is None for r in refs)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_route_function_returning_another_type(impl: Any) -> None:
    """Its text is the label (a list, unhashable, included); the request still runs."""
    seen: List[Dict[str, str]] = []

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(slot())

    for value in (7, ["a"]):
        asyncio.run(impl(app, route=lambda scope, v=value: v, method=False)(http(), None, None))
    assert seen == [{"endpoint": "7"}, {"endpoint": "['a']"}]
