"""`StreamMultiDiffusion`: an endless stream of frames from layers that can change between calls.

The multi-prompt stream batch of docs/method.md §6: T stages, one latent per stage at noise level t_k,
all stages and layers denoised in ONE UNet call per frame, with the step math of `smd_cli.method.sampler`
(the same functions `generate` uses). A latent entering stage 0 leaves the last stage T calls later
as a frame.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from smd_cli.core import defaults
from smd_cli.core.errors import SmdError
from smd_cli.engine.pipeline import StableMultiDiffusionPipeline
from smd_cli.engine.prepare import Layers, auto_negatives, join_layers, prepare_layers, prepare_text, row_loras
from smd_cli.families import Conditioning, Placement
from smd_cli.method import masks as mask_ops
from smd_cli.method.sampler import active_pairs, randn, renoise, step_inputs, step_output
from smd_cli.method.views import layout, tiling, work_problem, wrap_axes
from smd_cli.models.controls import ControlSpec, as_specs
from smd_cli.models.loras import LoraSet, as_loras
from smd_cli.models.references import ReferenceSpec, as_reference


@dataclass
class StreamLayer:
    """One semantic brush of the stream."""

    prompt: str
    negative_prompt: str = ""
    mask: np.ndarray | None = None  # [H, W] in [0, 1]; None is the whole canvas
    mask_strength: float = defaults.MASK_STRENGTH
    mask_std: float = defaults.MASK_STD
    prompt_strength: float = defaults.PROMPT_STRENGTH
    loras: LoraSet = ()  # act on this layer's rows only
    controlnets: tuple[ControlSpec, ...] = ()  # act on this layer's rows only
    reference: ReferenceSpec | None = None  # this layer's reference image (IP-Adapter)


class StreamMultiDiffusion:
    """Streaming region-based generation (docs/method.md §6), following the original project's API.

    Register a background and layers with `update_background` and `update_single_layer`, then call
    the object for the next frame (a PIL image). Updates re-encode only changed prompts and
    re-blur only changed masks; with `autoflush` the next frame already shows them.
    """

    def __init__(self, device: Any = None, hf_key: str | None = None, sd_version: str | None = None, *,
                 height: int = defaults.STREAM_SIZE, width: int = defaults.STREAM_SIZE,
                 cfg_type: str = defaults.STREAM_CFG_TYPE, guidance_scale: float = defaults.STREAM_GUIDANCE_SCALE,
                 delta: float = defaults.STREAM_DELTA, autoflush: bool = True, use_tiny_vae: bool | None = None,
                 mask_type: str = defaults.STREAM_MASK_TYPE, bootstrap_steps: int = defaults.BOOTSTRAP_STEPS,
                 bootstrap_mix_steps: float = defaults.BOOTSTRAP_MIX_STEPS,
                 bootstrap_leak_sensitivity: float | None = defaults.LEAK_SENSITIVITY,
                 bootstrap_centre: bool = defaults.BOOTSTRAP_CENTRE,
                 cover_alpha: float = defaults.COVER_ALPHA, seed: int = defaults.STREAM_SEED,
                 num_inference_steps: int | None = None, timesteps: Sequence[int] | None = None,
                 tile_size: int | None = None,
                 dtype: Any = None, lcm_lora: str | None = None, vae: str | None = None,
                 pipeline: StableMultiDiffusionPipeline | None = None, overlap_decode: bool = False,
                 compile: bool = False, loras: Any = None, controlnets: Any = None, negative_auto: bool = False,
                 reference: Any = None, allow_large: bool = False, region_mode: str = defaults.REGION_MODE,
                 circular: bool | str = False):
        """Load a model as `StableMultiDiffusionPipeline` does (the tiny autoencoder by default), or
        stream from a loaded `pipeline`, which then decides the model, device, dtype and autoencoder.
        The stream's stages are the LCM schedule's `num_inference_steps` steps, or `timesteps`.
        `loras` and `controlnets` act on the whole canvas (as the pipeline takes them); a layer's own
        are given with `update_single_layer(..., loras=..., controlnets=..., reference=...)`.
        `negative_auto` and `reference` (for layers without their own) as the pipeline's. A frame's work
        past `defaults.LARGE_WORK` denoiser passes (views x layers x stages) is refused unless
        `allow_large`, as the pipeline refuses an image's. `region_mode` as the pipeline's: in
        attention mode a frame is one row per stage (and view), whatever the number of layers.
        `circular` (x, y or both) wraps the views and the decode as the pipeline's."""
        wrap_axes(circular)
        self.circular = circular
        if region_mode not in defaults.REGION_MODES:
            raise SmdError(f"region_mode must be one of {', '.join(defaults.REGION_MODES)}, got {region_mode!r}")
        self.region_mode = region_mode
        if cfg_type not in defaults.STREAM_CFG_TYPES:
            raise SmdError(f"cfg_type must be one of {', '.join(defaults.STREAM_CFG_TYPES)}, got {cfg_type!r}")
        loading = dict(device=device, hf_key=hf_key, sd_version=sd_version, dtype=dtype, lcm_lora=lcm_lora, vae=vae,
                       use_tiny_vae=use_tiny_vae)
        if pipeline is not None:
            given = [name for name, value in loading.items() if value is not None]
            if given:
                raise SmdError(f"StreamMultiDiffusion(pipeline=...) streams from that pipeline's model; "
                               f"{', '.join(given)} would be ignored: leave them out, or leave out pipeline")
        self.pipe = pipeline or StableMultiDiffusionPipeline(
            device, hf_key=hf_key, sd_version=sd_version, dtype=dtype,
            lcm_lora="auto" if lcm_lora is None else lcm_lora, vae=vae,
            use_tiny_vae=True if use_tiny_vae is None else use_tiny_vae)
        pipe = self.pipe
        self.loras = as_loras(loras)
        pipe.load_loras(self.loras)
        self.controlnets = as_specs(controlnets)
        self.negative_auto = negative_auto
        self.reference = as_reference(reference)
        f = pipe.vae_scale_factor
        mask_ops.check_divisible(width, height, f)
        tiles = tiling(pipe.family.grid, width, height, tile_size=tile_size,
                       circular=circular)  # FLUX packs whole 2x2 tokens
        self.height, self.width = height, width
        self.allow_large = allow_large
        self.cfg_type = cfg_type
        self.guidance_scale = guidance_scale if cfg_type != "none" else 1.0
        self.delta = delta
        self.autoflush = autoflush
        self.mask_type = mask_type
        self.bootstrap_steps = bootstrap_steps if region_mode == "latent" else 0  # docs/method.md §10
        self.bootstrap_mix_steps = bootstrap_mix_steps
        self.leak_sensitivity = bootstrap_leak_sensitivity
        self.bootstrap_centre = bootstrap_centre
        self.cover_alpha = cover_alpha
        if pipe.family.flow and num_inference_steps is None and timesteps is None:
            num_inference_steps = defaults.STEPS["lcm"]  # a stream's depth, not a flow model's 28 steps
        window, stride = tiles.window, tiles.stride
        self.schedule = pipe.schedule(num_inference_steps, timesteps, window=tiles.view)
        self.view_count = tiles.count
        self.check_work(1)
        self.shape = (1, pipe.family.channels, height // f, width // f)
        self.views = layout(self.shape[2], self.shape[3], (window, window), (stride, stride), circular=circular,
                            device=pipe.device)

        # Every noise comes from the stream's own generator: stage 0's fresh latents and the fixed
        # per-stage noises n_1 .. n_{T-1}, drawn once (docs/method.md §6.4), in this order.
        self.generator = torch.Generator("cpu").manual_seed(seed)
        stages = len(self.schedule)
        self.stage_noises = [randn(self.shape, self.generator, pipe.device, torch.float32) for _ in range(stages - 1)]
        self.white = pipe.white_latent(height, width)
        self.stages: list[torch.Tensor] = [
            renoise(self.white, self.schedule.alphas[k], self.schedule.sigmas[k], self.stage_noises[k - 1])
            for k in range(1, stages)]
        self.stock: torch.Tensor | None = None  # residual-CFG noise per stage and layer; persists

        self.layers: list[StreamLayer] = []
        self.background_image: Image.Image | None = None
        self.background_latent: torch.Tensor | None = None
        self.background_prompt: str | None = None
        self.background_negative_prompt = ""
        self._blur_cache: dict = {}
        self._prepared: Layers | None = None
        self._cond: Conditioning | None = None
        self._uncond: Conditioning | None = None
        self.calls = 0
        # Decoding frame n while the UNet runs frame n + 1: the stream then runs one call ahead.
        self.overlap_decode = overlap_decode
        self._pending: tuple | None = None
        self._decoder: concurrent.futures.ThreadPoolExecutor | None = None
        self._side_stream = None  # CUDA stream for decoding beside the UNet
        if compile:  # one fixed batch shape per call: CUDA graphs replay it without launch overhead
            pipe.optimize(compile=True, mode="reduce-overhead" if pipe.device.type == "cuda" else None)

    # -----------------------------------------------------------------------------------------
    # Updates

    def update_background(self, image: Image.Image | None = None, prompt: str | None = None,
                          negative_prompt: str | None = None) -> None:
        """Replace the background picture (kept where no layer paints) and/or its prompts."""
        if image is not None:
            self.background_image = mask_ops.fit_picture(image, self.width, self.height)
            self.background_latent = self.pipe.encode_image(self.background_image)
        if prompt is not None:
            self.background_prompt = prompt
        if negative_prompt is not None:
            self.background_negative_prompt = negative_prompt
        self._changed()

    def remove_background_image(self) -> None:
        """Paint the uncovered area from the background prompt again instead of keeping a picture."""
        self.background_image = self.background_latent = None
        self._changed()

    def update_single_layer(self, idx: int, prompt: str | None = None, negative_prompt: str | None = None,
                            mask: Any = None, mask_strength: float | None = None, mask_std: float | None = None,
                            prompt_strength: float | None = None, loras: Any = None,
                            controlnets: Any = None, reference: Any = None) -> None:
        """Edit layer `idx`'s fields that are given; `idx` equal to the layer count appends a layer.
        `loras` and `controlnets` (as the pipeline takes them; an empty list for none) act on this
        layer only."""
        if not 0 <= idx <= len(self.layers):
            raise SmdError(f"layer index {idx} out of range: there are {len(self.layers)} layers")
        if idx == len(self.layers):
            if prompt is None:
                raise SmdError("a new layer needs a prompt")
            self.check_work(idx + 1)
            self.layers.append(StreamLayer(prompt))
        layer = self.layers[idx]
        changes = {k: v for k, v in dict(prompt=prompt, negative_prompt=negative_prompt, mask_strength=mask_strength,
                                        mask_std=mask_std, prompt_strength=prompt_strength).items() if v is not None}
        if mask is not None:
            changes["mask"] = self._mask(mask)
        if loras is not None:
            changes["loras"] = as_loras(loras)
            self.pipe.load_loras(changes["loras"])
        if controlnets is not None:
            changes["controlnets"] = tuple(as_specs(controlnets))
        if reference is not None:  # False removes the layer's reference
            changes["reference"] = as_reference(reference) if reference is not False else None
        self.layers[idx] = replace(layer, **changes)
        self._changed()

    def check_work(self, layers: int) -> None:
        """Refuse `layers` layers when a frame of them is more work than the stream takes (`allow_large`)."""
        too_much = work_problem(self.view_count, layers, len(self.schedule), allow_large=self.allow_large,
                                allow="allow_large=True", per="frame")
        if too_much:
            raise SmdError(too_much)

    def remove_single_layer(self, idx: int) -> None:
        """Remove layer `idx`; later layers move down one place."""
        if not 0 <= idx < len(self.layers):
            raise SmdError(f"layer index {idx} out of range: there are {len(self.layers)} layers")
        del self.layers[idx]
        self._changed()

    def _mask(self, mask: Any) -> np.ndarray:
        array = mask_ops.api_masks([mask] if not isinstance(mask, (list, tuple)) else mask, 1)
        return mask_ops.fit_masks(array, self.height, self.width)[0]

    def _changed(self) -> None:
        self._prepared = None
        if self.autoflush and self.layers:
            self.flush()

    def _prepare(self) -> None:
        """Re-derive masks and text states after an update (blurs and encodings are remembered)."""
        if not self.layers:
            raise SmdError("the stream has no layers yet: add one with update_single_layer")
        full = np.ones((self.height, self.width), np.float32)
        layers = Layers([x.prompt for x in self.layers], [x.negative_prompt for x in self.layers],
                        np.stack([full if x.mask is None else x.mask for x in self.layers]),
                        [x.mask_strength for x in self.layers], [x.mask_std for x in self.layers],
                        [x.prompt_strength for x in self.layers], loras=[x.loras for x in self.layers],
                        controlnets=[list(x.controlnets) for x in self.layers],
                        references=[x.reference for x in self.layers])
        self._prepared = prepare_layers(
            layers, self.schedule, factor=self.pipe.vae_scale_factor, device=self.pipe.device,
            cover_alpha=self.cover_alpha, mask_type=self.mask_type, picture=self.background_latent is not None,
            background_prompt=self.background_prompt, background_negative_prompt=self.background_negative_prompt,
            blur_cache=self._blur_cache)
        if self.negative_auto:
            self._prepared.negatives = auto_negatives(self._prepared, len(self.layers))
        self.pipe._text_loras(self.loras)
        cond, uncond = prepare_text(self.pipe.encode_prompts, self._prepared, self.background_prompt,
                                    self.background_negative_prompt, self.pipe.runs_unconditional(self.guidance_scale),
                                    self.pipe.family.empty_negative())
        sets = row_loras(self._prepared, self.loras)
        controls = self.pipe.row_controls(self.controlnets, self._prepared, self.width, self.height,
                                          self.schedule.timesteps)
        cond, uncond = cond.with_loras(sets), uncond and uncond.with_loras(sets)
        cond, uncond = cond.with_controls(controls), uncond and uncond.with_controls(controls)
        cond, uncond = self.pipe.with_references(cond, uncond, self.reference, self._prepared)
        self._prepared, self._cond, self._uncond = join_layers(
            self._prepared, cond, uncond, self.region_mode, self.schedule.timesteps, scene_layers=len(self.layers),
            lengths=self.pipe.family.text_lengths, background_prompt=self.background_prompt,
            canvas_controls=bool(self.controlnets or self.reference))
        self._active = active_pairs(self._prepared.step_masks, self.views)
        if self.stock is None or self.stock.shape[1] != len(self._prepared.prompts):
            self.stock = None  # layers were added or removed: restart the residual noise

    # -----------------------------------------------------------------------------------------
    # Frames

    def flush(self) -> None:
        """Run T calls without decoding, so the next frame fully reflects the current state."""
        for _ in range(len(self.schedule)):
            self.step()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One stream call (docs/method.md §6): every stage and layer in one UNet call; returns the last stage's X0."""
        if self._prepared is None:
            self._prepare()
        pipe, schedule = self.pipe, self.schedule
        fresh = randn(self.shape, self.generator, pipe.device, torch.float32)
        latents = [fresh] + self.stages
        noises = [fresh] + self.stage_noises  # the noise each stage's latent holds
        batches = [step_inputs(latents[k], noises[k], k, schedule, self._prepared.step_masks[k], self.views,
                               self._active[k], bootstrap_steps=self.bootstrap_steps,
                               bootstrap_mix_steps=self.bootstrap_mix_steps, centre=self.bootstrap_centre,
                               white=self.white, background=self.background_latent) for k in range(len(schedule))]
        eps = self._predict(batches, noises)
        x0s, start = [], 0
        for batch in batches:
            n = len(batch.pairs)
            x0s.append(step_output(batch, eps[start : start + n], schedule, self.shape,
                                   leak_sensitivity=self.leak_sensitivity, background=self.background_latent))
            start += n
        self.stages = [renoise(x0s[k], schedule.alphas[k + 1], schedule.sigmas[k + 1], self.stage_noises[k])
                       for k in range(len(schedule) - 1)]
        self.calls += 1
        return x0s[-1]

    def _predict(self, batches, noises: list[torch.Tensor]) -> torch.Tensor:
        """The one UNet call of a stream step, with the guidance of `cfg_type` (docs/method.md §6)."""
        pipe, g = self.pipe, self.guidance_scale
        if not any(b.pairs for b in batches):  # nothing painted over a picture: every stage keeps it
            return torch.empty((0, *self.shape[1:]), device=pipe.device)
        x = torch.cat([x for b in batches for x in b.inputs])
        t = torch.tensor([self.schedule.timesteps[b.k] for b in batches for _ in b.pairs], device=pipe.device)
        layers = torch.tensor([p for b in batches for p, _ in b.pairs], device=pipe.device)
        corners = [w.corner for b in batches for w in b.windows]
        placed = Placement(self.shape[2:], corners)
        cond = self._cond[layers]
        if self._uncond is None:  # no unconditional pass: cfg_type none, guidance <= 1, or a distilled model
            return pipe.predict(x, t, cond, g, placed)
        if self.cfg_type == "full":
            eps_u, eps_c = pipe.predict(torch.cat([x, x]), torch.cat([t, t]),
                                        Conditioning.cat([self._uncond[layers], cond]), g,
                                        Placement(self.shape[2:], corners + corners)).chunk(2)
            return eps_u + g * (eps_c - eps_u)
        # Residual guidance: the unconditional noise is delta times the stock noise, which starts as
        # the noise each stage's latent holds and then carries its residual down the stages.
        stock = self._stock(noises)
        first = len(batches[0].pairs)
        if self.cfg_type == "initialize":  # one extra unconditional pass, for stage 0 only
            out = pipe.predict(torch.cat([x, x[:first]]), torch.cat([t, t[:first]]),
                               Conditioning.cat([cond, self._uncond[layers[:first]]]), g,
                               Placement(self.shape[2:], corners + corners[:first]))
            eps_c, eps_u0 = out[: len(x)], out[len(x):]
            for i, (p, _) in enumerate(batches[0].pairs):
                window = batches[0].windows[i]
                held = window.crop(stock[0, p : p + 1])
                stock[0, p] = _paste(stock[0, p], batches[0].uncentred(i, eps_u0[i : i + 1], held)[0], window)
        else:
            eps_c = pipe.predict(x, t, cond, g, placed)
        # A centred input holds its noise moved with it, the noise moved out wrapping round (docs/method.md §3.2).
        eps_u = torch.cat([torch.roll(b.windows[i].crop(stock[b.k, p : p + 1]), b.shifts[i], dims=(-2, -1))
                           for b in batches for i, (p, _) in enumerate(b.pairs)])
        self._carry_stock(stock, noises)
        return self.delta * eps_u + g * (eps_c - self.delta * eps_u)

    def _stock(self, noises: list[torch.Tensor]) -> torch.Tensor:
        layers = len(self._prepared.prompts)
        if self.stock is None:
            self.stock = torch.stack([n[0].expand(layers, -1, -1, -1).clone() for n in noises])
        # Stage 0 holds a fresh latent each call, with no history: its stock is that latent's noise.
        self.stock[0] = noises[0][0]
        return self.stock

    def _carry_stock(self, stock: torch.Tensor, noises: list[torch.Tensor]) -> None:
        """Move each stage's residual (stock minus the noise it holds) down one stage with its latent."""
        residual = stock - torch.stack([n[0] for n in noises])[:, None]
        held = torch.stack([n[0] for n in noises])[:, None]
        self.stock = torch.cat([held[:1].expand_as(residual[:1]), held[1:] + residual[:-1]])

    def __call__(self) -> Image.Image:
        """The next frame as a PIL image.

        With `overlap_decode`, the frame decoded here is the one the previous call denoised, and it
        is decoded (in a worker thread, on a side CUDA stream on a GPU) while the UNet denoises the
        next: the frames are the same, an update shows one call later.
        """
        if not self.overlap_decode:
            return self.decode(self.step())
        if self._pending is None:
            self._pending = self._frame_inputs(self.step())
        done = self._decode_async(self._pending)
        self._pending = self._frame_inputs(self.step())
        return done.result()

    def decode(self, x0: torch.Tensor) -> Image.Image:
        return self._decode(self._frame_inputs(x0))

    def close(self) -> None:
        """Stop the decoding thread of `overlap_decode`, if one started; the stream may be called
        again afterwards, and starts another."""
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)
            self._decoder = None
        self._pending = None

    def __enter__(self) -> "StreamMultiDiffusion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _frame_inputs(self, x0: torch.Tensor) -> tuple:
        """What decoding a frame needs, fixed now so that later updates do not reach it."""
        return x0, self._prepared.blurred, self.background_image

    def _decode(self, inputs: tuple) -> Image.Image:
        x0, blurred, picture = inputs
        return self.pipe.to_image(self.pipe.pixels(x0, self.circular, blurred=blurred, picture=picture))

    def _decode_async(self, inputs: tuple) -> concurrent.futures.Future:
        if self._decoder is None:
            self._decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="smd-decode")
        if self.pipe.device.type != "cuda":
            return self._decoder.submit(self._decode, inputs)
        ready = torch.cuda.Event()
        ready.record()  # x0 is complete on the main stream here
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.pipe.device)
        side = self._side_stream

        def work() -> Image.Image:
            with torch.cuda.stream(side):
                side.wait_event(ready)
                return self._decode(inputs)

        return self._decoder.submit(work)


def _paste(target: torch.Tensor, value: torch.Tensor, view) -> torch.Tensor:
    """target with `value` written into the view's window (target [C, h, w], value [C, vh, vw])."""
    out = target.clone()[None]
    region = view.crop(out)
    view.add_into(out, value[None] - region)
    return out[0]


class StreamMultiDiffusionSDXL(StreamMultiDiffusion):
    """`StreamMultiDiffusion` for SDXL models, under the original project's name: loading (or the
    `pipeline` given) must be SDXL."""

    def __init__(self, device: Any = None, hf_key: str | None = None, sd_version: str | None = None, **kwargs):
        pipeline = kwargs.get("pipeline")
        if pipeline is not None and pipeline.family.name != "sdxl":
            raise SmdError(f"StreamMultiDiffusionSDXL streams SDXL models; this pipeline's model is "
                           f"{pipeline.family.label}: use StreamMultiDiffusion")
        super().__init__(device, hf_key, sd_version or (None if pipeline is not None else "xl"), **kwargs)
