"""docs/method.md §7 in code: every default and every set of choices, in one place, and the one rule
for the negative prefix.

Scenes (pydantic), the Python API, the stream and the CLI all take their defaults from here, so a
default cannot differ between the ways in. No imports: `smd validate` reads this too.
"""

from __future__ import annotations

# Models.
MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MODEL_VAE_FACTOR = 8  # the default model's VAE downscale factor, known before the model is downloaded
# Each family's facts (native size, tiny VAE, LCM LoRA, IP-Adapter, ...) are in its file, smd_cli/families.

# Schedules (docs/method.md §1): LCM's default 5 steps are these indices of its 50-step grid.
SCHEDULERS = ("lcm", "ddim", "euler", "renoise")  # renoise: flow-matching models only
SCHEDULER = "lcm"
LCM_ORIGINAL_STEPS = 50
LCM_INDICES = (0, 4, 12, 25, 37)
STEPS = {"lcm": len(LCM_INDICES), "ddim": 50, "euler": 50, "flow": 28}  # flow: SD3's default
MAX_STEPS = 1000  # a model's training timesteps: no schedule takes more
# How ddim and euler spread their steps (diffusers' `timestep_spacing`; default: the model's own).
# Few-step SDXL distillations (Lightning, Hyper-SD, DMD2) were trained on `trailing`.
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")

# Guidance and prompts.
GUIDANCE_SCALE = 1.0
MAX_GUIDANCE_SCALE = 100.0
NEGATIVE_PREFIX = "worst quality, bad quality, normal quality, cropped, framed"  # the examples' prefix

# Masks (docs/method.md §2.2).
MASK_TYPES = ("discrete", "semi-continuous", "continuous")
MASK_TYPE = "discrete"
STREAM_MASK_TYPE = "continuous"
MASK_STRENGTH = 1.0
MASK_STD = 0.0
PROMPT_STRENGTH = 1.0
COVER_ALPHA = 0.3

# Bootstrapping (docs/method.md §3.2, 3.5).
BOOTSTRAP_STEPS = 1
BOOTSTRAP_MIX_STEPS = 1.0
LEAK_SENSITIVITY = 0.2
BOOTSTRAP_CENTRE = True  # the reference's choice: SD models draw objects best near the middle

# Region modes (docs/method.md §10): latent (the paper's: rows per layer, clean estimates averaged
# under the masks), attention (every layer's prompt in one row, kept to its mask by the attention),
# hybrid (layers with their own LoRA, ControlNet or reference keep their rows, the rest join).
REGION_MODES = ("latent", "attention", "hybrid")
REGION_MODE = "latent"

# Hires (docs/large-pictures.md "Two passes: hires"): the first image upscaled, then denoised again
# from this strength; upscaled in pixels (Lanczos, through the VAE) or in latents (bilinear).
HIRES_STRENGTH = 0.5
HIRES_UPSCALES = ("pixels", "latents")
HIRES_UPSCALE = "pixels"

# Canvas and views (docs/method.md §5).
SIZE = 512  # pixels, when neither the scene nor a mask image gives one
MIN_SIZE, MAX_SIZE = 8, 16384  # pixels, either side
# Views step by 3/4 of their size unless the scene sets tile_stride: a quarter of each view overlaps
# the next, 27% fewer denoiser rows than docs/method.md §5's half (benchmarks/views.py measured it fastest at
# the native tile on every family); seams stay as clean with triangular weights (tests/test_views.py).
TILE_STRIDE = (3, 4)
# Work: views x layers x steps, the denoiser passes of one image (or of one stream frame). Past
# LARGE_WORK (hours on a CPU, many minutes on a GPU) a plan needs --allow-large; past MAX_WORK
# (about a day on a fast GPU), or past MAX_VIEWS views per layer and step (whose weights alone fill
# memory), smd refuses even with it.
LARGE_WORK = 100_000
MAX_WORK = 10_000_000
MAX_VIEWS = 16_384
TILE_WEIGHTINGS = ("triangular", "uniform")
TILE_WEIGHTING = "triangular"
PANORAMA_WIDTH, PANORAMA_HEIGHT = 3072, 512  # the original project's panorama example
# Wrapping canvases (`circular`): x joins left and right (a 360-degree panorama), y top and bottom,
# both (a seamless texture); a scene's `true` is x and `false` none, as they meant before y existed.
CIRCULAR_AXES = ("x", "y", "both")

# Large pictures (docs/large-pictures.md): the VAE decodes and encodes in tiles of `vae_tiles` pixels,
# exactly, at a little more than one pass's time. Unless a scene says, tiles are used past
# VAE_TILES_PIXELS pixels (a one-pass decode of SD's VAE holds about 4 KiB a pixel: 16 GiB at this
# size) and wherever the memory estimate says one pass does not fit in the free memory (a GPU's, a
# CPU's RAM), in tiles of VAE_TILE pixels, halved until they fit.
# A tile is a multiple of VAE_TILES_MULTIPLE pixels, at least VAE_TILES_MIN.
VAE_TILES_PIXELS = 2048 * 2048
VAE_TILE = 1024
VAE_TILES_MIN, VAE_TILES_MULTIPLE = 32, 8

# Seeds: any below SEED_LIMIT (torch's generator takes 64 bits, signed); drawn ones below RANDOM_SEEDS.
SEED_LIMIT = 2**63
RANDOM_SEEDS = 2**32

# Streaming (docs/method.md §6).
STREAM_CFG_TYPES = ("none", "full", "self", "initialize")
STREAM_CFG_TYPE = "none"
STREAM_GUIDANCE_SCALE = 1.2
STREAM_DELTA = 1.0
STREAM_SEED = 2024  # the original project's examples' seed
STREAM_SIZE = 512
STREAM_FPS = 8.0  # frames per second of a stream's GIF or MP4


def prefixed(prefix: str | None, negative: str) -> str:
    """A negative prompt with the negative prefix in front (docs/method.md §2.1)."""
    if not prefix:
        return negative
    return f"{prefix}, {negative}" if negative else prefix


# LoRA scales a scene may ask for: beyond a few, a LoRA's change swamps the model.
MAX_LORA_SCALE = 10.0
# ControlNet scales a scene may ask for (diffusers' controlnet_conditioning_scale; 1 is the usual).
MAX_CONTROL_SCALE = 10.0


def tile_stride(tile_size: int) -> int:
    """The distance between views unless the scene sets `tile_stride`, in pixels: 3/4 of the tile."""
    numerator, denominator = TILE_STRIDE
    return tile_size * numerator // denominator
