"""The views of labels and steps (issue #15) on a recording built here, exactly: asprof top --by,
--where, convert (pprof labels, HTML label frames), longsteps."""
from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

import pytest

from asprof.jfr import open_recording
from asprof.jfrio import ctxevents
from asprof.jfrio.writer import FRAME_PYTHON, KIND_CPU, KIND_WALL, SAMPLE, STATE_SLEEPING, ChunkWriter

from conftest import child_env

TID = 4242
T0 = 10_000_000_000  # monotonic ns at the chunk start
EPOCH = 1_790_000_000_000_000_000


def _ev(w: ChunkWriter, name: str, payload: bytes, key: int) -> None:
    w.user_event_type(key, name)
    w.event("profiler.UserEvent", w.start_ticks, 0, key, payload.decode("latin-1"))


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = ChunkWriter(EPOCH, T0)
    w.recording_info("asprof")
    w.setting("jdk.ActiveRecording", "clock", "monotonic")
    stacks = {name: w.stack([(w.python_method("app", name), 1, FRAME_PYTHON),
                             (w.python_method("app", "handler"), 1, FRAME_PYTHON)])
              for name in ("checkout", "search", "loop", "blocking_call")}
    keys = list(stacks.values())
    idx = {name: i for i, name in enumerate(stacks)}
    recs = b""
    labels = []
    t = T0
    # event-loop work (unlabelled) between requests, 1 ms before the next request's samples:
    # it stays unlabelled (its samples have no label record; the next sample's is not theirs)
    for name, n, lab in (("checkout", 30, 2), ("loop", 5, 0), ("search", 30, 3), ("loop", 5, 0),
                         ("checkout", 30, 2)):
        for _ in range(n):
            t += 1_000_000
            recs += SAMPLE.pack(t, TID, idx[name], KIND_CPU, 0, 0)
            if lab:
                labels.append((TID, t, 0, t, lab))
    stall_start = t + 5_000_000
    for k in range(8):  # wall samples during an 80 ms stall
        recs += SAMPLE.pack(stall_start + 5_000_000 + k * 10_000_000, TID, idx["blocking_call"], KIND_WALL,
                            STATE_SLEEPING, 0)
    w.samples_from(recs, keys)
    w.thread(TID, "MainThread")
    for p in ctxevents.encode_sample_labels(labels):
        _ev(w, ctxevents.SAMPLE_LABEL, p, 15002)
    for p in ctxevents.encode_label_sets([(2, (("endpoint", "/checkout"),)), (3, (("endpoint", "/search"),))]):
        _ev(w, ctxevents.LABEL_SET, p, 15001)
    steps = [(TID, stall_start, stall_start + 80_000_000, 8, 3, "task Task-7 handler"),
             (TID, T0 + 1_000_000, T0 + 21_000_000, 2, 2, "task Task-3 handler")]
    for p in ctxevents.encode_steps(EPOCH - T0, steps):
        _ev(w, ctxevents.STEP, p, 15003)
    out = tmp_path_factory.mktemp("views") / "labelled.jfr"
    out.write_bytes(w.finish(end_ticks=stall_start + 200_000_000))
    return out


def cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "asprof", *args], capture_output=True, text=True, timeout=120,
                       env=child_env())
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_top_by_label(recording: Path) -> None:
    out = cli("top", str(recording), "--cpu", "--by", "endpoint", "-n", "1")
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)%\s+(\S+)$", out, re.M)
    assert rows[:3] == [("60", "60.00", "/checkout"), ("30", "30.00", "/search"), ("10", "10.00", "<none>")], out
    assert "app.checkout" in out


def test_where(recording: Path) -> None:
    out = cli("top", str(recording), "--cpu", "--where", "endpoint=/search")
    assert "total: 30 samples" in out and "app.checkout" not in out
    none = cli("top", str(recording), "--cpu", "--where", "endpoint=")
    assert "total: 10 samples" in none and "app.loop" in none
    r = subprocess.run([sys.executable, "-m", "asprof", "top", str(recording), "--where", "endpoint"],
                       capture_output=True, text=True, env=child_env())
    assert r.returncode != 0 and "LABEL=VALUE" in r.stderr and "Traceback" not in r.stderr


