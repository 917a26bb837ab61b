"""Shared fixtures: tiny random models saved as real local model folders, and a CLI runner."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference-scenes"
SCENES = Path(__file__).resolve().parents[1] / "scenes"
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny SD-shaped model folder (VAE downscale factor 2, native 32 x 32 pixels)."""
    from tinymodel import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_lcm_model(tmp_path_factory) -> Path:
    """A tiny guidance-distilled (LCM) model: its UNet has `time_cond_proj_dim`."""
    from tinymodel import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-lcm"), lcm_distilled=True, seed=1)


@pytest.fixture(scope="session")
def tiny_model_f8(tmp_path_factory) -> Path:
    """A tiny model whose VAE downscales by 8 like SD's, for full-size canvases (768 px -> 96 latents)."""
    from tinymodel import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-f8"), vae_blocks=4, seed=2)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped model folder: a `text_time` UNet and two text encoders (VAE factor 2)."""
    from tinymodel import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny SD3-shaped model folder: an MMDiT transformer, two CLIP encoders, no T5 (VAE factor 2)."""
    from tinymodel import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny FLUX.1-dev-shaped model folder (guidance embedded; VAE factor 2)."""
    from tinymodel import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"), guidance=True)


@pytest.fixture(scope="session")
def pipe(tiny_model):
    from smd_cli import StableMultiDiffusionPipeline

    return StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model))


@pytest.fixture(scope="session")
def reference_pipe(tiny_model):
    """diffusers' own StableDiffusionPipeline on the same folder, with the LCM scheduler."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None,
                                                  requires_safety_checker=False)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture()
def scene_dir(tmp_path) -> Path:
    """A copy of tests/data (a scene with a palette and an image mask), so outputs written next to the
    scene stay in a temporary folder."""
    target = tmp_path / "scene"
    shutil.copytree(DATA, target)
    return target


@pytest.fixture()
def run_cli():
    """Invoke `smd` in-process; returns the click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from smd_cli.app.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def latents(seed: int = 1, size: int = 32, *, width: int | None = None, channels: int = 4):
    """Start latents [1, channels, size, width or size] from `seed`: 32 x 32 is a 64-pixel canvas
    with the tiny models' VAE factor 2."""
    import torch

    return torch.randn(1, channels, size, width or size, generator=torch.Generator().manual_seed(seed))


def rel_err(a, b) -> float:
    """Relative L1 error of `b` against `a` (arrays or tensors)."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).sum() / np.abs(a).sum())


# How far two float32 results of the same math may lie apart when they are not made by the same
# kernels on the same data (another batch shape, code path, thread count or CPU: AVX2 or AVX-512,
# MKL or oneDNN picking other blockings), relative to the magnitude of the values. Each sum or
# dot product of n terms then rounds in another order: up to n·u of its magnitude (u = 2^-24 ≈ 6e-8),
# about sqrt(n)·u in practice, and a model (CLIP/T5 over 77..512 tokens; a UNet or transformer and a
# VAE, a few sampling steps) chains dozens of them: 1e-7..1e-5 of the values' scale, where a real bug
# (a wrong token, weight, mask, timestep or formula) moves them by 1e-2..1. Exact equality only
# where the same kernels run on the same data in the same order.
FLOAT32_REORDERED = 1e-4


def assert_near(actual, expected, rel: float = FLOAT32_REORDERED) -> None:
    """Every element of `actual` within `rel` times the largest magnitude in `expected` (arrays
    or tensors of the same shape): a bound relative to the values' scale, as rounding errors are."""
    import torch

    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


def wide_scene(folder: Path, model: Path, settings: str) -> Path:
    """A 128 x 64 scene in 64-pixel views: a tree painted on the left 48 pixels over a lake."""
    from PIL import Image

    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (0, 0, 48, 64))
    mask.save(folder / "m.png")
    return write(folder / "s.yaml", f"model: {model}\nseed: 3\nwidth: 128\nheight: 64\ntile_size: 64\n{settings}"
                                    "background: {prompt: a lake}\nlayers:\n  - {prompt: a tree, mask: m.png}\n")


