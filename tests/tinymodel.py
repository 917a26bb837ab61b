"""Tiny random Stable Diffusion (1.x and XL) components, saved as a real local model folder.

No weights can be downloaded in tests, so every component is built from a small config with a
fixed seed and written with `save_pretrained`, and smd then loads it through its real loading code.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

BYTE_RANGES = [(ord("!"), ord("~")), (ord("¡"), ord("¬")), (ord("®"), ord("ÿ"))]
WORDS = ["a", "photo", "of", "the", "sun", "1girl", "1boy", "sky", "blue", "lake", "tree", "cat"]


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2's table)."""
    printable = [b for lo, hi in BYTE_RANGES for b in range(lo, hi + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer with the byte alphabet and merges for a handful of words."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            merged = left + right
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_tiny_pipeline(folder: Path, *, lcm_distilled: bool = False, seed: int = 0, vae_blocks: int = 2):
    """Build tiny random SD components, save them as a diffusers folder, return the folder.

    The VAE downscales by 2 ** (vae_blocks - 1): 2 by default, so that nothing may assume SD's 8.
    """
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = tiny_unet(cross_attention_dim=32, lcm_distilled=lcm_distilled)
    vae = tiny_vae(vae_blocks)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=1000,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                  model_max_length=77)
    scheduler = LCMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, timestep_spacing="leading", steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_unet(*, lcm_distilled: bool = False, **extra):
    """A tiny random UNet2DConditionModel (channels 8 and 16); `lcm_distilled` adds LCM's guidance
    embedding."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                time_cond_proj_dim=16 if lcm_distilled else None, **extra)


def tiny_vae(blocks: int, channels: int = 4, **extra):
    """A tiny random AutoencoderKL that downscales by 2 ** (blocks - 1), with `channels` latent
    channels (16 and no quant convs are SD3's and FLUX.1's shape)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,) * (blocks - 1) + (16,), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=channels, norm_num_groups=4,
                         sample_size=32, **extra)


