"""Engines: what records samples and hands over finished JFR recordings.

:mod:`~asprof.engines.base` is the :class:`~asprof.engines.base.Engine` protocol the agent
drives and its :class:`~asprof.engines.base.TickResult`; :mod:`~asprof.engines.asyncprofiler`
is async-profiler through the native core (``asprof._native``), with the settings chunk it
puts in front of every report (:mod:`~asprof.engines.settings_chunk`).

May import: :mod:`asprof.pyframes`, :mod:`asprof.jfrio`, :mod:`asprof.options`,
:mod:`asprof.errors` and the C extensions. Never the agent, the reporters or the reader.
"""
