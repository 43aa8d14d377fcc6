"""The directory ``asprof run`` puts first on ``PYTHONPATH``.

It holds a ``sitecustomize`` module that starts profiling from the
environment (``import asprof.auto``) in every Python process started with
that ``PYTHONPATH``, then runs the ``sitecustomize`` that would otherwise
have been found further along ``sys.path``. Nothing here is imported as
part of the ``asprof`` package.
"""
