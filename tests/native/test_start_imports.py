"""What ``start()`` imports (issue #10: start-up cost). Not timed: the modules a start must not
bring in, so that a service pays for none of them before its next line runs. The timing
comparison with async-profiler's own start is benchmarks/bench_startup.py."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import run_python

# Imported later, by the agent thread at its first report or only when used: never by start().
NOT_AT_START = [
    "asprof.jfr",                      # the offline reader
    "asprof.autostart.config",         # the ASPROF_* table (start() needs only autostart.values)
    "asprof.autostart.start",
    "asprof.metadata",                 # host metadata: detected at the first report
    "asprof.metadata.aws",
    "asprof.reporter.s3",              # boto3
    "asprof.reporter.multi",
    "asprof.engines.settings_chunk",   # read at the first tick
    "asprof.cli",
]


def test_start_imports_only_what_it_runs(stub_lib: Path, tmp_path: Path) -> None:
    r = run_python(f"""
        import json, sys
        import asprof
        h = asprof.Profiler(asprof.LocalReporter({str(tmp_path / "p")!r}), reporting_interval=60,
                            library_path={str(stub_lib)!r}).start()
        loaded = sorted(m for m in {NOT_AT_START!r} if m in sys.modules)
        running = h.running
        h.stop()
        print(json.dumps({{"loaded": loaded, "running": running}}))
    """)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["running"]
    assert out["loaded"] == []
