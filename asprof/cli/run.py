"""``asprof run [OPTIONS] -- PROGRAM [ARGS...]``: run a program with profiling on.

The mechanism of ``ddtrace-run``: the options become ``ASPROF_*``
variables, a directory holding a ``sitecustomize`` module that does
``import asprof.auto`` goes first on ``PYTHONPATH`` (it then runs any
``sitecustomize`` it shadows), and the program replaces this process
(``execvpe``): its arguments, exit status and signals are its own. Every
Python process started with that environment profiles itself, each with its
own files and pid.

    asprof run -- python app.py --port 8000
    asprof run --reporter /var/profiles --interval 10s -- gunicorn -w 4 app:wsgi
    asprof run -- -m mypackage.main arg     # this interpreter, -m
    asprof run -- script.py arg             # this interpreter, a script
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from asprof.autostart.config import ConfigError, EnvConfig

__all__ = ["add_parser", "run", "bootstrap_dir", "program_environment", "command_line"]

#: (option, variable, metavar, help) -- each option sets one ASPROF_* variable.
_OPTIONS: Tuple[Tuple[str, str, str, str], ...] = (
    ("--reporter", "ASPROF_REPORTER", "DEST", "a directory, file:///dir, or s3://bucket/prefix (default ./profiles)"),
    ("--interval", "ASPROF_REPORTING_INTERVAL", "DURATION", "time between profiles: 30s, 500ms, 2m (default 30s)"),
    ("--cpu-interval", "ASPROF_CPU_INTERVAL", "DURATION", "CPU time between CPU samples (default 100ms)"),
    ("--wall-interval", "ASPROF_WALL_INTERVAL", "DURATION", "time between wall-clock samples, or off (default 1s)"),
    ("--native-mem", "ASPROF_NATIVE_MEM", "SIZE", "bytes between native memory samples (10m), all, or off"),
    ("--python-alloc", "ASPROF_PYTHON_ALLOC", "SIZE",
     "Python allocation sampling: bytes between samples (512k), on, or off (default off)"),
    ("--engine", "ASPROF_ENGINE", "ENGINE", "what samples: auto (default), async-profiler or builtin"),
    ("--cstack", "ASPROF_CSTACK", "MODE", "native stack walking: dwarf, fp or no"),
    ("--lib", "ASPROF_LIB", "PATH", "libasyncProfiler.so to use"),
    ("--log-level", "ASPROF_LOG_LEVEL", "LEVEL", "debug, info, warning, error, critical or off"),
    ("--service", "ASPROF_SERVICE", "NAME", "service name (report metadata; default S3 profiling group)"),
    ("--service-version", "ASPROF_VERSION", "VERSION", "service version (report metadata)"),
    ("--env", "ASPROF_ENV", "ENV", "deployment environment (report metadata)"),
    ("--s3-bucket-owner", "ASPROF_S3_BUCKET_OWNER", "ACCOUNT", "S3: the account id that must own the bucket"),
    ("--profiling-group", "ASPROF_PROFILING_GROUP", "GROUP", "S3: the profiling group"),
    ("--s3-region", "ASPROF_S3_REGION", "REGION", "S3: the bucket's region"),
    ("--s3-endpoint-url", "ASPROF_S3_ENDPOINT_URL", "URL", "S3: another endpoint"),
    ("--s3-spool-dir", "ASPROF_S3_SPOOL_DIR", "DIR", "S3: a directory where profiles wait for upload"),
    ("--file-mode", "ASPROF_FILE_MODE", "MODE", "local profiles' mode in octal: 600 (default), 640 or 644"),
    ("--kill-switch-file", "ASPROF_KILL_SWITCH_FILE", "PATH", "profiling stops while this file exists"),
    ("--max-cpu-percent", "ASPROF_MAX_CPU_PERCENT", "PERCENT", "stop when the agent uses more than this %% of a core"),
    ("--max-memory-mb", "ASPROF_MAX_MEMORY_MB", "MIB", "stop when async-profiler's memory passes this"),
)
#: Options whose value is a local path: made absolute here, so that processes
#: that change directory (or start in another one) agree on it.
_PATHS = {"ASPROF_LIB", "ASPROF_KILL_SWITCH_FILE", "ASPROF_S3_SPOOL_DIR"}


def bootstrap_dir() -> str:
    """The directory holding the ``sitecustomize`` that starts profiling."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "autostart", "bootstrap")


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "run",
        help="run a program with profiling on (no code change)",
        description="Run PROGRAM with the profiling agent on in it, and in every Python process it starts. "
                    "Options set the ASPROF_* variables of the same meaning (docs/configuration.md); "
                    "variables already set are kept unless an option overrides them. The program's "
                    "arguments are passed untouched; its exit status is this command's.",
        epilog="examples:\n"
               "  asprof run -- python app.py --port 8000\n"
               "  asprof run --reporter /var/profiles --interval 10s -- gunicorn -w 4 app:wsgi\n"
               "  asprof run -- -m package.module args   (this interpreter, like python -m)\n"
               "  asprof run -- script.py args           (this interpreter)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for option, variable, metavar, help_text in _OPTIONS:
        p.add_argument(option, dest=variable, metavar=metavar, help=f"{help_text} [{variable}]")
    p.add_argument("--tag", dest="tags", action="append", metavar="KEY=VALUE", default=[],
                   help="extra report metadata, repeatable [ASPROF_TAGS]")
    p.add_argument("--disable", action="store_true",
                   help="run the program with profiling off (ASPROF_ENABLED=0), e.g. to compare")
    p.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS...]",
                   help="the command to run; '-m MODULE' or 'SCRIPT.py' run this interpreter")
    p.set_defaults(func=run)
    return p


