"""Every user mistake in a scene is one clean line naming the file, the line and the key, with exit code 2."""

from __future__ import annotations

import pytest
from conftest import write
from PIL import Image

from smd_cli.core.errors import SceneError
from smd_cli.scenes.scene import load_scene

GOOD_LAYER = "layers:\n  - {prompt: a cat}\n"

# (scene text, expected message fragment, expected "line: key" location or None)
CASES = [
    ("seeed: 3\n" + GOOD_LAYER, "unknown key 'seeed'; did you mean 'seed'?", "1: seeed"),
    ("layers:\n  - prompt: 'a (red hat:1.3 cat'\n", "prompt weights do not parse: '(' at character 3 is never closed",
     "2: layers[0].prompt"),
    ("background: {negative_prompt: 'blurry]'}\n" + GOOD_LAYER, "']' at character 7 closes nothing",
     "1: background.negative_prompt"),
    ("layers:\n  - prompt: '(hat:500)'\n", "weight 500 at character 5 is outside 0 to 100", "2: layers[0].prompt"),
    ("layers:\n  - promt: a cat\n", "unknown key 'promt'; did you mean 'prompt'?", "2: layers[0].promt"),
    ("layers:\n  - prompt: a\n    mask: {palette: p.png, colour: '#ffffff'}\n",
     "unknown key 'colour'; did you mean 'color'?", "3: layers[0].mask.colour"),
    ("bootstrap: {stpes: 2}\n" + GOOD_LAYER, "did you mean 'steps'?", "1: bootstrap.stpes"),
    ("steps: five\n" + GOOD_LAYER, "valid integer, got 'five'", "1: steps"),
    ("seed: 1.5\n" + GOOD_LAYER, "valid integer, got 1.5", "1: seed"),
    ("layers:\n  - prompt: a\n    mask_strength: 1.5\n", "less than or equal to 1, got 1.5",
     "3: layers[0].mask_strength"),
    ("guidance_scale: .nan\n" + GOOD_LAYER, "must be a finite number", "1: guidance_scale"),
    ("guidance_scale: -1\n" + GOOD_LAYER, "greater than or equal to 0", "1: guidance_scale"),
    ("layers:\n  - prompt: a\n    mask_std: .inf\n", "must be a finite number", "3: layers[0].mask_std"),
    ("mask_type: fuzzy\n" + GOOD_LAYER, "'discrete', 'semi-continuous' or 'continuous', got 'fuzzy'", "1: mask_type"),
    ("layers:\n  - mask: {rect: [0, 0, 1, 1]}\n", "this key is required", "2: layers[0].prompt"),
    ("width: 64\n", "this key is required", "layers"),
    ("layers: []\n", "at least 1 item", "1: layers"),
    ("layers:\n  - prompt: a\n    mask: {foo: bar}\n", "a mask is a path, or a mapping with exactly one of",
     "3: layers[0].mask"),
    ("layers:\n  - prompt: a\n    mask: {rect: [0, 0, 1, 1], ellipse: [1, 1, 1, 1]}\n",
     "exactly one of the keys image, palette, rect, ellipse", "3: layers[0].mask"),
    ("layers:\n  - prompt: a\n    mask: {rect: [5, 5, 1, 1]}\n", "needs x0 < x1 and y0 < y1", "3: layers[0].mask.rect"),
    ("layers:\n  - prompt: a\n    mask: {rect: [0, 1]}\n", "needs 4 numbers [x0, y0, x1, y1], got [0.0, 1.0]",
     "3: layers[0].mask.rect"),
    ("layers:\n  - prompt: a\n    mask: {ellipse: [1, 1, 0, 1]}\n", "radii rx and ry must be positive",
     "3: layers[0].mask.ellipse"),
    ("layers:\n  - prompt: a\n    mask: {palette: p.png, color: red}\n", 'expected a colour like "#e757b0"',
     "3: layers[0].mask.color"),
    ("layers:\n  - prompt: a\n    mask: {image: m.png, invert: maybe}\n", "valid boolean", "3: layers[0].mask.invert"),
    ("timesteps: [500, 900]\n" + GOOD_LAYER, "strictly decreasing", "1: timesteps"),
    ("steps: 3\ntimesteps: [999, 500]\n" + GOOD_LAYER, "says 3 steps but timesteps lists 2", "1: steps"),
    ("layers:\n  - {name: x, prompt: a}\n  - {name: x, prompt: b}\n", "duplicate layer name 'x'", "3: layers[1].name"),
    ("output: 'out/{scene}-{sed}.png'\n" + GOOD_LAYER, "unknown field {sed} in output template", "1: output"),
    ("width: 4\n" + GOOD_LAYER, "greater than or equal to 8", "1: width"),
    ("width: 100000\n" + GOOD_LAYER, "less than or equal to 16384", "1: width"),
    ("layers: [\n", "not valid YAML", "2"),
    ("- a\n- b\n", "a scene is a mapping", "1"),
    ("", "the scene file is empty", None),
    ("seed: 1\nseed: 2\n" + GOOD_LAYER, "key 'seed' appears twice", "2: seed"),
    ("model: ''\n" + GOOD_LAYER, "must not be empty", "1: model"),
    ("seed: !!python/object:os.system ls\n" + GOOD_LAYER, "not valid YAML", "1"),
    ("layers:\n  - !Ref {prompt: a}\n", "not valid YAML", "2"),
    ("output: '{seed:q}.png'\n" + GOOD_LAYER, "bad output template", "1: output"),
    ("output: 'picture.txt'\n" + GOOD_LAYER, "needs an image extension", "1: output"),
    ("tile_size: 64\ntile_stride: 128\n" + GOOD_LAYER, "larger than tile_size 64", "2: tile_stride"),
    ("scheduler: dpm\n" + GOOD_LAYER, "'lcm', 'ddim', 'euler' or 'renoise', got 'dpm'", "1: scheduler"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n" + GOOD_LAYER,
     "expands to more than", None),
]


