"""Sweeps: `--vary KEY=V1,V2,...` read into axes, expanded into one variant of the scene per
combination of values, each named for its file (`{vary}`). A variant is a set of scene overrides,
the same mechanism as `--set`, so an image of a sweep is the image `--set` with its values makes
(docs/batches.md, "Tuning a scene"). Nothing here imports torch:

    from smd_cli.app import batch, sweeps

    sweep = sweeps.Sweep.parse(["layers[0].mask_std=0:16:8", "region_mode=latent,attention"])
    options = batch.Options(sweep=sweep, seeds=[1, 2])
    plan = batch.plan(["scenes/village.yaml"], options)   # 3 x 2 variants x 2 seeds = 12 jobs
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from smd_cli.core.errors import SmdError

MAX_KEYS = 3  # varied keys: rows, columns and pages of a contact sheet
MAX_VALUES = 1000  # of one key (more images than that need --yes anyway)
MAX_LABEL = 40  # characters of one value in a file name

KeyPath = tuple  # ('layers', 1, 'mask_std')


class SweepError(SmdError):
    """A `--vary` that cannot be swept: the whole batch stops before any model loads."""


def label(value: Any) -> str:
    """A value as people read it and YAML would write it: `0.6`, `attention`, `true`, `[0, 0, 32, 32]`."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def format_key(key: KeyPath) -> str:
    """('layers', 1, 'mask_std') -> 'layers[1].mask_std', as `--set` writes it."""
    out = ""
    for part in key:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def safe_part(text: str) -> str:
    """`text` as part of a file name on any file system: letters, digits and `.=+-` kept, the rest `-`."""
    cleaned = re.sub(r"[^\w.=+-]+", "-", text, flags=re.ASCII).strip("-.") or "_"
    return cleaned[:MAX_LABEL]


@dataclass(frozen=True)
class Axis:
    """One varied key and its values, in the order given."""

    key: KeyPath
    values: tuple

    @property
    def name(self) -> str:
        return format_key(self.key)

    @property
    def labels(self) -> list[str]:
        return [label(v) for v in self.values]

    @classmethod
    def parse(cls, text: str) -> Axis:
        """`KEY=V1,V2,...`, `KEY=START:STOP:STEP` (numbers, STOP included when a step lands on it) or
        `KEY=[V1, V2]` (a YAML list, for values with commas); each value is read as `--set` reads one."""
        from smd_cli.scenes.scene import parse_override

        if "=" not in text:
            raise SweepError(f"--vary expects KEY=V1,V2,... or KEY=START:STOP:STEP, got {text!r}")
        key_text, values_text = (part.strip() for part in text.split("=", 1))
        try:
            key = parse_override(f"{key_text}=")[0]
        except SmdError:
            raise SweepError(f"--vary expects KEY=V1,V2,... with a key like layers[1].mask_std, got {text!r}") from None
        where = f"--vary {key_text}"
        if values_text.startswith("["):
            values = parse_override(f"{key_text}={values_text}")[1]
            if not isinstance(values, list):
                raise SweepError(f"{where}: {values_text!r} is not a list; write [V1, V2, ...]")
        elif re.fullmatch(r"[^,:]+:[^,:]+:[^,:]+", values_text):
            values = number_range(values_text, where)
        else:
            parts = [part.strip() for part in values_text.split(",")]
            values = [parse_override(f"{key_text}={part}")[1] for part in parts if part]
        if not values:
            raise SweepError(f"{where}: no values; give them as {key_text}=V1,V2,... or {key_text}=START:STOP:STEP")
        unique = list({json.dumps(v, sort_keys=True, default=str): v for v in values}.values())  # repeats dropped
        if len(unique) > MAX_VALUES:
            raise SweepError(f"{where}: {len(unique)} values, more than the {MAX_VALUES} one key may take")
        return cls(tuple(key), tuple(unique))


