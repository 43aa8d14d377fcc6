"""Many asyncio tasks (and a few threads) churning labels under fast sampling (issue #15 safety).

Each task repeatedly picks a kind k, sets ``asprof.labels(fn=f"work_{k}")`` (half the tasks:
through the ASGI labels middleware, as a request to path ``work_k``) and computes ``work_k`` (a
function of its own per kind), yielding to the other tasks in between. A sample
whose stack is inside ``work_j`` and whose label is ``fn=work_k`` with j != k is a label
attributed to the wrong task: :func:`check` counts them.

    python tests/labels/churn.py --engine builtin --out DIR --seconds 3 --tasks 200 --threads 2
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

KINDS = 8


def _make(k: int) -> Callable[[int], int]:
    src = f"def work_{k}(n):\n    x = 0\n    for i in range(n):\n        x += i * {k + 1}\n    return x\n"
    ns: Dict[str, Any] = {}
    exec(compile(src, f"<work_{k}>", "exec"), ns)
    return ns[f"work_{k}"]  # type: ignore[no-any-return]


WORK = [_make(k) for k in range(KINDS)]


async def _request(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI application: the request's work, under the middleware's label fn=<path>."""
    k = int(scope["path"][5:])
    for n in scope["sizes"]:
        WORK[k](n)
        await asyncio.sleep(0)


_asgi: List[Any] = []


async def task(seed: int, deadline: float) -> int:
    from asprof import labels

    if not _asgi:
        from asprof.context.middleware import ASGILabels

        _asgi.append(ASGILabels(_request, key="fn", method=False))
    rnd = random.Random(seed)
    done = 0
    while time.monotonic() < deadline:
        k = rnd.randrange(KINDS)
        sizes = [rnd.randrange(200, 3000) for _ in range(rnd.randrange(1, 4))]
        if seed % 2:  # half the tasks: the labels of an ASGI request (the middleware's push and pop)
            with labels(task=str(seed % 16)):
                await _asgi[0]({"type": "http", "path": f"work_{k}", "sizes": sizes}, None, None)
            done += 1
        else:
            with labels(fn=f"work_{k}", task=str(seed % 16)):
                for n in sizes:
                    WORK[k](n)
                    await asyncio.sleep(0)
                done += 1
        await asyncio.sleep(0)
    return done


def thread_main(seed: int, deadline: float) -> None:
    from asprof import labels

    rnd = random.Random(seed)
    while time.monotonic() < deadline:
        k = rnd.randrange(KINDS)
        with labels(fn=f"work_{k}"):
            WORK[k](rnd.randrange(200, 3000))


async def main_async(tasks: int, seconds: float, churn: int) -> None:
    deadline = time.monotonic() + seconds
    alive: List["asyncio.Task[int]"] = []
    n = 0
    while time.monotonic() < deadline:
        # tasks end and new ones start: `churn` at a time, `tasks` in all over the run
        while len(alive) < churn and n < tasks:
            alive.append(asyncio.ensure_future(task(n, min(deadline, time.monotonic() + seconds * churn / tasks * 2))))
            n += 1
        if n >= tasks and not alive:
            n = 0  # start the population over until the deadline
        await asyncio.sleep(0.01)
        alive = [t for t in alive if not t.done()]
    await asyncio.gather(*alive)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="builtin")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--churn", type=int, default=100, help="tasks alive at a time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.001)
    ap.add_argument("--report", type=float, default=600.0)
    a = ap.parse_args()
    import asprof

    p = asprof.Profiler(reporter=asprof.LocalReporter(a.out), reporting_interval=a.report,
                        options=asprof.ProfilerOptions(cpu_interval=a.interval, wall_interval=0.005, engine=a.engine))
    with p.start():
        deadline = time.monotonic() + a.seconds
        ths = [threading.Thread(target=thread_main, args=(1000 + i, deadline)) for i in range(a.threads)]
        for t in ths:
            t.start()
        asyncio.run(main_async(a.tasks, a.seconds, a.churn))
        for t in ths:
            t.join()


_WORK = re.compile(r"work_(\d+)")


def check(path: str, kinds: Tuple[str, ...] = ("cpu", "wall")) -> Tuple[int, int, int]:
    """(labelled samples inside a work_ function, of them with the wrong label, unlabelled ones
    inside a work_ function) over the samples of ``kinds`` of the reports in ``path``."""
    from asprof.jfr import open_recording
    from asprof.jfr.profile import LABEL

    rec = open_recording(path)
    right = wrong = unlabelled = 0
    for kind in kinds:
        prof = rec.samples(kind, by_label="fn", python="python")
        for stack, (w, _c) in prof.stacks.items():
            names = [prof.frames[f][0] for f in stack]
            types = [prof.frames[f][1] for f in stack]
            inner = [m.group(1) for n in names if (m := _WORK.search(n))]
            if not inner:
                continue
            label = names[0] if types[0] == LABEL else ""
            m = _WORK.search(label)
            if m is None:
                unlabelled += w
            elif m.group(1) == inner[-1]:
                right += w
            else:
                wrong += w
    return right, wrong, unlabelled


if __name__ == "__main__":
    main()
