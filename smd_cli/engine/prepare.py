"""Inputs prepared once per generation (docs/method.md §2), by the pipeline and the stream alike.

A `Request` is one image to make in the engine's terms: each layer's prompt, negative prompt,
mask at canvas size and strengths, the background, and every setting of the method. The Python
API (`StableMultiDiffusionPipeline.__call__`) and scenes (`smd_cli.app.requests`) both arrive at one.
From it, `prepare_layers` derives the per-step masks m_{p,k} at latent size (docs/method.md §2.2), with the
uncovered area as a background layer, and `prepare_text` the conditioning of every layer, mixed
toward the background prompt by prompt strength (docs/method.md §2.1). The model is reached only through
the `encode` function passed in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from smd_cli.core import defaults
from smd_cli.core.errors import SmdError
from smd_cli.families import Conditioning
from smd_cli.method import masks as mask_ops
from smd_cli.method.sampler import Schedule
from smd_cli.method.views import vae_tiles_setting, wrap_axes
from smd_cli.models.controls import ControlSpec
from smd_cli.models.loras import LoraSet
from smd_cli.models.references import ReferenceSpec


@dataclass
class Layers:
    """Per-layer inputs in layer order, and what docs/method.md §2.2 makes of their masks."""

    prompts: list[str]
    negatives: list[str]
    masks: np.ndarray  # [P, H, W] raw masks at canvas size
    strengths: list[float]
    stds: list[float]
    prompt_strengths: list[float]
    blurred: np.ndarray | None = None  # [P, H, W], for the final pixel blend
    step_masks: torch.Tensor | None = None  # [K, P, 1, h, w] m_{p,k}
    loras: list[LoraSet] | None = None  # each layer's own LoRAs (None: no layer has any)
    controlnets: list[list[ControlSpec]] | None = None  # each layer's own ControlNets
    references: list[ReferenceSpec | None] | None = None  # each layer's own reference image


@dataclass
class Request:
    """One image to make: the layers at canvas size, the background, and the method's settings."""

    layers: Layers
    width: int
    height: int
    background_prompt: str | None = None
    background_negative_prompt: str = ""
    picture: Image.Image | None = None  # inpainting: kept wherever no layer paints; at canvas size
    steps: int | None = None
    timesteps: Sequence[int] | None = None
    scheduler: str = defaults.SCHEDULER
    timestep_spacing: str | None = None  # ddim and euler: diffusers' spacing (None: the model's)
    guidance_scale: float = defaults.GUIDANCE_SCALE
    true_cfg_scale: float | None = None  # guidance-distilled flow models: an unconditional pass as well
    mask_type: str = defaults.MASK_TYPE
    cover_alpha: float = defaults.COVER_ALPHA
    bootstrap_steps: int = defaults.BOOTSTRAP_STEPS
    bootstrap_mix_steps: float = defaults.BOOTSTRAP_MIX_STEPS
    leak_sensitivity: float | None = defaults.LEAK_SENSITIVITY
    bootstrap_centre: bool = defaults.BOOTSTRAP_CENTRE
    tile_size: int | None = None  # pixels; None: the model's native size
    tile_stride: int | None = None
    tile_weighting: str = defaults.TILE_WEIGHTING
    circular: bool | str = False  # x, y, both, True (x) or False (`views.wrap_axes`)
    region_crop: bool = False
    region_mode: str = defaults.REGION_MODE  # latent, attention or hybrid (docs/method.md §10)
    loras: LoraSet = ()  # the whole canvas's LoRAs, text encoders included
    negative_auto: bool = False  # each layer's prompt a negative prompt of the other layers' rows
    reference: ReferenceSpec | None = None  # a reference image for every layer without its own
    controlnets: list[ControlSpec] = field(default_factory=list)  # ControlNets over the whole canvas
    vae_tiles: int | str | None = None  # the VAE's tile in pixels, off, or None: smd chooses
    hires: Any = None  # a second pass on a larger canvas (`smd_cli.engine.hires.Hires`), or None

    def check(self, factor: int) -> None:
        """Raise `SmdError` for settings no scene could have (the Python API takes anything)."""
        mask_ops.check_divisible(self.width, self.height, factor)
        for name, value, choices in (("mask_type", self.mask_type, defaults.MASK_TYPES),
                                     ("tile_weighting", self.tile_weighting, defaults.TILE_WEIGHTINGS),
                                     ("region_mode", self.region_mode, defaults.REGION_MODES)):
            if value not in choices:
                raise SmdError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
        own_rows(self.region_mode, self.layers, bool(self.controlnets or self.reference))
        wrap_axes(self.circular)
        vae_tiles_setting(self.vae_tiles)
        if self.hires is not None:
            self.hires.check()
        if self.layers.masks.shape[1:] != (self.height, self.width):
            raise SmdError(f"masks are {self.layers.masks.shape[2]}x{self.layers.masks.shape[1]}, the canvas "
                           f"{self.width}x{self.height}")


