"""A brief hypothesis-driven run of the fuzz harness (``fuzz_jfr.py`` runs longer)."""
from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_jfr  # noqa: E402

SEEDS = fuzz_jfr.seeds(max_size=32_000)  # small seeds keep the suite fast
FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FAST
@given(st.sampled_from(range(len(SEEDS))), st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)),
                                                      min_size=1, max_size=6))
def test_byte_changes(seed: int, changes: list) -> None:
    d = bytearray(SEEDS[seed])
    for pos, val in changes:
        d[pos % len(d)] = val
    fuzz_jfr.check(bytes(d))


@FAST
@given(st.sampled_from(range(len(SEEDS))), st.integers(0, 10**7))
def test_truncation(seed: int, cut: int) -> None:
    d = SEEDS[seed]
    fuzz_jfr.check(d[: cut % len(d)])


@FAST
@given(st.binary(max_size=400))
def test_garbage_after_a_header(tail: bytes) -> None:
    head = SEEDS[-2][:68]
    fuzz_jfr.check(head + tail)
    fuzz_jfr.check(tail)


@FAST
@given(st.integers(0, 2**32), st.sampled_from(range(len(SEEDS))))
def test_random_mutations(seed: int, which: int) -> None:
    import random

    fuzz_jfr.check(fuzz_jfr.mutate(SEEDS[which], random.Random(seed)))