@pytest.mark.parametrize("text, fragment, where", CASES, ids=[c[1][:40] for c in CASES])
def test_scene_errors_are_one_located_line(tmp_path, run_cli, text, fragment, where):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(SceneError) as exc:
        load_scene(path)
    assert fragment in str(exc.value)
    if where is not None:
        line, _, key = where.partition(": ")
        if line.isdigit():
            assert exc.value.line == int(line), str(exc.value)
        else:
            key = line
        if key:
            assert exc.value.key == key

    result = run_cli("validate", path)
    assert result.exit_code == 2
    assert "Traceback" not in result.output + result.stderr
    message = result.stderr.strip()
    assert message.count("\n") == 0, message
    assert message.startswith(f"error: {path}")
    assert fragment in message


def _mask_scene(tmp_path, mask_line: str, extra: str = "") -> object:
    return write(tmp_path / "s.yaml", f"{extra}layers:\n  - prompt: a\n    mask: {mask_line}\n")


def test_missing_mask_file(tmp_path, run_cli):
    result = run_cli("validate", _mask_scene(tmp_path, "masks/none.png"))
    assert result.exit_code == 2
    assert "s.yaml:3: layers[0].mask: mask file not found:" in result.stderr
    assert "masks/none.png" in result.stderr


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_unreadable_or_truncated_mask_file(tmp_path, run_cli, content):
    (tmp_path / "bad.png").write_bytes(content)
    result = run_cli("validate", _mask_scene(tmp_path, "bad.png"))
    assert result.exit_code == 2
    assert "layers[0].mask: cannot read mask image" in result.stderr


def test_truncated_png_is_reported(tmp_path, run_cli):
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    result = run_cli("validate", _mask_scene(tmp_path, "cut.png"))
    assert result.exit_code == 2
    assert "cannot read mask image" in result.stderr


def test_aspect_ratio_mismatch_says_both_sizes(tmp_path, run_cli):
    Image.new("L", (300, 100), 255).save(tmp_path / "wide.png")
    result = run_cli("validate", _mask_scene(tmp_path, "wide.png", "width: 512\nheight: 512\n"))
    assert result.exit_code == 2
    assert "s.yaml:5: layers[0].mask: mask image is 300x100 but the canvas is 512x512" in result.stderr


def test_same_aspect_ratio_masks_are_resized(tmp_path, run_cli):
    Image.new("L", (32, 16), 255).save(tmp_path / "small.png")
    result = run_cli("validate", _mask_scene(tmp_path, "small.png", "width: 512\nheight: 256\n"))
    assert result.exit_code == 0, result.stderr
    assert "512x256" in result.stdout


