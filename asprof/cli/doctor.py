"""``asprof doctor``: what the agent would do here, and why not.

Checks, in the order they matter: the ``ASPROF_*`` configuration, the
native extension and async-profiler (path, version, optional features), the
CPU sampling engine async-profiler would pick (``perf_event_paranoid``, a
``perf_event_open`` probe like async-profiler's own, capabilities), native
memory sampling, container limits, the directories profiling writes to,
S3 (boto3, credentials: where they come from, never their values) and the
host metadata endpoints. The exit status is 0 when profiling would start,
1 when it would not. ``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

from asprof.cli.probes import (
    CAP_PERFMON,
    CAP_SYS_ADMIN,
    container_limits,
    credentials_source,
    effective_capabilities,
    nofile_limit,
    perf_event_probe,
    read_file,
    writable_dir,
)

__all__ = ["add_parser", "run", "diagnose", "Check", "Diagnosis", "perf_event_probe", "container_limits"]

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
_MARK = {OK: "[ ok ]", INFO: "[info]", WARN: "[warn]", FAIL: "[FAIL]"}

_PARANOID = {
    -1: "no restrictions on perf events",
    0: "unprivileged processes may profile themselves and whole CPUs, kernel included",
    1: "unprivileged processes may profile themselves, user and kernel code",
    2: "unprivileged processes may profile only their own user-space code",
}


@dataclass
class Check:
    section: str
    name: str
    status: str
    detail: str
    fix: Optional[str] = None


@dataclass
class Diagnosis:
    would_profile: bool
    summary: str
    checks: List[Check] = field(default_factory=list)

    def add(self, section: str, name: str, status: str, detail: str, fix: Optional[str] = None) -> Check:
        c = Check(section, name, status, detail, fix)
        self.checks.append(c)
        return c

    def as_dict(self) -> Dict[str, Any]:
        return {"would_profile": self.would_profile, "summary": self.summary,
                "checks": [asdict(c) for c in self.checks]}


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "doctor", help="say what profiling would do here, and why not",
        description="Check this machine and environment for the profiling agent: configuration (ASPROF_*), "
                    "async-profiler, the CPU sampling engine, perf_event_paranoid, container limits, writable "
                    "directories, S3 credentials (never printed) and metadata endpoints. Exit status 0 when "
                    "profiling would start, 1 when not.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--pid", type=int, default=None, metavar="PID",
                   help="also report the profiling signals' dispositions in running process PID (issue #13)")
    p.add_argument("--offline", action="store_true",
                   help="no network: skip the metadata endpoints and credential providers that need it")
    p.add_argument("--timeout", type=float, default=1.0, metavar="SECONDS",
                   help="bound of each network probe (default 1)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    d = diagnose(offline=args.offline, timeout=max(0.05, args.timeout), pid=getattr(args, "pid", None))
    out = sys.stdout
    if args.json:
        json.dump(d.as_dict(), out, indent=2)
        out.write("\n")
    else:
        out.write(format_text(d))
    out.flush()
    return 0 if d.would_profile else 1


def format_text(d: Diagnosis) -> str:
    lines: List[str] = []
    section = None
    for c in d.checks:
        if c.section != section:
            section = c.section
            lines.append("" if not lines else "")
            lines.append(section)
        lines.append(f"  {_MARK.get(c.status, c.status)} {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"         fix: {c.fix}")
    lines.append("")
    lines.append(("Profiling would start: " if d.would_profile else "Profiling would NOT start: ") + d.summary)
    return "\n".join(lines).lstrip("\n") + "\n"


# ---------------------------------------------------------------- the checks


def diagnose(environ: Optional[Mapping[str, str]] = None, *, offline: bool = False,
             timeout: float = 1.0, pid: Optional[int] = None) -> Diagnosis:
    """Runs every check; never raises (a failing check is a FAIL line). ``pid``: also the
    profiling signals of that running process (their handlers in this one are always reported:
    call ``diagnose()`` inside a service to see its own)."""
    env = os.environ if environ is None else environ
    d = Diagnosis(False, "")
    blockers: List[str] = []
    what: List[str] = []

    # -- Python
    hazard = _guard(lambda: _nativemem_hazard())
    d.add("Python", "interpreter", INFO,
          f"{platform.python_implementation()} {platform.python_version()} at {sys.executable}, pid {os.getpid()}, "
          f"{platform.system()} {platform.release()} {platform.machine()}")

    # -- configuration
    from asprof.autostart.config import ConfigError, EnvConfig

    cfg: Optional[EnvConfig] = None
    try:
        cfg = EnvConfig.from_environ(env)
    except ConfigError as e:
        d.add("Configuration", e.variable, FAIL, str(e),
              "correct or unset it (docs/configuration.md); the agent stays off until then")
        blockers.append(f"invalid {e.variable}")
    if cfg is not None:
        if not cfg.enabled:
            d.add("Configuration", "ASPROF_ENABLED", FAIL, f"profiling is disabled (ASPROF_ENABLED="
                  f"{env.get('ASPROF_ENABLED')!r})", "unset ASPROF_ENABLED or set it to 1")
            blockers.append("disabled by ASPROF_ENABLED")
        else:
            set_vars = sorted(k for k in cfg.given if k in _known())
            d.add("Configuration", "variables", INFO, ", ".join(set_vars) if set_vars else
                  "no ASPROF_* variable set: the defaults")
            for name, value in cfg.describe()[1:]:
                d.add("Configuration", name, INFO, value)
            if cfg.kill_switch_file and os.path.exists(cfg.kill_switch_file):
                d.add("Configuration", "kill switch", FAIL, f"{cfg.kill_switch_file} exists",
                      "remove the file to let profiling start")
                blockers.append("kill switch file present")
            for name in cfg.unknown_variables:
                d.add("Configuration", name, WARN, "unknown variable, ignored (a typo?)")

    # -- library
    # issue #11: with ASPROF_ENGINE=auto (default) a missing async-profiler is not a blocker when the
    # built-in engine can run; async-profiler's problems are gathered first, judged in "Engine".
    asked = cfg.engine if cfg is not None else "auto"
    builtin_why_not = _builtin_unavailable()
    explicit_lib = bool(env.get("ASPROF_LIB", "").strip())
    ap_required = asked == "async-profiler" or (asked == "auto" and (builtin_why_not is not None or explicit_lib))
    ap_fail = FAIL if ap_required else (INFO if asked == "builtin" else WARN)
    final_blockers, blockers = blockers, []
    info = None
    native_ok = True
    try:
        import asprof._native  # noqa: F401
    except ImportError as e:
        native_ok = False
        d.add("async-profiler", "native extension", ap_fail, f"asprof._native cannot be imported: {e}",
              "reinstall asprof for this interpreter (pip install --force-reinstall asprof), or build it in "
              "place: python setup.py build_ext --inplace")
        blockers.append("native extension missing")
    if native_ok:
        from asprof.engines.asyncprofiler import load_library
        from asprof.errors import LibraryNotFoundError

        lib_path = cfg.library_path if cfg is not None else None
        try:
            info = load_library(lib_path)[1]
            caps = ", ".join(sorted(info.capabilities)) or "none"
            d.add("async-profiler", "library", OK, f"{info.path}, version {info.version}, optional features: {caps}")
        except LibraryNotFoundError as e:
            tried = "; ".join(f"{w}: {what_}" for w, what_ in e.tried)
            d.add("async-profiler", "library", ap_fail, f"libasyncProfiler.so not found (tried {tried})",
                  "install async-profiler 3.0+ (https://github.com/async-profiler/async-profiler/releases): put "
                  "lib/libasyncProfiler.so in /usr/local/lib and run ldconfig, or set ASPROF_LIB to its path")
            blockers.append("async-profiler not found")
        except Exception as e:  # noqa: BLE001 - unsupported version, broken file
            d.add("async-profiler", "library", ap_fail, f"{type(e).__name__}: {e}",
                  "install async-profiler 3.0 or later, or point ASPROF_LIB at a working copy")
            blockers.append("async-profiler unusable")
    ap_problems, blockers = blockers, final_blockers
    engine_name = _engine_checks(d, asked, info is not None and not ap_problems, ap_problems, builtin_why_not,
                                 explicit_lib, blockers)

    # -- CPU engine
    engine = _cpu_checks(d)
    if engine_name == "builtin":
        engine = "per-thread CPU-clock timers of the built-in engine"
    if cfg is not None and cfg.enabled:
        what.append(f"CPU samples ({engine}) every {_secs(cfg.cpu_interval)} of CPU time")
        if cfg.wall_interval is not None:
            what.append(f"wall-clock samples every {_secs(cfg.wall_interval)}")

    # -- native memory
    if cfg is not None and cfg.enabled and cfg.native_mem is not None:
        if hazard and not cfg.force_native_mem:
            d.add("Native memory", "sampling", FAIL, f"refused: {hazard}",
                  "use an interpreter that loads libpython3.X.so (pyenv, python.org builds), set "
                  "ASPROF_NATIVE_MEM=off, or ASPROF_FORCE_NATIVE_MEM=true to try anyway")
            blockers.append("native memory sampling refused on this interpreter")
        elif hazard:
            d.add("Native memory", "sampling", WARN, f"forced on although {hazard}")
            what.append("native memory samples")
        else:
            d.add("Native memory", "sampling", OK, "on; this interpreter loads libpython as a shared library")
            what.append("native memory samples")
    else:
        d.add("Native memory", "sampling", INFO, "off (ASPROF_NATIVE_MEM)" + (
            f"; it would be refused here: {hazard}" if hazard else "; it would work with this interpreter"))

    # -- signals (issue #13)
    _guard(lambda: _signal_checks(d, pid))

    # -- container
    _container_checks(d, env)

    # -- directories
    where_ok = _directory_checks(d, cfg)
    if not where_ok:
        blockers.append("cannot write profiles")

    # -- S3 and metadata
    if cfg is not None and cfg.enabled and cfg.s3_bucket is not None:
        if not _s3_checks(d, env, offline, timeout, required=True):
            blockers.append("S3 reporter unusable")
    else:
        _s3_checks(d, env, offline, timeout, required=False)
    _metadata_checks(d, env, offline, timeout)

    if cfg is not None and cfg.enabled and engine_name is not None:
        what.append(f"by the {engine_name} engine")  # issue #11
    if cfg is not None and cfg.enabled:
        dest = (f"s3://{cfg.s3_bucket}/{cfg.s3_prefix}" if cfg.s3_bucket is not None
                else os.path.abspath(cfg.directory or "profiles"))
        what_text = ", ".join(what)
        what_text = f"{what_text}; a profile every {_secs(cfg.reporting_interval)} to {dest}"
    else:
        what_text = ""
    d.would_profile = not blockers
    d.summary = what_text if not blockers else "; ".join(blockers)
    return d


def _signal_checks(d: Diagnosis, pid: Optional[int]) -> None:
    """Who holds SIGPROF, SIGVTALRM and SIGALRM here (and in process ``pid``): a handler that is not
    asprof's on a profiling signal is a conflict (engines/signals.py: what each engine does)."""
    from asprof.engines.signals import handler_report, signal_name

    section = "Signals"
    rows = handler_report()
    if not rows:
        d.add(section, "handlers", INFO, "asprof.engines._signals is not built for this interpreter: not checked")
    for row in rows:
        name, who = row["name"], row["owner"]
        if row["kind"] != "handler" or row["asprof"]:
            d.add(section, name, OK, f"in this process: {who}")
        elif name == "SIGALRM":
            d.add(section, name, INFO, f"in this process: {who} (asprof does not sample with SIGALRM: no conflict)")
        else:
            d.add(section, name, WARN, f"in this process: {who}, not asprof's: a conflict. async-profiler samples "
                  "with another signal when it finds it taken at start (SIGSTKFLT, SIGPWR, ...); the built-in engine "
                  "goes in front of it and passes it the signals that are not its own; taken over later, asprof "
                  "puts its handler back in front and warns once (docs/signals.md)")
    try:
        from asprof.agent.loop import current

        running = current()
        if running is not None:
            n = int(running.engine.signal_conflicts())
            d.add(section, "conflicts", WARN if n else OK, f"the running profiler counted {n} signal conflict(s)")
    except Exception:  # noqa: BLE001 - not running, or an engine without the counter
        pass
    if pid is None:
        return
    status = read_file(f"/proc/{pid}/status")
    if status is None:
        d.add(section, f"pid {pid}", WARN, f"/proc/{pid}/status cannot be read (no such process, or not yours)")
        return
    masks = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("SigCgt", "SigIgn", "SigBlk"):
            try:
                masks[key] = int(value.strip(), 16)
            except ValueError:
                pass
    maps = read_file(f"/proc/{pid}/maps") or ""
    profiled = [what for what, mark in (("async-profiler", "libasyncProfiler"), ("the built-in engine", "_builtin."),
                                         ("asprof's signal watch", "_signals.")) if mark in maps]
    import signal as _signal

    for sig in (int(_signal.SIGPROF), int(_signal.SIGVTALRM), int(_signal.SIGALRM)):
        bit = 1 << (sig - 1)
        state = ("caught (a handler)" if masks.get("SigCgt", 0) & bit else
                 "ignored" if masks.get("SigIgn", 0) & bit else "default action")
        if masks.get("SigBlk", 0) & bit:
            state += ", blocked in its main thread"
        d.add(section, f"pid {pid} {signal_name(sig)}", INFO, state)
    d.add(section, f"pid {pid} asprof", INFO,
          ("loaded: " + ", ".join(profiled) + "; its reports carry signal_conflicts (ReportMetadata) and its log "
           "one WARNING per signal taken over") if profiled else "asprof's engines are not loaded in that process")


