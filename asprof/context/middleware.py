"""WSGI and ASGI middleware that label each request's samples by route (issue #15).

    app = asprof.context.middleware.ASGILabels(app)                 # endpoint=<route>, method=GET
    app = asprof.context.middleware.WSGILabels(app, route=my_route)

The label is ``endpoint`` (``key=`` to change it) and, unless ``method=False``, ``method``.
The route is, by default, the framework's route template when the server or framework puts one
in the ASGI scope (``scope["route"].path``, as Starlette and FastAPI do once routed;
``scope["route"]`` when it is a string), else the raw path. Raw paths with ids in them
(``/users/123``) make one label set per id: pass ``route=`` (a function of the scope / the WSGI
environ returning the template) for those; past the per-report cap of distinct label sets the
samples are labelled ``asprof.overflow=true``.

Labels are set for the whole request: the ASGI application's coroutine runs in its own
context (a task per request, as ASGI servers do), the WSGI application inside
``asprof.labels`` on the worker thread, generator responses included.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, Iterable, Iterator, Optional, Tuple, cast

import asprof.context as _context
from asprof.context import (
    _KEYED_INNER_MAX,
    _KEYED_MAX,
    _VAR,
    _child,
    _keyed,
    _pop_token,
    _put_bounded,
    native_slot,
    push_keyed,
    registry,
)

__all__ = ["ASGILabels", "WSGILabels", "asgi_route", "wsgi_route"]

Scope = Dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[Any]]
WSGIApp = Callable[[Dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def asgi_route(scope: Scope) -> str:
    """The route template of an ASGI scope when known, else its path."""
    if "route" not in scope:
        p = scope.get("path")
        return p if isinstance(p, str) and p else "/"
    r = scope["route"]
    if isinstance(r, str) and r:
        return r
    path = getattr(r, "path", None) or getattr(r, "path_format", None)
    if isinstance(path, str) and path:
        return path
    p = scope.get("path")
    return p if isinstance(p, str) and p else "/"


def wsgi_route(environ: Dict[str, Any]) -> str:
    """The path of a WSGI request (``SCRIPT_NAME`` + ``PATH_INFO``)."""
    p = (environ.get("SCRIPT_NAME") or "") + (environ.get("PATH_INFO") or "")
    return p or "/"


class _PyASGILabels:
    """ASGI middleware: each HTTP / WebSocket request runs inside ``asprof.labels(endpoint=...)``.
    (The call in Python: the one used when the C extension is not built.)"""

    def __init__(self, app: ASGIApp, route: Optional[Callable[[Scope], str]] = None, key: str = "endpoint",
                 method: bool = True) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError("ASGILabels: the label key must be a non-empty str")
        if route is None:
            route = asgi_route
        elif not callable(route):
            raise TypeError("ASGILabels: route must be a function of the scope")
        self.app = app
        self.route = route
        self.key = key
        self.method = bool(method)
        self._plain_route = route is asgi_route

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> Any:
        t = scope.get("type")
        if t != "http" and t != "websocket":
            return await self.app(scope, receive, send)
        if self._plain_route and "route" not in scope:  # asgi_route inlined (a call per request)
            route = scope.get("path")
            if route.__class__ is not str or not route:
                route = asgi_route(scope)
        else:
            route = self.route(scope)
            if route.__class__ is not str:  # (its text is the label)
                route = str(route)
        method = scope.get("method") if self.method else None
        if method is not None and method.__class__ is not str:
            method = str(method)
        token = push_keyed((_ASGI, self.key, route, method), _kv(self.key, route, method))
        try:
            result = await self.app(scope, receive, send)
        except GeneratorExit:  # closed: maybe an abandoned request collected in another context
            try:
                _pop_token(_VAR, token)
            except ValueError:  # (that context is gone with its task)
                pass
            raise
        except BaseException:
            _pop_token(_VAR, token)
            raise
        _pop_token(_VAR, token)
        return result


_CLabels: Any = getattr(native_slot, "ASGILabels", None)
if TYPE_CHECKING or _CLabels is None:
    ASGILabels = _PyASGILabels
else:
    # In C (csrc/context/context.c), the same behaviour: calling it returns an awaitable that,
    # when first awaited, pushes the labels (a cached lookup and a ContextVar.set), runs the
    # application and pops them when it ends, with no Python frame of its own: an empty request
    # costs tens of microseconds, and the coroutine frame, attribute reads and try/finally of
    # the Python version were a few percent of it.
    ASGILabels = _CLabels

_CACHE_KEYS: Dict[Tuple[str, bool], object] = {}


def _cache_key(key: str, method: bool) -> object:
    """The C call's cache key for (label key, method on): one object each, hashed by address."""
    return _CACHE_KEYS.setdefault((key, bool(method)), object())


