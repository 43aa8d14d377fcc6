"""``asprof top IN... [-n N] [--by self|total] [kind] [filters]``: the hottest frames."""
from __future__ import annotations

import argparse
import shutil
import sys

from asprof.cli.common import Progress, add_input_args, add_profile_args, open_inputs, profile_from_args


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    p = subparsers.add_parser("top", help="print the hottest frames (self and total)",
                              description="Print a table of the frames with the most self (or total) weight.")
    add_input_args(p)
    p.add_argument("-n", "--limit", type=int, default=20, metavar="N", help="rows to show (default 20; 0: all)")
    p.add_argument("--by", choices=("self", "total"), default="self", help="sort by self (default) or total weight")
    add_profile_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from asprof.jfr.views import format_top

    if args.limit < 0:
        raise ValueError("-n must be >= 0")
    progress = Progress()
    try:
        rec = open_inputs(args.inputs, progress)
        prof = profile_from_args(rec, args)
    finally:
        progress.done()
    width = shutil.get_terminal_size((120, 24)).columns
    sys.stdout.write(f"{prof.kind} profile of {rec.source} ({prof.unit})\n")
    sys.stdout.write(format_top(prof, args.limit or None, args.by, width))
    return 0
