"""`StableMultiDiffusionPipeline`: region-based multi-prompt generation, the library behind `smd`.

It wires loaded components to the shared step loop (`smd_cli.sampler`) and reads top to bottom:
1. check inputs, 2. prepare masks, 3. encode prompts, 4. prepare latents, 5. denoise, 6. decode.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from smd_cli import masks as mask_ops
from smd_cli.errors import ModelError, SmdError
from smd_cli.models import (
    AUTO_BATCH_CPU,
    Components,
    load_components,
    resolve_device,
    resolve_dtype,
    vae_factor,
    warn_if_slow,
)
from smd_cli.sampler import RegionCrop, Schedule, StepCallback, randn, sample
from smd_cli.views import layout, view_sizes
from smd_cli.masks import SceneMasks
from smd_cli.metadata import Record, make_record
from smd_cli.scene import SceneFile, step_count

# SPEC section 1: the default schedule takes these indices of the 50-step LCM grid.
LCM_ORIGINAL_STEPS = 50
DEFAULT_LCM_INDICES = (0, 4, 12, 25, 37)
SCHEDULERS = ("lcm", "ddim", "euler")
DEFAULT_STEPS = {"lcm": 4, "ddim": 50, "euler": 50}  # lcm: used only for an explicit non-default count
DEFAULT_TILE_SIZE = 768  # pixels (SPEC 7); a canvas within one tile is one view
TEXT_CACHE_SIZE = 256  # remembered prompt encodings
CIRCULAR_DECODE_PAD = 8  # latent columns wrapped around each side before decoding a 360-degree canvas
SUPPORTED_SD_VERSIONS = ("1.5", "1.4", "1", "2.0", "2.1", "2")


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the text encoder's limit was cut."""


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices), as the original project's helper does."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _per_layer(value: Any, count: int, default: float, name: str) -> list[float]:
    if value is None:
        return [default] * count
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, (int, float)):
        return [float(value)] * count
    value = [float(v) for v in value]
    if len(value) != count:
        raise SmdError(f"{name} has {len(value)} values for {count} prompts")
    return value


def _as_list(value: Any, count: int, name: str) -> list[str]:
    if value is None:
        return [""] * count
    if isinstance(value, str):
        return [value] * count
    value = list(value)
    if len(value) == 1 and count > 1:
        return value * count
    if len(value) != count:
        raise SmdError(f"{name} has {len(value)} entries for {count} prompts")
    return value


def masks_to_array(masks: Any, count: int) -> np.ndarray:
    """Masks from the Python API (tensor [P,1,H,W] or [P,H,W], list of tensors/arrays/PIL) as [P, H, W]."""
    if isinstance(masks, (torch.Tensor, np.ndarray)):
        items = list(masks) if masks.ndim >= 3 else [masks]
    else:
        items = list(masks)
    arrays = []
    for item in items:
        if isinstance(item, Image.Image):
            arr = mask_ops.image_mask(item)
        else:
            arr = item.detach().float().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item, np.float32)
            arr = arr.astype(np.float32)
            while arr.ndim > 2:
                arr = arr[0]
        arrays.append(arr)
    if len(arrays) != count:
        raise SmdError(f"{len(arrays)} masks for {count} prompts; give one mask per prompt")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise SmdError(f"masks have different sizes: {sorted(shapes)}")
    out = np.stack(arrays)
    if not np.isfinite(out).all() or out.min() < 0 or out.max() > 1:
        raise SmdError("mask values must lie in [0, 1] (divide 0..255 images by 255)")
    return out


@dataclass
class Layers:
    """Per-layer inputs in layer order, and what SPEC 2.2 makes of their masks."""

    prompts: list[str]
    negatives: list[str]
    masks: np.ndarray  # [P, H, W] raw masks at canvas size
    strengths: list[float]
    stds: list[float]
    prompt_strengths: list[float]
    blurred: np.ndarray | None = None  # [P, H, W], for the final pixel blend
    step_masks: torch.Tensor | None = None  # [K, P, 1, h, w] m_{p,k}


