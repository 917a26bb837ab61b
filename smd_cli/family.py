"""Model families: what the region sampler needs to know of a model, and nothing more.

The step (docs/method.md §3) never looks inside a model, and neither do the input preparation (docs/method.md §2) or
the stream (docs/method.md §6). A family is one small adapter that answers five questions:

1. Prompts. `encode(texts) -> Conditioning`: the text conditioning of each prompt, as rows
   that can be selected (`cond[index]`), concatenated (`Conditioning.cat`) and mixed toward the
   background prompt's by prompt strength (`cond.mix(background, w)`, docs/method.md §2.1); `empty_negative`
   is what an empty negative prompt means (None: the encoding of "").
2. The denoiser. `predict(x, t, cond, guidance_scale, placement) -> eps`: the noise in latents `x`
   [B, C, h, w] at timestep(s) `t`, row i under conditioning row i, as a noise prediction in the
   family's noising (a v-predicting UNet converts), or for flow models the velocity. `placement` says where each
   row's window lies on the canvas, for families that condition on it. `guidance_distilled` says
   whether the denoiser takes the guidance scale as an input, in which case classifier-free
   guidance never runs an unconditional pass (`runs_unconditional`, the one rule for every caller).
3. The latent layout. `channels`, `factor` (the VAE's downscale factor, docs/method.md §1), `native_size`
   (pixels: the window of one view, docs/method.md §5) and `granularity` (latent pixels a denoiser input must
   be a multiple of).
4. The noising. `schedule(scheduler, steps, timesteps, spacing) -> Schedule`: t_k, alpha_k and
   sigma_k such that x_k = alpha_k x0 + sigma_k eps, and the transition after each step.
5. Pictures. `encode_image(pixels) -> latent` (the distribution's mode, scaled, docs/method.md §2.3) and
   `decode(latent) -> pixels`, both in [-1, 1].

`StableDiffusion` is SD 1.x and 2.x. `StableDiffusionXL` adds a second text encoder (a pooled row
beside the token states in `Conditioning`) and micro-conditioning on each row's placement. The
flow-matching transformers, `StableDiffusion3` and `Flux`, return the predicted velocity and
schedules that say so (alpha_k = 1 - s_k, sigma_k = s_k, `Schedule.prediction == "flow"`), behind
the same five answers. `make_family` picks the adapter from the denoiser's config
(`models.family_of`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence

import torch

from smd_cli import defaults, prompts
from smd_cli.controls import ControlNets, ControlSet
from smd_cli.errors import ModelError, SmdError
from smd_cli.loras import LoraAdapters, LoraSet
from smd_cli.models import Components, family_of, guidance_distilled, vae_factor
from smd_cli.references import Reference, References
from smd_cli.sampler import Schedule, make_schedule
from smd_cli.views import Grid


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the text encoder's limit was cut."""


def runs_unconditional(guidance_scale: float, unet_config: Mapping) -> bool:
    """Whether classifier-free guidance runs an unconditional pass: only above 1, and never for a
    guidance-distilled denoiser, which takes the scale as an embedding (docs/method.md §3.3)."""
    return guidance_scale > 1.0 and not guidance_distilled(unet_config)


