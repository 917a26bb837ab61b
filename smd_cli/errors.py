"""Errors a user can cause and fix. The CLI prints each problem as one line, with exit code 2."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Iterator, Sequence

MAX_REPORTED = 20  # problems of one scene reported at once


def printable(text: str) -> str:
    """`text` with control characters escaped (a newline becomes `\\n`), safe to print on one line."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def unexpected(exc: BaseException) -> str:
    """An exception that is not smd's own, in one line."""
    return printable(f"{type(exc).__name__}: {exc}")


class SmdError(Exception):
    """Base of smd's own errors: the message says what is wrong and how to fix it."""

    exit_code = 2

    def messages(self) -> list[str]:
        """Every problem, one line each."""
        return [str(self)]


class SceneError(SmdError):
    """A problem in a scene file, located by file, line and key path (`layers[1].mask`); it may
    carry the scene's other problems (`others`), so that one run reports them all."""

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None,
                 key: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.key = key
        self.others: list[SceneError] = []
        super().__init__(str(self))

    @staticmethod
    def gather(errors: Sequence[SceneError]) -> SceneError:
        """One error that carries all of `errors`, in the order of their lines in the file."""
        ordered = sorted(errors, key=lambda e: (e.line is None, e.line or 0))
        ordered[0].others = ordered[1:]
        return ordered[0]

    def messages(self) -> list[str]:
        shown = [str(self)] + [str(e) for e in self.others[: MAX_REPORTED - 1]]
        hidden = 1 + len(self.others) - len(shown)
        return shown + ([f"... and {hidden} more problems in {self.file or 'the scene'}"] if hidden else [])

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        key = f"{self.key}: " if self.key else ""
        return printable(f"{where}{key}{self.message}")


class ModelError(SmdError):
    """A model that cannot be found, loaded or used for the request; `offline` when the reason is
    that it is not downloaded and the hub cannot be reached."""

    offline = False


class OutputError(SmdError):
    """An output path that cannot be formed or written."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, which smd handles as Ctrl-C: finished work is kept, nothing is left
    half-written, and the exit code is 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


INTERRUPTING = ("SIGTERM", "SIGHUP")  # handled as Ctrl-C is
_received: list[int] = []  # the signals that interrupted this process's work


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within it, SIGTERM and SIGHUP raise `Terminated` (a KeyboardInterrupt) wherever the work is,
    so that they end it as Ctrl-C does (`smd` runs every command so; from Python, wrap `batch.run`)."""
    def interrupt(signum, frame):
        _received.append(signum)
        raise Terminated(signum)

    _received.clear()
    names = [name for name in INTERRUPTING if hasattr(signal, name)]
    try:
        previous = {name: signal.signal(getattr(signal, name), interrupt) for name in names}
    except ValueError:  # not the main thread: leave the signals alone
        previous = {}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


class SignalsHeld:
    """Within it, Ctrl-C, SIGTERM and SIGHUP wait: `signum` is the first that came, for the caller
    to act on after the block, so that a finished image is written and reported whole."""

    signum: int | None = None

    def __enter__(self) -> "SignalsHeld":
        names = [name for name in ("SIGINT", *INTERRUPTING) if hasattr(signal, name)]
        try:
            self._previous = {name: signal.signal(getattr(signal, name), self._hold) for name in names}
        except ValueError:  # not the main thread: leave the signals alone
            self._previous = {}
        return self

    def _hold(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            _received.append(signum)

    def __exit__(self, *exc) -> None:
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)

    def interruption(self) -> KeyboardInterrupt:
        """What the held signal would have raised."""
        return KeyboardInterrupt() if self.signum == signal.SIGINT else Terminated(self.signum)


def was_interrupted() -> bool:
    """Whether a signal interrupted this command's work (held ones included)."""
    return bool(_received)


def interrupted_code(exc: BaseException | None = None) -> int:
    """128 + the signal that interrupted: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + getattr(exc, "signum", _received[-1] if _received else signal.SIGINT)


class OutOfMemory(SmdError):
    """The device ran out of memory even at the smallest batch."""

    exit_code = 1
