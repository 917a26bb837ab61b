"""Exact tiled VAE decoding and encoding (docs/large-pictures.md): the same pixels as one pass, up
to float rounding, with only a tile's activations on the device.

A VAE's decoder is convolutions, GroupNorms and one attention block. A convolution is local: a
tile cut with a halo as wide as the convolutions after it see gives, inside the tile, exactly the
pixels a one-pass run gives. A GroupNorm is not local: its mean and variance are over the whole
picture, so a tile normalised with its own (diffusers' `enable_tiling`) shifts in tone.

So the layers run as stages, each from one GroupNorm to the next (`Stage`): a stage runs tile by
tile, each tile cut from the stage's input with the halo of that stage's few convolutions, and
writes the pixels the tile owns into the stage's output, adding up per-group sums and sums of
squares over them (float64) for the GroupNorm that starts the next stage. When every tile is done,
those sums give the next norm the whole picture's mean and variance. Every layer is computed once
(plus the small halos), and only one tile's activations are on the device at a time. A stage's
output (the picture at that layer's width) is kept off the device: in host memory beside a GPU, as
AUTOMATIC1111's Tiled VAE keeps it; beside a CPU, whose memory is what the tiles save, in files in a
temporary folder (`Files`), read back a window at a time.

The attention block (in the mid-block, at the latent's resolution) is global over the picture: it
runs, with the layers around it, on the whole latent in one pass, which is exact, and no positions x
positions matrix is ever whole (`attend`). Its cost grows with the square of the pixels, in one pass
as in tiles: past a few megapixels it is most of a decode's time. A family runs these through the `run` of its
`decode` and `encode_image`.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

from smd_cli.core.errors import SmdError

HOST_SHARE = 0.5  # beside a GPU, a stage's output stays in host memory while it takes at most this share of free RAM


def supported(vae) -> bool:
    """Whether `tiled_decode` and `tiled_encode` know this autoencoder's layout: AutoencoderKL
    with GroupNorms and plain up/down blocks (SD 1.x, SDXL, SD3, FLUX.1) or AutoencoderTiny."""
    from diffusers import AutoencoderKL, AutoencoderTiny
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    if isinstance(vae, AutoencoderTiny):
        return True
    if not isinstance(vae, AutoencoderKL):
        return False
    blocks = [*vae.decoder.up_blocks, *vae.encoder.down_blocks]
    for block in blocks:
        for resnet in block.resnets:
            if not (isinstance(resnet, ResnetBlock2D) and resnet.upsample is None and resnet.downsample is None
                    and resnet.time_emb_proj is None and isinstance(resnet.norm1, torch.nn.GroupNorm)
                    and isinstance(resnet.norm2, torch.nn.GroupNorm)):
                return False
        for sampler in [*(getattr(block, "upsamplers", None) or []), *(getattr(block, "downsamplers", None) or [])]:
            if not isinstance(sampler, (Upsample2D, Downsample2D)) or getattr(sampler, "norm", None) is not None:
                return False
    return (isinstance(vae.decoder.conv_norm_out, torch.nn.GroupNorm)
            and not any(isinstance(m, Attention) for block in blocks for m in block.modules()))


def geometry(modules: Sequence) -> tuple[float, Fraction]:
    """How far (in the input's pixels) an output pixel of `modules`, run in order, sees, and how
    many output pixels an input pixel becomes: each convolution adds its kernel's radius at its
    resolution (one more where it strides), an upsampling halves the pixel. Modules are read in
    the order they are registered, which in diffusers' VAE blocks is the order they run."""
    from diffusers.models.upsampling import Upsample2D

    pixel, seen = Fraction(1), Fraction(0)
    for module in modules:
        for m in module.modules():
            if isinstance(m, Upsample2D):
                pixel /= 2
            elif isinstance(m, torch.nn.Upsample):
                pixel /= Fraction(m.scale_factor)
            elif isinstance(m, torch.nn.Conv2d):
                stride = m.stride[0]
                seen += (m.kernel_size[0] // 2 * m.dilation[0] + (stride > 1)) * pixel
                pixel *= stride
    return float(seen), 1 / pixel


@dataclass
class Add:
    """A resnet's residual: the resnet's input (stage `source`'s input, through its shortcut) added."""

    resnet: torch.nn.Module
    source: int


@dataclass
class Stage:
    """Layers that run tile by tile: `norm` (with the whole picture's statistics) first, then `ops`
    (local modules and `Add`s), up to the next GroupNorm."""

    norm: torch.nn.GroupNorm | None = None
    ops: list = field(default_factory=list)

    def modules(self) -> list:
        return [op for op in self.ops if isinstance(op, torch.nn.Module)]

    def run(self, x, stats, residual):
        if self.norm is not None:
            x = normalize(self.norm, x, *stats[self.norm])
        for op in self.ops:
            if isinstance(op, Add):
                skip = residual(op.source)
                if op.resnet.conv_shortcut is not None:
                    skip = op.resnet.conv_shortcut(skip)
                x = (skip + x) / op.resnet.output_scale_factor
            else:
                x = op(x)
        return x


def stages(parts: Sequence, cuts: bool = False) -> list[Stage]:
    """The stages of `parts` (modules in the order they run): a ResnetBlock2D splits at its two
    norms, a GroupNorm starts a stage, anything else is a local module; with `cuts`, a stage
    also ends after each module with a convolution (for the tiny autoencoders, which have no
    norms: so that no halo spans the whole network)."""
    from diffusers.models.resnet import ResnetBlock2D

    out = [Stage()]

    def start(norm):
        if out[-1].ops or out[-1].norm is not None:
            out.append(Stage())
        out[-1].norm = norm
        return len(out) - 1

    for part in parts:
        if isinstance(part, ResnetBlock2D):
            source = start(part.norm1)
            out[-1].ops += [part.nonlinearity, part.conv1]
            start(part.norm2)
            out[-1].ops += [part.nonlinearity, part.dropout, part.conv2, Add(part, source)]
        elif isinstance(part, torch.nn.GroupNorm):
            start(part)
        else:
            out[-1].ops.append(part)
            if cuts and any(isinstance(m, torch.nn.Conv2d) for m in part.modules()):
                out.append(Stage())
    return out if out[-1].ops or out[-1].norm is not None else out[:-1]  # no empty stage after a last cut


def normalize(norm: torch.nn.GroupNorm, x, mean, rstd):
    """`norm(x)` with the given per-group mean and reciprocal deviation ([B, G], float32)."""
    batch, groups = x.shape[0], norm.num_groups
    y = (x.reshape(batch, groups, -1).float() - mean[..., None]) * rstd[..., None]
    y = y.reshape(x.shape).to(x.dtype)
    if norm.affine:
        y = y * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    return y


class Sums:
    """Per-group sums and sums of squares (float64) over the pixels the tiles own, for `norm`."""

    def __init__(self, norm: torch.nn.GroupNorm):
        self.norm, self.count, self.total, self.squares = norm, 0, 0.0, 0.0

    def add(self, x) -> None:
        own = x.reshape(x.shape[0], self.norm.num_groups, -1).double()
        self.count += own.shape[-1]
        self.total = self.total + own.sum(-1)
        self.squares = self.squares + own.square().sum(-1)

    def stats(self):
        """Mean and reciprocal deviation: the variance as E[x^2] - E[x]^2, in float64."""
        mean = self.total / self.count
        var = (self.squares / self.count - mean * mean).clamp_min(0)
        return mean.float(), (var + self.norm.eps).rsqrt().float()


class Whole:
    """A stage's values in one tensor: the input and the output on the device, or beside a GPU a
    stage's output in host memory."""

    def __init__(self, tensor):
        self.tensor = tensor

    def read(self, rows: slice, cols: slice, device):
        return self.tensor[..., rows, cols].to(device)

    def write(self, rows: slice, cols: slice, value) -> None:
        self.tensor[..., rows, cols] = value

    def close(self) -> None:
        self.tensor = None


_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
          torch.bfloat16: np.int16}  # bfloat16 goes through files as its bits


class Files:
    """A stage's values in a folder, a file for each tile of `grid` (which the stage writes), read
    back a window at a time."""

    def __init__(self, folder: str, shape: Sequence[int], dtype, grid: "Grid"):
        self.folder, self.shape, self.dtype, self.grid = folder, tuple(shape), dtype, grid
        os.makedirs(folder)

    def path(self, row: int, col: int) -> str:
        return os.path.join(self.folder, f"{row}-{col}")

    def write(self, rows: slice, cols: slice, value) -> None:
        value = value.detach().to("cpu").contiguous()
        if value.dtype == torch.bfloat16:
            value = value.view(torch.int16)
        value.numpy().tofile(self.path(rows.start, cols.start))

    def read(self, rows: slice, cols: slice, device):
        out = torch.empty(*self.shape[:2], rows.stop - rows.start, cols.stop - cols.start, dtype=self.dtype)
        step = self.grid.step
        for r0 in range(rows.start // step * step, rows.stop, step):
            r1 = min(r0 + step, self.grid.height)
            for c0 in range(cols.start // step * step, cols.stop, step):
                c1 = min(c0 + step, self.grid.width)
                tile = np.memmap(self.path(r0, c0), dtype=_NUMPY[self.dtype], mode="r",
                                 shape=(*self.shape[:2], r1 - r0, c1 - c0))
                a0, a1, b0, b1 = max(r0, rows.start), min(r1, rows.stop), max(c0, cols.start), min(c1, cols.stop)
                part = torch.from_numpy(np.array(tile[..., a0 - r0:a1 - r0, b0 - c0:b1 - c0]))
                out[..., a0 - rows.start:a1 - rows.start, b0 - cols.start:b1 - cols.start] = part.view(self.dtype)
                del tile
        return out.to(device)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _keeper(keep: str, device, folder: str):
    """Makes the store of each stage's output: in `Files` beside a CPU (or with keep="files"), in
    host memory beside a GPU (or with keep="memory") while it fits in `HOST_SHARE` of the free RAM."""
    names = itertools.count()

    def make(shape, dtype, grid):
        where = keep
        if where == "auto":
            where = "files"
            if device.type != "cpu":
                import psutil

                size = math.prod(shape) * torch.finfo(dtype).bits // 8
                where = "memory" if size <= HOST_SHARE * psutil.virtual_memory().available else "files"
        if where == "memory":
            return Whole(torch.empty(shape, dtype=dtype))
        return Files(os.path.join(folder, str(next(names))), shape, dtype, grid)

    return make


@dataclass
class Grid:
    """The tiles at one resolution: `step` pixels a side over a `height` x `width` map."""

    height: int
    width: int
    step: int

    def boxes(self):
        for r0 in range(0, self.height, self.step):
            for c0 in range(0, self.width, self.step):
                yield r0, min(r0 + self.step, self.height), c0, min(c0 + self.step, self.width)

    def scaled(self, by: Fraction) -> "Grid":
        sizes = [self.height * by, self.width * by, self.step * by]
        if any(v.denominator != 1 for v in sizes):
            raise ValueError(f"a {self.height} x {self.width} map does not tile by {self.step} through these layers")
        return Grid(*map(int, sizes))


def run_stages(program: list[Stage], x, *, step: int, keep: str = "auto"):
    """`program` run over x ([B, C, H, W], on the device) in tiles of `step` of x's pixels a side
    (a multiple of every downscaling in it): each stage over every tile, its output kept as
    `keep` says ("auto", "memory", "files"); the last stage's output comes back on the device."""
    device, grid = x.device, Grid(*x.shape[-2:], step)
    stats = {}
    if program and program[0].norm is not None:
        whole = Sums(program[0].norm)
        for r0 in range(0, grid.height, grid.step):  # a band at a time: no float64 copy of x is whole
            whole.add(x[..., r0:r0 + grid.step, :])
        stats[whole.norm] = whole.stats()
    last_read = {}  # store (the input of stage k) -> the last stage that reads it
    for k, stage in enumerate(program):
        last_read[k] = k
        last_read.update((op.source, k) for op in stage.ops if isinstance(op, Add))
    folder = tempfile.mkdtemp(prefix="smd-vae-tiles-")
    stores = {0: Whole(x)}
    try:
        make = _keeper(keep, device, folder)
        for k, stage in enumerate(program):
            last = k == len(program) - 1
            seen, change = geometry(stage.modules())
            down = change.denominator
            halo = math.ceil((math.ceil(seen) + 1) / down) * down  # its reach and a pixel, whole strides
            out_grid = grid.scaled(change)
            sums = None if last or program[k + 1].norm is None else Sums(program[k + 1].norm)
            out = None
            for r0, r1, c0, c1 in grid.boxes():
                rows = slice(max(r0 - halo, 0), min(r1 + halo, grid.height))
                cols = slice(max(c0 - halo, 0), min(c1 + halo, grid.width))
                y = stage.run(stores[k].read(rows, cols, device), stats,
                              lambda j, rows=rows, cols=cols: stores[j].read(rows, cols, device))
                top, left = int((r0 - rows.start) * change), int((c0 - cols.start) * change)
                owned = (slice(int(r0 * change), int(r1 * change)), slice(int(c0 * change), int(c1 * change)))
                y = y[..., top:top + owned[0].stop - owned[0].start, left:left + owned[1].stop - owned[1].start]
                if out is None:
                    shape = (*y.shape[:2], out_grid.height, out_grid.width)
                    out = Whole(y.new_empty(shape)) if last else make(shape, y.dtype, out_grid)
                out.write(*owned, y)
                if sums is not None:
                    sums.add(y)
                del y
            if sums is not None:
                stats[sums.norm] = sums.stats()
            stores[k + 1] = out
            for j in [j for j in stores if j <= k and last_read[j] <= k]:
                stores.pop(j).close()
            grid = out_grid
        return stores.pop(len(program)).tensor
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise SmdError(f"the tiled VAE ran out of disk space in {os.path.dirname(folder)}, where it keeps each "
                       f"layer's picture between tiles: set TMPDIR to a folder with more room") from None
    finally:
        for store in stores.values():
            store.close()
        shutil.rmtree(folder, ignore_errors=True)


ATTENTION_ELEMENTS = 1 << 22  # queries x keys of one chunk of the mid-block's attention (16 MiB in float32)


def attend(attn, x, chunked: bool | None = None):
    """What diffusers' VAE attention block (`Attention` over a [B, C, H, W] map: group norm, one
    projection each for queries, keys and values, residual) computes; `chunked`, its queries in
    chunks of `ATTENTION_ELEMENTS` scores (default: on any device but a CPU)."""
    batch, channels, height, width = x.shape
    h = attn.group_norm(x).reshape(batch, channels, height * width).transpose(1, 2)
    heads = attn.heads
    q, k, v = (proj(h).reshape(batch, -1, heads, channels // heads).transpose(1, 2)
               for proj in (attn.to_q, attn.to_k, attn.to_v))
    out = torch.empty_like(q)
    # A CPU's fused attention never holds the whole matrix, at any head width; elsewhere (a GPU's
    # kernels take SD's 512-channel head only in the plain, whole-matrix way) the queries go in chunks.
    if chunked is None:
        chunked = x.device.type != "cpu"
    step = max(1, ATTENTION_ELEMENTS // k.shape[2]) if chunked else q.shape[2]
    for start in range(0, q.shape[2], step):
        out[:, :, start:start + step] = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:start + step], k, v)
    out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, channels)))
    out = out.transpose(1, 2).reshape(batch, channels, height, width)
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor


