"""Exact tiled VAE decoding and encoding (docs/large-pictures.md): the same pixels as one pass, up
to float rounding, in memory set by the tile instead of the picture.

A VAE's decoder is convolutions, GroupNorms and one attention block. A convolution is local: a
tile cut with a halo as wide as everything after it can see (`reach`) gives exactly the pixels a
one-pass run gives inside the tile. A GroupNorm is not local: its mean and variance are over the
whole picture, so a tile normalised with its own (diffusers' `enable_tiling`) shifts in tone. Here
every GroupNorm normalises each tile with the statistics of the whole picture, found by passes
over the tiles: a pass runs each tile up to the first GroupNorm whose statistics are not known yet,
adds up that norm's per-group sums and sums of squares over the pixels the tile owns, and stops
there; the totals give the norm's mean and variance; the next pass goes on to the next norm, and
the pass that meets no unknown norm writes the output. Nothing at full resolution is kept between
passes (keeping it would make memory grow with the picture again), so a tile is recomputed up to
each norm: a decode costs several one-pass decodes (benchmarks/vae_tiles.py measures it).

The attention block (in the mid-block, at the latent's resolution) is global over the picture: it
runs, as the layers around it do, on the whole latent in one pass, which is exact; at 1/64 of the
pixels it is small beside the full-resolution layers, and its queries go in chunks (`attend`), so
that no positions x positions matrix is ever whole. A family runs these through the `run` of its `decode`
and `encode_image`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


class _Stop(Exception):
    """A tile's pass stops at the GroupNorm whose statistics it was run for."""


def supported(vae) -> bool:
    """Whether `tiled_decode` and `tiled_encode` know this autoencoder's layout: AutoencoderKL
    with GroupNorms and plain up/down blocks (SD 1.x, SDXL, SD3, FLUX.1) or AutoencoderTiny."""
    from diffusers import AutoencoderKL, AutoencoderTiny
    from diffusers.models.attention_processor import Attention

    if isinstance(vae, AutoencoderTiny):
        return True
    if not isinstance(vae, AutoencoderKL):
        return False
    tiled = [*vae.decoder.up_blocks, *vae.encoder.down_blocks]
    return (isinstance(vae.decoder.conv_norm_out, torch.nn.GroupNorm)
            and not any(isinstance(m, Attention) for block in tiled for m in block.modules()))