def program_environment(options: Dict[str, Optional[str]], tags: Sequence[str], disable: bool = False,
                        base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of the program: ``base`` (default ``os.environ``) with the
    options' variables set and the bootstrap directory first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    for variable, value in options.items():
        if value is None:
            continue
        if variable in _PATHS and value.strip():
            value = os.path.abspath(os.path.expanduser(value.strip()))
        elif variable == "ASPROF_REPORTER":
            value = _absolute_reporter(value)
        env[variable] = value
    if tags:
        merged = [t for t in env.get("ASPROF_TAGS", "").split(",") if t.strip()]
        merged += [t.strip() for t in tags]
        env["ASPROF_TAGS"] = ",".join(merged)
    if disable:
        env["ASPROF_ENABLED"] = "0"
    boot = bootstrap_dir()
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != boot]
    env["PYTHONPATH"] = os.pathsep.join([boot, *parts])
    return env


def _absolute_reporter(value: str) -> str:
    v = value.strip()
    low = v.lower()
    if not v or "://" in v or low.startswith("file:"):
        return v
    if low.startswith("local:"):
        return "local:" + os.path.abspath(os.path.expanduser(v[6:].strip()))
    return os.path.abspath(os.path.expanduser(v))


def command_line(program: Sequence[str]) -> List[str]:
    """What to execute: ``-m``/``-c``/``*.py`` run this interpreter; anything else as given."""
    argv = list(program)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        return []
    first = argv[0]
    if first in ("-m", "-c") or first.startswith(("-m", "-c")) and not first.startswith("--"):
        return [sys.executable, *argv]
    if first.endswith(".py") and os.path.isfile(first):
        return [sys.executable, *argv]
    return argv


def run(args: argparse.Namespace, execvpe: Callable[[str, List[str], Dict[str, str]], None] = os.execvpe) -> int:
    from asprof.cli import CliError

    argv = command_line(args.program)
    if not argv:
        raise CliError("no program to run: asprof run [OPTIONS] -- PROGRAM [ARGS...] (see 'asprof run --help')", 2)
    options = {variable: getattr(args, variable) for _, variable, _, _ in _OPTIONS}
    env = program_environment(options, args.tags, args.disable)
    # A mistake on the command line is reported before anything runs (in the
    # environment, the same mistake is one log line and the program runs unprofiled).
    try:
        EnvConfig.from_environ({k: v for k, v in env.items() if k.startswith("ASPROF_")})
    except ConfigError as e:
        option = next((o for o, v, _, _ in _OPTIONS if v == e.variable and getattr(args, v) is not None), None)
        if option is None and e.variable == "ASPROF_TAGS" and args.tags:
            option = "--tag"
        if option is not None:
            raise CliError(f"{option}: {e.reason} (got {e.value!r})", 2) from e
        # From the inherited environment: the program says it in its own log line.
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        execvpe(argv[0], argv, env)
    except FileNotFoundError:
        raise CliError(f"{argv[0]}: command not found", 127) from None
    except PermissionError:
        raise CliError(f"{argv[0]}: permission denied", 126) from None
    except OSError as e:
        raise CliError(f"{argv[0]}: cannot run it: {e.strerror or e}", 126) from None
    return 0  # only with a test's execvpe