def test_profile_api_and_pprof_labels(recording: Path, tmp_path: Path) -> None:
    rec = open_recording(str(recording))
    p = rec.samples("cpu", with_labels=True)
    by = {}
    for (_stack, pairs), (wt, _c) in p.labelled.items():
        by[pairs] = by.get(pairs, 0) + wt
    assert by == {(("endpoint", "/checkout"),): 60, (("endpoint", "/search"),): 30, (): 10}
    cli("convert", str(recording), "--cpu", "-o", str(tmp_path / "x.pb.gz"))
    data = gzip.decompress((tmp_path / "x.pb.gz").read_bytes())
    assert b"endpoint" in data and b"/checkout" in data


def test_html_shows_labels(recording: Path, tmp_path: Path) -> None:
    cli("convert", str(recording), "--cpu", "-o", str(tmp_path / "x.html"))
    html = (tmp_path / "x.html").read_text()
    assert "[endpoint=/checkout]" in html and "[endpoint=/search]" in html
    cli("convert", str(recording), "--cpu", "--by-label", "none", "-o", str(tmp_path / "y.html"))
    assert "[endpoint=" not in (tmp_path / "y.html").read_text()


def test_longsteps(recording: Path) -> None:
    out = cli("longsteps", str(recording), "--min", "50ms")
    assert out.startswith("1 steps of at least 50 ms (of 2 recorded)"), out
    assert "80.0 ms" in out and "task Task-7 handler" in out and "[endpoint=/search]" in out
    assert "samples: 0 cpu, 8 wall" in out and "app.blocking_call" in out
    out10 = cli("longsteps", str(recording), "--min", "10", "--sort", "duration")
    assert out10.index("80.0 ms") < out10.index("20.0 ms") and "app.checkout" in out10
    r = subprocess.run([sys.executable, "-m", "asprof", "longsteps", str(recording), "--min", "abc"],
                       capture_output=True, text=True, env=child_env())
    assert r.returncode == 2 and "invalid duration" in r.stderr


def test_timestamp_join_takes_the_samples_own_record() -> None:
    """async-profiler 4.0-4.4 (no exact keys): a sample's label record has the timestamp of the
    Python-stack record it joins; an unlabelled sample does not get the next sample's label
    (in the 2 ms window)."""
    from types import SimpleNamespace

    from asprof.jfr import labels as jlabels
    from asprof.jfr import pystacks

    def varint(v: int) -> bytes:
        out = bytearray()
        while True:
            b, v = v & 0x7F, v >> 7
            out.append(b | (0x80 if v else 0))
            if not v:
                return bytes(out)

    ps = pystacks.PythonStacks()
    psrc = ps._sources.setdefault("f.jfr", pystacks._Source())
    # our records 10 ticks after each of three samples (tsc 1000, 2000, 3000); no exact keys
    sample = b"\x01" + b"".join(varint(7) + varint(0) + varint(t + 10) + varint(t + 10) + varint(1)
                                for t in (1000, 2000, 3000))
    ps._decode(psrc, "asprof.PySample", sample)
    for lst in list(psrc.by_time_tsc.values()) + list(psrc.by_time_mono.values()):
        lst.sort()
    rec = SimpleNamespace(chunks=[], _asprof_pystacks=ps)
    cd = jlabels.ContextData()
    cd._rec = rec  # type: ignore[assignment]
    src = cd._sources.setdefault("f.jfr", jlabels._Source())
    for p in ctxevents.encode_sample_labels([(7, 0, 3010, 3010, 5)]):  # only the third is labelled
        cd._decode(src, ctxevents.SAMPLE_LABEL, p.decode("latin-1"))
    for p in ctxevents.encode_label_sets([(5, (("endpoint", "/x"),))]):
        cd._decode(src, ctxevents.LABEL_SET, p.decode("latin-1"))
    chunk = SimpleNamespace(source="f.jfr", ticks_per_second=1_000_000)  # window: 2000 ticks
    assert cd.lookup(chunk, 7, 2000, "tsc") is None  # its own record (2010) has no label
    assert cd.lookup(chunk, 7, 1000, "tsc") is None
    assert cd.lookup(chunk, 7, 3000, "tsc") == (("endpoint", "/x"),)
    assert cd.lookup(chunk, 7, 3000, "monotonic") == (("endpoint", "/x"),)
