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

from typing import Any, Awaitable, Callable, Dict, Iterable, Iterator

from asprof.context import _VAR, _keyed, _pop_token, _push_cached, push_keyed

__all__ = ["ASGILabels", "WSGILabels", "asgi_route", "wsgi_route"]

Scope = Dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
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


class ASGILabels:
    """ASGI middleware: each HTTP / WebSocket request runs inside ``asprof.labels(endpoint=...)``."""

    def __init__(self, app: ASGIApp, route: Callable[[Scope], str] = asgi_route, key: str = "endpoint",
                 method: bool = True) -> None:
        self.app = app
        self.route = route
        self.key = key
        self.method = method
        self._plain_route = route is asgi_route

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        t = scope.get("type")
        if t != "http" and t != "websocket":
            await self.app(scope, receive, send)
            return
        if self._plain_route and "route" not in scope:  # asgi_route inlined (a call per request)
            route = scope.get("path")
            if route.__class__ is not str or not route:
                route = asgi_route(scope)
        else:
            route = self.route(scope)
        method = scope.get("method") if self.method else None
        # the request's labels in one C call when this (route, method) was seen with the current
        # labels before (else computed and cached: push_keyed)
        key = (_ASGI, self.key, route, method)
        token = _push_cached(_VAR, _keyed, key)
        if token is None:
            token = push_keyed(key, _kv(self.key, route, method))
        try:
            await self.app(scope, receive, send)
        finally:
            _pop_token(_VAR, token)


_ASGI = object()  # (markers: the keys of the pushes' cache never meet those of labels())
_WSGI = object()


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
        token = _push_cached(_VAR, _keyed, key)
        if token is None:
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
