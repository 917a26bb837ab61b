"""Attention-mode regions (docs/method.md §10): every layer's prompt in one denoiser row, each
prompt's tokens seen only where its mask is.

In latent mode (the paper's) each layer has rows of its own and the clean estimates are averaged
under the masks. In attention mode the layers' token sequences are joined into one row, and an
additive bias on the attention logits keeps them to their regions: an image position q attends the
tokens of layer g with bias log w_g(q), w_g its mask at that step (soft masks give finite biases,
a zero weight minus infinity), so with hard masks a prompt is never read outside its region. The
UNet families (SD 1.x/2.x, SDXL) take the bias in their cross-attention at every resolution, the
masks average-pooled to it; the joint-attention transformers (SD3, FLUX.1) attend text and image
tokens together, so the bias also keeps a layer's text tokens to their own region and to their
own layer's tokens, while image tokens attend each other freely (restricting that would split the
picture into separate ones).

`Regions` is what a row carries; `RegionBias` builds a call's biases (per resolution or sequence
length, made once); the processors put them into diffusers' attention on the attention processor
interface, and leave every call without a bias to the processor they replaced.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

NEG = float("-inf")
CACHED = 64  # weights and biases a row keeps: a stream's stages x views x resolutions


@dataclass(eq=False)
class Regions:
    """The regions of one joined row: the token span of each layer's prompt in the row's sequence,
    the layers' masks m_{g,k} [K, G, h, w] at the canvas's latent size for every step, and the
    steps' timesteps (a row says its step by its timestep)."""

    spans: tuple[tuple[int, int], ...]
    masks: torch.Tensor
    timesteps: tuple[float, ...]
    cache: OrderedDict = field(default_factory=OrderedDict, repr=False)  # weights and biases

    def remembered(self, key: tuple, make):
        """`make()`, kept for the next call with the same key (a stream asks for the same steps and
        windows every frame); the least recently used go first past `CACHED` entries."""
        if key in self.cache:
            self.cache.move_to_end(key)
        else:
            self.cache[key] = make()
            while len(self.cache) > CACHED:
                self.cache.popitem(last=False)
        return self.cache[key]

    def __post_init__(self) -> None:
        # Each step's masks, or an earlier step's where they are the same (hard masks, no schedule):
        # those steps share their weights and biases.
        self.first = [0] * len(self.masks)
        for k in range(1, len(self.masks)):
            self.first[k] = self.first[k - 1] if torch.equal(self.masks[k], self.masks[k - 1]) else k

    def step(self, t: float) -> int:
        """The step of timestep `t`, or the first step whose masks it shares."""
        return self.first[min(range(len(self.timesteps)), key=lambda k: abs(self.timesteps[k] - t))]

    def weights(self, t: float, corner: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """The layers' masks [G, h, w] at the step of `t` over the window at `corner` of `size` (in
        latent pixels; a window past the canvas's right edge wraps around, as a circular view does)."""
        k = self.step(t)

        def crop():
            top, left = corner
            rows = torch.arange(top, top + size[0], device=self.masks.device) % self.masks.shape[-2]
            cols = torch.arange(left, left + size[1], device=self.masks.device) % self.masks.shape[-1]
            return self.masks[k][:, rows][:, :, cols].float()

        return self.remembered(("weights", k, corner, size), crop)


def log_weights(weights: torch.Tensor) -> torch.Tensor:
    """log w [G, n] (minus infinity where w is 0); a position no layer covers reads every prompt
    alike (its output is weighed by nothing there, and a softmax needs something to attend)."""
    logs = torch.log(weights.clamp_min(0))
    return torch.where((weights > 0).any(0, keepdim=True), logs, torch.zeros_like(logs))


@dataclass
class RegionBias:
    """The attention biases of one denoiser call, for rows `regions` (one per row) at timesteps `t`
    over windows at `corners` of latent size `size`, with `tokens` text tokens per row."""

    regions: Sequence[Regions]
    t: Sequence[float]
    corners: Sequence[tuple[int, int]]
    size: tuple[int, int]
    tokens: int
    dtype: torch.dtype
    device: torch.device
    _made: dict = field(default_factory=dict)

    def _rows(self, kind: tuple, make) -> torch.Tensor:
        """[B, 1, ...]: each row's bias of `kind`, made by `make(logs, owner)` from the row's layer
        log-weights pooled to the kind's grid and its tokens' layers, once per step and window."""
        grid = kind[1]
        rows = []
        for i, (r, t, c) in enumerate(zip(self.regions, self.t, self.corners)):
            def build(r=r, t=t, c=c, i=i):
                pooled = F.adaptive_avg_pool2d(r.weights(t, c, self.size)[None], grid)[0].flatten(1)
                return make(log_weights(pooled), self._text(i)).to(self.dtype)
            rows.append(r.remembered((*kind, r.step(t), c, self.size, self.tokens, self.dtype), build))
        return torch.stack(rows)[:, None]

    def _text(self, row: int) -> torch.Tensor:
        """Which layer each text token of a row belongs to (-1: padding) [tokens]."""
        owner = torch.full((self.tokens,), -1, dtype=torch.long, device=self.device)
        for g, (start, end) in enumerate(self.regions[row].spans):
            owner[start:end] = g
        return owner

    def cross(self, queries: int) -> torch.Tensor:
        """[B, 1, queries, tokens] for cross-attention from an image at the UNet resolution with
        `queries` positions (the window halved, rounded up, until it has that many)."""
        if queries not in self._made:
            h, w = self.size
            while h * w > queries:
                h, w = -(-h // 2), -(-w // 2)
            if h * w != queries:
                raise ValueError(f"no resolution of a {self.size} window has {queries} positions")
            tokens = self.tokens

            def make(logs, owner):
                bias = torch.full((queries, tokens), NEG, device=self.device)
                bias[:, owner >= 0] = logs[owner[owner >= 0]].T
                return bias

            self._made[queries] = self._rows(("cross", (h, w)), make)
        return self._made[queries]

    def groups(self, queries: int) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] | None:
        """Per row, the cross-attention split by which layers a position reads (hard masks leave
        most positions one or two): (positions, their tokens, their bias) for each set of layers,
        so that attention is computed only where it is not zero; None where that saves little."""
        key = ("groups", queries)
        if key not in self._made:
            bias = self.cross(queries)
            rows = []
            for i, r in enumerate(self.regions):
                rows.append(r.remembered(("groups", r.step(self.t[i]), self.corners[i], self.size, queries,
                                          self.tokens, self.dtype), lambda b=bias[i, 0], r=r: _split(b, r.spans)))
            self._made[key] = None if any(row is None for row in rows) else rows
        return self._made[key]

    def joint(self, grid: tuple[int, int], text_first: bool) -> torch.Tensor:
        """[B, 1, N, N] for joint attention over a `grid` of image tokens and the text tokens (SD3:
        image then text; FLUX.1: text then image): image tokens attend each other freely and a
        layer's tokens with bias log w; a layer's tokens attend its own region and its own tokens;
        padding only itself."""
        key = (grid, text_first)
        if key not in self._made:
            count, tokens = grid[0] * grid[1], self.tokens

            def make(logs, owner):
                text = owner >= 0
                image_text = torch.full((count, tokens), NEG, device=self.device)
                image_text[:, text] = logs[owner[text]].T
                text_image = torch.full((tokens, count), NEG, device=self.device)
                text_image[text] = logs[owner[text]]
                text_text = torch.where(owner[:, None] == owner[None, :], 0.0, NEG)
                image_image = torch.zeros((count, count), device=self.device)
                if text_first:
                    return torch.cat([torch.cat([text_text, text_image], 1), torch.cat([image_text, image_image], 1)])
                return torch.cat([torch.cat([image_image, image_text], 1), torch.cat([text_image, text_text], 1)])

            self._made[key] = self._rows(("joint", grid, text_first), make)
        return self._made[key]


SPARSE = 0.5  # split a cross-attention by layers when it computes at most this share of the scores


def _split(bias: torch.Tensor, spans) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None:
    """A row's cross-attention bias [queries, tokens] as (positions, tokens, bias) for each set of
    layers some positions read (the bias None where it is 0: positions inside one region); None
    when that computes more than `SPARSE` of the scores."""
    reads = torch.isfinite(bias[:, [start for start, _ in spans]])  # [queries, G]: a layer's tokens alike
    patterns, which = torch.unique(reads, dim=0, return_inverse=True)
    parts, scores = [], 0
    for p, pattern in enumerate(patterns):
        positions = (which == p).nonzero().flatten()
        tokens = torch.cat([torch.arange(*spans[g], device=bias.device) for g in pattern.nonzero().flatten().tolist()])
        part = bias[positions][:, tokens]
        parts.append((positions, tokens, None if not part.any() else part))  # inside one region: no bias
        scores += len(positions) * len(tokens)
    return parts if scores <= SPARSE * bias.numel() else None


class RegionContext:
    """The bias of the call running now, shared by a denoiser's region processors."""

    def __init__(self) -> None:
        self.bias: RegionBias | None = None

    @contextlib.contextmanager
    def active(self, bias: RegionBias):
        self.bias = bias
        try:
            yield
        finally:
            self.bias = None


class CrossRegionProcessor:
    """A UNet's cross-attention with the region bias (docs/method.md §10); without one, the
    processor it replaced."""

    def __init__(self, inner: Any, context: RegionContext):
        self.inner, self.context = inner, context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        bias = self.context.bias
        if bias is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch, queries, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head = key.shape[-1] // attn.heads
        query, key, value = (s.view(batch, -1, attn.heads, head).transpose(1, 2) for s in (query, key, value))
        groups = bias.groups(queries) if query.device.type == "cpu" else None
        if groups is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.cross(queries).to(query.dtype))
        else:  # a CPU's attention costs what it computes: only the scores that are not zero
            out = torch.empty_like(query)
            for b, parts in enumerate(groups):
                for positions, tokens, part in parts:
                    out[b, :, positions] = F.scaled_dot_product_attention(  # [1, heads, n, head]: the fused kernel's
                        query[b:b + 1, :, positions], key[b:b + 1, :, tokens], value[b:b + 1, :, tokens],
                        attn_mask=None if part is None else part.to(query.dtype))[0]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class JointRegionProcessor:
    """SD3's joint attention (image tokens, then text tokens) with the region bias; without one, the
    processor it replaced."""

    def __init__(self, inner: Any, context: RegionContext, patch: int):
        self.inner, self.context, self.patch = inner, context, patch

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        bias = self.context.bias
        if bias is None or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        batch, count = hidden_states.shape[:2]
        head = attn.to_k.out_features // attn.heads

        def heads(s):
            return s.view(batch, -1, attn.heads, head).transpose(1, 2)

        query, key, value = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        c_query = heads(attn.add_q_proj(encoder_hidden_states))
        c_key = heads(attn.add_k_proj(encoder_hidden_states))
        c_value = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            c_query = attn.norm_added_q(c_query)
        if attn.norm_added_k is not None:
            c_key = attn.norm_added_k(c_key)
        grid = (bias.size[0] // self.patch, bias.size[1] // self.patch)
        mask = bias.joint(grid, text_first=False).to(query.dtype)
        out = F.scaled_dot_product_attention(torch.cat([query, c_query], 2), torch.cat([key, c_key], 2),
                                             torch.cat([value, c_value], 2), attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head).to(query.dtype)
        image, text = out[:, :count], out[:, count:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, text


def install(denoiser: Any, kind: str, patch: int = 1) -> RegionContext:
    """The region processors on a denoiser's attention (`cross`: a UNet's cross-attention;
    `joint`: SD3's joint attention), installed once and again after anything replaced them (an
    IP-Adapter loading installs its own); returns their shared context."""
    module = getattr(denoiser, "_orig_mod", denoiser)
    context = getattr(module, "_smd_regions", None) or RegionContext()
    module._smd_regions = context
    processors = module.attn_processors
    wanted = {}
    for name, processor in processors.items():
        if kind == "cross" and name.endswith("attn2.processor"):
            wanted[name] = processor if isinstance(processor, CrossRegionProcessor) \
                else CrossRegionProcessor(processor, context)
        elif kind == "joint" and ".attn." in name:
            wanted[name] = processor if isinstance(processor, JointRegionProcessor) \
                else JointRegionProcessor(processor, context, patch)
        else:
            wanted[name] = processor
    if any(wanted[n] is not processors[n] for n in processors):
        module.set_attn_processor(wanted)
    return context
