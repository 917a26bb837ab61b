"""Model presets: names for a model and its recipe, expanded into the scene (and so the record)."""

from __future__ import annotations

import json

from conftest import write
from PIL import Image


def test_smd_models_lists_every_preset(run_cli):
    rows = [json.loads(line) for line in run_cli("models", "--json").stdout.splitlines()]
    assert [r["name"] for r in rows] == ["sd15-lcm", "sdxl-lcm", "sdxl-lightning", "sd35-large-turbo", "flux-schnell",
                                         "flux-dev"]
    flux = rows[4]
    assert flux["model"] == "black-forest-labs/FLUX.1-schnell" and "steps 4" in flux["recipe"]
    assert flux["downloads"].startswith("hf download black-forest-labs/FLUX.1-schnell --include")
    assert "GPU memory" in run_cli("models").stdout


def test_a_preset_fills_what_the_scene_leaves_open(tmp_path):
    from smd_cli.app.batch import Options, sources_of, with_preset
    from smd_cli.scenes.scene import load_scene

    sf = load_scene(write(tmp_path / "s.yaml", "model: flux-dev\nsteps: 8\nlayers: [{prompt: a}]\n"))
    expanded = with_preset(sf, Options())
    s = expanded.scene
    assert (s.model, s.steps, s.scheduler, s.guidance_scale) == ("black-forest-labs/FLUX.1-dev", 8, "euler", 3.5)
    lightning = with_preset(sf, Options(model="sdxl-lightning")).scene  # --model wins over the scene's
    assert lightning.timestep_spacing == "trailing" and lightning.steps == 8
    assert sources_of(sf, Options(model="flux-schnell")).model == "black-forest-labs/FLUX.1-schnell"
    assert sources_of(expanded, Options()).lcm_lora == "none"


def test_a_preset_is_recorded_as_what_it_stands_for(run_cli, tiny_flux, tmp_path, monkeypatch):
    from smd_cli.scenes import presets

    local = presets.Preset(str(tiny_flux), "flux", {"scheduler": "euler", "steps": 3, "guidance_scale": 2.5}, (),
                           "none")
    monkeypatch.setitem(presets.PRESETS, "tiny-flux", local)
    result = run_cli("generate", "--prompt", "a cat", "--model", "tiny-flux", "--width", "64", "--height", "64",
                     "--seed", "2", "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.stderr
    shown = json.loads(run_cli("show", tmp_path / "x.png", "--json").stdout)
    assert shown["scene"]["model"] == str(tiny_flux) and shown["scene"]["steps"] == 3
    assert shown["scene"]["guidance_scale"] == 2.5 and shown["family"] == "flux"
    monkeypatch.delitem(presets.PRESETS, "tiny-flux")  # reproducing needs no preset table
    again = run_cli("reproduce", tmp_path / "x.png", "--out", tmp_path / "y.png", "--check")
    assert again.exit_code == 0, again.stderr
    assert Image.open(tmp_path / "y.png").size == (64, 64)


def test_an_offline_preset_or_hub_lora_names_its_download(run_cli, tiny_sdxl, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("generate", "--prompt", "a cat", "--model", "flux-schnell", "--device", "cpu",
                     "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "black-forest-labs/FLUX.1-schnell" in result.stderr
    lora = run_cli("generate", "--prompt", "a cat", "--model", tiny_sdxl, "--lcm-lora",
                   "ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors", "--width", "64", "--height", "64",
                   "--device", "cpu", "--out", tmp_path / "y.png")
    assert lora.exit_code == 2
    assert "`hf download ByteDance/SDXL-Lightning sdxl_lightning_4step_lora.safetensors`" in lora.stderr