def _known() -> "frozenset[str]":
    from asprof.autostart.config import KNOWN

    return KNOWN


def _builtin_unavailable() -> Optional[str]:
    try:
        from asprof.engines.builtin import unavailable_reason

        return unavailable_reason()
    except Exception as e:  # noqa: BLE001
        return f"it cannot be imported ({e})"


def _engine_checks(d: Diagnosis, asked: str, ap_ok: bool, ap_problems: List[str], builtin_why_not: Optional[str],
                   explicit_lib: bool, blockers: List[str]) -> Optional[str]:
    """Which engine would run and why (issue #11); returns its name, or None when none would."""
    ap_why = ap_problems[0] if ap_problems else "it does not load"
    if asked == "builtin":
        if builtin_why_not is not None:
            d.add("Engine", "engine", FAIL, f"builtin (ASPROF_ENGINE=builtin), but {builtin_why_not}",
                  "reinstall asprof for this interpreter, or set ASPROF_ENGINE=auto")
            blockers.append("built-in engine unavailable")
            return None
        d.add("Engine", "engine", OK, "builtin: asked for by ASPROF_ENGINE=builtin (CPU and wall-clock samples "
              "with Python stacks and the native leaf frame; no native memory)")
        return "builtin"
    if ap_ok:
        d.add("Engine", "engine", OK, "async-profiler: " + ("asked for by ASPROF_ENGINE=async-profiler"
                                                            if asked == "async-profiler" else "auto, it loads"))
        return "async-profiler"
    if asked == "async-profiler":
        d.add("Engine", "engine", FAIL, f"async-profiler (ASPROF_ENGINE=async-profiler), but {ap_why}",
              "install async-profiler, or set ASPROF_ENGINE=auto to use the built-in engine")
        blockers.extend(ap_problems or ["async-profiler unusable"])
        return None
    if explicit_lib:
        d.add("Engine", "engine", FAIL, f"auto, but the library ASPROF_LIB names does not load ({ap_why})",
              "fix or unset ASPROF_LIB")
        blockers.extend(ap_problems or ["async-profiler unusable"])
        return None
    if builtin_why_not is not None:
        d.add("Engine", "engine", FAIL, f"none: async-profiler does not load ({ap_why}) and {builtin_why_not}",
              "install async-profiler, or reinstall asprof to build its built-in engine")
        blockers.extend(ap_problems or ["async-profiler unusable"])
        return None
    d.add("Engine", "engine", OK, f"builtin: auto, because async-profiler does not load ({ap_why}); "
          "install async-profiler for native stacks and native memory")
    return "builtin"


