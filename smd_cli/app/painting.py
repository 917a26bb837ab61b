"""A painting: a scene held in memory while `smd paint` edits it, and saved as a scene file again.

The app's whole state is a scene (every key a scene file can hold, kept as it was read) whose
layers are brushes: each has an 8-bit mask at canvas size that strokes paint, and a colour the
page shows it in. `Painting.from_scene` opens any scene (image, palette and shape masks become
bitmaps); `save` writes the scene back as YAML with one grayscale PNG per brush, which
`smd generate` renders again. The server only moves edits and frames; every rule is here, so
that it is tested without a browser. No torch at import.
"""

from __future__ import annotations

import dataclasses
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smd_cli.core import defaults
from smd_cli.core.errors import OutputError, SmdError
from smd_cli.core.files import expand_user
from smd_cli.scenes.canvas import SceneMasks, scene_masks
from smd_cli.scenes.scene import Layer, PaletteMask, Scene, SceneFile, validate_scene

# Colours of brushes whose masks name none (a palette mask's colour is kept).
BRUSH_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                 "#fabed4", "#469990", "#dcbeff", "#9a6324")
UNDO_DEPTH = 32  # edits that can be taken back
MAX_BRUSHES = 64
MAX_STROKE_POINTS = 10_000
MAX_TEXT = 4000  # characters of a prompt or a name typed on the page
_SLUG = re.compile(r"[^a-z0-9]+")
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class BrushFields(BaseModel):
    """What the page may set of a brush: what it shows. Whatever names a file or a model (LoRAs,
    ControlNets, reference images) comes from the scene file or the command line, never from a page.
    Ranges are a scene layer's (`_layer` checks them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(max_length=200)] | None = None
    prompt: Text | None = None
    negative_prompt: Text | None = None
    mask_strength: Finite | None = None
    mask_std: Finite | None = None
    prompt_strength: Finite | None = None
    colour: Annotated[str, Field(pattern=r"^#[0-9a-fA-F]{6}$")] | None = None


# Brush fields of a scene's layer that the page shows and edits (the colour is the page's own).
BRUSH_FIELDS = tuple(name for name in BrushFields.model_fields if name != "colour")


@dataclass
class Brush:
    """A layer being painted: its scene settings, its mask (uint8 [H, W], 255 = fully in) and colour."""

    layer: Layer
    mask: np.ndarray
    colour: str


class Painting:
    """A scene's brushes, background and settings as the paint app edits them."""

    def __init__(self, scene: Scene, brushes: list[Brush], picture: Image.Image | None, *, width: int,
                 height: int, source: SceneFile | None = None):
        self.scene, self.brushes, self.picture = scene, brushes, picture
        self.width, self.height = width, height
        self.source = source  # the scene file it was opened from, for its relative paths
        self._undo: list[_Snapshot] = []  # the painting before each of the last UNDO_DEPTH edits
        self.version = 0  # counts edits, so that a stream applies each once
        self.picture_version = 0  # counts changes of the picture, so that the page fetches it once each

    # Opening.

    @classmethod
    def from_scene(cls, sf: SceneFile, width: int | None = None, height: int | None = None) -> "Painting":
        """Every layer of a scene as a brush, its mask read at canvas size (docs/method.md §2.2)."""
        masks = scene_masks(sf, width, height, painted=False)  # a painting saved before anything was painted
        brushes = []
        for i, (layer, mask) in enumerate(zip(sf.scene.layers, masks.masks)):
            colour = layer.mask.color if isinstance(layer.mask, PaletteMask) else BRUSH_COLOURS[i % len(BRUSH_COLOURS)]
            brushes.append(Brush(layer.model_copy(update={"mask": None}), to_bytes(mask), colour))
        return cls(sf.scene, brushes, masks.picture, width=masks.width, height=masks.height, source=sf)

    @classmethod
    def blank(cls, width: int = defaults.SIZE, height: int = defaults.SIZE,
              region_mode: str | None = None) -> "Painting":
        """A white canvas with one brush and nothing painted (in `region_mode`, if given)."""
        mode = {} if region_mode is None else {"region_mode": region_mode}
        scene = Scene(width=width, height=height, layers=[Layer(name="brush 1", prompt="")], **mode)
        empty = np.zeros((height, width), np.uint8)
        return cls(scene, [Brush(scene.layers[0], empty, BRUSH_COLOURS[0])], None, width=width, height=height)

    # What the page shows.

    def state(self) -> dict[str, Any]:
        """The painting for the page, masks aside (see `mask_png`)."""
        return {"width": self.width, "height": self.height, "seed": self.scene.seed,
                "region_mode": self.scene.region_mode,
                "background": {"prompt": self.scene.background.prompt,
                               "negative_prompt": self.scene.background.negative_prompt,
                               "picture": self.picture is not None},
                "brushes": [{**{k: getattr(b.layer, k) for k in BRUSH_FIELDS}, "colour": b.colour}
                            for b in self.brushes],
                "undo": len(self._undo), "version": self.version, "picture_version": self.picture_version}

    def mask_png(self, i: int) -> bytes:
        """Brush `i`'s mask as a grayscale PNG."""
        return png(Image.fromarray(self.brush(i).mask, "L"))

    def brush(self, i: int) -> Brush:
        if not 0 <= i < len(self.brushes):
            raise SmdError(f"there is no brush {i}; the palette has {len(self.brushes)}")
        return self.brushes[i]

    # Editing.

    def add_brush(self, **fields: Any) -> int:
        """A new brush at the end of the palette, with nothing painted; returns its index."""
        if len(self.brushes) >= MAX_BRUSHES:
            raise SmdError(f"a palette holds at most {MAX_BRUSHES} brushes")
        n = len(self.brushes)
        fields = page_fields(fields)
        colour = fields.pop("colour", None) or next(
            (c for c in BRUSH_COLOURS if c not in {b.colour for b in self.brushes}), BRUSH_COLOURS[n % 12])
        layer = _layer({"name": f"brush {n + 1}", "prompt": "", **fields}, n)
        self._remember()
        self.brushes.append(Brush(layer, np.zeros((self.height, self.width), np.uint8), colour.lower()))
        self._changed()
        return n

    def remove_brush(self, i: int) -> None:
        self.brush(i)
        if len(self.brushes) == 1:
            raise SmdError("a painting keeps at least one brush")
        self._remember()
        del self.brushes[i]
        self._changed()

    def move_brush(self, i: int, to: int) -> None:
        """Move brush `i` to place `to`: later brushes cover earlier ones."""
        brush = self.brush(i)
        self.brush(to)
        if i == to:
            return
        self._remember()
        del self.brushes[i]
        self.brushes.insert(to, brush)
        self._changed()

    def update_brush(self, i: int, **fields: Any) -> None:
        """Change brush `i`'s prompt, name, strengths or colour, checked as a scene's layer is."""
        brush = self.brush(i)
        fields = page_fields(fields)
        colour = fields.pop("colour", None)
        layer = _layer({**brush.layer.model_dump(exclude_unset=True), **fields}, i)
        self._remember()
        self.brushes[i] = Brush(layer, brush.mask, colour.lower() if colour else brush.colour)
        self._changed()

    def update_background(self, prompt: str | None = None, negative_prompt: str | None = None) -> None:
        update = {k: v for k, v in (("prompt", prompt), ("negative_prompt", negative_prompt)) if v is not None}
        self._replace(background=self.scene.background.model_copy(update=_checked_text(update)))

    def set_picture(self, picture: Image.Image | None) -> None:
        """The picture the layers are painted over (None: the background prompt fills the rest)."""
        if picture is None and self.picture is None:
            return
        if picture is not None and picture.size != (self.width, self.height):
            from smd_cli.method.masks import fit_picture

            picture = fit_picture(picture, self.width, self.height, warn=False)  # the app says so itself
        self._remember()
        self.picture = None if picture is None else picture.convert("RGB")
        self.picture_version += 1
        self._changed()

    def set_seed(self, seed: int | None) -> None:
        self._replace(seed=seed)

    def set_region_mode(self, mode: str) -> None:
        """How the brushes' regions are sampled (`defaults.REGION_MODES`), a scene key saved and
        undone like the seed. A running stream cannot change it: `PaintSession` starts a new one."""
        if mode != self.scene.region_mode:
            self._replace(region_mode=mode)

    def stroke(self, i: int, points: Sequence[Sequence[float]], size: float, erase: bool = False) -> None:
        """Paint (or erase) a round brush of diameter `size` pixels along `points` [(x, y), ...] in
        canvas pixels, into brush `i`'s mask only."""
        brush = self.brush(i)
        try:
            count = len(points)
            xy = [(float(x), float(y)) for x, y in points]
            size = float(size)
        except (TypeError, ValueError):
            raise SmdError("a stroke's points are [x, y] pairs of numbers and its size a number") from None
        if not 1 <= count <= MAX_STROKE_POINTS:
            raise SmdError(f"a stroke has 1 to {MAX_STROKE_POINTS} points, got {count}")
        limit = 4 * max(self.width, self.height)  # far outside the canvas paints nothing anyway
        if not all(np.isfinite(v) and abs(v) <= limit for p in xy for v in p) or not 1 <= size <= limit:
            raise SmdError("a stroke's points must be finite and near the canvas, and its size between 1 and "
                           f"{limit} pixels")
        image = Image.fromarray(brush.mask.copy(), "L")
        draw, value, r = ImageDraw.Draw(image), 0 if erase else 255, size / 2
        if len(xy) > 1:
            draw.line(xy, fill=value, width=max(1, round(size)), joint="curve")
        for x, y in (xy[0], xy[-1]) if len(xy) > 1 else xy:  # round ends
            draw.ellipse((x - r, y - r, x + r, y + r), fill=value)
        mask = np.asarray(image, np.uint8).copy()
        if np.array_equal(mask, brush.mask):
            return  # nothing changed (a stroke outside the canvas, an eraser on nothing): nothing to undo
        self._remember()
        self.brushes[i] = dataclasses.replace(brush, mask=mask)
        self._changed()

    def undo(self) -> bool:
        """Take back the last edit (a stroke, a brush added, removed, moved or changed, the
        background, the picture, the seed or the region mode); False when there is nothing to take back."""
        if not self._undo:
            return False
        snapshot = self._undo.pop()
        self.scene, self.brushes = snapshot.scene, list(snapshot.brushes)
        if snapshot.picture is not self.picture:
            self.picture, self.picture_version = snapshot.picture, self.picture_version + 1
        self._changed()
        return True

    def _remember(self) -> None:
        """Keep the painting as it is before an edit. Brushes are replaced, never changed in place,
        and masks are never written into, so a snapshot shares them instead of copying."""
        snapshot = _Snapshot(self.scene, tuple(self.brushes), self.picture)
        self._undo = (self._undo + [snapshot])[-UNDO_DEPTH:]

    # For the engine.

    def scene_file(self) -> SceneFile:
        """The painting as a scene (masks aside: `scene_masks`)."""
        scene = self.scene.model_copy(update={"layers": [b.layer for b in self.brushes],
                                              "width": self.width, "height": self.height})
        return SceneFile(scene, self.source.path if self.source else None, label="painting")

    def scene_masks(self) -> SceneMasks:
        masks = SceneMasks.of(np.stack([b.mask for b in self.brushes]).astype(np.float32) / 255.0,
                              [b.layer.name or f"layer {i + 1}" for i, b in enumerate(self.brushes)])
        masks.picture = self.picture
        return masks

    # Saving.

    def save(self, folder: Path, stem: str) -> Path:
        """Write `<stem>.yaml` and its masks (and picture) in `<stem>/` inside `folder`, under the
        first free name (`<stem>-1`, ...): nothing is ever overwritten. Returns the scene's path."""
        from smd_cli.app.records import dump_yaml
        from smd_cli.core.outputs import MAX_NUMBERED, numbered, safe_name, write_atomic

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        base = folder / f"{slug(safe_name(stem)) or 'painting'}.yaml"
        for n in range(MAX_NUMBERED):
            path = numbered(base, n)
            files = folder / path.stem
            if not path.exists():
                try:
                    files.mkdir()  # claimed: a second save at once takes the next name
                    break
                except FileExistsError:
                    continue
        else:
            raise OutputError(f"no free name for {base} in {folder}")
        data = self.scene.model_dump(mode="json", exclude_unset=True)
        data.update(width=self.width, height=self.height, layers=[])
        moved = self.source is not None and self.source.path is not None and (
            self.source.base_dir.resolve() != folder.resolve())
        for key in ("model", "lcm_lora", "vae", "output"):  # paths stay as meant from another folder
            if moved and data.get(key):
                data[key] = self._from_source(key, data[key])
        for i, brush in enumerate(self.brushes):
            name = f"{i + 1:02d}-{slug(brush.layer.name or '') or 'layer'}.png"
            write_atomic(files / name, lambda fh, m=brush.mask: Image.fromarray(m, "L").save(fh, format="PNG"))
            data["layers"].append({**brush.layer.model_dump(mode="json", exclude_unset=True),
                                   "mask": f"{files.name}/{name}"})
        background = dict(data.get("background") or {})
        background.pop("image_sha256", None)
        background.pop("image", None)
        if self.picture is not None:
            write_atomic(files / "background.png", lambda fh: self.picture.save(fh, format="PNG"))
            background["image"] = f"{files.name}/background.png"
        if background:
            data["background"] = background
        else:
            data.pop("background", None)
        text = "# Painted with smd paint.\n" + dump_yaml(data)
        write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))
        return path

    def _from_source(self, key: str, value: str) -> str:
        if key == "output":
            p = expand_user(value)
            return value if p.is_absolute() else str(self.source.base_dir.absolute() / p)
        found = self.source.source(value)
        return str(Path(found).absolute()) if found != value else value

    def _replace(self, **update: Any) -> None:
        data = {**self.scene.model_dump(exclude_unset=True), **update}
        try:
            scene = validate_scene(data).scene
        except SmdError as exc:
            raise SmdError(str(exc).removeprefix("error: ")) from None
        self._remember()
        self.scene = scene
        self._changed()

    def _changed(self) -> None:
        self.version += 1


