"""A scene's canvas and masks, read from its files: the canvas size, each layer's mask (image,
palette colour, rectangle or ellipse) as a box on the canvas, the inpainting picture, and how much
of the canvas the layers cover. Every failure is a scene error located at the key that names the
file. The mask arithmetic itself (docs/method.md §2.2) is in `smd_cli.method.masks`, which knows nothing of scenes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from smd_cli.core import defaults
from smd_cli.core.errors import SceneError, SmdError
from smd_cli.core.files import MAX_IMAGE_BYTES, UnreadableFile, decode_image, image_size, read_bytes
from smd_cli.families import default_grid
from smd_cli.method.masks import (
    PALETTE_TOLERANCE,
    LayerMask,
    aspect_mismatch,
    check_divisible,
    ellipse_box,
    image_mask,
    main_colors,
    palette_labels,
    rect_box,
    resize,
)
from smd_cli.method.views import CanvasError, Grid, Tiling, tiling, work_problem
from smd_cli.scenes.scene import (
    EllipseMask,
    PaletteMask,
    RectMask,
    SceneFile,
    default_layer_name,
    mask_file,
    scene_controlnets,
    scene_files,
    scene_references,
    step_count,
)

MAX_MASK_BYTES = 4 * 2**30  # the layers' masks at canvas size, as float32


@dataclass
class SceneMasks:
    """The scene's layer masks at canvas size, before occlusion and blur: each layer's box, and the
    full [P, H, W] array (`masks`) made when generating asks for it."""

    layers: list[LayerMask]
    width: int
    height: int
    names: list[str]
    files: dict[Path, str] = field(default_factory=dict)  # absolute path -> SHA-256 of the bytes read
    picture: Image.Image | None = None  # the inpainting picture, as read with the masks
    controls: dict[tuple, Image.Image] = field(default_factory=dict)  # ControlNet or reference key -> image, RGB

    @functools.cached_property
    def masks(self) -> np.ndarray:
        """[P, H, W] float32: every layer over the whole canvas."""
        out = np.zeros((len(self.layers), self.height, self.width), np.float32)
        for layer, box in zip(out, self.layers):
            layer[box.rows, box.cols] = box.values
        return out

    @staticmethod
    def of(masks: np.ndarray, names: list[str]) -> "SceneMasks":
        """Scene masks from full [P, H, W] masks."""
        return SceneMasks([LayerMask.of(m) for m in masks], masks.shape[2], masks.shape[1], names)


class FileChangedWarning(UserWarning):
    """A file a scene reads is not the one whose SHA-256 the scene recorded."""


class _Images:
    """Reads each image of a scene once, turning failures into located scene errors."""

    def __init__(self, sf: SceneFile):
        self.sf = sf
        self.cache: dict[Path, Image.Image] = {}
        self.hashes: dict[Path, str] = {}  # SHA-256 of the bytes each image was decoded from

    def get(self, relative: str, key: tuple, what: str = "mask", sha256: str | None = None) -> Image.Image:
        path = self.sf.resolve(relative)
        if path not in self.cache:
            with self._reading(path, key, what):
                self.cache[path] = decode_image(self._read(path, key, sha256))
        return self.cache[path]

    def size(self, relative: str, key: tuple, what: str = "mask") -> tuple[int, int]:
        """The image's size from its header only (reading and hashing are `get`'s)."""
        path = self.sf.resolve(relative)
        if path in self.cache:
            return self.cache[path].size
        with self._reading(path, key, what):
            return image_size(path)

    @contextlib.contextmanager
    def _reading(self, path: Path, key: tuple, what: str) -> Iterator[None]:
        """Any failure to read an image as an error located at the key that names it."""
        try:
            yield
        except FileNotFoundError:
            raise self.sf.error(key, f"{what} file not found: {path}") from None
        except UnreadableFile as exc:
            raise self.sf.error(key, f"cannot read {what} image {path}: it is {exc}") from None
        except UnidentifiedImageError:
            raise self.sf.error(key, f"cannot read {what} image {path}: not an image PIL can read") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise self.sf.error(key, f"cannot read {what} image {path}: {reason}") from None

    def _read(self, path: Path, key: tuple, expected: str | None) -> bytes:
        """The file's bytes, hashed as read (so a record names exactly what was used); warns when a
        hash the scene recorded (as in the scenes smd writes into its images) no longer matches."""
        data = read_bytes(path, MAX_IMAGE_BYTES)
        self.hashes[path.absolute()] = digest = hashlib.sha256(data).hexdigest()
        if expected is not None and digest != expected:
            warnings.warn(str(self.sf.error(key, f"{path} has changed since its sha256 was recorded; the result "
                                                 "will differ from the image it was recorded for")),
                          FileChangedWarning, stacklevel=3)
        return data


def canvas_size(sf: SceneFile, images: _Images | None = None, multiple: int = 1) -> tuple[int, int]:
    """(width, height): from the scene, else from the first mask image or the background image, else
    `defaults.SIZE`. A side derived from an image's aspect ratio is rounded to a `multiple`."""
    s = sf.scene
    if s.width is not None and s.height is not None:
        return s.width, s.height
    images = images or _Images(sf)
    for key, path in scene_files(sf).items():
        mw, mh = images.size(str(path), key, "mask" if key[0] == "layers" else "background")
        if s.width is None and s.height is None:
            width, height = mw, mh
        elif s.width is not None:
            width, height = s.width, max(multiple, round(s.width * mh / mw / multiple) * multiple)
        else:
            width, height = max(multiple, round(s.height * mw / mh / multiple) * multiple), s.height
        if not all(defaults.MIN_SIZE <= side <= defaults.MAX_SIZE for side in (width, height)):
            raise sf.error(key, f"this {mw}x{mh} image makes the canvas {width}x{height}, but each side must be "
                                f"{defaults.MIN_SIZE} to {defaults.MAX_SIZE} pixels; set width and height")
        return width, height
    return s.width or defaults.SIZE, s.height or defaults.SIZE


