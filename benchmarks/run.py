"""asprof benchmarks: one command, every ratio measured side by side in one run.

    python benchmarks/run.py            # the full run (~10 min on 2 cores)
    python benchmarks/run.py --quick    # a smoke run (< 1 min)
    python benchmarks/run.py --json results.json

Build the extension first (``python setup.py build_ext --inplace``). Every
measurement runs in a fresh interpreter (``benchmarks/workload.py``) so that
async-profiler's process-global state never leaks from one configuration to
the next; configurations are interleaved in a shuffled order every round and
compared by medians against the baseline measured in the same run. See
benchmarks/README.md for what is measured and the numbers we got.
"""
from __future__ import annotations

import argparse
import compileall
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKLOAD = os.path.join(HERE, "workload.py")

DEFAULTS: Dict[str, Any] = {}  # ProfilerOptions() as it is
FAST: Dict[str, Any] = {"cpu_interval": 0.001, "wall_interval": 0.01}
FAST_INTERVAL = 1.0

# ------------------------------------------------------------------ helpers


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:+.{digits}f}%"


BENCH_SITE = ""  # the benchmark venv's site-packages (pyroscope-io), on every child's path when set


def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    path = [ROOT] + ([BENCH_SITE] if BENCH_SITE else []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.pop("ASPROF_LIB", None)
    return env


def run_child(args: List[str], timeout: float = 600) -> Dict[str, Any]:
    cmd = [sys.executable, WORKLOAD, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    out: Dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(str(h))] + [len(str(r[i])) for r in rows]) for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def machine() -> Dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "memory": mem, "kernel": platform.release(),
            "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})"}


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


class Verdicts:
    def __init__(self) -> None:
        self.rows: List[Tuple[str, str, str, str]] = []

    def add(self, target: str, measured: str, status: str, note: str = "") -> None:
        self.rows.append((target, measured, status, note))


# ------------------------------------------------------------------ configurations


class Config:
    def __init__(self, name: str, label: str, profiler: str, opts: Optional[Dict[str, Any]] = None,
                 interval: float = 30.0, extra: Sequence[str] = ()) -> None:
        self.name = name
        self.label = label
        self.profiler = profiler
        self.opts = dict(opts or {})
        self.interval = interval
        self.extra = list(extra)

    def args(self, lib: str, units: int) -> List[str]:
        a = ["run", "--profiler", self.profiler, "--units", str(units), "--lib", lib]
        if self.profiler in ("aprof", "agent"):
            a += ["--command", start_command(self.opts)]
        if self.profiler == "agent":
            a += ["--opts", json.dumps(self.opts), "--interval", str(self.interval)]
        return a + self.extra


def start_command(opts: Dict[str, Any]) -> str:
    import asprof

    return asprof.ProfilerOptions(**opts).start_command()


def run_rounds(configs: Sequence[Config], rounds: int, lib: str, units: int, section: str,
               rng: random.Random) -> Dict[str, List[Dict[str, Any]]]:
    """Every configuration once per round, in a shuffled order; results[name][round]."""
    results: Dict[str, List[Dict[str, Any]]] = {c.name: [] for c in configs}
    total = rounds * len(configs)
    n = 0
    for r in range(rounds):
        order = list(configs)
        rng.shuffle(order)
        for c in order:
            n += 1
            res = run_child(c.args(lib, units))
            res["round"] = r
            results[c.name].append(res)
            log(f"  [{section} {n}/{total}] round {r + 1} {c.name:14s} wall {res['wall_s']:.3f} s")
    return results


def paired(results: Dict[str, List[Dict[str, Any]]], name: str, base: str, key: str = "wall_s") -> List[float]:
    """Per-round ratio name/base (same round), as percent overhead."""
    by_round = {r["round"]: r[key] for r in results[base]}
    return [(r[key] / by_round[r["round"]] - 1) * 100 for r in results[name] if r["round"] in by_round]


# ------------------------------------------------------------------ sections


