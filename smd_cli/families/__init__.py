"""The model families smd runs, one file each, and the registry that tells them apart.

A family is a `Family` subclass (`smd_cli.families.base`: the protocol) in a file of its own:
`sd.py` (SD 1.x and 2.x), `sdxl.py`, `sd3.py`, `flux.py`. Its facts are read here without
loading a model or importing torch; a model is told to be of a family by its denoiser's config,
never by its name. Adding a family: write its file and add it to `FAMILIES` below
(docs/development.md#adding-a-family).
"""

from __future__ import annotations

from typing import Mapping

from smd_cli.families.base import Conditioning, Family, Placement
from smd_cli.families.flux import Flux
from smd_cli.families.sd import StableDiffusion
from smd_cli.families.sd3 import StableDiffusion3
from smd_cli.families.sdxl import StableDiffusionXL
from smd_cli.method.views import Grid

# The registry: each family's `matches` recognises its denoisers' configs, and no config matches two.
FAMILIES: dict[str, type[Family]] = {f.name: f for f in (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)}
DEFAULT = StableDiffusion  # the family of smd's default model


def named(name: str) -> type[Family]:
    """The family registered under `name` ("sd", "sdxl", "sd3", "flux")."""
    return FAMILIES[name]


def family_of(config: Mapping) -> str:
    """The name of the family a denoiser's config (a UNet's or a transformer's) belongs to."""
    return next(f.name for f in FAMILIES.values() if f.matches(config))


def of_checkpoint(keys) -> str | None:
    """The family of a single-file checkpoint, from its tensors' names; None when no family says."""
    keys = frozenset(keys)
    return next((f.name for f in FAMILIES.values() if f.matches_checkpoint(keys)), None)


def of_version(version: str) -> type[Family] | None:
    """The family the Python API's `sd_version` names ("1.5", "xl", "3.5", "flux"), None if none does."""
    return next((f for f in FAMILIES.values() if str(version).lower() in f.versions or version == f.name), None)


def guidance_distilled(config: Mapping) -> bool:
    """Whether a denoiser takes the guidance scale as an input (docs/method.md §3.3)."""
    return FAMILIES[family_of(config)].guidance_distilled_config(config)


def runs_unconditional(guidance_scale: float, config: Mapping) -> bool:
    """Whether classifier-free guidance runs an unconditional pass: only above 1, and never for a
    guidance-distilled denoiser, which takes the scale as an embedding (docs/method.md §3.3)."""
    return guidance_scale > 1.0 and not guidance_distilled(config)


def default_grid() -> Grid:
    """What the default model asks of a canvas, known before it is downloaded."""
    from smd_cli.core import defaults

    return DEFAULT.grid_of({}, defaults.MODEL_VAE_FACTOR)


def grid_of(config: Mapping, factor: int, family: str | None = None) -> Grid:
    """What a model asks of a canvas, from its denoiser's config and its VAE's factor."""
    return FAMILIES[family or family_of(config)].grid_of(config, factor)


__all__ = ["FAMILIES", "Family", "Conditioning", "Placement", "named", "family_of", "of_checkpoint", "of_version",
           "guidance_distilled", "runs_unconditional", "default_grid", "grid_of", "StableDiffusion",
           "StableDiffusionXL", "StableDiffusion3", "Flux"]
