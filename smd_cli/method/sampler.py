"""The StreamMultiDiffusion step (docs/method.md §3), written once and shared by every command.

Small pure tensor functions carry the paper's formulas; `sample` runs the step loop over them.
The loop knows nothing of prompts, models or guidance: it calls `predict(x, t, layers, corners)`
for the noise of a batch of latents, each denoised under the prompt of its layer, its window's
top-left corner on the canvas given for models that condition on where a window lies. The schedules (which
alpha_k, sigma_k and transition each scheduler takes) are small functions beside `Schedule`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from smd_cli.core import defaults
from smd_cli.core.errors import OutOfMemory, SmdError
from smd_cli.method.views import View, full_view

Predict = Callable[[torch.Tensor, Any, Sequence[int], Sequence[tuple[int, int]]], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


FLOW_TOP_LEVEL = 0.998  # the quantization level of s = 1 (see `Schedule.mask_sigmas`)


@dataclass
class Schedule:
    """Timesteps t_0 > ... > t_{K-1} with alpha_k, sigma_k and the transition that follows each step.

    `alphas`/`sigmas` have K + 1 entries; the last is where the final transition lands: clean
    (1, 0) for LCM and Euler, diffusers' `final_alpha_cumprod` for DDIM. `kind` is "lcm" (fresh
    noise after each step) or "ddim" (deterministic, docs/method.md §3). `prediction` is what the model's
    output is: "epsilon" (the noise; v-prediction is converted to it by the family) or "flow" (the
    velocity v = e - x0 of flow matching, where alpha_k = 1 - s_k and sigma_k = s_k).
    """

    timesteps: list[float]
    alphas: list[float]
    sigmas: list[float]
    c_skip: list[float]
    c_out: list[float]
    kind: str = "lcm"
    init_scale: float = 1.0  # the initial noise times this is x_0 (Euler's init_noise_sigma, in VP terms)
    prediction: str = "epsilon"

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def mask_sigmas(self) -> list[float]:
        """Noise levels for mask quantization (docs/method.md §2.2): sigma_0..sigma_{K-1} and sigma_K = 0. Under
        flow matching the level is s_k, with pure noise (s = 1, where flow schedules start) taken
        as FLOW_TOP_LEVEL: a full-strength mask is on from the first step, as it is on SD's
        variance-preserving schedules, whose sigma_0 is about 0.998."""
        levels = self.sigmas[:-1] + [0.0]
        return [min(x, FLOW_TOP_LEVEL) for x in levels] if self.prediction == "flow" else levels


# ---------------------------------------------------------------------------------------------
# Schedules: one function per scheduler, from a model's scheduler config (docs/method.md §1, 3).


def lcm_schedule(config: Mapping, steps: int | None = None, timesteps: Sequence[int] | None = None) -> Schedule:
    """LCM: the method's 5-step grid (docs/method.md §1.3) by default; other counts spaced as
    diffusers' `LCMScheduler` spaces them, with its boundary scalings c_skip, c_out. Fresh noise
    after each step."""
    from diffusers import LCMScheduler

    lcm = LCMScheduler.from_config(config)
    train = _check_timesteps(config, timesteps)
    if timesteps is None and steps in (None, defaults.STEPS["lcm"]):
        stride = train // defaults.LCM_ORIGINAL_STEPS
        grid = [train - 1 - i * stride for i in range(defaults.LCM_ORIGINAL_STEPS)]
        timesteps = [grid[i] for i in defaults.LCM_INDICES]
    elif timesteps is None:
        limit = lcm.config.get("original_inference_steps", defaults.LCM_ORIGINAL_STEPS)
        timesteps = _spaced(lcm, steps, train, "lcm", limit, "; use scheduler ddim or euler for more")
    ts = [int(t) for t in timesteps]
    alphas, sigmas = _vp_levels(lcm.alphas_cumprod, ts)
    scalings = [lcm.get_scalings_for_boundary_condition_discrete(t) for t in ts]
    return Schedule(ts, alphas + [1.0], sigmas + [0.0], [c[0] for c in scalings], [c[1] for c in scalings])


def ddim_schedule(config: Mapping, steps: int | None = None, timesteps: Sequence[int] | None = None) -> Schedule:
    """DDIM (eta = 0): the deterministic transition from X0, ending at diffusers' `final_alpha_cumprod`."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(config)
    train = _check_timesteps(config, timesteps)
    ts = [int(t) for t in timesteps] if timesteps is not None else \
        _spaced(ddim, steps or defaults.STEPS["ddim"], train, "ddim", train)
    alphas, sigmas = _vp_levels(ddim.alphas_cumprod, ts)
    final = float(ddim.final_alpha_cumprod)
    return Schedule(ts, alphas + [math.sqrt(final)], sigmas + [math.sqrt(1.0 - final)],
                    [0.0] * len(ts), [1.0] * len(ts), kind="ddim")


