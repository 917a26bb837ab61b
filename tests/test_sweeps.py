"""Tuning a scene: `--vary` sweeps (their combinations, order, names and errors), every image the one
`--set` with the same values makes, contact sheets (`--grid`, `smd grid`) and their records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write
from PIL import Image

from smd_cli.app.sweeps import Sweep, SweepError


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture()
def scene(scene_dir) -> Path:
    """tests/data's three-layer 64 x 64 scene, in two steps."""
    path = scene_dir / "scene.yaml"
    path.write_text("steps: 2\n" + path.read_text())
    return path


def gen(run_cli, tiny_model, *args):
    return run_cli("generate", *args, "--model", tiny_model, "--device", "cpu")


# --- parsing and expanding ----------------------------------------------------------------------


def test_ranges_are_inclusive_and_print_cleanly():
    (axis,) = Sweep.parse(["layers[1].mask_std=0.5:1.0:0.1"]).axes
    assert axis.key == ("layers", 1, "mask_std") and axis.name == "layers[1].mask_std"
    assert axis.values == (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the floats --set reads from the same text
    assert axis.labels == ["0.5", "0.6", "0.7", "0.8", "0.9", "1.0"]
    assert Sweep.parse(["x=0:16:8"]).axes[0].values == (0, 8, 16)  # integers stay integers
    assert Sweep.parse(["x=0:1:0.3"]).axes[0].values == (0.0, 0.3, 0.6, 0.9)  # 1 is not on a step
    assert Sweep.parse(["x=1,2,1"]).axes[0].values == (1, 2)  # repeats dropped, order kept
    assert Sweep.parse(['layers[0].prompt=["a cat, sitting", a dog]']).axes[0].values == ("a cat, sitting", "a dog")
    assert Sweep.parse(["region_mode=latent, attention"]).axes[0].values == ("latent", "attention")


def test_combinations_their_order_and_names():
    sweep = Sweep.parse(["layers[1].mask_std=0.5,1", "region_mode=latent,attention"])
    variants = sweep.variants()
    assert sweep.size == 4 and [v.values for v in variants] == [(0.5, "latent"), (0.5, "attention"),
                                                               (1, "latent"), (1, "attention")]
    assert [v.name for v in variants] == ["mask_std=0.5_region_mode=latent", "mask_std=0.5_region_mode=attention",
                                          "mask_std=1_region_mode=latent", "mask_std=1_region_mode=attention"]
    assert variants[1].overrides == {("layers", 1, "mask_std"): 0.5, ("region_mode",): "attention"}
    # Two keys that end alike are named in full; values that read alike in a file name are numbered.
    both = Sweep.parse(["layers[0].mask_std=1", "layers[1].mask_std=2", "layers[0].prompt=a cat,a/cat"])
    assert [v.name for v in both.variants()] == ["layers0.mask_std=1_layers1.mask_std=2_prompt=1-a-cat",
                                                 "layers0.mask_std=1_layers1.mask_std=2_prompt=2-a-cat"]


@pytest.mark.parametrize("texts, message", [
    (["layers[0].mask_std"], "--vary expects KEY=V1,V2,..."),
    (["layers[0].mask_std="], "--vary layers[0].mask_std: no values"),
    (["layers[0].mask_std=,,"], "--vary layers[0].mask_std: no values"),
    (["x=0:1:0"], "range '0:1:0' has step 0"),
    (["x=1:0:0.5"], "range '1:0:0.5' runs backwards; write 0:1:0.5"),
    (["x=0:1:-0.5"], "negative step"),
    (["x=0:5000:1"], "gives 5001 values, more than the 1000 one key may take"),
    (["x=a:b:c"], "needs three numbers"),
    (["x=1", "y=1", "z=1", "w=1"], "--vary is given 4 times; a sweep varies at most 3 keys"),
    (["x=1", "x=2"], "--vary x is given twice"),
])
def test_bad_sweeps_are_refused(texts, message):
    with pytest.raises(SweepError) as exc:
        Sweep.parse(texts)
    assert message in str(exc.value)


# --- the batch -----------------------------------------------------------------------------------


def test_every_image_is_the_one_set_makes(run_cli, tiny_model, scene, tmp_path, pipe):
    from smd_cli import generate
    from smd_cli.app.records import read_record
    from smd_cli.scenes.scene import load_scene, merge_overrides

    result = gen(run_cli, tiny_model, scene, "--vary", "layers[1].mask_std=0,8", "--vary",
                 "region_mode=latent,attention", "--seed", "2", "--out", tmp_path / "o" / "{scene}-{seed}.png",
                 "--json")
    assert result.exit_code == 0, result.stderr
    rows = json_lines(result.stdout)
    combos = [(r["vary"]["layers[1].mask_std"], r["vary"]["region_mode"], r["seed"]) for r in rows]
    assert combos == [(std, mode, 2) for std in ("0", "8") for mode in ("latent", "attention")]
    assert [Path(r["path"]).name for r in rows[:3]] == [  # an --out without {vary} gains -{vary}
        "scene-2-mask_std=0_region_mode=latent.png", "scene-2-mask_std=0_region_mode=attention.png",
        "scene-2-mask_std=8_region_mode=latent.png"]
    assert "loaded" in result.stderr and result.stderr.count("loaded") == 1  # one model for the whole sweep
    for row in rows:
        sets = [f"layers[1].mask_std={row['vary']['layers[1].mask_std']}",
                f"region_mode={row['vary']['region_mode']}", f"seed={row['seed']}"]
        expected = generate(pipe, load_scene(scene, merge_overrides(sets))).image
        np.testing.assert_array_equal(np.asarray(Image.open(row["path"])), np.asarray(expected))
        record = read_record(row["path"])  # each image carries its full record
        assert record.scene["layers"][1]["mask_std"] == float(row["vary"]["layers[1].mask_std"])
        assert record.scene["region_mode"] == row["vary"]["region_mode"] and record.seed == row["seed"]
    # And through the command line itself: --set with the same values makes the same pixels.
    same = gen(run_cli, tiny_model, scene, "--set", "layers[1].mask_std=8", "--set", "region_mode=attention",
               "--seed", "2", "--out", tmp_path / "set.png")
    assert same.exit_code == 0, same.stderr
    swept = next(r["path"] for r in rows if r["vary"] == {"layers[1].mask_std": "8", "region_mode": "attention"})
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "set.png")), np.asarray(Image.open(swept)))


