"""FLUX.1 as a flow-matching family: conformance with diffusers' FluxPipeline (dev-like with the
guidance embedding, schnell-like without), the method's invariants on packed latents, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_near, latents, rel_err, wide_scene, write
from PIL import Image

SIZE = 64  # pixels: 32 x 32 latents with the tiny VAE's factor 2, 16 x 16 tokens



@pytest.fixture(scope="module")
def flux(tiny_flux):
    from smd_cli import StableMultiDiffusionPipeline

    return StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_flux))


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    from tinymodel import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-schnell"), guidance=False, seed=1)


def diffusers_flux(folder, prompt: str, seed: int, prepare=None, **options):
    from diffusers import FluxPipeline

    reference = FluxPipeline.from_pretrained(str(folder))
    reference.set_progress_bar_config(disable=True)
    if prepare is not None:
        prepare(reference)
    packed = FluxPipeline._pack_latents(latents(seed), 1, 4, SIZE // 2, SIZE // 2)
    return reference(prompt, height=SIZE, width=SIZE, latents=packed, output_type="np", **options).images[0]


@pytest.mark.parametrize("guidance, steps", [(1.0, 4), (3.5, 4), (3.5, 6)])
def test_dev_sampling_equals_diffusers(flux, tiny_flux, guidance, steps):
    expected = diffusers_flux(tiny_flux, "a photo of the sun", 2, guidance_scale=guidance, num_inference_steps=steps)
    got = flux.sample("a photo of the sun", guidance_scale=guidance, height=SIZE, width=SIZE, num_inference_steps=steps,
                      latents=latents(2), output_type="np")
    assert flux.family.name == "flux" and flux.family.guidance_distilled
    assert rel_err(expected, got) < 1e-4


def test_schnell_sampling_equals_diffusers(schnell):
    from smd_cli import StableMultiDiffusionPipeline

    expected = diffusers_flux(schnell, "a red ball", 4, num_inference_steps=4, guidance_scale=0.0)
    smd = StableMultiDiffusionPipeline("cpu", hf_key=str(schnell))
    got = smd.sample("a red ball", height=SIZE, width=SIZE, num_inference_steps=4, latents=latents(4), output_type="np")
    assert not smd.family.guidance_distilled and rel_err(expected, got) < 1e-4


def test_two_layers_of_one_prompt_equal_plain_sampling(flux):
    halves = np.zeros((2, SIZE, SIZE), np.float32)
    halves[0, :, : SIZE // 2] = 1
    halves[1, :, SIZE // 2:] = 1
    plain = flux.sample("a lake", height=SIZE, width=SIZE, num_inference_steps=4, latents=latents(3), output_type="np")
    layered = flux(["a lake", "a lake"], masks=halves, height=SIZE, width=SIZE, num_inference_steps=4,
                   bootstrap_steps=0, latents=latents(3), output_type="np")
    assert rel_err(plain, layered) < 1e-4


def test_inpainting_keeps_every_unmasked_pixel_and_a_stream_frame_is_one_call(flux):
    from smd_cli import StreamMultiDiffusion

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[16:40, 16:40] = 1
    out = np.asarray(flux("a red ball", masks=[mask], background=picture, num_inference_steps=4,
                          generator=torch.Generator().manual_seed(0)))
    keep = np.ones((SIZE, SIZE), bool)
    keep[8:48, 8:48] = False  # the mask and the reach of its blur
    np.testing.assert_array_equal(out[keep], np.asarray(picture)[keep])
    stream = StreamMultiDiffusion(pipeline=flux, height=SIZE, width=SIZE, autoflush=False, seed=7)
    stream.update_background(prompt="a landscape")
    stream.update_single_layer(0, prompt="a large tree", mask=mask)
    calls = []
    hook = flux.unet.register_forward_pre_hook(lambda m, a, k: calls.append(len(k["hidden_states"])),
                                               with_kwargs=True)
    try:
        frame = stream()
    finally:
        hook.remove()
    assert calls == [2 * len(stream.schedule)] and frame.size == (SIZE, SIZE)  # 2 prompts x 5 stages, one call


def test_the_cli_on_a_flux_scene(run_cli, tiny_flux, tmp_path):
    scene = wide_scene(tmp_path, tiny_flux, "steps: 4\nguidance_scale: 3.5\n")
    result = run_cli("generate", scene, "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / "x.png").text["smd-family"] == "flux"
    assert json.loads(run_cli("show", tmp_path / "x.png", "--json").stdout)["family"] == "flux"
    again = run_cli("reproduce", tmp_path / "x.png", "--out", tmp_path / "y.png", "--check")
    assert again.exit_code == 0, again.stderr
    panorama = run_cli("panorama", "a river", "--model", tiny_flux, "--width", "128", "--height", "64", "--steps", "3",
                       "--tile-size", "64", "--device", "cpu", "--out", tmp_path / "p.png")
    assert panorama.exit_code == 0, panorama.stderr
    odd = run_cli("generate", "--prompt", "a cat", "--model", tiny_flux, "--width", "66", "--height", "64",
                  "--device", "cpu", "--out", tmp_path / "o.png")  # 33 latent pixels: no whole 2x2 tokens
    assert odd.exit_code == 2 and "a FLUX.1 canvas is a multiple of 4 pixels on each side, got 66x64" in odd.stderr
    assert "Traceback" not in odd.stderr


def test_an_ignored_negative_prompt_is_said_once(tiny_flux):
    import warnings

    from smd_cli import StableMultiDiffusionPipeline

    dev = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_flux))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            dev.sample("a cat", "blurry", height=SIZE, width=SIZE, num_inference_steps=1, output_type="latent")
    said = [str(w.message) for w in caught if "negative prompts are ignored" in str(w.message)]
    assert len(said) == 1 and "on dev set true_cfg_scale above 1 for one" in said[0]


def test_a_two_layer_scene_is_one_transformer_call_per_step(flux):
    left = np.zeros((SIZE, SIZE), np.float32)
    left[:, :32] = 1
    sizes = []
    hook = flux.unet.register_forward_pre_hook(lambda m, a, k: sizes.append(tuple(k["hidden_states"].shape)),
                                               with_kwargs=True)
    try:
        flux(["a red ball", "a tree"], masks=[left, 1 - left], num_inference_steps=4, height=SIZE, width=SIZE,
             bootstrap_steps=0, guidance_scale=3.5, output_type="latent")
    finally:
        hook.remove()
    # 2 layers (no gap, so no background layer), one view, guidance embedded: one call of 2 rows a
    # step, each row 16 x 16 = 256 packed tokens of 4 x 2 x 2 channels.
    assert sizes == [(2, 256, 16)] * 4


def test_offload_is_suggested_when_the_weights_do_not_fit_and_refused_without_a_gpu(run_cli, tiny_flux, tmp_path):
    from smd_cli.core.errors import SceneError
    from smd_cli.engine.memory import check_memory
    from smd_cli.scenes.scene import load_scene

    sf = load_scene(write(tmp_path / "s.yaml", "width: 1024\nheight: 1024\nlayers: [{prompt: a}]\n"))
    sizes = dict(width=1024, height=1024, factor=8, device=torch.device("cuda"), dtype=torch.bfloat16,
                 free=30 * 1024**3, max_batch=1)
    with pytest.raises(SceneError, match="use --offload"):  # FLUX.1 dev's 34 GB of weights, before downloading
        check_memory(sf, "black-forest-labs/FLUX.1-dev", **sizes)
    assert "needs about" in check_memory(sf, "black-forest-labs/FLUX.1-dev", offload=True, **sizes)
    result = run_cli("generate", "--prompt", "a cat", "--model", tiny_flux, "--offload", "--device", "cpu",
                     "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "--offload moves each model to the GPU while it runs" in result.stderr


def test_a_lora_of_another_family_is_refused_not_ignored(run_cli, tiny_model, tiny_flux, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    sd = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None, requires_safety_checker=False)
    sd.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "sd-lora", unet_lora_layers=get_peft_model_state_dict(sd.unet))
    result = run_cli("generate", "--prompt", "a cat", "--model", tiny_flux, "--lcm-lora", tmp_path / "sd-lora",
                     "--width", "64", "--height", "64", "--steps", "1", "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and not (tmp_path / "x.png").exists()  # the model could not be made
    assert "has no layers of this FLUX.1 model's denoiser (a LoRA for another model family?)" in result.stderr


def test_a_stream_frame_equals_generate_with_the_same_noises(flux):
    from smd_cli import StreamMultiDiffusion
    from smd_cli.method.sampler import randn

    left = np.zeros((SIZE, SIZE), np.float32)
    left[:, :28] = 1
    stream = StreamMultiDiffusion(pipeline=flux, height=SIZE, width=SIZE, autoflush=False, mask_type="continuous",
                                  bootstrap_steps=2, seed=7)
    stream.update_background(prompt="a landscape")
    stream.update_single_layer(0, prompt="a large tree", mask=left, prompt_strength=0.8)
    steps = len(stream.schedule)
    frames = [stream.step() for _ in range(steps)]
    generator = torch.Generator("cpu").manual_seed(7)
    noises = [randn(stream.shape, generator, flux.device, torch.float32) for _ in range(steps - 1)]
    first = randn(stream.shape, generator, flux.device, torch.float32)
    expected = flux(["a large tree"], masks=[left], prompt_strengths=[0.8], mask_type="continuous", bootstrap_steps=2,
                    background_prompt="a landscape", height=SIZE, width=SIZE, latents=first, noises=noises,
                    num_inference_steps=steps, scheduler="renoise", output_type="latent")
    assert float((frames[-1] - expected).abs().sum() / expected.abs().sum()) < 1e-4


def test_true_cfg_on_dev_equals_diffusers(flux, tiny_flux):
    expected = diffusers_flux(tiny_flux, "a photo of the sun", 5, negative_prompt="a cat", true_cfg_scale=4.0,
                              guidance_scale=3.5, num_inference_steps=4)
    got = flux.sample("a photo of the sun", "a cat", true_cfg_scale=4.0, guidance_scale=3.5, height=SIZE, width=SIZE,
                      num_inference_steps=4, latents=latents(5), output_type="np")
    plain = flux.sample("a photo of the sun", guidance_scale=3.5, height=SIZE, width=SIZE, num_inference_steps=4,
                        latents=latents(5), output_type="np")
    assert rel_err(expected, got) < 1e-4 and rel_err(plain, got) > 1e-3  # the negative prompt does something


def test_a_flux_lora_equals_diffusers_and_acts_on_its_layer_alone(flux, tiny_flux, tmp_path):
    from tinymodel import write_tiny_lora

    file = write_tiny_lora(tiny_flux, tmp_path, seed=3)

    def with_lora(reference):
        reference.load_lora_weights(str(tmp_path), weight_name=file.name, adapter_name="a")
        reference.set_adapters(["a"], adapter_weights=[0.8])

    expected = diffusers_flux(tiny_flux, "a photo of the sun", 2, guidance_scale=3.5, num_inference_steps=4,
                              prepare=with_lora)
    options = dict(guidance_scale=3.5, height=SIZE, width=SIZE, num_inference_steps=4, latents=latents(2),
                   output_type="np")
    got = flux.sample("a photo of the sun", loras=[(str(file), 0.8)], **options)
    plain = flux.sample("a photo of the sun", **options)
    assert rel_err(expected, got) < 1e-4 and rel_err(expected, plain) > 1e-3
    whole = flux("a photo of the sun", masks=np.ones((1, SIZE, SIZE), np.float32), layer_loras=[[(str(file), 0.8)]],
                 bootstrap_steps=0, **options)
    assert_near(whole, got)  # the layer's path runs the same math in other calls: rounding apart, not bits


def test_a_flux_controlnet_equals_diffusers_and_acts_per_layer(tiny_flux, tmp_path):
    """InstantX's kind of FLUX.1 ControlNet: the control image's latent (taken at its mode; the
    VAE here is made a point posterior, so diffusers' sample is the same) cut per row."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from PIL import Image
    from tinymodel import write_tiny_controlnet

    from smd_cli import StableMultiDiffusionPipeline

    net = write_tiny_controlnet(tiny_flux, tmp_path / "net")
    image = Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8))
    smd = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_flux))
    with torch.no_grad():
        conv = smd.vae.quant_conv if smd.vae.quant_conv is not None else smd.vae.encoder.conv_out
        conv.weight[conv.out_channels // 2:] = 0  # log-variance -30: a standard deviation of 3e-7
        conv.bias[conv.out_channels // 2:] = -30.0
    options = dict(height=SIZE, width=SIZE, output_type="np", num_inference_steps=4, guidance_scale=3.5)
    spec = dict(model=str(net), image=image, scale=0.8, end=0.75)
    got = smd.sample("a cat", controlnets=spec, latents=latents(2), **options)
    plain = smd.sample("a cat", latents=latents(2), **options)
    reference = FluxControlNetPipeline.from_pretrained(str(tiny_flux), controlnet=FluxControlNetModel.from_pretrained(
        str(net)), vae=smd.vae)
    reference.set_progress_bar_config(disable=True)
    expected = reference("a cat", control_image=image, controlnet_conditioning_scale=0.8, control_guidance_end=0.75,
                         latents=FluxControlNetPipeline._pack_latents(latents(2), 1, 4, SIZE // 2, SIZE // 2),
                         **options).images[0]
    assert rel_err(expected, got) < 1e-4 and rel_err(expected, plain) > 1e-3
    whole = smd("a cat", masks=np.ones((1, SIZE, SIZE), np.float32), layer_controlnets=[[spec]], latents=latents(2),
                **options)
    np.testing.assert_allclose(whole, got, atol=1e-6)


@pytest.mark.parametrize("true_cfg", [None, 3.0])
def test_a_flux_reference_image_equals_diffusers_ip_adapter(tiny_flux, tmp_path, true_cfg):
    """XLabs' kind of FLUX.1 IP-Adapter; with true CFG the unconditional rows see a black picture,
    as diffusers' FluxPipeline gives them."""
    from diffusers import FluxPipeline
    from PIL import Image
    from tinymodel import write_tiny_ip_adapter

    from smd_cli import StableMultiDiffusionPipeline

    file = write_tiny_ip_adapter(tiny_flux, tmp_path / "ip")
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    options = dict(height=SIZE, width=SIZE, output_type="np", num_inference_steps=4, guidance_scale=3.5,
                   **({"true_cfg_scale": true_cfg} if true_cfg else {}))
    negative = "blurry" if true_cfg else ""
    smd = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_flux))
    plain = smd.sample("a cat", negative, latents=latents(2), **options)
    got = smd.sample("a cat", negative, reference=dict(image=image, scale=0.7, adapter=str(file)), latents=latents(2),
                     **options)
    reference = FluxPipeline.from_pretrained(str(tiny_flux))
    reference.load_ip_adapter(str(file.parent), weight_name=file.name, image_encoder_dtype=torch.float32,
                              image_encoder_pretrained_model_name_or_path=str(file.parent / "image_encoder"))
    reference.set_ip_adapter_scale(0.7)
    reference.set_progress_bar_config(disable=True)
    expected = reference("a cat", negative_prompt=negative or None, ip_adapter_image=image,
                         latents=FluxPipeline._pack_latents(latents(2), 1, 4, SIZE // 2, SIZE // 2),
                         **options).images[0]
    assert rel_err(expected, got) < 1e-4 and rel_err(expected, plain) > 1e-3
