"""Views (docs/method.md §5): overlapping windows that cover a canvas larger than the model's window.

Each view carries a weight map; the weights of all views sum to exactly 1 at every latent pixel,
so the aggregation of docs/method.md §3 averages the views' clean estimates without seams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

from smd_cli.core import defaults
from smd_cli.core.errors import SmdError

if TYPE_CHECKING:  # torch is imported where views are laid out: planning counts them without it
    import torch

Index = Union[slice, "torch.Tensor"]


@dataclass
class View:
    """A window of the latent and its weight omega_v, broadcastable to [1, 1, h, w].

    `rows` and `cols` are slices, or index tensors for windows that wrap around a circular canvas.
    """

    rows: Index
    cols: Index
    weight: Optional[torch.Tensor] = None  # None means 1 everywhere

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """t[..., rows, cols]."""
        t = t[..., self.rows, :] if isinstance(self.rows, slice) else t.index_select(-2, self.rows)
        return t[..., self.cols] if isinstance(self.cols, slice) else t.index_select(-1, self.cols)

    @property
    def corner(self) -> tuple[int, int]:
        """(top, left): where the window starts on the canvas (a wrapping window, at its first row and column)."""
        top = self.rows.start if isinstance(self.rows, slice) else int(self.rows[0])
        left = self.cols.start if isinstance(self.cols, slice) else int(self.cols[0])
        return top, left

    def sub(self, r0: int, r1: int, c0: int, c1: int) -> "View":
        """The part [r0:r1, c0:c1] of this view (coordinates within the view), with its weights."""
        rows = slice(self.rows.start + r0, self.rows.start + r1) if isinstance(self.rows, slice) else self.rows[r0:r1]
        cols = slice(self.cols.start + c0, self.cols.start + c1) if isinstance(self.cols, slice) else self.cols[c0:c1]
        weight = None if self.weight is None else self.weight[..., r0:r1, c0:c1]
        return View(rows, cols, weight)

    def add_into(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """target[..., rows, cols] += value, in place."""
        if not isinstance(self.rows, slice):  # wrapping rows: add whole rows, each where it belongs
            band = value.new_zeros(*value.shape[:-1], target.shape[-1])
            View(slice(0, value.shape[-2]), self.cols).add_into(band, value)
            target.index_add_(-2, self.rows, band.to(target.dtype))
            return
        region = target[..., self.rows, :]
        if isinstance(self.cols, slice):
            region[..., self.cols] += value
        else:
            region.index_add_(-1, self.cols, value)


def full_view(height: int, width: int) -> View:
    """The single view of a canvas no larger than the model's window."""
    return View(slice(0, height), slice(0, width))


