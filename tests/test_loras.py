"""LoRAs over the whole canvas and over one layer (`smd_cli.models.loras`), from the Python API, the CLI and streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import family_reference, latents, rel_err, stream_frame, write
from tinymodel import write_tiny_lora

from smd_cli.models.loras import as_loras

SIZE = 64
KW = dict(height=SIZE, width=SIZE, output_type="np", scheduler="ddim", num_inference_steps=3, guidance_scale=1.0,
          bootstrap_steps=0)


@pytest.fixture(scope="module")
def lora(tiny_model, tmp_path_factory):
    return write_tiny_lora(tiny_model, tmp_path_factory.mktemp("lora-a"), seed=0)


@pytest.fixture(scope="module")
def lora_b(tiny_model, tmp_path_factory):
    return write_tiny_lora(tiny_model, tmp_path_factory.mktemp("lora-b"), seed=1, name="style.safetensors")


@pytest.fixture(scope="module")
def sd(tiny_model):
    from smd_cli import StableMultiDiffusionPipeline

    return StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model), lcm_lora="none")


def halves() -> np.ndarray:
    masks = np.zeros((2, SIZE, SIZE), np.float32)
    masks[0, :, : SIZE // 2] = 1
    masks[1, :, SIZE // 2:] = 1
    return masks


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_canvas_lora_equals_diffusers_with_the_same_adapter(family, tiny_model, tiny_sdxl, tmp_path):
    from smd_cli import StableMultiDiffusionPipeline

    model = tiny_model if family == "sd" else tiny_sdxl
    file = write_tiny_lora(model, tmp_path, seed=2)
    reference, sampler = family_reference(model, family, KW)
    reference.load_lora_weights(str(tmp_path), weight_name=file.name, adapter_name="a")
    reference.set_adapters(["a"], adapter_weights=[0.7])
    expected = reference("a photo of the sun", height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=1.0,
                         latents=latents(), output_type="np").images[0]
    smd = StableMultiDiffusionPipeline("cpu", hf_key=str(model), lcm_lora="none")
    got = smd.sample("a photo of the sun", loras=[(str(file), 0.7)], latents=latents(), **sampler)
    plain = smd.sample("a photo of the sun", latents=latents(), **sampler)
    assert rel_err(expected, got) < 1e-4
    assert rel_err(expected, plain) > 1e-3  # the LoRA changes the image; smd follows it


def test_a_layer_lora_over_the_whole_canvas_equals_a_canvas_lora(sd, lora):
    whole = sd("a cat", masks=np.ones((1, SIZE, SIZE), np.float32), layer_loras=[[str(lora)]], latents=latents(), **KW)
    canvas = sd("a cat", loras=str(lora), latents=latents(), **KW)
    np.testing.assert_array_equal(whole, canvas)


def test_a_layer_lora_acts_on_its_rows_only(sd, lora, tiny_model):
    """Every denoiser call's rows of the layer without the LoRA give what the base model gives on the
    same inputs; the LoRA layer's rows what the model with the LoRA gives. One call per set of LoRAs."""
    from smd_cli import StableMultiDiffusionPipeline

    calls = []

    def record(module, args, kwargs, out):
        calls.append((args[0].clone(), args[1], kwargs["encoder_hidden_states"].clone(), out[0].clone()))

    hook = sd.unet.register_forward_hook(record, with_kwargs=True)
    try:
        sd(["a cat", "a lake"], masks=halves(), layer_loras=[[(str(lora), 0.9)], []], latents=latents(), **KW)
    finally:
        hook.remove()
    assert len(calls) == 2 * 3  # per step: one call with the LoRA, one without
    base = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model), lcm_lora="none")
    with_lora = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model), lcm_lora="none")
    with_lora.load_loras(as_loras(str(lora)))
    with_lora.family.loras.activate(as_loras([(str(lora), 0.9)]))
    lake = sd.encode_prompts(["a lake"]).states
    for x, t, states, out in calls:  # one view: each call holds one layer's row
        model = base if torch.equal(states, lake) else with_lora
        torch.testing.assert_close(out, model.unet(x, t, encoder_hidden_states=states).sample, rtol=0, atol=0)
    assert sorted(torch.equal(s, lake) for _, _, s, _ in calls) == [False] * 3 + [True] * 3


