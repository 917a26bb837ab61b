"""Everyday use: your defaults from the environment and a config file, flags for the common knobs,
help, progress, records other tools read, threads, and a stream that keeps its frames nowhere."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import yaml
from conftest import write
from PIL import Image

SCENE = "seed: 1\nwidth: 32\nheight: 32\nlayers:\n  - {prompt: a cat}\n"


@pytest.fixture()
def config(tmp_path, monkeypatch):
    """A user config file of one's own, empty, at SMD_CONFIG, and no SMD_* variables from outside."""
    for name in ("SMD_MODEL", "SMD_LCM_LORA", "SMD_DEVICE", "SMD_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "config" / "config.yaml"
    monkeypatch.setenv("SMD_CONFIG", str(path))
    return write(path, "")


def test_a_default_model_without_flags_and_its_precedence(run_cli, tiny_model, tiny_lcm_model, tmp_path, config,
                                                          monkeypatch):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    write(config, f"model: {tiny_lcm_model}\ndevice: cpu\n")
    scene = write(tmp_path / "s.yaml", SCENE)

    def model_used(*args) -> str:
        result = run_cli("generate", scene, "--out", tmp_path / "{seed}.png", "--overwrite", *args)
        assert result.exit_code == 0, result.stderr
        return yaml.safe_load(Image.open(result.stdout.strip()).text["smd-scene"])["model"]

    assert model_used() == str(tiny_lcm_model)  # the config file's
    monkeypatch.setenv("SMD_MODEL", str(tiny_model))
    assert model_used() == str(tiny_model)  # the environment over the config file
    write(scene, f"model: {other}\n" + SCENE)
    assert model_used() == str(other)  # the scene over the environment
    assert model_used("--model", tiny_lcm_model) == str(tiny_lcm_model)  # the flag over everything


def test_a_broken_config_file_is_one_clear_line(run_cli, tmp_path, config):
    write(config, "modle: x\n")
    result = run_cli("generate", write(tmp_path / "s.yaml", SCENE), "--dry-run")
    assert result.exit_code == 2 and f"{config}: unknown key 'modle' in the smd config file" in result.stderr
    write(config, "device: [cuda]\n")
    result = run_cli("generate", tmp_path / "s.yaml", "--dry-run")
    assert result.exit_code == 2 and "device must be text" in result.stderr


def test_a_missing_config_file_named_by_smd_config_is_an_error(run_cli, tmp_path, config):
    config.unlink()
    result = run_cli("generate", write(tmp_path / "s.yaml", SCENE), "--dry-run")
    assert result.exit_code == 2 and f"{config}: no such smd config file (named by SMD_CONFIG)" in result.stderr


def test_offline_the_error_names_every_download(run_cli, tmp_path, monkeypatch, config):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = run_cli("generate", write(tmp_path / "s.yaml", SCENE), "--device", "cpu")
    assert result.exit_code == 2
    assert 'hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include "*.json" "*.txt"' in result.stderr
    assert '"*/diffusion_pytorch_model.safetensors" "text_encoder/model.safetensors"' in result.stderr
    assert 'LCM LoRA \'latent-consistency/lcm-lora-sdv1-5\' is not a local folder or file and is not in the ' \
           'Hugging Face cache' in result.stderr
    assert '`hf download latent-consistency/lcm-lora-sdv1-5 --include "*.safetensors"`' in result.stderr


def test_flags_for_the_common_knobs(run_cli, tiny_model, tmp_path):
    scene = write(tmp_path / "s.yaml", SCENE.replace("{prompt: a cat}", "{prompt: a cat, negative_prompt: dogs}"))
    result = run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "-g", "2.5", "--tile-size", "16",
                     "--negative-prompt", "blurry", "--steps", "3", "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.stderr
    recorded = yaml.safe_load(Image.open(tmp_path / "x.png").text["smd-scene"])
    assert (recorded["guidance_scale"], recorded["tile_size"], recorded["steps"]) == (2.5, 16, 3)
    assert recorded["negative_prefix"] == "blurry"
    assert "Negative prompt: blurry, dogs" in Image.open(tmp_path / "x.png").text["parameters"]


@pytest.mark.parametrize("command", ["validate", "generate", "inpaint", "panorama", "show", "reproduce", "stream"])
def test_help_with_h_and_examples(run_cli, command):
    result = run_cli(command, "-h")
    assert result.exit_code == 0 and "Examples:" in result.stdout
    assert re.search(rf"^\s+smd {command} \S", result.stdout, re.M)  # examples as written, not re-wrapped


def test_shell_completion_can_be_installed(run_cli):
    result = run_cli("--help")
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


def test_progress_counts_images_and_seconds_leave_loading_out(run_cli, tiny_model, tmp_path, monkeypatch):
    from smd_cli.engine import pipeline

    original, clock = pipeline.StableMultiDiffusionPipeline.__init__, time.perf_counter
    late = [0.0]  # a fake clock: loading "takes" 1000 s more than it does, however busy the machine

    def slow_load(self, *args, **kwargs):
        late[0] += 1000.0
        original(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.StableMultiDiffusionPipeline, "__init__", slow_load)
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + late[0])
    result = run_cli("generate", write(tmp_path / "s.yaml", SCENE), "--model", tiny_model, "--device", "cpu",
                     "--seeds", "1,2", "--json", "--out", tmp_path / "{seed}.png")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(row["seconds"] < 1000.0 for row in rows)  # the load is reported once, apart
    assert re.search(r"loaded .* in 1\d{3}\.\d s", result.stderr), result.stderr
    assert re.search(r"image 1/2: s, seed 1, [\d.]+ s \([\d.]+ steps/s\)", result.stderr)
    assert "image 2/2: s, seed 2" in result.stderr


