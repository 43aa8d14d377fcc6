"""The ``asprof`` command (also ``python -m asprof``).

Subcommands live in their own modules; each exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` and sets
``func=<callable(args) -> int>`` on its parser. To add one, append its
module to :data:`SUBCOMMANDS` -- one line.

Errors print one line, ``asprof: error: ...``, to stderr and exit with
status 1 (bad input, I/O) or 2 (bad usage); no traceback.

The top layer: may import anything, the offline reader (:mod:`asprof.jfr`) included; a verb
imports what it runs when it runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Dict, List, NoReturn, Optional, Sequence

from asprof.errors import AsprofError

__all__ = ["main", "SUBCOMMANDS", "CliError", "ArgumentParser"]

#: Modules that each register one subcommand with ``add_parser(subparsers)``.
SUBCOMMANDS: List[str] = [
    "asprof.cli.convert",
    "asprof.cli.summary",
    "asprof.cli.top",
    "asprof.cli.run",
    "asprof.cli.doctor",
    "asprof.cli.longsteps",
]

#: Optional fast path: a subcommand's name -> its module. Running that subcommand then imports
#: only its module (keeps start-up short); ``--help`` and other commands import them all.
COMMAND_MODULES: Dict[str, str] = {
    "convert": "asprof.cli.convert",
    "summary": "asprof.cli.summary",
    "top": "asprof.cli.top",
    "longsteps": "asprof.cli.longsteps",
}


class CliError(AsprofError):
    """A user-facing error: printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')", 2)


class _VersionAction(argparse.Action):
    """Prints the version; looked up only when asked (importlib.metadata is slow to import)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        try:
            from importlib.metadata import version

            ver = version("asprof")
        except Exception:  # noqa: BLE001 - not installed (running from a source tree)
            ver = "unknown"
        sys.stdout.write(f"asprof {ver}\n")
        parser.exit(0)


def build_parser(modules: Optional[Sequence[str]] = None) -> ArgumentParser:
    """The ``asprof`` parser with the subcommands of ``modules`` (default: all of :data:`SUBCOMMANDS`)."""
    parser = ArgumentParser(
        prog="asprof",
        description="Continuous profiling for Python services with async-profiler: run a program "
                    "profiled (run), check this machine (doctor), read and view profiles (convert, "
                    "summary, top).",
    )
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name in (SUBCOMMANDS if modules is None else modules):
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from asprof.jfr.errors import JfrError

    args: Any = None
    try:
        argl = list(argv) if argv is not None else sys.argv[1:]
        fast = COMMAND_MODULES.get(argl[0]) if argl and "-h" not in argl and "--help" not in argl else None
        parser = build_parser([fast] if fast in SUBCOMMANDS else None)
        args = parser.parse_args(argl)
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except CliError as e:
        _err(str(e))
        return e.code
    except JfrError as e:
        _err(str(e))
        return 1
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            return 1
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _err(f"{where}{e.strerror or e}")
        return 1
    except (ValueError, MemoryError) as e:
        _err(str(e) or type(e).__name__)
        return 1
    except RecursionError:  # a last resort: a reader step that recursed on deeply nested input
        _err("the input is nested too deeply to read (recursion limit)")
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


def _err(msg: str) -> None:
    try:
        sys.stderr.write(f"asprof: error: {msg}\n")
        sys.stderr.flush()
    except OSError:
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
