"""Model loading: local folders, the LCM LoRA (a tiny one made with peft), devices and offline hub ids."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import DATA
from PIL import Image

from smd_cli.core.errors import ModelError
from smd_cli.models.loading import lcm_lora_fits, load_components, resolve_device, resolve_dtype

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def tiny_lora(tiny_model, tmp_path_factory):
    """A LoRA for the tiny UNet's attention, with non-zero weights, saved as diffusers saves LoRAs."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    folder = tmp_path_factory.mktemp("tiny-lora")
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        safe_serialization=True)
    return folder


def _unet_weight(components) -> torch.Tensor:
    return components.denoiser.state_dict()["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"]


def test_lora_from_a_folder_or_a_file_is_fused(tiny_model, tiny_lora):
    base = load_components(str(tiny_model), device=CPU, dtype=torch.float32, lcm_lora="none")
    from_folder = load_components(str(tiny_model), device=CPU, dtype=torch.float32, lcm_lora=str(tiny_lora))
    file = next(tiny_lora.glob("*.safetensors"))
    from_file = load_components(str(tiny_model), device=CPU, dtype=torch.float32, lcm_lora=str(file))
    assert base.lcm_lora is None and from_folder.lcm_lora == str(tiny_lora)
    assert (_unet_weight(from_folder) - _unet_weight(base)).abs().max() > 1e-3
    torch.testing.assert_close(_unet_weight(from_folder), _unet_weight(from_file))
    assert not any("lora" in name for name in from_folder.denoiser.state_dict())  # fused, not an adapter


def test_auto_lcm_lora_applies_only_where_it_fits(tiny_model, tiny_lcm_model):
    assert load_components(str(tiny_model), device=CPU, dtype=torch.float32, lcm_lora="auto").lcm_lora is None
    sd15 = SimpleNamespace(config={"time_cond_proj_dim": None, "cross_attention_dim": 768})
    distilled = SimpleNamespace(config={"time_cond_proj_dim": 256, "cross_attention_dim": 768})
    sdxl = SimpleNamespace(config={"time_cond_proj_dim": None, "cross_attention_dim": 2048})
    assert lcm_lora_fits(sd15) and not lcm_lora_fits(distilled) and not lcm_lora_fits(sdxl)


def test_cli_lcm_lora_changes_the_image(run_cli, tiny_model, tiny_lora, tmp_path):
    common = ["generate", DATA / "scene.yaml", "--model", tiny_model, "--device", "cpu"]
    assert run_cli(*common, "--lcm-lora", "none", "--out", tmp_path / "base.png").exit_code == 0
    result = run_cli(*common, "--lcm-lora", tiny_lora, "--out", tmp_path / "lora.png")
    assert result.exit_code == 0, result.stderr
    assert f"+ {tiny_lora}" in result.stderr
    base, lora = (np.asarray(Image.open(tmp_path / n), dtype=int) for n in ("base.png", "lora.png"))
    assert np.abs(base - lora).mean() > 0.5


def test_missing_lora_is_a_clear_error(run_cli, tiny_model, tmp_path):
    result = run_cli("generate", DATA / "scene.yaml", "--model", tiny_model, "--device", "cpu",
                     "--lcm-lora", tmp_path / "nope", "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "LCM LoRA file or folder not found" in result.stderr


def test_default_model_offline_and_not_cached(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = run_cli("generate", DATA / "scene.yaml", "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 2
    line = next(line for line in result.stderr.splitlines() if "'stable-diffusion-v1-5/" in line)
    assert "'stable-diffusion-v1-5/stable-diffusion-v1-5' is not a local folder or file and is not in the " \
           "Hugging Face cache" in line
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in line


def test_folder_without_model_index(tmp_path, run_cli):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="has no model_index.json"):
        load_components(str(tmp_path / "m"), device=CPU, dtype=torch.float32)


def test_devices_and_dtypes():
    assert resolve_device("cpu") == CPU and resolve_device(None).type in ("cpu", "cuda", "mps")
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("tpu:0")


@pytest.fixture(scope="session")
def single_file(tiny_model, tmp_path_factory):
    """The tiny model as one original-layout .safetensors checkpoint, as single-file models ship."""
    from ldm import write_single_file

    return write_single_file(tiny_model, tmp_path_factory.mktemp("single") / "tiny-sd.safetensors")


def test_single_file_with_local_configs_equals_the_folder(run_cli, tiny_model, single_file, tmp_path):
    common = ["--prompt", "a cat", "--width", "64", "--height", "64", "--seed", "5", "--device", "cpu"]
    result = run_cli("generate", *common, "--model", single_file, "--config", tiny_model, "--out", tmp_path / "f.png")
    assert result.exit_code == 0, result.stderr
    assert run_cli("generate", *common, "--model", tiny_model, "--out", tmp_path / "d.png").exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "f.png")),
                                  np.asarray(Image.open(tmp_path / "d.png")))


def test_single_file_without_configs_offline_explains_config(run_cli, single_file, tmp_path):
    result = run_cli("generate", "--prompt", "a cat", "--model", single_file, "--device", "cpu",
                     "--out", tmp_path / "x.png")
    assert result.exit_code == 2
    assert "pass a local diffusers folder of the same architecture with --config DIR" in result.stderr
    result = run_cli("generate", "--prompt", "a cat", "--model", single_file, "--config", tmp_path,
                     "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "is not a diffusers model folder" in result.stderr