def test_names_come_from_the_template(run_cli, tiny_model, scene, tmp_path):
    result = gen(run_cli, tiny_model, scene, "--vary", "layers[0].mask_strength=0.5:1.0:0.25", "--seed", "3",
                 "--out", tmp_path / "{vary}" / "{seed}.png", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    assert [r["path"] for r in json_lines(result.stdout)] == [
        str(tmp_path / f"mask_strength={v}" / "3.png") for v in ("0.5", "0.75", "1.0")]
    default = gen(run_cli, tiny_model, scene, "--vary", "region_mode=latent,hybrid", "--dry-run", "--json")
    assert [Path(r["path"]).name for r in json_lines(default.stdout)] == [
        "scene-42-region_mode=latent.png", "scene-42-region_mode=hybrid.png"]  # the scene's output gains -{vary}
    plain = gen(run_cli, tiny_model, scene, "--out", tmp_path / "{scene}-{vary}.png", "--dry-run", "--json")
    assert json_lines(plain.stdout)[0]["path"] == str(tmp_path / "scene.png")  # no sweep: {vary} is empty


def test_a_prompt_without_a_scene_sweeps_too(run_cli, tiny_model, tmp_path):
    args = ("panorama", "a lake", "--width", "128", "--height", "64", "--tile-size", "64", "--steps", "2",
            "--seed", "5", "--model", tiny_model, "--device", "cpu")
    swept = run_cli(*args, "--vary", "tile_stride=32,48", "--out", tmp_path / "{vary}.png")
    assert swept.exit_code == 0, swept.stderr
    assert swept.stdout.split() == [str(tmp_path / "tile_stride=32.png"), str(tmp_path / "tile_stride=48.png")]
    one = run_cli(*args, "--set", "tile_stride=48", "--out", tmp_path / "set.png")
    assert one.exit_code == 0, one.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "set.png")),
                                  np.asarray(Image.open(tmp_path / "tile_stride=48.png")))


