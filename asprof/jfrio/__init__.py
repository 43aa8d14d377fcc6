"""JFR bytes in and out, shared by the agent side and the offline reader.

:mod:`~asprof.jfrio.decode`: varints, strings and chunk headers. Imports nothing of asprof
above :mod:`asprof.errors`.
"""
