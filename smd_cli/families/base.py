"""The family protocol: what the region sampler needs to know of a model, and nothing more.

The step (docs/method.md §3) never looks inside a model, and neither do the input preparation
(docs/method.md §2) or the stream (docs/method.md §6). A family is one file in this package: a
`Family` subclass whose class attributes are the family's facts (read by `smd validate`, the memory
estimate and the planners without loading a model or importing torch) and whose instances run a
loaded model by answering five questions:

1. Prompts. `encode(texts) -> Conditioning`: the text conditioning of each prompt, as rows
   that can be selected (`cond[index]`), concatenated (`Conditioning.cat`) and mixed toward the
   background prompt's by prompt strength (`cond.mix(background, w)`, docs/method.md §2.1);
   `empty_negative` is what an empty negative prompt means (None: the encoding of "").
2. The denoiser. `predict(x, t, cond, guidance_scale, placement) -> eps`: the noise in latents `x`
   [B, C, h, w] at timestep(s) `t`, row i under conditioning row i, as a noise prediction in the
   family's noising (a v-predicting UNet converts), or for flow models the velocity. `placement`
   says where each row's window lies on the canvas, for families that condition on it.
   `guidance_distilled` says whether the denoiser takes the guidance scale as an input, in which
   case classifier-free guidance never runs an unconditional pass.
3. The latent layout. `channels`, `factor` (the VAE's downscale factor, docs/method.md §1),
   `native_size` (pixels: the window of one view, docs/method.md §5) and `granularity` (latent
   pixels a denoiser input must be a multiple of), together the family's `grid`.
4. The noising. `schedule(scheduler, steps, timesteps, spacing) -> Schedule`: t_k, alpha_k and
   sigma_k such that x_k = alpha_k x0 + sigma_k eps, and the transition after each step.
5. Pictures. `encode_image(pixels) -> latent` (the distribution's mode, scaled, docs/method.md §2.3)
   and `decode(latent) -> pixels`, both in [-1, 1].

A family is composed, not derived from another: what several share is a function or a part here or
in `smd_cli.families.text` (the text encoders), and `Family` itself holds only what follows from
the five answers. Adding a family: docs/development.md#adding-a-family.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional, Sequence

from smd_cli.core.errors import ModelError, SmdError
from smd_cli.core.lazy import lazy, no_grad
from smd_cli.method import prompts
from smd_cli.method.views import Grid

if TYPE_CHECKING:
    from smd_cli.method.regions import Regions
    from smd_cli.method.sampler import Schedule
    from smd_cli.models.controls import ControlNets, ControlSet
    from smd_cli.models.loading import Components
    from smd_cli.models.loras import LoraAdapters, LoraSet
    from smd_cli.models.references import Reference, References

torch = lazy("torch")


@dataclass
class Conditioning:
    """Text conditioning, one row per prompt: the encoders' token states [N, tokens, D], for SDXL
    the pooled embedding [N, D'] of its second encoder, and where prompts may run past one chunk
    of the tokenizer (`smd_cli.method.prompts`), the empty prompt's chunk [1, chunk, D] that pads a row to
    a longer row's length when rows are joined or mixed."""

    states: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    filler: Optional[torch.Tensor] = None
    loras: Optional[tuple[LoraSet, ...]] = None  # per row: the LoRAs its denoiser call runs with
    controls: Optional[tuple[ControlSet, ...]] = None  # per row: the ControlNets acting on it
    references: Optional[tuple[Optional[Reference], ...]] = None  # per row: its IP-Adapter image, if any
    # Attention mode (docs/method.md §10): per row, the layers joined in it and where each may act,
    # and the tokens each row really has (rows of several lengths joined are padded with zeros).
    regions: Optional[tuple[Optional[Regions], ...]] = None
    tokens: Optional[tuple[int, ...]] = None

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: Any) -> "Conditioning":
        picked = None
        if any(v is not None for v in (self.loras, self.controls, self.references, self.regions, self.tokens)):
            picked = range(len(self))[index] if isinstance(index, (int, slice)) else torch.as_tensor(index).tolist()
            picked = [picked] if isinstance(picked, int) else list(picked)

        def rows(values):
            return None if values is None else tuple(values[i] for i in picked)

        return Conditioning(self.states[index], None if self.pooled is None else self.pooled[index], self.filler,
                            rows(self.loras), rows(self.controls), rows(self.references), rows(self.regions),
                            rows(self.tokens))

    def trimmed(self) -> "Conditioning":
        """These rows without the padding none of them needs (rows joined with a longer joined row)."""
        if self.tokens is None or max(self.tokens) >= self.states.shape[1]:
            return self
        return replace(self, states=self.states[:, :max(self.tokens)])

    def region_bias(self, x, t, placement: Placement | None, dtype):
        """The attention bias of these rows for latents x at timestep(s) t (`smd_cli.method.regions`);
        None for rows that join no layers."""
        if self.regions is None or all(r is None for r in self.regions):
            return None
        if any(r is None for r in self.regions):  # `Family.predict` calls joined rows apart
            raise ValueError("rows that join layers and rows that do not are denoised apart")
        from smd_cli.method.regions import RegionBias

        times = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(len(x)).tolist()
        corners = list(placement.corners) if placement is not None else [(0, 0)] * len(x)
        return RegionBias(self.regions, times, corners, tuple(x.shape[-2:]), self.states.shape[1], dtype, x.device)

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
        if any(p.regions is not None or p.tokens is not None for p in parts):  # joined rows: pad with zeros
            pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
            states = torch.cat([torch.nn.functional.pad(p.states, (0, 0, 0, tokens - p.states.shape[1]))
                                for p in parts])
            own = tuple(n for p in parts for n in (p.tokens or (p.states.shape[1],) * len(p)))
            return Conditioning(states, pooled, None, _joined(parts, "loras", ()), _joined(parts, "controls", ()),
                                _joined(parts, "references", None), _joined(parts, "regions", None), own)
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