def section_overhead(ctx: "Ctx") -> None:
    print("\n## 1. Overhead on the mixed workload")
    agent_default = Config("agent-default", "agent, defaults (cpu 100 ms, wall 1 s, report every 30 s)",
                           "agent", DEFAULTS, 30.0)
    agent_fast = Config("agent-fast", "agent, cpu 1 ms, wall 10 ms, report every 1 s",
                        "agent", FAST, FAST_INTERVAL)
    configs = [
        Config("unprofiled", "unprofiled (baseline)", "none"),
        Config("unprofiled-b", "unprofiled again (A/A: the noise)", "none"),
        Config("import-only", "import asprof, never started", "import"),
        Config("aprof-default", "async-profiler alone (ctypes), defaults", "aprof", DEFAULTS),
        agent_default,
        Config("aprof-fast", "async-profiler alone (ctypes), cpu 1 ms, wall 10 ms", "aprof", FAST),
        agent_fast,
    ]
    if ctx.has_python_frames:
        configs.append(Config("agent-fast-nopf", "agent-fast with python_frames=False", "agent",
                              {**FAST, "python_frames": False}, FAST_INTERVAL))
    print(f"{ctx.rounds} rounds x {len(configs)} configurations, each a fresh process doing "
          f"{ctx.units} work units on each of 2 busy threads (~{ctx.seconds:g} s unprofiled) + 1 sleeping thread.")
    for c in configs:
        if c.profiler in ("aprof", "agent"):
            print(f"  {c.name:16s} {start_command(c.opts)}")
    res = run_rounds(configs, ctx.rounds, ctx.lib, ctx.units, "overhead", ctx.rng)
    ctx.data["overhead"] = res

    base = "unprofiled"
    rows = []
    summary: Dict[str, Dict[str, float]] = {}
    for c in configs:
        rs = res[c.name]
        wall = median([r["wall_s"] for r in rs])
        ov = median(paired(res, c.name, base)) if c.name != base else 0.0
        cpu_ov = median(paired(res, c.name, base, "cpu_s")) if c.name != base else 0.0
        agent_share = median([r["agent_cpu_s"] / r["cpu_s"] * 100 for r in rs])
        aprof_share = median([r["aprof_cpu_s"] / r["cpu_s"] * 100 for r in rs])
        rss = median([r["rss_kb"] for r in rs]) / 1024
        start = median([r["start_s"] for r in rs]) * 1e3
        summary[c.name] = {"wall": wall, "overhead": ov, "cpu_overhead": cpu_ov, "agent_share": agent_share,
                           "aprof_share": aprof_share, "rss_mb": rss, "start_ms": start}
        rows.append([c.name, f"{wall:.3f}", pct(ov), pct(cpu_ov), f"{agent_share:.3f}%", f"{aprof_share:.3f}%",
                     f"{rss:.1f}", f"{start:.1f}" if c.profiler != "none" else "-"])
    print()
    print(table(["configuration", "wall s", "wall vs base", "CPU vs base", "agent thr CPU", "a-p thr CPU",
                 "RSS MB", "start ms"], rows))
    print("wall/CPU vs base: median over rounds of (config / unprofiled of the same round) - 1.\n"
          "agent thr CPU: CPU time of the agent's own threads (asprof-agent, and native threads asprof starts,\n"
          "such as the Python-stack drainer); a-p thr CPU: of async-profiler's own threads (its timer thread and,\n"
          "with wall-clock sampling, its wall-clock sampler); both as a share of the process's CPU time over the\n"
          "timed window, from /proc/self/task/*/schedstat. CPU samples are taken in signal handlers on the\n"
          "sampled threads: that cost is in the wall and CPU columns, not in the thread shares.")
    for c in configs:
        rs = res[c.name]
        if c.profiler in ("aprof", "agent"):
            print(f"  threads of {c.name}: async-profiler {median([r['aprof_threads'] for r in rs]):.0f}, "
                  f"asprof native {median([r['agent_native_threads'] for r in rs]):.0f}"
                  + (" + asprof-agent" if c.profiler == "agent" else "")
                  + f"; agent thread {median([r['agent_thread_cpu_s'] / r['cpu_s'] * 100 for r in rs]):.3f}%, "
                  f"asprof native {median([r['agent_native_cpu_s'] / r['cpu_s'] * 100 for r in rs]):.3f}%")

    aa = [abs(x) for x in paired(res, "unprofiled-b", base)]
    aa_cpu = [abs(x) for x in paired(res, "unprofiled-b", base, "cpu_s")]
    aa_med, aa_cpu_med = median(aa), median(aa_cpu)
    ctx.noise = aa_med
    print(f"\nA/A noise (|unprofiled-b / unprofiled - 1| over rounds): wall median {aa_med:.2f}% (max {max(aa):.2f}%), "
          f"process CPU median {aa_cpu_med:.2f}% (max {max(aa_cpu):.2f}%)")

    def diff(a: str, b: str, key: str = "wall_s") -> float:
        by_round = {r["round"]: r[key] for r in res[b]}
        return median([(r[key] / by_round[r["round"]] - 1) * 100 for r in res[a] if r["round"] in by_round])

    d_def, d_fast = diff("agent-default", "aprof-default"), diff("agent-fast", "aprof-fast")
    c_def, c_fast = diff("agent-default", "aprof-default", "cpu_s"), diff("agent-fast", "aprof-fast", "cpu_s")
    print(f"agent vs async-profiler alone (paired per round): defaults wall {pct(d_def)}, CPU {pct(c_def)}; "
          f"fast rates wall {pct(d_fast)}, CPU {pct(c_fast)}")
    s_def = summary["agent-default"]
    s_fast = summary["agent-fast"]
    s_afast = summary["aprof-fast"]
    s_adef = summary["aprof-default"]
    extra_fast = (s_fast["agent_share"] + s_fast["aprof_share"]) - s_afast["aprof_share"]
    extra_def = (s_def["agent_share"] + s_def["aprof_share"]) - s_adef["aprof_share"]
    print(f"threads' CPU the agent adds over async-profiler alone: defaults {extra_def:+.3f} points, "
          f"fast {extra_fast:+.3f} points")
    if ctx.has_python_frames:
        print(f"python_frames at fast rates (agent-fast vs agent-fast-nopf, paired): "
              f"wall {pct(diff('agent-fast', 'agent-fast-nopf'))}, CPU {pct(diff('agent-fast', 'agent-fast-nopf', 'cpu_s'))}")
    ctx.summary["overhead"] = summary

    v = ctx.verdicts

    def verdict(wall: float, cpu: float, budget: float, thread_extra: float) -> str:
        """wall, cpu: measured overhead (percent) that must stay within budget (points).
        Decided by wall time when the machine is quiet enough (A/A), else by process CPU time."""
        threads = "threads' CPU " + ("within" if thread_extra <= budget else "OVER") + " budget"
        for name, x, noise in (("wall", wall, aa_med), ("CPU", cpu, aa_cpu_med)):
            if noise > budget:
                continue  # this measure is noisier than the budget: it cannot decide
            if x <= budget:
                return f"MET ({name}); {threads}"
            if x <= budget + noise:
                return f"MET within noise ({name}); {threads}"
            return f"NOT MET ({name}); {threads}"
        return f"INCONCLUSIVE (A/A wall ±{aa_med:.1f}%, CPU ±{aa_cpu_med:.1f}%); {threads}"

    v.add("agent at defaults <= 0.5% overhead",
          f"wall {pct(s_def['overhead'])}, CPU {pct(s_def['cpu_overhead'])} (A/A ±{aa_med:.2f}% / "
          f"±{aa_cpu_med:.2f}%); agent threads' extra CPU {extra_def:+.3f} pt",
          verdict(s_def["overhead"], s_def["cpu_overhead"], 0.5, extra_def))
    v.add("agent at 1 ms/10 ms <= async-profiler alone + 1 pt",
          f"agent - alone, paired: wall {pct(d_fast)}, CPU {pct(c_fast)}; extra threads' CPU {extra_fast:+.3f} pt",
          verdict(d_fast, c_fast, 1.0, extra_fast))
    imp = summary["import-only"]["overhead"]
    imp_cpu = summary["import-only"]["cpu_overhead"]
    v.add("import alone does not slow the workload", f"wall {pct(imp)}, CPU {pct(imp_cpu)} "
          f"(A/A ±{aa_med:.2f}% / ±{aa_cpu_med:.2f}%)",
          "MET (within A/A noise)" if imp <= max(aa_med, 0.5) or imp_cpu <= max(aa_cpu_med, 0.5) else "NOT MET")
    rs = res["agent-default"]
    imp_mb = median([(r["rss_imported_kb"] - r["rss_before_kb"]) / 1024 for r in rs])
    start_mb = median([(r["rss_started_kb"] - r["rss_imported_kb"]) / 1024 for r in rs])
    imp_ms = median([r["import_s"] * 1e3 for r in rs])
    ap = res["aprof-default"]
    ap_start_mb = median([(r["rss_started_kb"] - r["rss_before_kb"]) / 1024 for r in ap])
    print(f"agent at defaults: importing asprof and its names takes {imp_ms:.1f} ms and {imp_mb:.1f} MB RSS, "
          f"starting adds {start_mb:.1f} MB (async-profiler alone: {ap_start_mb:.1f} MB at start)")
    rss_agent = s_def["rss_mb"] - s_adef["rss_mb"]
    rss_agent_fast = s_fast["rss_mb"] - s_afast["rss_mb"]
    base_rss = summary["unprofiled"]["rss_mb"]
    print(f"RSS: async-profiler alone adds {s_adef['rss_mb'] - base_rss:.1f} MB (defaults) / "
          f"{s_afast['rss_mb'] - base_rss:.1f} MB (fast); the agent adds {rss_agent:+.1f} MB / {rss_agent_fast:+.1f} MB "
          f"on top (import asprof included)")
    v.add("agent adds <= 5 MB RSS over async-profiler's own",
          f"{rss_agent:+.1f} MB at defaults, {rss_agent_fast:+.1f} MB at fast rates "
          f"(async-profiler's own: {s_adef['rss_mb'] - base_rss:.1f} / {s_afast['rss_mb'] - base_rss:.1f} MB)",
          "MET" if max(rss_agent, rss_agent_fast) <= 5 else "NOT MET")


def section_rotation(ctx: "Ctx") -> None:
    print("\n## 2. Samples kept across rotations")
    units = max(20, int(ctx.units * ctx.rotation_seconds / ctx.seconds))
    configs = [
        Config("one-recording", "async-profiler alone, one recording", "aprof", FAST, extra=["--count"]),
        Config("agent-1h", "agent, no rotation (interval 1 h)", "agent", FAST, 3600.0, extra=["--count"]),
        Config("rotated-1s", "agent, a rotation every 1 s", "agent", FAST, FAST_INTERVAL, extra=["--count"]),
        Config("full-1s", "agent, a full rotation (stop, swap, start) every 1 s", "agent", FAST, FAST_INTERVAL,
               extra=["--count", "--full-rotation"]),
    ]
    print(f"cpu 1 ms / wall 10 ms, ~{ctx.rotation_seconds:g} s of the workload, {ctx.rot_rounds} rounds. "
          "CPU samples are normalised by the process's CPU time\nin the window, wall-clock samples by its length "
          "(both configurations have the same threads: the single recording\ngets an idle thread in place of "
          "asprof-agent).")
    res = run_rounds(configs, ctx.rot_rounds, ctx.lib, units, "rotation", ctx.rng)
    ctx.data["rotation"] = res
    rows = []
    per: Dict[str, Dict[str, float]] = {}
    for c in configs:
        rs = res[c.name]
        cps = median([r["cpu_samples_window"] / r["cpu_s"] for r in rs])
        wps = median([r["wall_samples_window"] / r["wall_s"] for r in rs])
        per[c.name] = {"cpu_per_cpu_s": cps, "wall_per_s": wps}
        rows.append([c.name, f"{median([r['wall_s'] for r in rs]):.2f}", f"{median([r['cpu_s'] for r in rs]):.2f}",
                     f"{median([r['cpu_samples_window'] for r in rs]):.0f}", f"{cps:.1f}",
                     f"{median([r['wall_samples_window'] for r in rs]):.0f}", f"{wps:.1f}",
                     f"{median([r['cpu_samples'] for r in rs]):.0f}",
                     f"{median([r['files'] for r in rs]):.0f}/{median([r['chunks'] for r in rs]):.0f}"])
    print()
    print(table(["configuration", "window s", "CPU s", "CPU samples", "per CPU-s", "wall samples", "per s",
                 "all CPU samples", "files/chunks"], rows))
    print("Samples counted in the timed window (after start, before stop: the same window for both), from\n"
          "their JFR timestamps; 'all CPU samples' includes those taken during start and stop.")
    def ratios(name: str, base: str, samples: str, per: str) -> List[float]:
        by_round = {r["round"]: r for r in res[base]}
        return [(r[samples] / r[per]) / (by_round[r["round"]][samples] / by_round[r["round"]][per]) * 100
                for r in res[name] if r["round"] in by_round]

    cpu_ratios = ratios("rotated-1s", "one-recording", "cpu_samples_window", "cpu_s")
    # the agent's process may have more threads (asprof's native ones) for wall-clock sampling:
    # compare its wall-clock samples with the agent's own that does not rotate
    wall_ratios = ratios("rotated-1s", "agent-1h", "wall_samples_window", "wall_s")
    rot_only = ratios("rotated-1s", "agent-1h", "cpu_samples_window", "cpu_s")
    agent_only = ratios("agent-1h", "one-recording", "cpu_samples_window", "cpu_s")
    kept = median(cpu_ratios)
    full_ratios = ratios("full-1s", "one-recording", "cpu_samples_window", "cpu_s")
    print(f"CPU samples kept, rotated vs one recording (per CPU-second, paired per round): median {kept:.2f}% "
          f"(rounds: {', '.join(f'{x:.1f}%' for x in cpu_ratios)})")
    print(f"  of which the rotations (rotated-1s vs agent-1h): {median(rot_only):.2f}%, and the agent without "
          f"rotating (agent-1h vs one-recording): {median(agent_only):.2f}%")
    print(f"wall-clock samples per second, rotated vs agent-1h: median {median(wall_ratios):.2f}% "
          f"(rounds: {', '.join(f'{x:.1f}%' for x in wall_ratios)})")
    print(f"for comparison, full rotations (stop, swap, start) every 1 s: median {median(full_ratios):.2f}% "
          f"(rounds: {', '.join(f'{x:.1f}%' for x in full_ratios)}); asprof does one every 10 minutes")
    ctx.summary["rotation"] = {"kept_pct": kept, "wall_kept_pct": median(wall_ratios),
                               "rotation_only_pct": median(rot_only), "agent_only_pct": median(agent_only),
                               "full_rotation_kept_pct": median(full_ratios), **per}
    ctx.verdicts.add("samples kept across 1 s rotations >= 99%", f"{kept:.2f}% (CPU samples per CPU-s)",
                     "MET" if kept >= 99 else "NOT MET")