def checked_canvas(sf: SceneFile, factor: int | None) -> tuple[int, int]:
    """The canvas size, which must be divisible by the model's VAE downscale factor. With the factor
    unknown (a hub model not downloaded yet) that is checked once the model has loaded."""
    width, height = canvas_size(sf, multiple=factor or 1)
    try:
        check_divisible(width, height, factor or 1)
    except SmdError as exc:
        raise sf.error(("width",) if width % factor else ("height",), str(exc)) from None
    return width, height


def model_canvas(sf: SceneFile, model: str | None, config: str | None = None, *, allow_large: bool = False,
                 stream: bool = False) -> tuple[SceneMasks, int | None]:
    """The scene's masks on the canvas `model` needs, and the model's downscale factor, read from
    its config without loading anything (None when not known before the model loads). Before any
    mask is read, the canvas and its views are checked against the model (`canvas_views`) and the
    work they ask for (`check_work`: of an image, or with `stream` of a stream's frame)."""
    from smd_cli.models.loading import vae_downscale_factor
    from smd_cli.scenes.presets import model_grid

    factor = vae_downscale_factor(model)
    width, height = checked_canvas(sf, factor)
    views = canvas_views(sf, model_grid(model, config), width, height, stream=stream)
    check_work(sf, views, allow_large=allow_large, stream=stream)
    if not stream:
        check_hires(sf, model_grid(model, config), width, height, allow_large=allow_large)
    return scene_masks(sf, width, height), factor


def canvas_views(sf: SceneFile, grid: Grid | None, width: int, height: int, *, stream: bool = False) -> Tiling:
    """The scene's views on a model of `grid` (`views.tiling`: the canvas checked against the model's
    family, errors located at the key that sets what is wrong). With the grid unknown (a model not
    downloaded yet) the canvas is checked when the model loads, and the views counted are the
    default model's, whose native size is the smallest: the most views a canvas could get. A stream
    lays its views out at the default stride."""
    s = sf.scene
    stride = None if stream else s.tile_stride
    if grid is None:
        grid = default_grid()
        width, height = max(width - width % grid.factor, grid.factor), max(height - height % grid.factor, grid.factor)
        if stride is not None and s.tile_size is None:  # the model's own default tile may be larger
            stride = min(stride, grid.tile(height, width))
    try:
        return tiling(grid, width, height, tile_size=s.tile_size, tile_stride=stride,
                      circular=s.circular)
    except CanvasError as exc:
        raise sf.error((exc.key,), str(exc)) from None


