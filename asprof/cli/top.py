"""``asprof top IN... [-n N] [--by self|total|LABEL] [kind] [filters]``: the hottest frames (with
``--by LABEL``, issue #15: the share of each value of a request label, then its hottest frames)."""
from __future__ import annotations

import argparse
import shutil
import sys

from asprof.cli.common import Progress, add_input_args, add_profile_args, open_inputs, profile_from_args, read_limits


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    p = subparsers.add_parser("top", help="print the hottest frames (self and total)",
                              description="Print a table of the frames with the most self (or total) weight.")
    add_input_args(p)
    p.add_argument("-n", "--limit", type=int, default=20, metavar="N", help="rows to show (default 20; 0: all)")
    p.add_argument("--by", default="self", metavar="self|total|LABEL",
                   help="sort by self (default) or total weight; or LABEL, a request label (asprof.labels): "
                        "the share of each of its values, then each value's hottest frames (-n per value, default 5)")
    p.add_argument("--sort", choices=("self", "total"), default=None,
                   help="with --by LABEL: sort each value's frames by self (default) or total weight")
    add_profile_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from asprof.jfr.views import format_top

    if args.limit < 0:
        raise ValueError("-n must be >= 0")
    label = None if args.by in ("self", "total") else args.by  # issue #15: --by LABEL
    if label is not None:
        if not label or "=" in label:
            raise ValueError(f"--by {label!r}: expected self, total or a label name")
        args.by_label = label
    progress = Progress()
    try:
        rec = open_inputs(args.inputs, progress, read_limits(args))
        prof = profile_from_args(rec, args)
    finally:
        progress.done()
    width = shutil.get_terminal_size((120, 24)).columns
    if label is not None:
        from asprof.jfr.views.top import format_by_label

        sys.stdout.write(f"{prof.kind} profile of {rec.source} ({prof.unit}) by label {label}\n")
        n = 5 if args.limit == 20 and not {"-n", "--limit"} & set(sys.argv) else args.limit
        sys.stdout.write(format_by_label(prof, label, n, args.sort or "self", width))
        return 0
    sys.stdout.write(f"{prof.kind} profile of {rec.source} ({prof.unit})\n")
    sys.stdout.write(format_top(prof, args.limit or None, args.by, width))
    return 0
