"""The external JFR readers the built-in engine's tests use as oracles, where installed."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

if TYPE_CHECKING:
    import asprof.jfr

ROOT = Path(__file__).resolve().parents[2]
_JVM = Path("/usr/lib/jvm")
JFR_TOOL: Optional[Path] = next(iter(sorted(_JVM.glob("*/bin/jfr"))), None) if _JVM.exists() else None
JAVA: Optional[str] = shutil.which("java") or (str(JFR_TOOL.with_name("java")) if JFR_TOOL else None)


def _converter() -> Optional[List[str]]:
    """async-profiler's converter: ``jfrconv`` on PATH, else its jar run with ``java``."""
    conv = shutil.which("jfrconv")
    if conv:
        return [conv]
    for jar in ("/usr/local/lib/jfr-converter.jar", "/usr/local/share/async-profiler/jfr-converter.jar"):
        if JAVA and Path(jar).exists():
            return [JAVA, "-cp", jar, "one.converter.Main"]
    return None


JFRCONV = _converter()
NO_JDK = "no JDK `jfr` tool in /usr/lib/jvm: the JDK oracle is skipped"
NO_JFRCONV = "async-profiler's jfrconv is not installed: its converter's check is skipped"


def jfr(*args: str) -> str:
    assert JFR_TOOL is not None
    out = subprocess.run([str(JFR_TOOL), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"jfr {' '.join(args)}: {out.stderr or out.stdout}"
    return out.stdout


def jfrconv_collapsed(path: Path, kind: str = "--cpu") -> str:
    """async-profiler's converter's collapsed stacks for ``path``."""
    assert JFRCONV is not None
    out_path = path.with_suffix(f".{kind.strip('-')}.collapsed")
    out = subprocess.run([*JFRCONV, kind, str(path), str(out_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"jfrconv {kind} {path.name}: {out.stderr or out.stdout}"
    return out_path.read_text()


def asprof_collapsed(rec: "asprof.jfr.Recording", kind: str) -> Dict[str, int]:
    """asprof's own reading of ``rec``: collapsed stack -> samples, for ``kind`` ("cpu", "wall")."""
    import asprof.jfr

    out: Dict[str, int] = {}
    for line in asprof.jfr.to_collapsed(rec.samples(kind)).splitlines():
        stack, _, n = line.rpartition(" ")
        out[stack] = out.get(stack, 0) + int(n)
    return out
