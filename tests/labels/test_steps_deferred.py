"""The asyncio step hook never imports asyncio itself (~10 MB and ~40 ms at start): it waits for
the application's import and hooks the loop right after it."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import child_env

CHILD = r"""
import json, sys, tempfile
import asprof
p = asprof.Profiler(reporter=asprof.LocalReporter(tempfile.mkdtemp()),
                    options=asprof.ProfilerOptions(engine="builtin")).start()
before = "asyncio" in sys.modules
import asyncio
hooked = asyncio.events.Handle._run.__qualname__ == "Handle._run" and \
    type(asyncio.events.Handle._run).__name__ != "function"
from asprof.context import steps
async def main():
    with asprof.labels(route="/x"):
        await asyncio.sleep(0.01)
        return asprof.get_labels()
labels = asyncio.run(main())
p.stop()
print(json.dumps({"asyncio_at_start": before, "hooked": hooked, "labels": labels,
                  "restored": type(asyncio.events.Handle._run).__name__ == "function",
                  "finders_left": sum(type(f).__name__ == "_Deferred" for f in sys.meta_path)}))
"""


def test_start_leaves_asyncio_unimported_and_hooks_it_when_the_application_imports_it() -> None:
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, env=child_env())
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["asyncio_at_start"] is False
    assert out["hooked"] is True, (out, r.stderr)
    assert out["labels"] == {"route": "/x"}
    assert out["restored"] is True and out["finders_left"] == 0
    assert "could not hook" not in r.stderr