def section_tick(ctx: "Ctx") -> None:
    print("\n## 3. Duration of a tick (a dump; and a full rotation: stop -> swap -> start)")
    configs = [
        ("fast/gil-free", {**FAST}, "nogil"),
        ("fast/mixed", {**FAST}, "mixed"),
        ("default/mixed", dict(DEFAULTS), "mixed"),
        ("fast/mixed/kernel", {**FAST, "all_user": False}, "mixed"),
        ("fast/gil-free/full", {**FAST}, "nogil/full"),
    ]
    print(f"NativeEngine.tick() every 1 s, {ctx.ticks} ticks per process, {ctx.tick_rounds} rounds, while two threads "
          "are busy and one sleeps.\n'gil-free': the busy threads hash 2 MiB buffers (CPU-bound, GIL released), so "
          "the caller gets the GIL back at once;\n'mixed': the busy threads run the mixed workload, and the time "
          "includes waiting for the GIL after the native call.")
    res: Dict[str, List[Dict[str, Any]]] = {c[0]: [] for c in configs}
    n = 0
    for _round in range(ctx.tick_rounds):
        order = list(configs)
        ctx.rng.shuffle(order)
        for name, opts, load in order:
            n += 1
            out = run_child(["tick", "--lib", ctx.lib, "--opts", json.dumps(opts), "--interval", "1",
                             "--ticks", str(ctx.ticks), "--load", load.split("/")[0]]
                            + (["--full-rotation"] if load.endswith("/full") else []))
            res[name].append(out)
            log(f"  [tick {n}/{ctx.tick_rounds * len(configs)}] {name:18s} median {median(out['tick_ms']):.2f} ms")
    ctx.data["tick"] = res
    rows = []
    summ: Dict[str, Dict[str, float]] = {}
    for name, _opts, _load in configs:
        t = [x for o in res[name] for x in o["tick_ms"]]
        c = [x for o in res[name] for x in o["tick_cpu_ms"]]
        g = [x for o in res[name] for x in o["gap_ms"]]
        sg = [x for o in res[name] for x in o["sample_gap_ms"]]
        b = [x for o in res[name] for x in o["bytes"]]
        p90 = sorted(t)[int(0.9 * (len(t) - 1))] if t else float("nan")
        sp99 = median([o["spacing_p99_ms"] for o in res[name] if o["spacing_p99_ms"] is not None])
        spmax = max([o["spacing_max_ms"] for o in res[name] if o["spacing_max_ms"] is not None] or [float("nan")])
        summ[name] = {"median": median(t), "p90": p90, "max": max(t), "cpu": median(c),
                      "gap_median": median(g), "gap_max": max(g) if g else float("nan"),
                      "sample_gap_median": median(sg), "sample_gap_max": max(sg) if sg else float("nan"),
                      "spacing_p99": sp99, "spacing_max": spmax}
        rows.append([name, str(len(t)), f"{median(t):.2f}", f"{p90:.2f}", f"{max(t):.2f}",
                     f"{median(c):.2f} / {max(c):.2f}",
                     f"{median(g):.2f} / {max(g):.2f}" if g else "-",
                     f"{median(sg):.1f} / {max(sg):.1f}" if sg else "-", f"{sp99:.1f} / {spmax:.1f}",
                     f"{median(b) / 1024:.0f}"])
    print()
    print(table(["configuration", "ticks", "tick ms med", "p90", "max", "CPU ms med/max", "rec. gap ms med/max",
                 "sample gap med/max", "spacing p99/max", "KiB"], rows))
    print("tick ms: NativeEngine.tick() as the agent thread sees it: async-profiler's dump (the current chunk\n"
          "finished, the next opened, sampling never stops), reading the finished chunk into bytes and freeing it\n"
          "from the file; '/full' rows: a full rotation (stop, swap, start), which asprof does every 10 minutes\n"
          "or when a chunk's constant pool passes 8 MiB. CPU ms: the calling thread's CPU time for it. rec. gap: from the end of one JFR\n"
          "chunk to the start of the next (async-profiler's own timestamps). sample gap: from the last CPU sample\n"
          "before a rotation to the first after it; spacing: between consecutive CPU samples inside the\n"
          "recordings, for comparison (at defaults, 100 ms of CPU between samples makes both large).")
    ctx.summary["tick"] = summ
    s = summ["fast/gil-free"]
    cpu_max = max(x for o in res["fast/gil-free"] for x in o["tick_cpu_ms"])
    full = summ["fast/gil-free/full"]
    print(f"A full rotation, for comparison: median {full['median']:.2f} ms, max {full['max']:.2f} ms, "
          f"recording gap median {full['gap_median']:.2f} ms.")
    ctx.verdicts.add("tick (a dump) <= 5 ms (median and max)",
                     f"median {s['median']:.2f} ms, max {s['max']:.2f} ms (gil-free, fast rates; its CPU: median "
                     f"{s['cpu']:.2f}, max {cpu_max:.2f} ms); recording gap median {s['gap_median']:.2f}, "
                     f"max {s['gap_max']:.2f} ms",
                     ("MET" if s["median"] <= 5 and s["max"] <= 5 else
                      ("median MET, max NOT MET" if s["median"] <= 5 else "NOT MET"))
                     + ("; CPU within 5 ms: the rest is waiting for a core" if (s["median"] > 5 or s["max"] > 5)
                        and cpu_max <= 5 else ""),
                     "max is sensitive to other processes on the machine")
    d = summ["default/mixed"]
    share = d["cpu"] / 1e3 / 30.0 / 2 * 100
    print(f"At defaults a tick costs the agent thread ~{d['cpu']:.2f} ms CPU per 30 s interval: "
          f"{share:.4f}% of 2 busy cores.")


IMPORT_SNIPPET = r"""
import sys, time
for m in filter(None, sys.argv[1].split(",")):
    __import__(m)
names = list(filter(None, sys.argv[2].split(",")))
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
r0 = rss(); n0 = len(sys.modules)
t0 = time.perf_counter()
import asprof
for n in names:
    getattr(asprof, n)
dt = time.perf_counter() - t0
print(dt, rss() - r0, len(sys.modules) - n0, int("asprof._native" in sys.modules))
"""
# Modules a typical service has loaded before it imports asprof.
APP_PRELOAD = "logging,dataclasses,typing,re,threading,datetime,json,enum,collections,abc"


