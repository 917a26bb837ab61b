"""A hires pass that keeps the regions (docs/large-pictures.md "Two passes: hires").

The first image, made at the request's size (or given: `smd upscale`), is upscaled and denoised
again from `strength` with the same layers: prompts, LoRAs, ControlNets and references as they
were, the masks resized (bilinear, so a region stays where it was), views laid out on the larger
canvas at the model's native size. The second pass is the engine's own run from a start latent
(`StableMultiDiffusionPipeline.run` with `start`), never a second loop. It does not bootstrap
(docs/method.md §3.2): the first pass has placed every object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from PIL import Image

from smd_cli.core import defaults
from smd_cli.core.errors import SmdError
from smd_cli.engine.prepare import Layers, Request
from smd_cli.method import masks as mask_ops
from smd_cli.method.hires import hires_size
from smd_cli.method.views import tiling, work_problem
from smd_cli.models.controls import ControlSpec

if TYPE_CHECKING:
    from smd_cli.engine.pipeline import StableMultiDiffusionPipeline

SEED_OFFSET = 1  # the second pass's noise comes from the first pass's seed plus this


@dataclass(frozen=True)
class Hires:
    """A second pass: `scale` (> 1) times the canvas, denoised from `strength` in [0, 1] over the
    tail of a `steps`-step schedule (None: the request's), optionally with a tile ControlNet fed
    the upscaled first image. `upscale` is pixels (decode, Lanczos, encode) or latents (bilinear)."""

    scale: float
    strength: float = defaults.HIRES_STRENGTH
    steps: int | None = None
    controlnet: str | None = None
    controlnet_scale: float = 1.0
    upscale: str = defaults.HIRES_UPSCALE

    def check(self) -> None:
        """Raise `SmdError` for settings no scene could have (the Python API takes anything)."""
        if not self.scale > 1:
            raise SmdError(f"hires scale must be above 1 (2 doubles each side), got {self.scale}")
        if not 0 <= self.strength <= 1:
            raise SmdError(f"hires strength must be 0 to 1 (how much of the schedule runs again), got "
                           f"{self.strength}")
        if self.steps is not None and not 1 <= self.steps <= defaults.MAX_STEPS:
            raise SmdError(f"hires steps must be 1 to {defaults.MAX_STEPS}, got {self.steps}")
        if self.upscale not in defaults.HIRES_UPSCALES:
            raise SmdError(f"hires upscale must be pixels or latents, got {self.upscale!r}")


def as_hires(value: Any) -> Hires | None:
    """A hires pass as the Python API takes it: None, a `Hires`, or a mapping of its fields."""
    if value is None or isinstance(value, Hires):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {f.name for f in dataclasses.fields(Hires)}
        if unknown or "scale" not in value:
            raise SmdError("hires takes scale (required), strength, steps, controlnet, controlnet_scale and "
                           f"upscale, got {', '.join(map(str, value))}")
        return Hires(**value)
    raise SmdError(f"hires must be a mapping such as dict(scale=2, strength=0.5), got {type(value).__name__}")


def larger(pipe: StableMultiDiffusionPipeline, request: Request, allow_large: bool) -> tuple[int, int]:
    """The second pass's canvas, checked as any canvas is (sides, views, work)."""
    h = request.hires
    width, height = hires_size(request.width, request.height, h.scale, pipe.family.grid.multiple)
    tiles = tiling(pipe.family.grid, width, height, tile_size=first_tile(pipe, request),
                   tile_stride=request.tile_stride, circular=request.circular)
    steps = len(pipe.schedule(h.steps or request.steps, None if h.steps else request.timesteps, request.scheduler,
                              request.timestep_spacing, tiles.view))
    problem = work_problem(tiles.count, len(request.layers.prompts), steps, allow_large=allow_large,
                           allow="allow_large=True")
    if problem:
        raise SmdError(f"hires scale {h.scale}: {problem}; or lower the hires scale")
    return width, height


def first_tile(pipe: StableMultiDiffusionPipeline, request: Request) -> int:
    """The second pass's views are the first pass's (the model's native size on all but canvases
    within 1.5 times it), so that a record, which gives the first pass's tile, makes the same image."""
    return request.tile_size or pipe.family.tile_size(request.height, request.width)


def second_request(request: Request, width: int, height: int, control: Image.Image | None, tile: int) -> Request:
    """The request of the second pass: the same layers on the larger canvas, masks resized bilinear
    and their blur scaled with them, the picture resized, no bootstrapping, the hires ControlNet
    (fed `control`, the upscaled first image) added to the canvas's."""
    h, old = request.hires, request.layers
    factor = width / request.width
    layers = Layers(old.prompts, old.negatives, mask_ops.fit_masks(old.masks, height, width), old.strengths,
                    [std * factor for std in old.stds], old.prompt_strengths, loras=old.loras,
                    controlnets=old.controlnets, references=old.references)
    controls = list(request.controlnets)
    if h.controlnet is not None:
        controls.append(ControlSpec(h.controlnet, control, h.controlnet_scale))
    picture = None if request.picture is None else mask_ops.fit_picture(request.picture, width, height, warn=False)
    return dataclasses.replace(request, layers=layers, width=width, height=height, picture=picture,
                               steps=h.steps or request.steps, timesteps=None if h.steps else request.timesteps,
                               bootstrap_steps=0, controlnets=controls, tile_size=tile, hires=None)


def second_pass(pipe: StableMultiDiffusionPipeline, request: Request, *, first: torch.Tensor | None = None,
                picture: Image.Image | None = None, generator: torch.Generator | None = None,
                allow_large: bool = False, **run: Any):
    """The hires pass over a first image: its clean latent `first` (with `picture`, its decoded
    pixels, where the first pass made them) or, for `smd upscale`, only its `picture`. Returns what
    `run` returns for the larger canvas."""
    h = request.hires
    width, height = larger(pipe, request, allow_large)
    if picture is None and (h.upscale == "pixels" or h.controlnet is not None or first is None):
        picture = pipe.to_image(pipe.pixels(first, request.circular, vae_tiles=request.vae_tiles))
    upscaled = None if picture is None else mask_ops.fit_picture(picture, width, height, warn=False)
    if h.upscale == "pixels":
        start = pipe.encode_image(upscaled, request.vae_tiles)
    else:
        small = first if first is not None else pipe.encode_image(picture, request.vae_tiles)
        f = pipe.vae_scale_factor
        start = F.interpolate(small.float(), size=(height // f, width // f), mode="bilinear", align_corners=False)
    big = second_request(request, width, height, upscaled, first_tile(pipe, request))
    return pipe.run(big, start=start, strength=h.strength, generator=next_generator(generator),
                    allow_large=allow_large, **run)


def next_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """The second pass's own generator, from the first's seed: so that `smd upscale` of an image
    makes what the same scene and seed make with hires in one go."""
    if generator is None:
        return None
    return torch.Generator(generator.device).manual_seed((generator.initial_seed() + SEED_OFFSET) % 2**63)