class ChunkedAttention:
    """The attention blocks in `modules` computed by `attend` while this context lasts."""

    def __init__(self, modules: Sequence):
        from diffusers.models.attention_processor import Attention

        self.blocks = [m for module in modules for m in module.modules() if isinstance(m, Attention)]

    def __enter__(self) -> "ChunkedAttention":
        for attn in self.blocks:
            attn.forward = lambda x, *args, attn=attn, **kwargs: attend(attn, x)
        return self

    def __exit__(self, *exc) -> None:
        for attn in self.blocks:
            del attn.forward


def _factor(vae) -> int:
    blocks = vae.config.get("block_out_channels") or vae.config.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


def _blocks(blocks, samplers: str) -> list:
    """The parts of diffusers' up or down blocks in the order they run: resnets, then resamplers."""
    return [part for block in blocks for part in (*block.resnets, *(getattr(block, samplers, None) or []))]


def tiled_decode(vae, latents, tile: int, keep: str = "auto"):
    """What `vae.decode(latents)` gives (pixels in [-1, 1]), in tiles of `tile` pixels a side,
    the stages' outputs kept as `keep` says (`run_stages`)."""
    from diffusers import AutoencoderTiny

    step = max(tile // _factor(vae), 1)
    if latents.shape[-2] <= step and latents.shape[-1] <= step:
        return vae.decode(latents).sample  # one tile: the one pass itself
    if isinstance(vae, AutoencoderTiny):
        dec = vae.decoder
        x = run_stages(stages(list(dec.layers), cuts=True), torch.tanh(latents / 3) * 3, step=step, keep=keep)
        return x.mul(2).sub(1)
    dec = vae.decoder
    # The latent's resolution, attention included, in one pass (exact; small beside the rest).
    h = vae.post_quant_conv(latents) if getattr(vae, "post_quant_conv", None) is not None else latents
    with ChunkedAttention([dec.mid_block]):
        h = dec.mid_block(dec.conv_in(h), None)
    program = stages([*_blocks(dec.up_blocks, "upsamplers"), dec.conv_norm_out, dec.conv_act, dec.conv_out])
    return run_stages(program, h, step=step, keep=keep)


def tiled_moments(vae, pixels, tile: int, keep: str = "auto"):
    """What `vae.encode(pixels)` computes before its distribution (AutoencoderKL's moments, mean
    and log-variance; AutoencoderTiny's latents), in tiles of `tile` pixels a side."""
    from diffusers import AutoencoderTiny

    factor = _factor(vae)
    step = max(tile // factor * factor, factor)
    if pixels.shape[-2] % factor or pixels.shape[-1] % factor or (
            pixels.shape[-2] <= step and pixels.shape[-1] <= step):
        # One tile, or a picture the grid does not divide: the one pass itself.
        return vae.encode(pixels).latents if isinstance(vae, AutoencoderTiny) else (
            vae.encode(pixels).latent_dist.parameters)
    if isinstance(vae, AutoencoderTiny):
        return run_stages(stages(list(vae.encoder.layers), cuts=True), pixels.add(1).div(2), step=step, keep=keep)
    enc = vae.encoder
    h = run_stages(stages([enc.conv_in, *_blocks(enc.down_blocks, "downsamplers")]), pixels, step=step, keep=keep)
    # The latent's resolution, attention included, in one pass.
    with ChunkedAttention([enc.mid_block]):
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))
    return vae.quant_conv(h) if getattr(vae, "quant_conv", None) is not None else h


def tiled_encode(vae, pixels, tile: int, keep: str = "auto"):
    """The latent `vae.encode(pixels)` gives: AutoencoderTiny's, or the mode (the mean) of
    AutoencoderKL's distribution, in tiles of `tile` pixels a side."""
    from diffusers import AutoencoderTiny

    moments = tiled_moments(vae, pixels, tile, keep)
    return moments if isinstance(vae, AutoencoderTiny) else moments.chunk(2, dim=1)[0]
