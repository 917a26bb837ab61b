"""`smd` end to end with the tiny model folder: generate, validate, model errors, start-up imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA, SCENES, write
from PIL import Image


def test_generate_a_scene_end_to_end(run_cli, tiny_model, scene_dir):
    result = run_cli("generate", scene_dir / "scene.yaml", "--model", tiny_model, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    written = scene_dir / "out" / "scene-42.png"
    assert result.stdout.strip() == str(written)  # the scene's output, relative to the scene file
    image = Image.open(written)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert np.asarray(image).std() > 1  # a picture, not a flat fill
    assert "image 1/1: scene, seed 42" in result.stderr


def test_cli_output_equals_the_python_api(run_cli, tiny_model, scene_dir, pipe, tmp_path):
    from smd_cli import generate
    from smd_cli.scenes.scene import load_scene

    out = tmp_path / "cli.png"
    result = run_cli("generate", scene_dir / "scene.yaml", "--model", tiny_model, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.stderr
    api = generate(pipe, load_scene(scene_dir / "scene.yaml")).image
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(api))


def test_command_line_values_override_the_scene(run_cli, tiny_model, scene_dir, tmp_path):
    result = run_cli("generate", scene_dir / "scene.yaml", "--model", tiny_model, "--device", "cpu",
                     "--seed", "7", "--steps", "3", "--width", "96", "--height", "96",
                     "--set", "layers[0].prompt=a cat", "--out", tmp_path / "{scene}-{seed}-{steps}.png")
    assert result.exit_code == 0, result.stderr
    written = tmp_path / "scene-7-3.png"
    assert result.stdout.strip() == str(written)
    assert Image.open(written).size == (96, 96)


def test_prompt_without_a_scene_is_plain_sampling(run_cli, tiny_model, tmp_path, pipe):
    import torch

    out = tmp_path / "plain.png"
    result = run_cli("generate", "--prompt", "a photo of the sun", "--model", tiny_model, "--device", "cpu",
                     "--seed", "3", "--width", "64", "--height", "64", "--out", out)
    assert result.exit_code == 0, result.stderr
    expected = pipe.sample("a photo of the sun", height=64, width=64, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_several_scenes_load_the_model_once(run_cli, tiny_model, scene_dir, tmp_path, monkeypatch):
    from smd_cli.engine import pipeline

    loads = []
    original = pipeline.load_components
    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: loads.append(a) or original(*a, **k))
    second = write(scene_dir / "second.yaml", (scene_dir / "scene.yaml").read_text().replace("seed: 42", "seed: 5"))
    result = run_cli("generate", scene_dir / "scene.yaml", second, "--model", tiny_model, "--device", "cpu",
                     "--out", tmp_path / "{scene}.png")
    assert result.exit_code == 0, result.stderr
    assert len(loads) == 1
    assert result.stdout.split() == [str(tmp_path / "scene.png"), str(tmp_path / "second.png")]


def test_one_output_file_for_several_scenes_is_refused(run_cli, tiny_model, scene_dir, tmp_path):
    result = run_cli("generate", scene_dir / "scene.yaml", scene_dir / "scene.yaml", "--out", tmp_path / "x.png",
                     "--model", tiny_model)
    assert result.exit_code == 2
    assert "names one file for 2 images" in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--model", "/definitely/not/here"], "model folder or file not found: /definitely/not/here"),
    (["--model", "nobody-has/this-model-xyz"], "is not in the Hugging Face cache"),
    (["--out", "out/{scene}-{nope}.png"], "unknown field {nope} in output template"),
    (["--out", "out/picture.txt"], "needs an image extension"),
    (["--device", "cuda:7"], "sees no CUDA GPU"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--set", "layers[0].mask_std=-1"], "greater than or equal to 0, got -1 (set on the command line)"),
    (["--out", "x-{seed:q}.png"], "bad output template"),
    (["--out", "/proc/no/such/x.png"], "cannot write /proc/no/such/x.png"),
    (["--steps", "60"], "lcm takes at most 50 steps for this model, got 60; use scheduler ddim or euler"),
    (["--scheduler", "ddim", "--steps", "1000"], "1000 ddim steps do not fit this model's 1000 training timesteps"),
    (["--set", "layers[0].prompt_strength=0.5", "--set", "background.prompt="], "prompt strength below 1"),
])
def test_user_errors_are_one_line_with_exit_code_2(run_cli, tiny_model, scene_dir, args, fragment):
    if "--model" not in args:
        args = ["--model", str(tiny_model)] + args
    result = run_cli("generate", scene_dir / "scene.yaml", *args)
    if fragment == "prompt strength below 1":  # a warning, not an error: the image is still made
        assert result.exit_code == 0 and f"warning: {fragment}" in result.stderr
        return
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_model_paths_in_a_scene_are_relative_to_the_scene_file(run_cli, tiny_model, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "project"
    shutil.copytree(tiny_model, folder / "models" / "tiny")
    scene = write(folder / "scenes" / "s.yaml", "model: ../models/tiny\nwidth: 64\nheight: 64\nseed: 1\n"
                                                "layers:\n  - {prompt: a cat}\n")
    monkeypatch.chdir(tmp_path)
    result = run_cli("generate", scene, "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.stderr
    assert f"loaded {folder / 'scenes' / '../models/tiny'}" in result.stderr


def test_no_scene_and_no_prompt(run_cli):
    result = run_cli("generate")
    assert result.exit_code == 2 and "give one or more scene files, or --prompt" in result.stderr


def test_canvas_not_divisible_by_the_loaded_models_factor(run_cli, tiny_model, scene_dir):
    result = run_cli("generate", scene_dir / "scene.yaml", "--model", tiny_model, "--device", "cpu",
                     "--width", "65", "--height", "65")
    assert result.exit_code == 2
    assert "width: canvas 65x65 is not divisible by the model's downscale factor 2" in result.stderr


def test_example_scenes_validate_and_generate(run_cli, tiny_model, tmp_path):
    for scene in sorted(SCENES.glob("*.yaml")):
        assert run_cli("validate", scene).exit_code == 0, scene
    # The example canvases are full size; keep their aspect ratios but shrink them for the tiny model.
    sizes = {"sunset-lake": ("96", "64"), "village": ("64", "64")}
    for name, (w, h) in sizes.items():
        result = run_cli("generate", SCENES / f"{name}.yaml", "--model", tiny_model, "--device", "cpu",
                         "--width", w, "--height", h, "--out", tmp_path / "{scene}.png")
        assert result.exit_code == 0, result.stderr
        assert Image.open(tmp_path / f"{name}.png").size == (int(w), int(h))
    result = run_cli("inpaint", SCENES / "street-inpaint.yaml", "--model", tiny_model, "--device", "cpu",
                     "--set", "width=96", "--set", "height=64", "--out", tmp_path / "street.png")
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / "street.png").size == (96, 64)
    result = run_cli("panorama", SCENES / "alps-panorama.yaml", "--width", "384", "--height", "64",
                     "--set", "tile_size=64", "--model", tiny_model, "--device", "cpu", "--out", tmp_path / "alps.png")
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / "alps.png").size == (384, 64)


def _imported_modules(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_help_and_validate_do_not_import_torch_or_diffusers():
    help_run = ("from smd_cli.app.cli import app\n"
                "try:\n    app(['--help'], prog_name='smd')\nexcept SystemExit:\n    pass")
    validate_run = (f"from smd_cli.app.cli import app\n"
                    f"try:\n    app(['validate', {str(DATA / 'scene.yaml')!r}], prog_name='smd')\n"
                    "except SystemExit as e:\n    assert e.code in (0, None), e.code")
    for code in (help_run, validate_run):
        modules = _imported_modules(code)
        assert "torch" not in modules and "diffusers" not in modules and "transformers" not in modules


def test_version_and_help(run_cli):
    result = run_cli("--help")
    assert result.exit_code == 0 and "generate" in result.stdout and "validate" in result.stdout
    assert run_cli("--version").stdout.startswith("smd ")


def test_the_progress_bar_says_when_the_steps_are_done_and_decoding_begins(monkeypatch):
    """On a terminal, the image's bar counts its steps, then says it is decoding (for a large
    canvas, minutes after the last step)."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from smd_cli.app import batch, report

    screen = io.StringIO()
    monkeypatch.setattr(report, "err", Console(file=screen, force_terminal=True, width=100))
    reporter = report.Reporter()
    job = SimpleNamespace(scene=SimpleNamespace(name="village"))
    shown = []
    for step in range(4):
        reporter(batch.Progress(job, step, 3))
        shown.append(reporter.live.tasks[1].description)
    reporter.close()
    assert shown == ["image 1/1: village"] * 3 + ["image 1/1: village: decoding"]
