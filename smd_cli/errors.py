"""Errors a user can cause and fix. The CLI prints them as one line with exit code 2."""

from __future__ import annotations

from pathlib import Path


def printable(text: str) -> str:
    """`text` with control characters escaped (a newline becomes `\\n`), safe to print on one line."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


class SmdError(Exception):
    """Base of smd's own errors: the message says what is wrong and how to fix it."""

    exit_code = 2


class SceneError(SmdError):
    """A problem in a scene file, located by file, line and key path (`layers[1].mask`)."""

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None,
                 key: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        key = f"{self.key}: " if self.key else ""
        return printable(f"{where}{key}{self.message}")


class ModelError(SmdError):
    """A model that cannot be found, loaded or used for the request."""


class OutputError(SmdError):
    """An output path that cannot be formed or written."""


class OutOfMemory(SmdError):
    """The device ran out of memory even at the smallest batch."""

    exit_code = 1