def prepare_layers(layers: Layers, schedule: Schedule, *, factor: int, device: torch.device, cover_alpha: float,
                   mask_type: str, picture: bool, background_prompt: str | None,
                   background_negative_prompt: str = "", blur_cache: dict | None = None) -> Layers:
    """docs/method.md §2.2 for a set of layers: add the background layer over the uncovered area (unless a
    picture fills it), then occlusion, blur, strength and per-step quantization at latent size.

    `blur_cache` remembers blurs across calls, so that a stream blurs again only changed masks.
    """
    if not picture:
        uncovered = mask_ops.background_mask(layers.masks)
        if uncovered.max() > 0:
            layers = Layers([background_prompt or ""] + layers.prompts,
                            [background_negative_prompt] + layers.negatives,
                            np.concatenate([uncovered[None], layers.masks]), [1.0] + layers.strengths,
                            [0.0] + layers.stds, [1.0] + layers.prompt_strengths,
                            loras=None if layers.loras is None else [()] + list(layers.loras),
                            controlnets=None if layers.controlnets is None else [[]] + list(layers.controlnets),
                            references=None if layers.references is None else [None] + list(layers.references))
    layers.blurred, strengthened = mask_ops.prepare(layers.masks, cover_alpha=cover_alpha, stds=layers.stds,
                                                    strengths=layers.strengths, cache=blur_cache)
    per_step = mask_ops.step_masks(strengthened, factor, schedule.mask_sigmas, mask_type)
    layers.step_masks = torch.from_numpy(per_step).unsqueeze(2).to(device)
    return layers


def prepare_text(encode: Callable[[Sequence[str]], Conditioning], layers: Layers, background_prompt: str | None,
                 background_negative_prompt: str, unconditional: bool,
                 empty_negative: Conditioning | None = None) -> tuple[Conditioning, Conditioning | None]:
    """docs/method.md §2.1: the conditioning of every layer (and its unconditional one, when guidance runs an
    unconditional pass), mixed toward the background prompt's by each layer's prompt strength.
    An empty negative prompt conditions on `empty_negative` where the model gives one (SDXL's
    zeros), else on the encoding of ""."""
    prompts, negatives, weights = layers.prompts, layers.negatives, layers.prompt_strengths
    count = len(prompts)
    texts = prompts + (negatives if unconditional else [])
    strengths_below_one = any(w != 1.0 for w in weights)
    mix = bool(background_prompt) and strengths_below_one
    if not background_prompt and strengths_below_one:
        warnings.warn("prompt strength below 1 mixes a layer toward the background prompt, and there is "
                      "none; set a background prompt or leave prompt strength at 1", stacklevel=3)
    if mix:
        texts = texts + [background_prompt] + ([background_negative_prompt] if unconditional else [])
    states = encode(texts)
    if empty_negative is not None and unconditional:
        negative = set(range(count, 2 * count)) | ({len(texts) - 1} if mix else set())
        states = Conditioning.cat([empty_negative if i in negative and text == "" else states[i : i + 1]
                                   for i, text in enumerate(texts)])
    cond = states[:count]
    uncond = states[count: 2 * count] if unconditional else None
    if mix:
        cond = cond.mix(states[len(texts) - (2 if unconditional else 1)], weights)
        if uncond is not None:
            uncond = uncond.mix(states[len(texts) - 1], weights)
    return cond, uncond


def row_loras(layers: Layers, canvas: LoraSet) -> list[LoraSet]:
    """The LoRAs each layer's rows run with: the canvas's, then the layer's own."""
    own = layers.loras or [()] * len(layers.prompts)
    return [tuple(canvas) + tuple(mine) for mine in own]


def auto_negatives(layers: Layers, own: int) -> list[str]:
    """`negative_auto`: each row's negative prompt followed by the prompts of the other layers, so
    that one layer's subject is steered out of the others' regions. `own` counts the scene's own
    layers, the last of `layers` (a background layer before them takes all their prompts)."""
    first = len(layers.prompts) - own
    out = []
    for i, negative in enumerate(layers.negatives):
        others = [p for j, p in enumerate(layers.prompts[first:], first) if j != i and p and p != layers.prompts[i]]
        out.append(", ".join([negative, *others] if negative else others))
    return out


