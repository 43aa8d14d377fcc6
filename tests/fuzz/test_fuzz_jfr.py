"""A brief hypothesis-driven run of the fuzz harness (``fuzz_jfr.py`` runs longer)."""
from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_jfr  # noqa: E402

SEEDS = fuzz_jfr.seeds(max_size=32_000)  # small seeds keep the suite fast
CONTAINERS = fuzz_jfr.container_seeds(max_size=32_000)
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


@FAST
@given(st.sampled_from(range(len(CONTAINERS))), st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)),
                                                           min_size=1, max_size=6))
def test_container_byte_changes(seed: int, changes: list) -> None:
    d = bytearray(CONTAINERS[seed])
    for pos, val in changes:
        d[pos % len(d)] = val
    fuzz_jfr.check(bytes(d))


@FAST
@given(st.sampled_from(range(len(CONTAINERS))), st.integers(0, 10**7))
def test_container_truncation(seed: int, cut: int) -> None:
    d = CONTAINERS[seed]
    fuzz_jfr.check(d[: cut % len(d)])


@FAST
@given(st.integers(0, 2**32), st.sampled_from(range(len(CONTAINERS))))
def test_container_random_mutations(seed: int, which: int) -> None:
    import random

    fuzz_jfr.check(fuzz_jfr.mutate(CONTAINERS[which], random.Random(seed)))


@FAST
@given(st.sampled_from(range(len(CONTAINERS))), st.integers(0, 2**32 - 1), st.integers(0, 63))
def test_container_size_fields(seed: int, value: int, where: int) -> None:
    """A zip's or gzip's size, count and offset fields set to anything (headers lie)."""
    import struct

    d = bytearray(CONTAINERS[seed])
    if d[:2] == b"\x1f\x8b":
        struct.pack_into("<I", d, len(d) - 4, value)  # ISIZE
    else:
        eocd = bytes(d).rfind(b"PK\x05\x06")
        fields = [8, 10, 12, 16]  # entries on disk, entries, central directory size, offset
        local = [18, 22]          # the first entry's compressed and uncompressed sizes
        cd = bytes(d).find(b"PK\x01\x02")
        spots = [(eocd + f, "<H" if f < 12 else "<I") for f in fields] + [(o, "<I") for o in local] + \
            [(cd + o, "<I") for o in (20, 24, 42)]
        off, fmt = spots[where % len(spots)]
        struct.pack_into(fmt, d, off, value & (0xFFFF if fmt == "<H" else 0xFFFFFFFF))
    fuzz_jfr.check(bytes(d))
