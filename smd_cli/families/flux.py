"""FLUX.1 (dev and schnell): a transformer over latents packed 2x2 into tokens, trained by flow
matching; CLIP's pooled embedding and T5's token states; dev embeds the guidance scale (no
unconditional pass), schnell takes none. Everything else (masks, views, aggregation) stays in the
unpacked latent grid: `_predict` packs just before the transformer and unpacks its velocity.

Positions (RoPE image ids): each (layer, view) row gets the positions of a picture of the view's
own size, from (0, 0), not its place on the canvas. A view is then exactly what the model sees when
it makes a picture that size, which keeps plain sampling (one view) equal to diffusers', and every
view equally far from the position range the model was trained on; views agree on their overlaps
through the averaging of clean estimates, as on SD. The shift mu is likewise the one for a view's
token count (`schedule(window=...)`): the noise level each view is denoised at is the one the model
expects for a picture of that size (docs/method.md §8).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from smd_cli.core.lazy import lazy, no_grad
from smd_cli.families.base import Conditioning, Family, Placement
from smd_cli.families.sd3 import row_timesteps, t5_lengths
from smd_cli.method import prompts

torch = lazy("torch")


class Flux(Family):
    name = "flux"
    label = "FLUX.1"
    pipeline = "FluxPipeline"
    native_size = 1024  # FluxPipeline's default: 128 latent pixels with FLUX's factor 8
    tiny_vae = "madebyollin/taef1"
    ip_adapter = "XLabs-AI/flux-ip-adapter/ip_adapter.safetensors"
    ip_adapter_encoder = "openai/clip-vit-large-patch14"  # XLabs' adapter reads this image encoder
    black_negative_reference = True  # as diffusers' FluxPipeline gives a negative IP-Adapter image
    flow = True
    flux_sigmas = True
    patched = True
    control_latents = True
    activation_bytes = 96 * 1024  # as SDXL's: a guess
    transformer_width = 24 * 128  # FLUX.1 dev and schnell
    denoiser_share = 0.70
    weight_bytes = 33_800_000_000  # FLUX.1: 11.9B transformer, 4.8B T5, 0.1B CLIP
    max_sequence_length = 512  # T5 tokens, as diffusers' FluxPipeline takes by default
    prompt_tokens = max_sequence_length  # T5's (CLIP gives only the pooled embedding)

    @staticmethod
    def matches(config: Mapping) -> bool:
        return "guidance_embeds" in config  # dev (True) or schnell (False)

    @classmethod
    def config_granularity(cls, config: Mapping) -> int:
        return 2  # latents are packed 2x2: canvases and views are multiples of 2 latent pixels

    @classmethod
    def config_native(cls, config: Mapping, factor: int) -> int:
        return 128 * factor

    @classmethod
    def guidance_distilled_config(cls, config: Mapping) -> bool:
        return bool(config.get("guidance_embeds"))

    def __init__(self, components, *, device, dtype):
        super().__init__(components, device=device, dtype=dtype)
        self.text_encoder_2, self.tokenizer_2 = components.text_encoder_2, components.tokenizer_2
        self._ids: dict[tuple[int, int], object] = {}

    @property
    def channels(self) -> int:
        return int(self.denoiser.config.in_channels) // 4

    def _image_ids(self, rows: int, cols: int):
        """RoPE positions (0, row, col) of a `rows` x `cols` token grid, made once per size: every
        view starts at (0, 0), as the module's docstring says why."""
        if (rows, cols) not in self._ids:
            r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
            ids = torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(-1, 3)
            self._ids[(rows, cols)] = ids.to(self.device, self.dtype)
        return self._ids[(rows, cols)]

    @no_grad
    def encode(self, texts: Sequence[str]) -> Conditioning:
        """As diffusers' `FluxPipeline.encode_prompt`: CLIP's pooled output and T5's states; prompts
        with weights go through compel, T5 reading its one sequence of 512 tokens and CLIP's pooled
        output the text without the weights."""
        texts = self.spelt(texts)
        plain = [prompts.plain(text) for text in texts]
        if any(p is None for p in plain):
            clip = self.reader(self.tokenizer, self.text_encoder, length=self.tokenizer.model_max_length)
            t5 = self.reader(self.tokenizer_2, self.text_encoder_2, length=self.max_sequence_length)
            return Conditioning(t5.states(texts).to(self.dtype), clip.pooled(texts).to(self.dtype))
        ids, _ = self.tokens(self.tokenizer, plain)  # T5 reads the whole prompt
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output
        t5 = self.tokenizer_2(plain, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                              return_tensors="pt").input_ids
        states = self.text_encoder_2(t5.to(self.device), output_hidden_states=False)[0]
        return Conditioning(states.to(self.dtype), pooled.to(self.dtype))

    def text_lengths(self, texts: Sequence[str]) -> list[int] | None:
        """T5's states up to its end token."""
        return t5_lengths(self.tokenizer_2, texts, self.max_sequence_length)

    def _predict(self, x, t, cond: Conditioning, guidance_scale: float = 1.0, placement: Placement | None = None):
        """The transformer's velocity for latents x [B, C, h, w] (float32, unpacked)."""
        b, c, h, w = x.shape
        t = row_timesteps(self, t, b)
        packed = pack(x).to(self.dtype)
        txt_ids = torch.zeros(cond.states.shape[1], 3, device=self.device, dtype=self.dtype)
        img_ids = self._image_ids(h // 2, w // 2)
        guidance = torch.full((b,), guidance_scale, device=self.device)
        control = None
        if cond.controls:  # FLUX.1 ControlNets (smd_cli.models.controls), on the rows they act on
            def run(net, rows, crops):
                blocks, singles = net(hidden_states=packed[rows], controlnet_cond=pack(crops), conditioning_scale=1.0,
                                      timestep=(t[rows] / 1000).to(self.dtype),
                                      guidance=guidance[rows] if net.config.guidance_embeds else None,
                                      pooled_projections=cond.pooled[rows], encoder_hidden_states=cond.states[rows],
                                      txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
                return list(blocks or []), list(singles or [])

            control = self.controlnets.residuals(x, t, cond, placement, run)
        attention = {}
        if self.references.adapter is not None:  # XLabs' IP-Adapter: an image for every row
            attention["ip_adapter_image_embeds"] = [self.references.inputs(cond.references or (None,) * b, b)]
        bias = cond.region_bias(x, t, placement, self.dtype)
        if bias is not None:  # attention mode: the layers' prompts kept to their regions (docs/method.md §10)
            attention["attention_mask"] = bias.joint((h // 2, w // 2), text_first=True)
        out = self.denoiser(hidden_states=packed, timestep=(t / 1000).to(self.dtype),
                            guidance=guidance if self.guidance_distilled else None, pooled_projections=cond.pooled,
                            encoder_hidden_states=cond.states, txt_ids=txt_ids, img_ids=img_ids,
                            joint_attention_kwargs=attention or None,
                            controlnet_block_samples=(control[0] or None) if control else None,
                            controlnet_single_block_samples=(control[1] or None) if control else None,
                            controlnet_blocks_repeat=self.controlnets.repeats, return_dict=False)[0].float()
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def pack(x):
    """FLUX's tokens: latents [B, C, h, w] packed 2x2 into [B, h/2 * w/2, 4C]."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
