"""ControlNets over the whole canvas and over single layers.

A control image (a pose, a depth map, edges) is brought to the canvas's size once, as diffusers'
ControlNet pipelines bring it to the image's (RGB in [0, 1] for a UNet's ControlNet; for FLUX.1's,
in [-1, 1] and encoded by the VAE into a latent, whose mode is taken where diffusers draws a
sample), and each (layer, view) row is given the part of it under its window, as the row's latent
is the part of the canvas's. The ControlNet
runs on the rows it acts on, with their own latents, timesteps and text states, and its residuals
are added to those rows' UNet features (zero for the others), so one UNet call still serves the
whole batch. `start` and `end` are fractions of the steps, read as diffusers reads
`control_guidance_start` / `_end`: a net acts at step i of N unless i / N < start or
(i + 1) / N > end. A global ControlNet acts on every row; a layer's on that layer's rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from smd_cli.core.errors import ModelError, SmdError


@dataclass(frozen=True)
class Control:
    """A ControlNet acting on a row: the loaded net and image (`key`), its scale, and the
    timesteps it acts at."""

    key: str
    scale: float
    active: frozenset


ControlSet = tuple[Control, ...]


@dataclass
class ControlSpec:
    """A ControlNet as a request names it: the model (hub id or folder), the control image, its
    scale and the fraction of the steps it acts in."""

    model: str
    image: Any  # a PIL image
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def as_specs(value) -> list[ControlSpec]:
    """ControlNets as the Python API takes them: a `ControlSpec`, a mapping with `model`, `image`
    and optionally `scale`, `start`, `end`, or a list of these; None for none."""
    if value is None:
        return []
    if isinstance(value, (ControlSpec, dict)):
        value = [value]
    return [item if isinstance(item, ControlSpec) else ControlSpec(**item) for item in value]


def active_timesteps(timesteps: Sequence[float], start: float, end: float) -> frozenset:
    """The timesteps at which a net with this start and end acts (diffusers' `controlnet_keep`)."""
    n = len(timesteps)
    # As float32, the precision the denoiser's timesteps arrive in (FLUX's are fractions).
    return frozenset(float(torch.tensor(t, dtype=torch.float32)) for i, t in enumerate(timesteps)
                     if not (i / n < start or (i + 1) / n > end))


class ControlNets:
    """The ControlNets loaded for one model (each once) and the control images at canvas size."""

    def __init__(self, unet, *, device: torch.device, dtype: torch.dtype, factor: int, encode=None):
        """`encode` (pixels in [-1, 1] to a latent) makes the family's control images latents (FLUX.1)."""
        self.unet, self.device, self.dtype, self.factor, self.encode = unet, device, dtype, factor, encode
        self.models: dict[str, Any] = {}
        self.images: dict[str, tuple[str, torch.Tensor]] = {}  # key -> (model, [1, 3, H, W] or its latent)

    def add(self, spec: ControlSpec, width: int, height: int, timesteps: Sequence[float]) -> Control:
        """Load the spec's net (once) and its image at canvas size; the `Control` rows carry."""
        from diffusers.image_processor import VaeImageProcessor

        from smd_cli.method.masks import aspect_mismatch

        if not 0.0 <= spec.start < spec.end <= 1.0:
            raise SmdError(f"ControlNet {spec.model}: start {spec.start} and end {spec.end} must satisfy "
                           "0 <= start < end <= 1 (fractions of the steps)")
        if aspect_mismatch(spec.image.size, width, height):
            raise SmdError(f"control image is {spec.image.size[0]}x{spec.image.size[1]} but the canvas is "
                           f"{width}x{height}: the aspect ratios differ; crop or pad the image, or set width "
                           "and height to match it")
        self.load(spec.model)
        latent = self.encode is not None
        pixels = VaeImageProcessor(vae_scale_factor=self.factor * (2 if latent else 1), do_convert_rgb=True,
                                   do_normalize=latent)
        image = pixels.preprocess(spec.image, height=height, width=width).to(self.device, torch.float32)
        if latent:
            image = self.encode(image)
        digest = hashlib.sha256(image.cpu().numpy().tobytes()).hexdigest()[:16]
        key = f"{spec.model}@{digest}"
        self.images[key] = (spec.model, image)
        return Control(key, float(spec.scale), active_timesteps(timesteps, spec.start, spec.end))

    def load(self, source: str):
        """The ControlNet at `source` (a folder or hub id), loaded once; one made for another model
        family is a `ModelError`."""
        if source in self.models:
            return self.models[source]
        from diffusers import ControlNetModel, FluxControlNetModel

        from smd_cli.core.files import expand_user, is_dir
        from smd_cli.models.loading import _loading, _looks_like_path, _offline

        path = expand_user(source)
        if _looks_like_path(source) and not is_dir(path):
            raise ModelError(f"ControlNet folder not found: {path}")
        cls = FluxControlNetModel if self.encode is not None else ControlNetModel
        with _loading(source, "ControlNet"):
            net = cls.from_pretrained(str(path) if is_dir(path) else source, torch_dtype=self.dtype,
                                      local_files_only=is_dir(path) or _offline())
        mine, theirs = self.unet.config, net.config
        width = "joint_attention_dim" if self.encode is not None else "cross_attention_dim"
        if (theirs.get(width) != mine.get(width) or theirs.get("in_channels") != mine.get("in_channels")
                or theirs.get("addition_embed_type") != mine.get("addition_embed_type")
                or tuple(theirs.get("block_out_channels") or ()) != tuple(mine.get("block_out_channels") or ())):
            raise ModelError(f"ControlNet '{source}' is for another model family: its text width is "
                             f"{theirs.get(width)}, this model's {mine.get(width)}; use a ControlNet made for this "
                             "model's family")
        self.models[source] = net.to(self.device)
        return net

    @property
    def repeats(self) -> bool:
        """FLUX.1: XLabs' ControlNets (with an input hint block) give residuals the transformer
        repeats over its blocks; InstantX's give one per block."""
        return any(getattr(net, "input_hint_block", None) is not None for net in self.models.values())

    def residuals(self, x: torch.Tensor, t: torch.Tensor, cond, placement, call):
        """The ControlNets' residuals for rows x, each net run on the rows it acts on now (`call(net,
        rows, crops)` runs it and returns its outputs as lists of tensors, row first) and scaled
        per row, zero for the other rows; None when none acts on any row."""
        sets = cond.controls
        if not sets or not any(sets):
            return None
        b, _, h, w = x.shape
        times = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(-1)
        total = None
        for key in dict.fromkeys(c.key for s in sets for c in s):
            scales = torch.zeros(b, device=x.device, dtype=torch.float32)
            for i, s in enumerate(sets):
                for c in s:
                    if c.key == key and float(times[i].float()) in c.active:
                        scales[i] += c.scale
            rows = torch.nonzero(scales).flatten()
            if len(rows) == 0:
                continue
            model, image = self.images[key]
            corners = placement.corners if placement else [(0, 0)] * b
            crops = torch.cat([self._crop(image, corners[i], h, w) for i in rows.tolist()])
            outputs = call(self.models[model], rows, crops.to(self.dtype))
            if total is None:
                total = [[None if r is None else torch.zeros((b, *r.shape[1:]), device=x.device, dtype=r.dtype)
                          for r in group] for group in outputs]
            for sums, group in zip(total, outputs):
                for s, r in zip(sums, group):
                    if r is not None:
                        s[rows] += r * scales[rows].to(r.dtype).view(-1, *[1] * (r.dim() - 1))
        return total

    def _crop(self, image: torch.Tensor, corner: tuple[int, int], h: int, w: int) -> torch.Tensor:
        """The image (or latent) under a window at latent `corner` of latent size h x w (wrapping
        round, as a circular canvas's views do)."""
        f = 1 if self.encode is not None else self.factor
        height, width = image.shape[-2:]
        rows = (torch.arange(h * f, device=image.device) + corner[0] * f) % height
        cols = (torch.arange(w * f, device=image.device) + corner[1] * f) % width
        return image[:, :, rows][:, :, :, cols]