def _asgi_miss(mw: Any, route: Any, method: Any) -> Any:
    """The C call's miss: the labels of (route, method) pushed, and cached for its next requests
    in ``_keyed[mw's cache key][route][method][current set]`` (what the C call looks up)."""
    key = mw.key
    if route.__class__ is not str:  # a route function returning another type: its text is the label
        route = str(route)
    if method is not None and method.__class__ is not str:
        method = str(method)
    cur = _VAR.get()
    token = push_keyed(None, _kv(key, route, method))  # (cached below, where the C call looks)
    ls = _VAR.get()
    if _context._span_of is None and ls is not registry.overflow:
        # keyed[cache key][route]([method])[current set]: without the method level when off
        routes = _child(cast(Dict[Any, Any], _keyed), _cache_key(key, mw.method), _KEYED_MAX)
        sets = _child(routes, route, _KEYED_MAX)
        if mw.method:
            sets = _child(sets, method, _KEYED_INNER_MAX)
        _put_bounded(sets, cur, ls, _KEYED_INNER_MAX)
    return token


_ASGI = object()  # (markers: the keys of the pushes' cache never meet those of labels())
_WSGI = object()
if _CLabels is not None and native_slot is not None:
    native_slot.asgi_setup(_VAR, _keyed, _asgi_miss, asgi_route, _cache_key)


def _kv(key: str, route: object, method: object) -> Dict[str, object]:
    kv: Dict[str, object] = {key: route}
    if method:
        kv["method"] = method
    return kv


class WSGILabels:
    """WSGI middleware: each request (its call and its response iteration) runs inside
    ``asprof.labels(endpoint=...)``."""

    def __init__(self, app: WSGIApp, route: Callable[[Dict[str, Any]], str] = wsgi_route,
                 key: str = "endpoint", method: bool = True) -> None:
        self.app = app
        self.route = route
        self.key = key
        self.method = method

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        route = self.route(environ)
        method = environ.get("REQUEST_METHOD") if self.method else None
        key = (_WSGI, self.key, route, method)
        token = push_keyed(key, _kv(self.key, route, method))
        try:
            result = self.app(environ, start_response)
        finally:
            _pop_token(_VAR, token)
        if isinstance(result, (list, tuple)):  # nothing runs while it is iterated
            return result
        return _Labelled(result, key, _kv(self.key, route, method))


class _Labelled:
    """A WSGI response whose iteration (and close) runs with the request's labels."""

    def __init__(self, result: Iterable[bytes], key: Any, kv: Dict[str, object]) -> None:
        self._result = result
        self._key = key
        self._kv = kv

    def __iter__(self) -> Iterator[bytes]:
        it = iter(self._result)
        while True:
            token = push_keyed(self._key, self._kv)
            try:
                chunk = next(it)
            except StopIteration:
                return
            finally:
                _pop_token(_VAR, token)
            yield chunk

    def close(self) -> None:
        close = getattr(self._result, "close", None)
        if close is not None:
            token = push_keyed(self._key, self._kv)
            try:
                close()
            finally:
                _pop_token(_VAR, token)
