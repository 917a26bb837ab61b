"""Hostile inputs of two classes, closed at their root: work without a cost bound (views x layers x
steps, refused before any model loads, and `smd validate` linear in the layers), and one canvas
rule for every command and the Python API (`views.tiling`)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import write
from PIL import Image, ImageFilter

from smd_cli.core import defaults
from smd_cli.core.errors import SceneError, SmdError
from smd_cli.families import named

LAYER = "layers:\n  - {prompt: a cat}\n"


def layers(count: int, mask: str = "{rect: [0, 0, 1, 1]}") -> str:
    return "layers:\n" + "".join(f"  - {{prompt: p{i}, mask: {mask}}}\n" for i in range(count))


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the test if any model starts loading."""
    from smd_cli.app import batch

    def load(self, *args):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(batch.ModelCache, "_load", load)


def counting_unet(pipe):
    """A forward hook counting the denoiser's calls; returns (calls list, hook handle)."""
    calls = []
    return calls, pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))


# --- the one rule for a canvas on a model ---------------------------------------------------------


def test_the_rule_names_the_nearest_sizes_and_the_key():
    from smd_cli.method.views import CanvasError, Grid, tiling

    flux = Grid("flux", 8, 2, 1024, patched=True, label="FLUX.1")
    with pytest.raises(CanvasError, match=r"a FLUX.1 canvas is a multiple of 16 pixels on each side, got "
                                          r"1000x1000; use 992x992 or 1008x1008") as exc:
        tiling(flux, 1000, 1000)
    assert exc.value.key == "width"
    with pytest.raises(CanvasError, match="an SD3 canvas .* got 1024x1000; use 1024x992 or 1024x1008") as exc:
        tiling(Grid("sd3", 8, 2, 1024, patched=True, label="SD3"), 1024, 1000)
    assert exc.value.key == "height"
    # SD and SDXL UNets pad their input: their canvases follow the VAE's factor alone.
    assert tiling(Grid("sd", 8, 8, 512), 1000, 1000).count > 0
    with pytest.raises(CanvasError, match="not divisible by the model's downscale factor 8; use multiples of 8, "
                                          "such as 96x64 or 104x64"):
        tiling(Grid("sd", 8, 8, 512), 100, 64)
    with pytest.raises(CanvasError, match="tile_stride 900 is larger than the tile") as exc:
        tiling(flux, 1024, 1024, tile_stride=900, tile_size=512)
    assert exc.value.key == "tile_stride"


def test_the_views_counted_are_the_views_laid_out():
    from smd_cli.method.views import Grid, layout, tiling

    grid = Grid("sd", 2, 2, 512)
    for width, height, tile, stride, circular in [(128, 64, 64, None, False), (1024, 64, 64, 2, False),
                                                  (200, 120, 40, 12, True), (64, 64, None, None, True),
                                                  (2048, 512, None, None, False), (100, 30, 16, 5, True)]:
        tiles = tiling(grid, width, height, tile_size=tile, tile_stride=stride, circular=circular)
        views = layout(height // 2, width // 2, (tiles.window, tiles.window), (tiles.stride, tiles.stride),
                       circular=circular)
        assert len(views) == tiles.count, (width, height, tile, stride, circular)