@dataclass
class Result:
    """One generated image and what made it."""

    image: Any
    seed: int | None
    timings: dict[str, float] = field(default_factory=dict)
    record: Record | None = None  # how it was made, written into the PNG by `save`

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the image atomically, with its record when it is a PNG; an existing file is kept
        (the image gets `name-1.png`, ...) unless `overwrite`. Returns the path written."""
        from smd_cli.metadata import png_info
        from smd_cli.outputs import save_image

        path = Path(path)
        info = png_info(self.record) if self.record is not None and path.suffix.lower() == ".png" else None
        return save_image(self.image, path, info, overwrite=overwrite)


class StableMultiDiffusionPipeline:
    """Region-based multi-prompt text-to-image generation (StreamMultiDiffusion, SPEC section 3).

    `StableMultiDiffusionPipeline(device, hf_key=..., sd_version='1.5')` loads a model (a hub id,
    a local diffusers folder or a .safetensors file); `from_components` wraps loaded parts.
    """

    def __init__(self, device: Any = None, hf_key: str | None = None, sd_version: str = "1.5", *,
                 dtype: Any = None, lcm_lora: str | None = "auto", config: str | None = None,
                 vae: str | None = None, use_tiny_vae: bool = False, components: Components | None = None):
        if str(sd_version) not in SUPPORTED_SD_VERSIONS:
            raise ModelError(f"sd_version {sd_version!r} is not supported; smd runs SD 1.x and 2.x models")
        self.device = resolve_device(device)
        if device in (None, "auto"):
            warn_if_slow(self.device)
        self.dtype = resolve_dtype(dtype, self.device)
        if components is None:
            components = load_components(hf_key, device=self.device, dtype=self.dtype, lcm_lora=lcm_lora,
                                         config=config, vae=vae or ("tiny" if use_tiny_vae else None))
        self.components = components
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        from diffusers import LCMScheduler

        self.scheduler = LCMScheduler.from_config(components.scheduler_config)
        if self.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.vae.to(torch.float32)  # SD's VAE overflows to NaN in float16; its config says so
        self.vae_scale_factor = vae_factor(self.vae.config)
        self.default_size = int(self.unet.config.sample_size) * self.vae_scale_factor
        self._white_cache: dict[str, torch.Tensor] = {}
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_components(cls, *, unet, vae, text_encoder, tokenizer, scheduler=None, device: Any = None,
                        dtype: Any = None) -> "StableMultiDiffusionPipeline":
        """Wrap already loaded diffusers/transformers components (moved to `device`)."""
        resolved = resolve_device(device if device is not None else unet.device)
        dtype = resolve_dtype(dtype if dtype is not None else unet.dtype, resolved)
        for module in (unet, vae, text_encoder):
            module.to(resolved, dtype)
        config = dict(scheduler.config) if scheduler is not None else {}
        return cls(resolved, dtype=dtype, components=Components(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=config))

    @classmethod
    def from_pipe(cls, pipe, device: Any = None, dtype: Any = None) -> "StableMultiDiffusionPipeline":
        """Wrap a loaded diffusers `StableDiffusionPipeline`."""
        return cls.from_components(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                   tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, device=device, dtype=dtype)

    # -----------------------------------------------------------------------------------------
    # Inputs

    def schedule(self, steps: int | None = None, timesteps: Sequence[int] | None = None,
                 scheduler: str = "lcm") -> Schedule:
        """The step schedule (SPEC 1, 3) for `scheduler`: lcm (default 5 steps), ddim or euler (50 steps).

        LCM's 5 steps are SPEC's default grid; other counts are spaced as diffusers' schedulers
        space them. DDIM and Euler are both the deterministic transition from X0 (Euler's sigma
        steps are DDIM's in the variance-preserving parameterisation), on their own timesteps.
        """
        if scheduler not in SCHEDULERS:
            raise SmdError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
        train = int(self.scheduler.config.num_train_timesteps)
        if timesteps is not None and any(t < 0 or t >= train for t in timesteps):
            raise SmdError(f"timesteps must lie in [0, {train - 1}] for this model, got {list(timesteps)}")
        abar = self.scheduler.alphas_cumprod
        if scheduler == "euler":
            from diffusers import EulerDiscreteScheduler

            euler = EulerDiscreteScheduler.from_config(self.scheduler.config)
            if timesteps is not None:
                euler.set_timesteps(timesteps=[int(t) for t in timesteps])
            else:
                euler.set_timesteps(steps or DEFAULT_STEPS[scheduler])
            ts = [float(t) for t in euler.timesteps]
            ve = [float(x) for x in euler.sigmas]  # K + 1 noise levels sigma/alpha, the last 0
            alphas = [1.0 / math.sqrt(1.0 + v * v) for v in ve]
            sigmas = [v / math.sqrt(1.0 + v * v) for v in ve]
            return Schedule(ts, alphas, sigmas, [0.0] * len(ts), [1.0] * len(ts), kind="ddim",
                            init_scale=float(euler.init_noise_sigma) * alphas[0])
        if timesteps is None:
            if scheduler == "lcm" and steps in (None, len(DEFAULT_LCM_INDICES)):
                stride = train // LCM_ORIGINAL_STEPS
                grid = [train - 1 - i * stride for i in range(LCM_ORIGINAL_STEPS)]
                timesteps = [grid[i] for i in DEFAULT_LCM_INDICES]
            else:
                sched = self.scheduler if scheduler == "lcm" else self._ddim()
                limit = sched.config.get("original_inference_steps", LCM_ORIGINAL_STEPS) if scheduler == "lcm" else train
                if (steps or 0) > limit:
                    raise SmdError(f"{scheduler} takes at most {limit} steps for this model, got {steps}"
                                   + ("; use scheduler ddim or euler for more" if scheduler == "lcm" else ""))
                sched.set_timesteps(num_inference_steps=steps or DEFAULT_STEPS[scheduler])
                timesteps = [int(t) for t in sched.timesteps]
                if any(t < 0 or t >= train for t in timesteps):
                    raise SmdError(f"{steps} {scheduler} steps do not fit this model's {train} training "
                                   "timesteps; use fewer steps")
        ts = [int(t) for t in timesteps]
        alphas = [math.sqrt(float(abar[t])) for t in ts]
        sigmas = [math.sqrt(1.0 - float(abar[t])) for t in ts]
        if scheduler == "ddim":  # diffusers' DDIM ends at final_alpha_cumprod, not at clean
            final = float(self._ddim().final_alpha_cumprod)
            return Schedule(ts, alphas + [math.sqrt(final)], sigmas + [math.sqrt(1.0 - final)],
                            [0.0] * len(ts), [1.0] * len(ts), kind="ddim")
        scalings = [self.scheduler.get_scalings_for_boundary_condition_discrete(t) for t in ts]
        return Schedule(ts, alphas + [1.0], sigmas + [0.0], [c[0] for c in scalings], [c[1] for c in scalings])

    def _ddim(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler.config)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP states [N, 77, D] for each prompt; each distinct prompt is encoded once and remembered,
        so repeated prompts (and unchanged prompts in a stream) cost nothing (SPEC 2.1, 6)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            for text, state in zip(missing, self._encode(missing)):
                if len(self._text_cache) >= TEXT_CACHE_SIZE:
                    self._text_cache.pop(next(iter(self._text_cache)))
                self._text_cache[text] = state
        return torch.stack([self._text_cache[p] for p in prompts])

    def _encode(self, unique: list[str]) -> torch.Tensor:
        tok, limit = self.tokenizer, self.tokenizer.model_max_length
        batch = tok(unique, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        for full in tok(unique).input_ids:
            if len(full) > limit:  # truncation keeps the first limit - 1 tokens and the end token
                warnings.warn(f"prompt longer than the text encoder's {limit} tokens; cut: "
                              f"{tok.decode(full[limit - 1:-1])!r}", PromptTruncatedWarning, stacklevel=3)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = batch.attention_mask.to(self.device)
        return self.text_encoder(batch.input_ids.to(self.device), attention_mask=mask)[0].to(self.dtype)

    @torch.no_grad()
    def encode_image(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """VAE latent of an image resized to the canvas: the distribution's mode, scaled (SPEC 2.3)."""
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        encoded = self.vae.encode(pixels.to(self.device, self.vae.dtype))
        # AutoencoderKL gives a distribution (take its mode, never a sample); TAESD gives latents.
        latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        return latents.float() * self.vae.config.scaling_factor

    def white_latent(self, height: int, width: int) -> torch.Tensor:
        """The latent of a white canvas: spatially uniform (the VAE's border effects left out), so a
        circular canvas has no edge and a large one costs one small encode."""
        if "white" not in self._white_cache:
            size = max(self.default_size, 8 * self.vae_scale_factor)
            tile = self.encode_image(Image.new("RGB", (size, size), (255, 255, 255)), size, size)
            centre = tile.shape[-1] // 2
            self._white_cache["white"] = tile[..., centre : centre + 1, centre : centre + 1]
        return self._white_cache["white"].expand(1, -1, height // self.vae_scale_factor,
                                                 width // self.vae_scale_factor)

    def prepare_layers(self, layers: "Layers", schedule: Schedule, *, cover_alpha: float, mask_type: str,
                       background_image: bool, background_prompt: str | None,
                       background_negative_prompt: str = "", blur_cache: dict | None = None) -> "Layers":
        """SPEC 2.2 for a set of layers: add the background layer over the uncovered area (unless a
        picture fills it), then occlusion, blur, strength and per-step quantization at latent size."""
        if not background_image:
            uncovered = mask_ops.background_mask(layers.masks)
            if uncovered.max() > 0:
                layers = Layers([background_prompt or ""] + layers.prompts,
                                [background_negative_prompt] + layers.negatives,
                                np.concatenate([uncovered[None], layers.masks]), [1.0] + layers.strengths,
                                [0.0] + layers.stds, [1.0] + layers.prompt_strengths)
        layers.blurred, strengthened = mask_ops.prepare(layers.masks, cover_alpha=cover_alpha, stds=layers.stds,
                                                        strengths=layers.strengths, cache=blur_cache)
        per_step = mask_ops.step_masks(strengthened, self.vae_scale_factor, schedule.mask_sigmas, mask_type)
        layers.step_masks = torch.from_numpy(per_step).unsqueeze(2).to(self.device)
        return layers

    def prepare_text(self, layers: "Layers", background_prompt: str | None, background_negative_prompt: str,
                     do_cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SPEC 2.1: conditional (and, for guidance, unconditional) states per layer, mixed toward the
        background prompt by each layer's prompt strength."""
        prompts, negatives, prompt_ws = layers.prompts, layers.negatives, layers.prompt_strengths
        texts = prompts + (negatives if do_cfg else [])
        mix = bool(background_prompt) and any(w != 1.0 for w in prompt_ws)
        if not background_prompt and any(w != 1.0 for w in prompt_ws):
            warnings.warn("prompt strength below 1 mixes a layer toward the background prompt, and there is "
                          "none; set a background prompt or leave prompt strength at 1", stacklevel=3)
        if mix:
            texts = texts + [background_prompt] + ([background_negative_prompt] if do_cfg else [])
        states = self.encode_prompts(texts)
        cond = states[: len(prompts)]
        uncond = states[len(prompts): 2 * len(prompts)] if do_cfg else None
        if mix:
            w = torch.tensor(prompt_ws, device=self.device, dtype=states.dtype).view(-1, 1, 1)
            bg_c = states[len(texts) - (2 if do_cfg else 1)]
            cond = bg_c + w * (cond - bg_c)
            if do_cfg:
                uncond = states[-1] + w * (uncond - states[-1])
        return cond, uncond

    @torch.no_grad()
    def unet_eps(self, x: torch.Tensor, t: float | torch.Tensor, states: torch.Tensor,
                 guidance_scale: float = 1.0) -> torch.Tensor:
        """The UNet's noise prediction (float32) for latents x at timestep(s) t under text states.

        Guidance-distilled UNets get `guidance_scale` as an embedding (SPEC 3.3); v-prediction
        models are converted to noise with eps = sigma * x + alpha * v.
        """
        cfg = self.unet.config
        tc = None
        if cfg.get("time_cond_proj_dim") is not None:
            w = torch.tensor([guidance_scale - 1.0], dtype=torch.float32)
            tc = guidance_embedding(w, cfg.time_cond_proj_dim).to(self.device, self.dtype).expand(len(x), -1)
        if not isinstance(t, torch.Tensor):  # a tensor, so that a compiled UNet is not specialised on each t
            t = torch.tensor(t, dtype=torch.float32, device=self.device)
        out = self.unet(x.to(self.dtype), t, encoder_hidden_states=states, timestep_cond=tc, return_dict=False)[0]
        out = out.float()
        if self.scheduler.config.prediction_type == "v_prediction":
            abar = self.scheduler.alphas_cumprod.to(out.device)[torch.as_tensor(t, device=out.device).long()]
            a = abar.sqrt().reshape(-1, 1, 1, 1)
            out = (1 - abar).sqrt().reshape(-1, 1, 1, 1) * x.float() + a * out
        return out

    def optimize(self, *, channels_last: bool = False, compile: bool = False, mode: str | None = None,
                 backend: str = "inductor") -> "StableMultiDiffusionPipeline":
        """Fast paths, each off by default: channels-last memory for the UNet and VAE convolutions, and
        `torch.compile` of the UNet (`mode="reduce-overhead"` adds CUDA graphs, for fixed shapes such
        as the stream's). Compiling takes a while on the first call of each batch shape."""
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if compile and not self.compiled:
            self.unet = torch.compile(self.unet, mode=mode, backend=backend, dynamic=False)
        return self

    @property
    def compiled(self) -> bool:
        return hasattr(self.unet, "_orig_mod")

    def _predictor(self, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float,
                   pad: bool = False):
        """`predict(x, t, layers)` for the sampler: UNet noise with classifier-free guidance (SPEC 3.3).

        With `pad`, a batch is padded with copies of its last pair up to the next power of two (and
        the padding dropped from the result): a compiled UNet then sees a few fixed batch shapes
        (1, 2, 4, ... up to --max-batch) instead of one per remainder, and halving on out-of-memory
        still shrinks the batch.
        """

        def predict(x: torch.Tensor, t: float, layers: Sequence[int]) -> torch.Tensor:
            count, layers = len(x), list(layers)
            size = 1 << (count - 1).bit_length()
            if pad and size > count:
                x = torch.cat([x, x[-1:].expand(size - count, *x.shape[1:])])
                layers += [layers[-1]] * (size - count)
            index = torch.as_tensor(layers, device=cond.device)
            if uncond is None:
                return self.unet_eps(x, t, cond[index], guidance_scale)[:count]
            # Both halves in one batch.
            eps_u, eps_c = self.unet_eps(torch.cat([x, x]), t, torch.cat([uncond[index], cond[index]]),
                                         guidance_scale).chunk(2)
            return (eps_u + guidance_scale * (eps_c - eps_u))[:count]

        return predict

    def _crop(self, setting: bool | RegionCrop) -> RegionCrop | None:
        """`True` means the default crop at this UNet's granularity (its total downsampling)."""
        if isinstance(setting, RegionCrop) or not setting:
            return setting or None
        return RegionCrop(granularity=2 ** (len(self.unet.config.block_out_channels) - 1))

    def auto_max_batch(self, window: tuple[int, int], cfg: bool) -> int:
        """(layer, view) pairs per UNet call: from free memory on CUDA, a modest fixed number elsewhere."""
        if self.device.type != "cuda":
            return AUTO_BATCH_CPU
        free, _ = torch.cuda.mem_get_info(self.device)
        # About 64 KiB of activations per latent pixel at half precision for SD1.5's UNet.
        per_pair = window[0] * window[1] * 64 * 1024 * (torch.finfo(self.dtype).bits // 16) * (2 if cfg else 1)
        return int(max(1, min(64, 0.6 * free // per_pair)))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, circular: bool = False) -> torch.Tensor:
        """Pixels in [0, 1], [1, 3, H, W], from a clean latent.

        A circular (360 degree) latent is decoded with its other edge wrapped on each side, so
        the VAE sees the neighbourhood the seam really has; the padding is cropped afterwards.
        """
        pad = min(CIRCULAR_DECODE_PAD, latents.shape[-1]) if circular else 0
        if pad:
            latents = torch.cat([latents[..., -pad:], latents, latents[..., :pad]], dim=-1)
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        if pad:
            image = image[..., pad * self.vae_scale_factor: -pad * self.vae_scale_factor]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # -----------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str] | None = None,
        negative_prompts: str | Sequence[str] | None = "",
        *,
        background: Image.Image | None = None,
        background_prompt: str | None = None,
        background_negative_prompt: str = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        scheduler: str = "lcm",
        guidance_scale: float = 1.0,
        prompt_strengths: float | Sequence[float] | None = None,
        masks: Any = None,
        mask_type: str = "discrete",
        mask_strengths: float | Sequence[float] | None = None,
        mask_stds: float | Sequence[float] | None = None,
        cover_alpha: float = 0.3,
        bootstrap_steps: int = 1,
        bootstrap_mix_steps: float = 1.0,
        bootstrap_leak_sensitivity: float | None = 0.2,
        negative_prompt_prefix: str | None = None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        tile_size: int = DEFAULT_TILE_SIZE,
        tile_stride: int | None = None,
        tile_weighting: str = "triangular",
        circular: bool = False,
        max_batch: int | None = None,
        skip_empty: bool = True,
        region_crop: bool | RegionCrop = False,
        noises: Sequence[torch.Tensor] | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
    ):
        """Generate one image from prompts painted through masks; returns a PIL image by default.

        `masks` has one mask per prompt (values in [0, 1]); where no mask reaches, the background
        prompt is generated, or the `background` image kept (inpainting). Give `latents` and/or a
        `generator` for reproducible results. `region_crop=True` evaluates each layer only around
        its mask (faster for small regions on large canvases; close to, not equal to, the default).
        """
        # 1. Check inputs.
        if prompts is None:
            raise SmdError("give at least one prompt")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        count = len(prompts)
        if count == 0:
            raise SmdError("give at least one prompt")
        negatives = _as_list(negative_prompts, count, "negative_prompts")
        strengths = _per_layer(mask_strengths, count, 1.0, "mask_strengths")
        stds = _per_layer(mask_stds, count, 0.0, "mask_stds")
        prompt_ws = _per_layer(prompt_strengths, count, 1.0, "prompt_strengths")
        if mask_type not in ("discrete", "semi-continuous", "continuous"):
            raise SmdError(f"mask_type must be discrete, semi-continuous or continuous, got {mask_type!r}")
        raw = None if masks is None else masks_to_array(masks, count)
        if raw is not None:
            height = height or raw.shape[1]
            width = width or raw.shape[2]
        height, width = height or self.default_size, width or self.default_size
        f = self.vae_scale_factor
        if height % f or width % f:
            raise SmdError(f"canvas {width}x{height} is not divisible by the model's downscale factor {f}")
        if raw is None:
            raw = np.ones((count, height, width), np.float32)
        elif raw.shape[1:] != (height, width):
            if mask_ops.aspect_mismatch((raw.shape[2], raw.shape[1]), width, height):
                raise SmdError(f"masks are {raw.shape[2]}x{raw.shape[1]} but the canvas is {width}x{height}: "
                               "the aspect ratios differ")
            raw = np.stack([mask_ops.resize(m, height, width) for m in raw])
        if negative_prompt_prefix:
            negatives = [_prefixed(negative_prompt_prefix, n) for n in negatives]
            background_negative_prompt = _prefixed(negative_prompt_prefix, background_negative_prompt)
        schedule = self.schedule(num_inference_steps, timesteps, scheduler)
        if tile_weighting not in ("triangular", "uniform"):
            raise SmdError(f"tile_weighting must be triangular or uniform, got {tile_weighting!r}")

        # 2. Prepare masks (SPEC 2.2): the uncovered area becomes a background layer at the bottom.
        layers = self.prepare_layers(
            Layers(prompts, negatives, raw, strengths, stds, prompt_ws), schedule, cover_alpha=cover_alpha,
            mask_type=mask_type, background_image=background is not None, background_prompt=background_prompt,
            background_negative_prompt=background_negative_prompt)

        # 3. Encode prompts (SPEC 2.1), mixing toward the background prompt by prompt strength.
        do_cfg = guidance_scale > 1.0 and self.unet.config.get("time_cond_proj_dim") is None
        cond, uncond = self.prepare_text(layers, background_prompt, background_negative_prompt, do_cfg)
        step_masks, blurred = layers.step_masks, layers.blurred

        # 4. Prepare latents: initial noise, and the flat images for bootstrapping (SPEC 2.3).
        shape = (1, self.unet.config.in_channels, height // f, width // f)
        if latents is None:
            latents = randn(shape, generator, self.device, torch.float32)
        elif tuple(latents.shape) != shape:
            raise SmdError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(self.device, torch.float32) * schedule.init_scale
        bg_latent = None
        if background is not None:
            background = background.convert("RGB")
            if mask_ops.aspect_mismatch(background.size, width, height):
                warnings.warn(f"background image is {background.size[0]}x{background.size[1]}; resized to the "
                              f"{width}x{height} canvas, which changes its aspect ratio", stacklevel=2)
            if background.size != (width, height):
                background = background.resize((width, height), Image.LANCZOS)
            bg_latent = self.encode_image(background, height, width)
        white = self.white_latent(height, width) if bootstrap_steps > 0 else None

        # 5. Denoise: the shared step loop, over views for canvases larger than a tile (SPEC 5).
        window, stride = view_sizes(height, width, tile_size, tile_stride, f)
        views = layout(shape[2], shape[3], (window, window), (stride, stride), weighting=tile_weighting,
                       circular=circular, device=self.device)
        max_batch = max_batch or self.auto_max_batch((min(window, shape[2]), min(window, shape[3])), uncond is not None)
        x0 = sample(
            self._predictor(cond, uncond, guidance_scale, pad=self.compiled), latents, schedule, step_masks,
            views=views, bootstrap_steps=bootstrap_steps, bootstrap_mix_steps=bootstrap_mix_steps,
            leak_sensitivity=bootstrap_leak_sensitivity, white=white, background=bg_latent,
            generator=generator, noises=noises, callback=callback, skip_empty=skip_empty,
            crop=self._crop(region_crop),
            max_batch=max_batch,
        )
        if output_type == "latent":
            return x0

        # 6. Decode, keeping the background image exactly outside every (blurred) mask.
        image = self.pixels(x0, circular, blurred=blurred, picture=background)
        if output_type == "np":
            return image
        if output_type == "pt":
            return torch.from_numpy(image).permute(2, 0, 1)
        return self.to_image(image)

    def pixels(self, x0: torch.Tensor, circular: bool = False, *, blurred: np.ndarray | None = None,
               picture: Image.Image | None = None) -> np.ndarray:
        """[H, W, 3] floats in [0, 1]; with a picture, its pixels are kept outside every blurred mask (SPEC 3)."""
        image = self.decode(x0, circular)[0].permute(1, 2, 0).cpu().numpy()
        if picture is not None:
            keep = np.clip(blurred.sum(0), 0.0, 1.0)[..., None]
            image = image * keep + (np.asarray(picture, dtype=np.float32) / 255.0) * (1.0 - keep)
        return image

    @staticmethod
    def to_image(pixels: np.ndarray) -> Image.Image:
        return Image.fromarray((pixels * 255).round().clip(0, 255).astype(np.uint8))

    def sample(self, prompt: str, negative_prompt: str = "", **kwargs):
        """Plain single-prompt text-to-image sampling: one layer over the whole canvas."""
        return self(prompt, negative_prompt, **kwargs)

    def sample_panorama(self, prompt: str, negative_prompt: str = "", height: int = 512, width: int = 3072,
                        circular: bool = False, **kwargs):
        """A wide image from one prompt, denoised in overlapping views (SPEC 4, 5)."""
        return self(prompt, negative_prompt, height=height, width=width, circular=circular, **kwargs)

    def generate(self, scene: SceneFile, *, masks: SceneMasks | None = None, max_batch: int | None = None,
                 callback: StepCallback | None = None) -> Result:
        """Render a validated scene with its seed (random if unset); `masks` reuses an earlier `scene_masks`."""
        started = time.perf_counter()
        s = scene.scene
        width, height = mask_ops.checked_canvas(scene, self.vae_scale_factor)
        if masks is None or (masks.width, masks.height) != (width, height):
            masks = mask_ops.scene_masks(scene, width, height)
        seed = s.seed if s.seed is not None else random.randrange(2**32)
        generator = torch.Generator("cpu").manual_seed(seed)
        prepared = time.perf_counter()
        image = self(
            [layer.prompt for layer in s.layers],
            [layer.negative_prompt for layer in s.layers],
            masks=masks.masks,
            background=masks.picture,
            background_prompt=s.background.prompt,
            background_negative_prompt=s.background.negative_prompt,
            height=height, width=width,
            num_inference_steps=s.steps, timesteps=s.timesteps, scheduler=s.scheduler,
            guidance_scale=s.guidance_scale,
            prompt_strengths=[layer.prompt_strength for layer in s.layers],
            mask_type=s.mask_type,
            mask_strengths=[layer.mask_strength for layer in s.layers],
            mask_stds=[layer.mask_std for layer in s.layers],
            cover_alpha=s.cover_alpha,
            bootstrap_steps=s.bootstrap.steps,
            bootstrap_mix_steps=s.bootstrap.mix_steps,
            bootstrap_leak_sensitivity=s.bootstrap.leak_sensitivity,
            negative_prompt_prefix=s.negative_prefix,
            tile_size=s.tile_size, tile_stride=s.tile_stride, tile_weighting=s.tile_weighting,
            circular=s.circular,
            generator=generator,
            max_batch=max_batch,
            region_crop=s.region_crop,
            callback=callback,
        )
        done = time.perf_counter()
        timings = {"prepare": prepared - started, "generate": done - prepared}
        c = self.components
        record = make_record(scene, seed=seed, width=width, height=height, model=c.source, lcm_lora=c.lcm_lora,
                             vae=c.vae_source, config=c.config, device=str(self.device),
                             steps=step_count(s),
                             dtype=str(self.dtype).removeprefix("torch."), timings=timings, files=masks.files)
        return Result(image=image, seed=seed, timings=timings, record=record)


def _prefixed(prefix: str, negative: str) -> str:
    return f"{prefix}, {negative}" if negative else prefix


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale for guidance-distilled UNets (LCM, `time_cond_proj_dim`)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


__all__ = ["StableMultiDiffusionPipeline", "seed_everything", "Result", "PromptTruncatedWarning"]