def check_work(sf: SceneFile, views: Tiling, *, allow_large: bool = False, stream: bool = False) -> None:
    """Refuse a scene whose views, layers and steps (a stream's stages, with `stream`) ask for more
    denoiser passes than smd runs without --allow-large, or at all (`views.work_problem`); the error
    is at the key that multiplies most."""
    s = sf.scene
    steps = stream_steps(s) if stream else step_count(s)
    problem = work_problem(views.count, len(s.layers), steps, allow_large=allow_large, allow="--allow-large",
                           per="frame" if stream else "image")
    if problem is None:
        return
    if views.count >= max(len(s.layers), steps):
        key = "tile_stride" if s.tile_stride is not None and not stream else "tile_size" if s.tile_size else "width"
    else:
        key = "layers" if len(s.layers) >= steps else "timesteps" if s.timesteps else "steps"
    raise sf.error((key,), problem)


def check_hires(sf: SceneFile, grid: Grid | None, width: int, height: int, *, allow_large: bool = False) -> None:
    """A hires pass's larger canvas (docs/large-pictures.md) checked as every canvas is: its sides
    (`canvas_views`) and the work of its views (`check_work`), errors at `hires.scale`."""
    from smd_cli.method.hires import hires_size

    h = sf.scene.hires
    if h is None:
        return
    grid = grid or default_grid()
    big_width, big_height = hires_size(width, height, h.scale, grid.multiple)
    fix = f"; lower hires.scale (the first pass is {width}x{height})"
    try:  # the second pass's views are the first pass's tile (`engine.hires.first_tile`)
        views = tiling(grid, big_width, big_height, tile_size=sf.scene.tile_size or grid.tile(height, width),
                       tile_stride=sf.scene.tile_stride, circular=sf.scene.circular)
    except CanvasError as exc:
        raise sf.error(("hires", "scale"), f"hires.scale {h.scale} makes the canvas {big_width}x{big_height}: "
                                           f"{exc}{fix}") from None
    steps = h.steps or step_count(sf.scene)
    problem = work_problem(views.count, len(sf.scene.layers), steps, allow_large=allow_large,
                           allow="--allow-large")
    if problem:
        raise sf.error(("hires", "scale"), f"hires.scale {h.scale} makes the canvas {big_width}x{big_height}: "
                                           f"{problem}{fix}")


def stream_steps(scene) -> int:
    """The stages of a stream of `scene`: its timesteps, its LCM steps, else LCM's default (a stream
    samples with LCM whatever the scene's scheduler)."""
    if scene.timesteps is not None:
        return len(scene.timesteps)
    return scene.steps if scene.steps and scene.scheduler == "lcm" else defaults.STEPS["lcm"]


