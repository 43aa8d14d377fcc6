"""Request labels (issue #15): which endpoint, tenant or trace each sample belongs to.

    with asprof.labels(endpoint="/checkout", tenant="acme"):
        handle(request)

    @asprof.labels(job="nightly-report")       # also a decorator (plain and async functions)
    def run_report(): ...

    asprof.set_labels(endpoint=route)          # frameworks: for the rest of the current context

Labels live in a :class:`contextvars.ContextVar`, so every asyncio task and every thread
carries its own: a task inherits the labels of the code that created it, and what a task sets
is invisible to the others. Every CPU and wall-clock sample records the label set active on
the thread it interrupted at that instant: the signal handler reads a per-thread slot
(``asprof.context._ctx``) that is kept in sync whenever the labels change and whenever the
event loop switches to another task (:mod:`asprof.context.steps`). The slot remembers which
``Context`` its labels belong to and the handler compares it with the thread's current one: a
context switch asprof did not see gives a sample without labels, never another task's.

Label sets are interned: each distinct set gets a small id (what samples carry). At most
:data:`MAX_NEW_SETS_PER_REPORT` new sets per reporting interval (more: those samples are
labelled ``asprof.overflow=true``, counted, and said once in the log); the registry forgets
sets no report used for two intervals once it holds more than :data:`MAX_SETS`.

Layer: with ``engines`` (the engines import it to write the definitions); imports only the
C extension and :mod:`asprof.errors`.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, TypeVar, cast

__all__ = [
    "labels", "set_labels", "reset_labels", "get_labels", "clear_labels", "LabelSet", "registry",
    "MAX_LABELS", "MAX_NEW_SETS_PER_REPORT", "MAX_SETS", "native_slot", "enable_otel",
]

log = logging.getLogger("asprof")

#: Labels in one set, at most.
MAX_LABELS = 16
#: Characters of a key / a value kept.
MAX_KEY = 64
MAX_VALUE = 200
#: New label sets per reporting interval, at most (the rest: the overflow set).
MAX_NEW_SETS_PER_REPORT = 2000
#: Label sets the registry keeps before forgetting those no report used for two intervals.
MAX_SETS = 20000
OVERFLOW_PAIRS: Tuple[Tuple[str, str], ...] = (("asprof.overflow", "true"),)

F = TypeVar("F", bound=Callable[..., Any])

try:
    from asprof.context import _ctx as _native_ctx

    native_slot: Optional[Any] = _native_ctx
    _set_native: Callable[[int], None] = _native_ctx.set_label
except ImportError:  # not built here: labels still apply to contexts, samples do not carry them
    native_slot = None

    def _set_native(id: int) -> None:
        return None


def _no_push_cached(var: Any, cache: Dict[Any, Any], key: Any) -> Any:
    return None


def _py_pop_token(var: Any, token: Any) -> None:
    var.reset(token)
    cur = var.get()
    _set_native(cur if cur is not None else 0)


#: push_cached(var, cache, key) -> Token or None (a miss): one C call for a cached push (an
#: extension built before it existed: always a miss)
_push_cached: Callable[[Any, Dict[Any, Any], Any], Any] = getattr(native_slot, "push_cached", _no_push_cached)
#: pop_token(var, token): var.reset(token) and the slot follows, in one C call
_pop_token: Callable[[Any, Any], None] = getattr(native_slot, "pop_token", _py_pop_token)


class LabelSet(int):
    """An interned label set: the int is its id (what samples record); ``pairs`` are its
    (key, value) pairs sorted by key. Immutable; compare by id."""

    pairs: Tuple[Tuple[str, str], ...]
    window: int

    def __repr__(self) -> str:
        return f"LabelSet({int(self)}, {dict(self.pairs)!r})"

    def as_dict(self) -> Dict[str, str]:
        """The labels as a dict (shared: do not modify it)."""
        d: Optional[Dict[str, str]] = self.__dict__.get("_dict")
        if d is None:
            d = self._dict = dict(self.pairs)
        return d


#: The label set of the current context (None: no labels).
_VAR: "contextvars.ContextVar[Optional[LabelSet]]" = contextvars.ContextVar("asprof.labels", default=None)


class _Registry:
    """Label sets by content and by id, bounded (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_pairs: Dict[Tuple[Tuple[str, str], ...], LabelSet] = {}
        self._by_id: Dict[int, LabelSet] = {}
        self._next = 2
        self.window = 0
        self.new_in_window = 0
        self.overflowed = 0  # lookups that got the overflow set, since the start
        self._warned = False
        self.overflow = self._make(1, OVERFLOW_PAIRS)

    def _make(self, sid: int, pairs: Tuple[Tuple[str, str], ...]) -> LabelSet:
        ls = LabelSet(sid)
        ls.pairs = pairs
        ls.window = self.window
        self._by_pairs[pairs] = ls
        self._by_id[sid] = ls
        return ls

    def intern(self, pairs: Tuple[Tuple[str, str], ...]) -> LabelSet:
        ls = self._by_pairs.get(pairs)
        if ls is not None:
            ls.window = self.window
            return ls
        with self._lock:
            ls = self._by_pairs.get(pairs)
            if ls is not None:
                return ls
            if self.new_in_window >= MAX_NEW_SETS_PER_REPORT:
                self.overflowed += 1
                if not self._warned:
                    self._warned = True
                    log.warning("asprof: more than %d distinct label sets in one reporting interval: "
                                "the samples of the others are labelled asprof.overflow=true "
                                "(labels with unbounded values such as ids make poor labels)",
                                MAX_NEW_SETS_PER_REPORT)
                return self.overflow
            self.new_in_window += 1
            sid = self._next
            self._next = sid + 1 if sid < 0xFFFFFFFE else 2
            return self._make(sid, pairs)

    def get(self, sid: int) -> Optional[LabelSet]:
        return self._by_id.get(sid)

    def resolve(self, ids: Iterable[int]) -> List[Tuple[int, Tuple[Tuple[str, str], ...]]]:
        """(id, pairs) of the ids known; marks them used in this interval."""
        out = []
        w = self.window
        for sid in ids:
            ls = self._by_id.get(sid)
            if ls is not None:
                ls.window = w
                out.append((sid, ls.pairs))
        return out

    def recent(self) -> List[int]:
        """Ids of the sets used or created in this interval and the previous one."""
        w = self.window
        return [sid for sid, ls in list(self._by_id.items()) if ls.window >= w - 1 and sid != 1]

    def rotate(self) -> None:
        """A report was written: a new interval (new-set budget), old sets forgotten if many."""
        with self._lock:
            self.window += 1
            self.new_in_window = 0
            if len(self._by_id) > MAX_SETS:
                _merge_cache.clear()
                _keyed.clear()
                keep = self.window - 2
                for sid, ls in list(self._by_id.items()):
                    if ls.window < keep and sid != 1:
                        del self._by_id[sid]
                        self._by_pairs.pop(ls.pairs, None)

    def __len__(self) -> int:
        return len(self._by_id)


registry = _Registry()


def _text(v: object, cap: int) -> str:
    s = v if isinstance(v, str) else str(v)
    return s if len(s) <= cap else s[:cap]


_merge_cache: Dict[Tuple[int, Tuple[Tuple[str, object], ...]], Optional[LabelSet]] = {}
_MERGE_CACHE_MAX = 4096

#: The pushes' cache, read by the C fast path (``_push_cached``): {key: {the current set (or
#: None): the set to push}}, a key standing for the labels pushed (the labels' items, or a
#: middleware's (marker, label key, route, method)). Filled by :func:`push_keyed` on a miss;
#: emptied when the registry forgets sets, when OpenTelemetry ids are on (span ids differ per
#: push: never cached) and when a first-use hook is set (so the next push runs it).
_keyed: Dict[Any, Dict[Optional[LabelSet], Optional[LabelSet]]] = {}
_KEYED_MAX = 4096
_KEYED_INNER_MAX = 256


def _merged(cur: Optional[LabelSet], kv: Dict[str, object]) -> Optional[LabelSet]:
    """The label set of ``cur`` updated with ``kv`` (a value None removes the key); the
    result of the same (current set, labels) is cached."""
    items = _key_of(kv)  # (with the values' types: 1 and True are equal keys, not equal labels)
    if items is None:  # an unhashable value: no caching
        return _merge(cur, kv)
    key = (int(cur) if cur is not None else 0, items)
    got = _merge_cache.get(key, _MISSING)
    if got is not _MISSING:
        return got  # type: ignore[no-any-return]
    ls = _merge(cur, kv)
    if len(_merge_cache) >= _MERGE_CACHE_MAX:
        _merge_cache.clear()
    if ls is not registry.overflow:
        _merge_cache[key] = ls
    return ls


_MISSING: Any = object()


def _merge(cur: Optional[LabelSet], kv: Dict[str, object]) -> Optional[LabelSet]:
    d: Dict[str, str] = dict(cur.pairs) if cur is not None else {}
    for k, v in kv.items():
        if v is None:
            d.pop(k, None)
        else:
            d[_text(k, MAX_KEY)] = _text(v, MAX_VALUE)
    if not d:
        return None
    if len(d) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels per set, got {len(d)}")
    return registry.intern(tuple(sorted(d.items())))


_span_of: Optional[Callable[[], Any]] = None  # opentelemetry.trace.get_current_span, when enabled


def enable_otel(on: bool) -> bool:
    """``ProfilerOptions(otel_span_ids=True)``: ``labels()`` blocks entered while an
    OpenTelemetry span is active also get its ``trace_id`` and ``span_id`` (hex). False, with
    one log line, when ``opentelemetry`` is not importable."""
    global _span_of
    if not on:
        _span_of = None
        return False
    try:
        from opentelemetry import trace  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        log.info("asprof: otel_span_ids is on but opentelemetry is not importable: no span ids in labels")
        _span_of = None
        return False
    _span_of = trace.get_current_span
    _keyed.clear()
    return True


def _with_span(kv: Dict[str, object]) -> Dict[str, object]:
    try:
        sc = _span_of().get_span_context()  # type: ignore[misc]
        if not getattr(sc, "is_valid", False):
            return kv
        out = dict(kv)
        out.setdefault("trace_id", format(sc.trace_id, "032x"))
        out.setdefault("span_id", format(sc.span_id, "016x"))
        return out
    except Exception:  # noqa: BLE001 - a broken tracer never breaks the application
        return kv


def _check_keys(kv: Dict[str, object]) -> None:
    for k in kv:
        if not k:
            raise ValueError("label keys must be non-empty")


#: Called once at the first use of labels (then cleared): with ``asyncio_steps=False`` the
#: event-loop hook that keeps the slot in sync with task switches is installed only then.
on_first_use: Optional[Callable[[], None]] = None


def set_on_first_use(hook: Optional[Callable[[], None]]) -> None:
    """Sets :data:`on_first_use` (and empties the pushes' cache, whose hits skip it)."""
    global on_first_use
    on_first_use = hook
    if hook is not None:
        _keyed.clear()


def _apply(ls: Optional[LabelSet]) -> "contextvars.Token[Optional[LabelSet]]":
    global on_first_use
    if on_first_use is not None:
        hook, on_first_use = on_first_use, None
        try:
            hook()
        except Exception:  # noqa: BLE001 - never into the application
            log.debug("asprof: the labels' event-loop hook failed", exc_info=True)
    token = _VAR.set(ls)
    _set_native(ls if ls is not None else 0)
    return token


def _restore(token: "contextvars.Token[Optional[LabelSet]]") -> None:
    _pop_token(_VAR, token)


class labels:
    """``with labels(k=v, ...)``: these labels (added to the current ones) for the block; also a
    decorator for functions and coroutine functions. A value of None removes that key."""

    __slots__ = ("_kv", "_key", "_tokens")

    def __init__(self, **kv: object) -> None:
        if "" in kv:
            raise ValueError("label keys must be non-empty")
        self._kv = kv
        self._key: Any = _key_of(kv)
        self._tokens: Optional[List["contextvars.Token[Optional[LabelSet]]"]] = None

    def __enter__(self) -> Dict[str, str]:
        """The labels now in force (a shared dict: read it, do not modify it)."""
        key = self._key
        tok = None if key is None else _push_cached(_VAR, _keyed, key)
        if tok is None:
            tok = push_keyed(key, self._kv)
        if self._tokens is None:
            self._tokens = [tok]
        else:
            self._tokens.append(tok)
        ls = tok.var.get()
        return ls.as_dict() if ls is not None else {}

    def __exit__(self, *exc: object) -> None:
        if self._tokens:
            _restore(self._tokens.pop())

    def __call__(self, fn: F) -> F:
        kv = self._kv
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with labels(**kv):
                    return await fn(*args, **kwargs)
            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with labels(**kv):
                return fn(*args, **kwargs)
        return cast(F, wrapper)


def _key_of(kv: Dict[str, object]) -> Any:
    """The pushes' cache key of ``kv``: its items, a value not a str with its type (1, 1.0 and
    True are equal keys but different labels); None when a value is not hashable."""
    key = tuple((k, v) if v.__class__ is str else (k, v, v.__class__) for k, v in kv.items())
    try:
        hash(key)
    except TypeError:
        return None
    return key


def push_keyed(key: Any, kv: Dict[str, object]) -> "contextvars.Token[Optional[LabelSet]]":
    """``kv`` added to the current labels, ``key`` standing for ``kv`` (hashable: the same key
    always means the same labels; None: not cached); undo with :func:`pop`. A hit is one C call
    (``_push_cached``); callers on a hot path try that first themselves."""
    if key is not None and _span_of is None:
        tok: Optional["contextvars.Token[Optional[LabelSet]]"] = _push_cached(_VAR, _keyed, key)
        if tok is not None:
            return tok
    cur = _VAR.get()
    if _span_of is not None:
        return _apply(_merged(cur, _with_span(kv)))
    ls = _merged(cur, kv)
    if key is not None and ls is not registry.overflow:
        _put_bounded(_child(_keyed, key, _KEYED_MAX), cur, ls, _KEYED_INNER_MAX)
    return _apply(ls)


def _child(d: Dict[Any, Any], key: Any, cap: int) -> Dict[Any, Any]:
    """``d[key]``, a dict, created when missing (``d`` emptied first when it holds ``cap``)."""
    got = d.get(key)
    if got is None:
        if len(d) >= cap:
            d.clear()
        got = d[key] = {}
    return got


def _put_bounded(d: Dict[Any, Any], key: Any, value: Any, cap: int) -> None:
    """``d[key] = value``, ``d`` emptied first when it holds ``cap``."""
    if len(d) >= cap:
        d.clear()
    d[key] = value


def push(kv: Dict[str, object]) -> "contextvars.Token[Optional[LabelSet]]":
    """The fast path of ``labels``/``set_labels`` (no key check): ``kv`` added to the current
    labels; undo with :func:`pop`."""
    return push_keyed(_key_of(kv), kv)


def pop(token: "contextvars.Token[Optional[LabelSet]]") -> None:
    """Undoes a :func:`push` (one C call where built)."""
    _restore(token)


def set_labels(**kv: object) -> "contextvars.Token[Optional[LabelSet]]":
    """Adds these labels to the current context until it ends (or :func:`reset_labels` with the
    token returned). For frameworks that run each request in its own context (an asyncio task,
    a ``contextvars.copy_context().run``)."""
    _check_keys(kv)
    return _apply(_merged(_VAR.get(), kv if _span_of is None else _with_span(kv)))


def reset_labels(token: "contextvars.Token[Optional[LabelSet]]") -> None:
    """Undoes the :func:`set_labels` that returned ``token``."""
    _restore(token)


def clear_labels() -> "contextvars.Token[Optional[LabelSet]]":
    """No labels in the current context (until reset with the token returned)."""
    return _apply(None)


def get_labels() -> Dict[str, str]:
    """The labels of the current context."""
    cur = _VAR.get()
    return dict(cur.pairs) if cur is not None else {}


def current_set() -> Optional[LabelSet]:
    return _VAR.get()
