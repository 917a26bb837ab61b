"""The paper's published masks load through scene files at their published sizes (docs/method.md §2.2)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REFERENCE, write
from PIL import Image

from smd_cli.method.masks import image_mask
from smd_cli.scenes.canvas import scene_masks
from smd_cli.scenes.scene import load_scene

pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference scenes not available on this machine")

# name: (published width, height, layer mask files, palette image)
PUBLISHED = {
    "timessquare": (768, 768, ["timessquare_1.png", "timessquare_2.png"], "timessquare_full.png"),
    "irworobongdo": (1920, 768, [f"irworobongdo_{i}.png" for i in range(1, 9)], "irworobongdo_full.png"),
    "zeus": (512, 768, ["prompt_p1.png", "prompt_p2.png"], "prompt.png"),
    "fantasy_large": (1024, 1024, ["fantasy_large_1.png", "fantasy_large_2.png"], "fantasy_large_full.png"),
}


def _flat_color(path) -> str:
    rgba = np.asarray(Image.open(path).convert("RGBA"))
    r, g, b = rgba[rgba[..., 3] > 127][:, :3][0]
    return f"#{r:02x}{g:02x}{b:02x}"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_reference_layer_masks_load_at_their_published_size(tmp_path, name):
    width, height, files, _ = PUBLISHED[name]
    folder = REFERENCE / name
    layers = "".join(f"  - {{prompt: layer {i}, mask: {folder / f}}}\n" for i, f in enumerate(files))
    sf = load_scene(write(tmp_path / f"{name}.yaml", "layers:\n" + layers))
    got = scene_masks(sf)
    assert (got.width, got.height) == (width, height)  # the canvas comes from the masks
    for i, f in enumerate(files):
        painted = image_mask(Image.open(folder / f)) > 0.5  # "alpha > 0.5 is painted"
        np.testing.assert_array_equal(got.masks[i] > 0.5, painted)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_reference_palette_images_match_the_layer_masks(tmp_path, name):
    width, height, files, palette = PUBLISHED[name]
    folder = REFERENCE / name
    layers = "".join(
        f"  - {{prompt: layer {i}, mask: {{palette: {folder / palette}, color: '{_flat_color(folder / f)}'}}}}\n"
        for i, f in enumerate(files))
    sf = load_scene(write(tmp_path / f"{name}.yaml", "layers:\n" + layers))
    got = scene_masks(sf)
    assert (got.width, got.height) == (width, height)
    painted = [image_mask(Image.open(folder / f)) > 0.5 for f in files]
    for i, f in enumerate(files):
        # The palette image shows what is visible: later layers paint over earlier ones.
        visible = painted[i] & ~np.any(painted[i + 1:], axis=0) if i + 1 < len(files) else painted[i]
        from_palette = got.masks[i] > 0.5
        # Anti-aliased borders go to the nearest colour, so the two agree except along edges.
        iou = (visible & from_palette).sum() / (visible | from_palette).sum()
        assert iou > 0.9, (f, iou)


def test_timessquare_scene_as_published(tmp_path):
    folder = REFERENCE / "timessquare"
    sf = load_scene(write(tmp_path / "timessquare.yaml", f"""
seed: 2024
bootstrap: {{steps: 2}}
negative_prefix: "worst quality, bad quality, normal quality, cropped, framed"
background: {{prompt: "1girl, 1boy, times square"}}
layers:
  - name: boy
    prompt: "1boy, looking at viewer, brown hair, casual shirt"
    negative_prompt: "1girl"
    mask: {folder / 'timessquare_1.png'}
  - name: girl
    prompt: "1girl, looking at viewer, pink hair, leather jacket"
    negative_prompt: "1boy"
    mask: {folder / 'timessquare_2.png'}
"""))
    got = scene_masks(sf)
    assert (got.width, got.height) == (768, 768) and got.names == ["boy", "girl"]
    assert 0.2 < got.masks[0].mean() < 0.4 and 0.2 < got.masks[1].mean() < 0.4


IRWOROBONGDO_PROMPTS = ["summer mountains", "the sun", "the moon", "a giant waterfall", "a giant waterfall",
                        "clean deep blue lake", "a large tree", "a large tree"]


def irworobongdo_scene(folder) -> str:
    layers = "".join(f"  - {{prompt: {p!r}, mask: {folder / f'irworobongdo_{i}.png'}}}\n"
                     for i, p in enumerate(IRWOROBONGDO_PROMPTS, start=1))
    return ("seed: 2024\nbootstrap: {steps: 2}\n"
            "negative_prefix: 'worst quality, bad quality, normal quality, cropped, framed'\n"
            "background: {prompt: 'clear deep blue sky'}\nlayers:\n" + layers)


@pytest.mark.slow
def test_irworobongdo_runs_end_to_end_at_full_size(run_cli, tiny_model_f8, tmp_path):
    """The 9-prompt 1920 x 768 scene, in views, with the tiny model (its VAE downscales by 8 like SD's)."""
    scene = write(tmp_path / "irworobongdo.yaml", irworobongdo_scene(REFERENCE / "irworobongdo"))
    result = run_cli("generate", scene, "--model", tiny_model_f8, "--device", "cpu", "--out", tmp_path / "out.png")
    assert result.exit_code == 0, result.stderr
    image = Image.open(tmp_path / "out.png")
    assert image.size == (1920, 768)
    assert np.asarray(image).std() > 1
