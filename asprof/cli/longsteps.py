"""``asprof longsteps IN... [--min 10ms] [--stack-depth N]``: asyncio event-loop steps that took
long (issue #15), each with its duration, thread, task, labels and the stacks sampled during it
(the Rust agent's ``longpolls`` decoder, for asyncio). Needs profiles recorded with
``ProfilerOptions(asyncio_steps=True)`` (the default)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import List

from asprof.cli.common import Progress, add_input_args, open_inputs, read_limits


def _duration(text: str) -> int:
    """``10ms``, ``0.5s``, ``250us``, ``1000000ns``; a bare number is milliseconds."""
    s = text.strip().lower()
    for unit, m in (("ns", 1), ("us", 1_000), ("ms", 1_000_000), ("s", 1_000_000_000)):
        if s.endswith(unit):
            num, mult = s[: -len(unit)], m
            break
    else:
        num, mult = s, 1_000_000
    try:
        v = float(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use e.g. 10ms, 0.5s)") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (a non-negative number)")
    return int(v * mult)


def _depth(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 1:
        raise argparse.ArgumentTypeError(f"invalid depth {text!r} (a positive integer)")
    return v


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "longsteps", help="asyncio event-loop steps that took long, with the stacks sampled in them",
        description="Print each asyncio event-loop step (callback or task step) of at least --min, "
                    "longest first or in time order, with its duration, thread, task, labels and the "
                    "stacks sampled during it. Inputs as for convert (.jfr, S3 .zip, directories).")
    add_input_args(p)
    p.add_argument("--min", type=_duration, default=10_000_000, metavar="DURATION",
                   help="shortest step shown (default 10ms; units ns, us, ms, s; a bare number is ms)")
    p.add_argument("--stack-depth", type=_depth, default=24, metavar="N",
                   help="frames shown per stack, from the leaf (default 24)")
    p.add_argument("--stacks", type=int, default=5, metavar="N",
                   help="distinct stacks shown per step, most sampled first (default 5; 0: all)")
    p.add_argument("--sort", choices=("time", "duration"), default="time",
                   help="order of the steps (default: time)")
    p.add_argument("-n", "--limit", type=int, default=0, metavar="N", help="steps shown at most (default all)")
    v = p.add_mutually_exclusive_group()
    v.add_argument("--python-only", dest="python", action="store_const", const="python", default="mixed",
                   help="only the Python frames of each stack")
    v.add_argument("--native-only", dest="python", action="store_const", const="native",
                   help="the native stacks as async-profiler recorded them")
    p.set_defaults(func=run)
    return p


def _when(ns: int) -> str:
    t = time.gmtime(ns // 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{(ns // 1_000_000) % 1000:03d}Z"


def run(args: argparse.Namespace) -> int:
    from asprof.jfr.steps import long_steps

    if args.limit < 0 or args.stacks < 0:
        raise ValueError("-n and --stacks must be >= 0")
    progress = Progress()
    try:
        rec = open_inputs(args.inputs, progress, read_limits(args))
        progress.stage("matching samples to steps")
        steps, total = long_steps(rec, args.min, python=args.python)
    finally:
        progress.done()
    if args.sort == "duration":
        steps.sort(key=lambda s: -s.duration_ns)
    shown = steps[: args.limit] if args.limit else steps
    out: List[str] = [f"{len(steps)} steps of at least {args.min / 1e6:g} ms "
                      f"(of {total} recorded) in {rec.source}"]
    if total == 0:
        out.append("  (no asyncio step events: profiles recorded with asyncio_steps=True and an asyncio "
                   "program on the standard event loop have them)")
    for i, st in enumerate(shown, 1):
        labels = " ".join(f"{k}={v}" for k, v in st.labels)
        out.append("")
        out.append(f"#{i}  {st.duration_ns / 1e6:.1f} ms  {_when(st.start_ns)}  thread {st.thread or '?'} "
                   f"tid={st.tid}  {st.name}" + (f"  [{labels}]" if labels else ""))
        cpu = sum(n for (k, _f), n in st.stacks.items() if k == "cpu")
        wall = sum(n for (k, _f), n in st.stacks.items() if k == "wall")
        out.append(f"    samples: {cpu} cpu, {wall} wall")
        ranked = sorted(st.stacks.items(), key=lambda kv: (-kv[1], kv[0]))
        if args.stacks:
            ranked = ranked[: args.stacks]
        for (kind, frames), n in ranked:
            out.append(f"    {n:>5} {kind}")
            for name in frames[: args.stack_depth]:
                out.append(f"            {name}")
            if len(frames) > args.stack_depth:
                out.append(f"            ... {len(frames) - args.stack_depth} more")
    sys.stdout.write("\n".join(out) + "\n")
    for w in rec.warnings:
        sys.stderr.write(f"asprof: warning: {w}\n")
    return 0