def _guard(fn: Callable[[], Optional[str]]) -> Optional[str]:
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None


def _nativemem_hazard() -> Optional[str]:
    from asprof.engines.asyncprofiler import nativemem_hazard

    return nativemem_hazard()


def _secs(v: float) -> str:
    from asprof.autostart.values import format_seconds as _fmt_seconds

    return _fmt_seconds(v)


def _cpu_checks(d: Diagnosis) -> str:
    paranoid_text = read_file("/proc/sys/kernel/perf_event_paranoid")
    caps = effective_capabilities()
    privileged = os.geteuid() == 0 or bool(caps & (1 << CAP_SYS_ADMIN)) or bool(caps & (1 << CAP_PERFMON))
    who = ("root" if os.geteuid() == 0 else "CAP_PERFMON/CAP_SYS_ADMIN" if privileged else "unprivileged")
    if paranoid_text is None:
        d.add("CPU sampling", "perf_event_paranoid", WARN, "unknown (/proc/sys/kernel/perf_event_paranoid unreadable)")
    else:
        try:
            level = int(paranoid_text)
        except ValueError:
            level = 99
        meaning = _PARANOID.get(level) if level <= 2 else "perf events forbidden to unprivileged processes"
        if level < -1:
            meaning = _PARANOID[-1]
        d.add("CPU sampling", "perf_event_paranoid", INFO,
              f"{paranoid_text}: {meaning}; this process is {who}"
              + (" (privileged processes are not restricted)" if privileged and level > -1 else ""))
    works, why = perf_event_probe()
    if works:
        d.add("CPU sampling", "engine", OK,
              "perf_events (cpu-clock per thread): accurate CPU time, one file descriptor per thread "
              f"(ulimit -n is {nofile_limit()})")
        return "perf_events"
    d.add("CPU sampling", "engine", WARN,
          f"ctimer (timer_create per thread), because {why}: CPU samples are still taken, without kernel "
          "frames and slightly less precise",
          "for perf_events: sysctl kernel.perf_event_paranoid=1, or grant CAP_PERFMON; in Docker the default "
          "seccomp profile blocks perf_event_open (--security-opt seccomp=... or --cap-add PERFMON)")
    return "ctimer"


