"""The one exception type of the JFR reader."""
from __future__ import annotations

from typing import Optional

from asprof.errors import AsprofError

__all__ = ["JfrError"]


class JfrError(AsprofError, ValueError):
    """A JFR input is malformed, truncated, or not a JFR at all.

    ``str(err)`` is one line naming the file, the byte offset and what is
    wrong, e.g. ``x.jfr: offset 1234: event size 99999 exceeds the chunk``.
    The parts are also available as attributes.
    """

    def __init__(self, reason: str, offset: Optional[int] = None, path: Optional[str] = None) -> None:
        self.reason = reason
        self.offset = offset
        self.path = path
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.path:
            # one line whatever the name holds (a newline or an escape sequence in a file name)
            parts.append("".join(c if c.isprintable() else repr(c)[1:-1] for c in self.path))
        if self.offset is not None:
            parts.append(f"offset {self.offset}")
        parts.append(self.reason)
        return ": ".join(parts)

    def with_path(self, path: str) -> "JfrError":
        """Return a copy of this error naming ``path`` (if it names none yet)."""
        if self.path:
            return self
        err = JfrError(self.reason, self.offset, path)
        err.__cause__ = self.__cause__
        return err

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (JfrError, (self.reason, self.offset, self.path))
