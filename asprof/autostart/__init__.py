"""Profiling started from the environment: the ``ASPROF_*`` variables and their values
(:mod:`~asprof.autostart.config`, the one owner of both), the start behind
``import asprof.auto`` (:mod:`~asprof.autostart.start`), and the ``sitecustomize`` that
``asprof run`` puts first on ``PYTHONPATH`` (``bootstrap/``).

``config`` is the exception to this package's place at the top: it imports only
:mod:`asprof.errors`, so every layer may read its grammar and limits. ``start`` may import
:mod:`asprof.profiler` and everything below it; only :mod:`asprof.auto`, :mod:`asprof.cli` and
the bootstrap import it.
"""
