"""``asprof convert IN... -o OUT [--format html|collapsed|pprof|jfr] [kind] [filters]``.

``--format jfr`` (issue #12) writes the recording itself again with its Python frames inline
(:mod:`asprof.jfr.inline`): every JFR tool then shows the Python code; kind and filters do not
apply to it."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from asprof.cli.common import Progress, add_input_args, add_profile_args, open_inputs, profile_from_args, read_limits

FORMATS = ("html", "collapsed", "pprof", "jfr")
_EXT = {"html": ".html", "collapsed": ".collapsed", "pprof": ".pb.gz", "jfr": ".inline.jfr"}


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="convert profiles to a flame graph, collapsed stacks or pprof",
        description="Convert JFR profiles (.jfr, S3 reporter .zip, or directories of them) to an "
                    "interactive HTML flame graph, collapsed stacks or pprof; or (--format jfr) to one JFR "
                    "file whose stack traces carry the Python frames, for jfrconv, JMC and the JDK jfr tool.")
    add_input_args(p)
    p.add_argument("-o", "--output", metavar="OUT",
                   help="output file ('-' for stdout; default: the first input's name with the format's extension)")
    p.add_argument("--format", "-f", choices=FORMATS,
                   help="output format (default: from OUT's extension: .html, .collapsed/.txt/.folded, "
                        ".pb.gz/.pprof, .jfr; else html). jfr: the recording with its Python frames inline "
                        "(kind and filters do not apply)")
    p.add_argument("--title", help="title of the HTML flame graph")
    p.add_argument("--by-label", metavar="LABEL", default=None,
                   help="a root frame [LABEL=value] per value of this request label (asprof.labels): in the "
                        "flame graph, click one to see only that value's samples. HTML default: 'endpoint' "
                        "(else the first label) when the profile has labels; 'none': no label frames. "
                        "pprof keeps every label as sample labels")
    add_profile_args(p)
    p.set_defaults(func=run)
    return p


def format_of(output: Optional[str]) -> str:
    if not output or output == "-":
        return "html"
    low = output.lower()
    if low.endswith((".collapsed", ".txt", ".folded")):
        return "collapsed"
    if low.endswith((".pb.gz", ".pprof", ".pb", ".gz")):
        return "pprof"
    if low.endswith(".jfr"):
        return "jfr"
    return "html"


def run(args: argparse.Namespace) -> int:
    from asprof.jfr.views import to_collapsed, to_html, to_pprof

    fmt = args.format or format_of(args.output)
    out = args.output
    if out is None:
        base = os.path.basename(os.path.normpath(args.inputs[0]))
        for ext in (".jfr", ".zip"):
            if base.endswith(ext):
                base = base[: -len(ext)]
        out = base + _EXT[fmt]
    if fmt == "jfr":
        return _run_jfr(args, out)
    progress = Progress()
    try:
        rec = open_inputs(args.inputs, progress, read_limits(args))
        progress.stage("aggregating samples")
        if fmt == "pprof":  # issue #15: request labels as pprof sample labels
            args.with_labels = True
        if args.by_label == "none":
            args.by_label = None
        elif args.by_label is None and fmt == "html":  # issue #15: labels shown in the flame graph
            from asprof.jfr.labels import context_of

            keys = context_of(rec).label_keys() if getattr(args, "kind", "") in ("auto", "cpu", "wall") else []
            args.by_label = "endpoint" if "endpoint" in keys else (keys[0] if keys else None)
        prof = profile_from_args(rec, args)
        progress.stage(f"writing {fmt}")
        if fmt == "pprof":
            data: bytes = to_pprof(prof)
        elif fmt == "collapsed":
            data = to_collapsed(prof).encode("utf-8")
        else:
            data = to_html(prof, title=args.title).encode("utf-8")
        if out == "-":
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            with open(out, "wb") as f:
                f.write(data)
    finally:
        progress.done()
    for w in rec.warnings:
        sys.stderr.write(f"asprof: warning: {w}\n")
    if not prof.stacks:
        sys.stderr.write(f"asprof: warning: no {prof.kind} samples matched\n")
    return 0


def _run_jfr(args: argparse.Namespace, out: str) -> int:
    """``--format jfr`` (issue #12): the inputs rewritten with their Python frames inline."""
    from asprof.jfr.errors import JfrError
    from asprof.jfr.inline import InlineStats, inline_recording

    if out != "-":
        for path in args.inputs:
            try:
                same = os.path.exists(out) and os.path.samefile(out, path)
            except OSError:
                same = False
            if same:
                raise JfrError("the output would overwrite an input; choose another -o", None, out)
    progress = Progress()
    stats = InlineStats()
    try:
        limits = read_limits(args)
        rec = open_inputs(args.inputs, progress, limits)
        progress.stage("writing jfr")
        data, warnings = inline_recording(rec, stats, limits)
        if out == "-":
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            with open(out, "wb") as f:
                f.write(data)
    finally:
        progress.done()
    for w in list(rec.warnings) + warnings:
        sys.stderr.write(f"asprof: warning: {w}\n")
    if stats.unmatched_python_threads:
        sys.stderr.write(f"asprof: {stats.unmatched_python_threads} of {stats.samples} samples on Python "
                         "threads had no Python stack: they keep their native frames\n")
    return 0