@dataclass
class Conditioning:
    """Text conditioning, one row per prompt: the encoders' token states [N, tokens, D], for SDXL
    the pooled embedding [N, D'] of its second encoder, and where prompts may run past one chunk
    of the tokenizer (`smd_cli.prompts`), the empty prompt's chunk [1, chunk, D] that pads a row to
    a longer row's length when rows are joined or mixed."""

    states: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    filler: Optional[torch.Tensor] = None
    loras: Optional[tuple[LoraSet, ...]] = None  # per row: the LoRAs its denoiser call runs with
    controls: Optional[tuple[ControlSet, ...]] = None  # per row: the ControlNets acting on it
    references: Optional[tuple[Optional[Reference], ...]] = None  # per row: its IP-Adapter image, if any

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: Any) -> "Conditioning":
        picked = None
        if self.loras is not None or self.controls is not None or self.references is not None:
            picked = range(len(self))[index] if isinstance(index, (int, slice)) else torch.as_tensor(index).tolist()
            picked = [picked] if isinstance(picked, int) else list(picked)

        def rows(values):
            return None if values is None else tuple(values[i] for i in picked)

        return Conditioning(self.states[index], None if self.pooled is None else self.pooled[index], self.filler,
                            rows(self.loras), rows(self.controls), rows(self.references))

    def with_loras(self, loras: Sequence[LoraSet]) -> "Conditioning":
        """These rows, row i to run with LoRAs `loras[i]`."""
        return replace(self, loras=tuple(loras) if any(loras) else None)

    def with_controls(self, controls: Sequence[ControlSet]) -> "Conditioning":
        """These rows, row i under ControlNets `controls[i]`."""
        return replace(self, controls=tuple(controls) if any(controls) else None)

    def with_references(self, references: Sequence[Optional[Reference]]) -> "Conditioning":
        """These rows, row i with IP-Adapter image `references[i]` (None: zeros at scale 0)."""
        return replace(self, references=tuple(references) if any(r is not None for r in references) else None)

    def padded(self, tokens: int, filler: Optional[torch.Tensor] = None) -> "Conditioning":
        """These rows, their token states extended with the empty chunk (`filler` where they have
        none: a plain prompt's rows joined with a long one's) to `tokens` tokens."""
        missing = tokens - self.states.shape[1]
        filler = self.filler if self.filler is not None else filler
        if missing <= 0:
            return self
        if filler is None or missing % filler.shape[1]:
            raise ValueError(f"cannot pad conditioning of {self.states.shape[1]} tokens to {tokens}")
        fill = filler.to(self.states.dtype).expand(len(self), -1, -1)
        return replace(self, states=torch.cat([self.states] + [fill] * (missing // filler.shape[1]), dim=1),
                       filler=filler)

    def mix(self, background: "Conditioning", w: Sequence[float]) -> "Conditioning":
        """E_p = E_bg + w_p (E_p - E_bg) for each row p (docs/method.md §2.1), the token states and the pooled
        embedding alike; `background` is one row (`cond[i]` or `cond[i:i + 1]`)."""
        if background.states.dim() == 2:
            background = background[None]
        tokens = max(self.states.shape[1], background.states.shape[1])
        filler = self.filler if self.filler is not None else background.filler
        rows, background = self.padded(tokens, filler), background.padded(tokens, filler)
        weights = torch.tensor(list(w), device=rows.states.device, dtype=rows.states.dtype)
        pooled = None
        if rows.pooled is not None:
            pooled = background.pooled + weights.view(-1, 1) * (rows.pooled - background.pooled)
        states = background.states + weights.view(-1, 1, 1) * (rows.states - background.states)
        return replace(self, states=states, pooled=pooled, filler=rows.filler)

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        tokens = max(p.states.shape[1] for p in parts)
        filler = next((p.filler for p in parts if p.filler is not None), None)
        parts = [p.padded(tokens, filler) for p in parts]
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Conditioning(torch.cat([p.states for p in parts]), pooled, filler, _joined(parts, "loras", ()),
                            _joined(parts, "controls", ()), _joined(parts, "references", None))


def _joined(parts: Sequence[Conditioning], name: str, empty: Any) -> tuple | None:
    """A per-row field of joined rows: `empty` for the rows of a part without it, None if no part has it."""
    if all(getattr(p, name) is None for p in parts):
        return None
    return tuple(s for p in parts for s in (getattr(p, name) or (empty,) * len(p)))


@dataclass(frozen=True)
class Placement:
    """Where the rows of a denoiser batch lie on the canvas, in latent pixels: the canvas's size
    (height, width) and each row's window's top-left corner (top, left); the windows are the
    batch's own size. SDXL conditions on it; SD 1.x ignores it."""

    canvas: tuple[int, int]
    corners: Sequence[tuple[int, int]]


class StableDiffusion:
    """SD 1.x and 2.x: a CLIP text encoder, a `UNet2DConditionModel` predicting noise (or v), an
    `AutoencoderKL` (or TAESD), and variance-preserving noising on discrete timesteps."""

    name = "sd"

    def __init__(self, components: Components, *, device: torch.device, dtype: torch.dtype):
        from diffusers import LCMScheduler

        c = components
        self.unet, self.vae, self.text_encoder, self.tokenizer = c.unet, c.vae, c.text_encoder, c.tokenizer
        self.device, self.dtype = device, dtype
        self._weighted_encoders: dict[tuple, prompts.WeightedEncoder] = {}
        self.loras = LoraAdapters(components)
        self.embeddings: dict[str, str] = {}  # token -> the file its vectors came from
        self.references = References(self.loras.loader, self.name, device, dtype)
        self.controlnets = ControlNets(c.unet, device=device, dtype=dtype, factor=vae_factor(c.vae.config))
        # The noise levels of the model's training; LCM's is the scheduler smd starts from.
        self.scheduler = LCMScheduler.from_config(c.scheduler_config)

    # Layout.

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def factor(self) -> int:
        return vae_factor(self.vae.config)

    @property
    def native_size(self) -> int:
        return int(self.unet.config.sample_size) * self.factor

    @property
    def tile_native(self) -> int:
        """The size views are chosen from, in pixels: the family's native size
        (defaults.NATIVE_SIZES), or the model's own where its config says larger (SD 2.x's 768)."""
        return max(defaults.NATIVE_SIZES[self.name], self.native_size)

    @property
    def grid(self) -> Grid:
        """What this model asks of a canvas (`views.tiling` decides a canvas and its views from it)."""
        return Grid(self.name, self.factor, self.granularity, self.tile_native)

    def tile_size(self, height: int, width: int) -> int:
        """The default view for a canvas (`views.default_tile`)."""
        return self.grid.tile(height, width)

    @property
    def granularity(self) -> int:
        """The UNet's total downsampling: its inputs' sides must be multiples of this."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def guidance_distilled(self) -> bool:
        return guidance_distilled(self.unet.config)

    # Prompts.

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Conditioning:
        """CLIP token states, as diffusers' pipelines make them for plain prompts that fit the
        tokenizer; prompts with weights or past its length go through `smd_cli.prompts` (weighted,
        in chunks), the batch then padded with the empty prompt's chunk to its longest row."""
        texts = self._spelt(texts)
        plain = self._plain(texts)
        if plain is not None:
            return self.encode_plain(plain)
        encoder = self._weighted(self.tokenizer, self.text_encoder)
        return Conditioning(encoder.states(texts).to(self.dtype), filler=encoder.empty.to(self.dtype))

    def _clip_states(self, texts: Sequence[str]) -> torch.Tensor:
        ids, mask = self._tokens(self.tokenizer, texts, warn=False)
        if not getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = None
        return self.text_encoder(ids, attention_mask=mask)[0].to(self.dtype)

    def load_embedding(self, path: str, token: str) -> None:
        """A textual-inversion embedding file under `token`, through diffusers' loader: its vectors
        join the tokenizer and the text encoder (SDXL's files hold one set per encoder, `clip_l`
        and `clip_g`). A prompt that says the token then reads them; an embedding of several
        vectors is spelt out in the prompt as diffusers' pipelines spell it."""
        if self.embeddings.get(token) == path:
            return
        if token in self.embeddings or token in self.tokenizer.get_vocab():
            taken = f"the embedding {self.embeddings[token]}" if token in self.embeddings else "a word of the tokenizer"
            raise ModelError(f"token '{token}' is already {taken}; give this embedding another token")
        from smd_cli.models import _loading

        loader = self.loras.loader()
        pairs = [(self.tokenizer, self.text_encoder)]
        if self.name == "sdxl":
            pairs.append((self.tokenizer_2, self.text_encoder_2))
        with _loading(path, "embedding"):
            try:
                if len(pairs) == 1:
                    loader.load_textual_inversion(path, token=token)
                else:
                    from safetensors.torch import load_file

                    vectors = load_file(path)
                    if "clip_l" not in vectors or "clip_g" not in vectors:
                        raise ModelError(f"embedding {path} is not for SDXL: an SDXL embedding holds clip_l and clip_g")
                    for (tok, encoder), name in zip(pairs, ("clip_l", "clip_g")):
                        loader.load_textual_inversion(vectors[name], token=token, tokenizer=tok, text_encoder=encoder)
            except ValueError as exc:
                if "incorrect shape" not in str(exc):
                    raise
                raise ModelError(f"embedding {path} does not fit this {defaults.FAMILY_NAMES[self.name]} model: its "
                                 "vectors have another width (an embedding for another model family?)") from None
        self.embeddings[token] = path

    def _spelt(self, texts: Sequence[str]) -> list[str]:
        """Prompts with each multi-vector embedding's token spelt out (`<t> <t>_1 ...`)."""
        if not self.embeddings:
            return list(texts)
        loader = self.loras.loader()
        return [loader.maybe_convert_prompt(text, self.tokenizer) for text in texts]

    def _plain(self, texts: Sequence[str]) -> list[str] | None:
        """The prompts' texts when none asks for a weight and each fits every tokenizer; else None."""
        texts = [prompts.plain(text) for text in texts]
        if any(text is None for text in texts):
            return None
        limits = [(tok, tok.model_max_length) for tok in self._clip_tokenizers()]
        if any(len(ids) > limit for tok, limit in limits for ids in tok(texts).input_ids):
            return None
        return texts

    def _clip_tokenizers(self) -> list:
        return [self.tokenizer]

    def _weighted(self, tokenizer, encoder, penultimate: bool = False,
                  length: int | None = None) -> prompts.WeightedEncoder:
        """compel's reading of weights (and long prompts, in chunks unless `length` fixes one
        sequence) for one encoder, made on first use."""
        key = (id(encoder), length)
        if key not in self._weighted_encoders:
            self._weighted_encoders[key] = prompts.WeightedEncoder(tokenizer, encoder, penultimate=penultimate,
                                                                   device=self.device, length=length)
        return self._weighted_encoders[key]

    def encode_plain(self, texts: Sequence[str]) -> Conditioning:
        """The conditioning of texts taken as they are (no weights, no chunks)."""
        return Conditioning(self._clip_states(texts))

    def empty_negative(self) -> Conditioning | None:
        """What an empty negative prompt conditions on: the encoding of "" (None says so)."""
        return None

    def _tokens(self, tok, texts: Sequence[str], warn: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (and attention mask) padded to the tokenizer's length, cut with a warning (for
        the families that read prompts past it with another encoder, T5)."""
        limit, texts = tok.model_max_length, list(texts)
        batch = tok(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        for full in tok(texts).input_ids if warn else []:
            if len(full) > limit:  # truncation keeps the first limit - 1 tokens and the end token
                warnings.warn(f"prompt longer than the text encoder's {limit} tokens; cut: "
                              f"{tok.decode(full[limit - 1:-1])!r}", PromptTruncatedWarning, stacklevel=5)
        return batch.input_ids.to(self.device), batch.attention_mask.to(self.device)

    # The denoiser.

    @torch.no_grad()
    def predict(self, x: torch.Tensor, t: float | torch.Tensor, cond: Conditioning,
                guidance_scale: float = 1.0, placement: Placement | None = None) -> torch.Tensor:
        """The denoiser's prediction for rows x (`_predict`), one call per set of LoRAs the rows run
        with (`smd_cli.loras`: diffusers activates one set per call) and per IP-Adapter scale
        (`smd_cli.references`: one per call too)."""
        sets = cond.loras or ((),) * len(x)
        refs = cond.references or (None,) * len(x)
        keys = [(s, r.scale if r is not None else 0.0) for s, r in zip(sets, refs)]
        if len(set(keys)) == 1:
            self.loras.activate(sets[0])
            return self._predict(x, t, cond, guidance_scale, placement)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        times = torch.as_tensor(t)
        for chosen in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == chosen]
            index = torch.tensor(rows, device=x.device)
            part = placement and Placement(placement.canvas, [placement.corners[i] for i in rows])
            self.loras.activate(chosen[0])
            out[index] = self._predict(x[index], times[index.to(times.device)] if times.numel() > 1 else t,
                                       cond[index], guidance_scale, part)
        return out

    def _predict(self, x: torch.Tensor, t: float | torch.Tensor, cond: Conditioning,
                 guidance_scale: float = 1.0, placement: Placement | None = None) -> torch.Tensor:
        """The UNet's noise prediction (float32). Guidance-distilled UNets get `guidance_scale` as
        an embedding (docs/method.md §3.3); v-prediction is converted to noise with eps = sigma * x + alpha * v."""
        cfg = self.unet.config
        tc = None
        if self.guidance_distilled:
            w = torch.tensor([guidance_scale - 1.0], dtype=torch.float32)
            tc = guidance_embedding(w, cfg.time_cond_proj_dim).to(self.device, self.dtype).expand(len(x), -1)
        if not isinstance(t, torch.Tensor):  # a tensor, so that a compiled UNet is not specialised on each t
            t = torch.tensor(t, dtype=torch.float32, device=self.device)
        added = self._added(x, cond, placement)
        control = None
        if cond.controls:
            def run(net, rows, crops):
                part = None if added is None else {k: v[rows] for k, v in added.items()}
                times = t.reshape(-1).expand(len(x)) if t.numel() == 1 else t.reshape(-1)
                down, mid = net(x[rows].to(self.dtype), times[rows], encoder_hidden_states=cond.states[rows],
                                controlnet_cond=crops, conditioning_scale=1.0, added_cond_kwargs=part,
                                return_dict=False)
                return list(down), [mid]

            control = self.controlnets.residuals(x, t, cond, placement, run)
        if self.references.adapter is not None:  # an IP-Adapter in the UNet wants an image for every row
            refs = cond.references or (None,) * len(x)
            added = {**(added or {}), "image_embeds": [self.references.inputs(refs, len(x))]}
        out = self.unet(x.to(self.dtype), t, encoder_hidden_states=cond.states, timestep_cond=tc,
                        added_cond_kwargs=added, down_block_additional_residuals=control and control[0],
                        mid_block_additional_residual=control and control[1][0], return_dict=False)[0].float()
        if self.scheduler.config.prediction_type == "v_prediction":
            abar = self.scheduler.alphas_cumprod.to(out.device)[torch.as_tensor(t, device=out.device).long()]
            a = abar.sqrt().reshape(-1, 1, 1, 1)
            out = (1 - abar).sqrt().reshape(-1, 1, 1, 1) * x.float() + a * out
        return out

    def _added(self, x: torch.Tensor, cond: Conditioning, placement: Placement | None) -> dict | None:
        """The UNet's inputs beside the token states (none for SD 1.x/2.x)."""
        return None

    # The noising.

    def schedule(self, scheduler: str, steps: int | None = None, timesteps: Sequence[int] | None = None,
                 spacing: str | None = None, window: tuple[int, int] | None = None) -> Schedule:
        """`window` is one view's size in latent pixels, for families whose shift depends on it."""
        return family_schedule(self.name, scheduler, self.scheduler.config, steps, timesteps, spacing, window)

    # Pictures.

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE latent of pixels [B, 3, H, W] in [-1, 1]: the distribution's mode, shifted (SD3's
        and FLUX's autoencoders have a shift factor) and scaled (docs/method.md §2.3)."""
        encoded = self.vae.encode(pixels.to(self.device, self.vae.dtype))
        # AutoencoderKL gives a distribution (take its mode, never a sample); TAESD gives latents.
        latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        return (latents.float() - self._shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] from a clean latent."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self._shift
        return self.vae.decode(latents, return_dict=False)[0]

    @property
    def _shift(self) -> float:
        return float(self.vae.config.get("shift_factor") or 0.0)


class StableDiffusionXL(StableDiffusion):
    """SDXL: two CLIP text encoders whose penultimate token states are joined side by side, the
    second's projected end token as a pooled embedding, and a UNet that also takes that pooled
    embedding and six sizes (`add_time_ids`: original size, crop top-left, target size, in pixels).

    Placement (the choice, and why): SDXL was trained on crops of larger pictures and told where
    each crop lay. A view of a large canvas is exactly such a crop, so each (layer, view) row gets
    original size = the canvas, crop = its window's top-left, target = its window. For a canvas
    within one view this is diffusers' default (the canvas, (0, 0), the canvas), so plain sampling
    conforms; for views it tells the model that a view is part of a larger picture, which is the
    conditioning SDXL learnt for the edges of a crop.
    """

    name = "sdxl"

    def __init__(self, components: Components, *, device: torch.device, dtype: torch.dtype):
        super().__init__(components, device=device, dtype=dtype)
        self.text_encoder_2, self.tokenizer_2 = components.text_encoder_2, components.tokenizer_2
        self.zero_empty_negative = components.force_zeros_for_empty_prompt
        self._empty: Conditioning | None = None

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Conditioning:
        """Both encoders' penultimate token states, side by side, and the second's pooled
        embedding, as diffusers' `StableDiffusionXLPipeline.encode_prompt` makes them; weighted and
        long prompts through `smd_cli.prompts`, as on SD 1.x (the pooled embedding from the first
        chunk, without weights)."""
        texts = self._spelt(texts)
        plain = self._plain(texts)
        if plain is not None:
            return self.encode_plain(plain)
        first = self._weighted(self.tokenizer, self.text_encoder, penultimate=True)
        second = self._weighted(self.tokenizer_2, self.text_encoder_2, penultimate=True)
        states_1 = first.states(texts)
        states_2 = second.states(texts, chunks=states_1.shape[1] // first.chunk)
        if states_2.shape[1] > states_1.shape[1]:  # the tokenizers split the prompt differently
            states_1 = first.states(texts, chunks=states_2.shape[1] // first.chunk)
        filler = torch.cat([first.empty, second.empty], dim=-1)
        return Conditioning(torch.cat([states_1, states_2], dim=-1).to(self.dtype),
                            second.pooled(texts).to(self.dtype), filler.to(self.dtype))

    def encode_plain(self, texts: Sequence[str]) -> Conditioning:
        return Conditioning(*self._plain_states(texts))

    def _plain_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states = []
        pooled = None
        for tok, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids, _ = self._tokens(tok, texts, warn=False)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected end token
        return torch.cat(states, dim=-1).to(self.dtype), pooled.to(self.dtype)

    def _clip_tokenizers(self) -> list:
        return [self.tokenizer, self.tokenizer_2]

    def empty_negative(self) -> Conditioning | None:
        """Zero conditioning where the model asks for it (`force_zeros_for_empty_prompt`), as diffusers
        does for a negative prompt not given; else the encoding of ""."""
        if not self.zero_empty_negative:
            return None
        if self._empty is None:
            empty = self.encode_plain([""])
            zeros = torch.zeros_like(empty.states)
            self._empty = Conditioning(zeros, torch.zeros_like(empty.pooled), zeros)
        return self._empty

    def _added(self, x: torch.Tensor, cond: Conditioning, placement: Placement | None) -> dict:
        h, w = x.shape[-2:]
        canvas, corners = (placement.canvas, placement.corners) if placement else ((h, w), [(0, 0)] * len(x))
        f = self.factor
        sizes = [[canvas[0] * f, canvas[1] * f, top * f, left * f, h * f, w * f] for top, left in corners]
        return {"text_embeds": cond.pooled, "time_ids": torch.tensor(sizes, device=self.device, dtype=self.dtype)}


class StableDiffusion3(StableDiffusion):
    """SD3: an MMDiT transformer with joint attention over the text and image tokens, trained by flow
    matching; two CLIP encoders (penultimate states side by side, padded to the joint width; pooled
    embeddings joined) and T5's states after them, or zeros of T5's length where T5 is left out.

    The noising is x_s = (1 - s) x0 + s e and the transformer predicts the velocity v = e - x0; this
    adapter returns v, and its schedules say so (`Schedule.prediction == "flow"`), so the clean
    estimate of a (layer, view) pair is x0_p = x_p - s_k v_p and the rest of docs/method.md §3 is unchanged with
    alpha_k = 1 - s_k, sigma_k = s_k (the bootstrap background (1 - s_k) b + s_k e, mask quantization
    at s_k). Positions: the transformer crops its position embedding around the centre for the size
    it is given, so a view is denoised with the positions of a picture of its own size; the canvas
    is one view for plain sampling, which then equals diffusers'.
    """

    name = "sd3"
    max_sequence_length = 256  # T5 tokens, as diffusers' StableDiffusion3Pipeline takes by default

    def __init__(self, components: Components, *, device: torch.device, dtype: torch.dtype):
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(components, device=device, dtype=dtype)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config)
        self.text_encoder_2, self.tokenizer_2 = components.text_encoder_2, components.tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = components.text_encoder_3, components.tokenizer_3

    @property
    def native_size(self) -> int:
        return int(self.unet.config.sample_size) * self.factor

    @property
    def granularity(self) -> int:
        return int(self.unet.config.patch_size)

    @property
    def guidance_distilled(self) -> bool:
        return False

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Conditioning:
        """As diffusers' `StableDiffusion3Pipeline.encode_prompt` makes the conditioning; prompts
        with weights go through compel, each encoder reading the one sequence diffusers reads (CLIP's
        77 tokens, T5's 256). Without T5 a prompt longer than CLIP's limit would lose its end: that
        is refused, not cut."""
        texts = self._spelt(texts)
        plain = [prompts.plain(text) for text in texts]
        if self.text_encoder_3 is None:
            limit = self.tokenizer.model_max_length
            readable = [p if p is not None else "".join(f for f, _ in prompts.parse(t)) for p, t in zip(plain, texts)]
            if any(len(ids) > limit for ids in self.tokenizer(readable).input_ids):
                raise SmdError(f"a prompt is longer than CLIP's {limit} tokens and this SD3 model has no T5 "
                               "(text_encoder_3) to read the rest: shorten it, or use the model with its T5")
        weighted = any(p is None for p in plain)
        states, pooled = [], []
        for tok, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            if weighted:
                reader = self._weighted(tok, encoder, penultimate=True, length=tok.model_max_length)
                states.append(reader.states(texts))
                pooled.append(reader.pooled(texts))
                continue
            ids, _ = self._tokens(tok, plain, warn=encoder is self.text_encoder)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        width = int(self.unet.config.joint_attention_dim)
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(texts), self.max_sequence_length, width, device=self.device, dtype=clip.dtype)
        elif weighted:
            t5 = self._weighted(self.tokenizer_3, self.text_encoder_3, length=self.max_sequence_length).states(texts)
        else:
            ids = self.tokenizer_3(plain, padding="max_length", max_length=self.max_sequence_length,
                                   truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text_encoder_3(ids.to(self.device))[0]
        return Conditioning(torch.cat([clip.to(self.dtype), t5.to(self.dtype)], dim=-2),
                            torch.cat(pooled, dim=-1).to(self.dtype))

    def _predict(self, x: torch.Tensor, t: float | torch.Tensor, cond: Conditioning,
                 guidance_scale: float = 1.0, placement: Placement | None = None) -> torch.Tensor:
        """The transformer's velocity prediction (float32) at timestep t = 1000 s."""
        return self.unet(hidden_states=x.to(self.dtype), timestep=self._timesteps(t, len(x)),
                         encoder_hidden_states=cond.states, pooled_projections=cond.pooled,
                         return_dict=False)[0].float()

    def _timesteps(self, t: float | torch.Tensor, batch: int) -> torch.Tensor:
        """One timestep per row, on the device: a transformer takes them as a [B] tensor."""
        t = torch.as_tensor(t, dtype=torch.float32).to(self.device)
        return t.reshape(-1).expand(batch) if t.numel() == 1 else t

    def schedule(self, scheduler: str, steps: int | None = None, timesteps: Sequence[int] | None = None,
                 spacing: str | None = None, window: tuple[int, int] | None = None) -> Schedule:
        """`window` is one view's size in latent pixels, for families whose shift depends on it."""
        return family_schedule(self.name, scheduler, self.scheduler.config, steps, timesteps, spacing, window)


class Flux(StableDiffusion3):
    """FLUX.1: a transformer over latents packed 2x2 into tokens, trained by flow matching; CLIP's
    pooled embedding and T5's token states; dev embeds the guidance scale (no unconditional pass),
    schnell takes none. Everything else (masks, views, aggregation) stays in the unpacked latent
    grid: `predict` packs just before the transformer and unpacks its velocity.

    Positions (RoPE image ids): each (layer, view) row gets the positions of a picture of the
    view's own size, from (0, 0), not its place on the canvas. A view is then exactly what the
    model sees when it makes a picture that size, which keeps plain sampling (one view) equal to
    diffusers', and every view equally far from the position range the model was trained on; views
    agree on their overlaps through the averaging of clean estimates, as on SD. The shift mu is
    likewise the one for a view's token count (`schedule(window=...)`): the noise level each view is
    denoised at is the one the model expects for a picture of that size.
    """

    name = "flux"
    max_sequence_length = 512  # T5 tokens, as diffusers' FluxPipeline takes by default

    def __init__(self, components: Components, *, device: torch.device, dtype: torch.dtype):
        super().__init__(components, device=device, dtype=dtype)
        self._ids: dict[tuple[int, int], torch.Tensor] = {}
        self.controlnets = ControlNets(self.unet, device=device, dtype=dtype, factor=self.factor,
                                       encode=self.encode_image)

    def _image_ids(self, rows: int, cols: int) -> torch.Tensor:
        """RoPE positions (0, row, col) of a `rows` x `cols` token grid, made once per size: every
        view starts at (0, 0), as the class docstring says why."""
        if (rows, cols) not in self._ids:
            r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
            ids = torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(-1, 3)
            self._ids[(rows, cols)] = ids.to(self.device, self.dtype)
        return self._ids[(rows, cols)]

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels) // 4

    @property
    def native_size(self) -> int:
        return 128 * self.factor  # FluxPipeline's default: 1024 pixels with FLUX's factor 8

    @property
    def granularity(self) -> int:
        return 2  # latents are packed 2x2: canvases and views are multiples of 2 latent pixels

    @property
    def guidance_distilled(self) -> bool:
        return bool(self.unet.config.get("guidance_embeds"))

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Conditioning:
        """As diffusers' `FluxPipeline.encode_prompt`: CLIP's pooled output and T5's states; prompts
        with weights go through compel, T5 reading its one sequence of 512 tokens and CLIP's pooled
        output the text without the weights."""
        texts = self._spelt(texts)
        plain = [prompts.plain(text) for text in texts]
        if any(p is None for p in plain):
            clip = self._weighted(self.tokenizer, self.text_encoder, length=self.tokenizer.model_max_length)
            t5 = self._weighted(self.tokenizer_2, self.text_encoder_2, length=self.max_sequence_length)
            return Conditioning(t5.states(texts).to(self.dtype), clip.pooled(texts).to(self.dtype))
        ids, _ = self._tokens(self.tokenizer, plain, warn=False)  # T5 reads the whole prompt
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output
        t5 = self.tokenizer_2(plain, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                              return_tensors="pt").input_ids
        states = self.text_encoder_2(t5.to(self.device), output_hidden_states=False)[0]
        return Conditioning(states.to(self.dtype), pooled.to(self.dtype))

    def empty_negative(self) -> Conditioning | None:
        return None

    def _predict(self, x: torch.Tensor, t: float | torch.Tensor, cond: Conditioning,
                 guidance_scale: float = 1.0, placement: Placement | None = None) -> torch.Tensor:
        """The transformer's velocity for latents x [B, C, h, w] (float32, unpacked)."""
        b, c, h, w = x.shape
        t = self._timesteps(t, b)
        packed = pack(x).to(self.dtype)
        txt_ids = torch.zeros(cond.states.shape[1], 3, device=self.device, dtype=self.dtype)
        img_ids = self._image_ids(h // 2, w // 2)
        guidance = torch.full((b,), guidance_scale, device=self.device)
        control = None
        if cond.controls:  # FLUX.1 ControlNets (smd_cli.controls), on the rows they act on
            def run(net, rows, crops):
                blocks, singles = net(hidden_states=packed[rows], controlnet_cond=pack(crops), conditioning_scale=1.0,
                                      timestep=(t[rows] / 1000).to(self.dtype),
                                      guidance=guidance[rows] if net.config.guidance_embeds else None,
                                      pooled_projections=cond.pooled[rows], encoder_hidden_states=cond.states[rows],
                                      txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
                return list(blocks or []), list(singles or [])

            control = self.controlnets.residuals(x, t, cond, placement, run)
        attention = None
        if self.references.adapter is not None:  # XLabs' IP-Adapter: an image for every row
            attention = {"ip_adapter_image_embeds": [self.references.inputs(cond.references or (None,) * b, b)]}
        out = self.unet(hidden_states=packed, timestep=(t / 1000).to(self.dtype),
                        guidance=guidance if self.guidance_distilled else None, pooled_projections=cond.pooled,
                        encoder_hidden_states=cond.states, txt_ids=txt_ids, img_ids=img_ids,
                        joint_attention_kwargs=attention,
                        controlnet_block_samples=(control[0] or None) if control else None,
                        controlnet_single_block_samples=(control[1] or None) if control else None,
                        controlnet_blocks_repeat=self.controlnets.repeats, return_dict=False)[0].float()
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def pack(x: torch.Tensor) -> torch.Tensor:
    """FLUX's tokens: latents [B, C, h, w] packed 2x2 into [B, h/2 * w/2, 4C]."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


# Families whose models are trained by flow matching.
FLOW_FAMILIES = ("sd3", "flux")


def flux_shift(tokens: int, config: Mapping) -> float:
    """FLUX's resolution-dependent shift mu, linear in the image's token count between the
    config's base and max sequence lengths (as diffusers' FluxPipeline computes it)."""
    base, top = int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096))
    low, high = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    slope = (high - low) / (top - base)
    return tokens * slope + low - slope * base


def family_schedule(family: str, scheduler: str, config: Mapping, steps: int | None = None,
                    timesteps: Sequence[int] | None = None, spacing: str | None = None,
                    window: tuple[int, int] | None = None) -> Schedule:
    """The schedule a model of `family` samples with. Flow-matching families step by flow-matching
    Euler, which `lcm` (the scenes' default) and `euler` both name, or with `renoise`: the same
    levels, with fresh noise after each step as LCM does (e* a new draw instead of the one implied
    by x_k), for distilled models. Their default step count is SD3's 28."""
    if family not in FLOW_FAMILIES:
        if scheduler == "renoise":
            raise SmdError(f"scheduler renoise applies to flow-matching models (SD3); this one is "
                           f"{defaults.FAMILY_NAMES[family]}: use lcm")
        return make_schedule(scheduler, config, steps, timesteps, spacing)
    if scheduler == "ddim":
        raise SmdError(f"scheduler ddim does not apply to {defaults.FAMILY_NAMES[family]}, a flow-matching model; "
                       "use euler (its own sampler) or renoise")
    if spacing is not None:
        raise SmdError(f"timestep_spacing does not apply to {defaults.FAMILY_NAMES[family]}: its scheduler "
                       "spaces its steps by its shift")
    mu = None
    if config.get("use_dynamic_shifting"):  # FLUX: the shift for the token count of one view
        tokens = (window[0] // 2) * (window[1] // 2) if window else int(config.get("base_image_seq_len", 256))
        mu = flux_shift(tokens, config)
    schedule = make_schedule("flow", config, steps, timesteps, mu=mu, flux_sigmas=family == "flux")
    if scheduler == "renoise":
        schedule.kind = "lcm"
    return schedule


FAMILIES = {"sd": StableDiffusion, "sdxl": StableDiffusionXL, "sd3": StableDiffusion3, "flux": Flux}


def make_family(components: Components, *, device: torch.device, dtype: torch.dtype) -> StableDiffusion:
    """The adapter for a loaded model, chosen by its UNet's config."""
    return FAMILIES[family_of(components.unet.config)](components, device=device, dtype=dtype)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale for guidance-distilled UNets (LCM, `time_cond_proj_dim`)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