class Family:
    """A model family: facts as class attributes, a loaded model's behaviour as an instance."""

    # Facts, read without loading a model.
    name: ClassVar[str]  # the registry's key, as scenes and records say it ("sd")
    label: ClassVar[str]  # as people say it ("SD 1.x/2.x")
    pipeline: ClassVar[str]  # the diffusers pipeline class that loads a model of the family
    native_size: ClassVar[int]  # pixels; views are chosen from it, or from the model's own where larger
    tiny_vae: ClassVar[str]  # `vae: tiny`
    lcm_lora: ClassVar[Optional[str]] = None  # `lcm_lora: auto` fuses it where it fits
    lcm_lora_width: ClassVar[Optional[int]] = None  # the denoiser's text width the LCM LoRA was trained on
    ip_adapter: ClassVar[Optional[str]] = None  # the IP-Adapter a reference image goes through by default
    ip_adapter_encoder: ClassVar[Optional[str]] = None  # its image encoder, where not beside its weights
    black_negative_reference: ClassVar[bool] = False  # unconditional rows see a black picture's embedding, not zeros
    flow: ClassVar[bool] = False  # trained by flow matching (docs/method.md §8)
    flux_sigmas: ClassVar[bool] = False  # its flow-matching levels are FLUX.1's (`sampler.make_schedule`)
    patched: ClassVar[bool] = False  # a transformer over patches: canvases too are whole patches
    reads_embeddings: ClassVar[bool] = False  # textual-inversion embeddings (`smd_cli.models.embeddings`)
    controls: ClassVar[bool] = True  # ControlNets and reference images are wired
    control_latents: ClassVar[bool] = False  # its ControlNets read control images as VAE latents
    versions: ClassVar[tuple[str, ...]] = ()  # the Python API's `sd_version` names of the family
    prompt_tokens: ClassVar[int] = 77  # the most text tokens a prompt keeps in a joined row (docs/method.md §10)
    # The memory estimate's figures: activations per latent pixel of one batch item at half precision
    # (measured on the family's flagship), the flagship transformer's width, the denoiser's share of
    # the weights, and the flagship's weights at half precision.
    activation_bytes: ClassVar[int]
    transformer_width: ClassVar[Optional[int]] = None
    denoiser_share: ClassVar[float]
    weight_bytes: ClassVar[int]

    @staticmethod
    def matches(config: Mapping) -> bool:
        """Whether a denoiser's config is one of this family's."""
        raise NotImplementedError

    @staticmethod
    def matches_checkpoint(keys: frozenset[str]) -> bool:
        """Whether a single-file checkpoint with tensors of these names is one of this family's
        (`smd_cli.models.loading` reads single files of the families that say so)."""
        return False

    @classmethod
    def config_granularity(cls, config: Mapping) -> int:
        """The denoiser's granularity read from its config (`granularity` of a loaded model)."""
        raise NotImplementedError

    @classmethod
    def config_native(cls, config: Mapping, factor: int) -> int:
        """The model's own native size in pixels, read from its denoiser's config."""
        size = config.get("sample_size")
        return size * factor if isinstance(size, int) else cls.native_size

    @classmethod
    def grid_of(cls, config: Mapping, factor: int) -> Grid:
        """What a model of the family asks of a canvas, from its denoiser's config (`views.tiling`)."""
        return Grid(cls.name, factor, cls.config_granularity(config),
                    max(cls.native_size, cls.config_native(config, factor)), cls.patched, cls.label)

    @classmethod
    def guidance_distilled_config(cls, config: Mapping) -> bool:
        """Whether the denoiser takes the guidance scale as an input (docs/method.md §3.3)."""
        return config.get("time_cond_proj_dim") is not None or bool(config.get("guidance_embeds"))

    @classmethod
    def check(cls, model: str, config: Mapping, *, has_text_encoder: bool = True) -> None:
        """Refuse, with the reason, a model of the family the region sampler cannot drive."""

    @classmethod
    def schedule_for(cls, scheduler: str, config: Mapping, steps: int | None = None,
                     timesteps: Sequence[int] | None = None, spacing: str | None = None,
                     window: tuple[int, int] | None = None) -> Schedule:
        """The schedule a model of the family samples with (`flow_schedule` or `noise_schedule`);
        `window` is one view's size in latent pixels, for families whose shift depends on it."""
        if cls.flow:
            return flow_schedule(cls, scheduler, config, steps, timesteps, spacing, window, flux_sigmas=cls.flux_sigmas)
        return noise_schedule(cls, scheduler, config, steps, timesteps, spacing)

    # A loaded model.

    def __init__(self, components: Components, *, device, dtype):
        import diffusers

        self.denoiser, self.vae = components.denoiser, components.vae
        self.text_encoder, self.tokenizer = components.text_encoder, components.tokenizer  # every family's first
        self.device, self.dtype = device, dtype
        # The noise levels of the model's training: LCM's scheduler is the one smd starts from on a
        # discrete-timestep family, flow-matching Euler's on a flow family.
        kind = "FlowMatchEulerDiscreteScheduler" if self.flow else "LCMScheduler"
        self.scheduler = getattr(diffusers, kind).from_config(components.scheduler_config)
        self.embeddings: dict[str, str] = {}  # token -> the file its vectors came from
        self._readers: dict[tuple, prompts.WeightedEncoder] = {}
        # Attached by `smd_cli.models.loading.make_family`: the LoRAs, reference images and
        # ControlNets acting on the rows (`smd_cli.models`).
        self.loras: LoraAdapters
        self.references: References
        self.controlnets: ControlNets

    @property
    def channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def factor(self) -> int:
        return vae_factor(self.vae.config)

    @property
    def default_size(self) -> int:
        """The model's own size in pixels: a canvas's side where none is given."""
        return self.config_native(self.denoiser.config, self.factor)

    @property
    def granularity(self) -> int:
        return self.config_granularity(self.denoiser.config)

    @property
    def grid(self) -> Grid:
        """What this model asks of a canvas (`views.tiling` decides a canvas and its views from it)."""
        return self.grid_of(self.denoiser.config, self.factor)

    def tile_size(self, height: int, width: int) -> int:
        """The default view for a canvas (`views.default_tile`)."""
        return self.grid.tile(height, width)

    @property
    def guidance_distilled(self) -> bool:
        return self.guidance_distilled_config(self.denoiser.config)

    def encode(self, texts: Sequence[str]) -> Conditioning:
        raise NotImplementedError

    def empty_negative(self) -> Conditioning | None:
        """What an empty negative prompt conditions on: the encoding of "" (None says so)."""
        return None

    def embedding_encoders(self) -> list[tuple[Any, Any, str | None]]:
        """(tokenizer, text encoder, the key of its vectors in an embedding file) of each encoder a
        textual-inversion embedding extends (`smd_cli.models.embeddings`); one key of None: the file
        holds one set."""
        raise ModelError(f"embeddings are read on SD 1.x and SDXL, not {self.label}")

    def text_lengths(self, texts: Sequence[str]) -> list[int] | None:
        """How many leading token states of each text's conditioning carry it, where a family pads
        to a fixed length that joined rows can do without (docs/method.md §10: T5's padding); None:
        keep every state (CLIP's chunks)."""
        return None

    # What the text encoders share (docs/method.md §2.1 reads prompts through them).

    def spelt(self, texts: Sequence[str]) -> list[str]:
        """Prompts with each multi-vector embedding's token spelt out (`<t> <t>_1 ...`)."""
        if not self.embeddings:
            return list(texts)
        loader = self.loras.loader()
        return [loader.maybe_convert_prompt(text, self.tokenizer) for text in texts]

    def reader(self, tokenizer, encoder, penultimate: bool = False,
               length: int | None = None) -> prompts.WeightedEncoder:
        """compel's reading of weights (and long prompts, in chunks unless `length` fixes one
        sequence) for one encoder, made on first use."""
        key = (id(encoder), length)
        if key not in self._readers:
            self._readers[key] = prompts.WeightedEncoder(tokenizer, encoder, penultimate=penultimate,
                                                         device=self.device, length=length)
        return self._readers[key]

    def tokens(self, tokenizer, texts: Sequence[str], warn: bool = False):
        """Token ids (and attention mask) padded to the tokenizer's length, cut with a warning (for
        the families that read prompts past it with another encoder, T5)."""
        limit, texts = tokenizer.model_max_length, list(texts)
        batch = tokenizer(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        for full in tokenizer(texts).input_ids if warn else []:
            if len(full) > limit:  # truncation keeps the first limit - 1 tokens and the end token
                warnings.warn(f"prompt longer than the text encoder's {limit} tokens; cut: "
                              f"{tokenizer.decode(full[limit - 1:-1])!r}", prompts.PromptTruncatedWarning,
                              stacklevel=5)
        return batch.input_ids.to(self.device), batch.attention_mask.to(self.device)


    @no_grad
    def predict(self, x, t, cond: Conditioning, guidance_scale: float = 1.0,
                placement: Placement | None = None):
        """The denoiser's prediction for rows x (`_predict`), one call per set of LoRAs the rows run
        with (`smd_cli.models.loras`: diffusers activates one set per call) and per IP-Adapter scale
        (`smd_cli.models.references`: one per call too), and apart for rows that join layers
        (attention mode, docs/method.md §10)."""
        sets = cond.loras or ((),) * len(x)
        refs = cond.references or (None,) * len(x)
        joined = cond.regions or (None,) * len(x)
        keys = [(s, r.scale if r is not None else 0.0, j is not None) for s, r, j in zip(sets, refs, joined)]
        if len(set(keys)) == 1:
            self.loras.activate(sets[0])
            return self._predict(x, t, cond.trimmed(), guidance_scale, placement)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        times = torch.as_tensor(t)
        for chosen in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == chosen]
            index = torch.tensor(rows, device=x.device)
            part = placement and Placement(placement.canvas, [placement.corners[i] for i in rows])
            self.loras.activate(chosen[0])
            out[index] = self._predict(x[index], times[index.to(times.device)] if times.numel() > 1 else t,
                                       cond[index].trimmed(), guidance_scale, part)
        return out

    def _predict(self, x, t, cond: Conditioning, guidance_scale: float = 1.0,
                 placement: Placement | None = None):
        """The denoiser's raw prediction for rows under one set of LoRAs (float32)."""
        raise NotImplementedError

    def schedule(self, scheduler: str, steps: int | None = None, timesteps: Sequence[int] | None = None,
                 spacing: str | None = None, window: tuple[int, int] | None = None) -> Schedule:
        """`window` is one view's size in latent pixels, for families whose shift depends on it."""
        return self.schedule_for(scheduler, self.scheduler.config, steps, timesteps, spacing, window)

    @no_grad
    def encode_image(self, pixels, run: Callable | None = None):
        """The VAE latent of pixels [B, 3, H, W] in [-1, 1]: the distribution's mode, shifted (SD3's
        and FLUX's autoencoders have a shift factor) and scaled (docs/method.md §2.3). `run(vae,
        pixels)`, where given, encodes instead (the mode too): exactly in tiles (docs/large-pictures.md)."""
        pixels = pixels.to(self.device, self.vae.dtype)
        if run is not None:
            latents = run(self.vae, pixels)
        else:
            encoded = self.vae.encode(pixels)
            # AutoencoderKL gives a distribution (take its mode, never a sample); TAESD gives latents.
            latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        return (latents.float() - self._shift) * self.vae.config.scaling_factor

    @no_grad
    def decode(self, latents, run: Callable | None = None):
        """Pixels in [-1, 1] from a clean latent; `run(vae, latents)`, where given, decodes instead
        (exactly in tiles, docs/large-pictures.md)."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self._shift
        if run is not None:
            return run(self.vae, latents)
        return self.vae.decode(latents, return_dict=False)[0]

    @property
    def _shift(self) -> float:
        return float(self.vae.config.get("shift_factor") or 0.0)


def plain_fitting(texts: Sequence[str], tokenizers: Sequence) -> list[str] | None:
    """The prompts' texts when none asks for a weight and each fits every tokenizer; else None."""
    texts = [prompts.plain(text) for text in texts]
    if any(text is None for text in texts):
        return None
    if any(len(ids) > tok.model_max_length for tok in tokenizers for ids in tok(texts).input_ids):
        return None
    return texts