def scene_masks(sf: SceneFile, width: int | None = None, height: int | None = None, *,
                painted: bool = True) -> SceneMasks:
    """Every layer's mask at canvas size, raising located `SceneError`s for bad mask inputs; with
    `painted`, also when no layer paints anything (surely a mistake in a scene made to generate,
    not in a painting still to be painted)."""
    images = _Images(sf)
    if width is None or height is None:
        width, height = canvas_size(sf, images)
    layers = sf.scene.layers

    # Each palette image lists every colour that any layer takes from it, plus its background colours.
    palette_colors: dict[Path, list[str]] = {}
    for layer in layers:
        if isinstance(layer.mask, PaletteMask):
            colors = palette_colors.setdefault(sf.resolve(layer.mask.palette), [])
            colors += (layer.mask.color, layer.mask.background_color)
    palette_colors = {path: list(dict.fromkeys(colors)) for path, colors in palette_colors.items()}  # linear
    labels: dict[Path, tuple] = {}

    need = len(layers) * height * width * np.dtype(np.float32).itemsize
    if need > MAX_MASK_BYTES:
        raise sf.error(("layers",), f"{len(layers)} layers on a {width}x{height} canvas need {need / 2**30:.1f} GiB of "
                                    f"masks, more than the {MAX_MASK_BYTES / 2**30:.0f} GiB smd allows; use fewer "
                                    "layers or a smaller canvas")
    boxes: list[LayerMask] = []
    problems: list[SceneError] = []
    for i, layer in enumerate(layers):
        try:
            boxes.append(_layer_mask(sf, images, i, layer.mask, width, height, palette_colors, labels))
        except SceneError as exc:  # every layer's problem is reported, not only the first
            problems.append(exc)
    picture = None
    if sf.scene.background.image is not None:  # read here, so that no model loads for a missing or broken file
        try:
            picture = images.get(sf.scene.background.image, ("background", "image"), "background",
                                 sf.scene.background.image_sha256).convert("RGB")
        except SceneError as exc:
            problems.append(exc)
    controls = {}
    for key, spec in scene_controlnets(sf):  # read with the masks: a missing image is found before loading
        try:
            image = images.get(spec.image, key + ("image",), "control image", spec.sha256)
            if aspect_mismatch(image.size, width, height):
                raise sf.error(key + ("image",), f"control image is {image.size[0]}x{image.size[1]} but the canvas is "
                                                 f"{width}x{height}: the aspect ratios differ; crop or pad the image, "
                                                 "or set width and height to match it")
            controls[key] = image.convert("RGB")
        except SceneError as exc:
            problems.append(exc)
    for key, spec in scene_references(sf):
        try:
            controls[key] = images.get(spec.image, key + ("image",), "reference image", spec.sha256).convert("RGB")
        except SceneError as exc:
            problems.append(exc)
    if problems:
        raise SceneError.gather(problems)
    if painted and not any(box.values.any() for box in boxes):  # stops at the first layer that paints
        raise sf.error(("layers",), "every layer's mask is empty: nothing would be painted; "
                                    "check the mask images, colours and rectangles")
    return SceneMasks(boxes, width, height, [layer.name or default_layer_name(i) for i, layer in enumerate(layers)],
                      files=images.hashes, picture=picture, controls=controls)


def _layer_mask(sf: SceneFile, images: _Images, i: int, spec, width: int, height: int,
                palette_colors: dict[Path, list[str]], labels: dict[Path, tuple]) -> LayerMask:
    """One layer's mask at canvas size (docs/method.md §2.2: read, resize, threshold)."""
    key = ("layers", i, "mask")
    if spec is None:
        return LayerMask(slice(0, height), slice(0, width), np.ones((height, width), np.float32))
    if isinstance(spec, RectMask):
        return rect_box(spec.rect, height, width)
    if isinstance(spec, EllipseMask):
        return ellipse_box(spec.ellipse, height, width)
    image = images.get(mask_file(spec), key, sha256=spec.sha256)
    if aspect_mismatch(image.size, width, height):
        raise sf.error(key, f"mask image is {image.size[0]}x{image.size[1]} but the canvas is {width}x{height}: "
                            "the aspect ratios differ; crop or pad the image, or set width and height to match it")
    if isinstance(spec, PaletteMask):
        path = sf.resolve(spec.palette)
        if spec.color == spec.background_color:
            raise sf.error(key + ("color",), f"colour {spec.color} is also the background colour of {path.name}; "
                                             "give the layer its own colour")
        if path not in labels:  # once per palette, with each colour's place: no layer searches the list
            labels[path] = (*palette_labels(image, palette_colors[path]),
                            {color: n for n, color in enumerate(palette_colors[path])})
        found, present, places = labels[path]
        index = places[spec.color]
        if not present[index]:
            colours = ", ".join(main_colors(image)) or "none (fully transparent)"
            raise sf.error(key + ("color",), f"colour {spec.color} matches no pixel of {path.name} (none within "
                                             f"{PALETTE_TOLERANCE} of it); its main colours are {colours}")
        return LayerMask.of((resize((found == index).astype(np.float32), height, width) > 0.5).astype(np.float32))
    m = resize(image_mask(image), height, width)
    if spec.invert:
        m = 1.0 - m
    if spec.threshold is not None:
        m = (m > spec.threshold).astype(np.float32)
    return LayerMask.of(m)


