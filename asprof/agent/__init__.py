"""The agent side of a running profiler: the ``asprof-agent`` thread (:mod:`~asprof.agent.loop`:
its ticks, the kill switch and the overhead guards, the one agent per process) and the process
life-cycle hooks (:mod:`~asprof.agent.lifecycle`: final report at exit and on SIGTERM, pausing
and restarting around ``os.fork()``).

May import: :mod:`asprof.engines`, :mod:`asprof.reporter`, :mod:`asprof.metadata`,
:mod:`asprof.pyframes`, :mod:`asprof.jfrio`, :mod:`asprof.options`, :mod:`asprof.errors`.
Never :mod:`asprof.profiler` (above it) nor the offline reader :mod:`asprof.jfr`.
"""
