"""Inpainting, panoramas (wide, circular), the tiny autoencoder and float16 VAE upcasting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REFERENCE, assert_near, load_mask, write
from PIL import Image

from smd_cli import generate
from smd_cli.method import masks as M
from smd_cli.scenes import canvas as C
from smd_cli.scenes.scene import load_scene


@pytest.fixture()
def photo(tmp_path) -> Path:
    """A 'photo' of another size but the same aspect ratio as a 64 x 64 canvas."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((100, 100, 3)) * 255).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def _inpaint_scene(tmp_path, photo, extra: str = "") -> Path:
    return write(tmp_path / "inpaint.yaml", f"""
width: 64
height: 64
seed: 2
bootstrap: {{steps: 2, leak_sensitivity: 0.1}}
background: {{prompt: "a street", image: {photo.name}}}
layers:
  - {{prompt: "a cat", mask: {{rect: [8, 8, 32, 40]}}, mask_std: 2}}
  - {{prompt: "the sun", mask: {{ellipse: [48, 16, 8, 8]}}}}
{extra}""")


def test_inpainting_keeps_the_picture_exactly_outside_every_blurred_mask(pipe, tmp_path, photo):
    sf = load_scene(_inpaint_scene(tmp_path, photo))
    out = np.asarray(generate(pipe, sf).image)
    resized = np.asarray(Image.open(photo).convert("RGB").resize((64, 64), Image.LANCZOS))
    raw = C.scene_masks(sf).masks
    blurred, _ = M.prepare(raw, cover_alpha=0.3, stds=[2, 0], strengths=[1, 1])
    outside = blurred.sum(0) == 0
    assert outside.mean() > 0.5
    assert out[outside].tobytes() == resized[outside].tobytes()
    inside = blurred.sum(0) >= 1
    assert np.abs(out[inside].astype(int) - resized[inside].astype(int)).mean() > 5  # painted over


def test_inpaint_command(run_cli, tiny_model, tmp_path, photo):
    scene = _inpaint_scene(tmp_path, photo)
    result = run_cli("inpaint", scene, "--model", tiny_model, "--device", "cpu", "--out", tmp_path / "a.png")
    assert result.exit_code == 0, result.stderr
    # --image replaces the scene's picture, resolved from the current folder.
    other = tmp_path / "other.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(other)
    result = run_cli("inpaint", scene, "--image", other, "--model", tiny_model, "--device", "cpu",
                     "--out", tmp_path / "b.png")
    assert result.exit_code == 0, result.stderr
    assert tuple(np.asarray(Image.open(tmp_path / "b.png"))[63, 63]) == (200, 10, 10)


def test_inpaint_without_a_picture_is_an_error(run_cli, tmp_path):
    scene = write(tmp_path / "s.yaml", "layers:\n  - {prompt: a, mask: {rect: [0, 0, 0.5, 0.5]}}\n")
    result = run_cli("inpaint", scene)
    assert result.exit_code == 2
    assert "inpainting needs a picture: set background.image in the scene or pass --image PATH" in result.stderr
    missing = write(tmp_path / "m.yaml", "background: {image: nope.jpg}\nlayers:\n  - {prompt: a}\n")
    result = run_cli("inpaint", missing)
    assert result.exit_code == 2 and "m.yaml:1: background.image: background file not found" in result.stderr


