"""Reference images per layer through an IP-Adapter (`smd_cli.models.references`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import family_reference, latents, rel_err, stream_frame, write
from PIL import Image
from tinymodel import write_tiny_ip_adapter

SIZE = 64
KW = dict(height=SIZE, width=SIZE, output_type="np", scheduler="ddim", num_inference_steps=3, bootstrap_steps=0)


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((40, 40, 3)) * 255).astype(np.uint8))


def halves() -> np.ndarray:
    masks = np.zeros((2, SIZE, SIZE), np.float32)
    masks[0, :, : SIZE // 2] = 1
    masks[1, :, SIZE // 2:] = 1
    return masks


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return write_tiny_ip_adapter(tiny_model, tmp_path_factory.mktemp("ip-adapter"))


@pytest.fixture()
def sd(tiny_model):
    from smd_cli import StableMultiDiffusionPipeline

    return StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model), lcm_lora="none")


@pytest.mark.parametrize("family, guidance", [("sd", 1.0), ("sd", 3.0), ("sdxl", 3.0)])
def test_a_reference_equals_diffusers_ip_adapter(family, guidance, tiny_model, tiny_sdxl, tmp_path):
    from smd_cli import StableMultiDiffusionPipeline

    model = tiny_model if family == "sd" else tiny_sdxl
    file = write_tiny_ip_adapter(model, tmp_path / "ip")
    reference, sampler = family_reference(model, family, dict(KW, guidance_scale=guidance))
    reference.load_ip_adapter(str(file.parent), subfolder="", weight_name=file.name)
    reference.set_ip_adapter_scale(0.7)
    expected = reference("a photo of the sun", ip_adapter_image=picture(), height=SIZE, width=SIZE,
                         num_inference_steps=3, guidance_scale=guidance, latents=latents(), output_type="np").images[0]
    smd = StableMultiDiffusionPipeline("cpu", hf_key=str(model), lcm_lora="none")
    plain = smd.sample("a photo of the sun", latents=latents(), **sampler)
    got = smd.sample("a photo of the sun", reference=dict(image=picture(), scale=0.7, adapter=str(file)),
                     latents=latents(), **sampler)
    assert rel_err(expected, got) < 1e-4 and rel_err(expected, plain) > 1e-3
    # Once loaded, the adapter runs at scale 0 for rows without a reference: the base model, exactly.
    np.testing.assert_array_equal(plain, smd.sample("a photo of the sun", latents=latents(), **sampler))


def test_a_layer_reference_reaches_its_rows_only(sd, adapter):
    """Rows of a layer without a reference run at scale 0 in a call of their own (the adapter's
    scale is one per call); the layer with one gets its image, its unconditional row zeros."""
    calls = []
    hook = sd.unet.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["added_cond_kwargs"]["image_embeds"][0].clone()),
        with_kwargs=True)
    try:
        sd(["a cat", "a lake"], masks=halves(), layer_references=[None, dict(image=picture(), adapter=str(adapter))],
           latents=latents(), guidance_scale=3.0, **KW)
    finally:
        hook.remove()
    embeds = sd.family.references.embeds
    assert len(calls) == 2 * 3 and len(embeds) == 1  # per step: the lake's rows (scale 1), the cat's (scale 0)
    image = next(iter(embeds.values()))[0]
    with_image = [c for c in calls if any(torch.equal(row[0], image) for row in c)]
    assert len(with_image) == 3 and all(len(c) == 2 and float(c[0].abs().max()) == 0 for c in with_image)
    assert all(float(c.abs().max()) == 0 for c in calls if not any(torch.equal(row[0], image) for row in c))


def test_a_canvas_reference_and_a_layers_own(sd, adapter):
    spec = dict(image=picture(), adapter=str(adapter))
    canvas = sd(["a cat", "a lake"], masks=halves(), reference=spec, latents=latents(), guidance_scale=1.0, **KW)
    both = sd(["a cat", "a lake"], masks=halves(), layer_references=[spec, spec], latents=latents(),
              guidance_scale=1.0, **KW)
    np.testing.assert_array_equal(canvas, both)  # the canvas's reference is every layer's without one
    own = sd(["a cat", "a lake"], masks=halves(), reference=spec, layer_references=[None, dict(spec, image=picture(1))],
             latents=latents(), guidance_scale=1.0, **KW)
    assert np.abs(own - canvas)[:, SIZE // 2:].mean() > np.abs(own - canvas)[:, : SIZE // 4].mean()


def test_a_scene_with_references_runs_and_records_them(run_cli, tiny_model, adapter, tmp_path):
    from smd_cli.app.records import read_record

    picture().save(tmp_path / "girl-ref.png")
    scene = write(tmp_path / "s.yaml", f"""seed: 4
width: {SIZE}
height: {SIZE}
layers:
  - prompt: a girl
    mask: {{rect: [0, 0, 0.5, 1]}}
    reference: {{image: girl-ref.png, scale: 0.6, adapter: {adapter}}}
  - prompt: a lake
    mask: {{rect: [0.5, 0, 1, 1]}}
""")
    out = tmp_path / "x.png"
    result = run_cli("generate", scene, "--model", tiny_model, "--lcm-lora", "none", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    node = read_record(out).scene["layers"][0]["reference"]
    assert node["image"] == str(tmp_path / "girl-ref.png") and node["adapter"] == str(adapter) and node["sha256"]
    assert run_cli("reproduce", out, "--out", tmp_path / "again.png").exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "again.png")))


@pytest.mark.parametrize("text, message, where", [
    ("reference: missing.png\n", "reference image file not found", "1: reference.image"),
    ("reference: {image: ref.png, adapter: ./none.safetensors}\n", "IP-Adapter file not found", "1: reference.adapter"),
    ("reference: {image: ref.png, scale: -1}\n", "greater than or equal to 0", "1: reference.scale"),
])
def test_reference_mistakes_are_located(run_cli, tmp_path, text, message, where):
    picture().save(tmp_path / "ref.png")
    scene = write(tmp_path / "s.yaml", text + "layers:\n  - {prompt: a cat}\n")
    result = run_cli("validate", scene)
    assert result.exit_code == 2 and message in result.output and f"s.yaml:{where}" in result.output, result.output


def test_an_ip_adapter_of_another_family_is_refused(sd, tiny_sdxl, tmp_path):
    from smd_cli.core.errors import ModelError

    with pytest.raises(ModelError, match="does not fit this SD 1.x/2.x model"):
        sd.load_ip_adapter(str(write_tiny_ip_adapter(tiny_sdxl, tmp_path / "xl")))


def test_a_stream_layer_takes_its_own_reference(tiny_model, adapter):
    with_reference = stream_frame(tiny_model, SIZE, reference=dict(image=picture(), adapter=str(adapter)))
    assert np.abs(with_reference - stream_frame(tiny_model, SIZE)).mean() > 0.1