def join_layers(layers: Layers, cond: Conditioning, uncond: Conditioning | None, mode: str,
                timesteps: Sequence[float], *, scene_layers: int, canvas_controls: bool = False,
                lengths: Callable[[Sequence[str]], list[int] | None] = lambda texts: None,
                background_prompt: str | None = None) -> tuple[Layers, Conditioning, Conditioning | None]:
    """docs/method.md §10: in `attention` mode every layer's prompt joins one row per view, its
    attention kept to the layer's masks; in `hybrid` mode the layers with their own LoRAs,
    ControlNets or reference image keep rows of their own (latent mode's), the others join. The
    joined row's mask is the sum of its layers' (so the averaging of clean estimates is unchanged
    around it), its pooled embedding the first joined layer's (the background's where there is
    one). Where several layers join, each keeps only the token states `lengths` (the family's
    `text_lengths`) says carry its prompt (all of them where it is mixed with the background
    prompt). `scene_layers` counts the request's own layers (the last of `layers`), for messages.
    Returns the layers as the sampler sees them (the joined row first) and their rows."""
    if mode == "latent":
        return layers, cond, uncond
    count = len(layers.prompts)
    own = own_rows(mode, layers, canvas_controls, len(layers.prompts) - scene_layers)
    joined = [i for i in range(count) if i not in own]
    if not joined:
        return layers, cond, uncond
    masks = layers.step_masks  # [K, P, 1, h, w]
    from smd_cli.method.regions import Regions

    # Prompts mixed toward the background prompt (strength below 1) carry its states too: kept whole.
    mixed = bool(background_prompt) and any(layers.prompt_strengths[i] != 1.0 for i in joined)

    def spans(c: Conditioning, texts: list[str]) -> list[int]:
        full = c.states.shape[1]
        used = lengths(texts) if len(joined) > 1 and not mixed else None
        return [full] * len(joined) if used is None else [min(n, full) for n in used]

    def rows(c: Conditioning, texts: list[str]) -> Conditioning:
        kept = spans(c, texts)
        ends = np.cumsum([0, *kept]).tolist()
        regions = Regions(tuple(zip(ends[:-1], ends[1:])), masks[:, joined, 0], tuple(float(t) for t in timesteps))
        first = joined[0]
        states = torch.cat([c.states[i, :n] for i, n in zip(joined, kept)])[None]
        row = Conditioning(states, None if c.pooled is None else c.pooled[first : first + 1],
                           loras=None if c.loras is None else (c.loras[first],),
                           regions=(regions,), tokens=(ends[-1],))
        return Conditioning.cat([row] + [c[i : i + 1] for i in own])

    def pick(values, merged):
        return None if values is None else [merged] + [values[i] for i in own]

    sampled = Layers(pick(layers.prompts, " | ".join(layers.prompts[i] for i in joined)),
                     pick(layers.negatives, ""), layers.masks, pick(layers.strengths, 1.0),
                     pick(layers.stds, 0.0), pick(layers.prompt_strengths, 1.0), layers.blurred,
                     torch.cat([masks[:, joined].sum(1, keepdim=True), masks[:, own]], dim=1),
                     pick(layers.loras, ()), pick(layers.controlnets, []), pick(layers.references, None))
    prompts = [layers.prompts[i] for i in joined]
    negatives = [layers.negatives[i] for i in joined]
    return sampled, rows(cond, prompts), None if uncond is None else rows(uncond, negatives)


def own_rows(mode: str, layers: Layers, canvas_controls: bool, first: int = 0) -> list[int]:
    """The layers (indices into `layers`) that keep rows of their own in `mode`: in hybrid mode those
    with their own LoRAs, ControlNets or reference image; raises where `mode` cannot do what is asked
    (`first` is the index of the request's first layer, a background layer before it, for messages)."""
    if mode == "latent":
        return list(range(len(layers.prompts)))
    if canvas_controls:
        raise SmdError(f"region_mode {mode} joins the layers in one row, which ControlNets and reference images "
                       "over the whole canvas cannot act on: give them to layers (region_mode hybrid keeps those "
                       "layers' own rows) or use region_mode latent")
    own = [i for i in range(len(layers.prompts))
           if (layers.loras and layers.loras[i]) or (layers.controlnets and layers.controlnets[i])
           or (layers.references and layers.references[i] is not None)]
    if mode == "attention" and own:
        names = ", ".join(f"layers[{i - first}]" for i in own)
        raise SmdError(f"{names}: a layer's own LoRA, ControlNet or reference image cannot act on one layer of "
                       "a row shared by all: use region_mode hybrid (those layers keep their own rows) or latent")
    return own