def test_dry_run_lists_the_combinations_and_the_time(run_cli, tiny_model, scene, monkeypatch):
    from smd_cli.engine import pipeline

    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    rows = json_lines(gen(run_cli, tiny_model, scene, "--vary", "layers[1].mask_std=0,8", "--seeds", "1-2",
                          "--dry-run", "--json").stdout)
    assert [(r["vary"], r["seed"]) for r in rows] == [({"layers[1].mask_std": v}, s) for v in ("0", "8")
                                                      for s in (1, 2)]
    assert {r["passes"] for r in rows} == {1 * 3 * 2} and all(r["estimate"] > 0 for r in rows)
    table = gen(run_cli, tiny_model, scene, "--vary", "layers[1].mask_std=0,8", "--dry-run")
    assert table.exit_code == 0 and "layers[1].mask_std=8" in table.stdout
    assert "estimated time: about" in table.stdout and "12 denoiser passes" in table.stdout


@pytest.mark.parametrize("vary, message", [
    ("layers[1].mask_stdd=1,2", "scene.yaml: --vary layers[1].mask_stdd=1: unknown key 'mask_stdd'; "
                                "did you mean 'mask_std'?"),
    ("bootstrap.stepz=1,2", "--vary bootstrap.stepz=1: unknown key 'stepz'; did you mean 'steps'?"),
    ("layers[7].mask_std=1,2", "--vary layers[7].mask_std=1: there is no layers[7]"),
    ("layers[1].mask_std=4,-1", "--vary layers[1].mask_std=-1: input should be greater than or equal to 0, got -1"),
    ("region_mode=latent,sideways", "--vary region_mode=sideways: input should be 'latent', 'attention' or "
                                    "'hybrid', got 'sideways'"),
    ("layers[1].mask_std=", "--vary layers[1].mask_std: no values"),
    ("layers[1].mask_std=2:1:1", "runs backwards"),
    ("layers[1].mask_std=0:1:0", "has step 0"),
    ("layers[1].mask_std=0:600:1", "1,202 images (1 scene(s) x 601 combinations x 2 seed(s)), more than 1,000; "
                                   "give --yes"),
])
def test_bad_keys_and_values_are_plan_errors(run_cli, tiny_model, scene, monkeypatch, vary, message):
    from smd_cli.engine import pipeline

    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    result = gen(run_cli, tiny_model, scene, "--vary", vary, "--seeds", "1,2")
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_other_plan_errors(run_cli, tiny_model, scene, tmp_path):
    twice = gen(run_cli, tiny_model, scene, "--vary", "seed=1,2", "--vary", "seed=3")
    assert twice.exit_code == 2 and "--vary seed is given twice" in twice.stderr
    many = gen(run_cli, tiny_model, scene, *[x for k in "abcd" for x in ("--vary", f"{k}=1")])
    assert many.exit_code == 2 and "at most 3 keys" in many.stderr
    seeds = gen(run_cli, tiny_model, scene, "--vary", "seed=1,2", "--seeds", "3")
    assert seeds.exit_code == 2 and "--vary seed=... or with --seeds/--repeat, not both" in seeds.stderr
    swept = gen(run_cli, tiny_model, scene, "--vary", "seed=1:91:1", "--vary", "layers[0].mask_std=0:10:1", "--dry-run")
    assert swept.exit_code == 2 and "1,001 images (1 scene(s) x 1001 combinations x 1 seed(s)), more than 1,000; " \
        "give --yes" in swept.stderr
    seeds_only = gen(run_cli, tiny_model, scene, "--seeds", "1-1001", "--dry-run")  # a seed range is warned about
    assert seeds_only.exit_code == 0 and "warning: this batch makes 1001 images" in seeds_only.stderr
    sheet = gen(run_cli, tiny_model, scene, "--vary", "seed=1,2", "--grid-out", tmp_path / "sheet")
    assert sheet.exit_code == 2 and "a contact sheet is a .png file" in sheet.stderr