def clip_tokenizers():
    """Two CLIP tokenizers of the tests' vocabulary, the second padding with "!" as SDXL's and
    SD3's second tokenizers do."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        vocab, merges = str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt")
        return (CLIPTokenizer(vocab, merges, model_max_length=77),
                CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="!"))


def _clip_config(hidden: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=hidden, intermediate_size=37,
                          layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                          vocab_size=1000, hidden_act="gelu", **extra)


def build_tiny_sdxl(folder: Path, *, seed: int = 0, vae_blocks: int = 2, lcm_distilled: bool = False) -> Path:
    """Tiny random SDXL components saved as a diffusers folder: a UNet with the `text_time`
    addition (pooled text and six size numbers), two CLIP text encoders, the second with a
    projection, their tokenizers, a VAE that downscales by 2 ** (vae_blocks - 1)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 size numbers x 8 + the pooled 32
        cross_attention_dim=80,  # both encoders' states side by side: 32 + 48
        lcm_distilled=lcm_distilled,
    )
    vae = tiny_vae(vae_blocks, scaling_factor=0.13025, force_upcast=True)  # as SDXL's
    text_encoder = CLIPTextModel(_clip_config(32))
    # Widths differ, as in SDXL (768 and 1280): single-file loading tells the encoders apart by width.
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(48, projection_dim=32))
    tokenizer, tokenizer_2 = clip_tokenizers()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="leading", steps_offset=1, interpolation_type="linear", prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_taesd(folder: Path, *, blocks: int = 2, seed: int = 0) -> Path:
    """A tiny random AutoencoderTiny (TAESD-shaped) whose downscale factor is 2 ** (blocks - 1)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8,) * blocks,
        decoder_block_out_channels=(8,) * blocks,
        num_encoder_blocks=(1,) * blocks,
        num_decoder_blocks=(1,) * blocks,
        latent_channels=4,
    )
    vae.save_pretrained(folder)
    return Path(folder)


T5_WORDS = "a photo of the sun moon cat dog tree lake river red ball blue sky large giant waterfall landscape"


def tiny_t5_tokenizer():
    """A T5 (SentencePiece Unigram) tokenizer made in code: a few words, the letters and digits,
    `</s>` appended, as T5's own does."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = (["\u2581" + w for w in T5_WORDS.split()] + ["\u2581"]
              + list(string.ascii_lowercase + string.digits + ",.!?'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -float(i)) for i, p in enumerate(pieces, 1)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def tiny_t5(d_model: int, vocab_size: int):
    """A tiny random T5 encoder of width `d_model`."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                   is_encoder_decoder=False, use_cache=False))


def build_tiny_sd3(folder: Path, *, seed: int = 0, vae_blocks: int = 2, t5: bool = False) -> Path:
    """Tiny random SD3 components saved as a diffusers folder: an MMDiT transformer (patch 2), two
    CLIP text encoders with projections, T5 (or, without `t5`, none: the CLIP encoders alone, as
    such folders say), their tokenizers, a flow-matching scheduler with SD3's shift, and a VAE with
    a shift factor."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64,  # both CLIPs' states side by side: 32 + 32
        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32)
    vae = tiny_vae(vae_blocks, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's
    text_encoder = CLIPTextModelWithProjection(_clip_config(32, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(32, projection_dim=32))
    tokenizer, tokenizer_2 = clip_tokenizers()
    tokenizer_3 = tiny_t5_tokenizer() if t5 else None
    text_encoder_3 = tiny_t5(64, len(tokenizer_3)) if t5 else None  # as wide as the joint attention
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(folder)
    if not t5:
        index = json.loads((folder / "model_index.json").read_text())  # say that T5 is left out, as
        index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])  # such folders on the hub do
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def build_tiny_flux(folder: Path, *, seed: int = 0, vae_blocks: int = 2, guidance: bool = False) -> Path:
    """Tiny random FLUX.1 components saved as a diffusers folder: a transformer over 2x2-packed
    latents (with the guidance embedding of dev, `guidance`, or without, as schnell), CLIP (pooled)
    and T5 (token states) text encoders with their tokenizers, and a flow-matching scheduler with
    FLUX's resolution-dependent shift."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(2, 2, 4))  # 4 latent channels x 2 x 2 per token; RoPE axes sum to the head width
    vae = tiny_vae(vae_blocks, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX's
    text_encoder = CLIPTextModel(_clip_config(32))
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = tiny_t5(32, len(tokenizer_2))
    tokenizer = clip_tokenizers()[0]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe.save_pretrained(folder)
    return folder


def write_tiny_lora(model: Path, folder: Path, *, seed: int = 0,
                    name: str = "pytorch_lora_weights.safetensors") -> Path:
    """A LoRA with non-zero weights for a tiny model's denoiser attention (a UNet's, or SD3's and
    FLUX's transformer's), saved as diffusers saves LoRAs; returns the file."""
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    index = json.loads((Path(model) / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    options = {"safety_checker": None} if "safety_checker" in index else {}
    if index.get("text_encoder_3", ["t5"])[0] is None:  # an SD3 folder without T5
        options.update(text_encoder_3=None, tokenizer_3=None)
    pipe = cls.from_pretrained(str(model), **options)
    denoiser, layers = (pipe.unet, "unet_lora_layers") if hasattr(pipe, "unet") else (pipe.transformer,
                                                                                         "transformer_lora_layers")
    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0"] if hasattr(pipe, "unet") else ["to_q", "to_k", "to_v"]
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    folder.mkdir(parents=True, exist_ok=True)
    cls.save_lora_weights(str(folder), weight_name=name, **{layers: get_peft_model_state_dict(denoiser)})
    return folder / name


def write_tiny_controlnet(model: Path, folder: Path, *, seed: int = 0) -> Path:
    """A ControlNet made from a tiny SD or SDXL model's UNet (as `ControlNetModel.from_unet` makes
    one; for FLUX.1, from its transformer), its zero layers given random weights so that it changes
    what it controls, and its image embedding downscaling as the model's VAE does; saved as a
    diffusers folder."""
    import math

    import torch
    from diffusers import ControlNetModel, FluxControlNetModel, FluxTransformer2DModel, UNet2DConditionModel

    if (Path(model) / "transformer").is_dir():  # FLUX.1: InstantX's kind, made as from_transformer makes one
        transformer = FluxTransformer2DModel.from_pretrained(str(Path(model) / "transformer"))
        c = transformer.config
        net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=c.attention_head_dim,
                                                   num_attention_heads=c.num_attention_heads)
        torch.manual_seed(seed)
        with torch.no_grad():
            for linear in [*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder]:
                linear.weight.normal_(0, 0.5 / math.sqrt(linear.weight.shape[1]))
        net.save_pretrained(str(folder))
        return folder
    unet = UNet2DConditionModel.from_pretrained(str(Path(model) / "unet"))
    vae = json.loads((Path(model) / "vae" / "config.json").read_text())
    steps = len(vae["block_out_channels"]) - 1  # the VAE's factor is 2 ** steps
    net = ControlNetModel.from_unet(unet,
                                    conditioning_embedding_out_channels=tuple(4 * 2 ** i for i in range(steps + 1)))
    torch.manual_seed(seed)
    zero = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero:
            conv.weight.normal_(0, 0.5 / math.sqrt(conv.weight[0].numel()))
            conv.bias.normal_(0, 0.01)
    net.save_pretrained(str(folder))
    return folder


def write_tiny_ip_adapter(model: Path, folder: Path, *, seed: int = 0) -> Path:
    """An IP-Adapter for a tiny SD or SDXL model's UNet (or FLUX.1's transformer), laid out as
    h94/IP-Adapter lays one out (the weights file, its CLIP image encoder in `image_encoder/`
    beside it), with random weights: the image projection to 4 tokens, and the key/value
    projections of every cross-attention, numbered as diffusers reads them. Returns the file."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8))
    encoder.save_pretrained(str(folder / "image_encoder"))
    g = torch.Generator().manual_seed(seed)
    flux = (Path(model) / "transformer").is_dir()
    if flux:  # XLabs' kind: the attention of every double-stream block
        c = json.loads((Path(model) / "transformer" / "config.json").read_text())
        cross, inner = c["joint_attention_dim"], c["num_attention_heads"] * c["attention_head_dim"]
        targets = [(str(block), inner) for block in range(c["num_layers"])]
    else:
        unet = UNet2DConditionModel.from_pretrained(str(Path(model) / "unet"))
        cross, channels = unet.config.cross_attention_dim, list(unet.config.block_out_channels)
        names = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
        sizes = [channels[-1] if name.startswith("mid_block") else channels[int(name.split(".")[1])]
                 if name.startswith("down_blocks") else channels[::-1][int(name.split(".")[1])] for name in names]
        targets = [(str(1 + 2 * i), size) for i, size in enumerate(sizes)]  # numbered 1, 3, 5, ...
    tensors = {"image_proj.proj.weight": torch.randn(4 * cross, 24, generator=g) * 0.2,
               "image_proj.proj.bias": torch.zeros(4 * cross), "image_proj.norm.weight": torch.ones(cross),
               "image_proj.norm.bias": torch.zeros(cross)}
    for key, hidden in targets:
        for which in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{key}.{which}.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
            if flux:
                tensors[f"ip_adapter.{key}.{which}.bias"] = torch.zeros(hidden)
    save_file(tensors, str(folder / "ip-adapter.safetensors"))
    return folder / "ip-adapter.safetensors"
