"""JFR bytes in and out, shared by the agent side and the offline reader.

:mod:`~asprof.jfrio.decode`: varints, strings and chunk headers; ``writer.py``: the one JFR
writer (issue #11). Pure functions on bytes. Imports nothing of asprof above
:mod:`asprof.errors`.
"""
