"""Every benchmark on a GPU at the published sizes, on random weights with SD 1.5's shapes.

No weights can be downloaded, so the UNet (about 860M parameters), the VAE and the CLIP ViT-L/14
text encoder are built from Stable Diffusion 1.5's configs with random values, saved in float16
as a local diffusers folder with a TAESD-shaped random AutoencoderTiny beside it, and
`benchmarks.run_all` runs on them with `--device cuda --size full --dtype float16`. Random weights
cost the same time as trained ones; the images are noise. `--dry-run` builds the configs on the
meta device (no memory for weights), counts parameters, checks the tokenizer and prints the plan.
"""

from __future__ import annotations

import argparse
import json
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
START_ID, END_ID = 49406, 49407  # CLIP's <|startoftext|> and <|endoftext|>
SEED = 0


def build_modules(*, empty: bool):
    """UNet, VAE, text encoder and TAESD from the configs; `empty` puts them on the meta device."""
    from contextlib import nullcontext

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights() if empty else nullcontext():
        return {"unet": UNet2DConditionModel(**UNET), "vae": AutoencoderKL(**VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT)), "taesd": AutoencoderTiny()}


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


def save_model(folder: Path, device: str) -> tuple[Path, Path]:
    """Build random weights on `device` (fast on a GPU) and save them in float16; returns the model
    and TAESD folders. An existing folder is reused."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    model, taesd = folder / "sd15-random", folder / "taesd-random"
    if (model / "model_index.json").is_file() and (taesd / "config.json").is_file():
        return model, taesd
    torch.manual_seed(SEED)
    with torch.device(device):
        parts = build_modules(empty=False)
    with quiet():  # diffusers notes that no module of these asks to stay in float32
        parts = {name: module.to(torch.float16) for name, module in parts.items()}
    parts.pop("taesd").save_pretrained(taesd)
    pipe = StableDiffusionPipeline(**parts, tokenizer=write_tokenizer(scratch_dir()),
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(model)
    del pipe, parts
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model, taesd


def run_all_argv(model: Path, taesd: Path, device: str) -> list[str]:
    return ["--device", device, "--size", "full", "--dtype", "float16", "--model", str(model), "--vae", str(taesd),
            "--compile"]


def print_plan(folder: Path, device: str) -> None:
    """Parameter counts from the meta device, the tokenizer check and the command that would run."""
    parts = build_modules(empty=True)
    for name, module in parts.items():
        count = sum(p.numel() for p in module.parameters())
        print(f"{name:13s} {type(module).__name__:22s} {count / 1e6:8.1f} M parameters, "
              f"{2 * count / 2**30:.2f} GiB in float16")
    print(f"tokenizer     {check_tokenizer(write_tokenizer(scratch_dir()))}")
    argv = run_all_argv(folder / "sd15-random", folder / "taesd-random", device)
    print(f"\nplan: save the model under {folder}, then from {REPO}:\n  python -m benchmarks.run_all {' '.join(argv)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="count parameters and print the plan; no weights")
    parser.add_argument("--build-only", action="store_true", help="save the random model and stop")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the random model is saved and reused (default: a temporary folder)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only with --build-only")
    args = parser.parse_args(argv)
    folder = args.folder or scratch_dir()
    if args.dry_run:
        print_plan(folder, args.device)
        return
    import torch

    if not args.build_only and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        raise SystemExit("benchmarks.gpu needs a CUDA GPU; use --dry-run (or --build-only) elsewhere")
    model, taesd = save_model(folder, args.device)
    if args.build_only:
        print(f"saved {model} and {taesd}")
        return
    from benchmarks import run_all

    run_all.main(run_all_argv(model, taesd, args.device))


if __name__ == "__main__":
    main()