def test_planning_reads_the_grid_each_family_adapter_has(tiny_model, tiny_flux, tiny_sd3):
    from smd_cli import StableMultiDiffusionPipeline
    from smd_cli.method.views import Grid
    from smd_cli.scenes.presets import model_grid

    for folder in (tiny_model, tiny_flux, tiny_sd3):
        assert model_grid(str(folder)) == StableMultiDiffusionPipeline("cpu", hf_key=str(folder)).family.grid
    assert model_grid(None) == Grid("sd", 8, 8, 512, label="SD 1.x/2.x")  # the default model, before it is downloaded
    assert model_grid("black-forest-labs/FLUX.1-dev").multiple == 16  # a preset's family, before downloading
    assert model_grid("nobody/not-downloaded") is None  # known when it loads


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_flow_canvas_off_the_grid_is_a_plan_error_in_every_command(run_cli, family, tiny_flux, tiny_sd3,
                                                                      tmp_path, no_loading):
    model = tiny_flux if family == "flux" else tiny_sd3
    name = named(family).label
    scene = write(tmp_path / "odd.yaml", f"seed: 1\nwidth: 66\nheight: 64\n{LAYER}")
    said = f"odd.yaml:2: width: a{'n' * (family == 'sd3')} {name} canvas is a multiple of 4 pixels on each side, " \
           "got 66x64; use 64x64 or 68x64"
    for args in (("generate", scene, "--device", "cpu", "--out", tmp_path / "x.png"),
                 ("generate", scene, "--device", "cpu", "--dry-run"),
                 ("validate", scene),
                 ("stream", scene, "--device", "cpu", "--frames", "1")):
        result = run_cli(*args, "--model", model)
        assert result.exit_code == 2, (args, result.stderr)
        assert said in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
    result = run_cli("panorama", "a river", "--model", model, "--width", "130", "--height", "64", "--device", "cpu")
    assert result.exit_code == 2 and "got 130x64; use 128x64 or 132x64" in result.stderr


def test_a_paint_canvas_off_the_grid_is_refused_before_loading(tiny_flux, tmp_path, no_loading):
    from smd_cli.app import batch
    from smd_cli.app.web.paint import open_paint

    options = batch.Options(model=str(tiny_flux), device="cpu")
    with pytest.raises(SceneError, match="a FLUX.1 canvas is a multiple of 4 pixels on each side, got 66x64; use "
                                         "64x64 or 68x64"):
        open_paint(None, options, width=66, height=64, save_dir=tmp_path)
    scene = write(tmp_path / "odd.yaml", f"width: 66\nheight: 64\n{LAYER}")
    with pytest.raises(SceneError, match=r"odd.yaml:1: width: a FLUX.1 canvas"):
        open_paint(scene, options, save_dir=tmp_path)
    with pytest.raises(SmdError, match="--width 100000: each side of a canvas must be 8 to 16384 pixels"):
        open_paint(None, options, width=100_000, height=64, save_dir=tmp_path)


def test_the_python_api_says_the_same(tiny_flux):
    from smd_cli import StableMultiDiffusionPipeline, StreamMultiDiffusion

    flux = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_flux))
    calls, hook = counting_unet(flux)
    try:
        with pytest.raises(SmdError, match="a FLUX.1 canvas is a multiple of 4 pixels on each side, got 66x64; use "
                                           "64x64 or 68x64"):
            flux("a cat", width=66, height=64, num_inference_steps=1)
        with pytest.raises(SmdError, match="got 66x64; use 64x64 or 68x64"):  # before: a failure inside packing
            StreamMultiDiffusion(pipeline=flux, width=66, height=64)
    finally:
        hook.remove()
    assert calls == []


def test_a_stride_past_the_default_tile_is_a_plan_error(run_cli, tiny_model, tmp_path, no_loading):
    scene = write(tmp_path / "s.yaml", f"width: 64\nheight: 64\ntile_stride: 200\n{LAYER}")
    result = run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 2
    assert "s.yaml:3: tile_stride: tile_stride 200 is larger than the tile (64 pixels, the model's default)" \
        in result.stderr