def euler_schedule(config: Mapping, steps: int | None = None, timesteps: Sequence[int] | None = None) -> Schedule:
    """Euler on diffusers' `EulerDiscreteScheduler` timesteps. Its sigma steps are DDIM's in the
    variance-preserving parameterisation, so it is the same deterministic transition."""
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_config(config)
    _check_timesteps(config, timesteps)
    if timesteps is not None:
        euler.set_timesteps(timesteps=[int(t) for t in timesteps])
    else:
        euler.set_timesteps(steps or defaults.STEPS["euler"])
    ts = [float(t) for t in euler.timesteps]
    ve = [float(x) for x in euler.sigmas]  # K + 1 noise levels sigma/alpha, the last 0
    alphas = [1.0 / math.sqrt(1.0 + v * v) for v in ve]
    sigmas = [v / math.sqrt(1.0 + v * v) for v in ve]
    return Schedule(ts, alphas, sigmas, [0.0] * len(ts), [1.0] * len(ts), kind="ddim",
                    init_scale=float(euler.init_noise_sigma) * alphas[0])


def flow_schedule(config: Mapping, steps: int | None = None, timesteps: Sequence[int] | None = None,
                  mu: float | None = None, flux_sigmas: bool = False) -> Schedule:
    """Flow matching (SD3, FLUX): x_s = (1 - s) x0 + s e on diffusers' `FlowMatchEulerDiscreteScheduler`
    sigmas (its shift applied; `mu` is the resolution-dependent shift where the config asks for one).
    The transition is deterministic Euler, e* = (x_k - (1 - s_k) X0) / s_k and x_{k+1} =
    (1 - s_{k+1}) X0 + s_{k+1} e*: with one layer over the canvas exactly diffusers' step
    x + (s_{k+1} - s_k) v. Timesteps are 1000 s_k, as the transformer takes them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = FlowMatchEulerDiscreteScheduler.from_config(config)
    if timesteps is not None:
        train = int(config.get("num_train_timesteps", 1000))
        if any(not 0 < t <= train for t in timesteps):
            raise SmdError(f"timesteps must lie in (0, {train}] for this model, got {list(timesteps)}")
        flow.set_timesteps(sigmas=[t / train for t in timesteps], mu=mu)
    elif flux_sigmas:  # FLUX spaces its sigmas from 1 to 1/K before the shift, as FluxPipeline does
        n = steps or defaults.STEPS["flow"]
        flow.set_timesteps(sigmas=[1.0 - i * (1.0 - 1.0 / n) / max(n - 1, 1) for i in range(n)], mu=mu)
    else:
        flow.set_timesteps(steps or defaults.STEPS["flow"], mu=mu)
    ss = [float(x) for x in flow.sigmas]  # K + 1 levels, the last 0
    return Schedule([float(t) for t in flow.timesteps], [1.0 - x for x in ss], ss, [0.0] * (len(ss) - 1),
                    [1.0] * (len(ss) - 1), kind="ddim", prediction="flow")


SCHEDULES: dict[str, Callable[..., Schedule]] = {"lcm": lcm_schedule, "ddim": ddim_schedule, "euler": euler_schedule,
                                                 "flow": flow_schedule}


def make_schedule(scheduler: str, config: Mapping, steps: int | None = None,
                  timesteps: Sequence[int] | None = None, spacing: str | None = None, **flow: Any) -> Schedule:
    """The schedule of `scheduler` (one of `defaults.SCHEDULERS`) for a model's scheduler config;
    `spacing` (ddim and euler) replaces the config's `timestep_spacing`."""
    if scheduler not in SCHEDULES:
        raise SmdError(f"scheduler must be one of {', '.join(defaults.SCHEDULERS)}, got {scheduler!r}")
    if spacing is not None:
        if spacing not in defaults.TIMESTEP_SPACINGS:
            raise SmdError(f"timestep_spacing must be one of {', '.join(defaults.TIMESTEP_SPACINGS)}, got {spacing!r}")
        if scheduler == "lcm":
            raise SmdError("timestep_spacing applies to the ddim and euler schedulers; lcm spaces its steps "
                           "on its own grid")
        config = {**config, "timestep_spacing": spacing}
    return SCHEDULES[scheduler](config, steps, timesteps, **flow)


