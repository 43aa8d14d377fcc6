"""A process SIGKILLed while reporting (issue #13): what it leaves is finished or removed by the
next reporter on the directory, and nothing else is touched.

Each round starts a child that writes profiles in a loop, kills it at a random moment, looks at
what is left (a complete, an incomplete, or an already-published ``.partial``), then lets a new
reporter recover and checks the outcome. The JFR written is several MB of real chunks, so most
kills land inside a write.
"""
from __future__ import annotations

import gzip
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import pytest

from asprof.jfrio.decode import chunks
from tests.conftest import ROOT, child_env

ROUNDS = int(os.environ.get("ASPROF_TEST_KILL_ROUNDS", "6"))  # more for docs/reliability.md's numbers
CHILD_LOCAL = """
import sys
from datetime import datetime, timezone
from asprof.reporter.local import LocalReporter
from asprof.metadata import NoMetadata, ReportMetadata
data = open(sys.argv[1], "rb").read()
r = LocalReporter(sys.argv[2])
t = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
md = ReportMetadata(NoMetadata(), t, t, 30.0)
r.recover_partials()
print("go", flush=True)
while True:
    r.write(data, md)
"""
CHILD_SPOOL = """
import sys, uuid
from datetime import datetime, timezone
from asprof.reporter.s3.spool import _DirSpool, _Entry
from asprof.reporter.s3.format import profile_zip
from asprof.metadata import NoMetadata, ReportMetadata
data = open(sys.argv[1], "rb").read()
t = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
body = profile_zip(data, ReportMetadata(NoMetadata(), t, t, 30.0))
spool = _DirSpool(sys.argv[2], ("bucket", "123456789012"), 1000, 1 << 40)
print("go", flush=True)
n = 0
while True:
    n += 1
    spool.put(_Entry(id=uuid.uuid4().hex, key="k", bucket="bucket", body=body), n)
"""


def _big_jfr(tmp_path: Path) -> Path:
    chunk = gzip.decompress((ROOT / "tests" / "data" / "nativemem.jfr.gz").read_bytes())
    data = chunk * max(2, (3 << 20) // len(chunk))
    path = tmp_path / "big.jfr"
    path.write_bytes(data)
    return path


def _kill_while_writing(code: str, data: Path, out: Path, rng: random.Random) -> None:
    p = subprocess.Popen([sys.executable, "-c", code, str(data), str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=child_env())
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.strip() == b"go", (line, p.stderr.read() if p.stderr else b"")
        time.sleep(rng.uniform(0.0, 0.12))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)


def test_local_reporter_killed_mid_report(tmp_path: Path) -> None:
    data = _big_jfr(tmp_path)
    expected = data.read_bytes()
    out = tmp_path / "profiles"
    rng = random.Random(13)
    seen: Dict[str, int] = {"complete": 0, "incomplete": 0, "published": 0, "none": 0}
    for _ in range(ROUNDS):
        _kill_while_writing(CHILD_LOCAL, data, out, rng)
        partials = [p for p in out.iterdir() if p.name.endswith(".partial")]
        assert len(partials) <= 1
        before = {p.name for p in out.iterdir() if p.name.endswith(".jfr")}
        if not partials:
            seen["none"] += 1
            continue
        part = partials[0]
        kind = "published" if os.stat(part).st_nlink > 1 else \
            "complete" if part.read_bytes() == expected else "incomplete"
        seen[kind] += 1
        from asprof.reporter.local import LocalReporter

        recovered, removed = LocalReporter(out).recover_partials()
        assert (recovered, removed) == ((1, 0) if kind == "complete" else (0, 1)), kind
        after = {p.name for p in out.iterdir()}
        assert not any(n.endswith(".partial") for n in after)
        assert len(after - before) == (1 if kind == "complete" else 0)
    # Every profile in the directory is the complete recording, never a torn one.
    for p in out.iterdir():
        assert p.read_bytes() == expected, p.name
        assert sum(1 for _ in chunks(p.read_bytes())) > 1
        assert os.stat(p).st_mode & 0o777 == 0o600
    print("kills:", ROUNDS, seen)


def test_spool_killed_mid_put(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from asprof.reporter.s3.spool import _DirSpool

    caplog.set_level(logging.INFO, logger="asprof.s3")
    data = _big_jfr(tmp_path)
    out = tmp_path / "spool"
    rng = random.Random(14)
    left = 0
    for _ in range(ROUNDS):
        _kill_while_writing(CHILD_SPOOL, data, out, rng)
        left += sum(1 for p in out.iterdir() if p.name.endswith(".partial"))
        _DirSpool(str(out), ("bucket", "123456789012"), 1000, 1 << 40).recover_partials()
        assert not any(p.name.endswith(".partial") for p in out.iterdir())
    spool = _DirSpool(str(out), ("bucket", "123456789012"), 1000, 1 << 40)
    n = 0
    while (entry := spool.claim()) is not None:  # every file left is a complete, readable profile
        import io
        import zipfile

        with zipfile.ZipFile(io.BytesIO(entry.body)) as z:
            assert z.testzip() is None
        spool.done(entry)
        n += 1
    assert list(out.iterdir()) == []  # nothing else was left
    messages = [r.getMessage() for r in caplog.records]
    recovered = sum(m.startswith("recovered") for m in messages)
    removed = sum(m.startswith("removed") for m in messages)
    assert recovered + removed == left
    print("spool kills:", ROUNDS, "partials found:", left, "recovered:", recovered, "removed:", removed,
          "profiles:", n)
