"""The StreamMultiDiffusion step (SPEC section 3), written once and shared by every command.

Small pure tensor functions carry the paper's formulas; `sample` runs the step loop over them.
The loop knows nothing of prompts, models or guidance: it calls `predict(x, t, layers)` for the
noise of a batch of latents, each denoised under the prompt of its layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from smd_cli.errors import OutOfMemory
from smd_cli.views import View, full_view

Predict = Callable[[torch.Tensor, int, Sequence[int]], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class Schedule:
    """Timesteps t_0 > ... > t_{K-1} with alpha_k, sigma_k and the transition that follows each step.

    `alphas`/`sigmas` have K + 1 entries; the last is where the final transition lands: clean
    (1, 0) for LCM and Euler, diffusers' `final_alpha_cumprod` for DDIM. `kind` is "lcm" (fresh
    noise after each step) or "ddim" (deterministic, SPEC 3).
    """

    timesteps: list[float]
    alphas: list[float]
    sigmas: list[float]
    c_skip: list[float]
    c_out: list[float]
    kind: str = "lcm"
    init_scale: float = 1.0  # the initial noise times this is x_0 (Euler's init_noise_sigma, in VP terms)

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def mask_sigmas(self) -> list[float]:
        """Noise levels for mask quantization (SPEC 2.2): sigma_0..sigma_{K-1} and sigma_K = 0."""
        return self.sigmas[:-1] + [0.0]


def randn(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device,
          dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (so a CPU seed gives the same noise anywhere)."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return noise.to(device)


def noised(b: torch.Tensor, alpha: float, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """b~ = alpha_k * b + sigma_k * noise (SPEC 3.2)."""
    return alpha * b + sigma * noise


def bootstrap_mix(k: int, mix_steps: float) -> float:
    """r = clamp(bootstrap_mix_steps - k, 0, 1): the share of white in the bootstrap background."""
    return min(max(mix_steps - k, 0.0), 1.0)


def bootstrap_blend(x_p: torch.Tensor, m: torch.Tensor, b_noisy: torch.Tensor) -> torch.Tensor:
    """x_p = (1 - m) * b~ + m * x_p: the layer alone on a flat background (SPEC 3.2)."""
    return (1 - m) * b_noisy + m * x_p


def clean_estimate(x: torch.Tensor, eps: torch.Tensor, alpha: float, sigma: float,
                   c_skip: float = 0.0, c_out: float = 1.0) -> torch.Tensor:
    """x0 = c_out * (x - sigma * eps) / alpha + c_skip * x (SPEC 3.4; c_skip 0, c_out 1 off LCM)."""
    return c_out * ((x - sigma * eps) / alpha) + c_skip * x


def suppress_leak(m: torch.Tensor, x0: torch.Tensor, b_noisy: torch.Tensor, sensitivity: float) -> torch.Tensor:
    """m *= tanh(mean_c (x0 - b~)^2 / (2 s)) (SPEC 3.5)."""
    leak = (x0 - b_noisy).pow(2).mean(dim=1, keepdim=True)
    return m * torch.tanh(leak / (2 * sensitivity))


def aggregate(value: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """X0 = value / count where count > 0 (SPEC 3, after step 6)."""
    return torch.where(count > 0, value / count.clamp_min(1e-12), value)


def blend_background(x0: torch.Tensor, count: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Keep the background image where no layer is: X0 = (1 - bg) X0 + bg Bg, bg = clip(1 - count)."""
    w = (1 - count).clamp(0, 1)
    return (1 - w) * x0 + w * bg


def lcm_transition(x0: torch.Tensor, alpha_next: float, sigma_next: float, noise: torch.Tensor) -> torch.Tensor:
    """x_{k+1} = alpha_{k+1} X0 + sigma_{k+1} * fresh noise (SPEC 3, LCM)."""
    return alpha_next * x0 + sigma_next * noise


