"""Masks: made from images, palettes and shapes, fitted to a canvas, and prepared for the step
loop (docs/method.md §2.2). Scenes are not known here: `smd_cli.scenes.canvas` reads a scene's masks with
these functions.

Everything here is numpy on the CPU: masks are prepared once per generation, and `smd validate`
must not import torch. Arrays are float32 in [0, 1], shaped [P, H, W] for P layers at canvas size.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from smd_cli.core.errors import SmdError, one_per_prompt

RATIO_TOLERANCE = 0.01
PALETTE_TOLERANCE = 32  # how far (RGB distance) a pixel may be from a palette colour that is there
BLUR_FLOOR = 1e-7


# ---------------------------------------------------------------------------------------------
# Masks from images, palettes and shapes; fitting to a canvas


def image_mask(image: Image.Image) -> np.ndarray:
    """The alpha channel where the image has a non-trivial one, otherwise luminance (docs/method.md §2.2), in
    [0, 1]: 16-bit grayscale by its 16-bit range, 32-bit integers by theirs, floats as they are."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha.astype(np.float32) / 255.0
    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode == "I":  # 32-bit integers; 16-bit PNGs arrive this way from some decoders
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.min() >= 0 and values.max() <= 65535 else float(2**31 - 1)
        return (values / top).clip(0.0, 1.0).astype(np.float32)
    if image.mode == "F":
        return np.nan_to_num(np.asarray(image, dtype=np.float32)).clip(0.0, 1.0)
    return np.asarray(image.convert("L")).astype(np.float32) / 255.0