def _container_checks(d: Diagnosis, env: Mapping[str, str]) -> None:
    kind = []
    if os.path.exists("/.dockerenv"):
        kind.append("Docker")
    if os.path.exists("/run/.containerenv"):
        kind.append("Podman")
    if env.get("KUBERNETES_SERVICE_HOST"):
        kind.append("Kubernetes")
    if env.get("ECS_CONTAINER_METADATA_URI_V4"):
        kind.append("ECS")
    cg = read_file("/proc/1/cgroup") or ""
    if not kind and any(k in cg for k in ("docker", "kubepods", "containerd", "lxc")):
        kind.append("a container")
    d.add("Container", "runtime", INFO, ", ".join(kind) if kind else "no container detected")
    try:
        limits = container_limits()
    except (ValueError, OSError):
        limits = {}
    cpus = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cpus
    d.add("Container", "CPU", INFO, f"{limits.get('cpu', 'no cgroup limit found')}; {usable} of {cpus} CPUs usable")
    d.add("Container", "memory", INFO, limits.get("memory", "no cgroup limit found"))


def _directory_checks(d: Diagnosis, cfg: Any) -> bool:
    ok = True
    tmp = os.environ.get("TMPDIR") or "/tmp"
    tmp_ok, tmp_why = writable_dir(tmp) if os.path.isdir(tmp) else (False, f"{tmp} does not exist")
    d.add("Directories", "recording files", OK if tmp_ok else WARN,
          f"{tmp_why} (async-profiler writes the current recording to an unnamed file there)" if tmp_ok else
          f"{tmp_why}; recordings then go to anonymous memory files (memfd)")
    if not os.path.isdir("/proc/self/fd"):
        d.add("Directories", "/proc", FAIL, "/proc is not mounted: async-profiler cannot be given its recording file",
              "mount /proc (containers have it by default)")
        ok = False
    if cfg is None or not cfg.enabled:
        return ok
    from asprof.reporter.files import directory_problem  # issue #13: the reporters' own rules

    if cfg.s3_bucket is None:
        good, why = writable_dir(cfg.directory or "profiles")
        problem = directory_problem(cfg.directory or "profiles", "LocalReporter") if good else None
        d.add("Directories", "profiles", OK if good and problem is None else FAIL, problem or why,
              None if good and problem is None else
              "set ASPROF_REPORTER to a private writable directory (a new path is created 0700) or fix permissions")
        ok = ok and good and problem is None
    elif cfg.s3_spool_dir:
        good, why = writable_dir(cfg.s3_spool_dir)
        problem = directory_problem(cfg.s3_spool_dir, "S3Reporter", "spool directory", 0o077) if good else None
        d.add("Directories", "S3 spool", OK if good and problem is None else FAIL, problem or why,
              None if good and problem is None else
              "set ASPROF_S3_SPOOL_DIR to a private writable directory, or unset it (memory spool)")
        ok = ok and good and problem is None
    return ok