def importtime_breakdown(code: str) -> List[Tuple[str, int, int]]:
    """(module, self µs, cumulative µs) of what `code` imports, from -X importtime."""
    def parse(code: str) -> Dict[str, Tuple[int, int]]:
        p = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                           env=child_env())
        out = {}
        for line in p.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            parts = line[len("import time:"):].split("|")
            if len(parts) == 3:
                out[parts[2].strip()] = (int(parts[0]), int(parts[1]))
        return out

    base = parse("pass")
    full = parse(code)
    return sorted(((m, s, c) for m, (s, c) in full.items() if m not in base), key=lambda x: -x[1])


IMPORT_VARIANTS = [
    ("import asprof", "", ""),
    ("+ names to start", "", "Profiler,ProfilerOptions,LocalReporter"),
    ("+ names, stdlib preloaded", APP_PRELOAD, "Profiler,ProfilerOptions,LocalReporter"),
]


def section_import(ctx: "Ctx") -> None:
    print("\n## 4. import asprof")
    res: Dict[str, List[List[float]]] = {v[0]: [] for v in IMPORT_VARIANTS}
    for _ in range(ctx.import_runs):
        order = list(IMPORT_VARIANTS)
        ctx.rng.shuffle(order)
        for name, pre, names in order:
            p = subprocess.run([sys.executable, "-c", IMPORT_SNIPPET, pre, names], capture_output=True, text=True,
                               env=child_env(), check=True)
            res[name].append([float(x) for x in p.stdout.split()])
    ctx.data["import"] = res
    rows = []
    for name, _pre, _names in IMPORT_VARIANTS:
        rs = res[name]
        rows.append([name, str(len(rs)), f"{median([r[0] for r in rs]) * 1e3:.1f}",
                     f"{min(r[0] for r in rs) * 1e3:.1f}", f"{median([r[1] for r in rs]) / 1024:.1f}",
                     f"{median([r[2] for r in rs]):.0f}", "yes" if any(r[3] for r in rs) else "no"])
    print(f"A fresh interpreter each time, {ctx.import_runs} runs of each variant, interleaved.")
    print(table(["variant", "runs", "median ms", "min ms", "RSS MB", "new modules", "loads _native"], rows))
    print("'+ names to start': then asprof.Profiler, asprof.ProfilerOptions and asprof.LocalReporter are looked up\n"
          "(what an application needs before starting; asprof's names are imported lazily).\n"
          f"'stdlib preloaded': {APP_PRELOAD} imported first, as a typical service has.")
    top = importtime_breakdown("import asprof; asprof.Profiler; asprof.ProfilerOptions; asprof.LocalReporter")
    if top:
        print("largest self times for import + names, -X importtime, one run (µs): " +
              ", ".join(f"{m} {s}" for m, s, _c in top[:10]))
    plain = median([r[0] for r in res["import asprof"]]) * 1e3
    full = median([r[0] for r in res["+ names to start"]]) * 1e3
    warm = median([r[0] for r in res["+ names, stdlib preloaded"]]) * 1e3
    ctx.summary["import"] = {"import_ms": plain, "names_ms": full, "names_warm_ms": warm}
    ctx.verdicts.add("import asprof <= 15 ms", f"{plain:.1f} ms; with the names to start {full:.1f} ms "
                     f"({warm:.1f} ms with stdlib preloaded)",
                     "MET" if full <= 15 else ("MET (plain import); names " + ("MET warm" if warm <= 15 else "NOT MET")
                                               if plain <= 15 else "NOT MET"))


def section_all_user(ctx: "Ctx") -> None:
    print("\n## 5. all_user (async-profiler's alluser): RSS and start-up")
    units = max(20, int(ctx.units * ctx.startup_seconds / ctx.seconds))
    configs = [
        Config("unprofiled", "baseline", "none"),
        Config("agent all_user=True", "", "agent", {"all_user": True}),
        Config("agent all_user=False", "", "agent", {"all_user": False}),
        Config("a-p alone alluser", "", "aprof", {"all_user": True}),
        Config("a-p alone kernel", "", "aprof", {"all_user": False}),
    ]
    print(f"Default rates, ~{ctx.startup_seconds:g} s of the workload, {ctx.startup_rounds} rounds. "
          "start = the start call (loading async-profiler included); RSS after start and after the workload.")
    res = run_rounds(configs, ctx.startup_rounds, ctx.lib, units, "all_user", ctx.rng)
    ctx.data["all_user"] = res
    base_rss = median([r["rss_kb"] for r in res["unprofiled"]]) / 1024
    base_start = median([r["rss_started_kb"] for r in res["unprofiled"]]) / 1024
    rows = []
    summ = {}
    for c in configs[1:]:
        rs = res[c.name]
        st = median([r["start_s"] for r in rs]) * 1e3
        rss_s = median([r["rss_started_kb"] for r in rs]) / 1024 - base_start
        rss = median([r["rss_kb"] for r in rs]) / 1024 - base_rss
        hwm = median([r["hwm_kb"] for r in rs]) / 1024 - base_rss
        stop = median([r["stop_s"] for r in rs]) * 1e3
        summ[c.name] = {"start_ms": st, "rss_started_mb": rss_s, "rss_mb": rss, "hwm_mb": hwm, "stop_ms": stop}
        rows.append([c.name, f"{st:.1f}", f"{stop:.1f}", f"{rss_s:+.1f}", f"{rss:+.1f}", f"{hwm:+.1f}"])
    print()
    print(table(["configuration", "start ms", "stop ms", "RSS after start MB", "RSS after work MB", "peak MB"], rows))
    print(f"(MB added to the unprofiled process: {base_rss:.1f} MB RSS after the workload)")
    ctx.summary["all_user"] = summ
    t, f = summ["agent all_user=True"], summ["agent all_user=False"]
    print(f"all_user=True saves {f['rss_mb'] - t['rss_mb']:.1f} MB RSS and {f['start_ms'] - t['start_ms']:.1f} ms "
          "of start-up against all_user=False.")


# ------------------------------------------------------------------ engines


# (name, cpu interval s, wall interval s, py-spy/pyroscope rate Hz or 0 when they do not take part)
ENGINE_RATES: List[Tuple[str, float, float, int]] = [
    ("defaults", 0.1, 1.0, 0),  # asprof's defaults (ProfilerOptions: cpu_interval 0.1 s, wall_interval 1 s)
    ("100 Hz", 0.01, 0.1, 100),  # 100 Hz CPU + 10 Hz wall; py-spy and pyroscope at 100 Hz (their default)
    ("1 kHz", 0.001, 0.01, 1000),  # 1 kHz CPU + 100 Hz wall; py-spy and pyroscope at 1000 Hz
]
ENGINE_LABELS = {
    "none": "no profiler",
    "builtin": "asprof agent, built-in engine",
    "builtin-c": "built-in engine's C module alone (no agent)",
    "floor": "the signal floor: the built-in engine's CPU timers, a handler that returns at once (no wall)",
    "aprof": "async-profiler alone (ctypes)",
    "pyspy": "py-spy record --pid (default: pauses the process per sample)",
    "pyspy-nb": "py-spy record --pid --nonblocking",
    "pyroscope": "pyroscope-io agent (in-process, oncpu, gil_only=False)",
}


