"""Soak (issue #15), not in the default suite: 10,000 asyncio tasks (churning, a few hundred
alive at a time) and 2 threads set labels for 5 minutes under 1 ms sampling, with reports every
30 s; then every sample inside ``work_k`` must carry ``fn=work_k`` or no label.

    python tests/soak/labels_soak.py [--engine builtin|async-profiler] [--seconds 300] [--tasks 10000]

Prints the counts and exits 1 on a wrongly labelled sample or a crash of the workload.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="builtin")
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--tasks", type=int, default=10000)
    ap.add_argument("--churn", type=int, default=300)
    a = ap.parse_args()
    from tests.labels.churn import check

    out = tempfile.mkdtemp(prefix="asprof-soak-")
    env = dict(os.environ, PYTHONPATH=ROOT)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "labels", "churn.py"), "--engine", a.engine,
                        "--out", out, "--seconds", str(a.seconds), "--tasks", str(a.tasks), "--churn", str(a.churn),
                        "--report", "30"], capture_output=True, text=True, env=env)
    took = time.monotonic() - t0
    reports = sorted(os.listdir(out))
    print(f"engine {a.engine}: exit {r.returncode} after {took:.0f} s, {len(reports)} reports in {out}")
    if r.returncode != 0:
        print(r.stderr[-4000:])
        return 1
    right, wrong, unlabelled = check(out)
    print(f"samples in work_k: labelled right {right}, labelled wrong {wrong}, unlabelled {unlabelled}")
    return 0 if wrong == 0 and right > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
