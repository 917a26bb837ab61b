"""SDXL as a model family: conformance with diffusers' StableDiffusionXLPipeline, the method's
invariants, placement (micro-conditioning) per view, and every command on a tiny random SDXL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import latents, rel_err, wide_scene, write
from PIL import Image

SIZE = 64  # pixels: 32 x 32 latents with the tiny VAE's factor 2
DEFAULT_TIMESTEPS = [999, 919, 759, 499, 259]



@pytest.fixture(scope="module")
def xl(tiny_sdxl):
    from smd_cli import StableMultiDiffusionPipeline

    return StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_sdxl))


@pytest.fixture(scope="module")
def reference(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return ref


def test_the_family_comes_from_the_unet_config(xl, pipe, tiny_sdxl):
    from smd_cli.models.loading import model_family

    assert xl.family.name == "sdxl" and pipe.family.name == "sd"
    assert model_family(str(tiny_sdxl)) == "sdxl"
    assert xl.components.lcm_lora is None  # `auto`: SDXL's LCM LoRA fits 2048-wide UNets, not this tiny one


@pytest.mark.parametrize("guidance, negative", [(1.0, None), (3.0, None), (3.0, "a cat")])
def test_lcm_sampling_equals_diffusers(xl, reference, guidance, negative):
    from diffusers import LCMScheduler

    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    expected = reference("a photo of the sun", negative_prompt=negative, guidance_scale=guidance, height=SIZE,
                         width=SIZE, timesteps=DEFAULT_TIMESTEPS, output_type="np", latents=latents(2),
                         generator=torch.Generator().manual_seed(5)).images[0]
    got = xl.sample("a photo of the sun", negative or "", guidance_scale=guidance, height=SIZE, width=SIZE,
                    latents=latents(2), generator=torch.Generator().manual_seed(5), output_type="np")
    assert rel_err(expected, got) < 1e-4


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_trailing_euler_sampling_equals_diffusers(xl, reference, guidance):
    from diffusers import EulerDiscreteScheduler

    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config, timestep_spacing="trailing")
    expected = reference("a photo of the sun", negative_prompt="a cat", guidance_scale=guidance, height=SIZE,
                         width=SIZE, num_inference_steps=4, output_type="np", latents=latents(3),
                         generator=torch.Generator().manual_seed(0)).images[0]
    got = xl.sample("a photo of the sun", "a cat", guidance_scale=guidance, height=SIZE, width=SIZE,
                    num_inference_steps=4, scheduler="euler", timestep_spacing="trailing", latents=latents(3),
                    generator=torch.Generator().manual_seed(0), output_type="np")
    assert xl.schedule(4, scheduler="euler", spacing="trailing").timesteps == [999, 749, 499, 249]
    assert rel_err(expected, got) < 1e-4


def test_two_layers_of_one_prompt_equal_plain_sampling(xl):
    halves = np.zeros((2, SIZE, SIZE), np.float32)
    halves[0, :, :SIZE // 2] = 1
    halves[1, :, SIZE // 2:] = 1
    plain = xl.sample("a large tree", height=SIZE, width=SIZE, latents=latents(), output_type="np",
                      generator=torch.Generator().manual_seed(0))
    layered = xl(["a large tree"] * 2, masks=halves, bootstrap_steps=0, latents=latents(), output_type="np",
                 generator=torch.Generator().manual_seed(0))
    assert rel_err(plain, layered) < 1e-4


def test_prompt_strength_mixes_the_pooled_embedding_too(xl):
    from smd_cli.engine.prepare import Layers, prepare_text

    layers = Layers(["the sun"], [""], np.ones((1, 8, 8), np.float32), [1.0], [0.0], [0.25])
    cond, _ = prepare_text(xl.encode_prompts, layers, "a lake", "", False)
    sun, lake = xl.encode_prompts(["the sun"]), xl.encode_prompts(["a lake"])
    torch.testing.assert_close(cond.pooled, lake.pooled + 0.25 * (sun.pooled - lake.pooled))
    torch.testing.assert_close(cond.states, lake.states + 0.25 * (sun.states - lake.states))


def test_an_empty_negative_prompt_is_zero_conditioning(xl):
    zero = xl.family.empty_negative()
    assert float(zero.states.abs().sum()) == 0 and float(zero.pooled.abs().sum()) == 0


def test_each_view_is_told_where_it_lies_on_the_canvas(xl):
    seen = []
    hook = xl.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].tolist()), with_kwargs=True)
    try:  # a 64 x 128 canvas in 64-pixel views, stride 48: views start at 0, 48 and 64 pixels
        xl.sample("a river", height=64, width=128, tile_size=64, num_inference_steps=1, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    rows = [row for call in seen for row in call]
    assert sorted({tuple(r) for r in rows}) == [(64, 128, 0, left, 64, 64) for left in (0, 48, 64)]


def test_inpainting_keeps_every_unmasked_pixel(xl):
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[16:40, 16:40] = 1
    out = np.asarray(xl("a red ball", masks=[mask], background=picture, generator=torch.Generator().manual_seed(0)))
    keep = np.ones((SIZE, SIZE), bool)
    keep[8:48, 8:48] = False  # the mask and the reach of its blur
    np.testing.assert_array_equal(out[keep], np.asarray(picture)[keep])


def test_a_stream_frame_equals_generate_with_the_same_noises(xl):
    from smd_cli import StreamMultiDiffusionSDXL
    from smd_cli.method.sampler import randn

    left = np.zeros((SIZE, SIZE), np.float32)
    left[:, :28] = 1
    stream = StreamMultiDiffusionSDXL(pipeline=xl, height=SIZE, width=SIZE, autoflush=False,
                                      mask_type="continuous", bootstrap_steps=2, seed=7)
    stream.update_background(prompt="a landscape")
    stream.update_single_layer(0, prompt="blue sky", mask=np.ones((SIZE, SIZE), np.float32))
    stream.update_single_layer(1, prompt="a large tree", mask=left, prompt_strength=0.8)
    steps = len(stream.schedule)
    frames = [stream.step() for _ in range(steps)]
    generator = torch.Generator("cpu").manual_seed(7)
    noises = [randn(stream.shape, generator, xl.device, torch.float32) for _ in range(steps - 1)]
    first = randn(stream.shape, generator, xl.device, torch.float32)
    expected = xl(["blue sky", "a large tree"], masks=[np.ones_like(left), left], prompt_strengths=[1, 0.8],
                  mask_type="continuous", bootstrap_steps=2, background_prompt="a landscape", height=SIZE,
                  width=SIZE, latents=first, noises=noises, output_type="latent")
    assert float((frames[-1] - expected).abs().sum() / expected.abs().sum()) < 1e-4


def test_the_original_projects_sdxl_names_insist_on_sdxl(xl, pipe, tiny_model, tiny_sdxl):
    from smd_cli import (
        ModelError,
        SmdError,
        StableMultiDiffusionPipeline,
        StableMultiDiffusionSDXLPipeline,
        StreamMultiDiffusionSDXL,
    )

    assert StableMultiDiffusionSDXLPipeline("cpu", hf_key=str(tiny_sdxl)).family.name == "sdxl"
    with pytest.raises(ModelError, match="expects an SDXL model, but .* is SD 1.x/2.x"):
        StableMultiDiffusionSDXLPipeline("cpu", hf_key=str(tiny_model))
    with pytest.raises(ModelError, match="expects an SD 1.x/2.x model"):
        StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_sdxl), sd_version="1.5")
    with pytest.raises(SmdError, match="use StreamMultiDiffusion"):
        StreamMultiDiffusionSDXL(pipeline=pipe, height=SIZE, width=SIZE)


def test_the_cli_on_an_sdxl_scene(run_cli, tiny_sdxl, tmp_path):
    scene = wide_scene(tmp_path, tiny_sdxl, "scheduler: euler\ntimestep_spacing: trailing\nsteps: 2\n")
    result = run_cli("generate", scene, "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.stderr
    image = Image.open(tmp_path / "x.png")
    assert image.size == (128, 64) and image.text["smd-family"] == "sdxl"
    shown = json.loads(run_cli("show", tmp_path / "x.png", "--json").stdout)
    assert shown["family"] == "sdxl" and "Model family: sdxl" in image.text["parameters"]
    again = run_cli("reproduce", tmp_path / "x.png", "--out", tmp_path / "y.png", "--check")
    assert again.exit_code == 0, again.stderr
    panorama = run_cli("panorama", "a river", "--model", tiny_sdxl, "--width", "128", "--height", "64",
                       "--tile-size", "64", "--circular", "--device", "cpu", "--out", tmp_path / "p.png")
    assert panorama.exit_code == 0, panorama.stderr
    painted = run_cli("inpaint", scene, "--image", tmp_path / "p.png", "--device", "cpu", "--out", tmp_path / "i.png")
    assert painted.exit_code == 0, painted.stderr
    before, after = np.asarray(Image.open(tmp_path / "p.png")), np.asarray(Image.open(tmp_path / "i.png"))
    assert (before[:, 64:] == after[:, 64:]).all() and (before[:, :40] != after[:, :40]).any()
    frames = run_cli("stream", scene, "--frames", "2", "--out", tmp_path / "frames", "--device", "cpu")
    assert frames.exit_code == 0, frames.stderr
    assert len(list((tmp_path / "frames").glob("frame-*.png"))) == 2


def test_a_lora_of_the_other_family_is_one_clean_error(tiny_model, tiny_sdxl, tmp_path):
    import os
    import subprocess
    import sys

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    sd = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None, requires_safety_checker=False)
    sd.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "sd-lora", unet_lora_layers=get_peft_model_state_dict(sd.unet))
    # A real process, so that whatever the libraries print to the terminal is seen.
    result = subprocess.run([sys.executable, "-m", "smd_cli", "generate", "--prompt", "a cat", "--model",
                             str(tiny_sdxl), "--lcm-lora", str(tmp_path / "sd-lora"), "--width", "32", "--height",
                             "32", "--device", "cpu", "--quiet", "--out", str(tmp_path / "x.png")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr  # nothing but the error
    assert "does not fit this SDXL model: its layers have other sizes" in lines[0]
    assert "latent-consistency/lcm-lora-sdxl" in lines[0]


def test_a_single_file_sdxl_checkpoint_equals_its_folder(run_cli, tiny_sdxl, tmp_path):
    from ldm import write_single_file

    from smd_cli.models.loading import model_family

    checkpoint = write_single_file(tiny_sdxl, tmp_path / "tiny-sdxl.safetensors")
    assert model_family(str(checkpoint), None) == "sdxl"  # from the original key layout, not the name
    common = ["--prompt", "a cat", "--negative-prompt", "blurry", "--width", "64", "--height", "64", "--seed", "5",
              "--steps", "2", "--device", "cpu"]
    single = run_cli("generate", *common, "--model", checkpoint, "--config", tiny_sdxl, "--out", tmp_path / "f.png")
    assert single.exit_code == 0, single.stderr
    folder = run_cli("generate", *common, "--model", tiny_sdxl, "--out", tmp_path / "d.png")
    assert folder.exit_code == 0, folder.stderr
    file_image, folder_image = Image.open(tmp_path / "f.png"), Image.open(tmp_path / "d.png")
    assert file_image.text["smd-family"] == "sdxl"
    np.testing.assert_array_equal(np.asarray(file_image), np.asarray(folder_image))
    assert np.asarray(folder_image).std() > 0  # a picture, not a blank


def test_the_tiny_autoencoder_of_sdxl_is_taesdxl(run_cli, tiny_sdxl, tmp_path, monkeypatch):
    from tinymodel import build_tiny_taesd

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--prompt", "a cat", "--model", tiny_sdxl, "--width", "64", "--height", "64", "--device", "cpu"]
    offline = run_cli("generate", *args, "--vae", "tiny", "--out", tmp_path / "x.png")
    assert offline.exit_code == 2 and "VAE 'madebyollin/taesdxl' is not a local folder" in offline.stderr
    taesdxl = build_tiny_taesd(tmp_path / "taesdxl")  # a local stand-in, decoding the same latents
    result = run_cli("generate", *args, "--vae", taesdxl, "--out", tmp_path / "t.png")
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / "t.png").size == (64, 64)


def test_the_memory_estimate_knows_sdxl(tiny_sdxl):
    from smd_cli.engine import memory

    files = [f for part in ("unet", "vae", "text_encoder", "text_encoder_2")
             for f in (tiny_sdxl / part).glob("*.safetensors")]
    sizes = dict(width=1024, height=1024, factor=8, tile_size=1024, max_batch=1, cfg=False, dtype_bytes=4)
    estimate = memory.estimate_memory(str(tiny_sdxl), **sizes)
    assert estimate.weights == sum(f.stat().st_size for f in files)  # both text encoders counted
    sd, xl = {"block_out_channels": [320]}, {"block_out_channels": [320], "addition_embed_type": "text_time"}
    per_pair = {name: memory.unet_bytes_per_pair(128 * 128, unet_config=config, dtype_bytes=2, cfg=True)
                for name, config in (("sd", sd), ("sdxl", xl))}
    assert per_pair["sdxl"] == per_pair["sd"] * 3 // 2 == 128 * 128 * 96 * 1024 * 2
    free = 40 * 1024**3  # on a 40 GiB card, fewer SDXL pairs fit in one call
    assert (memory.auto_max_batch(free, 128 * 128, unet_config=xl, dtype_bytes=2, cfg=True)
            < memory.auto_max_batch(free, 128 * 128, unet_config=sd, dtype_bytes=2, cfg=True))


# The few-step recipes of docs/families.md, with the timesteps their model cards sample at (on SDXL's scheduler
# config: 1000 training steps, `leading` spacing with offset 1 unless the recipe says otherwise).
RECIPES = [
    ("scheduler: euler\ntimestep_spacing: trailing\nsteps: 4\n", [999, 749, 499, 249]),  # SDXL-Lightning 4-step
    ("scheduler: euler\ntimestep_spacing: trailing\nsteps: 2\n", [999, 499]),  # SDXL-Lightning 2-step
    ("scheduler: ddim\ntimestep_spacing: trailing\nsteps: 8\n", [999, 874, 749, 624, 499, 374, 249, 124]),  # Hyper-SD
    ("scheduler: lcm\ntimesteps: [999, 749, 499, 249]\n", [999, 749, 499, 249]),  # DMD2 4-step
    ("scheduler: lcm\nsteps: 4\n", [999, 759, 499, 259]),  # LCM-LoRA-SDXL
]


@pytest.mark.parametrize("settings,expected", RECIPES)
def test_the_readme_recipes_sample_at_the_model_cards_timesteps(xl, tmp_path, settings, expected):
    from smd_cli.scenes.scene import load_scene

    scene = load_scene(write(tmp_path / "r.yaml", settings + "layers: [{prompt: a}]\n")).scene
    schedule = xl.schedule(scene.steps, scene.timesteps, scene.scheduler, scene.timestep_spacing)
    assert [int(t) for t in schedule.timesteps] == expected


def test_in_half_precision_the_autoencoder_that_asks_for_it_stays_in_float32(tiny_sdxl):
    from smd_cli import StableMultiDiffusionPipeline

    half = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_sdxl), dtype="float16")
    assert half.vae.config.force_upcast  # as SDXL's own VAE says; an fp16-fixed VAE says False
    assert (half.unet.dtype, half.vae.dtype) == (torch.float16, torch.float32)
    image = np.asarray(half.sample("a cat", height=SIZE, width=SIZE, num_inference_steps=2))
    assert image.std() > 0  # decoded, not NaN turned black


def test_an_inpainting_unet_is_refused_with_the_reason(run_cli, tiny_sdxl, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_sdxl, tmp_path / "sdxl-inpainting")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    result = run_cli("generate", "--prompt", "a cat", "--model", folder, "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 2
    assert "its UNet takes 9 input channels (an inpainting or other specialised UNet)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_batch_shared_by_two_processes_on_sdxl(tiny_sdxl, tmp_path):
    import os
    import subprocess
    import sys

    for name in "ab":
        write(tmp_path / f"{name}.yaml", f"seed: {ord(name)}\nwidth: 64\nheight: 64\nlayers: [{{prompt: a {name}}}]\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # the same arithmetic in every run

    def smd(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "smd_cli", "generate", "a.yaml", "b.yaml", "--model",
                               str(tiny_sdxl), "--device", "cpu", "--quiet", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr

    smd("--out", "shared/{scene}.png", "--distributed", "--processes", "2")
    smd("--out", "alone/{scene}.png")
    for name in "ab":
        shared = Image.open(tmp_path / "shared" / f"{name}.png")
        assert shared.text["smd-family"] == "sdxl"
        np.testing.assert_array_equal(np.asarray(shared), np.asarray(Image.open(tmp_path / "alone" / f"{name}.png")))


def test_a_distillation_lora_file_is_fused_as_diffusers_fuses_it(tiny_sdxl, tmp_path):
    """The Lightning recipe's path: an SDXL LoRA file in `lcm_lora`, trailing Euler, guidance 1."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from smd_cli import StableMultiDiffusionPipeline

    maker = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    torch.manual_seed(0)
    maker.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(maker.unet),
                                                weight_name="lightning_2step_lora.safetensors")
    lora = tmp_path / "lightning_2step_lora.safetensors"
    reference = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    reference.load_lora_weights(str(tmp_path), weight_name=lora.name)
    reference.fuse_lora()
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config, timestep_spacing="trailing")
    reference.set_progress_bar_config(disable=True)
    expected = reference("a photo of the sun", guidance_scale=1.0, height=SIZE, width=SIZE, num_inference_steps=2,
                         output_type="np", latents=latents(4)).images[0]
    smd = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_sdxl), lcm_lora=str(lora))
    got = smd.sample("a photo of the sun", height=SIZE, width=SIZE, num_inference_steps=2, scheduler="euler",
                     timestep_spacing="trailing", latents=latents(4), output_type="np")
    plain = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_sdxl)).sample(
        "a photo of the sun", height=SIZE, width=SIZE, num_inference_steps=2, scheduler="euler",
        timestep_spacing="trailing", latents=latents(4), output_type="np")
    assert smd.components.lcm_lora == str(lora)
    assert rel_err(expected, got) < 1e-4 and rel_err(expected, plain) > 1e-3  # the LoRA changed the picture
