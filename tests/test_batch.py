"""Production use: batches that go on after a failure, seeds, JSON, dry runs, outputs that never
overwrite, metadata with `smd show` / `smd reproduce`, Ctrl-C, out-of-memory and memory checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write
from PIL import Image

from smd_cli import generate
from smd_cli.app.batch import parse_seeds
from smd_cli.core.errors import SmdError


def small_scene(folder: Path, name: str, seed: int | None = 1, extra: str = "") -> Path:
    head = f"seed: {seed}\n" if seed is not None else ""
    return write(folder / f"{name}.yaml", f"{head}width: 32\nheight: 32\n{extra}layers:\n  - {{prompt: {name}}}\n")


def gen(run_cli, tiny_model, *args):
    return run_cli("generate", *args, "--model", tiny_model, "--device", "cpu")


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- outputs ----------------------------------------------------------------------------------


def test_existing_files_are_never_overwritten(run_cli, tiny_model, tmp_path):
    scene = small_scene(tmp_path, "a")
    out = tmp_path / "out" / "a.png"
    first = gen(run_cli, tiny_model, scene, "--out", out)
    assert first.exit_code == 0 and first.stdout.strip() == str(out)
    out.write_bytes(b"precious")  # whatever is there must survive the next run
    second = gen(run_cli, tiny_model, scene, "--out", out)
    assert second.exit_code == 0, second.stderr
    assert second.stdout.strip() == str(tmp_path / "out" / "a-1.png")
    assert "a-1.png beside it" in second.stderr
    assert out.read_bytes() == b"precious"
    third = gen(run_cli, tiny_model, scene, "--out", out)
    assert third.stdout.strip() == str(tmp_path / "out" / "a-2.png")
    replaced = gen(run_cli, tiny_model, scene, "--out", out, "--overwrite")
    assert replaced.stdout.strip() == str(out)
    assert Image.open(out).size == (32, 32)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-1.png", "a-2.png", "a.png"]  # no temp files


def test_index_date_and_time_in_templates(run_cli, tiny_model, tmp_path):
    import re

    result = gen(run_cli, tiny_model, small_scene(tmp_path, "a"), small_scene(tmp_path, "b"),
                 "--out", tmp_path / "{date}" / "{index:03d}-{scene}-{time}.png")
    assert result.exit_code == 0, result.stderr
    paths = [Path(p) for p in result.stdout.split()]
    assert [p.name[:6] for p in paths] == ["000-a-", "001-b-"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", paths[0].parent.name)
    assert re.fullmatch(r"\d{3}-a-\d{6}\.png", paths[0].name)


def test_unwritable_output_is_refused_before_any_model_loads(run_cli, tmp_path, monkeypatch):
    from smd_cli.engine import pipeline

    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "file").write_text("not a folder")
    result = run_cli("generate", small_scene(tmp_path, "a"), "--out", tmp_path / "file" / "x.png")
    assert result.exit_code == 2
    assert f"cannot write {tmp_path / 'file' / 'x.png'}: {tmp_path / 'file'} is a file, not a folder" in result.stderr


def test_seeds_parse():
    assert parse_seeds("1,2,3") == [1, 2, 3]
    assert parse_seeds("10-13") == [10, 11, 12, 13]
    assert parse_seeds("5, 1-2, 5") == [5, 1, 2]
    for bad in ("a", "3-1", "1,,2", "-4"):
        with pytest.raises(SmdError, match="--seeds"):
            parse_seeds(bad)


# --- batches ----------------------------------------------------------------------------------


def test_seeds_make_one_image_each(run_cli, tiny_model, tmp_path, pipe):
    from smd_cli.scenes.scene import load_scene

    scene = small_scene(tmp_path, "a")
    result = gen(run_cli, tiny_model, scene, "--seeds", "3,5-6", "--out", tmp_path / "o" / "{scene}-{seed}.png",
                 "--json")
    assert result.exit_code == 0, result.stderr
    rows = json_lines(result.stdout)
    assert [r["seed"] for r in rows] == [3, 5, 6] and {r["status"] for r in rows} == {"done"}
    assert [Path(r["path"]).name for r in rows] == ["a-3.png", "a-5.png", "a-6.png"]
    expected = generate(pipe, load_scene(scene, {("seed",): 5})).image
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "a-5.png")), np.asarray(expected))
    assert "summary" in result.stderr and "3 done" in result.stderr  # the table goes to stderr


def test_repeat_draws_random_seeds_and_reports_them(run_cli, tiny_model, tmp_path):
    result = gen(run_cli, tiny_model, small_scene(tmp_path, "a"), "--repeat", "2", "--json",
                 "--out", tmp_path / "{scene}-{index}-{seed}.png")
    assert result.exit_code == 0, result.stderr
    rows = json_lines(result.stdout)
    assert len(rows) == 2 and rows[0]["seed"] != rows[1]["seed"]
    for i, row in enumerate(rows):
        assert Path(row["path"]).name == f"a-{i}-{row['seed']}.png" and Path(row["path"]).is_file()
        assert row["seconds"] > 0 and row["scene"] == "a"


def test_a_failing_scene_does_not_stop_the_batch(run_cli, tiny_model, tmp_path):
    good = small_scene(tmp_path, "good")
    broken = write(tmp_path / "broken.yaml", "layers: [\n")
    bad_steps = small_scene(tmp_path, "toolong", extra="steps: 60\n")  # fails only once the model is known
    other = small_scene(tmp_path, "other")
    result = gen(run_cli, tiny_model, good, broken, bad_steps, other, "--out", tmp_path / "o" / "{scene}.png")
    assert result.exit_code == 1
    assert result.stdout.split() == [str(tmp_path / "o" / "good.png"), str(tmp_path / "o" / "other.png")]
    assert "broken.yaml:2: not valid YAML" in result.stderr
    assert "lcm takes at most 50 steps" in result.stderr
    table = result.stderr[result.stderr.index("summary"):]
    for name, status in (("good", "done"), ("broken", "invalid"), ("toolong", "invalid"), ("other", "done")):
        assert any(name in line and status in line for line in table.splitlines()), table
    assert "2 done, 2 invalid" in table


def test_a_failure_during_generation_is_reported_and_the_rest_run(run_cli, tiny_model, tmp_path, monkeypatch):
    from smd_cli.app import requests as render

    original = render.generate

    def flaky(pipe, scene, **kwargs):
        if scene.name == "b":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(pipe, scene, **kwargs)

    monkeypatch.setattr(render, "generate", flaky)
    scenes = [small_scene(tmp_path, n) for n in "abc"]
    result = gen(run_cli, tiny_model, *scenes, "--json", "--out", tmp_path / "{scene}.png")
    assert result.exit_code == 1
    rows = json_lines(result.stdout)
    assert [(r["scene"], r["status"]) for r in rows] == [("a", "done"), ("b", "failed"), ("c", "done")]
    assert rows[1]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "Traceback" not in result.stderr
    verbose = gen(run_cli, tiny_model, scenes[1], "--verbose", "--out", tmp_path / "v.png")
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr  # --verbose shows where it came from


def test_nothing_could_start_exits_2(run_cli, tiny_model, tmp_path):
    a = write(tmp_path / "a.yaml", "seeed: 1\nlayers: [{prompt: a}]\n")
    b = write(tmp_path / "b.yaml", "layers: []\n")
    result = gen(run_cli, tiny_model, a, b)
    assert result.exit_code == 2
    assert "did you mean 'seed'" in result.stderr and "at least 1 item" in result.stderr


def test_json_keeps_stdout_machine_readable(run_cli, tiny_model, tmp_path):
    result = gen(run_cli, tiny_model, small_scene(tmp_path, "a"), "--json", "--out", tmp_path / "a.png")
    assert result.exit_code == 0
    (row,) = json_lines(result.stdout)
    assert set(row) == {"scene", "file", "seed", "path", "seconds", "status"}
    assert row["path"] == str(tmp_path / "a.png") and row["file"] == str(tmp_path / "a.yaml")
    assert "loaded" in result.stderr and "image 1/1: a, seed 1" in result.stderr


def test_dry_run_loads_nothing_and_writes_nothing(run_cli, tiny_model, tmp_path, monkeypatch):
    from smd_cli.engine import pipeline

    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    scenes = [small_scene(tmp_path, "a"), small_scene(tmp_path, "b", seed=None)]
    out = tmp_path / "o" / "{scene}-{seed}.png"
    result = gen(run_cli, tiny_model, *scenes, "--seeds", "7,8", "--dry-run", "--json", "--out", out)
    assert result.exit_code == 0, result.stderr
    rows = json_lines(result.stdout)
    assert [(r["scene"], r["seed"], r["status"]) for r in rows] == [("a", 7, "planned"), ("a", 8, "planned"),
                                                                   ("b", 7, "planned"), ("b", 8, "planned")]
    assert rows[0]["path"] == str(tmp_path / "o" / "a-7.png") and rows[0]["width"] == 32
    assert not (tmp_path / "o").exists()
    table = gen(run_cli, tiny_model, *scenes, "--dry-run")
    assert table.exit_code == 0 and "2 image(s)" in table.stdout and "nothing loaded" in table.stdout
    broken = write(tmp_path / "broken.yaml", "layers: 3\n")
    partly = gen(run_cli, tiny_model, scenes[0], broken, "--dry-run")
    assert partly.exit_code == 1 and "broken.yaml:1: layers" in partly.stderr


def test_quiet_and_verbose(run_cli, tiny_model, tmp_path):
    scene = small_scene(tmp_path, "a")
    quiet = gen(run_cli, tiny_model, scene, "--quiet", "--out", tmp_path / "q.png")
    assert quiet.exit_code == 0 and quiet.stdout.strip() == str(tmp_path / "q.png")
    assert quiet.stderr.strip() == ""
    verbose = gen(run_cli, tiny_model, scene, "--verbose", "--out", tmp_path / "v.png")
    assert "needs about" in verbose.stderr and "GiB free on cpu" in verbose.stderr
    assert "prepare" in verbose.stderr and "32x32, 1 layer(s), 5 lcm steps" in verbose.stderr
    both = gen(run_cli, tiny_model, scene, "--quiet", "--verbose")
    assert both.exit_code == 2 and "--quiet or --verbose" in both.stderr


# --- Ctrl-C -----------------------------------------------------------------------------------


def test_ctrl_c_in_a_batch_keeps_what_was_done_and_exits_130(run_cli, tiny_model, tmp_path, monkeypatch):
    from smd_cli.app import requests as render

    original, calls = render.generate, []

    def interrupted_second(pipe, scene, **kwargs):
        calls.append(scene.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(pipe, scene, **kwargs)

    monkeypatch.setattr(render, "generate", interrupted_second)
    scenes = [small_scene(tmp_path, n) for n in "abc"]
    result = gen(run_cli, tiny_model, *scenes, "--out", tmp_path / "o" / "{scene}.png")
    assert result.exit_code == 130
    assert calls == ["a", "b"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.png"]
    assert result.stdout.split() == [str(tmp_path / "o" / "a.png")]
    assert "interrupted" in result.stderr
    assert "1 done, 1 interrupted, 1 skipped" in result.stderr


def test_ctrl_c_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    from smd_cli.core.outputs import save_image

    image = Image.new("RGB", (64, 64), (200, 10, 10))

    def half_then_interrupt(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half of a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_image(image, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


# --- metadata, show and reproduce ---------------------------------------------------------------


def test_png_records_the_resolved_scene(run_cli, tiny_model, scene_dir, tmp_path):
    import yaml

    import smd_cli
    from smd_cli.app.records import sha256

    out = tmp_path / "x.png"
    result = gen(run_cli, tiny_model, scene_dir / "scene.yaml", "--out", out, "--steps", "3")
    assert result.exit_code == 0, result.stderr
    text = Image.open(out).text
    scene = yaml.safe_load(text["smd-scene"])
    assert scene["seed"] == 42 and scene["steps"] == 3 and (scene["width"], scene["height"]) == (64, 64)
    assert scene["model"] == str(tiny_model) and scene["lcm_lora"] == "none"
    assert scene["mask_type"] == "discrete" and scene["cover_alpha"] == 0.3  # defaults written out
    palette = scene_dir / "masks" / "palette.png"
    assert scene["layers"][0]["mask"]["palette"] == str(palette)
    assert scene["layers"][0]["mask"]["sha256"] == sha256(palette)  # each file's hash beside its path
    files = yaml.safe_load(text["smd-files"])
    assert files == {str(palette): sha256(palette), str(scene_dir / "masks" / "right.png"):
                     sha256(scene_dir / "masks" / "right.png")}
    assert text["smd-version"] == smd_cli.__version__ and text["smd-seed"] == "42" and text["smd-name"] == "scene"
    assert set(json.loads(text["smd-timings"])) == {"prepare", "generate"}
    assert text["parameters"].startswith("background: blue sky | sun: the sun | lake: blue lake")
    assert "Steps: 3, Sampler: LCM, CFG scale: 1.0, Seed: 42, Size: 64x64" in text["parameters"]

    shown = run_cli("show", out)
    assert shown.exit_code == 0
    doc = yaml.safe_load(shown.stdout)
    assert doc["seed"] == 42 and doc["scene"] == scene and doc["files"][str(palette)]["now"] == "matches"
    assert json.loads(run_cli("show", out, "--json").stdout)["model"] == str(tiny_model)


def test_reproduce_is_bit_identical_on_the_cpu(run_cli, tiny_model, scene_dir, tmp_path):
    out = tmp_path / "x.png"
    assert gen(run_cli, tiny_model, scene_dir / "scene.yaml", "--out", out, "--seed", "9",
               "--set", "layers[0].prompt=a red sun").exit_code == 0
    again = run_cli("reproduce", out)
    assert again.exit_code == 0, again.stderr
    copy = tmp_path / "x-reproduced.png"
    assert again.stdout.strip() == str(copy)
    assert f"identical to {out}" in again.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(out)))
    assert Image.open(copy).text["smd-scene"] == Image.open(out).text["smd-scene"]

    # A repainted mask: reproduce says which file changed, and the picture differs.
    mask = scene_dir / "masks" / "right.png"
    Image.fromarray(255 - np.asarray(Image.open(mask))).save(mask)
    changed = run_cli("reproduce", out, "--out", tmp_path / "y.png")
    assert changed.exit_code == 0
    assert f"layers[2].mask: {mask} has changed since its sha256 was recorded" in changed.stderr
    assert f"differs from {out}" in changed.stderr
    assert "changed" in run_cli("show", out).stdout


def test_python_api_saves_and_reads_records(pipe, scene_dir, tmp_path):
    from smd_cli.app.records import read_record
    from smd_cli.scenes.scene import load_scene

    result = generate(pipe, load_scene(scene_dir / "scene.yaml"))
    first = result.save(tmp_path / "a.png")
    second = result.save(tmp_path / "a.png")
    assert (first.name, second.name) == ("a.png", "a-1.png")
    record = read_record(first)
    assert record.seed == 42 and record.name == "scene" and record.dtype == "float32"
    assert all(status == "matches" for _, status in record.check_files())
    again = generate(pipe, record.scene_file())
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(result.image))
    for suffix in ("jpg", "webp"):  # the record rides in XMP, `parameters` in EXIF as other tools read it
        other = read_record(result.save(tmp_path / f"b.{suffix}"))
        assert (other.scene, other.seed, other.files) == (record.scene, record.seed, record.files)
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.jpg")
    with pytest.raises(SmdError, match="no smd metadata"):
        read_record(tmp_path / "plain.jpg")


def test_records_made_before_centring_existed_reproduce_without_it(pipe, scene_dir, tmp_path):
    from smd_cli.app.records import read_record
    from smd_cli.scenes.scene import load_scene

    plain = generate(pipe, load_scene(scene_dir / "scene.yaml", ["bootstrap.centre=false"]))
    centred = generate(pipe, load_scene(scene_dir / "scene.yaml"))
    assert np.abs(np.asarray(plain.image, int) - np.asarray(centred.image, int)).mean() > 0.5
    record = read_record(plain.save(tmp_path / "old.png"))
    assert record.scene["bootstrap"]["centre"] is False
    del record.scene["bootstrap"]["centre"]  # as smd 0.1.0 wrote it
    again = generate(pipe, record.scene_file())
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(plain.image))


def test_records_keep_the_stride_and_those_of_smd_0_2_reproduce_half_a_tile_apart(pipe, scene_dir, tmp_path):
    from smd_cli.app.records import read_record
    from smd_cli.scenes.scene import load_scene

    half = generate(pipe, load_scene(scene_dir / "scene.yaml", ["tile_size=32", "tile_stride=16"]))
    default = generate(pipe, load_scene(scene_dir / "scene.yaml", ["tile_size=32"]))  # views 24 px apart
    assert np.abs(np.asarray(half.image, int) - np.asarray(default.image, int)).mean() > 0.5
    assert read_record(default.save(tmp_path / "new.png")).scene["tile_stride"] == 24  # the default, written down
    record = read_record(half.save(tmp_path / "old.png"))
    del record.scene["tile_stride"]  # as smd 0.2.0 wrote it, when views were half a tile apart
    record.version = "0.2.0"
    again = generate(pipe, record.scene_file())
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(half.image))
    record.version = "0.3.0"  # a record of this version without the key takes today's default
    assert record.scene_file().scene.tile_stride is None


def test_images_of_smd_0_2_reproduce_bit_for_bit(run_cli, tiny_model, scene_dir, tmp_path):
    """smd 0.2 decoded on a CPU with the VAE in contiguous memory and stepped views by half a tile:
    an image it made (here: made that way, its record rewritten as 0.2.0 wrote it) comes out again
    identical; with today's channels-last VAE it would not."""
    from smd_cli import StableMultiDiffusionPipeline
    from smd_cli.app.records import png_info, read_record
    from smd_cli.scenes.scene import load_scene

    old = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model))
    old.vae.to(memory_format=torch.contiguous_format)
    sf = load_scene(scene_dir / "scene.yaml", [f"model={tiny_model}", "tile_size=32", "tile_stride=16"])
    made = generate(old, sf)
    now = generate(StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model)), sf)
    assert (np.asarray(made.image) != np.asarray(now.image)).any()  # the VAE's memory shows in the pixels
    record = made.record
    del record.scene["tile_stride"]
    record.version = "0.2.0"
    made.image.save(tmp_path / "old.png", pnginfo=png_info(record))
    again = run_cli("reproduce", tmp_path / "old.png", "--check")
    assert again.exit_code == 0, again.stderr
    assert f"identical to {tmp_path / 'old.png'}" in again.stderr
    assert read_record(tmp_path / "old-reproduced.png").scene["tile_stride"] == 16