def ddim_noise(x: torch.Tensor, x0: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """eps* = (x - alpha_k X0) / sigma_k: the noise that x_k holds given the aggregated X0 (SPEC 3, DDIM)."""
    return (x - alpha * x0) / sigma


@dataclass
class StepBatch:
    """The UNet inputs of one step k (SPEC 3.1-3.2): one row per active (layer, view) pair."""

    k: int
    pairs: list[tuple[int, int]]  # (layer, view)
    inputs: list[torch.Tensor]  # x_p, bootstrapped where k < bootstrap_steps
    masks: list[torch.Tensor]  # m_{p,k} cut to the pair's window
    b_noisy: Optional[torch.Tensor]  # the noised flat background while bootstrapping, else None
    windows: list[View]  # where each pair is evaluated: its view, or a crop of it around the mask


def active_pairs(masks: torch.Tensor, views: Sequence[View], skip_empty: bool = True) -> torch.Tensor:
    """[K, P, V] booleans: whether m_{p,k} reaches into view v (an empty pair adds nothing)."""
    active = torch.stack([v.crop(masks[:, :, 0]).flatten(2).amax(-1) for v in views], dim=-1).gt(0).cpu()
    if not skip_empty:
        active[:] = True
    return active


def step_inputs(x: torch.Tensor, noise: torch.Tensor, k: int, schedule: Schedule, masks_k: torch.Tensor,
                views: Sequence[View], active_k: torch.Tensor, *, bootstrap_steps: int = 0,
                bootstrap_mix_steps: float = 1.0, white: torch.Tensor | None = None,
                background: torch.Tensor | None = None, crop: RegionCrop | None = None) -> StepBatch:
    """SPEC 3.1-3.2 for step k: cut x into views per layer, bootstrapping on the first steps.

    `noise` is the noise x holds; the flat bootstrap background is noised with it, so
    bootstrapping draws no random numbers of its own.
    """
    b_noisy = None
    if k < bootstrap_steps and white is not None:
        r = bootstrap_mix(k, bootstrap_mix_steps)
        flat = white if background is None else r * white + (1 - r) * background
        b_noisy = noised(flat, schedule.alphas[k], schedule.sigmas[k], noise)
    pairs = [(p, v) for v in range(len(views)) for p in range(masks_k.shape[0]) if active_k[p, v]]
    inputs, pair_masks, windows = [], [], []
    for p, v in pairs:
        view = views[v]
        if crop is not None:
            view = crop.window(view, masks_k[p, 0])
        x_p = view.crop(x)
        m = view.crop(masks_k[p : p + 1])
        if b_noisy is not None:
            x_p = bootstrap_blend(x_p, m, view.crop(b_noisy))
        inputs.append(x_p)
        pair_masks.append(m)
        windows.append(view)
    return StepBatch(k, pairs, inputs, pair_masks, b_noisy, windows)


def step_output(batch: StepBatch, eps: Sequence[torch.Tensor] | torch.Tensor, schedule: Schedule,
                shape: Sequence[int], *, leak_sensitivity: float | None = None,
                background: torch.Tensor | None = None) -> torch.Tensor:
    """SPEC 3.4-3.6 for step k: clean estimates, leak suppression, weighted aggregation into X0.

    `eps[i]` is the noise predicted for pair i (a batched tensor, or one tensor per pair when
    the pairs' windows differ in size).
    """
    k = batch.k
    a, s = schedule.alphas[k], schedule.sigmas[k]
    device = batch.inputs[0].device if batch.inputs else None
    value = torch.zeros(shape, dtype=torch.float32, device=device)
    count = torch.zeros((shape[0], 1, *shape[2:]), dtype=torch.float32, device=device)
    for i, window in enumerate(batch.windows):
        x_p = batch.inputs[i]
        x0_p = clean_estimate(x_p, eps[i].reshape(x_p.shape), a, s, schedule.c_skip[k], schedule.c_out[k])
        m = batch.masks[i]
        if batch.b_noisy is not None and leak_sensitivity:
            m = suppress_leak(m, x0_p, window.crop(batch.b_noisy), leak_sensitivity)
        if window.weight is not None:
            m = m * window.weight
        window.add_into(value, m * x0_p)
        window.add_into(count, m)
    x0 = aggregate(value, count)
    if background is not None:
        x0 = blend_background(x0, count, background)
    return x0


@dataclass
class RegionCrop:
    """Evaluate a layer only around its mask instead of over the whole view, when that is cheaper.

    The window is the mask's bounding box within the view, widened by `margin` latent pixels of
    context on each side, rounded up to a multiple of `granularity` (the UNet's total downsampling)
    and kept inside the view. Where that window would cover more than `max_share` of the view,
    the whole view is used. Outside the window the layer's mask is zero, so only the UNet's
    context shrinks: results stay close to, not equal to, uncropped ones.
    """

    margin: int = 16
    granularity: int = 8
    max_share: float = 0.75

    def window(self, view: View, mask: torch.Tensor) -> View:
        m = view.crop(mask)
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        if len(rows) == 0:
            return view
        h, w = m.shape
        r0, r1 = self._span(int(rows[0]), int(rows[-1]) + 1, h)
        c0, c1 = self._span(int(cols[0]), int(cols[-1]) + 1, w)
        if (r1 - r0) * (c1 - c0) > self.max_share * h * w:
            return view
        return view.sub(r0, r1, c0, c1)

    def _span(self, lo: int, hi: int, size: int) -> tuple[int, int]:
        """[lo, hi) widened by the margin to a multiple of the granularity, within [0, size)."""
        lo, hi = max(lo - self.margin, 0), min(hi + self.margin, size)
        length = min(-(-(hi - lo) // self.granularity) * self.granularity, size)
        lo = min(lo, size - length)
        return lo, lo + length


OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


class BatchHalvedWarning(UserWarning):
    """The device ran out of memory and the step was retried with smaller UNet batches."""


def predict_pairs(predict: Predict, batch: StepBatch, t: float,
                  max_batch: int | None) -> tuple[list[torch.Tensor], int | None]:
    """The noise of every pair of a step, in chunks of up to `max_batch` pairs whose windows have
    the same shape, halving the chunk on out-of-memory.

    Predictions are pure, so a step that ran out of memory is simply evaluated again with half
    the batch, down to one pair per call. Returns the noises and the batch size that worked,
    which later steps keep.
    """
    chunk = max_batch or max(len(batch.pairs), 1)
    halved = False
    groups: dict[tuple, list[int]] = {}  # pairs whose windows have one shape share UNet calls
    for i, x_p in enumerate(batch.inputs):
        groups.setdefault(tuple(x_p.shape), []).append(i)
    while True:
        try:
            eps: list[torch.Tensor] = [torch.empty(0)] * len(batch.pairs)
            for members in groups.values():
                for start in range(0, len(members), chunk):
                    part = members[start : start + chunk]
                    out = predict(torch.cat([batch.inputs[i] for i in part]), t, [batch.pairs[i][0] for i in part])
                    for i, e in zip(part, out.split(1)):
                        eps[i] = e
            return eps, (chunk if halved else max_batch)
        except OOM_ERRORS:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if chunk <= 1:
                raise OutOfMemory("out of memory even with one (layer, view) pair per UNet call: make the "
                                  "canvas or tile_size smaller, or use --dtype float16 or --vae tiny") from None
            smaller = (min(chunk, len(batch.pairs)) + 1) // 2
            warnings.warn(f"out of memory with {min(chunk, len(batch.pairs))} (layer, view) pairs per UNet call; "
                          f"retrying with {smaller}", BatchHalvedWarning, stacklevel=2)
            chunk, halved = smaller, True


def sample(
    predict: Predict,
    latents: torch.Tensor,
    schedule: Schedule,
    masks: torch.Tensor,
    *,
    views: Sequence[View] | None = None,
    bootstrap_steps: int = 0,
    bootstrap_mix_steps: float = 1.0,
    leak_sensitivity: float | None = None,
    white: torch.Tensor | None = None,
    background: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noises: Sequence[torch.Tensor] | None = None,
    max_batch: int | None = None,
    skip_empty: bool = True,
    crop: RegionCrop | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Region-based sampling (SPEC 3): average the (layer, view) clean estimates, then step from X0.

    `latents` [1, C, h, w] is the initial noise; `masks` [K, P, 1, h, w] holds m_{p,k}. Returns
    the final latent. Pairs whose mask is empty in their view are not evaluated (they would add
    nothing; `skip_empty=False` evaluates them anyway, for measurements); the rest go through
    `predict` in batches of `max_batch`. LCM draws fresh noise for each transition from
    `generator`, or takes `noises[k]` for the transition into step k + 1 when given. With `crop`,
    each pair is evaluated only around its mask (`RegionCrop`).
    """
    height, width = latents.shape[-2:]
    views = list(views) if views else [full_view(height, width)]
    active = active_pairs(masks, views, skip_empty)
    steps = masks.shape[0]
    x = latents
    noise = latents  # the noise realisation of x_k; for k = 0 the initial latent itself
    for k in range(steps):
        batch = step_inputs(x, noise, k, schedule, masks[k], views, active[k], bootstrap_steps=bootstrap_steps,
                            bootstrap_mix_steps=bootstrap_mix_steps, white=white, background=background, crop=crop)
        eps, max_batch = predict_pairs(predict, batch, schedule.timesteps[k], max_batch)
        x0 = step_output(batch, eps, schedule, x.shape,
                         leak_sensitivity=leak_sensitivity, background=background)
        if callback is not None:
            callback(k, steps, x0)
        a_next, s_next = schedule.alphas[k + 1], schedule.sigmas[k + 1]
        if schedule.kind == "ddim":
            noise = ddim_noise(x, x0, schedule.alphas[k], schedule.sigmas[k])
            x = lcm_transition(x0, a_next, s_next, noise)
        elif k + 1 < steps:
            noise = noises[k] if noises is not None else randn(x.shape, generator, x.device, x.dtype)
            x = lcm_transition(x0, a_next, s_next, noise)
        else:
            x = x0
    return x
