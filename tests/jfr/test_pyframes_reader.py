"""asprof.jfr.pystacks without a profiler: decoding, the join, the stack transformation (issue #5)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("asprof.jfr.model")

from asprof.jfr.model import Frame, FrameType  # noqa: E402
from asprof.jfr.pystacks import (  # noqa: E402
    JoinStats,
    PyFrame,
    PyStack,
    PythonStacks,
    _Source,
    transform,
)
from asprof.pyframes import attach_capture  # noqa: E402


def varint(v: int) -> bytes:
    out = bytearray()
    while True:
        c = v & 0x7F
        v >>= 7
        out.append(c | (0x80 if v else 0))
        if not v:
            return bytes(out)


def string(s: str) -> bytes:
    b = s.encode()
    return varint(len(b)) + b


def native(name: str) -> Frame:
    return Frame(name, name, "libpython3.11.so", FrameType.NATIVE)


def py(name: str) -> PyFrame:
    return PyFrame("app", name, "/srv/app.py", 10, 3)


def pyframe(f: PyFrame) -> Frame:
    return Frame(f.display(), f.qualname, f.module, FrameType.PYTHON)


TRUNC = Frame("[truncated Python stack]", "", "", FrameType.PYTHON)
EVAL = "_PyEval_EvalFrameDefault"


def names(frames):
    return [f.name for f in frames]


def test_mixed_replaces_each_eval_frame_with_its_group():
    # leaf first: deflate <- zlib_compress <- eval#1 (alpha, work) <- _PyEval_Vector <- eval#2 (main)
    nat = [native("deflate"), native("zlib_compress"), native(EVAL), native("_PyEval_Vector"),
           native(EVAL), native("Py_RunMain")]
    st = PyStack(((py("alpha"), py("work")), (py("<module>"),)), False)
    out = transform(nat, st, "mixed", pyframe, TRUNC)
    assert names(out) == ["deflate", "zlib_compress", "app.alpha (app.py:3)", "app.work (app.py:3)",
                          "_PyEval_Vector", "app.<module> (app.py:3)", "Py_RunMain"]


def test_mixed_keeps_unmatched_eval_frames_and_appends_extra_groups():
    nat = [native(EVAL), native(EVAL), native("start_thread")]
    one = PyStack(((py("a"),),), False)
    assert names(transform(nat, one, "mixed", pyframe, TRUNC)) == ["app.a (app.py:3)", EVAL, "start_thread"]
    three = PyStack(((py("a"),), (py("b"),), (py("c"),)), True)
    out = names(transform(nat[:1], three, "mixed", pyframe, TRUNC))
    assert out == ["app.a (app.py:3)", "app.b (app.py:3)", "app.c (app.py:3)", "[truncated Python stack]"]


def test_empty_group_keeps_the_native_eval_frame():
    nat = [native(EVAL), native(EVAL)]
    st = PyStack(((), (py("b"),)), False)
    assert names(transform(nat, st, "mixed", pyframe, TRUNC)) == [EVAL, "app.b (app.py:3)"]


def test_python_only_view():
    nat = [native("deflate"), native(EVAL), native("start_thread")]
    st = PyStack(((py("alpha"), py("run")),), True)
    assert names(transform(nat, st, "python", pyframe, TRUNC)) == [
        "app.alpha (app.py:3)", "app.run (app.py:3)", "[truncated Python stack]"]


def test_frame_display_lines():
    f = PyFrame("pkg.mod", "Cls.meth", "/x/pkg/mod.py", 42, 40)
    assert f.display() == "pkg.mod.Cls.meth (mod.py:40)"
    assert f.display("current") == "pkg.mod.Cls.meth (mod.py:42)"
    assert PyFrame("pkg", "f", "/x/pkg/__init__.py", 2, 1).display() == "pkg.f (pkg/__init__.py:1)"


def _decoded():
    ps = PythonStacks()
    src = ps._sources.setdefault("f.jfr", _Source())
    code = b"\x01" + varint(5) + varint(3) + varint(0x7F00) + string("Cls.alpha") + string("/srv/app.py")
    code += varint(6) + varint(1) + varint(0x7F00) + string("<module>") + string("/srv/app.py")
    stack = b"\x01" + varint(9) + varint(0) + varint(3) + varint(5 + 2) + varint(4) + b"\x00" + varint(6 + 2) + varint(7)
    sample = b"\x01" + varint(101) + varint(123456) + varint(1000) + varint(2000) + varint(9)
    sample += varint(102) + varint(0) + varint(5000) + varint(6000) + varint(9)
    mod = b"\x01" + varint(0x7F00) + string("myapp")
    for etype, payload in (("asprof.PyCode", code), ("asprof.PyStack", stack), ("asprof.PySample", sample),
                           ("asprof.PyModule", mod), ("asprof.PyStats", b'{"samples": 2}')):
        ps._decode(src, etype, payload)
    for lst in list(src.by_time_tsc.values()) + list(src.by_time_mono.values()):
        lst.sort()
    return ps


def test_decode_and_exact_join():
    ps = _decoded()
    chunk = SimpleNamespace(source="f.jfr", ticks_per_second=1_000_000_000)
    stack, how = ps.lookup(chunk, 101, 123456)
    assert how == "exact"
    assert stack is not None and not stack.truncated
    assert [[f.display("current") for f in g] for g in stack.groups] == [
        ["myapp.Cls.alpha (app.py:4)"], ["myapp.<module> (app.py:7)"]]
    assert ps.sample_count == 2 and ps.emitted == 2


def test_timestamp_join_window():
    ps = _decoded()
    chunk = SimpleNamespace(source="f.jfr", ticks_per_second=1_000_000_000)
    assert ps.lookup(chunk, 102, 4990, "tsc")[1] == "timestamp"        # ours 10 ticks later
    assert ps.lookup(chunk, 102, 5001, "tsc")[1] == "none"             # ours before the sample
    assert ps.lookup(chunk, 102, 5990, "monotonic")[1] == "timestamp"
    assert ps.lookup(chunk, 102, 5000 - 3_000_000, "tsc")[1] == "none"  # too far
    assert ps.lookup(SimpleNamespace(source="other"), 101, 123456)[1] == "none"


def test_join_stats_rate():
    st = JoinStats(exact=98, timestamp=1, carried=0, unmatched_python_threads=1, no_python=50)
    assert st.with_python == 99 and st.rate == pytest.approx(0.99)
    assert JoinStats().rate == 1.0


@pytest.mark.parametrize("info, needle", [
    (SimpleNamespace(version="3.1", version_tuple=(3, 1), capabilities=frozenset(), path="x"), "4.1 or later"),
    (SimpleNamespace(version="4.0", version_tuple=(4, 0), capabilities=frozenset({"thread_local_data"}),
                     path="x"), "4.1 or later"),
])
def test_off_with_one_log_line(info, needle, caplog):
    with caplog.at_level(logging.INFO, logger="asprof"):
        assert attach_capture(info) is None
    lines = [r for r in caplog.records if "Python frames are off" in r.getMessage()]
    assert len(lines) == 1 and needle in lines[0].getMessage()