def resize(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one [h, w] mask to the canvas."""
    if mask.shape == (height, width):
        return mask
    im = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(im.resize((width, height), Image.BILINEAR), dtype=np.float32).clip(0.0, 1.0)


def aspect_mismatch(size: tuple[int, int], width: int, height: int) -> bool:
    """True when an image of `size` (w, h) cannot be resized to the canvas without distortion."""
    w, h = size
    return abs(w / h - width / height) > RATIO_TOLERANCE * (width / height)


def fit_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """[P, h, w] masks resized to the canvas, refused when their aspect ratio differs from it."""
    if masks.shape[1:] == (height, width):
        return masks
    if aspect_mismatch((masks.shape[2], masks.shape[1]), width, height):
        raise SmdError(f"masks are {masks.shape[2]}x{masks.shape[1]} but the canvas is {width}x{height}: "
                       "the aspect ratios differ")
    return np.stack([resize(m, height, width) for m in masks])


def fit_picture(image: Image.Image, width: int, height: int, warn: bool = True) -> Image.Image:
    """A background picture as RGB at canvas size, with a warning (`warn`) when that changes its
    aspect ratio."""
    image = image.convert("RGB")
    if warn and aspect_mismatch(image.size, width, height):
        warnings.warn(f"background image is {image.size[0]}x{image.size[1]}; resized to the {width}x{height} "
                      "canvas, which changes its aspect ratio", stacklevel=3)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return image


def api_masks(masks: Any, count: int) -> np.ndarray:
    """Masks given to the Python API, as [P, H, W] floats in [0, 1]: a tensor or array [P, 1, H, W]
    or [P, H, W], or a list of tensors, arrays or PIL images, one per prompt."""
    if hasattr(masks, "ndim"):  # a torch tensor or a numpy array
        items = list(masks) if masks.ndim >= 3 else [masks]
    else:
        items = list(masks)
    arrays = []
    for item in items:
        if isinstance(item, Image.Image):
            arr = image_mask(item)
        else:
            if hasattr(item, "detach"):  # torch, imported only by whoever made the tensor
                item = item.detach().float().cpu().numpy()
            arr = np.asarray(item, np.float32).astype(np.float32)
            while arr.ndim > 2:
                arr = arr[0]
        arrays.append(arr)
    one_per_prompt("masks", arrays, count)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise SmdError(f"masks have different sizes: {sorted(shapes)}")
    out = np.stack(arrays)
    if not np.isfinite(out).all() or out.min() < 0 or out.max() > 1:
        raise SmdError("mask values must lie in [0, 1] (divide 0..255 images by 255)")
    return out


def is_fraction_box(values: tuple[float, ...]) -> bool:
    """Rect/ellipse numbers are fractions of the canvas when every one lies within [0, 1]."""
    return all(0.0 <= v <= 1.0 for v in values)


def _box(values: tuple[float, ...], width: int, height: int) -> tuple[float, float, float, float]:
    if is_fraction_box(values):
        return values[0] * width, values[1] * height, values[2] * width, values[3] * height
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _span(lo: float, hi: float, size: int) -> slice:
    """The pixels i whose centre i + 0.5 lies in [lo, hi), within [0, size)."""
    return slice(min(max(math.ceil(lo - 0.5), 0), size), min(max(math.ceil(hi - 0.5), 0), size))


@dataclass
class LayerMask:
    """One layer's mask at canvas size, kept as the box that holds all of it: a thousand small
    shapes cost their areas, not a thousand canvases."""

    rows: slice
    cols: slice
    values: np.ndarray  # float32 [rows, cols] in [0, 1]

    @staticmethod
    def of(mask: np.ndarray) -> "LayerMask":
        """The box of a full-size [H, W] mask: its non-zero part."""
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if len(rows) == 0:
            return LayerMask(slice(0, 0), slice(0, 0), np.zeros((0, 0), np.float32))
        r, c = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
        return LayerMask(r, c, np.ascontiguousarray(mask[r, c], dtype=np.float32))

    def within(self, rows: slice, cols: slice) -> np.ndarray:
        """The values in canvas rows and columns inside this box."""
        return self.values[rows.start - self.rows.start : rows.stop - self.rows.start,
                           cols.start - self.cols.start : cols.stop - self.cols.start]

    def dense(self, height: int, width: int) -> np.ndarray:
        out = np.zeros((height, width), np.float32)
        out[self.rows, self.cols] = self.values
        return out


def rect_box(rect: tuple[float, ...], height: int, width: int) -> LayerMask:
    """The pixels whose centre lies in [x0, x1) x [y0, y1)."""
    x0, y0, x1, y1 = _box(rect, width, height)
    rows, cols = _span(y0, y1, height), _span(x0, x1, width)
    return LayerMask(rows, cols, np.ones((rows.stop - rows.start, cols.stop - cols.start), np.float32))


def ellipse_box(ellipse: tuple[float, ...], height: int, width: int) -> LayerMask:
    """The pixels whose centre lies in the ellipse with centre (cx, cy) and radii (rx, ry)."""
    cx, cy, rx, ry = _box(ellipse, width, height)
    rows, cols = _span(cy - ry, cy + ry + 1, height), _span(cx - rx, cx + rx + 1, width)
    ys = (np.arange(rows.start, rows.stop) + 0.5 - cy) / ry
    xs = (np.arange(cols.start, cols.stop) + 0.5 - cx) / rx
    return LayerMask(rows, cols, ((ys[:, None] ** 2 + xs[None, :] ** 2) <= 1.0).astype(np.float32))


def rect_mask(rect: tuple[float, ...], height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies in [x0, x1) x [y0, y1), as a full [H, W] mask."""
    return rect_box(rect, height, width).dense(height, width)


def ellipse_mask(ellipse: tuple[float, ...], height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies in the ellipse, as a full [H, W] mask."""
    return ellipse_box(ellipse, height, width).dense(height, width)


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def palette_labels(image: Image.Image, colors: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's nearest listed colour among those present in the image (index into `colors`;
    -1 for transparent pixels), and which colours are present: a colour is present where some
    opaque pixel lies within `PALETTE_TOLERANCE` of it. Anti-aliased edges thus go to the colours
    actually painted, never to one that was listed but not used (a typo).

    A listed colour found exactly needs no distances; the rest are measured in chunks, so that a
    palette of thousands of colours costs its colours times the image's, in bounded memory."""
    rgba = np.asarray(image.convert("RGBA"))
    opaque = rgba[..., 3] >= 128
    packed = (rgba[..., 0].astype(np.int64) << 16) | (rgba[..., 1].astype(np.int64) << 8) | rgba[..., 2]
    values, inverse = np.unique(packed, return_inverse=True)  # distinct colours: few, even with edges
    inverse = inverse.reshape(packed.shape)
    painted = np.zeros(len(values), dtype=bool)
    painted[inverse[opaque]] = True
    listed = np.array([(r << 16) | (g << 8) | b for r, g, b in map(hex_to_rgb, colors)], dtype=np.int64)
    at = np.minimum(np.searchsorted(values, listed), len(values) - 1)
    exact = values[at] == listed  # listed colour i is values[at[i]]
    present = exact & painted[at]  # painted exactly
    missing = np.nonzero(~present)[0]
    if len(missing):  # or within the tolerance of a painted colour
        near = _nearest_colours(_rgb(listed[missing]), _rgb(values[painted]))
        present[missing] = near[1] <= PALETTE_TOLERANCE**2 if near is not None else False
    label = np.full(len(values), -1, dtype=np.int64)  # each distinct colour's nearest present one
    chosen = np.nonzero(present)[0]
    if len(chosen):
        mine = chosen[exact[chosen]]
        label[at[mine]] = mine  # a present colour is its own nearest
        rest = np.nonzero(painted & (label < 0))[0]  # transparent pixels stay -1 whatever their colour
        near = _nearest_colours(_rgb(values[rest]), _rgb(listed[chosen]))
        if near is not None:
            label[rest] = chosen[near[0]]
    labels = label[inverse]
    labels[~opaque] = -1
    return labels, present


def _rgb(packed: np.ndarray) -> np.ndarray:
    return np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], axis=-1).astype(np.int32)


