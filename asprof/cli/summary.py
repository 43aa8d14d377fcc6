"""``asprof summary IN...``: event counts per type, duration, threads (like ``jfr summary``)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict

from asprof.cli.common import Progress, add_input_args, open_inputs, read_limits
from asprof.jfr.reader import Recording


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    p = subparsers.add_parser("summary", help="show event counts, duration, threads and settings",
                              description="Summarize recordings: chunks, time range, events per type, threads.")
    add_input_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    return p


def _iso(ns: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def summarize(rec: Recording) -> Dict[str, Any]:
    counts = rec.counts
    c0 = rec.chunks[0] if rec.chunks else None
    settings = {s.name: s.value for s in rec.settings if s.event_id == 107 or s.name in ("interval", "wall")}
    return {
        "source": rec.source,
        "version": f"{c0.major}.{c0.minor}" if c0 else None,
        "chunks": len(rec.chunks),
        "start": _iso(rec.start_nanos) if rec.chunks else None,
        "start_nanos": rec.start_nanos,
        "duration_seconds": rec.duration_nanos / 1e9,
        "events": {k: {"count": v[0], "bytes": v[1]}
                   for k, v in sorted(counts.items(), key=lambda kv: (-kv[1][0], kv[0]))},
        "threads": sorted({t.name for t in rec.threads}),
        "settings": settings,
        "report_metadata": rec.report_metadata,
        "warnings": rec.warnings,
    }


def run(args: argparse.Namespace) -> int:
    import json

    progress = Progress()
    try:
        rec = open_inputs(args.inputs, progress, read_limits(args))
    finally:
        progress.done()
    s = summarize(rec)
    out = sys.stdout
    if args.json:
        json.dump(s, out, indent=2)
        out.write("\n")
        return 0
    out.write(f"\n {rec.source}\n\n")
    out.write(f" Version: {s['version']}\n Chunks: {s['chunks']}\n Start: {s['start']}\n")
    out.write(f" Duration: {s['duration_seconds']:.3f} s\n")
    if rec.report_metadata:
        out.write(f" Report metadata: {json.dumps(rec.report_metadata, sort_keys=True)}\n")
    if s["settings"]:
        keys = ("version", "engine", "event", "interval", "wall", "cstack", "clock", "nativemem")
        shown = [f"{k}={s['settings'][k]}" for k in keys if s["settings"].get(k) is not None]
        if shown:
            out.write(f" Settings: {', '.join(shown)}\n")
    threads = s["threads"]
    out.write(f" Threads: {len(threads)}" + (f" ({', '.join(threads[:8])}{', ...' if len(threads) > 8 else ''})"
                                             if threads else "") + "\n\n")
    w = max([len("Event Type")] + [len(k) for k in s["events"]])
    out.write(f" {'Event Type':<{w}} {'Count':>10} {'Size (bytes)':>14}\n")
    out.write(" " + "=" * (w + 26) + "\n")
    for name, v in s["events"].items():
        out.write(f" {name:<{w}} {v['count']:>10} {v['bytes']:>14}\n")
    for warn in rec.warnings:
        sys.stderr.write(f"asprof: warning: {warn}\n")
    return 0