def test_the_sweep_from_python_shares_the_model_and_the_text_encodings(tiny_model, scene, tmp_path, monkeypatch):
    from smd_cli.app import batch
    from smd_cli.families.sd import StableDiffusion

    encoded: list[str] = []
    original = StableDiffusion.encode

    def counting(self, texts):
        encoded.extend(texts)
        return original(self, texts)

    monkeypatch.setattr(StableDiffusion, "encode", counting)
    options = batch.Options(model=str(tiny_model), device="cpu", seeds=[1, 2],
                            output=str(tmp_path / "{vary}-{seed}.png"), sweep=Sweep.parse(["layers[1].mask_std=0:8:4"]))
    events: list = []
    plan = batch.plan([scene], options, on_event=events.append)
    assert [(j.variant.name, j.seed) for j in plan.jobs] == [(f"mask_std={v}", s) for v in (0, 4, 8) for s in (1, 2)]
    outcomes = batch.run(plan, options, on_event=events.append)
    assert [o.status for o in outcomes] == ["done"] * 6
    assert sum(isinstance(e, batch.Loading) for e in events) == 1
    assert len(encoded) == len(set(encoded)), encoded  # every prompt encoded once for all six images


# --- contact sheets ------------------------------------------------------------------------------


def _cell(sheet: Image.Image, cell: dict) -> np.ndarray:
    x, y, w, h = cell["box"]
    return np.asarray(sheet.crop((x, y, x + w, y + h)))


def test_the_grid_cell_i_j_is_the_image_of_values_i_j(run_cli, tiny_model, scene, tmp_path):
    from smd_cli.app import grid
    from smd_cli.app.records import read_record

    result = gen(run_cli, tiny_model, scene, "--vary", "layers[1].mask_std=0,8", "--vary",
                 "layers[0].mask_strength=0.5,1.0", "--seeds", "1,2", "--out", tmp_path / "o" / "{seed}-{vary}.png",
                 "--grid")
    assert result.exit_code == 0, result.stderr
    pages = [tmp_path / "o" / f"scene-grid-page{n}.png" for n in (1, 2)]  # pages by seed, beside the images
    assert all(p.is_file() for p in pages) and f"contact sheet: {pages[0]}" in result.stderr
    for n, page in enumerate(pages):
        record = json.loads(page.with_suffix(".json").read_text())
        assert record["sheet"] == page.name and record["pages"] == 2
        assert record["axes"]["rows"] == {"key": "layers[1].mask_std", "values": ["0", "8"]}
        assert record["axes"]["columns"] == {"key": "layers[0].mask_strength", "values": ["0.5", "1.0"]}
        assert record["axes"]["page"] == {"seed": str(n + 1)}
        assert record["labels"]["rows"] == ["layers[1].mask_std=0", "layers[1].mask_std=8"]
        assert record["labels"]["columns"] == ["layers[0].mask_strength=0.5", "layers[0].mask_strength=1.0"]
        assert f"seed={n + 1}" in record["labels"]["heading"]
        assert len(record["cells"]) == 4
        sheet = Image.open(page).convert("RGB")
        for cell in record["cells"]:
            i, j = cell["row"], cell["column"]
            std, strength = record["axes"]["rows"]["values"][i], record["axes"]["columns"]["values"][j]
            made = read_record(cell["file"])
            assert made.scene["layers"][1]["mask_std"] == float(std) and made.seed == n + 1
            assert made.scene["layers"][0]["mask_strength"] == float(strength)
            expected = np.asarray(grid.thumbnail(Image.open(cell["file"])))
            assert expected.shape[:2] == (grid.CELL, grid.CELL)
            np.testing.assert_array_equal(_cell(sheet, cell), expected)