def starts(size: int, window: int, stride: int, circular: bool = False) -> list[int]:
    """Window starts along one axis: every `stride`, the last shifted back to end at the edge.

    Circular axes wrap instead: windows start every `stride` around the whole circle.
    """
    if size <= window:
        return [0]
    if circular:
        count = -(-size // stride)  # ceil: windows every stride all the way round
        return [i * stride for i in range(count)]
    out = list(range(0, size - window + 1, stride))
    if out[-1] + window < size:
        out.append(size - window)  # full coverage: the reference truncates, diffusers leaves zeros
    return out


def tent(window: int) -> torch.Tensor:
    """Triangular ramp 1, 2, ..., peak, ..., 2, 1: never zero, so every pixel keeps a weight."""
    import torch

    i = torch.arange(window, dtype=torch.float64)
    return torch.minimum(i + 1, window - i)


def wrap_axes(circular: bool | str | None) -> tuple[bool, bool]:
    """Whether (rows, columns) wrap around: `circular` is x (left and right join: a 360-degree
    panorama), y (top and bottom), both (a seamless texture), True (x, as it always meant) or
    False/None/none."""
    if circular in (None, False, "none"):
        return False, False
    if circular is True or circular == "x":
        return False, True
    if circular in ("y", "both"):
        return True, circular == "both"
    raise SmdError(f"circular must be x, y, both or false, got {circular!r}")


def vae_tiles_setting(value: int | str | bool | None) -> int | str | None:
    """A `vae_tiles` setting (docs/large-pictures.md) as the engine takes it: a tile in pixels, "off"
    (one pass; YAML reads a bare `off` as false) or None (smd chooses: also `auto`). Digits in a
    string are a size (the command line's)."""
    if value is None or value == "auto":
        return None
    if value is False or value == "off":
        return "off"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not (
            defaults.VAE_TILES_MIN <= value <= defaults.MAX_SIZE and value % defaults.VAE_TILES_MULTIPLE == 0):
        raise SmdError(f"vae_tiles must be a tile size in pixels (a multiple of {defaults.VAE_TILES_MULTIPLE} from "
                       f"{defaults.VAE_TILES_MIN} to {defaults.MAX_SIZE}, e.g. 512), off or auto, got {value!r}")
    return value


def layout(height: int, width: int, window: tuple[int, int], stride: tuple[int, int], *,
           weighting: str = defaults.TILE_WEIGHTING, circular: bool | str | None = False,
           device: torch.device | str = "cpu") -> list[View]:
    """Views covering a [height, width] latent, with weights normalised to a partition of unity;
    on the axes `circular` names (`wrap_axes`) they wrap around."""
    import torch

    wh, ww = min(window[0], height), min(window[1], width)
    wrap_rows, wrap_cols = wrap_axes(circular)
    wrap_rows, wrap_cols = wrap_rows and height > window[0], wrap_cols and width > window[1]  # one window: no seam
    row_starts = starts(height, wh, stride[0], wrap_rows)
    col_starts = starts(width, ww, stride[1], wrap_cols)
    if len(row_starts) == 1 and len(col_starts) == 1:
        return [full_view(height, width)]
    if weighting not in defaults.TILE_WEIGHTINGS:
        raise ValueError(f"tile_weighting must be one of {', '.join(defaults.TILE_WEIGHTINGS)}, got {weighting!r}")
    raw = (tent(wh)[:, None] * tent(ww)[None, :]) if weighting == "triangular" else \
        torch.ones(wh, ww, dtype=torch.float64)

    views = []
    for r in row_starts:
        for c in col_starts:
            rows: Index = slice(r, r + wh)
            if r + wh > height:
                rows = torch.arange(r, r + wh, device=device) % height
            cols: Index = slice(c, c + ww)
            if c + ww > width:
                cols = torch.arange(c, c + ww, device=device) % width
            views.append(View(rows, cols))
    total = torch.zeros(1, 1, height, width, dtype=torch.float64, device=device)
    for v in views:
        v.add_into(total, raw.to(device)[None, None])
    for v in views:
        v.weight = (raw.to(device)[None, None] / v.crop(total)).float()
    return views


def default_tile(native: int, height: int, width: int, multiple: int = 1) -> int:
    """The view a canvas gets unless the scene sets `tile_size`, in pixels (docs/method.md §5): one view where
    the canvas fits within 1.5 times the model's native size; else views as tall (or wide) as the
    canvas's shorter side, kept between the native size and 1.5 times it, so that a strip is
    covered by one row of views and a square by few large ones (benchmarks/views.py measured the
    choice). A multiple of `multiple` (the latent grid a denoiser input must fit)."""
    large = native * 3 // 2
    tile = max(height, width) if max(height, width) <= large else min(max(min(height, width), native), large)
    return max(multiple, tile - tile % multiple)


def view_sizes(tile_size: int, tile_stride: int | None, factor: int) -> tuple[int, int]:
    """Window and stride in latent pixels from pixel sizes; the stride defaults to 3/4 of the tile
    (`defaults.tile_stride`)."""
    window = max(tile_size // factor, 1)
    stride = max((tile_stride or defaults.tile_stride(tile_size)) // factor, 1)
    return window, stride


# ---------------------------------------------------------------------------------------------
# The one rule for a canvas on a model: planning, the pipeline, the stream and the memory estimate
# all ask it, and none needs torch to.


class CanvasError(SmdError):
    """A canvas, or its tiling, that a model cannot take; `key` is the scene key that sets it."""

    def __init__(self, message: str, key: str = "width"):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Grid:
    """What a model asks of a canvas: `factor` pixels a latent pixel (the VAE's downscale), a
    denoiser input of whole `granularity` latent pixels (on a `patched` family, SD3's patches and
    FLUX.1's 2x2 packing, its canvases too; a UNet pads, so only its views are), and `native`, the
    size in pixels that default views are chosen from. A family makes one from a model's configs
    (`smd_cli.families`); `family` and `label` name it in errors."""

    family: str
    factor: int
    granularity: int
    native: int
    patched: bool = False
    label: str = ""

    @property
    def multiple(self) -> int:
        """Pixels each side of a canvas must be a multiple of."""
        return self.factor * (self.granularity if self.patched else 1)

    def tile(self, height: int, width: int) -> int:
        """The default view of a canvas, in pixels (`default_tile`)."""
        return default_tile(self.native, height, width, self.factor * self.granularity)


@dataclass(frozen=True)
class Tiling:
    """A canvas's views: the tile in pixels, the window and stride in latent pixels (what `layout`
    takes), how many views lie down (`rows`) and across (`cols`) the canvas, and the latent size of
    one view (`view`: the window, or the canvas's side where that is smaller)."""

    tile: int
    window: int
    stride: int
    rows: int
    cols: int
    view: tuple[int, int]

    @property
    def count(self) -> int:
        """Views per layer and step."""
        return self.rows * self.cols


def tiling(grid: Grid, width: int, height: int, *, tile_size: int | None = None, tile_stride: int | None = None,
           circular: bool | str | None = False) -> Tiling:
    """A canvas and its views on a model of `grid`: the canvas must be a multiple of `grid.multiple`
    on each side (else `CanvasError` naming the nearest sizes that are); the tile is `tile_size`, else
    the grid's default; the stride `tile_stride`, else 3/4 of the tile, and no larger than the tile.
    The views counted are those `layout` makes."""
    for side, key in ((width, "width"), (height, "height")):
        if not defaults.MIN_SIZE <= side <= defaults.MAX_SIZE:
            raise CanvasError(f"each side of a canvas must be {defaults.MIN_SIZE} to {defaults.MAX_SIZE} pixels, got "
                              f"{width}x{height}", key)
    m = grid.multiple
    if width % m or height % m:
        sizes = " or ".join(f"{w}x{h}" for w, h in dict.fromkeys(zip(_nearest(width, m), _nearest(height, m))))
        if grid.patched:
            name = grid.label
            message = (f"{'an' if name.startswith('SD') else 'a'} {name} canvas is a multiple of {m} pixels on each "
                       f"side, got {width}x{height}; use {sizes}")
        else:
            message = (f"canvas {width}x{height} is not divisible by the model's downscale factor {m}; use multiples "
                       f"of {m}, such as {sizes}")
        raise CanvasError(message, "width" if width % m else "height")
    tile = tile_size or grid.tile(height, width)
    if tile_stride is not None and tile_stride > tile:
        raise CanvasError(f"tile_stride {tile_stride} is larger than the tile ({tile} pixels"
                          + ("" if tile_size else ", the model's default") + "): views would leave gaps", "tile_stride")
    window, stride = view_sizes(tile, tile_stride, grid.factor)
    rows, cols = height // grid.factor, width // grid.factor
    view = (min(window, rows), min(window, cols))
    wrap_rows, wrap_cols = wrap_axes(circular)
    return Tiling(tile, window, stride, len(starts(rows, view[0], stride, wrap_rows and rows > window)),
                  len(starts(cols, view[1], stride, wrap_cols and cols > window)), view)


def _nearest(side: int, multiple: int) -> tuple[int, int]:
    """The multiples of `multiple` just below and just above `side` (the same twice where it is one)."""
    if side % multiple == 0:
        return side, side
    below = side - side % multiple
    return max(below, multiple), max(min(below + multiple, defaults.MAX_SIZE // multiple * multiple), multiple)


def work_problem(views: int, layers: int, steps: int, *, allow_large: bool, allow: str,
                 per: str = "image") -> str | None:
    """Why `views` per layer and step, over `layers` layers and `steps` steps, are too many denoiser
    passes to start (None where they are not): past `defaults.LARGE_WORK` unless `allow_large` (the
    message says to give `allow`), past `defaults.MAX_WORK` or `defaults.MAX_VIEWS` at all."""
    passes = views * layers * steps
    count = (f"{views:,} view{'s' * (views != 1)} x {layers:,} layer{'s' * (layers != 1)} x {steps:,} "
             f"step{'s' * (steps != 1)} = {passes:,} denoiser passes per {per}")
    fix = "raise tile_stride or tile_size (fewer views), or use fewer layers or steps"
    if views > defaults.MAX_VIEWS:
        return (f"{views:,} views per layer and step, more than the {defaults.MAX_VIEWS:,} smd lays out even with "
                f"{allow}; raise tile_stride or tile_size")
    if passes > defaults.MAX_WORK:
        return f"{count}, more than the {defaults.MAX_WORK:,} smd runs even with {allow}; {fix}"
    if passes > defaults.LARGE_WORK and not allow_large:
        return (f"{count}, more than {defaults.LARGE_WORK:,}: hours of work; {fix}, or give {allow} to run it "
                "anyway")
    return None
