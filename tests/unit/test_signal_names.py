"""engines/signals.py without signals (issue #13): owners in words, one WARNING per signal, the
wall-clock signal among async-profiler's."""
from __future__ import annotations

import logging
import signal

import pytest

from asprof.engines import signals as S

SIGSTKFLT = getattr(signal, "SIGSTKFLT", 16)


def test_owner_in_words() -> None:
    assert S.owner({"kind": "default"}) == "the default action (SIG_DFL)"
    assert S.owner({"kind": "ignore"}) == "SIG_IGN (ignored)"
    assert S.owner({"kind": "handler", "asprof": True}) == "asprof"
    native = S.owner({"kind": "handler", "object": "/lib/libc.so.6", "symbol": "getpid", "address": 1})
    assert native == "a native handler (getpid in /lib/libc.so.6)"
    assert S.owner({"kind": "handler", "address": 0x1234}) == "a native handler (address 0x1234)"
    assert S.owner({"kind": "handler", "python": True}) == "a Python signal.signal() handler"


def test_a_python_handler_is_named_by_its_function() -> None:
    def on_tick(signum: int, frame: object) -> None:
        pass

    old = signal.signal(signal.SIGUSR2, on_tick)
    try:
        who = S.owner({"kind": "handler", "python": True}, int(signal.SIGUSR2))
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert who.startswith("a Python signal.signal() handler (") and "on_tick" in who, who


def test_one_warning_per_signal_and_process(caplog: pytest.LogCaptureFixture) -> None:
    S._warned.clear()
    c = S.Conflicts()
    with caplog.at_level(logging.INFO, logger="asprof"):
        c.report(int(signal.SIGPROF), "first")
        c.report(int(signal.SIGPROF), "second")
        c.report(int(signal.SIGVTALRM), "third")
    levels = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "asprof"]
    assert levels == [("WARNING", "first"), ("INFO", "second"), ("WARNING", "third")]
    assert c.count == 3
    S._warned.clear()


@pytest.mark.parametrize("held, wall, expected", [
    ([signal.SIGPROF, signal.SIGVTALRM], True, signal.SIGVTALRM),   # the usual pair
    ([SIGSTKFLT, signal.SIGVTALRM], True, signal.SIGVTALRM),         # SIGPROF was taken: CPU moved on
    ([signal.SIGPROF, SIGSTKFLT], True, SIGSTKFLT),                  # SIGVTALRM was taken: wall moved on
    ([SIGSTKFLT, signal.SIGPWR], True, signal.SIGPWR),               # both taken: CPU first in the order
    ([signal.SIGPROF], False, 0),                                    # no wall clock
])
def test_wall_signal_follows_async_profilers_choice(held: list, wall: bool, expected: int) -> None:
    assert S._wall_signal([int(s) for s in held], wall) == int(expected)


def test_handler_report_of_this_process() -> None:
    rows = {r["name"]: r for r in S.handler_report()}
    if not rows:
        pytest.skip("asprof.engines._signals is not built for this interpreter")
    assert set(rows) == {"SIGPROF", "SIGVTALRM", "SIGALRM"}
    for r in rows.values():
        assert r["kind"] in ("default", "ignore", "handler") and isinstance(r["asprof"], bool)