def test_parameters_in_the_layout_other_tools_read(run_cli, tiny_model, tmp_path):
    scene = write(tmp_path / "s.yaml", SCENE.replace("{prompt: a cat}", "{name: cat, prompt: a cat, "
                                                     "negative_prompt: dogs}"))
    assert run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--out", tmp_path / "x.png",
                   "-g", "2").exit_code == 0
    lines = Image.open(tmp_path / "x.png").text["parameters"].splitlines()
    assert lines[0] == "cat: a cat" and lines[1] == "Negative prompt: dogs"
    pairs = dict(part.split(": ", 1) for part in lines[2].split(", "))
    assert (pairs["Steps"], pairs["Sampler"], pairs["CFG scale"], pairs["Seed"], pairs["Size"]) == (
        "5", "LCM", "2.0", "1", "32x32")
    assert pairs["Model"] == str(tiny_model)


def test_jpeg_and_webp_carry_the_record_and_a_large_one_goes_beside(run_cli, tiny_model, tmp_path):
    scene = write(tmp_path / "s.yaml", SCENE)
    for suffix in ("jpg", "webp"):
        out = tmp_path / f"x.{suffix}"
        assert run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--out", out).exit_code == 0
        exif = Image.open(out).getexif().get_ifd(0x8769)[0x9286]
        assert exif.startswith(b"UNICODE\0") and "Steps: 5" in exif[8:].decode("utf-16-be")
        shown = run_cli("show", out, "--json")
        assert shown.exit_code == 0 and json.loads(shown.stdout)["seed"] == 1
    # A prompt too long for either of a JPEG's 64 KiB segments, EXIF or XMP: both go, the sidecar holds all.
    long = write(tmp_path / "long.yaml", SCENE.replace("a cat", "a cat " * 12_000))
    out = tmp_path / "big.jpg"
    assert run_cli("generate", long, "--model", tiny_model, "--device", "cpu", "--out", out).exit_code == 0
    assert "xmp" not in Image.open(out).info and not Image.open(out).getexif().get_ifd(0x8769)
    assert (tmp_path / "big.smd.yaml").is_file()
    assert json.loads(run_cli("show", out, "--json").stdout)["name"] == "long"  # read from the sidecar
    again = run_cli("reproduce", out, "--out", tmp_path / "again.png")
    assert again.exit_code == 0 and (tmp_path / "again.png").is_file()


def test_threads(run_cli, tiny_model, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        result = run_cli("generate", write(tmp_path / "s.yaml", SCENE), "--model", tiny_model, "--device", "cpu",
                         "--threads", "1", "--out", tmp_path / "x.png")
        assert result.exit_code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_stream_with_nowhere_to_go_says_so(run_cli, tiny_model, tmp_path):
    result = run_cli("stream", write(tmp_path / "s.yaml", SCENE), "--model", tiny_model, "--device", "cpu",
                     "--frames", "1")
    assert result.exit_code == 0
    assert "warning: without --out or --preview the frames are shown nowhere and kept nowhere" in result.stderr
