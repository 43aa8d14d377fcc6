"""The built-in engine's C sample encoder (``_builtin.encode``) writes exactly the bytes of the
JFR writer's Python encoder (``ChunkWriter.samples_from``), and refuses the same bad records."""
from __future__ import annotations

import random
import struct

import pytest

from asprof.jfrio.writer import SAMPLE, ChunkWriter

_builtin = pytest.importorskip("asprof.engines._builtin", reason="the built-in engine's C module is not built")

if not hasattr(_builtin, "encode"):  # pragma: no cover - an older build in place
    pytest.skip("this build of _builtin has no encode()", allow_module_level=True)


def _records(rng: random.Random, n: int, nstacks: int, tids: list[int]) -> bytes:
    out = bytearray()
    t = rng.choice([5, 1 << 20, 1 << 40, (1 << 63) + 12345])
    for _ in range(n):
        t += rng.choice([0, 1, 999, 1_000_000, 1 << 22])
        t &= (1 << 64) - 1
        kind = rng.randrange(2)
        state = rng.randrange(3)
        out += SAMPLE.pack(t, rng.choice(tids), rng.randrange(nstacks), kind, state, rng.randrange(3))
    return bytes(out)


def _both(samples: bytes, keys: list[int], skip: set[int]) -> tuple[ChunkWriter, ChunkWriter]:
    a, b = ChunkWriter(0, 0), ChunkWriter(0, 0)
    a.samples_from(samples, keys, skip)
    b.add_encoded(*_builtin.encode(samples, keys, skip))
    return a, b


@pytest.mark.parametrize("seed", range(6))
def test_encode_matches_the_python_writer(seed: int) -> None:
    rng = random.Random(seed)
    tids = [rng.choice([1, 127, 128, 16383, 16384, 2_000_000, 2**32 - 1]) for _ in range(rng.randrange(1, 9))]
    nstacks = rng.randrange(1, 300)
    keys = [rng.choice([rng.randrange(1, 128), rng.randrange(128, 1 << 20), rng.randrange(1 << 20, 1 << 62)])
            for _ in range(nstacks)]
    samples = _records(rng, rng.randrange(0, 3000), nstacks, tids)
    skip = set(rng.sample(tids, rng.randrange(0, len(tids))))
    a, b = _both(samples, keys, skip)
    assert bytes(b._events) == bytes(a._events)
    assert b.samples == a.samples and b.last_ticks == a.last_ticks
    assert b.thread_ids == a.thread_ids
    assert not (set(b.thread_ids) & skip)


def test_encode_many_threads() -> None:
    """More threads than the encoder's own small table holds: still every event, every thread."""
    rng = random.Random(7)
    tids = list(range(1000, 2200))
    samples = _records(rng, 5000, 10, tids)
    a, b = _both(samples, list(range(1, 11)), set(tids[::3]))
    assert bytes(b._events) == bytes(a._events) and b.thread_ids == a.thread_ids


@pytest.mark.parametrize("kind,state,sid", [(2, 0, 0), (0, 3, 0), (1, 0, 5)])
def test_encode_refuses_what_the_writer_refuses(kind: int, state: int, sid: int) -> None:
    bad = SAMPLE.pack(1000, 7, sid, kind, state, 0)
    with pytest.raises(ValueError):
        ChunkWriter(0, 0).samples_from(bad, [1, 2], ())
    with pytest.raises(ValueError):
        _builtin.encode(bad, [1, 2], set())
    # a record of a skipped thread is not looked at
    assert _builtin.encode(bad, [1, 2], {7})[1] == 0


def test_encode_refuses_a_torn_buffer() -> None:
    with pytest.raises(ValueError):
        _builtin.encode(b"\0" * 19, [1], set())
    assert struct.calcsize("<QIIBBH") == 20
