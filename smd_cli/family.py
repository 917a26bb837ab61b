"""Model families: what the region sampler needs to know of a model, and nothing more.

The step (SPEC 3) never looks inside a model, and neither do the input preparation (SPEC 2) or
the stream (SPEC 6). A family is one small adapter that answers five questions:

1. Prompts. `encode(texts) -> Conditioning`: the text conditioning of each prompt, as rows
   that can be selected (`cond[index]`), concatenated (`Conditioning.cat`) and mixed toward the
   background prompt's by prompt strength (`cond.mix(background, w)`, SPEC 2.1).
2. The denoiser. `predict(x, t, cond, guidance_scale) -> eps`: the noise in latents `x` [B, C, h, w]
   at timestep(s) `t`, row i under conditioning row i, always as a noise prediction in the
   family's noising (a v-predicting or flow model converts). `guidance_distilled` says whether the
   denoiser takes the guidance scale as an input, in which case classifier-free guidance never
   runs an unconditional pass (`runs_unconditional`, the one rule for every caller).
3. The latent layout. `channels`, `factor` (the VAE's downscale factor, SPEC 1), `native_size`
   (pixels: the window of one view, SPEC 5) and `granularity` (latent pixels a denoiser input must
   be a multiple of).
4. The noising. `schedule(scheduler, steps, timesteps) -> Schedule`: t_k, alpha_k and sigma_k
   such that x_k = alpha_k x0 + sigma_k eps, and the transition after each step.
5. Pictures. `encode_image(pixels) -> latent` (the distribution's mode, scaled, SPEC 2.3) and
   `decode(latent) -> pixels`, both in [-1, 1].

`StableDiffusion` (SD 1.x and 2.x) is the one family so far. The others are meant to answer the
same five: an SDXL adapter would add a second text encoder (a pooled row beside the token states
in `Conditioning`) and per-row micro-conditioning; a flow-matching transformer (SD3, FLUX) would
set alpha_k = 1 - s_k, sigma_k = s_k and turn its predicted velocity into noise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from smd_cli.models import guidance_distilled, vae_factor
from smd_cli.sampler import Schedule, make_schedule


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the text encoder's limit was cut."""


def runs_unconditional(guidance_scale: float, unet_config: Mapping) -> bool:
    """Whether classifier-free guidance runs an unconditional pass: only above 1, and never for a
    guidance-distilled denoiser, which takes the scale as an embedding (SPEC 3.3)."""
    return guidance_scale > 1.0 and not guidance_distilled(unet_config)


@dataclass
class Conditioning:
    """Text conditioning, one row per prompt: the encoder's token states [N, tokens, D]."""

    states: torch.Tensor

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index: Any) -> "Conditioning":
        return Conditioning(self.states[index])

    def mix(self, background: "Conditioning", w: Sequence[float]) -> "Conditioning":
        """E_p = E_bg + w_p (E_p - E_bg) for each row p (SPEC 2.1); `background` is one row."""
        weights = torch.tensor(list(w), device=self.states.device, dtype=self.states.dtype).view(-1, 1, 1)
        return Conditioning(background.states + weights * (self.states - background.states))

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        return Conditioning(torch.cat([p.states for p in parts]))


class StableDiffusion:
    """SD 1.x and 2.x: a CLIP text encoder, a `UNet2DConditionModel` predicting noise (or v), an
    `AutoencoderKL` (or TAESD), and variance-preserving noising on discrete timesteps."""

    def __init__(self, *, unet, vae, text_encoder, tokenizer, scheduler_config: Mapping, device: torch.device,
                 dtype: torch.dtype):
        from diffusers import LCMScheduler

        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.device, self.dtype = device, dtype
        # The noise levels of the model's training; LCM's is the scheduler smd starts from.
        self.scheduler = LCMScheduler.from_config(scheduler_config)

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
    def granularity(self) -> int:
        """The UNet's total downsampling: its inputs' sides must be multiples of this."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def guidance_distilled(self) -> bool:
        return guidance_distilled(self.unet.config)

    # Prompts.

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Conditioning:
        """CLIP token states padded to the tokenizer's length; longer prompts, positive or negative,
        are cut with a warning naming what was cut (SPEC 2.1)."""
        tok, limit = self.tokenizer, self.tokenizer.model_max_length
        texts = list(texts)
        batch = tok(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        for full in tok(texts).input_ids:
            if len(full) > limit:  # truncation keeps the first limit - 1 tokens and the end token
                warnings.warn(f"prompt longer than the text encoder's {limit} tokens; cut: "
                              f"{tok.decode(full[limit - 1:-1])!r}", PromptTruncatedWarning, stacklevel=4)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = batch.attention_mask.to(self.device)
        states = self.text_encoder(batch.input_ids.to(self.device), attention_mask=mask)[0]
        return Conditioning(states.to(self.dtype))

    # The denoiser.

    @torch.no_grad()
    def predict(self, x: torch.Tensor, t: float | torch.Tensor, cond: Conditioning,
                guidance_scale: float = 1.0) -> torch.Tensor:
        """The UNet's noise prediction (float32). Guidance-distilled UNets get `guidance_scale` as
        an embedding (SPEC 3.3); v-prediction is converted to noise with eps = sigma * x + alpha * v."""
        cfg = self.unet.config
        tc = None
        if self.guidance_distilled:
            w = torch.tensor([guidance_scale - 1.0], dtype=torch.float32)
            tc = guidance_embedding(w, cfg.time_cond_proj_dim).to(self.device, self.dtype).expand(len(x), -1)
        if not isinstance(t, torch.Tensor):  # a tensor, so that a compiled UNet is not specialised on each t
            t = torch.tensor(t, dtype=torch.float32, device=self.device)
        out = self.unet(x.to(self.dtype), t, encoder_hidden_states=cond.states, timestep_cond=tc,
                        return_dict=False)[0].float()
        if self.scheduler.config.prediction_type == "v_prediction":
            abar = self.scheduler.alphas_cumprod.to(out.device)[torch.as_tensor(t, device=out.device).long()]
            a = abar.sqrt().reshape(-1, 1, 1, 1)
            out = (1 - abar).sqrt().reshape(-1, 1, 1, 1) * x.float() + a * out
        return out

    # The noising.

    def schedule(self, scheduler: str, steps: int | None = None, timesteps: Sequence[int] | None = None) -> Schedule:
        return make_schedule(scheduler, self.scheduler.config, steps, timesteps)

    # Pictures.

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE latent of pixels [B, 3, H, W] in [-1, 1]: the distribution's mode, scaled (SPEC 2.3)."""
        encoded = self.vae.encode(pixels.to(self.device, self.vae.dtype))
        # AutoencoderKL gives a distribution (take its mode, never a sample); TAESD gives latents.
        latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] from a clean latent."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]


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
