"""Every benchmark on a GPU at the published sizes, on random weights with the real models' shapes.

No weights can be downloaded, so each family's denoiser, VAE and text encoders are built from its
configs with random values and saved in float16 as a local diffusers folder, with a TAESD-shaped
random AutoencoderTiny beside them: SD 1.5 (UNet about 860M parameters, CLIP ViT-L/14), SDXL
(UNet about 2.6B, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14), SD3.5 Medium (MMDiT 2.2B, both CLIPs;
T5 left out, as `text_encoder_3: none` runs it) and FLUX.1 dev scaled down in depth (its
transformer at full width with 4 + 8 of its 19 + 38 blocks, 2.6B; T5-XXL at full width with 2 of
its 24 layers). `benchmarks.run_all` runs on SD 1.5's and `benchmarks.families` (a 1024 x 1024
regional scene and the stream) on the others, with `--device cuda --size full --dtype float16`
(`--compile` adds torch.compile to SD 1.5's fast paths: over 100 s of compiling on an H100);
each table is written as a record to benchmarks/results/ (a file named after the GPU) as soon as it
is measured, and `python -m benchmarks.report` puts them in BENCHMARKS.md; options this script
does not take (`--beside`, `--results`) go to every benchmark. `--suite vae` decodes with an
SDXL-shaped autoencoder (float32) up to 8192 x 1024, one pass against exact tiles. `--suite views` runs instead
the view-layout sweep (`benchmarks.views`) on every family's weights and SD 1.5's panorama
against MultiDiffusion (`benchmarks.panorama`, 3072 x 512 and 1024 x 512). Random weights cost the same
time as trained ones (for the scaled-down FLUX, per block); the images are noise. `--dry-run`
builds the configs on the meta device (no memory for weights), counts parameters, checks the
tokenizer and prints the plan.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from benchmarks.common import REPO, quiet, scratch_dir, tests_on_path

UNET = dict(  # stable-diffusion-v1-5/unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
VAE = dict(  # stable-diffusion-v1-5/vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215)
TEXT = dict(  # openai/clip-vit-large-patch14's text model, as SD 1.5 ships it
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
    pad_token_id=1)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)
UNET_XL = dict(  # stabilityai/stable-diffusion-xl-base-1.0/unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32)
VAE_XL = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # decoded in float32, as SDXL's is
TEXT_2 = dict(  # laion/CLIP-ViT-bigG-14's text model, as SDXL ships it (with its projection)
    TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280)
SCHEDULER_XL = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, timestep_spacing="leading", interpolation_type="linear")
SD35 = dict(  # stabilityai/stable-diffusion-3.5-medium/transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
VAE_16 = dict(VAE, latent_channels=16, sample_size=1024, use_quant_conv=False,  # SD3's and FLUX's autoencoder
              use_post_quant_conv=False)
FLUX = dict(  # black-forest-labs/FLUX.1-dev's transformer at full width, 4 + 8 of its 19 + 38 blocks
    patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
T5 = dict(  # google/t5-v1_1-xxl's encoder at full width, 2 of its 24 layers
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, feed_forward_proj="gated-gelu",
    is_encoder_decoder=False, use_cache=False)
FAMILIES = ("sd", "sdxl", "sd3", "flux")
FOLDERS = {"sd": "sd15-random", "sdxl": "sdxl-random", "sd3": "sd35m-random", "flux": "flux-random"}
TAESDS = {"sd": "taesd-random", "sdxl": "taesd-random", "sd3": "taesd16-random", "flux": "taesd16-random"}
START_ID, END_ID = 49406, 49407  # CLIP's <|startoftext|> and <|endoftext|>
SEED = 0


def build_modules(family: str, *, empty: bool):
    """The family's UNet, VAE, text encoders and a TAESD from the configs; `empty` puts them on the
    meta device."""
    from contextlib import nullcontext

    from accelerate import init_empty_weights
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with init_empty_weights() if empty else nullcontext():
        if family == "sd":
            return {"unet": UNet2DConditionModel(**UNET), "vae": AutoencoderKL(**VAE),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT)), "taesd": AutoencoderTiny()}
        if family == "sdxl":
            return {"unet": UNet2DConditionModel(**UNET_XL), "vae": AutoencoderKL(**VAE_XL),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT)),
                    "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)), "taesd": AutoencoderTiny()}
        if family == "sd3":  # without T5, as `text_encoder_3: none` runs it
            return {"transformer": SD3Transformer2DModel(**SD35),
                    "vae": AutoencoderKL(**{**VAE_16, "scaling_factor": 1.5305, "shift_factor": 0.0609}),
                    "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT)),
                    "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2)),
                    "taesd": AutoencoderTiny(latent_channels=16)}
        return {"transformer": FluxTransformer2DModel(**FLUX),
                "vae": AutoencoderKL(**{**VAE_16, "scaling_factor": 0.3611, "shift_factor": 0.1159}),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT)), "text_encoder_2": T5EncoderModel(T5Config(**T5)),
                "taesd": AutoencoderTiny(latent_channels=16)}


def write_tokenizer(folder: Path):
    """A CLIPTokenizer with CLIP's vocabulary size and special-token ids.

    The tests' generator gives the byte alphabet and a few merged words; unused filler entries pad
    the vocabulary so that the end token sits where CLIP's does, at the last embedding row.
    """
    tests_on_path()
    from tinymodel import write_tokenizer as write_small
    from transformers import CLIPTokenizer

    write_small(folder)
    vocab = {token: i for token, i in json.loads((folder / "vocab.json").read_text()).items()
             if not token.startswith("<|")}
    vocab.update({f"<|unused{i}|>": i for i in range(len(vocab), START_ID)})
    vocab.update({"<|startoftext|>": START_ID, "<|endoftext|>": END_ID})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def check_tokenizer(tokenizer) -> str:
    """What a prompt becomes: ids start and end with CLIP's and stay within the embedding table."""
    ids = tokenizer("a photo of the sun", padding="max_length", max_length=77).input_ids
    if len(tokenizer) != TEXT["vocab_size"] or ids[0] != START_ID or max(ids) >= TEXT["vocab_size"]:
        raise SystemExit(f"tokenizer does not match CLIP's: {len(tokenizer)} entries, ids {ids[:8]}")
    return f"{len(tokenizer)} entries; 'a photo of the sun' -> {ids[:7]} ... ({len(ids)} ids)"