def test_background_of_another_aspect_ratio_is_resized_with_a_warning(run_cli, tiny_model, tmp_path):
    Image.new("RGB", (120, 60), (0, 90, 0)).save(tmp_path / "wide.png")
    scene = _inpaint_scene(tmp_path, tmp_path / "wide.png")
    result = run_cli("inpaint", scene, "--model", tiny_model, "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.stderr
    assert "warning: background image is 120x60; resized to the 64x64 canvas, which changes its aspect ratio" \
        in result.stderr


def test_canvas_size_comes_from_the_background_picture(tmp_path, photo):
    sf = load_scene(write(tmp_path / "s.yaml", f"background: {{image: {photo.name}}}\nlayers:\n  - {{prompt: a}}\n"))
    assert C.canvas_size(sf) == (100, 100)


def test_canvas_off_the_stride_grid_is_fully_covered(pipe):
    # 40 x 150 latents with 32-latent windows at stride 16: the last window is shifted back to the edge.
    x0 = pipe.sample("a cat", height=80, width=300, tile_size=64, output_type="latent",
                     generator=torch.Generator().manual_seed(0))
    assert x0.abs().amax(dim=(0, 1, 2)).min() > 0  # no column left at zero


def _column_steps(image: np.ndarray) -> tuple[float, np.ndarray]:
    img = image.astype(np.float64)
    neighbours = np.abs(img[:, 1:] - img[:, :-1]).mean(axis=(0, 2))
    return float(np.abs(img[:, 0] - img[:, -1]).mean()), neighbours


def test_circular_panorama_joins_its_edges(pipe):
    kwargs = dict(height=64, width=256, tile_size=64, generator=torch.Generator().manual_seed(4))
    image = np.asarray(pipe.sample_panorama("a photo of the sun", circular=True, **kwargs))
    seam, neighbours = _column_steps(image)
    assert seam <= neighbours.max()  # the wrap-around seam is as smooth as any neighbouring pair


def test_circular_panorama_has_no_seam_anywhere(pipe):
    """On a circle every column is alike: rolling the start latents by a view stride rolls the result
    (a stride that divides the circle, so the views are evenly spaced all the way round)."""
    latents = torch.randn(1, 4, 32, 128, generator=torch.Generator().manual_seed(3))
    kwargs = dict(height=64, width=256, tile_size=64, tile_stride=32, scheduler="ddim", num_inference_steps=4,
                  circular=True, output_type="latent")
    plain = pipe.sample_panorama("a photo of the sun", latents=latents, **kwargs)
    rolled = pipe.sample_panorama("a photo of the sun", latents=latents.roll(48, dims=-1), **kwargs)
    assert_near(rolled, plain.roll(48, dims=-1))  # the same views in another order: rounding alone
    flat = pipe.sample_panorama("a photo of the sun", latents=latents.roll(48, dims=-1),
                                **{**kwargs, "circular": False})
    assert (flat - plain.roll(48, dims=-1)).abs().max() > 1e-2  # without wrapping the edges differ


def test_panorama_command_with_a_prompt(run_cli, tiny_model, tmp_path):
    result = run_cli("panorama", "a photo of the sun", "--width", "256", "--height", "64", "--circular",
                     "--model", tiny_model, "--device", "cpu", "--seed", "1", "--set", "tile_size=64",
                     "--out", tmp_path / "{scene}-{seed}.png")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "panorama-1.png")
    assert Image.open(tmp_path / "panorama-1.png").size == (256, 64)


def test_panorama_command_with_a_scene(run_cli, tiny_model, tmp_path):
    one = write(tmp_path / "alps.yaml", "width: 192\nheight: 64\ntile_size: 64\nlayers:\n  - {prompt: a photo}\n")
    result = run_cli("panorama", one, "--model", tiny_model, "--device", "cpu", "--out", tmp_path / "p.png")
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / "p.png").size == (192, 64)
    two = write(tmp_path / "two.yaml", "layers:\n  - {prompt: a}\n  - {prompt: b}\n")
    result = run_cli("panorama", two)
    assert result.exit_code == 2 and "a panorama scene has one layer, this one has 2" in result.stderr


