"""Views (SPEC section 5): overlapping windows that cover a canvas larger than the model's window.

Each view carries a weight map; the weights of all views sum to exactly 1 at every latent pixel,
so the aggregation of SPEC 3 averages the views' clean estimates without seams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from smd_cli import defaults

Index = Union[slice, torch.Tensor]


@dataclass
class View:
    """A window of the latent and its weight omega_v, broadcastable to [1, 1, h, w].

    `cols` is a slice, or an index tensor for windows that wrap around a circular canvas.
    """

    rows: slice
    cols: Index
    weight: Optional[torch.Tensor] = None  # None means 1 everywhere

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """t[..., rows, cols]."""
        t = t[..., self.rows, :]
        return t[..., self.cols] if isinstance(self.cols, slice) else t.index_select(-1, self.cols)

    @property
    def corner(self) -> tuple[int, int]:
        """(top, left): where the window starts on the canvas (a wrapping window, at its first column)."""
        left = self.cols.start if isinstance(self.cols, slice) else int(self.cols[0])
        return self.rows.start, left

    def sub(self, r0: int, r1: int, c0: int, c1: int) -> "View":
        """The part [r0:r1, c0:c1] of this view (coordinates within the view), with its weights."""
        rows = slice(self.rows.start + r0, self.rows.start + r1)
        cols = slice(self.cols.start + c0, self.cols.start + c1) if isinstance(self.cols, slice) else self.cols[c0:c1]
        weight = None if self.weight is None else self.weight[..., r0:r1, c0:c1]
        return View(rows, cols, weight)

    def add_into(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """target[..., rows, cols] += value, in place."""
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
    i = torch.arange(window, dtype=torch.float64)
    return torch.minimum(i + 1, window - i)


def layout(height: int, width: int, window: tuple[int, int], stride: tuple[int, int], *,
           weighting: str = defaults.TILE_WEIGHTING, circular: bool = False,
           device: torch.device | str = "cpu") -> list[View]:
    """Views covering a [height, width] latent, with weights normalised to a partition of unity."""
    wh, ww = min(window[0], height), min(window[1], width)
    if circular and width <= window[1]:
        circular = False  # a canvas within one window has no seam to wrap
    row_starts = starts(height, wh, stride[0])
    col_starts = starts(width, ww, stride[1], circular)
    if len(row_starts) == 1 and len(col_starts) == 1:
        return [full_view(height, width)]
    if weighting not in defaults.TILE_WEIGHTINGS:
        raise ValueError(f"tile_weighting must be one of {', '.join(defaults.TILE_WEIGHTINGS)}, got {weighting!r}")
    raw = (tent(wh)[:, None] * tent(ww)[None, :]) if weighting == "triangular" else \
        torch.ones(wh, ww, dtype=torch.float64)

    views = []
    for r in row_starts:
        for c in col_starts:
            cols: Index = slice(c, c + ww)
            if circular and c + ww > width:
                cols = torch.arange(c, c + ww, device=device) % width
            views.append(View(slice(r, r + wh), cols))
    total = torch.zeros(1, 1, height, width, dtype=torch.float64, device=device)
    for v in views:
        v.add_into(total, raw.to(device)[None, None])
    for v in views:
        v.weight = (raw.to(device)[None, None] / v.crop(total)).float()
    return views


def default_tile(native: int, height: int, width: int, multiple: int = 1) -> int:
    """The view a canvas gets unless the scene sets `tile_size`, in pixels (SPEC 5): one view where
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
