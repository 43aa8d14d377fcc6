"""``python -m asprof``: the ``asprof`` command."""
from __future__ import annotations

import sys

from asprof.cli import main

if __name__ == "__main__":
    sys.exit(main())