def noise_schedule(family: type[Family], scheduler: str, config: Mapping, steps: int | None = None,
                   timesteps: Sequence[int] | None = None, spacing: str | None = None) -> Schedule:
    """The schedule of a family noised on discrete timesteps (SD 1.x, 2.x, SDXL): `scheduler` as
    `smd_cli.method.sampler` makes it; `renoise` is for flow-matching models."""
    from smd_cli.method.sampler import make_schedule

    if scheduler == "renoise":
        raise SmdError(f"scheduler renoise applies to flow-matching models (SD3); this one is {family.label}: use lcm")
    return make_schedule(scheduler, config, steps, timesteps, spacing)


def flow_schedule(family: type[Family], scheduler: str, config: Mapping, steps: int | None = None,
                  timesteps: Sequence[int] | None = None, spacing: str | None = None,
                  window: tuple[int, int] | None = None, *, flux_sigmas: bool = False) -> Schedule:
    """The schedule of a flow-matching family (docs/method.md §8): flow-matching Euler, which `lcm`
    (the scenes' default) and `euler` both name, or `renoise`: the same levels, with fresh noise after
    each step as LCM does (e* a new draw instead of the one implied by x_k), for distilled models.
    Their default step count is SD3's 28. With dynamic shifting (FLUX.1) the shift is the one for
    the token count of one view."""
    from smd_cli.method.sampler import make_schedule

    if scheduler == "ddim":
        raise SmdError(f"scheduler ddim does not apply to {family.label}, a flow-matching model; "
                       "use euler (its own sampler) or renoise")
    if spacing is not None:
        raise SmdError(f"timestep_spacing does not apply to {family.label}: its scheduler spaces its steps by "
                       "its shift")
    mu = None
    if config.get("use_dynamic_shifting"):
        tokens = (window[0] // 2) * (window[1] // 2) if window else int(config.get("base_image_seq_len", 256))
        mu = flux_shift(tokens, config)
    schedule = make_schedule("flow", config, steps, timesteps, mu=mu, flux_sigmas=flux_sigmas)
    if scheduler == "renoise":
        schedule.kind = "lcm"
    return schedule


def flux_shift(tokens: int, config: Mapping) -> float:
    """FLUX's resolution-dependent shift mu, linear in the image's token count between the
    config's base and max sequence lengths (as diffusers' FluxPipeline computes it)."""
    base, top = int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096))
    low, high = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    slope = (high - low) / (top - base)
    return tokens * slope + low - slope * base


def vae_factor(config: Mapping) -> int:
    """2 ** (number of blocks - 1): 8 for SD's VAE and for TAESD (docs/method.md §1; never hard-coded)."""
    blocks = config.get("block_out_channels") or config.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


def unet_granularity(config: Mapping, default: int) -> int:
    """A UNet's total downsampling, from its config (`default` where the config does not say): its
    inputs' sides must be multiples of this."""
    blocks = config.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if isinstance(blocks, (list, tuple)) and blocks else default


def check_unet_channels(model: str, config: Mapping) -> None:
    """A UNet family runs text-to-image UNets of 4 latent channels; an inpainting UNet takes 9."""
    channels = config.get("in_channels", 4)
    if channels != 4:
        raise ModelError(f"model '{model}': its UNet takes {channels} input channels (an inpainting or other "
                         "specialised UNet); smd needs a text-to-image UNet with 4, and inpaints with it by "
                         "painting layers over the picture (smd inpaint)")


def guidance_embedding(w, dim: int):
    """Sinusoidal embedding of the guidance scale for guidance-distilled UNets (LCM, `time_cond_proj_dim`)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
