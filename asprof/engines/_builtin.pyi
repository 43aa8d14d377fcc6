"""asprof's built-in sampling engine (C extension, csrc/builtin/). Contract: see the module docs."""
from __future__ import annotations

from typing import Optional

python_frames: bool
python_frames_off: Optional[str]  # why python_frames is False (None when True)
compiled_version: int

def start(cpu_interval_ns: int, wall_interval_ns: int, max_frames: int = 128, cpu_mode: str = "auto") -> str: ...
def stop() -> None: ...
def running() -> bool: ...
def collect() -> tuple[
    list[tuple[str, str, str, int]],
    list[tuple[str, str]],
    list[tuple[int, ...]],
    bytes,
    int,
]: ...
def stats() -> dict[str, int]: ...
def recheck() -> None: ...  # issue #13
def batch_labels() -> list[int]: ...  # issue #15: label-set ids of the last collect()
def labels_hooked() -> bool: ...  # issue #15: samples carry label-set ids