def save_model(folder: Path, device: str, family: str = "sd") -> tuple[Path, Path]:
    """Build the family's random weights on `device` (fast on a GPU) and save them in float16;
    returns the model and TAESD folders. An existing folder is reused."""
    import torch
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTokenizer

    model, taesd = folder / FOLDERS[family], folder / TAESDS[family]
    if (model / "model_index.json").is_file() and (taesd / "config.json").is_file():
        return model, taesd
    torch.manual_seed(SEED)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in half precision: SDXL's 3.4B parameters in 7 GB, not 14
    try:
        with torch.device(device):
            parts = build_modules(family, empty=False)
    finally:
        torch.set_default_dtype(default)
    with quiet():  # diffusers notes that no module of these asks to stay in float32
        parts = {name: module.to(torch.float16) for name, module in parts.items()}
    parts.pop("taesd").save_pretrained(taesd)
    words = scratch_dir()
    tokenizer = write_tokenizer(words)
    if family == "sd":
        pipe = StableDiffusionPipeline(**parts, tokenizer=tokenizer, scheduler=DDIMScheduler(**SCHEDULER),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "flux":
        tests_on_path()
        from tinymodel import tiny_t5_tokenizer

        pipe = FluxPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tiny_t5_tokenizer(),
                            scheduler=FlowMatchEulerDiscreteScheduler(
                                shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                base_image_seq_len=256, max_image_seq_len=4096))
    else:  # SDXL's and SD3's second tokenizer pads with "!"
        tokenizer_2 = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), model_max_length=77,
                                    pad_token="!")
        if family == "sd3":
            pipe = StableDiffusion3Pipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer_2, text_encoder_3=None,
                                            tokenizer_3=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
        else:
            pipe = StableDiffusionXLPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                             scheduler=EulerDiscreteScheduler(**SCHEDULER_XL),
                                             force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(model)
    del pipe, parts
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model, taesd


def run_argv(family: str, model: Path, taesd: Path, device: str, compile: bool = False) -> list[str]:
    """The family's benchmark arguments: full sizes in float16 (and, with `compile`, torch.compile
    for SD 1.5's fast paths)."""
    argv = ["--device", device, "--size", "full", "--dtype", "float16", "--model", str(model), "--vae", str(taesd)]
    if family != "sd":
        return argv + ["--family", family]
    return argv + (["--compile"] if compile else [])


BENCHMARKS = {"sd": "benchmarks.run_all", "sdxl": "benchmarks.families", "sd3": "benchmarks.families",
              "flux": "benchmarks.families"}
# SDXL's autoencoder (SD 1.5's shapes, decoding in float32) on panoramas up to 8192 x 1024, tiles of 1024.
VAE_SUITE = ["--size", "full", "--dtype", "float16", "--upcast", "--autoencoders", "shaped", "--tile", "1024",
             "--canvases", "2048x1024", "4096x1024", "8192x1024"]
