"""The hires pass (docs/large-pictures.md "Two passes: hires"): a first image upscaled and denoised
again from a strength with the same layers, in pixels or in latents, from the CLI and `smd upscale`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import denoiser_rows
from PIL import Image

from smd_cli.core.errors import SmdError
from smd_cli.method.views import tiling

SIZE = 64


def _halves() -> np.ndarray:
    masks = np.zeros((2, SIZE, SIZE), np.float32)
    masks[0, :, : SIZE // 2] = 1
    masks[1, :, SIZE // 2:] = 1
    return masks


def _gen(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _make(pipe, hires=None, **kw):
    return pipe(["a red cat", "a blue dog"], masks=_halves(), generator=_gen(), num_inference_steps=2, hires=hires,
                output_type="np", **kw)


def test_strength_zero_gives_the_upscaled_first_pass(pipe):
    first = pipe(["a red cat", "a blue dog"], masks=_halves(), generator=_gen(), num_inference_steps=2,
                 output_type="latent")
    # Pixels: the first image (8 bits, as saved) resized with Lanczos, encoded, decoded: exactly.
    resized = pipe.to_image(pipe.pixels(first)).resize((2 * SIZE, 2 * SIZE), Image.LANCZOS)
    expected = pipe.pixels(pipe.encode_image(resized))
    got = _make(pipe, dict(scale=2, strength=0.0))
    assert got.shape == (2 * SIZE, 2 * SIZE, 3)
    np.testing.assert_array_equal(got, expected)
    # Latents: the first latent interpolated (bilinear), decoded: exactly.
    big = torch.nn.functional.interpolate(first, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(_make(pipe, dict(scale=2, strength=0.0, upscale="latents")), pipe.pixels(big))


@pytest.mark.parametrize("upscale", ["pixels", "latents"])
def test_second_pass_denoises_every_view_of_the_larger_canvas(pipe, upscale):
    def run(hires=None):
        return pipe("a red cat", generator=_gen(), num_inference_steps=2, height=SIZE, width=SIZE, max_batch=1,
                    hires=hires, output_type="np")

    first = len(denoiser_rows(pipe, run))
    both = len(denoiser_rows(pipe, lambda: run(dict(scale=2, strength=0.5, steps=4, upscale=upscale))))
    grid = pipe.family.grid
    views = tiling(grid, 2 * SIZE, 2 * SIZE, tile_size=pipe.family.tile_size(SIZE, SIZE)).count
    assert first == 2 * tiling(grid, SIZE, SIZE).count and views > tiling(grid, SIZE, SIZE).count
    assert both - first == 2 * views  # 2 of 4 steps, one call per view (max_batch 1, guidance 1)


def test_regions_stay_in_place(pipe):
    from smd_cli.engine import hires
    from smd_cli.engine.prepare import Layers, Request

    masks = np.zeros((1, SIZE, SIZE), np.float32)
    masks[0, 8:24, 40:56] = 1
    request = Request(Layers(["a"], [""], masks, [1.0], [2.0], [1.0]), SIZE, SIZE, "", "",
                      None, hires=hires.Hires(2.0, 0.5))
    big = hires.second_request(request, 2 * SIZE, 2 * SIZE, None, 32)
    m = big.layers.masks[0]
    assert m.shape == (2 * SIZE, 2 * SIZE)
    ys, xs = np.nonzero(m > 0.5)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (16, 48, 80, 112)  # resized, not shifted
    assert big.layers.stds == [4.0] and big.bootstrap_steps == 0


def test_hires_settings_are_checked(pipe):
    with pytest.raises(SmdError, match="above 1"):
        _make(pipe, dict(scale=0.5, strength=0.5))
    with pytest.raises(SmdError, match="strength must be 0 to 1"):
        _make(pipe, dict(scale=2, strength=1.5))
    with pytest.raises(SmdError, match="lower the hires scale"):
        _make(pipe, dict(scale=200, strength=0.5))


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_other_families(request, family):
    from smd_cli import StableMultiDiffusionPipeline

    folder = request.getfixturevalue({"sdxl": "tiny_sdxl", "sd3": "tiny_sd3", "flux": "tiny_flux"}[family])
    pipe = StableMultiDiffusionPipeline("cpu", hf_key=str(folder))
    out = pipe(["a red cat", "a blue dog"], masks=_halves(), generator=_gen(), num_inference_steps=2,
               hires=dict(scale=2, strength=0.5), output_type="np")
    assert out.shape == (2 * SIZE, 2 * SIZE, 3) and np.isfinite(out).all()


def _scene(tmp_path, extra: str = "") -> str:
    path = tmp_path / "hires.yaml"
    path.write_text("seed: 7\nwidth: 64\nheight: 64\nsteps: 2\n" + extra + "layers:\n"
                    "  - prompt: a red cat\n    mask: {rect: [0, 0, 32, 64]}\n"
                    "  - prompt: a blue dog\n    mask: {rect: [32, 0, 64, 64]}\n")
    return str(path)


def test_cli_hires_and_reproduce_and_upscale(run_cli, tiny_model, tmp_path):
    scene = _scene(tmp_path)
    out = tmp_path / "big.png"
    made = run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--hires-scale", "2",
                   "--hires-strength", "0.5", "--out", out)
    assert made.exit_code == 0, made.output
    assert Image.open(out).size == (128, 128)
    again = run_cli("reproduce", out, "--check")
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "big-reproduced.png")))
    # smd upscale of the plain first image makes what generate made in one go, to the last bit or two.
    small = tmp_path / "small.png"
    assert run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--out", small).exit_code == 0
    up = run_cli("upscale", small, "--scale", "2", "--strength", "0.5", "--model", tiny_model)
    assert up.exit_code == 0, up.output
    a, b = (np.asarray(Image.open(p), np.int16) for p in (tmp_path / "small-upscaled.png", out))
    # The same pass but for float rounding (its views batched as its own memory check says): a few 1/255 steps.
    assert a.shape == b.shape and np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.05, np.abs(a - b).mean()


@pytest.mark.parametrize(("args", "message"), [
    (["--hires-scale", "0.5"], "hires.scale"),
    (["--hires-scale", "100"], "lower hires.scale"),
    (["--hires-scale", "2", "--hires-strength", "1.5"], "hires.strength"),
])
def test_cli_refuses_bad_hires(run_cli, tiny_model, tmp_path, args, message):
    result = run_cli("generate", _scene(tmp_path), "--model", tiny_model, "--device", "cpu", "--dry-run", *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_upscale_without_record_needs_a_scene(run_cli, tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "plain.png")
    result = run_cli("upscale", tmp_path / "plain.png", "--scale", "2")
    assert result.exit_code == 2 and "give a scene" in result.output and "Traceback" not in result.output


def test_hires_controlnet(run_cli, tiny_model, tiny_sd3, tmp_path):
    from tinymodel import write_tiny_controlnet

    net = write_tiny_controlnet(tiny_model, tmp_path / "tile")
    scene = _scene(tmp_path, f"hires: {{scale: 2, strength: 0.5, controlnet: {net}, controlnet_scale: 1.0}}\n")
    with_net = run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--out", tmp_path / "net.png")
    assert with_net.exit_code == 0, with_net.output
    without = run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--set", "hires.controlnet=null",
                      "--out", tmp_path / "plain.png")
    assert without.exit_code == 0, without.output
    a, b = (np.asarray(Image.open(tmp_path / n), np.int16) for n in ("net.png", "plain.png"))
    assert a.shape == (128, 128, 3) and np.abs(a - b).max() > 0  # the ControlNet acts on the second pass
    refused = run_cli("generate", scene, "--model", tiny_sd3, "--device", "cpu", "--out", tmp_path / "sd3.png")
    assert refused.exit_code != 0 and "hires.controlnet" in refused.output and "Traceback" not in refused.output


def test_one_progress_bar_over_both_passes(tiny_model, tmp_path):
    """A hires image's steps count up once over both passes (4 + the last 2 of 4 here); the
    hires pass alone, for `smd upscale`, counts its own."""
    from smd_cli.app import batch

    scene = Path(_scene(tmp_path, "hires: {scale: 2, strength: 0.5}\n"))
    scene.write_text(scene.read_text().replace("steps: 2", "steps: 4"))
    for upscale, total in ((None, 6), (tmp_path / "first.png", 2)):
        options = batch.Options(model=str(tiny_model), device="cpu", upscale=str(upscale) if upscale else None,
                                output=str(tmp_path / ("second.png" if upscale else "first.png")))
        events: list = []
        outcomes = batch.run(batch.plan([str(scene)], options, on_event=events.append), options,
                             on_event=events.append)
        assert [o.status for o in outcomes] == ["done"]
        progress = [(e.step, e.steps) for e in events if isinstance(e, batch.Progress)]
        assert progress == [(k, total) for k in range(total + 1)]