def test_canvas_not_divisible_by_the_downscale_factor(tmp_path, run_cli, tiny_model):
    result = run_cli("validate", write(tmp_path / "s.yaml", "width: 100\nheight: 64\n" + GOOD_LAYER))
    assert result.exit_code == 2
    assert "s.yaml:1: width: canvas 100x64 is not divisible by the model's downscale factor 8" in result.stderr
    # The tiny test model's VAE halves the size: 100 is fine there, 101 is not.
    assert run_cli("validate", "--model", tiny_model, tmp_path / "s.yaml").exit_code == 0
    odd = write(tmp_path / "odd.yaml", "width: 101\nheight: 64\n" + GOOD_LAYER)
    result = run_cli("validate", "--model", tiny_model, odd)
    assert "downscale factor 2" in result.stderr and result.exit_code == 2


def test_missing_background_picture_fails_validation(tmp_path, run_cli):
    scene = write(tmp_path / "s.yaml", "background: {prompt: a, image: photo.jpg}\n" + GOOD_LAYER)
    result = run_cli("validate", scene)
    assert result.exit_code == 2 and "s.yaml:1: background.image: background file not found" in result.stderr


def test_palette_colour_equal_to_its_background(tmp_path, run_cli):
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "p.png")
    result = run_cli("validate", _mask_scene(tmp_path, '{palette: p.png, color: "#000000"}'))
    assert result.exit_code == 2 and "colour #000000 is also the background colour of p.png" in result.stderr


def test_all_masks_empty(tmp_path, run_cli):
    Image.new("L", (16, 16), 0).save(tmp_path / "black.png")
    result = run_cli("validate", _mask_scene(tmp_path, "black.png"))
    assert result.exit_code == 2
    assert "s.yaml:1: layers: every layer's mask is empty" in result.stderr


def test_scene_file_not_found(tmp_path, run_cli):
    result = run_cli("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: scene file not found"


def test_overrides_apply_and_are_reported_as_command_line(tmp_path, run_cli):
    path = write(tmp_path / "s.yaml", "seed: 1\n" + GOOD_LAYER)
    sf = load_scene(path, ["seed=5", "layers[0].prompt=a dog", "bootstrap.steps=3"])
    assert sf.scene.seed == 5 and sf.scene.layers[0].prompt == "a dog" and sf.scene.bootstrap.steps == 3
    with pytest.raises(SceneError, match=r"layers\[0\].mask_strength: .*set on the command line"):
        load_scene(path, ["layers.0.mask_strength=2"])
    boxed = write(tmp_path / "r.yaml", "layers:\n  - {prompt: a, mask: {rect: [0, 0, 10, 10]}}\n")
    with pytest.raises(SceneError, match=r"layers\[0\].mask.rect: needs x0 < x1.*set on the command line"):
        load_scene(boxed, ["layers[0].mask.rect[2]=-5"])
    result = run_cli("validate", "--set", "layers[3].prompt=x", path)
    assert result.exit_code == 2 and "there is no layers[3]" in result.stderr
    result = run_cli("validate", "--set", "noequals", path)
    assert result.exit_code == 2 and "--set expects key.path=value" in result.stderr


def test_validate_reports_coverage_and_overlaps(tmp_path, run_cli):
    path = write(tmp_path / "s.yaml", "width: 64\nheight: 64\nbackground: {prompt: sky}\nlayers:\n"
                 "  - {name: left, prompt: a, mask: {rect: [0, 0, 0.5, 1]}}\n"
                 "  - {name: top, prompt: b, mask: {rect: [0, 0, 1, 0.25]}}\n")
    result = run_cli("validate", path)
    assert result.exit_code == 0
    assert "50.0%" in result.stdout and "25.0%" in result.stdout
    assert "top 12.5%" in result.stdout  # left and top share an eighth of the canvas
    assert "uncovered (background: 'sky'): 37.5%" in result.stdout


def test_validate_several_scenes_exits_2_when_any_fails(tmp_path, run_cli):
    good = write(tmp_path / "good.yaml", GOOD_LAYER)
    bad = write(tmp_path / "bad.yaml", "seeed: 1\n" + GOOD_LAYER)
    result = run_cli("validate", good, bad)
    assert result.exit_code == 2
    assert "good.yaml" in result.stdout and "bad.yaml:1: seeed" in result.stderr