VIEW_REPEATS = "2"  # timed runs of each layout: four families' sweeps fit in minutes on one GPU


def suite(name: str, family: str, model: Path, taesd: Path, device: str, compile: bool) -> list[tuple[str, list[str]]]:
    """(module, arguments) of each benchmark the suite runs on a family's folder (`regions` runs
    once over two families' folders, in `main`)."""
    if name == "regions":
        return []
    argv = run_argv(family, model, taesd, device, compile)
    if name == "all":
        return [(BENCHMARKS[family], argv)]
    full = ["--device", device, "--size", "full", "--dtype", "float16", "--model", str(model)]
    runs = [("benchmarks.views", [*full, "--family", family, "--repeats", VIEW_REPEATS])]
    if family == "sd":
        runs += [("benchmarks.panorama", [*full, "--repeats", VIEW_REPEATS]),
                 ("benchmarks.panorama", [*full, "--repeats", VIEW_REPEATS, "--canvas", "1024x512"])]
    return runs


def print_plan(folder: Path, device: str, families: tuple[str, ...], compile: bool, name: str,
               passed: list[str]) -> None:
    """Parameter counts from the meta device, the tokenizer check and the commands that would run."""
    for family in families:
        print(f"{family}:")
        for part, module in build_modules(family, empty=True).items():
            count = sum(p.numel() for p in module.parameters())
            print(f"  {part:15s} {type(module).__name__:28s} {count / 1e6:8.1f} M parameters, "
                  f"{2 * count / 2**30:.2f} GiB in float16")
    print(f"tokenizer         {check_tokenizer(write_tokenizer(scratch_dir()))}")
    print(f"\nplan: save the models under {folder}, then from {REPO}:")
    for family in families:
        for module, argv in suite(name, family, folder / FOLDERS[family], folder / TAESDS[family], device, compile):
            print(f"  python -m {module} {shlex.join(argv + passed)}")
    if name == "regions":
        argv = ["--device", device, "--size", "full", "--dtype", "float16", "--model", str(folder / FOLDERS["sd"]),
                "--vae", str(folder / TAESDS["sd"]), "--flux", str(folder / FOLDERS["flux"])]
        print(f"  python -m benchmarks.region_modes {shlex.join(argv + passed)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="count parameters and print the plan; no weights")
    parser.add_argument("--build-only", action="store_true", help="save the random models and stop")
    parser.add_argument("--family", choices=(*FAMILIES, "all"), default="all",
                        help="which family's weights to build and benchmark (default: all, SD 1.5 first)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the random models are saved and reused (default: a temporary folder)")
    parser.add_argument("--compile", action="store_true",
                        help="also time SD 1.5's fast paths under torch.compile (minutes of compiling on an H100)")
    parser.add_argument("--suite", choices=("all", "views", "regions", "vae"), default="all",
                        help="all: every benchmark (default); views: the view-layout sweep and SD 1.5's panoramas; "
                             "regions: attention against latent mode on SD 1.5 and FLUX.1 (builds both); vae: "
                             "an SDXL-shaped autoencoder decoding up to 8192 x 1024 in one pass and in tiles")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only with --build-only")
    args, passed = parser.parse_known_args(argv)
    folder = args.folder or scratch_dir()
    families = FAMILIES if args.family == "all" else (args.family,)
    if args.suite == "regions":
        families = ("sd", "flux")
    if args.suite == "vae":  # random weights built in the benchmark's own processes: no folder to save
        argv = [*VAE_SUITE, "--device", args.device, *passed]
        if args.dry_run:
            print(f"  python -m benchmarks.vae_tiles {shlex.join(argv)}")
            return
        import importlib

        importlib.import_module("benchmarks.vae_tiles").main(argv)
        return
    if args.dry_run:
        print_plan(folder, args.device, families, args.compile, args.suite, passed)
        return
    import importlib

    import torch

    if not args.build_only and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        raise SystemExit("benchmarks.gpu needs a CUDA GPU; use --dry-run (or --build-only) elsewhere")
    saved = {}
    for family in families:
        model, taesd = saved[family] = save_model(folder, args.device, family)
        if args.build_only:
            print(f"saved {model} and {taesd}")
            continue
        if args.suite == "regions":
            continue
        for module, argv in suite(args.suite, family, model, taesd, args.device, args.compile):
            importlib.import_module(module).main(argv + passed)
    if args.suite == "regions" and not args.build_only:
        (sd, taesd), (flux, _) = saved["sd"], saved["flux"]
        importlib.import_module("benchmarks.region_modes").main(
            ["--device", args.device, "--size", "full", "--dtype", "float16", "--model", str(sd), "--vae", str(taesd),
             "--flux", str(flux), *passed])


if __name__ == "__main__":
    main()
