"""Panorama: smd's sampler against diffusers' MultiDiffusion (`StableDiffusionPanoramaPipeline`).

Both load the same local folder, so UNet, VAE and text encoder weights are identical and only the
samplers differ: smd's 5 LCM steps over its default views (`views.default_tile`: 512 px on a
512 px tall panorama, stride half a tile), batched, against MultiDiffusion's 50 DDIM steps with
guidance 7.5 over 64-latent windows every 8 latents. `--size cpu` shrinks the canvas, smd's tile
and MultiDiffusion's window and stride by 8; `--canvas WxH` sets another canvas (full size).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from benchmarks.common import (
    base_parser,
    comparison_notes,
    comparison_rows,
    finish_args,
    measure,
    model_summary,
    quiet,
    record,
    warm_up,
)

PROMPT = "a photo of the dolomites"
DDIM_STEPS = 50
GUIDANCE = 7.5
DIFFUSERS_FACTOR = 8  # `get_views` divides pixel sizes by SD's VAE factor, whatever the model's


@dataclass(frozen=True)
class Size:
    height: int
    width: int
    tile_size: int  # smd's views, in pixels: its default rule (views.default_tile) at this size
    window: int  # MultiDiffusion's views, in latents
    stride: int


def sizes(name: str, canvas: str | None = None) -> Size:
    """The canvas and views of `--size` (cpu divides every size by 8), or of `--canvas WxH`."""
    from smd_cli.method.views import default_tile

    shrink = 8 if name == "cpu" else 1
    width, height = (int(side) for side in canvas.lower().split("x")) if canvas else (3072, 512)
    width, height = width // shrink, height // shrink
    # Views fit SD's grid: the VAE's factor 8 times the UNet's downsampling, 16 pixels.
    return Size(height, width, default_tile(512 // shrink, height, width, 16), 64 // shrink, 8 // shrink)


def smd_run(args, size: Size):
    """smd as shipped: LCM, 5 steps, guidance 1, its default views, (layer, view) pairs batched;
    returns (the run, its UNet)."""
    import torch

    from smd_cli import StableMultiDiffusionPipeline

    pipe = StableMultiDiffusionPipeline(args.device, hf_key=args.model, dtype=args.dtype, lcm_lora="none")
    warm_up(pipe.unet, _window(size.tile_size // pipe.vae_scale_factor, size, pipe.vae_scale_factor))
    return (lambda: pipe.sample_panorama(PROMPT, height=size.height, width=size.width, tile_size=size.tile_size,
                                         generator=torch.Generator("cpu").manual_seed(args.seed), output_type="np"),
            pipe.unet)


def multidiffusion_run(args, size: Size):
    """diffusers' MultiDiffusion panorama on the same folder: DDIM 50 steps, guidance 7.5; returns
    (the run, its UNet)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline

    ref = StableDiffusionPanoramaPipeline.from_pretrained(args.model, torch_dtype=args.dtype, safety_checker=None,
                                                          requires_safety_checker=False).to(args.device)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    # The pipeline always asks for its default 64-latent window; the CPU size needs a smaller one.
    ref.get_views = functools.partial(ref.get_views, window_size=size.window, stride=size.stride)
    warm_up(ref.unet, _window(size.window, size, DIFFUSERS_FACTOR))
    return (lambda: ref(PROMPT, height=size.height, width=size.width, num_inference_steps=DDIM_STEPS,
                        guidance_scale=GUIDANCE, view_batch_size=args.view_batch_size,
                        generator=torch.Generator("cpu").manual_seed(args.seed), output_type="np"),
            ref.unet)


def interleaved(runs, repeats: int, device):
    """Each (run, unet) once untimed (first-run costs: kernels, the decoder at this size), then
    `repeats` timed rounds taking turns; the run of median wall time of each."""
    for run, _ in runs:
        run()
    measured = [[] for _ in runs]
    for _ in range(repeats):
        for times, (run, unet) in zip(measured, runs):
            times.append(measure(run, unet, device))
    return [sorted(times, key=lambda m: m.seconds)[len(times) // 2] for times in measured]


def _window(window: int, size: Size, factor: int) -> tuple[int, int]:
    """A view's latent size: the window, cut to the canvas."""
    return min(window, size.height // factor), min(window, size.width // factor)


def main(argv=None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--view-batch-size", type=int, default=8,
                        help="MultiDiffusion's views per UNet call (smd batches pairs by itself)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the untimed one (median kept)")
    parser.add_argument("--canvas", default=None, help="WxH in pixels at full size (default 3072x512)")
    args = finish_args(parser.parse_args(argv))
    size = sizes(args.size, args.canvas)
    with quiet():
        smd, baseline = interleaved([smd_run(args, size), multidiffusion_run(args, size)], args.repeats, args.device)
    rows = comparison_rows((f"smd: LCM 5 steps, guidance 1, tile {size.tile_size} px", smd),
                           (f"MultiDiffusion: DDIM {DDIM_STEPS} steps, guidance {GUIDANCE}, window {size.window} "
                            f"stride {size.stride} latents, {args.view_batch_size} views/call", baseline))
    notes = [f"{size.width}x{size.height} canvas, prompt {PROMPT!r}, seed {args.seed}, {args.dtype}, "
             f"{model_summary(args.model)}; both pipelines load the same folder and decode to pixels "
             "inside the timed run",
             f"each run once untimed, then {args.repeats} timed rounds taking turns; the median kept",
             *comparison_notes(args.device)]
    return record(args, "panorama", f"Panorama ({args.size}): smd vs diffusers StableDiffusionPanoramaPipeline", rows,
                  notes, canvas=f"{size.width}x{size.height}", tile=size.tile_size)


if __name__ == "__main__":
    main()