def test_two_layers_with_their_own_loras_differ_from_none(sd, lora, lora_b):
    plain = sd(["a cat", "a lake"], masks=halves(), latents=latents(), **KW)
    own = sd(["a cat", "a lake"], masks=halves(), layer_loras=[[str(lora)], [(str(lora_b), 0.5)]], latents=latents(),
             **KW)
    assert np.abs(own - plain).mean() > 1e-4
    left = sd(["a cat", "a lake"], masks=halves(), layer_loras=[[str(lora)], []], latents=latents(), **KW)
    # The right half changes with its own LoRA, and (through the shared latent) a little without it.
    assert (np.abs(own[:, SIZE // 2:] - plain[:, SIZE // 2:]).mean()
            > np.abs(left[:, SIZE // 2:] - plain[:, SIZE // 2:]).mean())


def test_a_scene_with_loras_runs_from_the_cli_and_its_record_reproduces(run_cli, tiny_model, lora, lora_b, tmp_path):
    from PIL import Image

    from smd_cli.app.records import read_record

    (tmp_path / "loras").mkdir()
    local = tmp_path / "loras" / "character.safetensors"
    local.write_bytes(lora.read_bytes())
    scene = write(tmp_path / "s.yaml", f"""seed: 3
width: {SIZE}
height: {SIZE}
steps: 2
loras:
  - {{path: {lora_b}, scale: 0.5}}
layers:
  - prompt: "1girl, (pink hair:1.3), leather jacket"
    mask: {{rect: [0, 0, 0.5, 1]}}
    loras: [loras/character.safetensors]
  - prompt: a lake
    mask: {{rect: [0.5, 0, 1, 1]}}
""")
    out = tmp_path / "x.png"
    result = run_cli("generate", scene, "--model", tiny_model, "--lcm-lora", "none", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    record = read_record(out)
    assert record.scene["layers"][0]["loras"][0]["path"] == str(local.absolute())
    assert record.scene["layers"][0]["loras"][0]["sha256"] == record.files[str(local.absolute())]
    assert record.scene["loras"][0] == {"path": str(lora_b), "scale": 0.5, "sha256": record.files[str(lora_b)]}
    again = tmp_path / "again.png"
    assert run_cli("reproduce", out, "--out", again).exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    plain = tmp_path / "plain.png"
    scene.write_text(scene.read_text().replace("    loras: [loras/character.safetensors]\n", ""))
    assert run_cli("generate", scene, "--model", tiny_model, "--lcm-lora", "none", "--device", "cpu",
                   "--out", plain).exit_code == 0
    assert np.abs(np.asarray(Image.open(out), np.float32) - np.asarray(Image.open(plain), np.float32)).mean() > 0.1
    local.write_bytes(lora_b.read_bytes())  # the recorded file changed: reproducing says so
    changed = run_cli("reproduce", out, "--out", tmp_path / "changed.png")
    assert (changed.exit_code == 0
            and "character.safetensors has changed since its sha256 was recorded" in changed.output)


@pytest.mark.parametrize("text, message, where", [
    ("loras: [missing.safetensors]\n", "LoRA file or folder not found: /", "1: loras[0]"),
    ("loras: [{path: x.safetensors, scale: 50}]\n", "less than or equal to 10", "1: loras[0].scale"),
    ("loras: [{file: x.safetensors}]\n", "unknown key 'file'", "1: loras[0].file"),
])
def test_lora_mistakes_are_one_located_line_before_the_model_loads(run_cli, tmp_path, text, message, where):
    scene = write(tmp_path / "s.yaml", text + "layers:\n  - {prompt: a cat}\n")
    result = run_cli("validate", scene)
    assert result.exit_code == 2 and message in result.output and f"s.yaml:{where}" in result.output


def test_a_layer_lora_of_another_family_is_an_error_at_its_key(run_cli, tiny_model, tiny_sdxl, tmp_path):
    xl_lora = write_tiny_lora(tiny_sdxl, tmp_path / "xl", seed=0)
    scene = write(tmp_path / "s.yaml", f"width: {SIZE}\nheight: {SIZE}\nlayers:\n  - prompt: a cat\n"
                                       f"    loras: [{xl_lora}]\n")
    result = run_cli("generate", scene, "--model", tiny_model, "--lcm-lora", "none", "--device", "cpu",
                     "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and not (tmp_path / "x.png").exists()  # the scene failed once the model loaded
    assert "s.yaml:5: layers[0].loras[0]" in result.output and "does not fit this SD 1.x/2.x model" in result.output
    assert "Traceback" not in result.output


def test_a_stream_layer_takes_its_own_lora(tiny_model, lora):
    with_lora = stream_frame(tiny_model, SIZE, loras=[str(lora)])
    assert np.abs(with_lora - stream_frame(tiny_model, SIZE, loras=[])).mean() > 0.1


def test_a_loras_text_encoder_weights_act_over_the_canvas_not_from_a_layer(tiny_model, lora, tmp_path):
    """A canvas LoRA's text-encoder weights change every prompt's encoding; a layer's LoRA leaves
    the encoding alone (every prompt goes through the one set of text encoders)."""
    from safetensors.torch import load_file, save_file

    from smd_cli import StableMultiDiffusionPipeline

    weights = load_file(str(lora))
    smd = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model), lcm_lora="none")
    width = smd.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(0)
    for name in ("q_proj", "v_proj"):
        prefix = f"text_encoder.text_model.encoder.layers.0.self_attn.{name}"
        weights[f"{prefix}.lora_A.weight"] = torch.randn(4, width, generator=g)
        weights[f"{prefix}.lora_B.weight"] = torch.randn(width, 4, generator=g)
    file = str(tmp_path / "with-te.safetensors")
    save_file(weights, file)
    plain = smd.encode_prompts(["a cat"]).states.clone()
    seen = []
    hook = smd.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"][0]),
                                              with_kwargs=True)
    try:
        smd("a cat", masks=np.ones((1, SIZE, SIZE), np.float32), layer_loras=[[file]], latents=latents(), **KW)
        torch.testing.assert_close(seen[-1], plain[0], rtol=0, atol=0)
        smd("a cat", loras=file, latents=latents(), **KW)
        assert rel_err(plain[0], seen[-1]) > 1e-3
    finally:
        hook.remove()
