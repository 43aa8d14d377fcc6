"""Numbers for docs/reliability.md (issue #13): CPU samples with and without an application's
own SIGPROF/SIGALRM handlers and timers, per engine and case (the child programs of
tests/lifecycle/test_signal_ownership.py).

    python tests/hostile_signals.py [--no-recovery] [--engines builtin,async-profiler]

``--no-recovery`` turns asprof's recovery off in the child (the watcher of async-profiler's
signals and the ``signal.signal`` wrapper), to show what happened before issue #13; the built-in
engine's sampler put its handler back in front already then (it still does).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "lifecycle"))

from test_signal_ownership import CHILD  # noqa: E402

from conftest import run_python  # noqa: E402

NO_RECOVERY = """
import asprof.engines.signals as _s
_s.AsyncProfilerSignals.after_start = lambda self: None
_s.sampling_with = lambda *a: None
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-recovery", action="store_true")
    ap.add_argument("--engines", default="builtin,async-profiler")
    ap.add_argument("--cases", default="none,alarm,before,after,native,restore")
    args = ap.parse_args()
    print(f"{'engine':15} {'case':8} {'samples':>8} {'expected':>8} {'%':>5} {'app SIGPROF':>11} "
          f"{'app SIGALRM':>11} warnings  status")
    for engine in args.engines.split(","):
        for case in args.cases.split(","):
            code = CHILD.replace("sys.argv[1], sys.argv[2]", f"{case!r}, {engine!r}")
            if args.no_recovery:
                code = code.replace("import asprof\n", "import asprof\n" + NO_RECOVERY, 1)
            r = run_python(code, timeout=120)
            if r.returncode != 0:
                print(f"{engine:15} {case:8} the child died: status {r.returncode}")
                continue
            o = json.loads(r.stdout.strip().splitlines()[-1])
            pct = 100.0 * o["samples"] / o["expected"]
            print(f"{engine:15} {case:8} {o['samples']:8d} {o['expected']:8.0f} {pct:5.0f} {o['got']['prof']:11d} "
                  f"{o['got']['alrm']:11d} {len(o['warnings']):8d}  exit 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