def _nearest_colours(queries: np.ndarray, choices: np.ndarray,
                     chunk: int = 2**22) -> tuple[np.ndarray, np.ndarray] | None:
    """For each query colour, the index of its nearest choice (the first of equals) and the squared
    distance to it; None without queries or choices. Measured `chunk` distances at a time."""
    if len(queries) == 0 or len(choices) == 0:
        return None
    index = np.empty(len(queries), dtype=np.int64)
    distance = np.empty(len(queries), dtype=np.int32)  # at most 3 * 255**2
    rows = max(1, chunk // len(choices))
    for start in range(0, len(queries), rows):
        part = queries[start : start + rows]
        dist = (part[:, None, 0] - choices[None, :, 0]) ** 2  # channel by channel: a third of the memory traffic
        dist += (part[:, None, 1] - choices[None, :, 1]) ** 2
        dist += (part[:, None, 2] - choices[None, :, 2]) ** 2
        index[start : start + rows] = dist.argmin(axis=1)
        distance[start : start + rows] = dist[np.arange(len(dist)), index[start : start + rows]]
    return index, distance


def main_colors(image: Image.Image, n: int = 5) -> list[str]:
    """The most frequent opaque colours of an image, to suggest in error messages."""
    rgba = np.asarray(image.convert("RGBA"))
    rgb = rgba[rgba[..., 3] >= 128][:, :3]
    if rgb.size == 0:
        return []
    values, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    return ["#%02x%02x%02x" % tuple(values[i]) for i in np.argsort(-counts)[:n]]


def check_divisible(width: int, height: int, factor: int) -> None:
    """A canvas must be divisible by the model's VAE downscale factor; `SmdError` when it is not."""
    if width % factor or height % factor:
        raise SmdError(f"canvas {width}x{height} is not divisible by the model's downscale factor {factor}; "
                       f"use multiples of {factor}")


def background_mask(masks: np.ndarray) -> np.ndarray:
    """The area no layer covers: 1 - max over layers."""
    return (1.0 - masks.max(axis=0)).clip(0.0, 1.0) if len(masks) else np.ones((0, 0), np.float32)


# ---------------------------------------------------------------------------------------------
# Preparation for the step loop (docs/method.md §2.2)


def occlude(masks: np.ndarray, cover_alpha: float) -> np.ndarray:
    """Where a later layer is present, scale every earlier layer by `cover_alpha`, once.

    Soft masks scale smoothly: an earlier mask is multiplied by 1 - (1 - cover_alpha) * L, with L
    the largest later mask: exactly `cover_alpha` under a later layer and 1 where none is.
    """
    out = np.empty_like(masks)
    later = np.zeros(masks.shape[1:], dtype=masks.dtype)
    for p in range(len(masks) - 1, -1, -1):
        out[p] = masks[p] * (1.0 - (1.0 - cover_alpha) * later)
        later = np.maximum(later, masks[p])
    return out


def gaussian_taps(std: float) -> np.ndarray:
    """A normalised 1-D Gaussian kernel of 2*ceil(3*std)+1 taps."""
    radius = math.ceil(3 * std)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / std) ** 2)
    return taps / taps.sum()


