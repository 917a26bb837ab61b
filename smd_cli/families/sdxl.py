"""SDXL: two CLIP text encoders whose penultimate token states are joined side by side, the
second's projected end token as a pooled embedding, and a UNet that also takes that pooled
embedding and six sizes (`add_time_ids`: original size, crop top-left, target size, in pixels).

Placement (the choice, and why): SDXL was trained on crops of larger pictures and told where each
crop lay. A view of a large canvas is exactly such a crop, so each (layer, view) row gets original
size = the canvas, crop = its window's top-left, target = its window. For a canvas within one view
this is diffusers' default (the canvas, (0, 0), the canvas), so plain sampling conforms; for views
it tells the model that a view is part of a larger picture, which is the conditioning SDXL learnt
for the edges of a crop.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from smd_cli.core.errors import ModelError
from smd_cli.core.lazy import lazy, no_grad
from smd_cli.families.base import (
    Conditioning,
    Family,
    Placement,
    check_unet_channels,
    plain_fitting,
    unet_granularity,
)
from smd_cli.families.sd import unet_prediction

torch = lazy("torch")


class StableDiffusionXL(Family):
    name = "sdxl"
    label = "SDXL"
    pipeline = "StableDiffusionXLPipeline"
    native_size = 1024
    tiny_vae = "madebyollin/taesdxl"
    lcm_lora = "latent-consistency/lcm-lora-sdxl"
    lcm_lora_width = 2048  # both encoders' 768 + 1280, side by side
    ip_adapter = "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"
    reads_embeddings = True
    versions = ("xl", "sdxl")
    activation_bytes = 96 * 1024  # measured: SDXL at 1024x1024
    denoiser_share = 0.74
    weight_bytes = 6_940_000_000

    @staticmethod
    def matches(config: Mapping) -> bool:
        return config.get("addition_embed_type") == "text_time"

    @staticmethod
    def matches_checkpoint(keys: frozenset[str]) -> bool:  # the second text encoder's weights
        return any(k.startswith("conditioner.embedders.1.") for k in keys)

    @classmethod
    def config_granularity(cls, config: Mapping) -> int:
        return unet_granularity(config, 4)

    @classmethod
    def check(cls, model: str, config: Mapping, *, has_text_encoder: bool = True) -> None:
        check_unet_channels(model, config)
        if not has_text_encoder:  # the refiner has only the second encoder
            raise ModelError(f"model '{model}' is an SDXL refiner, which smd does not run; use an SDXL base model "
                             "or a fine-tune of one")

    def __init__(self, components, *, device, dtype):
        super().__init__(components, device=device, dtype=dtype)
        self.text_encoder_2, self.tokenizer_2 = components.text_encoder_2, components.tokenizer_2
        self.zero_empty_negative = components.force_zeros_for_empty_prompt
        self._empty: Conditioning | None = None

    @no_grad
    def encode(self, texts: Sequence[str]) -> Conditioning:
        """Both encoders' penultimate token states, side by side, and the second's pooled
        embedding, as diffusers' `StableDiffusionXLPipeline.encode_prompt` makes them; weighted and
        long prompts through `smd_cli.method.prompts`, as on SD 1.x (the pooled embedding from the
        first chunk, without weights)."""
        texts = self.spelt(texts)
        plain = plain_fitting(texts, [self.tokenizer, self.tokenizer_2])
        if plain is not None:
            return self.encode_plain(plain)
        first = self.reader(self.tokenizer, self.text_encoder, penultimate=True)
        second = self.reader(self.tokenizer_2, self.text_encoder_2, penultimate=True)
        states_1 = first.states(texts)
        states_2 = second.states(texts, chunks=states_1.shape[1] // first.chunk)
        if states_2.shape[1] > states_1.shape[1]:  # the tokenizers split the prompt differently
            states_1 = first.states(texts, chunks=states_2.shape[1] // first.chunk)
        filler = torch.cat([first.empty, second.empty], dim=-1)
        return Conditioning(torch.cat([states_1, states_2], dim=-1).to(self.dtype),
                            second.pooled(texts).to(self.dtype), filler.to(self.dtype))

    def encode_plain(self, texts: Sequence[str]) -> Conditioning:
        """The conditioning of texts taken as they are (no weights, no chunks)."""
        states = []
        pooled = None
        for tok, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids, _ = self.tokens(tok, texts)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected end token
        return Conditioning(torch.cat(states, dim=-1).to(self.dtype), pooled.to(self.dtype))

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

    def embedding_encoders(self):
        return [(self.tokenizer, self.text_encoder, "clip_l"), (self.tokenizer_2, self.text_encoder_2, "clip_g")]

    def _predict(self, x, t, cond: Conditioning, guidance_scale: float = 1.0, placement: Placement | None = None):
        h, w = x.shape[-2:]
        canvas, corners = (placement.canvas, placement.corners) if placement else ((h, w), [(0, 0)] * len(x))
        f = self.factor
        sizes = [[canvas[0] * f, canvas[1] * f, top * f, left * f, h * f, w * f] for top, left in corners]
        added = {"text_embeds": cond.pooled, "time_ids": torch.tensor(sizes, device=self.device, dtype=self.dtype)}
        return unet_prediction(self, x, t, cond, guidance_scale, placement, added)
