"""Errors a user can cause and fix. The CLI prints each problem as one line, with exit code 2."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import Iterator, Sequence

MAX_REPORTED = 20  # problems of one scene reported at once


def printable(text: str, keep_bytes: bool = False) -> str:
    """`text` with control characters escaped (a newline becomes `\\n`), safe to print on one line.
    A byte of a file name that is not UTF-8 (Python's surrogate escape, `'\\udce8'`) shows as the
    byte (`\\xe8`), or with `keep_bytes` stays, for a writer that writes it back as that byte."""
    return "".join(c if c.isprintable() or c == " " else _escape(c, keep_bytes) for c in text)


def _escape(c: str, keep_bytes: bool) -> str:
    if "\udc80" <= c <= "\udcff":
        return c if keep_bytes else f"\\x{ord(c) - 0xdc00:02x}"
    return c.encode("unicode_escape").decode("ascii")


def unicode_text(text: str) -> str:
    """`text` that UTF-8 can encode: a byte of a file name that is not UTF-8, or any other lone
    surrogate, becomes U+FFFD (for texts that people read, where the byte itself cannot go)."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


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
_unfinished: set[str] = set()  # temporary files being written (`outputs.temporary_beside`), until named or removed


def unfinished(path: str | Path, done: bool = False) -> None:
    """Register a temporary file being written (before it is created), or unregister it once it
    has its name or is gone (`done`): a second signal removes the registered ones (`end_now`)."""
    (_unfinished.discard if done else _unfinished.add)(os.fspath(path))


def end_now(signum: int) -> None:
    """End the process at once for a signal that came while an earlier one was being handled (or
    outside any work, `end_on_signals`), with 128 + its number, unwinding nothing: the temporary
    files being written are removed, so that an output is either whole under its name or not there."""
    for path in list(_unfinished):
        with contextlib.suppress(OSError):
            os.unlink(path)
    with contextlib.suppress(OSError):
        os.write(2, f"\nstopped at once by {signal.Signals(signum).name}\n".encode())
    exit_now(128 + signum)


def exit_now(code: int) -> None:
    """End the process with `code` at once, without the interpreter's teardown (which first sets
    the signals back to their default, so that a Ctrl-C during it would kill the process)."""
    for stream in (sys.stdout, sys.stderr):  # the paths already printed reach a pipe too
        with contextlib.suppress(Exception):  # a signal inside a write makes flushing reentrant
            stream.flush()
    os._exit(code)


def end_on_signals() -> None:
    """For a process that ends when its command does (`smd`): from now on, outside the work that
    `interrupt_on_signals` wraps, where there is nothing to finish, Ctrl-C, SIGTERM and SIGHUP end
    it at once (`end_now`), also a second one while it exits after the first. Main thread only."""
    for name in ("SIGINT", *INTERRUPTING):
        if _handled(name):
            signal.signal(getattr(signal, name), lambda signum, frame: end_now(signum))


def _handled(name: str) -> bool:
    """Whether smd may take signal `name`: it exists here, and nobody set it ignored (`nohup`)."""
    return hasattr(signal, name) and signal.getsignal(getattr(signal, name)) is not signal.SIG_IGN


def _interrupt(signum, frame) -> None:
    """The first signal raises where the work is; one while it is being handled ends smd at once."""
    if _received:
        end_now(signum)
    _received.append(signum)
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within it, Ctrl-C raises KeyboardInterrupt and SIGTERM and SIGHUP raise `Terminated` (a
    KeyboardInterrupt) wherever the work is, so that they end it as Ctrl-C does, and a second
    signal while the first is being handled ends the process at once (`end_now`). `smd` runs
    every command so; from Python, wrap `batch.run`. A signal set to be ignored stays ignored."""
    _received.clear()
    names = [name for name in ("SIGINT", *INTERRUPTING) if _handled(name)]
    try:
        previous = {name: signal.signal(getattr(signal, name), _interrupt) for name in names}
    except ValueError:  # not the main thread: leave the signals alone
        previous = {}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


class SignalsHeld:
    """Within it, Ctrl-C, SIGTERM and SIGHUP wait: `signum` is the first that came, for the caller
    to act on after the block, so that a finished image is written and reported whole. A second
    one ends the process at once (`end_now`), leaving the image whole or not there at all."""

    signum: int | None = None

    def __enter__(self) -> "SignalsHeld":
        names = [name for name in ("SIGINT", *INTERRUPTING) if _handled(name)]
        try:
            self._previous = {name: signal.signal(getattr(signal, name), self._hold) for name in names}
        except ValueError:  # not the main thread: leave the signals alone
            self._previous = {}
        return self

    def _hold(self, signum, frame) -> None:
        if self.signum is not None:
            end_now(signum)
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


def one_per_prompt(name: str, values: list, count: int) -> list:
    """`values` when it holds one entry per prompt; else the error every per-layer argument of the
    Python API gives (masks, strengths, LoRAs, ControlNets, references)."""
    if len(values) != count:
        raise SmdError(f"{name}: {len(values)} for {count} prompts; give one per prompt")
    return values
