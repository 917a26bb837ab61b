"""Masks against hand-computed values: every form, palettes, occlusion, blur, quantization (docs/method.md §2.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import write
from PIL import Image

from smd_cli.core.errors import SceneError
from smd_cli.method import masks as M
from smd_cli.scenes import canvas as C
from smd_cli.scenes.scene import load_scene

SIGMAS = [0.9977, 0.9942, 0.9735, 0.8499, 0.5840, 0.0]


def test_rect_in_pixels_and_fractions():
    expected = np.zeros((4, 5), np.float32)
    expected[1, 1:3] = 1
    np.testing.assert_array_equal(M.rect_mask((1, 1, 3, 2), 4, 5), expected)
    bottom = np.zeros((4, 4), np.float32)
    bottom[2:] = 1
    np.testing.assert_array_equal(M.rect_mask((0, 0.5, 1, 1), 4, 4), bottom)


def test_ellipse_uses_pixel_centres():
    expected = np.zeros((4, 4), np.float32)
    expected[1:3, 1:3] = 1  # centres (1.5, 1.5)..(2.5, 2.5) lie within radius 1 of (2, 2); (0.5, y) does not
    np.testing.assert_array_equal(M.ellipse_mask((2, 2, 1, 1), 4, 4), expected)
    np.testing.assert_array_equal(M.ellipse_mask((0.5, 0.5, 0.25, 0.25), 4, 4), expected)


def test_image_mask_prefers_alpha_then_luminance():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = 255
    rgba[0, :, 3] = [0, 128, 255]
    np.testing.assert_allclose(M.image_mask(Image.fromarray(rgba, "RGBA")), [[0, 128 / 255, 1]])
    opaque = rgba.copy()
    opaque[0, :, 3] = 255
    opaque[0, :, :3] = [[0, 0, 0], [255, 255, 255], [255, 0, 0]]
    lum = M.image_mask(Image.fromarray(opaque, "RGBA"))  # trivial alpha: luminance
    np.testing.assert_allclose(lum, [[0, 1, 76 / 255]], atol=1 / 255)


def test_palette_assigns_anti_aliased_edges_to_the_nearest_colour():
    red, blue = (231, 87, 176), (47, 127, 224)
    row = [red, tuple(int(0.7 * c) for c in red), tuple(int(0.4 * c) for c in red), (0, 0, 0),
           tuple(int(0.6 * b + 0.4 * r) for r, b in zip(red, blue)), blue]
    image = Image.fromarray(np.array([row], np.uint8), "RGB")
    labels, present = M.palette_labels(image, ["#e757b0", "#2f7fe0", "#000000"])
    assert labels.tolist() == [[0, 0, 2, 2, 1, 1]] and present.tolist() == [True, True, True]


def test_palette_edges_go_only_to_colours_that_are_painted():
    """A listed colour that no pixel has (a typo) is absent, and takes no pixels: an edge between
    red and green goes to red or green, never to a blue that was listed but not painted."""
    red, green = (231, 87, 176), (40, 200, 60)
    edge = tuple((r + g) // 2 for r, g in zip(red, green))  # (135, 143, 118): nearest to blue of all three
    image = Image.fromarray(np.array([[red, red, edge, green, green]], np.uint8), "RGB")
    labels, present = M.palette_labels(image, ["#e757b0", "#28c83c", "#8791ff", "#000000"])
    assert present.tolist() == [True, True, False, False]
    assert labels[0, 2] in (0, 1) and labels.tolist()[0][:2] == [0, 0] and labels.tolist()[0][3:] == [1, 1]


def test_occlusion_scales_earlier_layers_under_later_ones():
    masks = np.array([[[1, 1, 1, 0]], [[0, 1, 1, 1]], [[0, 0, 1, 0]]], np.float32)
    got = M.occlude(masks, 0.3)
    np.testing.assert_allclose(got[0], [[1, 0.3, 0.3, 0]], atol=1e-7)  # once, however many lie above
    np.testing.assert_allclose(got[1], [[0, 1, 0.3, 1]], atol=1e-7)
    np.testing.assert_allclose(got[2], masks[2])
    soft = M.occlude(np.array([[[1.0]], [[0.5]]], np.float32), 0.3)
    assert soft[0, 0, 0] == pytest.approx(1 - 0.7 * 0.5)


def test_blur_is_a_normalised_gaussian_with_replicate_padding():
    delta = np.zeros((1, 11), np.float32)
    delta[0, 5] = 1
    taps = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    taps /= taps.sum()
    got = M.blur(np.repeat(delta, 9, axis=0), 1.0)
    np.testing.assert_allclose(got[4, 2:9], taps, atol=1e-6)
    np.testing.assert_allclose(got[4, :2], 0, atol=1e-7)
    # Replicate padding: a constant image stays constant, also at the borders.
    np.testing.assert_allclose(M.blur(np.ones((6, 7), np.float32), 2.0), 1.0, atol=1e-6)
    # The kernel is 2*ceil(3*std)+1 wide: std 0.5 reaches 2 pixels, not 3.
    assert len(M.gaussian_taps(0.5)) == 2 * math.ceil(1.5) + 1
    # A wide blur on a large canvas stays cheap and exact at the borders.
    np.testing.assert_allclose(M.blur(np.ones((300, 2000), np.float32), 32.0), 1.0, atol=1e-6)


@pytest.mark.parametrize("mask_type, expected", [
    ("discrete", [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]),
    ("continuous", [[1, 1, 1, 1, 1], [0, (0.99 - 0.9735) / (0.9942 - 0.9735), 1, 1, 1],
                    [0, 0, (0.9 - 0.8499) / (0.9735 - 0.8499), 1, 1], [0, 0, 0, 0, 0]]),
    ("semi-continuous", [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]),
])
def test_quantize_per_step(mask_type, expected):
    values = np.array([1.0, 0.99, 0.9, 0.0], np.float32).reshape(4, 1, 1)
    got = M.quantize(values, SIGMAS, mask_type)[:, :, 0, 0].T  # [value, step]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_semi_continuous_is_continuous_on_the_last_step_only():
    values = np.array([0.3], np.float32).reshape(1, 1, 1)
    semi = M.quantize(values, SIGMAS, "semi-continuous")[:, 0, 0, 0]
    assert semi[:-1].tolist() == [0, 0, 0, 0]
    assert semi[-1] == pytest.approx(0.3 / 0.5840)


def test_strength_below_the_first_sigma_drops_the_first_step():
    _, strong = M.prepare(np.ones((1, 2, 2), np.float32), cover_alpha=0.3, stds=[0], strengths=[0.98])
    steps = M.quantize(strong, SIGMAS, "discrete")[:, 0, 0, 0]
    assert steps.tolist() == [0, 0, 1, 1, 1]


def test_downsample_takes_every_f_th_pixel():
    m = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    assert M.downsample(m, 2)[0].tolist() == [[0, 2], [8, 10]]


def _scene(tmp_path, layers: str, extra: str = "") -> object:
    return load_scene(write(tmp_path / "scene.yaml", f"{extra}\nlayers:\n{layers}"))


def test_scene_masks_resize_threshold_and_invert(tmp_path):
    img = np.zeros((8, 8, 4), np.uint8)
    img[:, :4, 3] = 255  # left half painted
    Image.fromarray(img, "RGBA").save(tmp_path / "half.png")
    sf = _scene(tmp_path, "  - {prompt: a, mask: half.png}\n  - {prompt: b, mask: {image: half.png, invert: true}}",
                "width: 16\nheight: 16")
    got = C.scene_masks(sf)
    assert got.masks.shape == (2, 16, 16)
    assert got.masks[0, :, :8].min() == 1 and got.masks[0, :, 8:].max() == 0
    np.testing.assert_array_equal(got.masks[1], 1 - got.masks[0])


def test_canvas_size_comes_from_the_first_mask_image(tmp_path):
    Image.new("L", (48, 32), 255).save(tmp_path / "m.png")
    sf = _scene(tmp_path, "  - {prompt: a, mask: {rect: [0, 0, 0.5, 1]}}\n  - {prompt: b, mask: m.png}")
    assert C.canvas_size(sf) == (48, 32)
    assert C.canvas_size(_scene(tmp_path, "  - {prompt: a, mask: m.png}", "width: 96")) == (96, 64)
    assert C.canvas_size(_scene(tmp_path, "  - {prompt: a}")) == (512, 512)


def test_mask_with_another_aspect_ratio_is_an_error_naming_both_sizes(tmp_path):
    Image.new("L", (40, 20), 255).save(tmp_path / "wide.png")
    sf = _scene(tmp_path, "  - {prompt: a, mask: wide.png}", "width: 32\nheight: 32")
    with pytest.raises(SceneError, match=r"40x20 but the canvas is 32x32") as exc:
        C.scene_masks(sf)
    assert exc.value.key == "layers[0].mask" and exc.value.line == 4


def test_palette_scene_layers_and_background_colour(tmp_path):
    img = np.zeros((4, 6, 3), np.uint8)
    img[:, 0:2] = (200, 30, 30)
    img[:, 2:4] = (30, 30, 200)
    img[:, 4:6] = (250, 250, 250)  # an explicit white background
    Image.fromarray(img).save(tmp_path / "p.png")
    sf = _scene(tmp_path,
                '  - {prompt: a, mask: {palette: p.png, color: "#c81e1e", background_color: "#ffffff"}}\n'
                '  - {prompt: b, mask: {palette: p.png, color: "#1e1ec8"}}')
    got = C.scene_masks(sf, 6, 4).masks  # (a canvas must be 8 pixels or more: the size is given here)
    assert got[0].tolist() == [[1, 1, 0, 0, 0, 0]] * 4
    assert got[1].tolist() == [[0, 0, 1, 1, 0, 0]] * 4


def test_palette_colour_absent_from_the_image(tmp_path):
    Image.fromarray(np.full((4, 4, 3), (10, 200, 10), np.uint8)).save(tmp_path / "p.png")
    sf = _scene(tmp_path, '  - {prompt: a, mask: {palette: p.png, color: "#0000ff"}}\n'
                          '  - {prompt: b, mask: {palette: p.png, color: "#0ac80a"}}')
    with pytest.raises(SceneError, match=r"#0000ff matches no pixel of p.png \(none within 32 of it\); its main "
                                         r"colours are #0ac80a"):
        C.scene_masks(sf, 8, 8)


def test_all_masks_empty_is_an_error(tmp_path):
    Image.new("L", (8, 8), 0).save(tmp_path / "black.png")
    with pytest.raises(SceneError, match="every layer's mask is empty") as exc:
        C.scene_masks(_scene(tmp_path, "  - {prompt: a, mask: black.png}"))
    assert exc.value.key == "layers"


def test_coverage_report():
    masks = np.zeros((2, 2, 2), np.float32)
    masks[0, 0] = 1
    masks[1, :, 0] = 1
    rows, uncovered = C.coverage_report(C.SceneMasks.of(masks, ["a", "b"]))
    assert [r.coverage for r in rows] == [50, 50]
    assert rows[0].overlaps == {"b": 25}
    assert uncovered == 25
