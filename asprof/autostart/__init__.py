"""Profiling started from the environment: the ``ASPROF_*`` variables and their values
(:mod:`~asprof.autostart.config`, the one owner of both), the start behind
``import asprof.auto``, and the ``sitecustomize`` that ``asprof run`` puts first on
``PYTHONPATH`` (``bootstrap/``).

May import: :mod:`asprof.profiler` and everything below it. Nothing imports it but
:mod:`asprof.auto`, :mod:`asprof.cli` and the bootstrap.
"""