def _blur_axis(mask: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Convolve along one axis with replicate padding, through the FFT (cost independent of std)."""
    radius = len(taps) // 2
    pad = [(0, 0)] * mask.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(mask.astype(np.float64), pad, mode="edge")
    n = padded.shape[axis] + len(taps) - 1
    shape = [1] * mask.ndim
    shape[axis] = -1
    full = np.fft.irfft(np.fft.rfft(padded, n, axis=axis) * np.fft.rfft(taps, n).reshape(shape), n, axis=axis)
    return np.take(full, np.arange(2 * radius, 2 * radius + mask.shape[axis]), axis=axis)


def blur(mask: np.ndarray, std: float) -> np.ndarray:
    """Separable Gaussian blur of one [H, W] mask with std in pixels; std 0 leaves it unchanged."""
    if std <= 0:
        return mask
    taps = gaussian_taps(std)
    out = _blur_axis(_blur_axis(mask, taps, 0), taps, 1)
    # The FFT leaves ~1e-16 where the kernel never reaches: those pixels are exactly outside the mask.
    out[out < BLUR_FLOOR] = 0.0
    return out.astype(np.float32).clip(0.0, 1.0)


def prepare(masks: np.ndarray, *, cover_alpha: float, stds: list[float], strengths: list[float],
            cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Occlusion, blur and strength (docs/method.md §2.2).

    Returns the blurred masks (kept for the final pixel blend) and M_p, the blurred masks times
    their strengths, which the per-step quantization compares with the noise levels. A `cache`
    dict remembers blurs across calls, so only masks that changed are blurred again.
    """
    def blurred_once(m: np.ndarray, std: float) -> np.ndarray:
        if cache is None or std <= 0:
            return blur(m, std)
        key = (hashlib.sha1(m.tobytes()).hexdigest(), m.shape, std)
        if key not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[key] = blur(m, std)
        return cache[key]

    blurred = np.stack([blurred_once(m, s) for m, s in zip(occlude(masks, cover_alpha), stds)]).astype(np.float32)
    strengths_ = np.asarray(strengths, dtype=np.float32).reshape(-1, 1, 1)
    return blurred, blurred * strengths_


def quantize(masks: np.ndarray, sigmas: list[float], mask_type: str) -> np.ndarray:
    """Per-step masks m_{p,k} [K, P, ...] from M [P, ...]; `sigmas` has K + 1 entries, the last 0."""
    steps = len(sigmas) - 1
    out = np.empty((steps,) + masks.shape, dtype=np.float32)
    for k in range(steps):
        hi, lo = sigmas[k], sigmas[k + 1]
        continuous = mask_type == "continuous" or (mask_type == "semi-continuous" and k == steps - 1)
        if continuous:
            out[k] = ((masks - lo) / (hi - lo)).clip(0.0, 1.0)
        else:
            out[k] = masks > hi
    return out


def downsample(masks: np.ndarray, factor: int) -> np.ndarray:
    """Nearest downsampling of [..., H, W] to the latent grid: the pixel at (f*i, f*j)."""
    return np.ascontiguousarray(masks[..., ::factor, ::factor])


def step_masks(masks: np.ndarray, factor: int, sigmas: list[float], mask_type: str) -> np.ndarray:
    """m_{p,k} at latent size. Quantizing is per pixel, so it commutes with nearest downsampling."""
    return quantize(downsample(masks, factor), sigmas, mask_type)
