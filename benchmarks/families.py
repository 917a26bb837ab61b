"""Large families (SDXL, SD3, FLUX.1): a regional scene against the naive loop, and the stream.

The regional comparison is `regional`'s on a square canvas at the family's own size: the 8
regions of the irworobongdo layout (as rectangles and ellipses) over a background, smd's few-step
recipe for the family (batched, empty pairs skipped) against the naive loop of its full-step
sampler (one (layer, view) pair per call, none skipped), both run by smd's pipeline on the same
weights (`RECIPES`). The stream is `stream`'s with 1 and 3 layers at the same size, with a tiny
VAE. `--family` picks the tiny random model built by default; `--size cpu` runs it at 128 x 128,
`--size full` is 1024 x 1024 in one view, for the family-shaped weights of `benchmarks.gpu`.
"""

from __future__ import annotations

from benchmarks import regional, stream
from benchmarks.common import (
    base_parser,
    comparison_notes,
    comparison_rows,
    finish_args,
    fresh_pipeline,
    model_summary,
    quiet,
    record,
    scratch_dir,
    shape_masks,
    tiny_flux,
    tiny_sd3,
    tiny_sdxl,
    tiny_taesd,
)

SIZES = {"cpu": 128, "full": 1024}  # pixels: the square canvas, in one view
STREAM_LAYERS = (1, 3)
BUILDERS = {"sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}
# Per family: (what smd runs, its label), (the naive baseline, its label).
RECIPES = {
    "sdxl": (({}, "smd: LCM 5 steps, guidance 1, batched, empty pairs skipped"),
             (regional.BASELINE, "MultiDiffusion: DDIM 50 steps, guidance 7.5, 1 layer x view per call, none skipped")),
    "sd3": (({"num_inference_steps": 4, "guidance_scale": 1.0},
             "smd: flow Euler 4 steps (Large Turbo), guidance 1, batched, empty pairs skipped"),
            ({"num_inference_steps": 28, "guidance_scale": 7.0, "max_batch": 1, "skip_empty": False},
             "naive: flow Euler 28 steps, guidance 7, 1 layer x view per call, none skipped")),
    "flux": (({"num_inference_steps": 4, "guidance_scale": 1.0},
              "smd: flow Euler 4 steps (schnell), batched, empty pairs skipped"),
             ({"num_inference_steps": 28, "guidance_scale": 3.5, "max_batch": 1, "skip_empty": False},
              "naive: flow Euler 28 steps (dev), 1 layer x view per call, none skipped")),
}


def regional_inputs(size: int) -> dict:
    """`StableMultiDiffusionPipeline.__call__` arguments: the irworobongdo prompts on SHAPES masks."""
    return dict(prompts=regional.PROMPTS, masks=shape_masks(len(regional.PROMPTS), size, size),
                background_prompt=regional.BACKGROUND, negative_prompt_prefix=regional.NEGATIVE_PREFIX,
                bootstrap_steps=regional.BOOTSTRAP_STEPS, height=size, width=size, tile_size=size, output_type="np")


def main(argv=None) -> list[str]:
    from smd_cli import StableMultiDiffusionPipeline
    from smd_cli.models.loading import load_vae

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--family", choices=tuple(BUILDERS), default="sdxl",
                        help="the tiny random model built when --model is not given (default sdxl)")
    parser.add_argument("--vae", default=None,
                        help="AutoencoderTiny folder for the stream (default: a tiny random one)")
    parser.add_argument("--frames", type=int, default=8, help="timed stream frames per layer count")
    args = parser.parse_args(argv)
    args = finish_args(args, build=BUILDERS[args.family])
    size = SIZES[args.size]
    pipe = StableMultiDiffusionPipeline(args.device, hf_key=args.model, dtype=args.dtype, lcm_lora="none")
    family = pipe.family.name
    if family not in RECIPES:
        raise SystemExit(f"{args.model} is {family}; benchmarks.families runs {', '.join(RECIPES)} models")
    (ours, ours_label), (naive, naive_label) = RECIPES[family]
    with quiet():  # one untimed call at the measured size pays the one-time costs first
        pipe.sample("warm up", height=size, width=size, num_inference_steps=1, output_type="latent")
    inputs = regional_inputs(size)
    with quiet():
        smd = regional.run(pipe, inputs, args.seed, args.device, **ours)
        baseline = regional.run(pipe, inputs, args.seed, args.device, **naive)
    rows = comparison_rows((ours_label, smd), (naive_label, baseline))
    summary = model_summary(args.model)
    notes = [f"{size}x{size} canvas in one view, {regional.layer_count(inputs['masks'])} (the irworobongdo "
             f"layout as shapes); bootstrap {regional.BOOTSTRAP_STEPS} steps in both; seed {args.seed}, {args.dtype}",
             f"{summary}; decoding to pixels is inside the timed run", *comparison_notes(args.device)]
    name = pipe.family.name.upper().replace("FLUX", "FLUX.1")
    canvas = f"{size}x{size}"
    reports = [record(args, "regional", f"{name} regional ({args.size}): smd vs the naive region-based loop", rows,
                      notes, canvas=canvas)]
    vae = load_vae(args.vae or str(tiny_taesd(scratch_dir() / "taesd")), dtype=pipe.dtype, family=family)
    pipe = fresh_pipeline(pipe, vae=vae.to(pipe.device))  # the same weights, with the tiny VAE
    rows = []
    with quiet():
        for layers in STREAM_LAYERS:
            frames = stream.make_stream(pipe, size, layers, args.seed, tile_size=size)
            rows.append({"layers": f"{layers} + background", **stream.measure_stream(frames, args.frames, args.device)})
    notes = [f"{size}x{size} in one view, {len(frames.schedule)} stages, cfg none, {args.frames} frames after a "
             f"flush, {args.dtype}; {summary}; tiny VAE: random {type(pipe.vae).__name__}",
             "latency is one `stream()` call: the step, decoding and the PIL image"]
    reports.append(record(args, "stream", f"{name} stream ({args.size}): StreamMultiDiffusion frame rate", rows, notes,
                          canvas=canvas))
    return reports


if __name__ == "__main__":
    main()