def _check_timesteps(config: Mapping, timesteps: Sequence[int] | None) -> int:
    """The model's number of training timesteps; explicit timesteps must lie below it."""
    train = int(config.get("num_train_timesteps", 1000))
    if timesteps is not None and any(t < 0 or t >= train for t in timesteps):
        raise SmdError(f"timesteps must lie in [0, {train - 1}] for this model, got {list(timesteps)}")
    return train


def _spaced(scheduler, steps: int, train: int, name: str, limit: int, hint: str = "") -> list[int]:
    """`steps` timesteps spaced as the diffusers scheduler spaces them, at most `limit` of them."""
    if steps > limit:
        raise SmdError(f"{name} takes at most {limit} steps for this model, got {steps}{hint}")
    scheduler.set_timesteps(num_inference_steps=steps)
    ts = [int(t) for t in scheduler.timesteps]
    if any(t < 0 or t >= train for t in ts):
        raise SmdError(f"{steps} {name} steps do not fit this model's {train} training timesteps; use fewer steps")
    return ts


def _vp_levels(alphas_cumprod: torch.Tensor, timesteps: Sequence[int]) -> tuple[list[float], list[float]]:
    """alpha_k = sqrt(abar(t_k)), sigma_k = sqrt(1 - abar(t_k)) (docs/method.md §1)."""
    abar = [float(alphas_cumprod[t]) for t in timesteps]
    return [math.sqrt(a) for a in abar], [math.sqrt(1.0 - a) for a in abar]


# ---------------------------------------------------------------------------------------------
# The step's formulas (docs/method.md §3)


def randn(shape: Sequence[int], generator: Optional[torch.Generator], device: torch.device,
          dtype: torch.dtype) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (so a CPU seed gives the same noise anywhere)."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return noise.to(device)