# Overlaps are named pair by pair where the layers are few enough to pair up (PAIRED_LAYERS) and the
# areas where their boxes meet small enough to compare (PAIRED_PIXELS); past either, each layer gets
# the share of the canvas it has in common with any other, which costs the layers' areas, not their pairs.
PAIRED_LAYERS = 256
PAIRED_PIXELS = 2**26


@dataclass
class Coverage:
    name: str
    coverage: float  # % of the canvas
    overlaps: dict[str, float]  # other layer -> % of the canvas shared (empty where not paired up)
    shared: float = 0.0  # % of the canvas this layer shares with any other


def coverage_report(masks: SceneMasks) -> tuple[list[Coverage], float]:
    """Per-layer coverage and overlaps in % of the canvas, and the uncovered %: linear in the
    layers' areas, however many layers there are (pairwise overlaps only within `_pairwise`'s bounds)."""
    boxes, names = masks.layers, masks.names
    percent = 100.0 / (masks.width * masks.height)
    top = np.zeros((masks.height, masks.width), np.float32)  # the most any layer covers each pixel
    depth = np.zeros((masks.height, masks.width), np.uint8)  # layers covering each pixel (over half): 0, 1, 2 or more
    for box in boxes:
        np.maximum(top[box.rows, box.cols], box.values, out=top[box.rows, box.cols])
        covered = depth[box.rows, box.cols]
        covered += (box.values > 0.5) & (covered < 2)
    shared = [np.count_nonzero((box.values > 0.5) & (depth[box.rows, box.cols] > 1)) * percent for box in boxes]
    overlaps = _pairwise(boxes, names, percent) or [{} for _ in boxes]
    rows = [Coverage(name, float(box.values.sum() * percent), overlap, float(common))
            for name, box, overlap, common in zip(names, boxes, overlaps, shared)]
    return rows, float((1.0 - top).clip(0.0, 1.0).sum() * percent)


def _pairwise(boxes: list[LayerMask], names: list[str], percent: float) -> list[dict[str, float]] | None:
    """Each layer's overlap with each other, in layer order; None past PAIRED_LAYERS layers or
    PAIRED_PIXELS pixels where their boxes meet. Only boxes that meet are compared, only where they meet."""
    if len(boxes) > PAIRED_LAYERS:
        return None
    edges = np.array([[b.rows.start, b.rows.stop, b.cols.start, b.cols.stop] for b in boxes], np.int64).reshape(-1, 4)
    tall = np.minimum.outer(edges[:, 1], edges[:, 1]) - np.maximum.outer(edges[:, 0], edges[:, 0])
    wide = np.minimum.outer(edges[:, 3], edges[:, 3]) - np.maximum.outer(edges[:, 2], edges[:, 2])
    meet = np.triu(tall.clip(0) * wide.clip(0), 1)  # pixels where each pair's boxes meet
    if meet.sum() > PAIRED_PIXELS:
        return None
    overlaps: list[dict[str, float]] = [{} for _ in boxes]  # filled in layer order, as pairs come
    for i, j in zip(*np.nonzero(meet)):
        a, b = boxes[i], boxes[j]
        rows = slice(max(a.rows.start, b.rows.start), min(a.rows.stop, b.rows.stop))
        cols = slice(max(a.cols.start, b.cols.start), min(a.cols.stop, b.cols.stop))
        shared = np.count_nonzero((a.within(rows, cols) > 0.5) & (b.within(rows, cols) > 0.5))
        if shared:
            overlaps[i][names[j]] = overlaps[j][names[i]] = shared * percent
    return overlaps
