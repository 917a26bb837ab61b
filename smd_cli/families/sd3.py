"""SD3 (3.0 and 3.5): an MMDiT transformer with joint attention over the text and image tokens,
trained by flow matching; two CLIP encoders (penultimate states side by side, padded to the joint
width; pooled embeddings joined) and T5's states after them, or zeros of T5's length where T5 is
left out.

The noising is x_s = (1 - s) x0 + s e and the transformer predicts the velocity v = e - x0; this
family returns v, and its schedules say so (`Schedule.prediction == "flow"`), so the clean estimate
of a (layer, view) pair is x0_p = x_p - s_k v_p and the rest of docs/method.md §3 is unchanged with
alpha_k = 1 - s_k, sigma_k = s_k (docs/method.md §8). Positions: the transformer crops its position
embedding around the centre for the size it is given, so a view is denoised with the positions of a
picture of its own size; the canvas is one view for plain sampling, which then equals diffusers'.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

from smd_cli.core.errors import SmdError
from smd_cli.core.lazy import lazy, no_grad
from smd_cli.families.base import Conditioning, Family, Placement
from smd_cli.method import prompts

torch = lazy("torch")


class StableDiffusion3(Family):
    name = "sd3"
    label = "SD3"
    pipeline = "StableDiffusion3Pipeline"
    native_size = 1024
    tiny_vae = "madebyollin/taesd3"
    flow = True
    patched = True
    controls = False
    versions = ("3", "3.5", "sd3")
    activation_bytes = 96 * 1024  # as SDXL's: a guess
    transformer_width = 38 * 64  # SD3.5 Large
    denoiser_share = 0.59
    weight_bytes = 27_500_000_000  # SD3.5 Large: 8.1B transformer, 4.8B T5, 0.8B CLIPs
    max_sequence_length = 256  # T5 tokens, as diffusers' StableDiffusion3Pipeline takes by default
    prompt_tokens = 77 + max_sequence_length  # CLIP's, then T5's

    @staticmethod
    def matches(config: Mapping) -> bool:
        return "caption_projection_dim" in config

    @classmethod
    def config_granularity(cls, config: Mapping) -> int:
        return int(config.get("patch_size", 2))

    @classmethod
    def guidance_distilled_config(cls, config: Mapping) -> bool:
        return False

    def __init__(self, components, *, device, dtype):
        super().__init__(components, device=device, dtype=dtype)
        self.text_encoder_2, self.tokenizer_2 = components.text_encoder_2, components.tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = components.text_encoder_3, components.tokenizer_3

    @no_grad
    def encode(self, texts: Sequence[str]) -> Conditioning:
        """As diffusers' `StableDiffusion3Pipeline.encode_prompt` makes the conditioning; prompts
        with weights go through compel, each encoder reading the one sequence diffusers reads (CLIP's
        77 tokens, T5's 256). Without T5 a prompt longer than CLIP's limit would lose its end: that
        is refused, not cut."""
        texts = self.spelt(texts)
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
                reader = self.reader(tok, encoder, penultimate=True, length=tok.model_max_length)
                states.append(reader.states(texts))
                pooled.append(reader.pooled(texts))
                continue
            ids, _ = self.tokens(tok, plain, warn=encoder is self.text_encoder)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        width = int(self.denoiser.config.joint_attention_dim)
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(texts), self.max_sequence_length, width, device=self.device, dtype=clip.dtype)
        elif weighted:
            t5 = self.reader(self.tokenizer_3, self.text_encoder_3, length=self.max_sequence_length).states(texts)
        else:
            ids = self.tokenizer_3(plain, padding="max_length", max_length=self.max_sequence_length,
                                   truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text_encoder_3(ids.to(self.device))[0]
        return Conditioning(torch.cat([clip.to(self.dtype), t5.to(self.dtype)], dim=-2),
                            torch.cat(pooled, dim=-1).to(self.dtype))

    def text_lengths(self, texts: Sequence[str]) -> list[int] | None:
        """CLIP's 77 states, then T5's up to its end token (zeros of nothing where T5 is left out)."""
        clip = self.tokenizer.model_max_length
        if self.text_encoder_3 is None:
            return [clip] * len(texts)
        return [clip + n for n in t5_lengths(self.tokenizer_3, texts, self.max_sequence_length)]

    def _predict(self, x, t, cond: Conditioning, guidance_scale: float = 1.0, placement: Placement | None = None):
        """The transformer's velocity prediction (float32) at timestep t = 1000 s."""
        regions = contextlib.nullcontext()
        bias = cond.region_bias(x, t, placement, self.dtype)
        if bias is not None:  # attention mode: the layers' prompts kept to their regions (docs/method.md §10)
            from smd_cli.method.regions import install

            regions = install(self.denoiser, "joint", self.granularity).active(bias)
        with regions:
            return self.denoiser(hidden_states=x.to(self.dtype), timestep=row_timesteps(self, t, len(x)),
                                 encoder_hidden_states=cond.states, pooled_projections=cond.pooled,
                                 return_dict=False)[0].float()


def t5_lengths(tokenizer, texts: Sequence[str], limit: int) -> list[int]:
    """T5 tokens of each text (weights left out), its end token included, at most `limit`."""
    readable = [prompts.plain(text) or "".join(f for f, _ in prompts.parse(text)) for text in texts]
    return [min(len(ids), limit) for ids in tokenizer(readable).input_ids]


def row_timesteps(model: Family, t, batch: int):
    """One timestep per row, on the device: a transformer takes them as a [B] tensor."""
    t = torch.as_tensor(t, dtype=torch.float32).to(model.device)
    return t.reshape(-1).expand(batch) if t.numel() == 1 else t
