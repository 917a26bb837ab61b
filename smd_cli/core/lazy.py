"""Modules imported on first use.

A family file (`smd_cli.families`) holds its facts, which `smd validate` and `smd --help` read
without torch, beside the torch code that runs a loaded model. It names torch as `lazy("torch")`:
the name is bound when the file is imported, and torch itself is imported the first time one of
its attributes is read (see docs/development.md#the-torch-boundary).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any, Callable


class LazyModule:
    """A module's stand-in: reading an attribute imports the module and reads it there."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        module: ModuleType = importlib.import_module(self._name)
        return getattr(module, attribute)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


def lazy(name: str) -> Any:
    return LazyModule(name)


def no_grad(function: Callable) -> Callable:
    """`torch.no_grad()` as a decorator that imports torch when the function runs, not when it is defined."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)

    return run
