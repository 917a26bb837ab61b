"""Textual-inversion embeddings by file (`embeddings:` in a scene, `pipe.load_embedding`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import latents, rel_err, write
from PIL import Image

SIZE = 64
KW = dict(height=SIZE, width=SIZE, output_type="np", scheduler="ddim", num_inference_steps=3, guidance_scale=1.0,
          bootstrap_steps=0)


def embedding(model, path, *, vectors: int = 2, seed: int = 0, sdxl: bool = False):
    """A random embedding of `vectors` vectors as the model's text encoder(s) take them."""
    from safetensors.torch import save_file

    def width(folder):
        return json.loads((model / folder / "config.json").read_text())["hidden_size"]

    g = torch.Generator().manual_seed(seed)
    if sdxl:
        tensors = {"clip_l": torch.randn(vectors, width("text_encoder"), generator=g),
                   "clip_g": torch.randn(vectors, width("text_encoder_2"), generator=g)}
    else:
        tensors = {"emb_params": torch.randn(vectors, width("text_encoder"), generator=g)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def test_an_embedding_reads_as_diffusers_reads_it(tiny_model, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from smd_cli import StableMultiDiffusionPipeline

    file = embedding(tiny_model, tmp_path / "cat-toy.safetensors")
    reference = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    reference.load_textual_inversion(str(file), token="<cat-toy>")
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected = reference("a photo of <cat-toy>", height=SIZE, width=SIZE, num_inference_steps=3, guidance_scale=1.0,
                         latents=latents(), output_type="np").images[0]
    smd = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model), lcm_lora="none")
    before = smd.sample("a photo of <cat-toy>", latents=latents(), **KW)
    assert smd.load_embedding(file, "<cat-toy>") == "<cat-toy>"
    got = smd.sample("a photo of <cat-toy>", latents=latents(), **KW)
    assert rel_err(expected, got) < 1e-4 and rel_err(expected, before) > 1e-3  # remembered prompts forgotten
    weighted = smd.sample("a photo of (<cat-toy>:1.3)", latents=latents(), **KW)
    assert rel_err(got, weighted) > 1e-4  # every vector of the token is weighted


def test_sdxl_takes_both_encoders_vectors_and_refuses_an_sd_embedding(tiny_sdxl, tiny_model, tmp_path):
    from smd_cli import StableMultiDiffusionPipeline
    from smd_cli.core.errors import ModelError

    xl = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_sdxl))
    plain = xl.encode_prompts(["a photo of style"]).states
    xl.load_embedding(embedding(tiny_sdxl, tmp_path / "style.safetensors", sdxl=True))
    assert rel_err(plain, xl.encode_prompts(["a photo of style"]).states) > 1e-3
    with pytest.raises(ModelError, match="is not for SDXL: an SDXL embedding holds clip_l and clip_g"):
        xl.load_embedding(embedding(tiny_model, tmp_path / "sd.safetensors"))


def test_a_scene_names_embeddings_by_file_and_records_them(run_cli, tiny_model, tmp_path):
    from smd_cli.app.records import read_record

    embedding(tiny_model, tmp_path / "emb" / "cat-toy.safetensors")
    scene = write(tmp_path / "s.yaml", f"seed: 2\nwidth: {SIZE}\nheight: {SIZE}\n"
                                       "embeddings: [emb/cat-toy.safetensors]\n"
                                       "layers:\n  - {prompt: 'a (cat-toy:1.2) on a table'}\n")
    out = tmp_path / "x.png"
    result = run_cli("generate", scene, "--model", tiny_model, "--lcm-lora", "none", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    record = read_record(out)
    path = str((tmp_path / "emb" / "cat-toy.safetensors").absolute())
    assert record.scene["embeddings"] == [{"path": path, "token": None, "sha256": record.files[path]}]
    assert run_cli("reproduce", out, "--out", tmp_path / "again.png").exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "again.png")))
    write(scene, scene.read_text().replace("embeddings: [emb/cat-toy.safetensors]\n", ""))
    assert run_cli("generate", scene, "--model", tiny_model, "--lcm-lora", "none", "--device", "cpu",
                   "--out", tmp_path / "plain.png").exit_code == 0
    assert np.abs(np.asarray(Image.open(out), np.float32)
                  - np.asarray(Image.open(tmp_path / "plain.png"), np.float32)).mean() > 0.1


@pytest.mark.parametrize("text, message, where", [
    ("embeddings: [missing.safetensors]\n", "embedding file not found", "1: embeddings[0]"),
    ("embeddings: [{path: a.safetensors, token: 'two words'}]\n", "should match pattern", "1: embeddings[0].token"),
])
def test_embedding_mistakes_are_located(run_cli, tmp_path, text, message, where):
    scene = write(tmp_path / "s.yaml", text + "layers:\n  - {prompt: a cat}\n")
    result = run_cli("validate", scene)
    assert result.exit_code == 2 and message in result.output and f"s.yaml:{where}" in result.output, result.output


def test_an_embedding_of_another_width_is_an_error_at_its_key(run_cli, tiny_model, tiny_sdxl, tmp_path):
    wide = tmp_path / "wide.safetensors"
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(1, 999)}, str(wide))
    scene = write(tmp_path / "s.yaml", f"width: {SIZE}\nheight: {SIZE}\nembeddings: [wide.safetensors]\n"
                                       "layers:\n  - {prompt: a wide cat}\n")
    result = run_cli("generate", scene, "--model", tiny_model, "--lcm-lora", "none", "--device", "cpu",
                     "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and "s.yaml:3: embeddings[0]" in result.output
    assert "does not fit this SD 1.x/2.x model" in result.output and "Traceback" not in result.output
