"""ControlNets over the whole canvas and over one layer (`smd_cli.models.controls`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import family_reference, latents, rel_err, stream_frame, write
from PIL import Image
from tinymodel import write_tiny_controlnet

SIZE = 64
KW = dict(height=SIZE, width=SIZE, output_type="np", scheduler="ddim", num_inference_steps=4, guidance_scale=1.0,
          bootstrap_steps=0)


def control_image(size: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def net(tiny_model, tmp_path_factory):
    return write_tiny_controlnet(tiny_model, tmp_path_factory.mktemp("controlnet"))


@pytest.fixture(scope="module")
def sd(tiny_model):
    from smd_cli import StableMultiDiffusionPipeline

    return StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model), lcm_lora="none")


@pytest.mark.parametrize("family, guidance", [("sd", 1.0), ("sd", 3.0), ("sdxl", 1.0)])
def test_a_canvas_controlnet_equals_diffusers_controlnet_pipeline(family, guidance, tiny_model, tiny_sdxl, tmp_path):
    import diffusers

    from smd_cli import StableMultiDiffusionPipeline

    model = tiny_model if family == "sd" else tiny_sdxl
    folder = write_tiny_controlnet(model, tmp_path / "net")
    reference, sampler = family_reference(
        model, family, dict(KW, guidance_scale=guidance),
        "StableDiffusionControlNetPipeline" if family == "sd" else "StableDiffusionXLControlNetPipeline",
        controlnet=diffusers.ControlNetModel.from_pretrained(str(folder)))
    expected = reference("a photo of the sun", image=control_image(), height=SIZE, width=SIZE, num_inference_steps=4,
                         guidance_scale=guidance, negative_prompt="blurry" if guidance > 1 else None,
                         controlnet_conditioning_scale=0.8, control_guidance_start=0.0, control_guidance_end=0.75,
                         latents=latents(), output_type="np").images[0]
    smd = StableMultiDiffusionPipeline("cpu", hf_key=str(model), lcm_lora="none")
    spec = dict(model=str(folder), image=control_image(), scale=0.8, end=0.75)
    got = smd.sample("a photo of the sun", "blurry" if guidance > 1 else "", controlnets=spec, latents=latents(),
                     **sampler)
    plain = smd.sample("a photo of the sun", "blurry" if guidance > 1 else "", latents=latents(), **sampler)
    assert rel_err(expected, got) < 1e-4
    assert rel_err(expected, plain) > 1e-3


def test_a_layer_controlnet_over_the_canvas_equals_a_canvas_controlnet(sd, net):
    spec = dict(model=str(net), image=control_image(), scale=0.9)
    whole = sd("a cat", masks=np.ones((1, SIZE, SIZE), np.float32), layer_controlnets=[[spec]], latents=latents(), **KW)
    np.testing.assert_array_equal(whole, sd("a cat", controlnets=[spec], latents=latents(), **KW))


def test_a_layer_controlnet_adds_residuals_to_its_rows_only(sd, net):
    """One UNet call per step still serves both layers; the ControlNet runs on the layer's rows only
    and the other rows get no residual (their UNet output is the base model's on the same input)."""
    halves = np.zeros((2, SIZE, SIZE), np.float32)
    halves[0, :, : SIZE // 2] = 1
    halves[1, :, SIZE // 2:] = 1
    unet_calls, net_rows = [], []
    hooks = [sd.unet.register_forward_hook(
                 lambda m, args, kwargs, out: unet_calls.append((args[0].clone(), args[1], kwargs)), with_kwargs=True)]
    sd(["a cat", "a lake"], masks=halves, latents=latents(), layer_controlnets=[[], [dict(model=str(net),
                                                                                              image=control_image())]],
       **KW)
    controlnet = sd.family.controlnets.models[str(net)]
    hooks.append(controlnet.register_forward_hook(lambda m, args, out: net_rows.append(len(args[0]))))
    unet_calls.clear()
    sd(["a cat", "a lake"], masks=halves, latents=latents(), layer_controlnets=[[], [dict(model=str(net),
                                                                                              image=control_image())]],
       **KW)
    for hook in hooks:
        hook.remove()
    assert len(unet_calls) == 4 and net_rows == [1] * 4  # one call of both rows; the net on one row
    for _, _, kwargs in unet_calls:
        down = kwargs["down_block_additional_residuals"]
        cat_row = int(torch.equal(kwargs["encoder_hidden_states"][1], sd.encode_prompts(["a cat"]).states[0]))
        assert all(float(r[cat_row].abs().max()) == 0 for r in down) and float(down[0][1 - cat_row].abs().max()) > 0


def test_a_control_image_of_another_shape_is_refused(sd, net):
    from smd_cli.core.errors import SmdError

    with pytest.raises(SmdError, match="control image is 48x24 but the canvas is 64x64: the aspect ratios differ"):
        sd.sample("a cat", controlnets=dict(model=str(net), image=control_image().resize((48, 24))), **KW)


def test_a_scene_with_controlnets_runs_from_the_cli_and_records_its_image(run_cli, tiny_model, net, tmp_path):
    from smd_cli.app.records import read_record

    control_image().save(tmp_path / "pose.png")
    control_image(seed=1).save(tmp_path / "depth.png")
    scene = write(tmp_path / "s.yaml", f"""seed: 3
width: {SIZE}
height: {SIZE}
controlnet:
  - {{model: {net}, image: pose.png, scale: 0.7, end: 0.6}}
layers:
  - prompt: a girl
    mask: {{rect: [0, 0, 0.5, 1]}}
    controlnet: [{{model: {net}, image: depth.png}}]
  - prompt: a lake
    mask: {{rect: [0.5, 0, 1, 1]}}
""")
    out = tmp_path / "x.png"
    result = run_cli("generate", scene, "--model", tiny_model, "--lcm-lora", "none", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    record = read_record(out)
    assert record.scene["layers"][0]["controlnet"][0]["image"] == str(tmp_path / "depth.png")
    assert record.scene["controlnet"][0]["sha256"] == record.files[str(tmp_path / "pose.png")]
    again = tmp_path / "again.png"
    assert run_cli("reproduce", out, "--out", again).exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    plain = tmp_path / "plain.png"
    write(scene, scene.read_text().replace("    controlnet: [", "    #"))
    assert run_cli("generate", scene, "--model", tiny_model, "--lcm-lora", "none", "--device", "cpu",
                   "--out", plain).exit_code == 0
    assert np.abs(np.asarray(Image.open(out), np.float32) - np.asarray(Image.open(plain), np.float32)).mean() > 0.1


@pytest.mark.parametrize("text, message, where", [
    ("controlnet: [{model: ./nets/none, image: pose.png}]\n", "ControlNet folder not found", "1: controlnet[0].model"),
    ("controlnet: [{model: lllyasviel/none, image: pose.png}]\n", "download it once on a machine with network access "
     "(`hf download lllyasviel/none --include config.json diffusion_pytorch_model.safetensors`), or pass a local one",
     "1: controlnet[0].model"),
    ("controlnet: [{model: ., image: missing.png}]\n", "control image file not found", "1: controlnet[0].image"),
    ("controlnet: [{model: ., image: wide.png}]\n", "control image is 64x16 but the canvas is 64x64",
     "1: controlnet[0].image"),
    ("controlnet: [{model: ., image: pose.png, start: 0.8, end: 0.5}]\n", "start 0.8 must be before end 0.5",
     "1: controlnet[0]"),
])
def test_controlnet_mistakes_are_one_located_line_before_the_model_loads(run_cli, tmp_path, text, message, where):
    control_image(64).save(tmp_path / "pose.png")
    control_image(64).resize((64, 16)).save(tmp_path / "wide.png")
    scene = write(tmp_path / "s.yaml", text + "width: 64\nheight: 64\nlayers:\n  - {prompt: a cat}\n")
    result = run_cli("validate", scene)
    assert result.exit_code == 2 and message in result.output and f"s.yaml:{where}" in result.output, result.output


def test_a_controlnet_of_another_family_is_an_error_at_its_key(run_cli, tiny_model, tiny_sdxl, tmp_path):
    folder = write_tiny_controlnet(tiny_sdxl, tmp_path / "xl-net")
    control_image(64).save(tmp_path / "pose.png")
    scene = write(tmp_path / "s.yaml", f"width: {SIZE}\nheight: {SIZE}\nlayers:\n  - prompt: a cat\n"
                                       f"    controlnet: [{{model: {folder}, image: pose.png}}]\n")
    result = run_cli("generate", scene, "--model", tiny_model, "--lcm-lora", "none", "--device", "cpu",
                     "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and not (tmp_path / "x.png").exists()
    assert "s.yaml:5: layers[0].controlnet[0].model" in result.output and "for another model family" in result.output


def test_a_stream_layer_takes_its_own_controlnet(tiny_model, net):
    with_net = stream_frame(tiny_model, SIZE, controlnets=[dict(model=str(net), image=control_image())])
    assert np.abs(with_net - stream_frame(tiny_model, SIZE, controlnets=[])).mean() > 0.1
