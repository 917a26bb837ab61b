"""Stable Diffusion 1.x and 2.x: a CLIP text encoder, a `UNet2DConditionModel` predicting noise (or
v), an `AutoencoderKL` (or TAESD), and variance-preserving noising on discrete timesteps."""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

from smd_cli.core.lazy import lazy, no_grad
from smd_cli.families.base import (
    Conditioning,
    Family,
    Placement,
    check_unet_channels,
    guidance_embedding,
    plain_fitting,
    unet_granularity,
)

torch = lazy("torch")


class StableDiffusion(Family):
    name = "sd"
    label = "SD 1.x/2.x"
    pipeline = "StableDiffusionPipeline"
    native_size = 512
    tiny_vae = "madebyollin/taesd"
    lcm_lora = "latent-consistency/lcm-lora-sdv1-5"
    lcm_lora_width = 768  # CLIP ViT-L/14's width: SD 1.x (SD 2.x's 1024 takes no LCM LoRA here)
    ip_adapter = "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"
    reads_embeddings = True
    versions = ("1", "1.4", "1.5", "2", "2.0", "2.1")
    activation_bytes = 64 * 1024  # measured: SD 1.5 at 512x512, attention by SDPA
    denoiser_share = 0.81
    weight_bytes = 2_130_000_000

    @staticmethod
    def matches(config: Mapping) -> bool:
        return "caption_projection_dim" not in config and "guidance_embeds" not in config \
            and config.get("addition_embed_type") != "text_time"

    @staticmethod
    def matches_checkpoint(keys: frozenset[str]) -> bool:  # SDXL's hold these too, and a second text encoder
        return any(k.startswith("model.diffusion_model.") for k in keys) \
            and not any(k.startswith("conditioner.embedders.1.") for k in keys)

    @classmethod
    def config_granularity(cls, config: Mapping) -> int:
        return unet_granularity(config, 8)

    @classmethod
    def check(cls, model: str, config: Mapping, *, has_text_encoder: bool = True) -> None:
        check_unet_channels(model, config)

    @no_grad
    def encode(self, texts: Sequence[str]) -> Conditioning:
        """CLIP token states, as diffusers' pipelines make them for plain prompts that fit the
        tokenizer; prompts with weights or past its length go through `smd_cli.method.prompts`
        (weighted, in chunks), the batch then padded with the empty prompt's chunk to its longest row."""
        texts = self.spelt(texts)
        plain = plain_fitting(texts, [self.tokenizer])
        if plain is not None:
            return self.encode_plain(plain)
        reader = self.reader(self.tokenizer, self.text_encoder)
        return Conditioning(reader.states(texts).to(self.dtype), filler=reader.empty.to(self.dtype))

    def encode_plain(self, texts: Sequence[str]) -> Conditioning:
        """The conditioning of texts taken as they are (no weights, no chunks)."""
        ids, mask = self.tokens(self.tokenizer, texts)
        if not getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = None
        return Conditioning(self.text_encoder(ids, attention_mask=mask)[0].to(self.dtype))

    def embedding_encoders(self):
        return [(self.tokenizer, self.text_encoder, None)]

    def _predict(self, x, t, cond: Conditioning, guidance_scale: float = 1.0, placement: Placement | None = None):
        return unet_prediction(self, x, t, cond, guidance_scale, placement, None)


def unet_prediction(model: Family, x, t, cond: Conditioning, guidance_scale: float, placement: Placement | None,
                    added: dict | None):
    """A UNet's noise prediction (float32) with its inputs beside the token states (`added`, SDXL's).
    Guidance-distilled UNets get `guidance_scale` as an embedding (docs/method.md §3.3); v-prediction
    is converted to noise with eps = sigma * x + alpha * v."""
    net = model.denoiser
    tc = None
    if model.guidance_distilled:
        w = torch.tensor([guidance_scale - 1.0], dtype=torch.float32)
        tc = guidance_embedding(w, net.config.time_cond_proj_dim).to(model.device, model.dtype).expand(len(x), -1)
    if not isinstance(t, torch.Tensor):  # a tensor, so that a compiled UNet is not specialised on each t
        t = torch.tensor(t, dtype=torch.float32, device=model.device)
    control = None
    if cond.controls:
        def run(controlnet, rows, crops):
            part = None if added is None else {k: v[rows] for k, v in added.items()}
            times = t.reshape(-1).expand(len(x)) if t.numel() == 1 else t.reshape(-1)
            down, mid = controlnet(x[rows].to(model.dtype), times[rows], encoder_hidden_states=cond.states[rows],
                                   controlnet_cond=crops, conditioning_scale=1.0, added_cond_kwargs=part,
                                   return_dict=False)
            return list(down), [mid]

        control = model.controlnets.residuals(x, t, cond, placement, run)
    if model.references.adapter is not None:  # an IP-Adapter in the UNet wants an image for every row
        refs = cond.references or (None,) * len(x)
        added = {**(added or {}), "image_embeds": [model.references.inputs(refs, len(x))]}
    regions = contextlib.nullcontext()
    bias = cond.region_bias(x, t, placement, model.dtype)
    if bias is not None:  # attention mode: the layers' prompts kept to their regions (docs/method.md §10)
        from smd_cli.method.regions import install

        regions = install(net, "cross").active(bias)
    with regions:
        out = net(x.to(model.dtype), t, encoder_hidden_states=cond.states, timestep_cond=tc,
                  added_cond_kwargs=added, down_block_additional_residuals=control and control[0],
                  mid_block_additional_residual=control and control[1][0], return_dict=False)[0].float()
    if model.scheduler.config.prediction_type == "v_prediction":
        abar = model.scheduler.alphas_cumprod.to(out.device)[torch.as_tensor(t, device=out.device).long()]
        a = abar.sqrt().reshape(-1, 1, 1, 1)
        out = (1 - abar).sqrt().reshape(-1, 1, 1, 1) * x.float() + a * out
    return out
