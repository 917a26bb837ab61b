"""Memory: what a generation needs and what the device has free.

One memory model serves both uses: refusing, before anything loads, a canvas that clearly cannot
fit (`check_memory`), and choosing how many (layer, view) pairs go through the UNet at once on a
GPU (`auto_max_batch`). Estimates come from the model's configs and file sizes; nothing is loaded.
No torch at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from smd_cli.core import defaults
from smd_cli.core.files import expand_user, is_dir, is_file
from smd_cli.families import default_grid, family_of, named, runs_unconditional
from smd_cli.method.views import vae_tiles_setting
from smd_cli.models.loading import config_json, denoiser_config, model_family

if TYPE_CHECKING:
    import torch

    from smd_cli.method.views import Tiling
    from smd_cli.scenes.scene import SceneFile

# (layer, view) pairs per UNet call where free memory cannot be asked for (the CPU, MPS).
AUTO_BATCH_CPU = 8
# At most this many pairs per call, and at most this share of the free memory for one call.
AUTO_BATCH_MAX = 64
AUTO_BATCH_SHARE = 0.6
# Each family's activation and weight figures are in its file (`Family.activation_bytes`, ...).
# Where a model's configs cannot be read (a hub model not downloaded yet), the default model's
# shapes (SD 1.5's) are assumed.
SD_UNET_CHANNELS = 320
SD_VAE_CHANNELS = 128
# The VAE decoder holds a few full-resolution tensors of twice its first block's width at once.
VAE_TENSORS_AT_FULL_SIZE = 8
# The tiny autoencoder (TAESD) decodes with 64 channels and keeps about two such tensors at full size.
TAESD_CONFIG = {"decoder_block_out_channels": [64, 64, 64, 64]}
TAESD_TENSORS_AT_FULL_SIZE = 2
# A tiled decode (docs/large-pictures.md) holds those tensors over one tile and its halo (each stage, from
# one GroupNorm to the next, sees a few pixels at its resolution: at most 2 latent pixels, 16 pixels, for
# SD's decoder, 4 for TAESD's), the latent's resolution whole (the mid-block: about four tensors of the
# last block's width at 1/factor^2 of the pixels) and the picture (three float32 channels).
VAE_TILE_HALO = 32
VAE_MID_TENSORS = 4
GIB = 1024**3


def unet_bytes_per_pair(window_pixels: int, *, unet_config: Mapping, dtype_bytes: int, cfg: bool) -> int:
    """Activations of one (layer, view) pair in a UNet call: a window of `window_pixels` latent
    pixels, twice that with an unconditional pass ({} for `unet_config` is SD 1.5's)."""
    per_pixel = (int(named(family_of(unet_config)).activation_bytes * denoiser_scale(unet_config))
                 * dtype_bytes // 2)
    return window_pixels * per_pixel * (2 if cfg else 1)


def auto_max_batch(free: int | None, window_pixels: int, *, unet_config: Mapping, dtype_bytes: int,
                   cfg: bool) -> int:
    """(layer, view) pairs per UNet call: as many as fit in a share of the free memory, where it is
    known (a GPU); a modest fixed number elsewhere."""
    if free is None:
        return AUTO_BATCH_CPU
    per_pair = unet_bytes_per_pair(window_pixels, unet_config=unet_config, dtype_bytes=dtype_bytes, cfg=cfg)
    return int(max(1, min(AUTO_BATCH_MAX, AUTO_BATCH_SHARE * free // per_pair)))


@dataclass
class MemoryEstimate:
    """Peak memory of one generation, in bytes, by part; a deliberately rough, low estimate."""

    weights: int
    unet: int
    decode: int
    vae_is_full: bool = True  # the model's own (or another full) autoencoder, not the tiny one
    regions: int = 0  # attention mode's biases (docs/method.md §10)

    @property
    def total(self) -> int:
        return self.weights + self.unet + self.decode + self.regions


def estimate_memory(model: str | None, *, width: int, height: int, factor: int | None, tile_size: int,
                    max_batch: int, cfg: bool, dtype_bytes: int, vae: str | None = None,
                    offload: bool = False, joined: int = 0, vae_tile: int | None = None) -> MemoryEstimate:
    """What generating a `width` x `height` canvas needs, from the model's configs and file sizes.

    `vae` is a replacement autoencoder (`tiny`, a folder or a hub id), whose decoder counts instead.
    `factor` is the model's VAE downscale factor, None where unknown. `joined` counts the layers
    that join one row in attention or hybrid mode, whose attention biases count too. With
    `vae_tile`, the decode is tiled (docs/large-pictures.md) and counts by the tile.
    """
    factor = factor or defaults.MODEL_VAE_FACTOR
    unet = denoiser_config(model) or {}
    vae_config = decoder_config(model, vae)
    tiny = "decoder_block_out_channels" in vae_config  # AutoencoderTiny's key; AutoencoderKL has block_out_channels
    window = min(tile_size, width) // factor * (min(tile_size, height) // factor)
    return MemoryEstimate(
        weights=_weight_bytes(model, dtype_bytes, offload),
        unet=max_batch * unet_bytes_per_pair(window, unet_config=unet, dtype_bytes=dtype_bytes, cfg=cfg),
        decode=decode_bytes(width, height, vae_config, dtype_bytes, factor, vae_tile),
        vae_is_full=not tiny,
        regions=region_bias_bytes(unet, window, joined, dtype_bytes) * (2 if cfg else 1) if joined else 0,
    )


def decode_bytes(width: int, height: int, vae_config: Mapping, dtype_bytes: int, factor: int,
                 tile: int | None = None) -> int:
    """What decoding a `width` x `height` picture holds at once: in one pass, a few tensors of the
    decoder's widest full-resolution layer over the picture; in tiles of `tile` pixels, those over
    a tile and its halo, the latent's resolution whole, and the picture."""
    tiny = "decoder_block_out_channels" in vae_config
    blocks = vae_config.get("block_out_channels") or vae_config.get("decoder_block_out_channels") or [SD_VAE_CHANNELS]
    per_pixel = blocks[0] * (TAESD_TENSORS_AT_FULL_SIZE if tiny else VAE_TENSORS_AT_FULL_SIZE) * dtype_bytes
    if not tile:
        return width * height * per_pixel
    side = lambda n: min(tile, n) + min(2 * VAE_TILE_HALO, n)  # noqa: E731
    mid = 0 if tiny else width * height // (factor * factor) * blocks[-1] * VAE_MID_TENSORS * dtype_bytes
    return side(width) * side(height) * per_pixel + mid + width * height * 3 * 4


def auto_vae_tile(free: int | None, width: int, height: int, vae_config: Mapping, dtype_bytes: int,
                  factor: int) -> int | None:
    """The VAE tile smd chooses (docs/large-pictures.md), None for one pass: tiles past
    `defaults.VAE_TILES_PIXELS` pixels, and where free memory is known (a GPU's, a CPU's RAM)
    whenever one pass's decode would take more than a share of it; `defaults.VAE_TILE` halved
    until the tiled decode fits."""
    fits = lambda tile=None: free is None or (  # noqa: E731
        decode_bytes(width, height, vae_config, dtype_bytes, factor, tile) <= AUTO_BATCH_SHARE * free)
    if width * height <= defaults.VAE_TILES_PIXELS and fits():
        return None
    tile = defaults.VAE_TILE
    while tile > 4 * defaults.VAE_TILES_MIN and not fits(tile):
        tile //= 2
    return tile


def region_bias_bytes(config: Mapping, window: int, joined: int, dtype_bytes: int) -> int:
    """The attention biases of one joined row of `joined` layers over a window of `window` latent
    pixels (`method.regions`): a UNet's cross-attention at each resolution takes positions x
    tokens (the family's most a prompt keeps, a fourth as many positions a level down); a
    joint-attention transformer (image tokens: a patch's worth of latent pixels each) takes the
    square of both."""
    family = named(family_of(config))
    prompts = joined * family.prompt_tokens
    if "num_attention_heads" in config and "block_out_channels" not in config:
        tokens = prompts + window // family.config_granularity(config) ** 2
        return tokens * tokens * dtype_bytes
    levels = len(config.get("block_out_channels") or [0, 0, 0, 0])
    return sum(window // 4**level for level in range(levels)) * prompts * dtype_bytes


def denoiser_scale(config: Mapping) -> float:
    """How wide a denoiser is against the model its family's activation figure is for: a UNet's first
    block against SD's 320 channels, a transformer's width against SD3.5 Large's or FLUX.1's."""
    if "num_attention_heads" in config and "block_out_channels" not in config:
        width = int(config["num_attention_heads"]) * int(config.get("attention_head_dim", 64))
        return width / named(family_of(config)).transformer_width
    return unet_channels(config) / SD_UNET_CHANNELS


def unet_channels(config: Mapping) -> int:
    """The UNet's first block's width, which activations scale with (SD's 320 when unknown)."""
    return (config.get("block_out_channels") or [SD_UNET_CHANNELS])[0]


def decoder_config(model: str | None, vae: str | None) -> dict:
    """The config of the autoencoder that will decode: the replacement `vae`, else the model's own."""
    if vae == "tiny":
        return TAESD_CONFIG
    found = config_json(vae, "config.json") if vae else config_json(model, "vae/config.json")
    return found or {}


def _weight_bytes(model: str | None, dtype_bytes: int, offload: bool = False) -> int:
    """The weights on the device: all of them, or with `offload` the denoiser's (the largest model,
    the one on the device while the loop runs)."""
    path = expand_user(model or defaults.MODEL)
    if is_file(path):
        return path.stat().st_size * dtype_bytes // 4  # checkpoints are mostly float32
    if not is_dir(path):
        from smd_cli.scenes.presets import family_of_preset

        family = named(model_family(model) or family_of_preset(model) or "sd")
        return int(family.weight_bytes * (family.denoiser_share if offload else 1)) * dtype_bytes // 2
    parts = {}
    for part in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        files = sorted((path / part).glob("*.safetensors")) or sorted((path / part).glob("*.bin"))
        half = [f for f in files if "fp16" in f.name]
        parts[part] = sum(f.stat().st_size * dtype_bytes // (2 if half else 4) for f in half or files)
    return max(parts.values()) if offload else sum(parts.values())


def available_memory(device: torch.device) -> int | None:
    """Free memory on `device` in bytes: GPU memory for CUDA, RAM for the CPU; None where unknown."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    return None


def check_memory(sf: SceneFile, model: str | None, *, width: int, height: int, factor: int | None,
                 device: torch.device,
                 dtype: torch.dtype, free: int | None, max_batch: int | None = None,
                 vae: str | None = None, offload: bool = False, views: Tiling | None = None) -> str:
    """Refuse, before loading anything, a canvas that clearly cannot fit on the device.

    Returns a one-line account of the estimate; raises a `SceneError` at the canvas size when the
    estimate exceeds `free`. The batch is `max_batch`, else what the automatic choice starts from.
    The views are `views` (`canvas.canvas_views`), else the model's default ones (`model_grid`).
    """
    import torch

    from smd_cli.scenes.presets import model_grid

    batch = max_batch or (1 if device.type == "cuda" else AUTO_BATCH_CPU)
    cfg = runs_unconditional(sf.scene.guidance_scale, denoiser_config(model) or {})
    if views is None:
        tile = sf.scene.tile_size or (model_grid(model) or default_grid()).tile(height, width)
    else:
        tile = views.tile
    joined = 0 if sf.scene.region_mode == "latent" else len(sf.scene.layers) + 1
    dtype_bytes = torch.finfo(dtype).bits // 8
    vae_tile = vae_tiles_setting(sf.scene.vae_tiles)
    if vae_tile is None:  # as the engine will choose (docs/large-pictures.md)
        vae_tile = auto_vae_tile(free, width, height, decoder_config(model, vae), dtype_bytes,
                                 factor or defaults.MODEL_VAE_FACTOR)
    vae_tile = None if vae_tile == "off" else vae_tile
    est = estimate_memory(model, width=width, height=height, factor=factor, tile_size=tile,
                          max_batch=batch, cfg=cfg, dtype_bytes=dtype_bytes, vae=vae,
                          offload=offload, joined=joined, vae_tile=vae_tile)
    parts = (f"weights {est.weights / GIB:.1f}, UNet batch of {batch} {est.unet / GIB:.1f}, "
             f"decoding {est.decode / GIB:.1f}" + (f" in {vae_tile}-pixel tiles" if vae_tile else "")
             + (f", attention biases {est.regions / GIB:.1f}" if joined else ""))
    account = f"{sf.name}: needs about {est.total / GIB:.1f} GiB ({parts})" + (
        f", {free / GIB:.1f} GiB free on {device}" if free is not None else "")
    if free is not None and est.total > free:
        if est.weights > est.unet + est.decode and not offload and device.type == "cuda":
            hint = "use --offload (weights wait in CPU memory and each model moves to the GPU while it runs)"
        elif est.unet > est.decode:
            hint = "lower --max-batch or tile_size"
        else:
            hint = ("use --vae tiny, whose decoder needs far less" if est.vae_is_full
                    else "the decoder alone is too large")
            hint += ("; use smaller --vae-tiles" if vae_tile else
                     "; use --vae-tiles 512 (an exact decode in tiles)")
        raise sf.error(("width",), f"a {width}x{height} canvas needs about {est.total / GIB:.1f} GiB on {device} "
                                   f"({parts} GiB) but only {free / GIB:.1f} GiB is free; {hint}, or make the "
                                   "canvas smaller")
    return account
