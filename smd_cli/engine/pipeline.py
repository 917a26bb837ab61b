"""`StableMultiDiffusionPipeline`: the model engine, with the original project's API on top.

The engine loads a model and answers what the step loop and the stream ask of it: encode prompts
(each distinct prompt once), predict noise, encode and decode pictures, make schedules. What is
particular to a model lives in its family adapter (`smd_cli.families`, one file per family); this class is the same for
every family. `run(request)` reads top to bottom: 1. check the request, 2. prepare masks,
3. encode prompts, 4. prepare latents, 5. denoise, 6. decode. `__call__`, `sample` and
`sample_panorama` are the original project's API, which turns its arguments into a `Request`.

The engine knows nothing of scene files, records or output files: `smd_cli.app.requests` turns scenes
into requests and images into results.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from smd_cli.core import defaults
from smd_cli.core.defaults import prefixed
from smd_cli.core.errors import ModelError, SmdError, one_per_prompt
from smd_cli.engine import hires as hires_pass
from smd_cli.engine.memory import auto_max_batch, auto_vae_tile, available_memory
from smd_cli.engine.prepare import (
    Layers,
    Request,
    auto_negatives,
    join_layers,
    prepare_layers,
    prepare_text,
    row_loras,
)
from smd_cli.families import FAMILIES, Conditioning, Placement, of_version, runs_unconditional
from smd_cli.method import masks as mask_ops
from smd_cli.method.hires import cut_schedule
from smd_cli.method.prompts import PromptTruncatedWarning
from smd_cli.method.sampler import RegionCrop, Schedule, StepCallback, randn, renoise, sample
from smd_cli.method.views import layout, tiling, vae_tiles_setting, work_problem, wrap_axes
from smd_cli.models import vae_tiles as tiled_vae
from smd_cli.models.controls import ControlSet, ControlSpec, as_specs
from smd_cli.models.embeddings import load_embedding
from smd_cli.models.loading import Components, load_components, make_family, resolve_device, resolve_dtype, warn_if_slow
from smd_cli.models.loras import Lora, LoraSet, as_loras
from smd_cli.models.references import ReferenceSpec, as_reference

TEXT_CACHE_SIZE = 256  # remembered prompt encodings
CIRCULAR_DECODE_PAD = 8  # latent rows or columns wrapped around each side before decoding a circular canvas
# sd_version names the family a caller expects; the model's UNet config decides (`models.family_of`).


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
    return one_per_prompt(name, [float(v) for v in value], count)


def _as_list(value: Any, count: int, name: str) -> list[str]:
    if value is None:
        return [""] * count
    if isinstance(value, str):
        return [value] * count
    value = list(value)
    if len(value) == 1 and count > 1:
        return value * count
    return one_per_prompt(name, value, count)


class StableMultiDiffusionPipeline:
    """Region-based multi-prompt text-to-image generation (StreamMultiDiffusion, docs/method.md §3).

    `StableMultiDiffusionPipeline(device, hf_key=..., sd_version='1.5')` loads a model (a hub id,
    a local diffusers folder or a .safetensors file) of SD 1.x, 2.x or XL, the family told by its
    UNet's config; `sd_version` (None: any) only checks that it is the family expected.
    `from_components` wraps loaded parts.
    """

    def __init__(self, device: Any = None, hf_key: str | None = None, sd_version: str | None = None, *,
                 dtype: Any = None, lcm_lora: str | None = "auto", config: str | None = None,
                 vae: str | None = None, use_tiny_vae: bool = False, components: Components | None = None,
                 offload: bool = False):
        expected = None if sd_version is None else of_version(str(sd_version))
        if sd_version is not None and expected is None:
            names = ", ".join(v for f in FAMILIES.values() for v in f.versions)
            raise ModelError(f"sd_version {sd_version!r} is not supported; use one of {names}")
        self.device = resolve_device(device)
        if device in (None, "auto"):
            warn_if_slow(self.device)
        self.dtype = resolve_dtype(dtype, self.device)
        if components is None:
            components = load_components(hf_key, device=self.device, dtype=self.dtype, lcm_lora=lcm_lora,
                                         config=config, vae=vae or ("tiny" if use_tiny_vae else None),
                                         offload=offload)
        self.components = components
        if expected is not None and expected.name != components.family:
            raise ModelError(f"sd_version {sd_version!r} expects an {expected.label} model, but "
                             f"{components.source} is {FAMILIES[components.family].label}; leave out sd_version "
                             "to take the model's own")
        if self.dtype == torch.float16 and components.vae.config.get("force_upcast", False):
            components.vae.to(torch.float32)  # SD's VAE overflows to NaN in float16; its config says so
        if self.device.type == "cpu":
            # Channels-last memory for the autoencoder's convolutions on a CPU: SD 1.5's VAE decoded
            # 1.07-1.1x faster, TAESD 1.2-1.4x, the same pixels up to float rounding; on an H100 in
            # float16 SD 1.5's was 1.2-1.6x slower (benchmarks/decode.py, BENCHMARKS.md).
            components.vae.to(memory_format=torch.channels_last)
        self.family = make_family(components, device=self.device, dtype=self.dtype)
        self._white: torch.Tensor | None = None
        self._text_cache: dict[str, Conditioning] = {}
        self._text_lora_set: LoraSet = ()
        self._negatives_warned = False

    @classmethod
    def from_components(cls, *, unet, vae, text_encoder, tokenizer, scheduler=None, text_encoder_2=None,
                        tokenizer_2=None, force_zeros_for_empty_prompt: bool = False, text_encoder_3=None,
                        tokenizer_3=None, device: Any = None, dtype: Any = None) -> "StableMultiDiffusionPipeline":
        """Wrap already loaded diffusers/transformers components (moved to `device`): `unet` is the
        denoiser (SD3's transformer too); SDXL's and SD3's further text encoders and tokenizers."""
        resolved = resolve_device(device if device is not None else unet.device)
        dtype = resolve_dtype(dtype if dtype is not None else unet.dtype, resolved)
        for module in (unet, vae, text_encoder, text_encoder_2, text_encoder_3):
            if module is not None:
                module.to(resolved, dtype)
        config = dict(scheduler.config) if scheduler is not None else {}
        return cls(resolved, dtype=dtype, components=Components(
            denoiser=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler_config=config,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3))

    @classmethod
    def from_pipe(cls, pipe, device: Any = None, dtype: Any = None) -> "StableMultiDiffusionPipeline":
        """Wrap a loaded diffusers `StableDiffusionPipeline`, `StableDiffusionXLPipeline` or
        `StableDiffusion3Pipeline`."""
        return cls.from_components(unet=getattr(pipe, "unet", None) or pipe.transformer, vae=pipe.vae,
                                   text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler,
                                   text_encoder_2=getattr(pipe, "text_encoder_2", None),
                                   tokenizer_2=getattr(pipe, "tokenizer_2", None),
                                   force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt")),
                                   text_encoder_3=getattr(pipe, "text_encoder_3", None),
                                   tokenizer_3=getattr(pipe, "tokenizer_3", None), device=device, dtype=dtype)

    # The model's parts, as the family holds them (the UNet may be a compiled one).
    # The denoiser: a UNet, or on SD3 and FLUX.1 a transformer (`unet` is diffusers' and the original's name).
    denoiser = property(lambda self: self.family.denoiser)
    unet = denoiser
    vae = property(lambda self: self.family.vae)
    text_encoder = property(lambda self: self.family.text_encoder)
    tokenizer = property(lambda self: self.family.tokenizer)
    text_encoder_2 = property(lambda self: getattr(self.family, "text_encoder_2", None))
    tokenizer_2 = property(lambda self: getattr(self.family, "tokenizer_2", None))
    scheduler = property(lambda self: self.family.scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return self.family.factor

    @property
    def default_size(self) -> int:
        return self.family.default_size

    # -----------------------------------------------------------------------------------------
    # What the step loop and the stream ask of the model

    def schedule(self, steps: int | None = None, timesteps: Sequence[int] | None = None,
                 scheduler: str = defaults.SCHEDULER, spacing: str | None = None,
                 window: tuple[int, int] | None = None) -> Schedule:
        """The step schedule (docs/method.md §1, 3) for `scheduler`: lcm (default 5 steps), ddim or euler (50
        steps, spaced as the model's config says or as `spacing` says); flow-matching Euler on SD3
        and FLUX, whose shift may depend on `window`, one view's size in latent pixels."""
        return self.family.schedule(scheduler, steps, timesteps, spacing, window)

    def load_loras(self, loras: Sequence[Lora], where: str = "LoRA") -> None:
        """Load LoRAs into the model as adapters, each once, without making them act; `where`
        names them in errors (a scene key)."""
        self.family.loras.load(loras, where)

    def load_embedding(self, path: str | Path, token: str | None = None) -> str:
        """Load a textual-inversion embedding file (SD 1.x, 2.x and SDXL) under `token` (default:
        the file's name, as AUTOMATIC1111 names them); prompts that say it use its vectors.
        Returns the token."""
        if not self.family.reads_embeddings:
            raise SmdError(f"embeddings are read on SD 1.x and SDXL, not {self.family.label}")
        token = token or Path(path).stem
        if self.family.embeddings.get(token) != str(path):
            load_embedding(self.family, str(path), token)
            self._text_cache.clear()  # prompts saying the token now read differently
        return token

    def with_references(self, cond: Conditioning, uncond: Conditioning | None, canvas: ReferenceSpec | None,
                        layers: Layers) -> tuple[Conditioning, Conditioning | None]:
        """Each layer's rows with its reference image (`smd_cli.models.references`), else the canvas's:
        the image's embedding on the conditional rows, zeros at the same scale on the
        unconditional ones, as diffusers' IP-Adapter pipelines give them."""
        own = layers.references or [None] * len(layers.prompts)
        if canvas is None and not any(own):
            return cond, uncond
        self._not_on_sd3("reference images")
        refs = [None if spec is None else self.family.references.add(spec)
                for spec in (mine if mine is not None else canvas for mine in own)]
        blank = [None if r is None else self.family.references.negative(r.scale) for r in refs]
        return cond.with_references(refs), uncond and uncond.with_references(blank)

    def _not_on_sd3(self, what: str) -> None:
        """ControlNets and reference images are wired for the families diffusers has them for here."""
        if not self.family.controls:
            wired = ", ".join(f.label for f in FAMILIES.values() if f.controls)
            raise SmdError(f"{what} run on {wired} here, not on {self.family.label}")

    def load_ip_adapter(self, adapter: str | None = None) -> str:
        """Load an IP-Adapter (a weights file with `image_encoder/` beside it, or
        `owner/name/sub/file.safetensors`; default: the family's) for reference images."""
        self._not_on_sd3("reference images")
        return self.family.references.load(adapter)

    def load_controlnet(self, source: str) -> None:
        """Load a ControlNet (a folder or hub id) once; one for another model family is refused."""
        self._not_on_sd3("ControlNets")
        self.family.controlnets.load(source)

    def row_controls(self, canvas: Sequence[ControlSpec], layers: Layers, width: int, height: int,
                     timesteps: Sequence[float]) -> list[ControlSet]:
        """The ControlNets acting on each layer's rows (`smd_cli.models.controls`): the canvas's, then the
        layer's own, their images brought to the canvas and their nets loaded once."""
        own = layers.controlnets or [[] for _ in layers.prompts]
        if not canvas and not any(own):
            return [() for _ in layers.prompts]
        self._not_on_sd3("ControlNets")
        nets = self.family.controlnets
        shared = tuple(nets.add(spec, width, height, timesteps) for spec in canvas)
        return [shared + tuple(nets.add(spec, width, height, timesteps) for spec in mine) for mine in own]

    def _text_loras(self, loras: LoraSet) -> None:
        """Encode prompts with these LoRAs on the text encoders; remembered encodings made under
        others are forgotten."""
        if loras != self._text_lora_set:
            self.family.loras.for_text(loras)
            self._text_cache.clear()
            self._text_lora_set = loras

    def runs_unconditional(self, guidance_scale: float) -> bool:
        """Whether guidance at this scale runs an unconditional pass on this model (docs/method.md §3.3)."""
        return runs_unconditional(guidance_scale, self.unet.config)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """The conditioning of each prompt; each distinct prompt is encoded once and remembered, so
        repeated prompts (and unchanged prompts in a stream) cost nothing (docs/method.md §2.1, 6)."""
        wanted = dict.fromkeys(prompts)
        missing = {p: i for i, p in enumerate(p for p in wanted if p not in self._text_cache)}
        encoded = self.family.encode(list(missing)) if missing else None
        rows = {p: encoded[missing[p] : missing[p] + 1] if p in missing else self._text_cache.pop(p) for p in wanted}
        for text, row in rows.items():  # used now: remembered as the newest, the oldest go first
            self._text_cache[text] = row
        while len(self._text_cache) > max(TEXT_CACHE_SIZE, len(rows)):
            self._text_cache.pop(next(iter(self._text_cache)))
        return Conditioning.cat([rows[p] for p in prompts])

    def predict(self, x: torch.Tensor, t: float | torch.Tensor, cond: Conditioning,
                guidance_scale: float = 1.0, placement: Placement | None = None) -> torch.Tensor:
        """The model's noise prediction (float32) for latents x at timestep(s) t (docs/method.md §3.3), each row
        placed on the canvas as `placement` says (default: x is the whole canvas)."""
        return self.family.predict(x, t, cond, guidance_scale, placement)

    def encode_image(self, image: Image.Image, vae_tiles: int | str | None = None) -> torch.Tensor:
        """The latent of a picture (docs/method.md §2.3), at the picture's own size; in tiles as
        `vae_tiles` says (`vae_tile`)."""
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
        tile = self.vae_tile(vae_tiles, image.width, image.height)
        run = (lambda vae, x: tiled_vae.tiled_encode(vae, x, tile)) if tile else None
        return self.family.encode_image(pixels.permute(2, 0, 1)[None], run)

    def vae_tile(self, setting: int | str | None, width: int, height: int) -> int | None:
        """The tile (pixels) the VAE decodes and encodes a `width` x `height` picture in, None for
        one pass (docs/large-pictures.md): `setting` is a tile, "off", or None for smd's choice
        (`memory.auto_vae_tile`: tiles past a pixel count and where one pass would not fit in the free memory)."""
        setting = vae_tiles_setting(setting)
        if setting == "off":
            return None
        if setting is None:
            free = available_memory(self.device)  # a GPU's free memory, a CPU's free RAM
            setting = auto_vae_tile(free, width, height, dict(self.vae.config),
                                    torch.finfo(self.vae.dtype).bits // 8, self.vae_scale_factor)
        if setting and not tiled_vae.supported(self.vae):
            warnings.warn(f"{type(self.vae).__name__} is not one smd decodes in tiles; decoding in one pass",
                          stacklevel=3)
            return None
        return setting

    def white_latent(self, height: int, width: int) -> torch.Tensor:
        """The latent of a white canvas: spatially uniform (the VAE's border effects left out), so a
        circular canvas has no edge and a large one costs one small encode."""
        if self._white is None:
            size = max(self.default_size, 8 * self.vae_scale_factor)
            tile = self.encode_image(Image.new("RGB", (size, size), (255, 255, 255)))
            centre = tile.shape[-1] // 2
            self._white = tile[..., centre : centre + 1, centre : centre + 1]
        return self._white.expand(1, -1, height // self.vae_scale_factor, width // self.vae_scale_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, circular: bool | str = False,
               vae_tiles: int | str | None = None) -> torch.Tensor:
        """Pixels in [0, 1], [1, 3, H, W], from a clean latent; in tiles as `vae_tiles` says (`vae_tile`).

        A circular latent (`circular`: x, y, both; True is x) is decoded with its other edge
        wrapped on each side of each wrapping axis, so the VAE sees the neighbourhood the seam
        really has; the padding is cropped afterwards.
        """
        f = self.vae_scale_factor
        wrap_rows, wrap_cols = wrap_axes(circular)
        pad_rows = min(CIRCULAR_DECODE_PAD, latents.shape[-2]) if wrap_rows else 0
        pad_cols = min(CIRCULAR_DECODE_PAD, latents.shape[-1]) if wrap_cols else 0
        if pad_cols:
            latents = torch.cat([latents[..., -pad_cols:], latents, latents[..., :pad_cols]], dim=-1)
        if pad_rows:
            latents = torch.cat([latents[..., -pad_rows:, :], latents, latents[..., :pad_rows, :]], dim=-2)
        tile = self.vae_tile(vae_tiles, latents.shape[-1] * f, latents.shape[-2] * f)
        image = self.family.decode(latents, (lambda vae, z: tiled_vae.tiled_decode(vae, z, tile)) if tile else None)
        image = image[..., pad_rows * f: image.shape[-2] - pad_rows * f, pad_cols * f: image.shape[-1] - pad_cols * f]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def pixels(self, x0: torch.Tensor, circular: bool | str = False, *, blurred: np.ndarray | None = None,
               picture: Image.Image | None = None, vae_tiles: int | str | None = None) -> np.ndarray:
        """[H, W, 3] floats in [0, 1]; with a picture, its pixels are kept outside every blurred mask
        (docs/method.md §3.8)."""
        image = self.decode(x0, circular, vae_tiles)[0].permute(1, 2, 0).cpu().numpy()
        if picture is not None:
            keep = np.clip(blurred.sum(0), 0.0, 1.0)[..., None]
            image = image * keep + (np.asarray(picture, dtype=np.float32) / 255.0) * (1.0 - keep)
        return image

    @staticmethod
    def to_image(pixels: np.ndarray) -> Image.Image:
        return Image.fromarray((pixels * 255).round().clip(0, 255).astype(np.uint8))

    def optimize(self, *, channels_last: bool = False, compile: bool = False, mode: str | None = None,
                 backend: str = "inductor") -> "StableMultiDiffusionPipeline":
        """Fast paths, each off by default: channels-last memory for the UNet's convolutions (the VAE's
        are on a CPU), and `torch.compile` of the UNet (`mode="reduce-overhead"` adds CUDA graphs, for
        fixed shapes such as the stream's). Compiling takes a while on the first call of each batch shape."""
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if compile and not self.compiled:
            self.family.denoiser = torch.compile(self.unet, mode=mode, backend=backend, dynamic=False)
        return self

    @property
    def compiled(self) -> bool:
        return hasattr(self.unet, "_orig_mod")

    def auto_max_batch(self, window: tuple[int, int], cfg: bool) -> int:
        """(layer, view) pairs per UNet call: from free memory on CUDA, a modest fixed number elsewhere."""
        free = available_memory(self.device) if self.device.type == "cuda" else None
        return auto_max_batch(free, window[0] * window[1], unet_config=self.unet.config,
                              dtype_bytes=torch.finfo(self.dtype).bits // 8, cfg=cfg)

    def _predictor(self, cond: Conditioning, uncond: Conditioning | None, guidance_scale: float,
                   canvas: tuple[int, int], pad: int | None = None, cfg_scale: float | None = None):
        """`predict(x, t, layers, corners)` for the sampler: the noise with classifier-free guidance
        (docs/method.md §3.3), each row placed on the latent `canvas` at its window's corner. `cfg_scale`, where
        given, weighs the unconditional pass instead of `guidance_scale`, which a guidance-distilled
        model then takes as its embedding (FLUX.1 dev's true CFG).

        With `pad` (the largest batch), a batch is padded with copies of its last pair up to the
        next power of two, or `pad` (and the padding dropped from the result): a compiled UNet then
        sees a few fixed batch shapes (1, 2, 4, ... up to --max-batch) instead of one per
        remainder, and halving on out-of-memory still shrinks the batch.
        """

        def predict(x: torch.Tensor, t: float, layers: Sequence[int],
                    corners: Sequence[tuple[int, int]]) -> torch.Tensor:
            count, layers, corners = len(x), list(layers), list(corners)
            size = min(1 << (count - 1).bit_length(), max(pad or 0, count))
            if pad and size > count:
                x = torch.cat([x, x[-1:].expand(size - count, *x.shape[1:])])
                layers += [layers[-1]] * (size - count)
                corners += [corners[-1]] * (size - count)
            index = torch.as_tensor(layers, device=cond.states.device)
            if uncond is None:
                return self.predict(x, t, cond[index], guidance_scale, Placement(canvas, corners))[:count]
            # Both halves in one batch.
            eps_u, eps_c = self.predict(torch.cat([x, x]), t, Conditioning.cat([uncond[index], cond[index]]),
                                        guidance_scale, Placement(canvas, corners + corners)).chunk(2)
            scale = guidance_scale if cfg_scale is None else cfg_scale
            return (eps_u + scale * (eps_c - eps_u))[:count]

        return predict

    def _crop(self, setting: bool | RegionCrop) -> RegionCrop | None:
        """`True` means the default crop at this UNet's granularity (its total downsampling)."""
        if isinstance(setting, RegionCrop) or not setting:
            return setting or None
        return RegionCrop(granularity=self.family.granularity)

    # -----------------------------------------------------------------------------------------
    # Generation

    def _check_negatives(self, request: Request, unconditional: bool) -> None:
        """Without an unconditional pass negative prompts do nothing: on FLUX.1, where that is the
        usual case, say so, once."""
        negatives = [*request.layers.negatives, request.background_negative_prompt]
        if self.family.name == "flux" and not unconditional and any(negatives) and not self._negatives_warned:
            self._negatives_warned = True
            warnings.warn("negative prompts are ignored: FLUX.1 runs no unconditional pass here (on dev set "
                          "true_cfg_scale above 1 for one; schnell runs one above guidance_scale 1)", stacklevel=3)

    @torch.no_grad()
    def run(self, request: Request, *, latents: torch.Tensor | None = None, generator: torch.Generator | None = None,
            noises: Sequence[torch.Tensor] | None = None, max_batch: int | None = None, skip_empty: bool = True,
            callback: StepCallback | None = None, output_type: str = "pil", allow_large: bool = False,
            start: torch.Tensor | None = None, strength: float = 1.0):
        """Make the image a request describes; returns a PIL image by default (see `__call__`).

        With `start`, a clean latent at the canvas's size, the image is denoised from it (img2img):
        `start` noised to the level of the schedule's last `strength` share of steps, which alone
        run (`smd_cli.method.hires.cut_schedule`; strength 0 gives `start` back)."""
        # 1. Check the request.
        f = self.vae_scale_factor
        request.check(f)
        height, width = request.height, request.width
        tiles = tiling(self.family.grid, width, height, tile_size=request.tile_size, tile_stride=request.tile_stride,
                       circular=request.circular)  # patches (SD3) and 2x2 tokens (FLUX) must be whole
        window, stride = tiles.window, tiles.stride
        schedule = self.schedule(request.steps, request.timesteps, request.scheduler, request.timestep_spacing,
                                 tiles.view)
        if start is not None:
            schedule = cut_schedule(schedule, strength)
        elif request.hires is not None:
            hires_pass.larger(self, request, allow_large)  # refused before the first pass, not after it
        too_much = work_problem(tiles.count, len(request.layers.prompts), len(schedule), allow_large=allow_large,
                                allow="allow_large=True")
        if too_much:
            raise SmdError(too_much)

        # 2. Prepare masks (docs/method.md §2.2): the uncovered area becomes a background layer at the bottom.
        own = len(request.layers.prompts)
        layers = prepare_layers(
            request.layers, schedule, factor=f, device=self.device, cover_alpha=request.cover_alpha,
            mask_type=request.mask_type, picture=request.picture is not None,
            background_prompt=request.background_prompt, background_negative_prompt=request.background_negative_prompt)

        # 3. Encode prompts (docs/method.md §2.1), mixing toward the background prompt by prompt strength.
        true_cfg = request.true_cfg_scale if (request.true_cfg_scale or 0) > 1 else None
        if true_cfg is not None and not self.family.guidance_distilled:
            raise SmdError("true_cfg_scale is for guidance-distilled models (FLUX.1 dev); on this model "
                           "guidance_scale above 1 runs the unconditional pass")
        if request.negative_auto:
            layers.negatives = auto_negatives(layers, own)
        self.load_loras([*request.loras, *(x for mine in layers.loras or [] for x in mine)])
        self._text_loras(tuple(request.loras))  # the canvas's LoRAs act on the text encoders too
        cond, uncond = prepare_text(self.encode_prompts, layers, request.background_prompt,
                                    request.background_negative_prompt,
                                    true_cfg is not None or self.runs_unconditional(request.guidance_scale),
                                    self.family.empty_negative())
        sets = row_loras(layers, tuple(request.loras))  # and each layer's on its own rows (smd_cli.models.loras)
        cond, uncond = cond.with_loras(sets), uncond and uncond.with_loras(sets)
        controls = self.row_controls(request.controlnets, layers, width, height, schedule.timesteps)
        cond, uncond = cond.with_controls(controls), uncond and uncond.with_controls(controls)
        cond, uncond = self.with_references(cond, uncond, request.reference, layers)
        self._check_negatives(request, uncond is not None)
        layers, cond, uncond = join_layers(layers, cond, uncond, request.region_mode, schedule.timesteps,
                                           scene_layers=own, lengths=self.family.text_lengths,
                                           background_prompt=request.background_prompt,
                                           canvas_controls=bool(request.controlnets or request.reference))
        bootstrap_steps = request.bootstrap_steps if request.region_mode == "latent" else 0

        # 4. Prepare latents: initial noise, and the flat images for bootstrapping (docs/method.md §2.3).
        shape = (1, self.family.channels, height // f, width // f)
        if latents is None:
            latents = randn(shape, generator, self.device, torch.float32)
        elif tuple(latents.shape) != shape:
            raise SmdError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(self.device, torch.float32) * schedule.init_scale
        if start is not None:  # img2img: the start noised to the first step's level, with `latents` as the noise
            latents = renoise(start.to(self.device, torch.float32), schedule.alphas[0], schedule.sigmas[0], latents)
        bg_latent = self.encode_image(request.picture, request.vae_tiles) if request.picture is not None else None
        white = self.white_latent(height, width) if bootstrap_steps > 0 else None

        # 5. Denoise: the shared step loop, over views for canvases larger than a tile (docs/method.md §5).
        views = layout(shape[2], shape[3], (window, window), (stride, stride), weighting=request.tile_weighting,
                       circular=request.circular, device=self.device)
        max_batch = max_batch or self.auto_max_batch(tiles.view, uncond is not None)
        x0 = start.to(self.device, torch.float32) if start is not None and len(schedule) == 0 else sample(
            self._predictor(cond, uncond, request.guidance_scale, shape[2:], pad=max_batch if self.compiled else None,
                            cfg_scale=true_cfg),
            latents, schedule,
            layers.step_masks, views=views, bootstrap_steps=bootstrap_steps,
            bootstrap_mix_steps=request.bootstrap_mix_steps, leak_sensitivity=request.leak_sensitivity,
            centre=request.bootstrap_centre, white=white,
            background=bg_latent, generator=generator, noises=noises, callback=callback, skip_empty=skip_empty,
            crop=self._crop(request.region_crop), max_batch=max_batch,
        )
        if request.hires is not None:  # the second pass, on the larger canvas (docs/large-pictures.md)
            h = request.hires
            first = None
            if h.upscale == "pixels" or h.controlnet is not None:
                first = self.to_image(self.pixels(x0, request.circular, blurred=layers.blurred,
                                                  picture=request.picture, vae_tiles=request.vae_tiles))
            return hires_pass.second_pass(self, request, first=x0, picture=first, generator=generator,
                                          max_batch=max_batch, skip_empty=skip_empty, callback=callback,
                                          output_type=output_type, allow_large=allow_large)
        if output_type == "latent":
            return x0

        # 6. Decode, keeping the background picture exactly outside every (blurred) mask.
        image = self.pixels(x0, request.circular, blurred=layers.blurred, picture=request.picture,
                            vae_tiles=request.vae_tiles)
        if output_type == "np":
            return image
        if output_type == "pt":
            return torch.from_numpy(image).permute(2, 0, 1)
        return self.to_image(image)

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
        scheduler: str = defaults.SCHEDULER,
        timestep_spacing: str | None = None,
        guidance_scale: float = defaults.GUIDANCE_SCALE,
        true_cfg_scale: float | None = None,
        prompt_strengths: float | Sequence[float] | None = None,
        masks: Any = None,
        mask_type: str = defaults.MASK_TYPE,
        mask_strengths: float | Sequence[float] | None = None,
        mask_stds: float | Sequence[float] | None = None,
        cover_alpha: float = defaults.COVER_ALPHA,
        bootstrap_steps: int = defaults.BOOTSTRAP_STEPS,
        bootstrap_mix_steps: float = defaults.BOOTSTRAP_MIX_STEPS,
        bootstrap_leak_sensitivity: float | None = defaults.LEAK_SENSITIVITY,
        bootstrap_centre: bool = defaults.BOOTSTRAP_CENTRE,
        negative_prompt_prefix: str | None = None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        tile_size: int | None = None,
        tile_stride: int | None = None,
        tile_weighting: str = defaults.TILE_WEIGHTING,
        circular: bool | str = False,
        max_batch: int | None = None,
        skip_empty: bool = True,
        region_crop: bool | RegionCrop = False,
        region_mode: str = defaults.REGION_MODE,
        noises: Sequence[torch.Tensor] | None = None,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        loras: Any = None,
        layer_loras: Sequence[Any] | None = None,
        controlnets: Any = None,
        layer_controlnets: Sequence[Any] | None = None,
        negative_auto: bool = False,
        reference: Any = None,
        layer_references: Sequence[Any] | None = None,
        allow_large: bool = False,
        vae_tiles: int | str | None = None,
        hires: Any = None,
    ):
        """Generate one image from prompts painted through masks; returns a PIL image by default.

        `masks` has one mask per prompt (values in [0, 1]); where no mask reaches, the background
        prompt is generated, or the `background` image kept (inpainting). Give `latents` and/or a
        `generator` for reproducible results. While bootstrapping, each layer is centred in its view
        unless `bootstrap_centre=False`. `region_crop=True` evaluates each layer only around its mask
        (faster for small regions on large canvases; close to, not equal to, the default).
        `region_mode` is latent (the paper's: rows per layer), attention (every prompt in one row per
        view, kept to its mask by the attention) or hybrid (layers with their own LoRA, ControlNet or
        reference image keep their rows; docs/method.md §10).
        `timestep_spacing` (leading, linspace, trailing) spaces ddim and euler steps other than the
        model's config says: few-step SDXL distillations want `scheduler="euler"` with `trailing`.
        `true_cfg_scale` above 1 adds an unconditional pass with the negative prompts on a
        guidance-distilled model (FLUX.1 dev), which keeps `guidance_scale` as its embedding.
        `loras` act on the whole canvas (a path or hub id, `(source, scale)`, or a list of these),
        `layer_loras` (one entry per prompt, each like `loras`) on one layer's rows only. Prompts may
        carry weights in AUTOMATIC1111's syntax, `(word:1.3)`, and run past 77 tokens.
        `controlnets` (a `ControlSpec` or mapping with `model`, `image`, `scale`, `start`, `end`, or
        a list) act on the whole canvas, `layer_controlnets` (one entry per prompt) on one layer.
        `negative_auto` adds the other layers' prompts to each layer's negative prompt (with
        guidance above 1, which runs the unconditional pass they act through). `reference` (a PIL
        image, or a mapping with `image`, `scale`, `adapter`) goes through an IP-Adapter to every
        layer without its own in `layer_references` (one entry per prompt, None for none).
        `circular` wraps the canvas: x (left and right join, a 360-degree panorama; also True), y
        (top and bottom) or both (a seamless texture). `vae_tiles` decodes (and encodes the
        `background`) in tiles of that many pixels, exactly (docs/large-pictures.md); "off" in one
        pass; None lets smd choose.
        `hires` (`dict(scale=2, strength=0.5)`, or a `Hires`: also `steps`, `controlnet`,
        `controlnet_scale`, `upscale`) adds a second pass: the image upscaled and denoised again
        from `strength` with the same layers (docs/large-pictures.md "Two passes: hires").
        `output_type` is pil, np ([H, W, 3] in [0, 1]), pt ([3, H, W]) or latent (the clean latent).
        Work past `defaults.LARGE_WORK` denoiser passes (views x prompts x steps) is refused unless
        `allow_large=True`; past `defaults.MAX_WORK`, or a canvas the model cannot take, always.
        """
        if prompts is None:
            raise SmdError("give at least one prompt")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        count = len(prompts)
        if count == 0:
            raise SmdError("give at least one prompt")
        negatives = _as_list(negative_prompts, count, "negative_prompts")
        raw = None if masks is None else mask_ops.api_masks(masks, count)
        if raw is not None:
            height, width = height or raw.shape[1], width or raw.shape[2]
        height, width = height or self.default_size, width or self.default_size
        tiling(self.family.grid, width, height, tile_size=tile_size, tile_stride=tile_stride)  # before arrays that size
        raw = np.ones((count, height, width), np.float32) if raw is None else mask_ops.fit_masks(raw, height, width)
        layers = Layers(prompts, [prefixed(negative_prompt_prefix, n) for n in negatives], raw,
                        _per_layer(mask_strengths, count, defaults.MASK_STRENGTH, "mask_strengths"),
                        _per_layer(mask_stds, count, defaults.MASK_STD, "mask_stds"),
                        _per_layer(prompt_strengths, count, defaults.PROMPT_STRENGTH, "prompt_strengths"))
        if layer_loras is not None:
            layers.loras = [as_loras(own) for own in one_per_prompt("layer_loras", list(layer_loras), count)]
        if layer_controlnets is not None:
            layers.controlnets = [as_specs(own)
                           for own in one_per_prompt("layer_controlnets", list(layer_controlnets), count)]
        if layer_references is not None:
            layers.references = [as_reference(own)
                           for own in one_per_prompt("layer_references", list(layer_references), count)]
        request = Request(
            layers, width, height, background_prompt, prefixed(negative_prompt_prefix, background_negative_prompt),
            None if background is None else mask_ops.fit_picture(background, width, height),
            steps=num_inference_steps, timesteps=timesteps, scheduler=scheduler, timestep_spacing=timestep_spacing,
            guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale, mask_type=mask_type, cover_alpha=cover_alpha,
            bootstrap_steps=bootstrap_steps, bootstrap_mix_steps=bootstrap_mix_steps,
            leak_sensitivity=bootstrap_leak_sensitivity, bootstrap_centre=bootstrap_centre, tile_size=tile_size,
            tile_stride=tile_stride, tile_weighting=tile_weighting, circular=circular, region_crop=region_crop,
            region_mode=region_mode,
            loras=as_loras(loras), controlnets=as_specs(controlnets), negative_auto=negative_auto,
            reference=as_reference(reference), vae_tiles=vae_tiles, hires=hires_pass.as_hires(hires))
        return self.run(request, latents=latents, generator=generator, noises=noises, max_batch=max_batch,
                        skip_empty=skip_empty, callback=callback, output_type=output_type, allow_large=allow_large)

    @torch.no_grad()
    def upscale(self, image: Image.Image, request: Request, *, generator: torch.Generator | None = None,
                max_batch: int | None = None, callback: StepCallback | None = None, output_type: str = "pil",
                allow_large: bool = False):
        """The hires pass of `request` (`request.hires`) over an existing image, made at the
        request's size: what `smd upscale` runs (docs/large-pictures.md "Two passes: hires")."""
        if request.hires is None:
            raise SmdError("upscale needs the request's hires settings (scale, strength)")
        request.check(self.vae_scale_factor)
        return hires_pass.second_pass(self, request, picture=image.convert("RGB"), generator=generator,
                                      max_batch=max_batch, callback=callback, output_type=output_type,
                                      allow_large=allow_large)

    def sample(self, prompt: str, negative_prompt: str = "", **kwargs):
        """Plain single-prompt text-to-image sampling: one layer over the whole canvas."""
        return self(prompt, negative_prompt, **kwargs)

    def sample_panorama(self, prompt: str, negative_prompt: str = "", height: int = defaults.PANORAMA_HEIGHT,
                        width: int = defaults.PANORAMA_WIDTH, circular: bool | str = False, **kwargs):
        """A wide image from one prompt, denoised in overlapping views (docs/method.md §4, 5)."""
        return self(prompt, negative_prompt, height=height, width=width, circular=circular, **kwargs)


__all__ = ["StableMultiDiffusionPipeline", "seed_everything", "PromptTruncatedWarning"]


class StableMultiDiffusionSDXLPipeline(StableMultiDiffusionPipeline):
    """`StableMultiDiffusionPipeline` for SDXL models, under the original project's name: the same
    engine, loading refuses a model that is not SDXL (`sd_version='xl'`)."""

    def __init__(self, device: Any = None, hf_key: str | None = None, sd_version: str | None = "xl", **kwargs):
        super().__init__(device, hf_key, sd_version, **kwargs)