def _s3_checks(d: Diagnosis, env: Mapping[str, str], offline: bool, timeout: float, required: bool) -> bool:
    try:
        boto3: Any = importlib.import_module("boto3")
    except ImportError:
        if required:
            d.add("S3", "boto3", FAIL, "not installed, and ASPROF_REPORTER is s3://", "pip install 'asprof[s3]'")
            return False
        d.add("S3", "boto3", INFO, "not installed (needed only for s3:// reporters: pip install 'asprof[s3]')")
        return True
    d.add("S3", "boto3", OK, f"version {boto3.__version__}")
    source, note = credentials_source(env, offline, timeout)
    if source:
        d.add("S3", "credentials", OK, f"found (source: {source}; values not shown)" + (f"; {note}" if note else ""))
        return True
    status = FAIL if required and not offline else (WARN if required else INFO)
    d.add("S3", "credentials", status, f"none found ({note})",
          "give the process an IAM role (instance profile, ECS task role, IRSA) or AWS_* credentials"
          if required else None)
    return status != FAIL


def _metadata_checks(d: Diagnosis, env: Mapping[str, str], offline: bool, timeout: float) -> None:
    if offline:
        d.add("Host metadata", "endpoints", INFO, "not probed (--offline)")
        return
    try:
        from asprof.metadata import aws
    except ImportError:  # pragma: no cover
        d.add("Host metadata", "endpoints", INFO, "AWS detection is not available in this build")
        return
    ecs = (env.get("ECS_CONTAINER_METADATA_URI_V4") or "").strip()
    if ecs:
        try:
            md = aws.ecs_metadata(ecs, {}, timeout)
            d.add("Host metadata", "ECS task metadata", OK, f"reachable: task {md.ecs_task_arn} "
                  f"(profiles named {md.s3_key_part!r})")
        except Exception as e:  # noqa: BLE001
            d.add("Host metadata", "ECS task metadata", WARN, f"{ecs}: unreachable or unusable: {e}",
                  "profiles are named 'unknown__' until it answers")
        return
    try:
        md2 = aws.ec2_metadata({}, timeout)
        d.add("Host metadata", "EC2 IMDS", OK, f"reachable: instance {md2.ec2_instance_id} in {md2.aws_region_id} "
              f"(profiles named {md2.s3_key_part!r})")
    except Exception as e:  # noqa: BLE001
        d.add("Host metadata", "EC2 IMDS", INFO, f"not reachable ({e}): not on EC2/ECS, profiles are named "
              "'unknown__'")