def test_the_memory_estimate_takes_the_models_own_views(tmp_path, monkeypatch):
    """An SD 2.x folder (768 px native) gets 1024 px views on a 1024 px canvas, not SD 1.5's 768."""
    import torch

    from smd_cli.engine import memory
    from smd_cli.models.loading import model_grid
    from smd_cli.scenes.scene import load_scene

    folder = tmp_path / "sd2"
    write(folder / "unet" / "config.json", json.dumps({"sample_size": 96, "block_out_channels": [320, 640, 1280, 1280],
                                                        "cross_attention_dim": 1024}))
    write(folder / "vae" / "config.json", json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    assert model_grid(str(folder)).native == 768
    seen = []
    real = memory.estimate_memory
    monkeypatch.setattr(memory, "estimate_memory", lambda *a, **k: seen.append(k["tile_size"]) or real(*a, **k))
    sf = load_scene(write(tmp_path / "s.yaml", f"width: 1024\nheight: 1024\n{LAYER}"))
    memory.check_memory(sf, str(folder), width=1024, height=1024, factor=8, device=torch.device("cpu"),
                        dtype=torch.float32, free=None)
    memory.check_memory(sf, None, width=1024, height=1024, factor=8, device=torch.device("cpu"),
                        dtype=torch.float32, free=None)
    assert seen == [1024, 768]


# --- work without a cost bound --------------------------------------------------------------------


def test_the_estimate_and_its_limits():
    from smd_cli.method.views import work_problem

    assert work_problem(20, 10, 50, allow_large=False, allow="--allow-large") is None
    large = work_problem(241, 100, 5, allow_large=False, allow="--allow-large")
    assert "241 views x 100 layers x 5 steps = 120,500 denoiser passes per image, more than 100,000" in large
    assert "or give --allow-large to run it anyway" in large
    assert work_problem(241, 100, 5, allow_large=True, allow="--allow-large") is None
    absurd = work_problem(10_000, 1_000, 5, allow_large=True, allow="--allow-large")
    assert "= 50,000,000 denoiser passes per image, more than the 10,000,000 smd runs even with --allow-large" in absurd
    views = work_problem(defaults.MAX_VIEWS + 1, 1, 1, allow_large=True, allow="--allow-large")
    assert "16,385 views per layer and step, more than the 16,384 smd lays out" in views


def test_large_work_needs_the_flag_and_absurd_work_is_refused_in_every_command(run_cli, tiny_model, tmp_path,
                                                                                no_loading):
    # 1024 x 64 px in 64 px views 4 px apart (factor 2): 241 views, x 100 layers x 5 steps = 120,500.
    large = write(tmp_path / "large.yaml", f"seed: 1\nwidth: 1024\nheight: 64\ntile_size: 64\ntile_stride: 4\n"
                                           f"{layers(100)}")
    said = "large.yaml:5: tile_stride: 241 views x 100 layers x 5 steps = 120,500 denoiser passes per image"
    for args in (("generate", large, "--device", "cpu", "--out", tmp_path / "x.png"), ("validate", large),
                 ("generate", large, "--dry-run", "--device", "cpu")):
        result = run_cli(*args, "--model", tiny_model)
        assert result.exit_code == 2 and said in result.stderr and "--allow-large" in result.stderr, args
    assert run_cli("generate", large, "--dry-run", "--allow-large", "--model", tiny_model,
                   "--device", "cpu").exit_code == 0
    assert run_cli("validate", large, "--allow-large", "--model", tiny_model).exit_code == 0
    # 8 px views (6 px apart) on a 16384 px strip: a quarter of a million views, refused even with the flag.
    for args in (("panorama", "a river", "--width", "16384", "--height", "512", "--tile-size", "8"),
                 ("generate", "--prompt", "a river", "--width", "16384", "--height", "512", "--tile-size", "8")):
        result = run_cli(*args, "--model", tiny_model, "--device", "cpu", "--allow-large")
        assert result.exit_code == 2, result.stderr
        assert "views per layer and step, more than the 16,384 smd lays out even with --allow-large" in result.stderr


def test_the_steps_and_the_layers_are_named_when_they_multiply_most(run_cli, tiny_model, tmp_path):
    many = write(tmp_path / "many.yaml", f"width: 64\nheight: 64\nscheduler: ddim\nsteps: 1000\n{layers(101)}")
    result = run_cli("validate", many, "--model", tiny_model)
    assert result.exit_code == 2 and "many.yaml:4: steps: 1 view x 101 layers x 1,000 steps = 101,000" in result.stderr
    crowd = write(tmp_path / "crowd.yaml", "width: 64\nheight: 64\nsteps: 40\nlayers:\n" + "  - {prompt: p}\n" * 2501)
    result = run_cli("validate", crowd, "--model", tiny_model)
    assert result.exit_code == 2 and "crowd.yaml:4: layers: 1 view x 2,501 layers x 40 steps = 100,040" in result.stderr


def test_a_stream_and_a_painting_count_a_frames_work_before_loading(run_cli, tiny_model, tmp_path, no_loading):
    from smd_cli.app import batch
    from smd_cli.app.web.paint import open_paint

    # 8 px views at a stream's default stride on 1024 x 64 px: 1,881 views x 60 layers x 5 stages a frame.
    scene = write(tmp_path / "s.yaml", f"width: 1024\nheight: 64\ntile_size: 8\n{layers(60)}")
    result = run_cli("stream", scene, "--model", tiny_model, "--device", "cpu", "--frames", "1")
    assert result.exit_code == 2 and "denoiser passes per frame" in result.stderr and "s.yaml:3: tile_size" \
        in result.stderr
    with pytest.raises(SceneError, match="denoiser passes per frame, more than 100,000"):
        open_paint(scene, batch.Options(model=str(tiny_model), device="cpu"), save_dir=tmp_path)


def test_the_python_api_refuses_before_denoising(pipe):
    from smd_cli import StreamMultiDiffusion

    calls, hook = counting_unet(pipe)
    try:
        # 8 px views 2 px apart on 1024 x 64: 29 x 509 = 14,761 views, x 1 prompt x 10 steps.
        with pytest.raises(SmdError, match=r"14,761 views x 1 layer x 10 steps = 147,610 denoiser passes per "
                                           r"image, more than 100,000.*give allow_large=True"):
            pipe.sample_panorama("a river", width=1024, height=64, tile_size=8, tile_stride=2, num_inference_steps=10)
        with pytest.raises(SmdError, match="more than the 16,384 smd lays out even with allow_large=True"):
            pipe("a river", width=4096, height=4096, tile_size=8, tile_stride=2, allow_large=True)
        with pytest.raises(SmdError, match="each side of a canvas must be 8 to 16384 pixels, got 1000000x64"):
            pipe("a river", width=1_000_000, height=64)  # refused before a mask of that size is made
        # A stream's 8 px views at its default stride: 11 x 171 = 1,881 views x 5 stages, 9,405 passes a layer.
        stream = StreamMultiDiffusion(pipeline=pipe, width=1024, height=64, tile_size=8, autoflush=False)
        assert stream.view_count * len(stream.schedule) == 9405
        for i in range(10):
            stream.update_single_layer(i, prompt=f"p{i}")
        with pytest.raises(SmdError, match="1,881 views x 11 layers x 5 steps = 103,455 denoiser passes per frame"):
            stream.update_single_layer(10, prompt="one too many")
        assert len(stream.layers) == 10
    finally:
        hook.remove()
    assert calls == []


def test_validate_is_linear_in_the_layers(run_cli, tmp_path, monkeypatch):
    """5,000 layers that all overlap: no pair is compared (only their areas are counted), the table has
    a row a layer whatever the overlaps, and it all takes seconds (it took minutes pair by pair)."""
    from smd_cli.method.masks import LayerMask
    from smd_cli.scenes import canvas
    from smd_cli.scenes.scene import load_scene

    compared = []
    real = LayerMask.within
    monkeypatch.setattr(LayerMask, "within", lambda self, *a: compared.append(1) or real(self, *a))
    scene = write(tmp_path / "s.yaml", f"width: 64\nheight: 64\n{layers(5000)}")
    started = time.perf_counter()
    result = run_cli("validate", scene)
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.stderr
    assert compared == []
    assert result.stdout.count("100.0% with others") == 5000
    assert len(result.stdout) < 5000 * 300  # a row a layer, not a list of every other layer
    assert seconds < 120  # some 10 s on a busy 2-core machine
    # Few layers are still paired up by name; a row names the largest few of them.
    few = load_scene(write(tmp_path / "f.yaml", f"width: 16\nheight: 16\n{layers(20)}"))
    rows, _ = canvas.coverage_report(canvas.scene_masks(few))
    assert len(rows[0].overlaps) == 19 and rows[0].shared == 100
    from smd_cli.app.report import OVERLAPS_SHOWN, overlaps

    assert overlaps(rows[0]).endswith(f"and {19 - OVERLAPS_SHOWN} more")


def test_thousands_of_palette_colours_read_the_palette_once(tmp_path, monkeypatch):
    from smd_cli.scenes import canvas
    from smd_cli.scenes.scene import load_scene

    colours = [f"#{(i * 2654435761) % 2**24 | 1:06x}" for i in range(1, 2001)]
    colours = list(dict.fromkeys(colours))
    image = np.zeros((64, 64, 3), np.uint8)
    for n, colour in enumerate(colours):
        image[n // 64 % 64, n % 64] = [int(colour[k : k + 2], 16) for k in (1, 3, 5)]
    Image.fromarray(image).save(tmp_path / "p.png")
    read = []
    real = canvas.palette_labels
    monkeypatch.setattr(canvas, "palette_labels", lambda *a: read.append(1) or real(*a))
    sf = load_scene(write(tmp_path / "s.yaml", "width: 64\nheight: 64\nlayers:\n" + "".join(
        f"  - {{prompt: p, mask: {{palette: p.png, color: '{c}'}}}}\n" for c in colours)))
    masks = canvas.scene_masks(sf)
    assert read == [1] and len(masks.layers) == len(colours)
    assert all(box.values.sum() == 1 for box in masks.layers)  # each colour is its one pixel


def _brute_force_labels(image: Image.Image, colors: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The nearest listed colour of every pixel, every distance measured: what `palette_labels` must equal."""
    from smd_cli.method.masks import PALETTE_TOLERANCE, hex_to_rgb

    rgba = np.asarray(image.convert("RGBA")).astype(np.int64)
    opaque = rgba[..., 3] >= 128
    palette = np.array([hex_to_rgb(c) for c in colors], dtype=np.int64)
    dist = ((rgba[..., None, :3] - palette) ** 2).sum(-1)  # [H, W, colours]
    present = (dist[opaque] <= PALETTE_TOLERANCE**2).any(axis=0)
    dist[..., ~present] = np.iinfo(np.int64).max
    labels = dist.argmin(axis=-1)
    labels[~opaque | ~present.any()] = -1
    return labels, present


def test_palette_labels_are_those_of_every_distance_measured():
    from smd_cli.method.masks import palette_labels

    rng = np.random.default_rng(0)
    for _ in range(200):
        base = rng.integers(0, 256, (int(rng.integers(1, 10)), 3))
        pixels = base[rng.integers(0, len(base), (12, 12))]
        pixels = np.clip(pixels + rng.integers(-40, 40, pixels.shape) * (rng.random((12, 12, 1)) < 0.3), 0, 255)
        alpha = np.where(rng.random((12, 12)) < 0.2, rng.integers(0, 256, (12, 12)), 255)
        image = Image.fromarray(np.dstack([pixels, alpha]).astype(np.uint8), "RGBA")
        if rng.random() < 0.3:
            image = image.filter(ImageFilter.BoxBlur(1))
        listed = ["#%02x%02x%02x" % tuple(c) for c in base[: rng.integers(1, len(base) + 1)]]
        listed += ["#%02x%02x%02x" % tuple(c) for c in rng.integers(0, 256, (int(rng.integers(0, 4)), 3))]
        listed = list(dict.fromkeys(listed))
        got, expected = palette_labels(image, listed), _brute_force_labels(image, listed)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
