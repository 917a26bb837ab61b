"""Property: whatever document or value the scene loader is given, it returns a valid scene or
raises smd's own error (one clean line), never anything else."""

from __future__ import annotations

import math
import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smd_cli.core.errors import SceneError, SmdError
from smd_cli.scenes.scene import Layer, Scene, SceneFile, load_scene

EXAMPLES = 300
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20) | st.sampled_from(["#e757b0", "#fff", "lcm", "ddim", "discrete", "1e400", "",
                                                     "masks/a.png", "{scene}.png", "~"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
mask_values = values | st.fixed_dictionaries({}, optional={
    "image": values, "palette": values, "color": values, "rect": st.lists(scalars, max_size=5),
    "ellipse": st.lists(scalars, max_size=5), "invert": values, "threshold": values})
layers = st.lists(st.fixed_dictionaries(
    {"prompt": st.text(max_size=30) | values},
    optional={**{k: values for k in Layer.model_fields if k not in ("prompt", "mask")}, "mask": mask_values,
              "promt": values}), max_size=4)
scenes = st.fixed_dictionaries(
    {"layers": layers | values},
    optional={**{k: values for k in Scene.model_fields if k != "layers"}, "seeed": values})


def check(tmp_path, text: str, overrides=None) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        result = load_scene(path, overrides)
    except SmdError as exc:
        # One line that says where: the scene file (and line and key), or the --set text at fault.
        message = str(exc)
        assert isinstance(exc, SceneError), type(exc)
        assert message.strip() and "\n" not in message, message
        assert message.startswith(str(path)) or message.startswith("--set "), message
        return
    assert isinstance(result, SceneFile) and isinstance(result.scene, Scene)
    for key in ("guidance_scale", "cover_alpha"):
        assert math.isfinite(getattr(result.scene, key))


@SETTINGS
@given(text=st.text(alphabet=string.printable + "\u00e9\u4e2d\ufeff", max_size=200))
def test_any_text(tmp_path, text):
    check(tmp_path, text)


@SETTINGS
@given(doc=values)
def test_any_yaml_document(tmp_path, doc):
    check(tmp_path, yaml.safe_dump(doc, allow_unicode=True))


@SETTINGS
@given(doc=scenes)
def test_scene_shaped_documents_with_any_values(tmp_path, doc):
    check(tmp_path, yaml.safe_dump(doc, allow_unicode=True))


@SETTINGS
@given(doc=scenes, overrides=st.lists(st.text(max_size=30) | st.builds(
    lambda k, v: f"{k}={v}", st.sampled_from(["seed", "layers[0].prompt", "layers.1.mask", "bootstrap.steps",
                                              "width", "background.image", "layers[9].x", "a.b.c"]),
    st.text(max_size=15)), max_size=3))
def test_overrides_with_any_values(tmp_path, doc, overrides):
    check(tmp_path, yaml.safe_dump(doc, allow_unicode=True), overrides)