def renoise(x0: torch.Tensor, alpha: float, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """alpha * X0 + sigma * noise: the noised bootstrap background b~ (docs/method.md §3.2), the transition
    into the next step with fresh noise (LCM) or the noise x_k held (DDIM), a stream's stages (docs/method.md §6)."""
    return alpha * x0 + sigma * noise


def bootstrap_mix(k: int, mix_steps: float) -> float:
    """r = clamp(bootstrap_mix_steps - k, 0, 1): the share of white in the bootstrap background."""
    return min(max(mix_steps - k, 0.0), 1.0)


def bootstrap_blend(x_p: torch.Tensor, m: torch.Tensor, b_noisy: torch.Tensor) -> torch.Tensor:
    """x_p = (1 - m) * b~ + m * x_p: the layer alone on a flat background (docs/method.md §3.2)."""
    return (1 - m) * b_noisy + m * x_p


def centring_shift(m: torch.Tensor) -> tuple[int, int]:
    """(dy, dx) that moves the centre of the bounding box of mask m [..., h, w] (where m > 0) to the
    window's centre (h // 2, w // 2), as the reference centres layers while bootstrapping; (0, 0)
    for an empty mask."""
    h, w = m.shape[-2:]
    occupied = m.reshape(-1, h, w).amax(0) > 0
    rows, cols = occupied.any(1).nonzero(), occupied.any(0).nonzero()
    if len(rows) == 0:
        return 0, 0
    return h // 2 - (int(rows[0]) + int(rows[-1]) + 1) // 2, w // 2 - (int(cols[0]) + int(cols[-1]) + 1) // 2


def shift(x: torch.Tensor, dy: int, dx: int, fill: torch.Tensor) -> torch.Tensor:
    """x moved down dy and right dx without wrapping: out[..., i, j] = x[..., i - dy, j - dx] where that
    lies inside x, else fill[..., i, j]."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    out = fill.expand_as(x).clone()
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        x[..., max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return out


def clean_estimate(x: torch.Tensor, eps: torch.Tensor, alpha: float, sigma: float,
                   c_skip: float = 0.0, c_out: float = 1.0, prediction: str = "epsilon") -> torch.Tensor:
    """x0 = c_out * (x - sigma * eps) / alpha + c_skip * x (docs/method.md §3.4; c_skip 0, c_out 1 off LCM);
    for a flow model, whose output is the velocity v, x0 = x - s v (defined at s = 1 too)."""
    if prediction == "flow":
        return x - sigma * eps
    return c_out * ((x - sigma * eps) / alpha) + c_skip * x


def suppress_leak(m: torch.Tensor, x0: torch.Tensor, b_noisy: torch.Tensor, sensitivity: float) -> torch.Tensor:
    """m *= tanh(mean_c (x0 - b~)^2 / (2 s)) (docs/method.md §3.5)."""
    leak = (x0 - b_noisy).pow(2).mean(dim=1, keepdim=True)
    return m * torch.tanh(leak / (2 * sensitivity))


def aggregate(value: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """X0 = value / count where count > 0 (docs/method.md §3, after step 6)."""
    return torch.where(count > 0, value / count.clamp_min(1e-12), value)


def blend_background(x0: torch.Tensor, count: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Keep the background image where no layer is: X0 = (1 - bg) X0 + bg Bg, bg = clip(1 - count)."""
    w = (1 - count).clamp(0, 1)
    return (1 - w) * x0 + w * bg


def ddim_noise(x: torch.Tensor, x0: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """eps* = (x - alpha_k X0) / sigma_k: the noise that x_k holds given the aggregated X0
    (docs/method.md §3.7, DDIM)."""
    return (x - alpha * x0) / sigma


@dataclass
class StepBatch:
    """The UNet inputs of one step k (docs/method.md §3.1-3.2): one row per active (layer, view) pair."""

    k: int
    pairs: list[tuple[int, int]]  # (layer, view)
    inputs: list[torch.Tensor]  # x_p, bootstrapped where k < bootstrap_steps
    masks: list[torch.Tensor]  # m_{p,k} cut to the pair's window
    b_noisy: Optional[torch.Tensor]  # the noised flat background while bootstrapping, else None
    windows: list[View]  # where each pair is evaluated: its view, or a crop of it around the mask
    shifts: list[tuple[int, int]]  # how each input was moved to centre its mask (docs/method.md §3.2); (0, 0) if not
    device: torch.device  # x's, where the step's X0 is made even when no pair is active

    def uncentred(self, i: int, t: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """A tensor of pair i's centred frame moved back to its window (`fill` where nothing maps)."""
        dy, dx = self.shifts[i]
        return shift(t, -dy, -dx, fill)


def active_pairs(masks: torch.Tensor, views: Sequence[View], skip_empty: bool = True) -> torch.Tensor:
    """[K, P, V] booleans: whether m_{p,k} reaches into view v (an empty pair adds nothing)."""
    active = torch.stack([v.crop(masks[:, :, 0]).flatten(2).amax(-1) for v in views], dim=-1).gt(0).cpu()
    if not skip_empty:
        active[:] = True
    return active


def step_inputs(x: torch.Tensor, noise: torch.Tensor, k: int, schedule: Schedule, masks_k: torch.Tensor,
                views: Sequence[View], active_k: torch.Tensor, *, bootstrap_steps: int = 0,
                bootstrap_mix_steps: float = 1.0, centre: bool = False, white: torch.Tensor | None = None,
                background: torch.Tensor | None = None, crop: RegionCrop | None = None) -> StepBatch:
    """docs/method.md §3.1-3.2 for step k: cut x into views per layer, bootstrapping on the first steps.

    `noise` is the noise x holds; the flat bootstrap background is noised with it, so
    bootstrapping draws no random numbers of its own, and the composite of a layer on it is a
    noised image with one noise realisation. With `centre`, each bootstrapped layer is moved so
    that its mask's bounding box is centred in its window, padded with the bootstrap background;
    `step_output` moves its clean estimate back.
    """
    b_noisy = flat = None
    if k < bootstrap_steps and white is not None:
        r = bootstrap_mix(k, bootstrap_mix_steps)
        flat = white if background is None else r * white + (1 - r) * background
        b_noisy = renoise(flat, schedule.alphas[k], schedule.sigmas[k], noise)
    pairs = [(p, v) for v in range(len(views)) for p in range(masks_k.shape[0]) if active_k[p, v]]
    inputs, pair_masks, windows, shifts = [], [], [], []
    for p, v in pairs:
        view = views[v]
        if crop is not None:
            view = crop.window(view, masks_k[p, 0])
        x_p = view.crop(x)
        m = view.crop(masks_k[p : p + 1])
        moved = (0, 0)
        if b_noisy is not None:
            x_p = bootstrap_blend(x_p, m, view.crop(b_noisy))
            if centre:
                moved = centring_shift(m)
                # The strip moved in is bootstrap background noised with the noise moved out on the
                # other side: each noise value stays once in the input, as in a noised image, and
                # no content wraps around (with a flat background, exactly the reference's roll).
                wrapped = torch.roll(view.crop(noise), moved, dims=(-2, -1))
                x_p = shift(x_p, *moved, renoise(view.crop(flat), schedule.alphas[k], schedule.sigmas[k], wrapped))
        inputs.append(x_p)
        pair_masks.append(m)
        windows.append(view)
        shifts.append(moved)
    return StepBatch(k, pairs, inputs, pair_masks, b_noisy, windows, shifts, x.device)


def step_output(batch: StepBatch, eps: Sequence[torch.Tensor] | torch.Tensor, schedule: Schedule,
                shape: Sequence[int], *, leak_sensitivity: float | None = None,
                background: torch.Tensor | None = None) -> torch.Tensor:
    """docs/method.md §3.4-3.6 for step k: clean estimates, leak suppression, weighted aggregation into X0.

    `eps[i]` is the noise predicted for pair i (a batched tensor, or one tensor per pair when
    the pairs' windows differ in size).
    """
    k = batch.k
    a, s = schedule.alphas[k], schedule.sigmas[k]
    value = torch.zeros(shape, dtype=torch.float32, device=batch.device)
    count = torch.zeros((shape[0], 1, *shape[2:]), dtype=torch.float32, device=batch.device)
    for i, window in enumerate(batch.windows):
        x_p = batch.inputs[i]
        x0_p = clean_estimate(x_p, eps[i].reshape(x_p.shape), a, s, schedule.c_skip[k], schedule.c_out[k],
                              schedule.prediction)
        m = batch.masks[i]
        if batch.b_noisy is not None:
            b = window.crop(batch.b_noisy)
            x0_p = batch.uncentred(i, x0_p, b)
            if leak_sensitivity:
                m = suppress_leak(m, x0_p, b, leak_sensitivity)
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
                    out = predict(torch.cat([batch.inputs[i] for i in part]), t, [batch.pairs[i][0] for i in part],
                                  [batch.windows[i].corner for i in part])
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
    centre: bool = False,
    white: torch.Tensor | None = None,
    background: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noises: Sequence[torch.Tensor] | None = None,
    max_batch: int | None = None,
    skip_empty: bool = True,
    crop: RegionCrop | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Region-based sampling (docs/method.md §3): average the (layer, view) clean estimates, then step from X0.

    `latents` [1, C, h, w] is the initial noise; `masks` [K, P, 1, h, w] holds m_{p,k}. Returns
    the final latent. Pairs whose mask is empty in their view are not evaluated (they would add
    nothing; `skip_empty=False` evaluates them anyway, for measurements); the rest go through
    `predict` in batches of `max_batch`. LCM draws fresh noise for each transition from
    `generator`, or takes `noises[k]` for the transition into step k + 1 when given. With `crop`,
    each pair is evaluated only around its mask (`RegionCrop`); with `centre`, bootstrapped layers
    are centred in their windows (`step_inputs`).
    """
    height, width = latents.shape[-2:]
    views = list(views) if views else [full_view(height, width)]
    active = active_pairs(masks, views, skip_empty)
    steps = masks.shape[0]
    x = latents
    noise = latents  # the noise realisation of x_k; for k = 0 the initial latent itself
    for k in range(steps):
        batch = step_inputs(x, noise, k, schedule, masks[k], views, active[k], bootstrap_steps=bootstrap_steps,
                            bootstrap_mix_steps=bootstrap_mix_steps, centre=centre, white=white,
                            background=background, crop=crop)
        eps, max_batch = predict_pairs(predict, batch, schedule.timesteps[k], max_batch)
        x0 = step_output(batch, eps, schedule, x.shape,
                         leak_sensitivity=leak_sensitivity, background=background)
        if callback is not None:
            callback(k, steps, x0)
        a_next, s_next = schedule.alphas[k + 1], schedule.sigmas[k + 1]
        if schedule.kind == "ddim":
            noise = ddim_noise(x, x0, schedule.alphas[k], schedule.sigmas[k])
            x = renoise(x0, a_next, s_next, noise)
        elif k + 1 < steps:
            noise = noises[k] if noises is not None else randn(x.shape, generator, x.device, x.dtype)
            x = renoise(x0, a_next, s_next, noise)
        else:
            x = x0
    return x