def reach(modules: Sequence) -> float:
    """How far (in the input's pixels) an output pixel of `modules`, run in order, sees: each
    convolution adds its kernel's radius at its resolution (one more where it strides), an
    upsampling halves the pixel. Modules are read in the order they are registered, which in
    diffusers' VAE blocks is the order they run."""
    from diffusers.models.upsampling import Upsample2D

    pixel, seen = 1.0, 0.0
    for module in modules:
        for m in module.modules():
            if isinstance(m, Upsample2D):
                pixel /= 2
            elif isinstance(m, torch.nn.Upsample):
                pixel /= float(m.scale_factor)
            elif isinstance(m, torch.nn.Conv2d):
                stride = m.stride[0]
                seen += (m.kernel_size[0] // 2 * m.dilation[0] + (stride > 1)) * pixel
                pixel *= stride
    return seen


class SharedNorms:
    """Every GroupNorm in `modules` normalising with statistics over the whole picture (installed
    as the instances' `forward` while a tiled run lasts)."""

    def __init__(self, modules: Sequence):
        self.norms = [m for module in modules for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.stats: dict = {}  # norm -> (mean, rstd), each [B, G], float32
        self.sums: dict = {}  # norm -> (count, sum, sum of squares), float64, while a pass gathers them
        self.owned = (0, 0, 0, 0)  # the rows and columns the tile owns, in its input's pixels
        self.size = (1, 1)  # the tile's input size (halo included)

    def __enter__(self) -> "SharedNorms":
        for norm in self.norms:
            norm.forward = lambda x, norm=norm: self.forward(norm, x)
        return self

    def __exit__(self, *exc) -> None:
        for norm in self.norms:
            del norm.forward  # back to the class's own

    def tile(self, owned: tuple[int, int, int, int], size: tuple[int, int]) -> None:
        self.owned, self.size = owned, size

    def forward(self, norm, x):
        batch, channels = x.shape[:2]
        groups = norm.num_groups
        if norm not in self.stats:
            # Sum over the pixels this tile owns, at this norm's resolution, then stop the tile.
            sy, sx = x.shape[-2] / self.size[0], x.shape[-1] / self.size[1]
            r0, r1, c0, c1 = self.owned
            own = x[..., round(r0 * sy):round(r1 * sy), round(c0 * sx):round(c1 * sx)].float()
            own = own.reshape(batch, groups, -1)
            count, total, squares = self.sums.get(norm, (0, 0.0, 0.0))
            self.sums[norm] = (count + own.shape[-1], total + own.sum(-1, dtype=torch.float64),
                               squares + own.square().sum(-1, dtype=torch.float64))
            raise _Stop
        mean, rstd = self.stats[norm]
        y = (x.reshape(batch, groups, -1).float() - mean[..., None]) * rstd[..., None]
        y = y.reshape(x.shape).to(x.dtype)
        if norm.affine:
            y = y * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
        return y

    def settle(self) -> None:
        """The gathered sums become the statistics: the variance as E[x^2] - E[x]^2, in float64."""
        for norm, (count, total, squares) in self.sums.items():
            mean = total / count
            var = (squares / count - mean * mean).clamp_min(0)
            self.stats[norm] = (mean.float(), (var + norm.eps).rsqrt().float())
        self.sums.clear()


ATTENTION_ELEMENTS = 1 << 22  # queries x keys of one chunk of the mid-block's attention (16 MiB in float32)


def attend(attn, x):
    """What diffusers' VAE attention block (`Attention` over a [B, C, H, W] map: group norm, one
    projection each for queries, keys and values, residual) computes, its queries in chunks."""
    batch, channels, height, width = x.shape
    h = attn.group_norm(x).reshape(batch, channels, height * width).transpose(1, 2)
    heads = attn.heads
    q, k, v = (proj(h).reshape(batch, -1, heads, channels // heads).transpose(1, 2)
               for proj in (attn.to_q, attn.to_k, attn.to_v))
    out = torch.empty_like(q)
    step = max(1, ATTENTION_ELEMENTS // k.shape[2])
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


def boxes(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
    """The tiles of a [height, width] input: (top, bottom, left, right), `tile` a side, the last
    in each row and column what is left."""
    return [(r, min(r + tile, height), c, min(c + tile, width))
            for r in range(0, height, tile) for c in range(0, width, tile)]


def run_tiled(fn: Callable, modules: Sequence, x, *, tile: int, halo: int, up: int = 1, down: int = 1):
    """`fn(x)` computed tile by tile: `fn` maps an input of h x w pixels to one of h*up/down x
    w*up/down, its convolutions seeing at most `halo` input pixels away and its GroupNorms all
    inside `modules`; `tile` and `halo` are multiples of `down`."""
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x)  # one tile: the one pass itself
    norms = SharedNorms(modules)
    with norms:
        while True:
            out, stopped = None, False
            for r0, r1, c0, c1 in boxes(height, width, tile):
                a0, a1, b0, b1 = max(r0 - halo, 0), min(r1 + halo, height), max(c0 - halo, 0), min(c1 + halo, width)
                norms.tile((r0 - a0, r1 - a0, c0 - b0, c1 - b0), (a1 - a0, b1 - b0))
                try:
                    y = fn(x[..., a0:a1, b0:b1])
                except _Stop:
                    stopped = True
                    continue
                if out is None:
                    out = y.new_empty(*y.shape[:2], height * up // down, width * up // down)
                out[..., r0 * up // down:r1 * up // down, c0 * up // down:c1 * up // down] = y[
                    ..., (r0 - a0) * up // down:(r1 - a0) * up // down, (c0 - b0) * up // down:(c1 - b0) * up // down]
                del y
            if not stopped:
                return out
            norms.settle()


def _factor(vae) -> int:
    blocks = vae.config.get("block_out_channels") or vae.config.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


def tiled_decode(vae, latents, tile: int):
    """What `vae.decode(latents)` gives (pixels in [-1, 1]), in tiles of `tile` pixels a side."""
    from diffusers import AutoencoderTiny

    factor = _factor(vae)
    step = max(tile // factor, 1)
    if isinstance(vae, AutoencoderTiny):
        modules = [vae.decoder]
        return run_tiled(vae.decoder, modules, latents, tile=step, halo=math.ceil(reach(modules)) + 1, up=factor)
    dec = vae.decoder
    # The latent's resolution, attention included, in one pass (exact; small beside the rest).
    h = vae.post_quant_conv(latents) if getattr(vae, "post_quant_conv", None) is not None else latents
    with ChunkedAttention([dec.mid_block]):
        h = dec.mid_block(dec.conv_in(h), None)
    modules = [*dec.up_blocks, dec.conv_norm_out, dec.conv_out]

    def rest(x):
        for block in dec.up_blocks:
            x = block(x, None)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))

    return run_tiled(rest, modules, h, tile=step, halo=math.ceil(reach(modules)) + 1, up=factor)


def tiled_moments(vae, pixels, tile: int):
    """What `vae.encode(pixels)` computes before its distribution (AutoencoderKL's moments, mean
    and log-variance; AutoencoderTiny's latents), in tiles of `tile` pixels a side."""
    from diffusers import AutoencoderTiny

    factor = _factor(vae)
    step = max(tile // factor * factor, factor)
    if isinstance(vae, AutoencoderTiny):
        modules = [vae.encoder]
        return run_tiled(vae.encoder, modules, pixels, tile=step, halo=_aligned(reach(modules), factor),
                         down=factor)
    enc = vae.encoder
    modules = [enc.conv_in, *enc.down_blocks]

    def start(x):
        x = enc.conv_in(x)
        for block in enc.down_blocks:
            x = block(x)
        return x

    h = run_tiled(start, modules, pixels, tile=step, halo=_aligned(reach(modules), factor), down=factor)
    # The latent's resolution, attention included, in one pass.
    with ChunkedAttention([enc.mid_block]):
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))
    return vae.quant_conv(h) if getattr(vae, "quant_conv", None) is not None else h


def _aligned(pixels: float, factor: int) -> int:
    """A halo of at least `pixels` and one latent pixel more, in whole latent pixels."""
    return (math.ceil(pixels / factor) + 1) * factor


def tiled_encode(vae, pixels, tile: int):
    """The latent `vae.encode(pixels)` gives: AutoencoderTiny's, or the mode (the mean) of
    AutoencoderKL's distribution, in tiles of `tile` pixels a side."""
    from diffusers import AutoencoderTiny

    moments = tiled_moments(vae, pixels, tile)
    return moments if isinstance(vae, AutoencoderTiny) else moments.chunk(2, dim=1)[0]
