"""Cost of writing the built-in engine's report (issue #11): asprof/jfrio/writer.py's fast path and
BuiltinEngine's whole report, per sample, on a synthetic batch shaped like 30 s at 1 kHz.

    python benchmarks/bench_writer.py [--samples 30000] [--stacks 2000] [--rounds 5]

The batch is what ``_builtin.collect()`` returns: 300 code objects in 20 modules, 220 native
leaves (200 of them unnamed program counters), ``--stacks`` stacks of 5-30 Python frames with a
native leaf, ``--samples`` samples (one in ten a wall-clock sample) over 11 threads. Printed: the
median over ``--rounds`` of (a) ``ChunkWriter.samples_from`` alone, per sample, and (b)
``BuiltinEngine.write_chunk`` (interning, stacks, samples, settings, finish), per report and per
sample. No C extension is needed for (a); (b) needs ``asprof.engines._builtin``.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from typing import List, Tuple


def batch(n_samples: int, n_stacks: int, start: int) -> Tuple[list, list, list, bytes]:  # type: ignore[type-arg]
    from asprof.jfrio.writer import SAMPLE

    rnd = random.Random(1)
    codes = [(f"f{i}", f"C.f{i}", f"/app/mod{i % 20}.py", i) for i in range(300)]
    natives = [(f"sym{i}", "/usr/lib/libx.so") for i in range(20)] + \
        [(f"0x7f{i:x}", "/usr/lib/liby.so") for i in range(200)]
    stacks = []
    for _ in range(n_stacks):
        pairs: List[int] = [-rnd.randrange(len(natives)) - 1, 0]
        for _ in range(rnd.randrange(5, 30)):
            pairs += [rnd.randrange(len(codes)), rnd.randrange(1, 500)]
        stacks.append(tuple(pairs))
    pid = os.getpid()
    samples = b"".join(SAMPLE.pack(start + i * 1_000_000, pid if i % 2 else 1 + i % 10, rnd.randrange(n_stacks),
                                   1 if i % 10 == 0 else 0, 2 if i % 10 == 0 else 0, 0) for i in range(n_samples))
    return codes, natives, stacks, samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=30000)
    ap.add_argument("--stacks", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from asprof.jfrio.writer import FRAME_PYTHON, ChunkWriter, clock_pair

    start = clock_pair()
    end = (start[0] + 30 * 10**9, start[1] + 30 * 10**9)
    codes, natives, stacks, samples = batch(args.samples, args.stacks, start[1])
    fast: List[float] = []
    for _ in range(args.rounds):
        w = ChunkWriter(*start)
        keys = [w.stack([(w.python_method("m", f"f{j}"), 1, FRAME_PYTHON)]) for j in range(args.stacks)]
        t = time.perf_counter()
        w.samples_from(samples, keys)
        fast.append((time.perf_counter() - t) / args.samples * 1e6)
    print(f"samples_from: {statistics.median(fast):.2f} us/sample (median of {args.rounds})")
    try:
        from asprof.engines.builtin import BuiltinEngine
        from asprof.options import ProfilerOptions

        eng = BuiltinEngine(ProfilerOptions(cpu_interval=0.001, wall_interval=0.01))
    except Exception as e:  # noqa: BLE001
        print(f"BuiltinEngine.write_chunk: skipped ({e})")
        return 0
    whole: List[float] = []
    size = 0
    for _ in range(args.rounds):
        t = time.perf_counter()
        size = len(eng.write_chunk(start, end, codes, natives, stacks, samples, 0))
        whole.append(time.perf_counter() - t)
    eng.close()
    m = statistics.median(whole)
    print(f"BuiltinEngine.write_chunk: {m * 1e3:.1f} ms per report of {args.samples} samples, "
          f"{m / args.samples * 1e6:.2f} us/sample, {size} bytes (load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
