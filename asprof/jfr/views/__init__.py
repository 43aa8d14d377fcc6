"""Views of a :class:`~asprof.jfr.profile.Profile`.

* :mod:`.collapsed` -- folded stacks, ``frame;frame;frame count`` (async-profiler naming)
* :mod:`.html` -- a self-contained interactive flame graph
* :mod:`.pprof` -- gzipped ``profile.proto`` for pprof, Pyroscope and Go tooling
* :mod:`.top` -- hottest frames by self and total weight

One output format per module, each a function of a ``Profile`` (and :mod:`.tree`, the call tree
two of them share). May import :mod:`asprof.jfr.profile` and :mod:`asprof.jfr.model` only.
"""
from __future__ import annotations

from asprof.jfr.views.collapsed import to_collapsed, write_collapsed
from asprof.jfr.views.html import to_html
from asprof.jfr.views.pprof import to_pprof
from asprof.jfr.views.top import TopEntry, format_top, top

__all__ = ["to_collapsed", "write_collapsed", "to_html", "to_pprof", "top", "format_top", "TopEntry"]