@dataclass(frozen=True)
class _Snapshot:
    """A painting as it was before an edit, for `Painting.undo`."""

    scene: Scene
    brushes: tuple[Brush, ...]
    picture: Image.Image | None


def page_fields(fields: Any) -> dict[str, Any]:
    """Brush settings from the page, checked against what the page may set (`BrushFields`)."""
    if not isinstance(fields, dict):
        raise SmdError("a brush's settings are a mapping of " + ", ".join(BrushFields.model_fields))
    unknown = sorted(set(fields) - set(BrushFields.model_fields), key=str)
    if unknown:
        raise not_a_page_setting(", ".join(map(str, unknown)))
    try:
        return BrushFields.model_validate(fields).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise SmdError(f"brush settings: {first_problem(exc)}") from None


def not_a_page_setting(names: str) -> SmdError:
    """The refusal of brush settings a page may not set: whatever names a file or a model."""
    return SmdError(f"a brush has no setting {names} the page may set; it has {', '.join(BrushFields.model_fields)} "
                    "(models and files come from the scene file)")


def first_problem(exc: ValidationError) -> str:
    """pydantic's first complaint as `key: message`, short enough for one line on the page."""
    problem = exc.errors(include_url=False)[0]
    key = ".".join(str(p) for p in problem["loc"])
    return f"{key}: {problem['msg']}" if key else problem["msg"]


def _layer(data: dict, i: int) -> Layer:
    """A brush's settings checked as a scene layer's are, the error naming the brush."""
    try:
        return Layer.model_validate({**_checked_text(data), "mask": None})
    except ValidationError as exc:
        problem = exc.errors()[0]
        key = ".".join(str(p) for p in problem["loc"])
        raise SmdError(f"brush {i + 1}: {key}: {problem['msg']}") from None


def _checked_text(data: dict) -> dict:
    for key in ("name", "prompt", "negative_prompt"):
        if key in data and data[key] is not None and not isinstance(data[key], str):
            raise SmdError(f"{key} must be text")
    return data


def to_bytes(mask: np.ndarray) -> np.ndarray:
    """A mask in [0, 1] as uint8 (255 = 1)."""
    return np.round(np.clip(mask, 0.0, 1.0) * 255.0).astype(np.uint8)


def slug(text: str) -> str:
    """Lower-case letters, digits and dashes, for file names."""
    return _SLUG.sub("-", text.lower()).strip("-")[:40]


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
