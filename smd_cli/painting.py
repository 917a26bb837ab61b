"""A painting: a scene held in memory while `smd paint` edits it, and saved as a scene file again.

The app's whole state is a scene (every key a scene file can hold, kept as it was read) whose
layers are brushes: each has an 8-bit mask at canvas size that strokes paint, and a colour the
page shows it in. `Painting.from_scene` opens any scene (image, palette and shape masks become
bitmaps); `save` writes the scene back as YAML with one grayscale PNG per brush, which
`smd generate` renders again. The server only moves edits and frames; every rule is here, so
that it is tested without a browser. No torch at import.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from pydantic import ValidationError

from smd_cli import defaults
from smd_cli.canvas import SceneMasks, scene_masks
from smd_cli.errors import OutputError, SmdError
from smd_cli.scene import Layer, PaletteMask, Scene, SceneFile, validate_scene

# Colours of brushes whose masks name none (a palette mask's colour is kept).
BRUSH_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                 "#fabed4", "#469990", "#dcbeff", "#9a6324")
UNDO_DEPTH = 32  # strokes that can be taken back
MAX_BRUSHES = 64
MAX_STROKE_POINTS = 10_000
# Brush fields the page may edit, as the scene's layers name them.
BRUSH_FIELDS = ("name", "prompt", "negative_prompt", "mask_strength", "mask_std", "prompt_strength")
_SLUG = re.compile(r"[^a-z0-9]+")


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
        self._undo: list[tuple[int, np.ndarray]] = []
        self.version = 0  # counts edits, so that a stream applies each once

    # Opening.

    @classmethod
    def from_scene(cls, sf: SceneFile, width: int | None = None, height: int | None = None) -> "Painting":
        """Every layer of a scene as a brush, its mask read at canvas size (SPEC 2.2)."""
        masks = scene_masks(sf, width, height)
        brushes = []
        for i, (layer, mask) in enumerate(zip(sf.scene.layers, masks.masks)):
            colour = layer.mask.color if isinstance(layer.mask, PaletteMask) else BRUSH_COLOURS[i % len(BRUSH_COLOURS)]
            brushes.append(Brush(layer.model_copy(update={"mask": None}), to_bytes(mask), colour))
        return cls(sf.scene, brushes, masks.picture, width=masks.width, height=masks.height, source=sf)

    @classmethod
    def blank(cls, width: int = defaults.SIZE, height: int = defaults.SIZE) -> "Painting":
        """A white canvas with one brush and nothing painted."""
        scene = Scene(width=width, height=height, layers=[Layer(name="brush 1", prompt="")])
        empty = np.zeros((height, width), np.uint8)
        return cls(scene, [Brush(scene.layers[0], empty, BRUSH_COLOURS[0])], None, width=width, height=height)

    # What the page shows.

    def state(self) -> dict[str, Any]:
        """The painting for the page, masks aside (see `mask_png`)."""
        return {"width": self.width, "height": self.height, "seed": self.scene.seed,
                "background": {"prompt": self.scene.background.prompt,
                               "negative_prompt": self.scene.background.negative_prompt,
                               "picture": self.picture is not None},
                "brushes": [{**{k: getattr(b.layer, k) for k in BRUSH_FIELDS}, "colour": b.colour}
                            for b in self.brushes],
                "undo": len(self._undo), "version": self.version}

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
        layer = _layer({"name": f"brush {n + 1}", "prompt": "", **fields}, n)
        colour = next((c for c in BRUSH_COLOURS if c not in {b.colour for b in self.brushes}), BRUSH_COLOURS[n % 12])
        self.brushes.append(Brush(layer, np.zeros((self.height, self.width), np.uint8), colour))
        self._changed()
        return n

    def remove_brush(self, i: int) -> None:
        self.brush(i)
        if len(self.brushes) == 1:
            raise SmdError("a painting keeps at least one brush")
        del self.brushes[i]
        self._undo = [(j - (j > i), m) for j, m in self._undo if j != i]
        self._changed()

    def move_brush(self, i: int, to: int) -> None:
        """Move brush `i` to place `to`: later brushes cover earlier ones."""
        brush = self.brush(i)
        self.brush(to)
        order = [j for j in range(len(self.brushes)) if j != i]
        order.insert(to, i)
        self.brushes = [self.brushes[j] for j in order]
        self._undo = [(order.index(j), m) for j, m in self._undo]
        assert self.brushes[to] is brush
        self._changed()

    def update_brush(self, i: int, **fields: Any) -> None:
        """Change brush `i`'s prompt, name or strengths, checked as a scene's layer is."""
        brush = self.brush(i)
        unknown = set(fields) - set(BRUSH_FIELDS) - {"colour"}
        if unknown:
            raise SmdError(f"a brush has no setting {', '.join(sorted(unknown))}; it has {', '.join(BRUSH_FIELDS)}")
        colour = fields.pop("colour", None)
        if colour is not None:
            if not re.fullmatch(r"#[0-9a-fA-F]{6}", str(colour)):
                raise SmdError(f"a brush colour is #rrggbb, got {colour!r}")
            brush.colour = str(colour).lower()
        brush.layer = _layer({**brush.layer.model_dump(exclude_unset=True), **fields}, i)
        self._changed()

    def update_background(self, prompt: str | None = None, negative_prompt: str | None = None) -> None:
        update = {k: v for k, v in (("prompt", prompt), ("negative_prompt", negative_prompt)) if v is not None}
        self._replace(background=self.scene.background.model_copy(update=_checked_text(update)))

    def set_picture(self, picture: Image.Image | None) -> None:
        """The picture the layers are painted over (None: the background prompt fills the rest)."""
        if picture is not None and picture.size != (self.width, self.height):
            from smd_cli.masks import fit_picture

            picture = fit_picture(picture, self.width, self.height)
        self.picture = None if picture is None else picture.convert("RGB")
        self._changed()

    def set_seed(self, seed: int | None) -> None:
        self._replace(seed=seed)

    def stroke(self, i: int, points: Sequence[Sequence[float]], size: float, erase: bool = False) -> None:
        """Paint (or erase) a round brush of diameter `size` pixels along `points` [(x, y), ...] in
        canvas pixels, into brush `i`'s mask only."""
        brush = self.brush(i)
        if not points or len(points) > MAX_STROKE_POINTS:
            raise SmdError(f"a stroke has 1 to {MAX_STROKE_POINTS} points, got {len(points)}")
        try:
            xy = [(float(x), float(y)) for x, y in points]
            size = float(size)
        except (TypeError, ValueError):
            raise SmdError("a stroke's points are [x, y] pairs of numbers and its size a number") from None
        if not all(np.isfinite(v) for p in xy for v in p) or not 1 <= size <= 4 * max(self.width, self.height):
            raise SmdError("a stroke's points must be finite and its size between 1 and the canvas's")
        self._undo = (self._undo + [(i, brush.mask.copy())])[-UNDO_DEPTH:]
        image = Image.fromarray(brush.mask, "L")
        draw, value, r = ImageDraw.Draw(image), 0 if erase else 255, size / 2
        if len(xy) > 1:
            draw.line(xy, fill=value, width=max(1, round(size)), joint="curve")
        for x, y in (xy[0], xy[-1]) if len(xy) > 1 else xy:  # round ends
            draw.ellipse((x - r, y - r, x + r, y + r), fill=value)
        brush.mask = np.asarray(image, np.uint8).copy()
        self._changed()

    def undo(self) -> int | None:
        """Take back the last stroke; returns the brush it changed (None: nothing to take back)."""
        if not self._undo:
            return None
        i, mask = self._undo.pop()
        self.brushes[i].mask = mask
        self._changed()
        return i

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
        from smd_cli.metadata import dump_yaml
        from smd_cli.outputs import MAX_NUMBERED, numbered, safe_name, write_atomic

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
            p = Path(value).expanduser()
            return value if p.is_absolute() else str(self.source.base_dir.absolute() / p)
        found = self.source.source(value)
        return str(Path(found).absolute()) if found != value else value

    def _replace(self, **update: Any) -> None:
        data = {**self.scene.model_dump(exclude_unset=True), **update}
        try:
            self.scene = validate_scene(data).scene
        except SmdError as exc:
            raise SmdError(str(exc).removeprefix("error: ")) from None
        self._changed()

    def _changed(self) -> None:
        self.version += 1


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
