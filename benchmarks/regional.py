"""Regional generation: smd as shipped against the naive MultiDiffusion region-based baseline.

The scene is irworobongdo (1920 x 768, 8 layers over a background: the paper's "from an hour to a
minute" example), read from ../shared/reference-scenes when present, else 8 rectangles and
ellipses in its layout. Both runs use smd's own pipeline code; the baseline switches it to the
original MultiDiffusion: DDIM 50 steps, guidance 7.5 (an unconditional half per pair), one UNet
call per layer per view (`max_batch=1`) and no skipping of layers absent from a view
(`skip_empty=False`). `--size cpu` shrinks the canvas and the tile by 8.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from benchmarks.common import (
    REFERENCE,
    REPO,
    SHAPES,
    base_parser,
    comparison_notes,
    comparison_rows,
    finish_args,
    fresh_pipeline,
    measure,
    model_summary,
    quiet,
    record,
    scratch_dir,
    warm_up,
)

# The published scene (reference-scenes/README.md).
PROMPTS = ["summer mountains", "the sun", "the moon", "a giant waterfall", "a giant waterfall",
           "clean deep blue lake", "a large tree", "a large tree"]
BACKGROUND = "clear deep blue sky"
NEGATIVE_PREFIX = "worst quality, bad quality, normal quality, cropped, framed"
BOOTSTRAP_STEPS = 2
BASELINE = dict(scheduler="ddim", num_inference_steps=50, guidance_scale=7.5, max_batch=1, skip_empty=False)


@dataclass(frozen=True)
class Size:
    height: int
    width: int
    tile_size: int  # pixels


SIZES = {"cpu": Size(96, 240, 96), "full": Size(768, 1920, 768)}


def scene_yaml() -> tuple[str, str]:
    """The scene as smd YAML, and where its masks come from."""
    folder = REFERENCE / "irworobongdo"
    if folder.is_dir():
        masks = [str(folder / f"irworobongdo_{i}.png") for i in range(1, len(PROMPTS) + 1)]
        source = f"published masks from {os.path.relpath(folder, REPO)}"
    else:
        masks = [f"{{{kind}: {list(box)}}}" for kind, box in SHAPES]
        source = "8 rectangles and ellipses in its layout (reference scenes not found)"
    layers = "".join(f"  - {{prompt: {p!r}, mask: {m}}}\n" for p, m in zip(PROMPTS, masks, strict=True))
    text = (f"bootstrap: {{steps: {BOOTSTRAP_STEPS}}}\nnegative_prefix: {NEGATIVE_PREFIX!r}\n"
            f"background: {{prompt: {BACKGROUND!r}}}\nlayers:\n{layers}")
    return text, source


def scene_inputs(size: Size) -> tuple[dict, str]:
    """`StableMultiDiffusionPipeline.__call__` arguments for the scene, masks loaded by smd's scene code."""
    from smd_cli.scenes.canvas import scene_masks
    from smd_cli.scenes.scene import load_scene

    text, source = scene_yaml()
    path = scratch_dir() / "irworobongdo.yaml"
    path.write_text(text)
    scene = load_scene(path)
    masks = scene_masks(scene, size.width, size.height).masks
    s = scene.scene
    inputs = dict(prompts=[layer.prompt for layer in s.layers],
                  negative_prompts=[layer.negative_prompt for layer in s.layers], masks=masks,
                  background_prompt=s.background.prompt, negative_prompt_prefix=s.negative_prefix,
                  bootstrap_steps=s.bootstrap.steps, height=size.height, width=size.width,
                  tile_size=size.tile_size, output_type="np")
    return inputs, source


def layer_count(masks) -> str:
    """How many prompts the sampler sees: the layers, plus the background where they leave a gap."""
    from smd_cli.method.masks import background_mask

    return f"{len(masks)} layers" + (" + background" if background_mask(masks).max() > 0 else "")


def run(pipe, inputs: dict, seed: int, device, **options):
    """One timed generation on a pipeline with empty caches."""
    import torch

    pipe = fresh_pipeline(pipe)
    generator = torch.Generator("cpu").manual_seed(seed)
    return measure(lambda: pipe(generator=generator, **inputs, **options), pipe.unet, device)


def main(argv=None) -> str:
    from smd_cli import StableMultiDiffusionPipeline

    args = finish_args(base_parser(__doc__.splitlines()[0]).parse_args(argv))
    size = SIZES[args.size]
    inputs, source = scene_inputs(size)
    pipe = StableMultiDiffusionPipeline(args.device, hf_key=args.model, dtype=args.dtype, lcm_lora="none")
    window = size.tile_size // pipe.vae_scale_factor
    warm_up(pipe.unet, (min(window, size.height // pipe.vae_scale_factor), window))
    with quiet():
        smd = run(pipe, inputs, args.seed, args.device)
        baseline = run(pipe, inputs, args.seed, args.device, **BASELINE)
    rows = comparison_rows(("smd: LCM 5 steps, guidance 1, batched, empty pairs skipped", smd),
                           ("MultiDiffusion: DDIM 50 steps, guidance 7.5, 1 layer x view per call, none skipped",
                            baseline))
    notes = [f"{size.width}x{size.height} canvas, tile {size.tile_size} px, {layer_count(inputs['masks'])}, "
             f"{source}; bootstrap {BOOTSTRAP_STEPS} steps in both; seed {args.seed}, {args.dtype}",
             f"{model_summary(args.model)}; decoding to pixels is inside the timed run",
             *comparison_notes(args.device)]
    return record(args, "regional", f"Regional ({args.size}): smd vs the MultiDiffusion region-based baseline", rows,
                  notes, canvas=f"{size.width}x{size.height}", tile=size.tile_size)


if __name__ == "__main__":
    main()