def bench_venv_site(venv: str) -> str:
    """The site-packages of the benchmark venv for this interpreter's version, or ''."""
    path = os.path.join(venv, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
    return path if os.path.isdir(path) else ""


class PyroscopeSink:
    """A loopback HTTP sink for pyroscope-io's uploads: answers 200 and counts the samples it was sent
    (PushRequest protobuf -> pprof profiles, gzip'ed; the first value of each pprof sample is CPU ns,
    one sampling period per sample)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.lock = threading.Lock()
        self.values: List[int] = []
        self.periods: List[int] = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    sink.add(body, self.headers.get("Content-Encoding") == "gzip")
                except Exception as e:  # noqa: BLE001 (a benchmark sink: note and answer)
                    log(f"pyroscope sink: cannot decode an upload: {e!r}")
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def add(self, body: bytes, gzipped: bool) -> None:
        import gzip

        if gzipped:
            body = gzip.decompress(body)
        total = 0
        for f1, series in pb_fields(body):  # PushRequest.series
            if f1 != 1 or not isinstance(series, bytes):
                continue
            for f2, sample in pb_fields(series):  # RawProfileSeries.samples
                if f2 != 2 or not isinstance(sample, bytes):
                    continue
                for f3, raw in pb_fields(sample):  # RawSample.raw_profile (pprof)
                    if f3 == 1 and isinstance(raw, bytes):
                        total += pprof_total(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
        with self.lock:
            self.values.append(total)

    def take(self) -> int:
        """The CPU ns received since the last take()."""
        with self.lock:
            total = sum(self.values)
            self.values.clear()
        return total

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _varint(buf: bytes, i: int) -> Tuple[int, int]:
    v = shift = 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i


def pb_fields(buf: bytes) -> List[Tuple[int, Any]]:
    """A protobuf message's (field number, value) pairs: int for varints, bytes otherwise."""
    out: List[Tuple[int, Any]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wt = key & 7
        if wt == 0:
            v, i = _varint(buf, i)
            out.append((key >> 3, v))
        elif wt == 2:
            n, i = _varint(buf, i)
            out.append((key >> 3, buf[i:i + n]))
            i += n
        elif wt in (1, 5):
            n = 8 if wt == 1 else 4
            out.append((key >> 3, buf[i:i + n]))
            i += n
        else:
            raise ValueError(f"protobuf wire type {wt}")
    return out


def pprof_total(buf: bytes) -> int:
    """Sum of the first value of every sample of a pprof Profile."""
    total = 0
    for f, sample in pb_fields(buf):
        if f != 2 or not isinstance(sample, bytes):
            continue
        for g, value in pb_fields(sample):
            if g == 2:  # Sample.value: packed (bytes) or one varint
                total += _varint(value, 0)[0] if isinstance(value, bytes) else value
                break
    return total


class EngineConfig:
    def __init__(self, name: str, profiler: str, rate: str, cpu: float, wall: float, hz: int) -> None:
        self.name, self.profiler, self.rate, self.cpu, self.wall, self.hz = name, profiler, rate, cpu, wall, hz

    def args(self, ctx: "Ctx", units: int, sink: str) -> List[str]:
        return ["engine", "--profiler", self.profiler, "--units", str(units), "--cpu-interval", str(self.cpu),
                "--wall-interval", str(self.wall), "--rate", str(self.hz), "--lib", ctx.lib or "",
                "--pyspy", ctx.pyspy or "py-spy", "--sink", sink, "--interval", "30"]


def engine_configs(ctx: "Ctx") -> Tuple[List[EngineConfig], List[str]]:
    """The configurations that can run here, and why the others cannot."""
    available: Dict[str, str] = {}  # profiler -> '' or why not
    available["aprof"] = "" if ctx.lib else "async-profiler not found (asprof.library_info() failed)"
    available["pyspy"] = available["pyspy-nb"] = "" if ctx.pyspy else "py-spy not found (see --bench-venv)"
    available["pyroscope"] = "" if ctx.pyroscope else "pyroscope-io not importable (see --bench-venv)"
    available["builtin-c"] = ctx.builtin_c
    available["builtin"] = ctx.builtin_py
    configs = [EngineConfig("base", "none", "-", 0, 0, 0), EngineConfig("base-b", "none", "-", 0, 0, 0)]
    for rate, cpu, wall, hz in ENGINE_RATES:
        tag = {"defaults": "def", "100 Hz": "100", "1 kHz": "1k"}[rate]
        names = ["builtin", "aprof"] + (["pyspy", "pyroscope"] if hz else [])
        if rate == "1 kHz":
            names += ["builtin-c", "pyspy-nb"]
        for prof in names:
            configs.append(EngineConfig(f"{prof}-{tag}", prof, rate, cpu, wall, hz))
    skipped = sorted({f"{c.profiler}: {available[c.profiler]}" for c in configs
                      if c.profiler in available and available[c.profiler]})
    return [c for c in configs if not available.get(c.profiler)], skipped


def probe_engines(ctx: "Ctx", sink: "PyroscopeSink") -> None:
    """Can each profiler run here? A short child of each (also a warm-up); the reason when not."""
    for prof, attr in (("builtin-c", "builtin_c"), ("builtin", "builtin_py")):
        try:
            run_child(EngineConfig("probe", prof, "", 0.001, 0.01, 0).args(ctx, 20, sink.url), timeout=120)
            setattr(ctx, attr, "")
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or ["?"]
            setattr(ctx, attr, f"not usable here: {last[0][:200]}")
    for prof, attr in (("pyspy", "pyspy"), ("pyroscope", "pyroscope")):
        if not getattr(ctx, attr):
            continue
        try:
            run_child(EngineConfig("probe", prof, "", 0.001, 0.01, 100).args(ctx, 20, sink.url), timeout=120)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
            log(f"{prof} cannot run here: {str(e)[-500:]}")
            setattr(ctx, attr, "")
    sink.take()


def section_engines(ctx: "Ctx") -> None:
    print("\n## 6. Engines: asprof's built-in engine, async-profiler, py-spy, pyroscope-io")
    sink = PyroscopeSink()
    try:
        probe_engines(ctx, sink)
        configs, skipped = engine_configs(ctx)
        if ctx.configs:  # --configs: a subset (the baselines always run)
            configs = [c for c in configs if c.name in ctx.configs or c.profiler == "none"]
        units = ctx.units
        print(f"{ctx.rounds} rounds x {len(configs)} configurations, shuffled per round, each a fresh process doing "
              f"{units} work units on each of 2 busy threads (~{ctx.seconds:g} s unprofiled) + 1 sleeping thread "
              "+ 1 idle thread (the agent's asprof-agent thread in its place under the agent).")
        for rate, cpu, wall, hz in ENGINE_RATES:
            print(f"  {rate:8s}: built-in / async-profiler cpu {cpu * 1e3:g} ms, wall {wall * 1e3:g} ms"
                  + (f"; py-spy / pyroscope {hz} Hz" if hz else ""))
        for prof, label in ENGINE_LABELS.items():
            print(f"  {prof:10s} {label}")
        for s in skipped:
            print(f"  SKIPPED {s}")
        results: Dict[str, List[Dict[str, Any]]] = {c.name: [] for c in configs}
        n = 0
        for r in range(ctx.rounds):
            order = list(configs)
            ctx.rng.shuffle(order)
            for c in order:
                n += 1
                res = run_child(c.args(ctx, units, sink.url))
                if c.profiler == "pyroscope":
                    ns = sink.take()
                    res["samples_total"] = round(ns / (1e9 / c.hz)) if c.hz else -1
                res["round"] = r
                results[c.name].append(res)
                log(f"  [engines {n}/{ctx.rounds * len(configs)}] round {r + 1} {c.name:14s} "
                    f"wall {res['wall_s']:.3f} s  load {loadavg()}")
    finally:
        sink.close()
    ctx.data["engines"] = results
    report_engines(ctx, configs, results)


def _samples_per_s(r: Dict[str, Any]) -> Tuple[float, str]:
    """Samples recorded per second of the window (or of the profiler's life), and how they were counted."""
    if r.get("chunks"):
        return (r["cpu_samples_window"] + r["wall_samples_window"]) / r["window_s"], "JFR"
    if r.get("samples_total", -1) >= 0 and r.get("prof_span_s"):
        return r["samples_total"] / r["prof_span_s"], "output"
    if "d_samples" in r:
        return r["d_samples"] / r["window_s"], "stats"
    return float("nan"), ""


def report_engines(ctx: "Ctx", configs: Sequence[EngineConfig], res: Dict[str, List[Dict[str, Any]]]) -> None:
    base = "base"
    base_hwm = median([r["hwm_kb"] for r in res[base]]) / 1024
    rows = []
    summary: Dict[str, Dict[str, float]] = {}
    for c in configs:
        rs = res[c.name]
        wall = median(paired(res, c.name, base)) if c.name != base else 0.0
        cpu = median(paired(res, c.name, base, "cpu_s")) if c.name != base else 0.0
        thr = median([r["prof_thread_cpu_s"] / r["cpu_s"] * 100 for r in rs])
        ext = median([r["ext_cpu_s"] / r["cpu_s"] * 100 for r in rs])
        rss = median([r["hwm_kb"] for r in rs]) / 1024 - base_hwm
        ext_rss = median([r["ext_hwm_kb"] for r in rs]) / 1024
        sps = [_samples_per_s(r) for r in rs]
        rate = median([x for x, _ in sps if x == x])
        how = sps[0][1] if sps else ""
        hns = [r["d_handler_ns"] / r["d_handler_calls"] for r in rs if r.get("d_handler_calls")]
        ns = median(hns) if hns else float("nan")
        start = median([r["start_s"] for r in rs]) * 1e3
        acc = [(r["d_handler_ns"] / 1e9 + r["prof_thread_cpu_s"]) / r["cpu_s"] * 100 for r in rs if "d_handler_ns" in r]
        accounted = median(acc) if acc else float("nan")
        bench = [r["bench_handler_ns"] for r in rs if "bench_handler_ns" in r]
        summary[c.name] = {"wall": wall, "cpu": cpu, "thread_share": thr, "ext_share": ext, "rss_added_mb": rss,
                           "ext_rss_mb": ext_rss, "samples_per_s": rate, "handler_ns": ns, "start_ms": start,
                           "accounted": accounted, "bench_handler_ns": median(bench) if bench else float("nan")}
        rows.append([c.name, c.rate, pct(wall), pct(cpu),
                     "-" if c.profiler == "none" else f"{thr:.3f}%",
                     f"{ext:.3f}%" if c.profiler.startswith("pyspy") else "-",
                     f"{rss:+.1f}" + (f" (+{ext_rss:.0f} ext)" if ext_rss else ""),
                     "-" if rate != rate else f"{rate:.0f} {how}", "-" if ns != ns else f"{ns:.0f}",
                     "-" if accounted != accounted else f"{accounted:.2f}%",
                     "-" if c.profiler == "none" else f"{start:.1f}"])
    print()
    print(table(["configuration", "rates", "wall vs base", "CPU vs base", "prof thr CPU", "ext proc CPU",
                 "max RSS added MB", "samples/s", "handler ns", "accounted", "start ms"], rows))
    print("wall / CPU vs base: median over rounds of (configuration / 'base' of the same round) - 1; CPU is the\n"
          "profiled process's CPU time over the timed window (an outside profiler's own CPU is not in it).\n"
          "prof thr CPU: CPU time of every thread of the process that is not the workload's (the profiler's own\n"
          "threads: asprof-agent, the built-in engine's sampler, async-profiler's timer and wall threads, pyroscope's\n"
          "sampler and uploader), as a share of the process's CPU time in the window; ext proc CPU: py-spy's process,\n"
          "same base. Signal handlers run on the sampled threads: their cost is in the wall and CPU columns.\n"
          "max RSS added: VmHWM against the unprofiled process ('ext': py-spy's own peak RSS, outside).\n"
          "samples/s: recorded per second, CPU and wall together: JFR = counted in the recordings within the window;\n"
          "output = the samples collect() returned (builtin-c), py-spy's raw output or what pyroscope uploaded, over\n"
          "the profiler's life; stats = the built-in module's counter over the window. handler ns: the built-in engine's\n"
          "handler_ns / handler_calls over the window (_builtin.stats(); the handler's clock, so time the thread\n"
          "spent preempted inside the handler counts too). accounted: built-in only, (handler_ns + own threads' CPU)\n"
          "/ process CPU: the engine's cost as it accounts for it itself, without the kernel's signal delivery and\n"
          "cache effects (a lower bound, much less noisy than the ratios).")
    for c in configs:
        b = summary[c.name]["bench_handler_ns"]
        if b == b:
            print(f"{c.name}: the handler's work outside a signal, warm (_builtin._bench(20000), fastest of 5 "
                  f"batches, from the child's main thread, ~5 Python frames deep): {b:.0f} ns")
    aa = [abs(x) for x in paired(res, "base-b", base)]
    aa_cpu = [abs(x) for x in paired(res, "base-b", base, "cpu_s")]
    aa_med, aa_cpu_med = median(aa), median(aa_cpu)
    print(f"\nA/A noise (|base-b / base - 1|): wall median {aa_med:.2f}% (max {max(aa):.2f}%), "
          f"process CPU median {aa_cpu_med:.2f}% (max {max(aa_cpu):.2f}%)")

    def diff(a: str, b: str, key: str) -> float:
        by_round = {r["round"]: r[key] for r in res[b]}
        return median([(r[key] / by_round[r["round"]] - 1) * 100 for r in res[a] if r["round"] in by_round])

    for tag in ("def", "100", "1k"):
        for other in ("aprof", "pyspy", "pyspy-nb", "pyroscope", "builtin-c"):
            a_, b_ = f"builtin-{tag}", f"{other}-{tag}"
            if a_ in res and b_ in res:
                print(f"  {a_} vs {b_} (paired): wall {pct(diff(a_, b_, 'wall_s'))}, CPU {pct(diff(a_, b_, 'cpu_s'))}")
    ctx.summary["engines"] = summary

    def verdict(name: str, budget: float) -> Tuple[str, str]:
        s = summary[name]
        measured = (f"wall {pct(s['wall'])}, CPU {pct(s['cpu'])} (A/A ±{aa_med:.2f}% / ±{aa_cpu_med:.2f}%); "
                    f"own threads {s['thread_share']:.3f}%")
        acc = s["accounted"]
        if acc == acc:
            measured += f"; accounted {acc:.2f}%"
        for label, x, noise in (("wall", s["wall"], aa_med), ("CPU", s["cpu"], aa_cpu_med)):
            if noise > budget:
                continue
            if x <= budget:
                return measured, f"MET ({label})"
            return measured, (f"MET within noise ({label})" if x <= budget + noise else f"NOT MET ({label})")
        return measured, (
            f"INCONCLUSIVE: A/A noise above the budget; accounted cost (handler + own threads) "
            f"{'within' if acc <= budget else 'OVER'} it")

    v = ctx.verdicts
    if "builtin-def" in summary:
        v.add("built-in engine at defaults <= 0.5%", *verdict("builtin-def", 0.5))
    if "builtin-1k" in summary:
        v.add("built-in engine at 1 ms CPU + 10 ms wall <= 2%", *verdict("builtin-1k", 2.0))
        ns = summary["builtin-1k"]["handler_ns"]
        v.add("built-in handler cost per sample (printed)", f"{ns:.0f} ns (1 kHz)", "-")
    rss = {k: summary[k]["rss_added_mb"] for k in ("builtin-def", "builtin-1k") if k in summary}
    if rss:
        v.add("built-in engine RSS added <= 10 MB", ", ".join(f"{k} {x:+.1f} MB" for k, x in rss.items()),
              "MET" if max(rss.values()) <= 10 else "NOT MET")


def section_attribution(ctx: "Ctx") -> None:
    print("\n## 7. Attribution: per-thread CPU shares of Python functions (benchmarks/attribution.py)")
    if ctx.builtin_py == "not probed":
        try:
            run_child(EngineConfig("probe", "builtin", "", 0.001, 0.01, 0).args(ctx, 20, "http://127.0.0.1:9"),
                      timeout=120)
            ctx.builtin_py = ""
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
            ctx.builtin_py = str(e).strip().splitlines()[-1][:200]
    if ctx.builtin_py:
        print(f"SKIPPED: the built-in engine cannot run here: {ctx.builtin_py}")
        return
    seconds = 3.0 if ctx.quick else 10.0
    p = subprocess.run([sys.executable, os.path.join(HERE, "attribution.py"), "--engine", "builtin", "--seconds",
                        str(seconds), "--json", "-"], capture_output=True, text=True, env=child_env(), timeout=600)
    if p.returncode != 0:
        print(f"attribution run failed ({p.returncode}): {p.stderr[-2000:]}")
        ctx.verdicts.add("attribution: CPU shares within 3 points of the truth, per thread", "run failed", "NOT MET")
        return
    res = json.loads(p.stdout.strip().splitlines()[-1])
    sys.path.insert(0, HERE)
    from attribution import TARGET_POINTS, report

    print(report(res))
    ctx.data["attribution"] = res
    worst = res["max_deviation"]
    ctx.verdicts.add("attribution: CPU shares within 3 points of the truth, per thread",
                     f"max deviation {worst:.2f} points (1 ms CPU, {seconds:g} s, 2 threads x 2 functions)",
                     "MET" if worst <= TARGET_POINTS else "NOT MET")


PAIR_CONFIGS = ["base-b", "builtin-def", "builtin-1k", "aprof-def", "aprof-1k", "floor-1k"]
PAIR_BUDGETS = {"builtin-def": 0.5, "builtin-1k": 2.0}


PAIR_NICE = -20  # the pairs' priority, where allowed (root): the machine's other work takes little of their CPU


def _pair_priority() -> None:
    """In the pair's children: run ahead of the machine's other work, where allowed. The two
    share the CPU as they would on a quiet machine; the profiler's own threads, at the same
    priority, are woken as promptly as there."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, PAIR_NICE)
    except OSError:
        pass


def pair_priority_note() -> str:
    try:
        pid = os.fork()
    except OSError:
        return "unknown"
    if pid == 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, PAIR_NICE)
            os._exit(0)
        except OSError:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return f"nice {PAIR_NICE}"
    return "nice 0 (raising the priority is not allowed here: on a busy machine, run as root)"


def run_pair(ctx: "Ctx", pair: Sequence[EngineConfig], units: int, cpu: int) -> List[Dict[str, Any]]:
    """Two workload processes at the same time on the same CPU, their timed windows started together: they
    take turns on that CPU every few milliseconds, so whatever else the machine does (a neighbour on the
    sibling hyper-thread, cache and memory contention, CPU steal) falls on both alike. On this kind of
    shared machine two processes on different CPUs, or one after the other, differ by 10-25%; two on one
    CPU by under 1%."""
    import tempfile

    procs: List[Tuple[subprocess.Popen[str], Any]] = []
    try:
        for c in pair:
            err = tempfile.TemporaryFile("w+")
            args = c.args(ctx, units, "http://127.0.0.1:9") + ["--affinity", str(cpu), "--sync"]
            procs.append((subprocess.Popen([sys.executable, WORKLOAD, *args], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, stderr=err, text=True, env=child_env(),
                                           preexec_fn=_pair_priority), err))
        for p, err in procs:
            line = p.stdout.readline() if p.stdout else ""
            if line.strip() != "ready":
                err.seek(0)
                raise RuntimeError(f"pair child did not get ready: {line!r} {err.read()[-2000:]}")
        for p, _ in procs:  # both at once
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        out = []
        for p, err in procs:
            stdout, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"pair child failed ({p.returncode}): {err.read()[-2000:]}")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
        return out
    finally:
        for p, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()


def section_pairs(ctx: "Ctx") -> None:
    print("\n## 8. Engine overhead in same-CPU pairs (the built-in engine's budgets)")
    if (os.cpu_count() or 1) < 2 or len(os.sched_getaffinity(0)) < 2:
        print("SKIPPED: needs two CPUs")
        return
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if cpus != [0, 1]:
        print(f"SKIPPED: the pairs pin to CPUs 0 and 1, this process may use {cpus}")
        return
    rates = {r: (cpu, wall) for r, cpu, wall, _hz in ENGINE_RATES}
    configs: Dict[str, EngineConfig] = {"base": EngineConfig("base", "none", "-", 0, 0, 0)}
    for name in PAIR_CONFIGS:
        prof, tag = name.rsplit("-", 1)
        if prof == "base":
            configs[name] = EngineConfig(name, "none", "-", 0, 0, 0)
            continue
        rate = {"def": "defaults", "1k": "1 kHz"}[tag]
        if (prof == "aprof" and not ctx.lib) or (prof in ("builtin", "floor") and
                                                 ctx.builtin_py not in ("", "not probed")):
            print(f"  SKIPPED {name}: {'async-profiler not found' if prof == 'aprof' else ctx.builtin_py}")
            continue
        if prof == "floor":  # the built-in engine's CPU signals alone: taken by a handler that does nothing
            configs[name] = EngineConfig(name, "floor", rate, rates[rate][0], 0, 0)
            continue
        configs[name] = EngineConfig(name, prof, rate, rates[rate][0], rates[rate][1], 0)
    if ctx.configs:
        configs = {k: v for k, v in configs.items() if k in ctx.configs or v.profiler == "none"}
    others = [c for n, c in configs.items() if n != "base"]
    # every thread of both processes on one CPU (the busy threads take turns on the GIL anyway)
    units = max(20, ctx.units // 2)
    print(f"{ctx.rounds} rounds x {len(others)} pairs, shuffled per round. A pair: 'base' (no profiler) and one "
          f"configuration started together, every thread of both pinned to the same CPU (CPU 0 or 1 in turn), "
          f"each doing {units} work units on each of 2 busy threads + 1 sleeping + 1 idle thread. The measure is "
          "the CPU time each process needs for the same work: the profiler's threads, its signal handler and the "
          f"kernel's signal delivery are all in it. Priority: {pair_priority_note()}.")
    res: Dict[str, List[Tuple[Dict[str, Any], Dict[str, Any]]]] = {c.name: [] for c in others}
    n = 0
    for r in range(ctx.rounds):
        order = list(others)
        ctx.rng.shuffle(order)
        for c in order:
            n += 1
            b, x = run_pair(ctx, [configs["base"], c], units, r % 2)
            res[c.name].append((b, x))
            log(f"  [pairs {n}/{ctx.rounds * len(others)}] round {r + 1} {c.name:12s} base {b['wall_s']:.3f} s "
                f"{c.name} {x['wall_s']:.3f} s  load {loadavg()}")
    ctx.data["pairs"] = {k: [list(p) for p in v] for k, v in res.items()}

    def q(xs: List[float], f: float) -> float:
        ys = sorted(xs)
        return ys[min(len(ys) - 1, max(0, round(f * (len(ys) - 1))))] if ys else float("nan")

    rows, summary = [], {}
    for c in others:
        wall = [(x["wall_s"] / b["wall_s"] - 1) * 100 for b, x in res[c.name]]
        cpu = [(x["cpu_s"] / b["cpu_s"] - 1) * 100 for b, x in res[c.name]]
        thr = [x["prof_thread_cpu_s"] / x["cpu_s"] * 100 for _b, x in res[c.name]]
        # the extra CPU per recorded sample (CPU and wall samples of the window, from the recordings)
        per = [(x["cpu_s"] - b["cpu_s"]) * 1e9 / (x["cpu_samples_window"] + x["wall_samples_window"])
               for b, x in res[c.name] if x.get("cpu_samples_window", 0) + x.get("wall_samples_window", 0) > 0]
        hns = [x["d_handler_ns"] / x["d_handler_calls"] for _b, x in res[c.name] if x.get("d_handler_calls")]
        sps = [x["d_signals"] / x["cpu_s"] for _b, x in res[c.name] if x.get("d_signals")]
        summary[c.name] = {"wall": median(wall), "cpu": median(cpu), "wall_q": (q(wall, .25), q(wall, .75)),
                           "cpu_q": (q(cpu, .25), q(cpu, .75)), "thread_share": median(thr),
                           "ns_per_sample": median(per) if per else float("nan"),
                           "handler_ns": median(hns) if hns else float("nan")}
        rows.append([c.name, c.rate, pct(median(wall)), f"{q(wall, .25):+.2f} .. {q(wall, .75):+.2f}",
                     pct(median(cpu)), f"{q(cpu, .25):+.2f} .. {q(cpu, .75):+.2f}",
                     "-" if c.profiler == "none" else f"{median(thr):.3f}%",
                     f"{median(per):.0f}" if per else "-", f"{median(hns):.0f}" if hns else "-",
                     f"{median(sps):.0f}" if sps else "-"])
    print()
    print(table(["configuration", "rates", "wall vs base", "wall IQR %", "CPU vs base", "CPU IQR %", "own threads",
                 "CPU ns/sample", "handler ns", "signals/CPU s"],
                rows))
    print("CPU vs base: median over pairs of (the configuration's CPU time / its pair's 'base' CPU time) - 1, for\n"
          "the same work; IQR: the middle half of those per-pair ratios. base-b is a second unprofiled process: its\n"
          "row is the method's noise. wall vs base: the same for wall time (the two share the CPU, so a slower one\n"
          "also runs alone for a while at the end: CPU time is the measure, wall time a cross-check). own threads:\n"
          "the profiler's threads' share of its process's CPU time. CPU ns/sample: (CPU time - its base's) / the\n"
          "CPU and wall samples recorded in the window: everything a sample costs, signal delivery included.\n"
          "handler ns: the built-in handler's own clock (handler_ns / handler_calls), preemption inside it included.\n"
          "signals/CPU s: the built-in engine's signals per second of the process's CPU time. floor-1k: its 1 kHz CPU\n"
          "signals alone, taken by a handler that returns at once (no wall sampling, nothing recorded): what the timer\n"
          "interrupts and the signal delivery cost on this machine, below which no signal-based sampler can go.")
    ctx.summary["pairs"] = summary
    aa = summary.get("base-b")
    for name, budget in PAIR_BUDGETS.items():
        s_ = summary.get(name)
        if not s_ or not aa:
            continue
        noise = max(abs(aa["cpu_q"][0]), abs(aa["cpu_q"][1]))
        measured = (f"same-CPU pairs: CPU {pct(s_['cpu'])} (IQR {s_['cpu_q'][0]:+.2f} .. {s_['cpu_q'][1]:+.2f}), "
                    f"wall {pct(s_['wall'])}; A/A CPU {pct(aa['cpu'])} (IQR {aa['cpu_q'][0]:+.2f} .. "
                    f"{aa['cpu_q'][1]:+.2f})")
        worst = s_["cpu"]
        status = ("MET" if worst <= budget and noise < budget else
                  "MET within noise" if worst <= budget + noise else "NOT MET")
        rate = "defaults" if name.endswith("def") else "1 ms CPU + 10 ms wall"
        ctx.verdicts.add(f"built-in engine at {rate} <= {budget:g}% (pairs)", measured, status)
    fl, b1k = summary.get("floor-1k"), summary.get("builtin-1k")
    if fl and b1k:
        # what the 1 kHz signals cost by themselves here: no sampler that interrupts each thread at 1 kHz of
        # its CPU time can cost less; the engine's own part is what it adds above it
        budget = PAIR_BUDGETS["builtin-1k"]
        ctx.verdicts.add("1 kHz CPU signals alone (floor-1k), and the built-in engine above them",
                         f"floor CPU {pct(fl['cpu'])} (IQR {fl['cpu_q'][0]:+.2f} .. {fl['cpu_q'][1]:+.2f}); "
                         f"built-in 1 kHz - floor: {b1k['cpu'] - fl['cpu']:+.2f} points",
                         f"floor above the {budget:g}% budget: unreachable on this machine" if fl["cpu"] > budget
                         else "floor below the budget")


# ------------------------------------------------------------------ main


class Ctx:
    def __init__(self, a: argparse.Namespace, lib: str) -> None:
        self.lib = lib
        self.quick = a.quick
        self.rng = random.Random(a.seed)
        self.seconds = a.seconds or (1.0 if a.quick else 5.0)
        self.rounds = a.rounds or (1 if a.quick else 7)
        self.rotation_seconds = 2.0 if a.quick else 10.0
        self.rot_rounds = 1 if a.quick else 5
        self.ticks = 3 if a.quick else 8
        self.tick_rounds = 1 if a.quick else 2
        self.import_runs = 3 if a.quick else 15
        self.startup_seconds = 0.5 if a.quick else 1.5
        self.startup_rounds = 1 if a.quick else 5
        self.units = 0
        self.noise = float("nan")
        self.verdicts = Verdicts()
        self.summary: Dict[str, Any] = {}
        self.data: Dict[str, Any] = {}
        import asprof

        self.has_python_frames = hasattr(asprof.ProfilerOptions(), "python_frames")
        self.pyspy = ""  # the py-spy executable, when found
        self.pyroscope = False  # pyroscope-io importable in the children
        self.builtin_c = "not probed"  # '' when the built-in engine's C module runs here, else why not
        self.configs = [x.strip() for x in a.configs.split(",") if x.strip()]  # engines: a subset of names
        self.builtin_py = "not probed"  # '' when ProfilerOptions(engine="builtin") runs here, else why not


SECTIONS: Dict[str, Callable[[Ctx], None]] = {
    "overhead": section_overhead,
    "rotation": section_rotation,
    "tick": section_tick,
    "import": section_import,
    "alluser": section_all_user,
    "engines": section_engines,
    "attribution": section_attribution,
    "pairs": section_pairs,
}
NEEDS_ASYNC_PROFILER = {"overhead", "rotation", "tick", "alluser"}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short smoke run (< 1 min)")
    p.add_argument("--rounds", type=int, default=0, help="rounds of the overhead comparison (default 7)")
    p.add_argument("--seconds", type=float, default=0, help="unprofiled duration of one overhead run (default 5)")
    p.add_argument("--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default="", help="also write every raw result to this file")
    p.add_argument("--bench-venv", default=os.environ.get("ASPROF_BENCH_VENV", "/work/benchvenv"),
                   help="a venv with py-spy and pyroscope-io for the engines section (see README)")
    p.add_argument("--configs", default="", help="engines section: only these configurations (e.g. "
                   "builtin-def,builtin-1k,aprof-1k; the baselines always run)")
    p.add_argument("--pyspy", default="", help="the py-spy executable (default: the bench venv's, else PATH)")
    a = p.parse_args(argv)

    sys.path.insert(0, ROOT)
    try:
        import asprof
        from asprof import _native  # noqa: F401
    except ImportError as e:
        log(f"cannot import asprof ({e}): build it first: cd {ROOT} && python setup.py build_ext --inplace")
        return 2
    chosen = [s.strip() for s in a.only.split(",") if s.strip()] or list(SECTIONS)
    for s in chosen:
        if s not in SECTIONS:
            log(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
            return 2
    try:
        info: Any = asprof.library_info()
        lib, ap_version = info.path, info.version
    except Exception as e:  # noqa: BLE001 (LibraryNotFoundError and friends: say so, run what can run)
        lib, ap_version = "", f"not found ({type(e).__name__})"
        if set(chosen) & NEEDS_ASYNC_PROFILER:
            log(f"async-profiler not found: sections {', '.join(sorted(set(chosen) & NEEDS_ASYNC_PROFILER))} need it "
                "(set ASPROF_LIB); try --only engines")
            return 2
    ctx = Ctx(a, lib)
    global BENCH_SITE
    BENCH_SITE = bench_venv_site(a.bench_venv) if a.bench_venv else ""
    ctx.pyspy = a.pyspy or (os.path.join(a.bench_venv, "bin", "py-spy")
                            if a.bench_venv and os.access(os.path.join(a.bench_venv, "bin", "py-spy"), os.X_OK)
                            else "") or (shutil.which("py-spy") or "")
    ctx.pyroscope = subprocess.run([sys.executable, "-c", "import pyroscope"], env=child_env(),
                                   capture_output=True).returncode == 0
    started = time.time()
    m = machine()
    print("# asprof benchmarks" + (" (--quick: smoke run, numbers are not meaningful)" if a.quick else ""))
    print(f"date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; machine: {m['cpus']} cores, {m['cpu']}, "
          f"{m['memory']}, Linux {m['kernel']}")
    print(f"{m['python']}; async-profiler {ap_version} ({lib or '-'}); asprof {asprof.__version__}")
    if "engines" in chosen:
        print(f"py-spy: {ctx.pyspy or 'not found'}; pyroscope-io: "
              f"{'importable' if ctx.pyroscope else 'not importable'} (bench venv site: {BENCH_SITE or '-'})")
    print(f"load average at start: {loadavg()}")

    # Byte-compile asprof once: with PYTHONDONTWRITEBYTECODE set (as on our machines), every child would
    # otherwise compile the modules it imports from source, and that would count as start-up time.
    compileall.compile_dir(os.path.join(ROOT, "asprof"), quiet=1)
    compileall.compile_dir(HERE, quiet=1)
    cal = [run_child(["calibrate", "--units", "100"]) for _ in range(2 if a.quick else 3)]
    # warm-up (discarded): the page cache, async-profiler's first start
    if ctx.lib:
        run_child(Config("warm-up", "", "agent", FAST, FAST_INTERVAL).args(ctx.lib, 20))
    rate = median([c["units_per_s"] for c in cal])
    ctx.units = max(20, int(rate * ctx.seconds))
    print(f"calibration: {rate:.0f} work units/s per busy thread (unprofiled); {ctx.units} units per overhead run")

    for s in chosen:
        SECTIONS[s](ctx)
        print(f"(load average after this section: {loadavg()})")

    print("\n## Targets")
    print(table(["target", "measured", "status"], [[t, m_, s] for t, m_, s, _n in ctx.verdicts.rows]))
    print(f"\nload average at end: {loadavg()}; total time {time.time() - started:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": m, "async_profiler": ap_version, "units": ctx.units, "summary": ctx.summary,
                       "verdicts": ctx.verdicts.rows, "raw": ctx.data}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