def test_smd_grid_recovers_the_axes_from_the_records(run_cli, tiny_model, scene, tmp_path):
    from smd_cli.app import grid

    made = gen(run_cli, tiny_model, scene, "--vary", "region_mode=latent,attention", "--vary",
               "layers[1].mask_std=0:8:8", "--out", tmp_path / "o" / "{vary}.png")
    assert made.exit_code == 0, made.stderr
    images = made.stdout.split()
    result = run_cli("grid", *images, "--out", tmp_path / "sheet.png")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "sheet.png")]
    record = json.loads((tmp_path / "sheet.json").read_text())
    # Scene keys in the scene's order: region_mode comes before the layers.
    assert record["axes"]["rows"] == {"key": "region_mode", "values": ["latent", "attention"]}
    assert record["axes"]["columns"] == {"key": "layers[1].mask_std", "values": ["0.0", "8.0"]}
    assert record["axes"]["page"] == {}
    sheet = Image.open(tmp_path / "sheet.png").convert("RGB")
    for cell in record["cells"]:
        name = Path(cell["file"]).name
        assert name == f"region_mode={cell['values']['region_mode']}_mask_std=" \
                       f"{cell['values']['layers[1].mask_std'].removesuffix('.0')}.png"
        np.testing.assert_array_equal(_cell(sheet, cell), np.asarray(grid.thumbnail(Image.open(cell["file"]))))
    # Seeds count as a key too.
    seeds = gen(run_cli, tiny_model, scene, "--seeds", "4,5", "--out", tmp_path / "s" / "{seed}.png")
    by_seed = run_cli("grid", *seeds.stdout.split(), "--out", tmp_path / "seeds.png")
    assert by_seed.exit_code == 0, by_seed.stderr
    assert json.loads((tmp_path / "seeds.json").read_text())["axes"]["columns"] == {"key": "seed",
                                                                                     "values": ["4", "5"]}
    # Nothing varies, or no record: exit 2 with the reason.
    same = run_cli("grid", images[0], images[0], "--out", tmp_path / "same.png")
    assert same.exit_code == 2 and "made with the same settings: nothing varies" in same.stderr
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    plain = run_cli("grid", images[0], tmp_path / "plain.png")
    assert plain.exit_code == 2 and "plain.png: no smd metadata in this image" in plain.stderr
    assert not (tmp_path / "same.png").exists()


def test_a_sheet_keeps_existing_files(tmp_path):
    from smd_cli.app import grid

    for name in ("a", "b"):
        Image.new("RGB", (16, 8), name == "a" and "red" or "blue").save(tmp_path / f"{name}.png")
    cells = [grid.Cell(str(tmp_path / "a.png"), {"k": "1"}), grid.Cell(None, {"k": "2"})]
    write(tmp_path / "sheet.png", "precious")
    (written,) = grid.write_sheets(cells, [grid.Axis("k", ["1", "2"])], tmp_path / "sheet.png")
    assert written == tmp_path / "sheet-1.png" and (tmp_path / "sheet.png").read_text() == "precious"
    record = json.loads((tmp_path / "sheet-1.json").read_text())
    assert record["axes"]["rows"] is None and record["labels"]["columns"] == ["k=1", "k=2"]
    assert record["cells"][1]["file"] is None  # a failed image: an empty cell, said so on the sheet


def test_random_seeds_are_drawn_once_for_every_combination(run_cli, tiny_model, scene):
    scene.write_text(scene.read_text().replace("seed: 42\n", ""))
    rows = json_lines(gen(run_cli, tiny_model, scene, "--vary", "layers[1].mask_std=0,4,8", "--repeat", "2",
                          "--dry-run", "--json").stdout)
    seeds = [r["seed"] for r in rows]
    assert len(rows) == 6 and seeds[:2] == seeds[2:4] == seeds[4:] and seeds[0] != seeds[1]
