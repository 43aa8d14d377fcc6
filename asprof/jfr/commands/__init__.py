"""Subcommands of the ``asprof`` command that read profiles: convert, summary, top.

Each module exposes ``add_parser(subparsers)``; see :mod:`asprof.cli`.
Shared options (profile kind, filters) and the progress indicator are in
:mod:`asprof.jfr.commands.common`.
"""
