"""Every thread the agent side starts comes from asprof.osthreads (issue #13), so it stays a real OS
thread under gevent/eventlet monkey-patching (tests/lifecycle/test_gevent.py shows why)."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

# The command line (doctor's probe) and the offline reader never run inside a profiled service.
NOT_AGENT_SIDE = ("asprof/cli/", "asprof/jfr/", "asprof/osthreads/")


def test_no_thread_is_started_with_threading_directly() -> None:
    offenders = []
    for path in sorted((ROOT / "asprof").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(NOT_AGENT_SIDE) or "bootstrap" in rel:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"threading\.(Thread|Timer)\(|_thread\.start_new_thread|start_new_thread\(", line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "use asprof.osthreads.Thread(target, name):\n" + "\n".join(offenders)


def test_the_main_thread_is_never_renamed() -> None:
    from asprof import osthreads
    from asprof.agent.loop import _name_os_thread

    assert osthreads.main_thread_native()  # pytest runs tests on the main thread
    before = Path("/proc/self/comm").read_text()
    _name_os_thread("asprof-agent")
    assert Path("/proc/self/comm").read_text() == before
