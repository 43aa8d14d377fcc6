"""``asprof doctor`` reports who holds the profiling signals (issue #13)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import child_env, run_python


def test_a_python_handler_on_sigprof_is_a_conflict_and_sigalrm_is_not() -> None:
    r = run_python("""
        import json, signal
        def app_tick(s, f): pass
        signal.signal(signal.SIGPROF, app_tick)
        signal.signal(signal.SIGALRM, app_tick)
        from asprof.cli.doctor import diagnose
        print(json.dumps([c.__dict__ for c in diagnose(offline=True).checks if c.section == "Signals"]))
    """)
    assert r.returncode == 0, r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout.strip().splitlines()[-1])}
    prof, alrm, vt = checks["SIGPROF"], checks["SIGALRM"], checks["SIGVTALRM"]
    assert prof["status"] == "warn" and "app_tick" in prof["detail"] and "signal.signal()" in prof["detail"], prof
    assert alrm["status"] == "info" and "no conflict" in alrm["detail"], alrm
    assert vt["status"] == "ok" and "default" in vt["detail"], vt


def test_asprof_handlers_are_not_conflicts(tmp_path: Path) -> None:
    r = run_python("""
        import json, time
        import asprof
        from asprof.cli.doctor import diagnose
        p = asprof.Profiler(reporter=asprof.LocalReporter("."), reporting_interval=60, agent_metadata=asprof.NoMetadata(),
                            options=asprof.ProfilerOptions(engine="builtin"))
        r = p.start()
        checks = [c.__dict__ for c in diagnose(offline=True).checks if c.section == "Signals"]
        r.stop()
        print(json.dumps(checks))
    """, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout.strip().splitlines()[-1])}
    assert checks["SIGPROF"]["status"] == "ok" and "asprof" in checks["SIGPROF"]["detail"], checks
    assert checks["conflicts"]["status"] == "ok" and " 0 " in checks["conflicts"]["detail"], checks


def test_pid_shows_a_running_process_dispositions() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import signal, time, sys\n"
                              "signal.signal(signal.SIGPROF, lambda s, f: None)\n"
                              "signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                              "print('ready', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        r = subprocess.run([sys.executable, "-m", "asprof", "doctor", "--offline", "--json", "--pid", str(child.pid)],
                           capture_output=True, text=True, timeout=120, env=child_env())
        checks = {c["name"]: c for c in json.loads(r.stdout)["checks"] if c["section"] == "Signals"}
        assert checks[f"pid {child.pid} SIGPROF"]["detail"].startswith("caught"), checks
        assert checks[f"pid {child.pid} SIGALRM"]["detail"].startswith("ignored"), checks
        assert checks[f"pid {child.pid} SIGVTALRM"]["detail"].startswith("default"), checks
        assert "not loaded" in checks[f"pid {child.pid} asprof"]["detail"], checks
    finally:
        child.kill()
        child.wait(10)