def number_range(text: str, where: str) -> list[int | float]:
    """`0.5:1.0:0.1` -> [0.5, 0.6, ..., 1.0]: START, START + STEP, ... up to STOP (included when a
    step lands on it), counted in decimals so that no float rounding adds or drops a value or
    prints as 0.7000000000000001. Integers stay integers."""
    try:
        start, stop, step = (Decimal(part.strip()) for part in text.split(":"))
    except InvalidOperation:
        raise SweepError(f"{where}: range {text!r} needs three numbers START:STOP:STEP") from None
    if not all(x.is_finite() for x in (start, stop, step)):
        raise SweepError(f"{where}: range {text!r} needs finite numbers")
    if step == 0:
        raise SweepError(f"{where}: range {text!r} has step 0; give a positive step")
    if step < 0:
        raise SweepError(f"{where}: range {text!r} has a negative step; write it from low to high with a "
                         "positive step")
    if stop < start:
        raise SweepError(f"{where}: range {text!r} runs backwards; write {stop}:{start}:{step}")
    count = int((stop - start) // step) + 1
    if count > MAX_VALUES:
        raise SweepError(f"{where}: range {text!r} gives {count} values, more than the {MAX_VALUES} one key may "
                         "take; use a larger step")
    whole = all(x == x.to_integral_value() and "." not in part and "e" not in part.lower()
                for x, part in zip((start, stop, step), text.split(":")))
    values = [start + i * step for i in range(count)]
    return [int(v) for v in values] if whole else [float(v) for v in values]


@dataclass(frozen=True)
class Variant:
    """One combination of a sweep's values: the overrides that make it, and its name in files."""

    values: tuple  # one per axis
    overrides: dict = field(hash=False)  # key path -> value
    name: str  # `mask_std=0.5_region_mode=attention`: what `{vary}` becomes
    labels: dict = field(hash=False)  # axis name -> value as printed


@dataclass(frozen=True)
class Sweep:
    """The varied keys of a batch (at most three), each with its values."""

    axes: tuple[Axis, ...] = ()

    @classmethod
    def parse(cls, texts: list[str]) -> Sweep:
        """The sweep of `--vary` options, checked: at most three keys, none twice, none empty."""
        if len(texts) > MAX_KEYS:
            raise SweepError(f"--vary is given {len(texts)} times; a sweep varies at most {MAX_KEYS} keys (rows, "
                             "columns and pages of its sheet)")
        axes = [Axis.parse(text) for text in texts]
        seen: set = set()
        for axis in axes:
            if axis.key in seen:
                raise SweepError(f"--vary {axis.name} is given twice; list all its values in one --vary")
            seen.add(axis.key)
        return cls(tuple(axes))

    def __bool__(self) -> bool:
        return bool(self.axes)

    @property
    def size(self) -> int:
        """The number of combinations."""
        n = 1
        for axis in self.axes:
            n *= len(axis.values)
        return n

    def short_names(self) -> list[str]:
        """Each key as a file name says it: its last part (`mask_std`), or the whole key made safe
        where two keys end alike."""
        last = [str(axis.key[-1]) for axis in self.axes]
        return [safe_part(name if last.count(name) == 1 else re.sub(r"[\[\]]", "", axis.name))  # layers1.mask_std
                for name, axis in zip(last, self.axes)]

    def _value_names(self, axis: Axis) -> list[str]:
        """The values of an axis as file-name parts, numbered where two would read the same."""
        names = [safe_part(text) for text in axis.labels]
        if len(set(names)) < len(names):
            names = [f"{i + 1}-{name}" for i, name in enumerate(names)]
        return names

    def variants(self) -> list[Variant]:
        """Every combination, the first key's values outermost: rows, then columns, then pages."""
        if not self.axes:
            return []
        keys, value_names = self.short_names(), [self._value_names(axis) for axis in self.axes]
        out = []
        for picks in itertools.product(*(range(len(axis.values)) for axis in self.axes)):
            values = tuple(axis.values[i] for axis, i in zip(self.axes, picks))
            name = "_".join(f"{k}={names[i]}" for k, names, i in zip(keys, value_names, picks))
            out.append(Variant(values, {axis.key: v for axis, v in zip(self.axes, values)}, name,
                               {axis.name: label(v) for axis, v in zip(self.axes, values)}))
        return out


def describe(variant: Variant) -> str:
    """A variant in words for messages: `layers[0].mask_std=0.5, region_mode=attention`."""
    return ", ".join(f"{k}={v}" for k, v in variant.labels.items())
