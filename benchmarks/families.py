"""SDXL: a regional scene against the naive MultiDiffusion loop, and the stream, on an SDXL-shaped model.

The regional comparison is `regional`'s on a square canvas at SDXL's own size: the 8 regions of
the irworobongdo layout (as rectangles and ellipses) over a background, smd as shipped (LCM 5
steps, guidance 1, batched, empty pairs skipped) against the naive loop (DDIM 50 steps, guidance
7.5, one (layer, view) pair per UNet call, none skipped), both run by smd's pipeline on the same
weights. The stream is `stream`'s with 1 and 3 layers at the same size, with a tiny VAE.
`--size cpu` uses the tests' tiny random SDXL (VAE factor 8) at 128 x 128; `--size full` is
1024 x 1024 in one view, for SDXL-shaped weights (`benchmarks.gpu`).
"""

from __future__ import annotations

from benchmarks import regional, stream
from benchmarks.common import (
    append_report,
    base_parser,
    comparison_notes,
    comparison_rows,
    finish_args,
    fresh_pipeline,
    model_summary,
    quiet,
    scratch_dir,
    shape_masks,
    tiny_sdxl,
    tiny_taesd,
    warm_up,
)

SIZES = {"cpu": 128, "full": 1024}  # pixels: the square canvas, in one view
STREAM_LAYERS = (1, 3)


def regional_inputs(size: int) -> dict:
    """`StableMultiDiffusionPipeline.__call__` arguments: the irworobongdo prompts on SHAPES masks."""
    return dict(prompts=regional.PROMPTS, masks=shape_masks(len(regional.PROMPTS), size, size),
                background_prompt=regional.BACKGROUND, negative_prompt_prefix=regional.NEGATIVE_PREFIX,
                bootstrap_steps=regional.BOOTSTRAP_STEPS, height=size, width=size, tile_size=size, output_type="np")


def main(argv=None) -> list[str]:
    from smd_cli import StableMultiDiffusionPipeline
    from smd_cli.models import load_vae

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--vae", default=None, help="AutoencoderTiny folder for the stream (default: a tiny random one)")
    parser.add_argument("--frames", type=int, default=8, help="timed stream frames per layer count")
    args = finish_args(parser.parse_args(argv), build=tiny_sdxl)
    size = SIZES[args.size]
    pipe = StableMultiDiffusionPipeline(args.device, hf_key=args.model, dtype=args.dtype, lcm_lora="none")
    if pipe.family.name != "sdxl":
        raise SystemExit(f"{args.model} is not an SDXL model; benchmarks.sdxl needs one")
    warm_up(pipe.unet, (size // pipe.vae_scale_factor,) * 2)
    inputs = regional_inputs(size)
    with quiet():
        smd = regional.run(pipe, inputs, args.seed, args.device)
        baseline = regional.run(pipe, inputs, args.seed, args.device, **regional.BASELINE)
    rows = comparison_rows(("smd: LCM 5 steps, guidance 1, batched, empty pairs skipped", smd),
                           ("MultiDiffusion: DDIM 50 steps, guidance 7.5, 1 layer x view per call, none skipped",
                            baseline))
    summary = model_summary(args.model)
    notes = [f"{size}x{size} canvas in one view, {regional.layer_count(inputs['masks'])} (the irworobongdo "
             f"layout as shapes); bootstrap {regional.BOOTSTRAP_STEPS} steps in both; seed {args.seed}, {args.dtype}",
             f"{summary}; decoding to pixels is inside the timed run", *comparison_notes(args.device)]
    reports = [append_report(f"SDXL regional ({args.size}): smd vs the MultiDiffusion region-based baseline", rows,
                             notes, device=args.device, write=not args.no_report)]

    vae = load_vae(args.vae or str(tiny_taesd(scratch_dir() / "taesd")), dtype=pipe.dtype, family="sdxl")
    pipe = fresh_pipeline(pipe, vae=vae.to(pipe.device))  # the same weights, with the tiny VAE
    rows = []
    with quiet():
        for layers in STREAM_LAYERS:
            frames = stream.make_stream(pipe, size, layers, args.seed, tile_size=size)
            rows.append({"layers": f"{layers} + background", **stream.measure_stream(frames, args.frames, args.device)})
    notes = [f"{size}x{size} in one view, {len(frames.schedule)} stages, cfg none, {args.frames} frames after a "
             f"flush, {args.dtype}; {summary}; tiny VAE: random {type(pipe.vae).__name__}",
             "latency is one `stream()` call: the step, decoding and the PIL image"]
    reports.append(append_report(f"SDXL stream ({args.size}): StreamMultiDiffusion frame rate", rows, notes,
                                 device=args.device, write=not args.no_report))
    return reports


if __name__ == "__main__":
    main()