def test_a_scene_with_recorded_hashes_warns_when_a_file_changed(run_cli, tmp_path):
    from smd_cli.app.records import sha256

    Image.new("L", (32, 32), 255).save(tmp_path / "m.png")
    digest = sha256(tmp_path / "m.png")
    scene = write(tmp_path / "s.yaml", f"layers:\n  - prompt: a\n    mask: {{image: m.png, sha256: {digest}}}\n")
    same = run_cli("validate", scene)
    assert same.exit_code == 0 and "warning" not in same.stderr
    Image.new("L", (32, 32), 200).save(tmp_path / "m.png")
    changed = run_cli("validate", scene)
    assert changed.exit_code == 0  # still a valid scene: the new file is used, with a warning
    assert f"warning: {scene}:3: layers[0].mask: {tmp_path / 'm.png'} has changed since its sha256" in changed.stderr


def test_show_on_an_image_without_a_record(run_cli, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = run_cli("show", tmp_path / "plain.png")
    assert result.exit_code == 2 and "no smd metadata in this image" in result.stderr
    result = run_cli("reproduce", tmp_path / "missing.png")
    assert result.exit_code == 2 and "missing.png: file not found" in result.stderr


def test_reproduce_a_prompt_only_image(run_cli, tiny_model, tmp_path):
    out = tmp_path / "p.png"
    result = gen(run_cli, tiny_model, "--prompt", "a lighthouse", "--width", "32", "--height", "32", "--out", out)
    assert result.exit_code == 0
    again = run_cli("reproduce", out, "--out", tmp_path / "q.png")
    assert again.exit_code == 0 and "identical to" in again.stderr


# --- faults and limits --------------------------------------------------------------------------


def test_out_of_memory_halves_the_batch_until_it_fits(pipe, monkeypatch):
    import torch

    from smd_cli.engine.pipeline import StableMultiDiffusionPipeline

    calls = []
    original = StableMultiDiffusionPipeline.predict

    def small_device(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, x, *args, **kwargs)

    masks = np.zeros((3, 64, 64), np.float32)
    masks[0, :, :32], masks[1, :, 32:], masks[2, 16:48, 16:48] = 1, 1, 1
    kwargs = dict(masks=masks, height=64, width=64, output_type="np", bootstrap_steps=0)
    reference = pipe(["a", "b", "c"], generator=torch.Generator().manual_seed(0), max_batch=2, **kwargs)
    monkeypatch.setattr(StableMultiDiffusionPipeline, "predict", small_device)
    with pytest.warns(UserWarning, match="out of memory with 3 .* retrying with 2"):
        image = pipe(["a", "b", "c"], generator=torch.Generator().manual_seed(0), max_batch=8, **kwargs)
    np.testing.assert_array_equal(image, reference)
    assert calls[:3] == [3, 2, 1] and set(calls[3:]) == {2, 1}  # the halved size holds for later steps

    monkeypatch.setattr(StableMultiDiffusionPipeline, "predict",
                        lambda self, *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.warns(UserWarning), pytest.raises(SmdError, match="out of memory even with one"):
        pipe(["a", "b", "c"], generator=torch.Generator().manual_seed(0), max_batch=8, **kwargs)


def test_a_canvas_too_large_for_the_device_is_refused_before_loading(run_cli, tiny_model, tmp_path, monkeypatch):
    from smd_cli.engine import memory, pipeline

    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(memory, "available_memory", lambda device: 2 * 1024**3)
    scene = write(tmp_path / "big.yaml", "width: 8192\nheight: 8192\nlayers: [{prompt: a}]\n")
    result = gen(run_cli, tiny_model, scene)
    assert result.exit_code == 2
    assert "big.yaml:1: width: a 8192x8192 canvas needs about" in result.stderr
    assert "but only 2.0 GiB is free" in result.stderr
    assert "lower --max-batch or tile_size" in result.stderr or "--vae tiny" in result.stderr


# --- several processes --------------------------------------------------------------------------


def _smd(*args: str, cwd: Path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_process_of_a_shared_batch_exits_with_its_code_and_its_output(tmp_path):
    """A process started as one of several (WORLD_SIZE above 1) ends with os._exit after its
    command, skipping the interpreter's teardown: its exit code, stdout and stderr still come out."""
    import os
    import subprocess
    import sys

    write(tmp_path / "ok.yaml", "layers: [{prompt: a}]\n")
    env = dict(os.environ, WORLD_SIZE="2", RANK="1")

    def smd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "smd_cli", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)

    fine = smd("validate", "ok.yaml")
    assert fine.returncode == 0 and "ok.yaml" in fine.stdout + fine.stderr
    missing = smd("validate", "missing.yaml")
    assert missing.returncode == 2 and "missing.yaml" in missing.stderr
    assert smd("--version").stdout.strip().startswith("smd ")


def test_distributed_shards_the_batch_across_two_processes(tiny_model, tmp_path):
    for name in "abc":
        small_scene(tmp_path, name)
    write(tmp_path / "broken.yaml", "seeed: 1\nlayers: [{prompt: x}]\n")
    done = _smd("-m", "smd_cli", "generate", "a.yaml", "b.yaml", "broken.yaml", "c.yaml", "--model", str(tiny_model),
                "--device", "cpu", "--json", "--verbose", "--out", "o/{scene}.png", "--distributed", "--processes",
                "2", cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # one scene was broken; the others were made
    rows = json_lines(done.stdout)
    assert sorted((r["scene"], r["status"]) for r in rows) == [("a", "done"), ("b", "done"), ("broken", "invalid"),
                                                               ("c", "done")]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.png", "b.png", "c.png"]
    assert "process 1 of 2: 2 of 3 images" in done.stderr and "process 2 of 2: 1 of 3 images" in done.stderr
    assert done.stderr.count("summary") == 1 and "3 done, 1 invalid" in done.stderr
    assert done.stderr.count("did you mean 'seed'") == 1  # reported once, not by every process
    assert "Traceback" not in done.stderr


def test_accelerate_launch_runs_smd_as_a_module(tiny_model, tmp_path):
    for name in "abcd":
        small_scene(tmp_path, name)
    done = _smd("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "smd_cli",
                "generate", "a.yaml", "b.yaml", "c.yaml", "d.yaml", "--model", str(tiny_model), "--device", "cpu",
                "--verbose", "--out", "o/{scene}-{index}.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(Path(p).name for p in done.stdout.split()) == ["a-0.png", "b-1.png", "c-2.png", "d-3.png"]
    assert done.stderr.count("of 2: 2 of 4 images") == 2 and done.stderr.count("loaded") == 2
    assert done.stderr.count("summary") == 1


# --- found in review ------------------------------------------------------------------------------


def test_overwrite_never_lets_images_of_one_batch_replace_each_other(run_cli, tiny_model, tmp_path):
    scene = small_scene(tmp_path, "c", extra="output: fixed.png\n")
    result = gen(run_cli, tiny_model, scene, "--seeds", "1-3", "--overwrite")
    assert result.exit_code == 2 and "images would replace each other in" in result.stderr
    numbered = gen(run_cli, tiny_model, scene, "--seeds", "1-2")  # without --overwrite they are numbered
    assert [Path(p).name for p in numbered.stdout.split()] == ["fixed.png", "fixed-1.png"]


def test_outputs_get_the_usual_permissions(run_cli, tiny_model, tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        assert gen(run_cli, tiny_model, small_scene(tmp_path, "a"), "--out", tmp_path / "a.png").exit_code == 0
    finally:
        os.umask(mask)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644


def test_a_scene_output_folder_that_does_not_exist_yet(run_cli, tiny_model, tmp_path):
    scene = small_scene(tmp_path, "b", extra="output: renders/\n")
    result = gen(run_cli, tiny_model, scene)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "renders" / "b-1.png")


def test_paths_print_as_they_are_on_disk(run_cli, tiny_model, tmp_path):
    result = gen(run_cli, tiny_model, small_scene(tmp_path, "cat"), "--json",
                 "--out", tmp_path / "x:{scene}:{seed}.png")
    assert result.exit_code == 0
    (row,) = json_lines(result.stdout)
    assert row["path"] == str(tmp_path / "x:cat:1.png") and Path(row["path"]).is_file()


def test_the_hash_recorded_is_of_the_bytes_the_masks_were_made_from(pipe, tmp_path):
    from smd_cli.app.records import read_record
    from smd_cli.scenes.canvas import scene_masks
    from smd_cli.scenes.scene import load_scene

    Image.new("L", (32, 32), 255).save(tmp_path / "m.png")
    scene = load_scene(write(tmp_path / "s.yaml", "seed: 1\nlayers:\n  - {prompt: a, mask: m.png}\n"))
    masks = scene_masks(scene)
    Image.new("L", (32, 32), 0).save(tmp_path / "m.png")  # repainted while the batch runs
    path = generate(pipe, scene, masks=masks).save(tmp_path / "x.png")
    assert read_record(path).check_files() == [(str(tmp_path / "m.png"), "changed")]


def test_a_record_that_expands_without_end_is_refused(run_cli, tmp_path):
    from PIL.PngImagePlugin import PngInfo

    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdef", "bcdefg"))
    info = PngInfo()
    info.add_itxt("smd-scene", bomb)
    Image.new("RGB", (8, 8)).save(tmp_path / "bomb.png", pnginfo=info)
    result = run_cli("show", tmp_path / "bomb.png", "--json")
    assert result.exit_code == 2 and "the smd metadata is damaged" in result.stderr


def test_memory_hint_follows_the_autoencoder(run_cli, tiny_model, tmp_path, monkeypatch):
    from smd_cli.engine import memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 2 * 1024**3)
    scene = write(tmp_path / "big.yaml", "width: 8192\nheight: 8192\nlayers: [{prompt: a}]\n")
    full = gen(run_cli, tiny_model, scene, "--dry-run", "--vae-tiles", "off")  # one pass: tiles would fit
    assert full.exit_code == 2 and "use --vae tiny, whose decoder needs far less" in full.stderr
    tiny = gen(run_cli, tiny_model, scene, "--dry-run", "--vae", "tiny", "--vae-tiles", "off")  # TAESD is wider
    assert tiny.exit_code == 2 and "the decoder alone is too large" in tiny.stderr
    # With SD's own autoencoder (a hub id's defaults), the tiny one needs several times less.
    sizes = dict(width=8192, height=8192, factor=8, tile_size=768, max_batch=1, cfg=False, dtype_bytes=2)
    sd = memory.estimate_memory("some/sd-model", **sizes)
    taesd = memory.estimate_memory("some/sd-model", vae="tiny", **sizes)
    assert sd.vae_is_full and not taesd.vae_is_full and sd.decode > 4 * taesd.decode


def test_a_panorama_scene_that_is_not_there(run_cli):
    result = run_cli("panorama", "missng.yaml")
    assert result.exit_code == 2 and "missng.yaml: scene file not found" in result.stderr


# --- the library behind the command -------------------------------------------------------------


def test_the_batch_engine_from_python(tiny_model, tmp_path):
    """What `smd generate` runs, called from Python: every check before loading, events for everything."""
    from smd_cli.app import batch

    scenes = [small_scene(tmp_path, "a"), write(tmp_path / "broken.yaml", "layers: [\n"), small_scene(tmp_path, "b")]
    options = batch.Options(model=str(tiny_model), device="cpu", seeds=[1, 2],
                            output=str(tmp_path / "o" / "{scene}-{seed}.png"))
    events: list = []
    plan = batch.plan(scenes, options, on_event=events.append)
    assert [(j.scene.name, j.seed) for j in plan.jobs] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert [o.scene for o in plan.invalid] == ["broken"] and "not valid YAML" in plan.invalid[0].error
    assert any(isinstance(e, batch.Message) and "needs about" in e.text for e in events)
    outcomes = batch.run(plan, options, on_event=events.append)
    assert [o.status for o in outcomes] == ["invalid", "done", "done", "done", "done"]
    assert batch.exit_code(outcomes) == 1
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a-1.png", "a-2.png", "b-1.png", "b-2.png"]
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("Loading") == 1 and kinds.count("Loaded") == 1  # one model for the whole batch
    steps = [(e.job.index, e.step) for e in events if isinstance(e, batch.Progress)]
    assert steps == [(i, k) for i in range(4) for k in range(6)]  # 0 when it starts, then each of 5 steps
    finished = [e.outcome.path for e in events if isinstance(e, batch.Finished)]
    assert finished == [o.path for o in outcomes[1:]]