def test_panorama_example_from_the_original_readme(tiny_model_f8, tmp_path):
    from smd_cli import StableMultiDiffusionPipeline

    device = torch.device("cpu")

    # Load the module.
    smd = StableMultiDiffusionPipeline(device, hf_key=str(tiny_model_f8))

    # Sample a panorama image.  (The original README forgets `image =` here.)
    image = smd.sample_panorama('A photo of Alps', height=512, width=3072)
    image.save(tmp_path / 'my_panorama_creation.png')
    assert Image.open(tmp_path / 'my_panorama_creation.png').size == (3072, 512)


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference scenes not available on this machine")
def test_inpainting_example_from_the_original_readme(tiny_model_f8, tmp_path):
    from smd_cli import StableMultiDiffusionPipeline, seed_everything

    seed = 2
    device = "cpu"

    # Load the module.
    seed_everything(seed)
    device = torch.device(device)
    smd = StableMultiDiffusionPipeline(
        device,
        hf_key=str(tiny_model_f8),
        sd_version='1.5',
    )

    background_image = Image.open(REFERENCE / "timessquare" / "timessquare.jpeg").convert('RGB')

    # Load prompts and background prompts (explicitly).
    background_prompt = '1girl, 1boy, times square'
    prompts = [
        # Foreground prompts.
        '1boy, looking at viewer, brown hair, casual shirt',
        '1girl, looking at viewer, pink hair, leather jacket',
    ]
    negative_prompts = [
        '1girl',
        '1boy',
    ]
    negative_prompt_prefix = 'worst quality, bad quality, normal quality, cropped, framed'
    negative_prompts = [negative_prompt_prefix + ', ' + p for p in negative_prompts]
    background_negative_prompt = negative_prompt_prefix

    # Load masks.
    masks = []
    for i in range(1, 3):
        mask = load_mask(REFERENCE / "timessquare" / f"timessquare_{i}.png")
        masks.append(mask)
    masks = torch.stack(masks, dim=0).float()
    height, width = masks.shape[-2:]  # (768, 768) in this example.

    # Sample an image.
    image = smd(
        prompts,
        negative_prompts,
        masks=masks,
        mask_strengths=1,
        # Use larger standard deviation to harmonize the inpainting result (Recommended: 8-32)!
        mask_stds=16.0,
        height=height,
        width=width,
        bootstrap_steps=2,
        bootstrap_leak_sensitivity=0.1,
        # This is for providing the image input.
        background=background_image,
        background_prompt=background_prompt,
        background_negative_prompt=background_negative_prompt,
    )
    image.save(tmp_path / 'my_beautiful_inpainting.png')
    out = np.asarray(Image.open(tmp_path / 'my_beautiful_inpainting.png'))
    kept = np.asarray(background_image.resize((768, 768), Image.LANCZOS))
    assert out.shape == (768, 768, 3)
    assert (out[:40, :40] == kept[:40, :40]).all()  # the corner lies outside both blurred masks


def test_tiny_autoencoder(run_cli, tiny_model, tmp_path):
    from tinymodel import build_tiny_taesd

    from smd_cli import StableMultiDiffusionPipeline

    folder = build_tiny_taesd(tmp_path / "taesd")
    pipe = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model), vae=str(folder))
    assert type(pipe.vae).__name__ == "AutoencoderTiny" and pipe.vae_scale_factor == 2
    image = pipe.sample("a cat", height=64, width=64, generator=torch.Generator().manual_seed(0))
    assert image.size == (64, 64)
    result = run_cli("generate", "--prompt", "a cat", "--width", "64", "--height", "64", "--model", tiny_model,
                     "--vae", folder, "--device", "cpu", "--out", tmp_path / "t.png", "--seed", "0")
    assert result.exit_code == 0, result.stderr
    assert f"+ {folder}" in result.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "t.png")), np.asarray(image))
    result = run_cli("generate", "--prompt", "a cat", "--model", tiny_model, "--vae", tmp_path / "none",
                     "--device", "cpu", "--out", tmp_path / "u.png")
    assert result.exit_code == 2 and "VAE folder not found" in result.stderr


def test_a_replacement_autoencoder_loads_as_the_class_its_config_names(tiny_model, tmp_path, run_cli):
    from smd_cli.models.loading import load_vae

    assert type(load_vae(str(Path(tiny_model) / "vae"), dtype=torch.float32)).__name__ == "AutoencoderKL"
    result = run_cli("generate", "--prompt", "a cat", "--model", tiny_model, "--vae", Path(tiny_model) / "unet",
                     "--device", "cpu", "--out", tmp_path / "u.png")
    assert result.exit_code == 2 and "its config.json names 'UNet2DConditionModel', not an autoencoder" in result.stderr


def test_float16_keeps_a_vae_that_asks_for_upcasting_in_float32(tiny_model):
    from smd_cli import StableMultiDiffusionPipeline

    pipe = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model), dtype="float16")
    assert pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float32
    assert pipe.unet.dtype == torch.float16
    pixels = pipe.decode(torch.randn(1, 4, 8, 8) * 30)  # large latents overflow a float16 VAE
    assert torch.isfinite(pixels).all()
