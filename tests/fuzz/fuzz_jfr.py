"""Fuzz harness for the JFR reader.

The property: for any input, ``asprof.jfr`` either reads it or raises
``JfrError`` -- never another exception, a crash, a hang or unbounded memory.
``check(data)`` runs one input through everything a user can do (open, every
profile kind, every view, every event decoded and resolved).

Run it longer than the test suite does:

    python tests/fuzz/fuzz_jfr.py --seconds 600            # mutation fuzzing (no extra deps)
    python tests/fuzz/fuzz_jfr.py --atheris -- -max_len=200000   # coverage-guided, if atheris is installed

Seeds are the real recordings shipped in tests/data (*.jfr.gz) and crafted
recordings, and the same wrapped in the containers the reader accepts (S3 reporter zips,
stored and deflated, and gzip; :func:`container_seeds`): a mutated container must end in
a JfrError too, within the read limits (:data:`LIMITS`, small so that a mutation that makes a
bomb is stopped quickly). A failing input is written to ``--crash-dir`` (default: a new
temporary directory) and the harness exits non-zero.
"""
from __future__ import annotations

import argparse
import gzip
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))          # tests/ (jfr_builder)
sys.path.insert(0, str(HERE.parent.parent))   # the repo (asprof)

import asprof.jfr as J  # noqa: E402
from asprof.jfr.errors import JfrError  # noqa: E402

DATA = HERE.parent / "data"  # tests/data: the real recordings (see its README.md)


#: Read limits of the harness: small, so a mutated container that inflates a lot stops fast.
LIMITS = J.ReadLimits(max_size=64 << 20, max_ratio=50.0, ratio_floor=1 << 20, max_files=1000)


def check(data: bytes) -> None:
    """Read ``data`` every way; only JfrError may escape."""
    try:
        _exercise(data)
    except JfrError as e:
        assert str(e) and e.reason  # a one-line message naming what is wrong


def _exercise(data: bytes) -> None:
    rec = J.open(data, limits=LIMITS)
    from asprof.jfr.profile import KINDS

    for kind in KINDS:  # cpu, wall, nativemem, leaks, and the newer kinds (alloc, live)
        prof = rec.samples(kind, by_thread=True)
        J.to_collapsed(prof)
        J.to_pprof(prof)
        J.top(prof)
        if len(prof.stacks) < 5000:
            J.to_html(prof)
    try:  # request labels (issue #15): joined, split by a label, filtered by one
        J.to_collapsed(rec.samples("cpu", with_labels=True, by_label="route"))
        J.to_collapsed(rec.samples("wall", where={"route": "/x"}))
    except TypeError:  # pragma: no cover - a reader without labels
        pass
    for ev in rec.events():
        ev.values
        ev.stack_trace
        ev.thread
    rec.settings
    rec.threads
    rec.counts


def seeds(max_size: int = 200_000) -> List[bytes]:
    out = []
    for p in sorted(DATA.glob("*.jfr.gz")):
        data = gzip.decompress(p.read_bytes())
        if len(data) < max_size:
            out.append(data)
    import jfr_builder as B

    s = B.Simple()
    s.thread(1, "main")
    s.thread(2, "worker")
    s.exec_sample(10, 1, ["main", "a", "b"])
    s.wall_sample(11, 2, ["main", "c"], samples=3)
    s.malloc(12, 1, ["main", "m"], 0x10, 64)
    s.malloc(13, 2, ["main", "m2"], 0x20, 32)
    s.free(14, 1, 0x10)
    out.append(s.build())
    out.append(s.build() + s.build(start_nanos=2 * 10**18))
    return out


def container_seeds(max_size: int = 200_000) -> List[bytes]:
    """The seeds in containers: S3 reporter zips (deflated, stored; with metadata.json), gzip."""
    import io
    import zipfile

    out = []
    for jfr in seeds(max_size):
        for method in (zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED):
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", method) as zf:
                zf.writestr("async_profiler_dump_0.jfr", jfr)
                zf.writestr("metadata.json", b'{"start": 1700000000000, "end": 1700000030000}')
            out.append(buf.getvalue())
        out.append(gzip.compress(jfr, 6))
    return out


def mutate(data: bytes, rnd: random.Random) -> bytes:
    d = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(7)
        if not d:
            break
        i = rnd.randrange(len(d))
        if op == 0:
            d[i] ^= 1 << rnd.randrange(8)
        elif op == 1:
            d[i] = rnd.choice((0, 0x7F, 0x80, 0xFF, rnd.randrange(256)))
        elif op == 2:
            del d[i:i + rnd.randint(1, 64)]
        elif op == 3:
            d[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))
        elif op == 4:
            d = d[:i]
        elif op == 5:  # a varint-ish run of continuation bytes
            d[i:i + 5] = b"\xff\xff\xff\xff\x0f"
        else:
            j = rnd.randrange(len(d))
            n = rnd.randint(1, 32)
            d[i:i + n] = d[j:j + n]
    return bytes(d)


class _Timeout(Exception):
    pass


def _alarm(_sig: int, _frm: object) -> None:
    raise _Timeout()


def run_mutation(seconds: float, seed: int, crash_dir: Path, per_input: int = 10) -> int:
    rnd = random.Random(seed)
    corpus = seeds() + container_seeds()
    signal.signal(signal.SIGALRM, _alarm)
    n = 0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        data = mutate(rnd.choice(corpus), rnd)
        n += 1
        signal.alarm(per_input)
        try:
            check(data)
        except _Timeout:
            return _report(crash_dir, data, f"hang: more than {per_input} s on one input")
        except Exception:  # noqa: BLE001 - any other exception is the finding
            return _report(crash_dir, data, traceback.format_exc())
        finally:
            signal.alarm(0)
    print(f"{n} inputs, no failure")
    return 0


def _report(crash_dir: Path, data: bytes, what: str) -> int:
    crash_dir.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="crash-", suffix=".jfr", dir=crash_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    print(f"FAILURE ({path}):\n{what}", file=sys.stderr)
    return 1


def run_atheris(argv: List[str]) -> int:  # pragma: no cover - needs atheris
    import atheris  # type: ignore[import-not-found]

    corpus_dir = Path(tempfile.mkdtemp(prefix="jfr-corpus-"))
    for i, s in enumerate(seeds() + container_seeds()):
        (corpus_dir / f"seed{i}.jfr").write_bytes(s)
    atheris.Setup([sys.argv[0], str(corpus_dir)] + argv, check)
    atheris.Fuzz()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Fuzz the asprof JFR reader.")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--crash-dir", type=Path, default=None)
    ap.add_argument("--atheris", action="store_true", help="coverage-guided fuzzing with atheris")
    args, rest = ap.parse_known_args(argv)
    if args.atheris:
        return run_atheris(rest)
    crash_dir = args.crash_dir or Path(tempfile.mkdtemp(prefix="jfr-fuzz-"))
    print(f"mutation fuzzing for {args.seconds:.0f} s, seed {args.seed}")
    return run_mutation(args.seconds, args.seed, crash_dir)


if __name__ == "__main__":
    sys.exit(main())
