"""Collapsed stacks: identical to async-profiler's converter (jfrconv) on every fixture."""
from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Dict, List

import pytest

import asprof.jfr as J

import jfr_builder as B
from conftest import RECORDINGS, unpack_recording

JFRCONV = shutil.which("jfrconv")

# (jfrconv options, asprof kind, asprof options)
MODES = [
    (["--cpu"], "cpu", {}),
    (["--wall"], "wall", {}),
    (["--nativemem", "--total"], "nativemem", {}),
    (["--nativemem"], "nativemem", {"count": True}),
    (["--nativemem", "--leak", "--total"], "leaks", {}),
    (["--cpu", "--threads"], "cpu", {"by_thread": True}),
    (["--wall", "--threads"], "wall", {"by_thread": True}),
    (["--cpu", "-I", ".*EvalFrame.*", "-X", ".*(insertdict|malloc).*"], "cpu",
     {"include": ".*EvalFrame.*", "exclude": ".*(insertdict|malloc).*"}),
]


def parse(text: str) -> Counter:
    c: Counter = Counter()
    for line in text.splitlines():
        if line.strip():
            stack, _, w = line.rpartition(" ")
            c[stack] += int(w)
    return c


def inputs(tmp: Path) -> List[Path]:
    """The real recordings shipped in tests/data, unpacked."""
    return [unpack_recording(name, tmp) for name in RECORDINGS]


@pytest.mark.skipif(not JFRCONV, reason="async-profiler's jfrconv is not installed: cannot compare with it")
def test_collapsed_equals_jfrconv(tmp_path: Path) -> None:
    checked = 0
    for path in inputs(tmp_path):
        rec = J.open(path)
        for jflags, kind, kw in MODES:
            out = tmp_path / "j.collapsed"
            subprocess.run([JFRCONV, "-o", "collapsed", *jflags, str(path), str(out)], check=True,
                           capture_output=True, timeout=120)
            expected = parse(out.read_text())
            # jfrconv knows nothing of asprof's Python-stack events: the native stacks as recorded
            ours = parse(J.to_collapsed(rec.samples(kind, python="native", **kw)))
            assert ours == expected, f"{path.name} {' '.join(jflags)}"
            checked += sum(expected.values()) > 0
    assert checked >= 20


def test_lines_are_sorted_and_well_formed() -> None:
    s = B.Simple()
    s.thread(1, "t")
    s.exec_sample(1, 1, ["b", "x"])
    s.exec_sample(1, 1, ["a", "y"])
    s.exec_sample(1, 1, ["a", "y"])
    s.exec_sample(1, 1, ["a"])
    s.exec_sample(1, 1, [("k1", "", 5), ("cpp::f", "lib.so", 4)])
    text = J.to_collapsed(J.open(s.build()).samples("cpu"))
    assert text == "a 1\na;y 2\nb;x 1\nk1_[k];cpp::f 1\n"
    lines = text.splitlines()
    assert lines == sorted(lines)


def test_write_collapsed_streams() -> None:
    import io

    s = B.Simple()
    s.thread(1, "t")
    s.exec_sample(1, 1, ["a", "b"])
    buf = io.StringIO()
    J.write_collapsed(J.open(s.build()).samples("cpu"), buf)
    assert buf.getvalue() == "a;b 1\n"


def test_empty_profile() -> None:
    s = B.Simple()
    s.thread(1, "t")
    prof = J.open(s.build()).samples("cpu")
    assert J.to_collapsed(prof) == ""
    assert prof.total == 0 and len(prof) == 0


def _stack_weights(prof: J.Profile) -> Dict[str, int]:
    return {";".join(n for n, _t in frames): w for frames, w in prof.items()}


def test_profile_items_root_first() -> None:
    s = B.Simple()
    s.thread(1, "t")
    s.exec_sample(1, 1, ["root", "mid", "leaf"])
    assert _stack_weights(J.open(s.build()).samples("cpu")) == {"root;mid;leaf": 1}


def test_deep_and_branching_stacks_fold_to_their_paths() -> None:
    """Stacks ending at inner nodes, siblings after a deep branch, and one very deep stack
    (the folding joins names once per line, not a prefix per level)."""
    from asprof.jfr.profile import Profile

    prof = Profile(kind="cpu", unit="samples")
    deep = [f"d{i}" for i in range(3000)]
    stacks = {("a",): 1, ("a", "b"): 2, ("a", "b", "c"): 3, ("a", "x"): 4, ("z",): 5,
              tuple(["a", "b"] + deep): 6}
    for names, w in stacks.items():
        prof.add(tuple(prof.intern(n, 3) for n in names), w, w)
    got = dict(J.views.collapsed.collapsed_lines(prof))
    assert got == {";".join(k): v for k, v in stacks.items()}
