"""SD3 as a flow-matching family: conformance with diffusers' StableDiffusion3Pipeline, the method's
invariants under flow matching, and the CLI on a tiny random SD3 (T5 left out)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import latents, rel_err, wide_scene

SIZE = 64  # pixels: 32 x 32 latents with the tiny VAE's factor 2



@pytest.fixture(scope="module")
def sd3(tiny_sd3):
    from smd_cli import StableMultiDiffusionPipeline

    return StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_sd3))


@pytest.fixture(scope="module")
def reference(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    ref = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3), text_encoder_3=None, tokenizer_3=None)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize("guidance, negative, steps", [(1.0, None, 4), (5.0, "a cat", 4), (3.0, None, 7)])
def test_plain_sampling_equals_diffusers(sd3, reference, guidance, negative, steps):
    expected = reference("a photo of the sun", negative_prompt=negative, guidance_scale=guidance, height=SIZE,
                         width=SIZE, num_inference_steps=steps, output_type="np", latents=latents(2)).images[0]
    got = sd3.sample("a photo of the sun", negative or "", guidance_scale=guidance, height=SIZE, width=SIZE,
                     num_inference_steps=steps, latents=latents(2), output_type="np")
    assert sd3.family.name == "sd3" and rel_err(expected, got) < 1e-4


def test_two_layers_of_one_prompt_equal_plain_sampling(sd3):
    halves = np.zeros((2, SIZE, SIZE), np.float32)
    halves[0, :, : SIZE // 2] = 1
    halves[1, :, SIZE // 2:] = 1
    plain = sd3.sample("a lake", height=SIZE, width=SIZE, num_inference_steps=4, latents=latents(3), output_type="np")
    layered = sd3(["a lake", "a lake"], masks=halves, height=SIZE, width=SIZE, num_inference_steps=4,
                  bootstrap_steps=0, latents=latents(3), output_type="np")
    assert rel_err(plain, layered) < 1e-4


def test_inpainting_keeps_every_unmasked_pixel(sd3):
    from PIL import Image

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[16:40, 16:40] = 1
    out = np.asarray(sd3("a red ball", masks=[mask], background=picture, num_inference_steps=4,
                         generator=torch.Generator().manual_seed(0)))
    keep = np.ones((SIZE, SIZE), bool)
    keep[8:48, 8:48] = False  # the mask and the reach of its blur
    np.testing.assert_array_equal(out[keep], np.asarray(picture)[keep])
    assert (out[20:36, 20:36] != np.asarray(picture)[20:36, 20:36]).any()


def test_the_cli_on_an_sd3_scene(run_cli, tiny_sd3, tmp_path):
    import json

    from PIL import Image

    scene = wide_scene(tmp_path, tiny_sd3, "steps: 4\nguidance_scale: 3\n")
    result = run_cli("generate", scene, "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.stderr
    image = Image.open(tmp_path / "x.png")
    assert image.size == (128, 64) and image.text["smd-family"] == "sd3"
    assert json.loads(run_cli("show", tmp_path / "x.png", "--json").stdout)["family"] == "sd3"
    again = run_cli("reproduce", tmp_path / "x.png", "--out", tmp_path / "y.png", "--check")
    assert again.exit_code == 0, again.stderr
    panorama = run_cli("panorama", "a river", "--model", tiny_sd3, "--width", "128", "--height", "64", "--steps", "3",
                       "--tile-size", "64", "--circular", "--device", "cpu", "--out", tmp_path / "p.png")
    assert panorama.exit_code == 0, panorama.stderr
    painted = run_cli("inpaint", scene, "--image", tmp_path / "p.png", "--device", "cpu", "--out", tmp_path / "i.png")
    assert painted.exit_code == 0, painted.stderr
    before, after = np.asarray(Image.open(tmp_path / "p.png")), np.asarray(Image.open(tmp_path / "i.png"))
    assert (before[:, 64:] == after[:, 64:]).all() and (before[:, :40] != after[:, :40]).any()
    ddim = run_cli("generate", scene, "--scheduler", "ddim", "--device", "cpu", "--out", tmp_path / "d.png")
    assert ddim.exit_code == 2 and "scheduler ddim does not apply to SD3, a flow-matching model" in ddim.stderr


def test_a_stream_frame_equals_generate_with_the_same_noises(sd3):
    from smd_cli import StreamMultiDiffusion
    from smd_cli.method.sampler import randn

    left = np.zeros((SIZE, SIZE), np.float32)
    left[:, :28] = 1
    stream = StreamMultiDiffusion(pipeline=sd3, height=SIZE, width=SIZE, autoflush=False, mask_type="continuous",
                                  bootstrap_steps=2, seed=7)
    stream.update_background(prompt="a landscape")
    stream.update_single_layer(0, prompt="blue sky", mask=np.ones((SIZE, SIZE), np.float32))
    stream.update_single_layer(1, prompt="a large tree", mask=left, prompt_strength=0.8)
    steps = len(stream.schedule)
    calls = []
    hook = sd3.unet.register_forward_pre_hook(lambda m, a, k: calls.append(len(k["hidden_states"])), with_kwargs=True)
    try:
        frames = [stream.step() for _ in range(steps)]
    finally:
        hook.remove()
    assert steps == 5 and len(calls) == steps  # one transformer call per frame
    generator = torch.Generator("cpu").manual_seed(7)
    noises = [randn(stream.shape, generator, sd3.device, torch.float32) for _ in range(steps - 1)]
    first = randn(stream.shape, generator, sd3.device, torch.float32)
    # The stream re-noises between stages (the flow re-noising transition), so generate does the same
    # with the same noises: the stream's stages are generate's steps, run side by side.
    expected = sd3(["blue sky", "a large tree"], masks=[np.ones_like(left), left], prompt_strengths=[1, 0.8],
                   mask_type="continuous", bootstrap_steps=2, background_prompt="a landscape", height=SIZE,
                   width=SIZE, latents=first, noises=noises, num_inference_steps=steps, scheduler="renoise",
                   output_type="latent")
    assert float((frames[-1] - expected).abs().sum() / expected.abs().sum()) < 1e-4


def test_the_family_comes_from_the_transformer_config(sd3, tiny_sd3, tiny_model):
    from smd_cli import ModelError, StableMultiDiffusionPipeline
    from smd_cli.engine import memory
    from smd_cli.models.loading import model_family

    assert model_family(str(tiny_sd3)) == "sd3" and sd3.components.lcm_lora is None  # no LCM LoRA for SD3
    assert StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_sd3), sd_version="3").family.name == "sd3"
    with pytest.raises(ModelError, match="expects an SD3 model, but .* is SD 1.x/2.x"):
        StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model), sd_version="3")
    files = [f for part in ("transformer", "vae", "text_encoder", "text_encoder_2")
             for f in (tiny_sd3 / part).glob("*.safetensors")]
    estimate = memory.estimate_memory(str(tiny_sd3), width=64, height=64, factor=2, tile_size=64, max_batch=1,
                                      cfg=False, dtype_bytes=4)
    assert estimate.weights == sum(f.stat().st_size for f in files)  # the transformer counted


def test_with_t5_sampling_equals_diffusers(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline
    from tinymodel import build_tiny_sd3

    from smd_cli import StableMultiDiffusionPipeline

    folder = build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3-t5"), t5=True)
    reference = StableDiffusion3Pipeline.from_pretrained(str(folder))
    reference.set_progress_bar_config(disable=True)
    expected = reference("a photo of the sun", negative_prompt="a cat", guidance_scale=4.0, height=SIZE, width=SIZE,
                         num_inference_steps=4, output_type="np", latents=latents(2)).images[0]
    smd = StableMultiDiffusionPipeline("cpu", hf_key=str(folder))
    assert type(smd.components.text_encoder_3).__name__ == "T5EncoderModel"
    got = smd.sample("a photo of the sun", "a cat", guidance_scale=4.0, height=SIZE, width=SIZE, num_inference_steps=4,
                     latents=latents(2), output_type="np")
    assert rel_err(expected, got) < 1e-4


def test_a_long_prompt_without_t5_is_refused(run_cli, tiny_sd3, tmp_path):
    long = " ".join(["a photo of the sun"] * 30)  # far beyond CLIP's 77 tokens
    result = run_cli("generate", "--prompt", long, "--model", tiny_sd3, "--width", "64", "--height", "64",
                     "--steps", "2", "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and "this SD3 model has no T5 (text_encoder_3) to read the rest" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_sd3_lora_equals_diffusers_with_the_same_adapter(tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from tinymodel import write_tiny_lora

    from smd_cli import StableMultiDiffusionPipeline

    file = write_tiny_lora(tiny_sd3, tmp_path, seed=4)
    reference = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3), text_encoder_3=None, tokenizer_3=None)
    reference.load_lora_weights(str(tmp_path), weight_name=file.name, adapter_name="a")
    reference.set_progress_bar_config(disable=True)
    expected = reference("a photo of the sun", guidance_scale=3.0, height=SIZE, width=SIZE, num_inference_steps=4,
                         output_type="np", latents=latents(2)).images[0]
    smd = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_sd3))
    options = dict(guidance_scale=3.0, height=SIZE, width=SIZE, num_inference_steps=4, latents=latents(2),
                   output_type="np")
    got = smd.sample("a photo of the sun", loras=str(file), **options)
    assert rel_err(expected, got) < 1e-4 and rel_err(expected, smd.sample("a photo of the sun", **options)) > 1e-4