def denoiser_rows(pipe, run) -> list[int]:
    """The batch size of every denoiser call `run` makes (a UNet's `sample`, a transformer's
    `hidden_states`)."""
    sizes = []
    def count(module, args, kwargs):
        sizes.append(len(args[0] if args else kwargs["sample"] if "sample" in kwargs else kwargs["hidden_states"]))

    hook = pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return sizes


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_mask(path):
    """A published mask as the original README loads it: alpha > 0.5, as a float tensor [1, H, W]."""
    import numpy as np
    import torch
    from PIL import Image

    # The README: mask = (T.ToTensor()(Image.open(...).convert('RGBA'))[-1:] > 0.5).float()
    rgba = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float32) / 255.0
    return (torch.from_numpy(rgba[..., 3:]).permute(2, 0, 1) > 0.5).float()


def stream_frame(model, size: int, **layer):
    """A stream's first frame of one layer, "a cat" over the whole canvas, with the model's own VAE
    and the layer's further fields (`loras=`, `controlnets=`), as floats."""
    import numpy as np

    from smd_cli import StreamMultiDiffusion

    stream = StreamMultiDiffusion("cpu", hf_key=str(model), height=size, width=size, lcm_lora="none",
                                  use_tiny_vae=False)
    stream.update_single_layer(0, prompt="a cat", mask=np.ones((size, size), np.float32), **layer)
    return np.asarray(stream(), np.float32)


def family_reference(model, family: str, options: dict, pipeline: str | None = None, **components):
    """diffusers' pipeline for a tiny model (`pipeline`, default the family's own) set to the
    sampler each family's conformance tests compare, DDIM on SD 1.x and trailing Euler on SDXL,
    and smd's sampling options for the same: (reference, options)."""
    import diffusers

    name = pipeline or ("StableDiffusionPipeline" if family == "sd" else "StableDiffusionXLPipeline")
    extra = {"safety_checker": None} if family == "sd" else {}
    reference = getattr(diffusers, name).from_pretrained(str(model), **extra, **components)
    if family == "sdxl":
        reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config,
                                                                           timestep_spacing="trailing")
        options = dict(options, scheduler="euler", timestep_spacing="trailing")
    else:
        reference.scheduler = diffusers.DDIMScheduler.from_config(reference.scheduler.config)
        options = dict(options, scheduler="ddim")
    reference.set_progress_bar_config(disable=True)
    return reference, options


# --- the paint app ------------------------------------------------------------------------------


@pytest.fixture
def served(tiny_model, tmp_path):
    """`smd paint` on a blank 64 x 64 painting with the tiny model, on a free port."""
    from smd_cli.app.painting import Painting
    from smd_cli.app.web.paint import PaintSession, Server, listen
    from smd_cli.engine.pipeline import StableMultiDiffusionPipeline

    pipe = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model))
    session = PaintSession(Painting.blank(64, 64), pipe, save_dir=tmp_path / "saved", stem="painting").start()
    server = Server(session, listen("127.0.0.1", 0)).start()
    yield session, server
    server.stop()
    session.close()


def decoded(png: str) -> "np.ndarray":
    """A mask the paint app sent, as an array."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png))))


class Page:
    """A tab's connection, as the page makes it."""

    def __init__(self, ws):
        self.ws, self.state, self.masks, self.shown, self.history = ws, None, {}, None, []

    async def send(self, **message):
        await self.ws.send(json.dumps(message))

    async def until(self, condition, timeout: float = 60.0):
        async def loop():
            while not condition(self):
                message = await self.ws.recv()
                if isinstance(message, bytes):
                    self.image = message
                    continue
                m = json.loads(message)
                if m["type"] == "state":
                    self.state = m
                elif m["type"] == "mask":
                    self.masks[m["brush"]] = m["png"]
                elif m["type"] == "shown":
                    self.shown = m
                    self.history.append(m)
                elif m["type"] in ("saved", "error"):
                    self.last = m
        await asyncio.wait_for(loop(), timeout)


def as_from_a_shell() -> None:
    """`preexec_fn` for an `smd` subprocess: the signal dispositions and mask a shell gives it
    (default handlers, nothing blocked), whatever the test process itself has come to."""
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
