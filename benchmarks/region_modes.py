"""Region modes: attention mode (every layer in one denoiser row) against latent mode (a row per layer).

Two measurements, on the same random weights, latent and attention runs interleaved (`--repeats`
pairs, the median of each): the irworobongdo layout's 9 prompts (8 regions and the background)
made once on SD and once on FLUX.1, and the stream's frame rate with 3 and 8 brushes on SD with a
tiny autoencoder. `--size cpu` runs 256 x 256 (the tiny models: a quarter of the 512 x 512 the goals
name), `--size full` 512 x 512.
"""

from __future__ import annotations

import statistics
import time

from benchmarks import stream as streaming
from benchmarks.common import (
    base_parser,
    finish_args,
    fresh_pipeline,
    model_summary,
    quiet,
    record,
    scratch_dir,
    shape_masks,
    synchronize,
    tiny_flux,
    tiny_taesd,
    warm_up,
)

SIZES = {"cpu": 256, "full": 512}
PROMPTS = ["summer mountains", "the sun", "the moon", "a giant waterfall", "a giant waterfall",
           "clean deep blue lake", "a large tree", "a large tree"]
BACKGROUND = "clear deep blue sky"
BRUSHES = (3, 8)
WARM_FRAMES = 2


def _seconds(run, device) -> float:
    synchronize(device)
    started = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - started


def scene_times(pipe, size: int, repeats: int, device, seed: int) -> dict[str, float]:
    """Median seconds of one image of the 9-prompt scene in each mode, the runs interleaved."""
    import torch

    masks = shape_masks(len(PROMPTS), size, size)
    times: dict[str, list[float]] = {"latent": [], "attention": []}

    def image(fresh, mode: str) -> None:
        fresh(PROMPTS, masks=masks, background_prompt=BACKGROUND, height=size, width=size,
              generator=torch.Generator("cpu").manual_seed(seed), region_mode=mode, output_type="np")

    for mode in times:  # untimed: the first call of each mode pays for allocations and kernel choices
        image(fresh_pipeline(pipe), mode)
    for _ in range(repeats):
        for mode in times:
            fresh = fresh_pipeline(pipe)  # no prompt encodings cached; made (modules moved) before the clock
            times[mode].append(_seconds(lambda f=fresh, m=mode: image(f, m), device))
    return {mode: statistics.median(values) for mode, values in times.items()}


def stream_rates(pipe, size: int, brushes: int, frames: int, repeats: int, device, seed: int) -> dict[str, float]:
    """Median frames per second of a stream with `brushes` regions in each mode, interleaved."""
    rates: dict[str, list[float]] = {"latent": [], "attention": []}
    streams = {mode: streaming.make_stream(pipe, size, brushes, seed, region_mode=mode) for mode in rates}
    for stream in streams.values():  # untimed: the first frames fill the stages and build the masks
        for _ in range(WARM_FRAMES):
            stream()
    for _ in range(repeats):
        for mode, stream in streams.items():
            rates[mode].append(frames / _seconds(lambda s=stream: [s() for _ in range(frames)], device))
    return {mode: statistics.median(values) for mode, values in rates.items()}


def main(argv=None) -> str:
    from smd_cli import StableMultiDiffusionPipeline

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--flux", default=None, help="FLUX.1 folder (default: a tiny random one)")
    parser.add_argument("--vae", default=None,
                        help="AutoencoderTiny folder for the stream (default: a tiny random one)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved pairs of runs per measurement")
    parser.add_argument("--frames", type=int, default=6, help="timed frames per stream run")
    args = finish_args(parser.parse_args(argv))
    size = SIZES[args.size]
    flux = args.flux or str(tiny_flux(scratch_dir() / "tiny-flux"))
    vae = args.vae or str(tiny_taesd(scratch_dir() / "taesd"))
    rows = []
    with quiet():
        for name, folder in (("SD", args.model), ("FLUX.1", flux)):
            pipe = StableMultiDiffusionPipeline(args.device, hf_key=folder, dtype=args.dtype, lcm_lora="none")
            if name == "SD":
                warm_up(pipe.unet, (size // pipe.vae_scale_factor,) * 2)
            t = scene_times(pipe, size, args.repeats, args.device, args.seed)
            rows.append({"what": f"{name}, 9 prompts, one image", "latent": f"{t['latent']:.2f} s",
                         "attention": f"{t['attention']:.2f} s", "speed-up": f"{t['latent'] / t['attention']:.1f}x"})
        pipe = StableMultiDiffusionPipeline(args.device, hf_key=args.model, vae=vae, dtype=args.dtype,
                                            lcm_lora="none")
        for brushes in BRUSHES:
            r = stream_rates(pipe, size, brushes, args.frames, args.repeats, args.device, args.seed)
            rows.append({"what": f"SD stream, {brushes} brushes + background", "latent": f"{r['latent']:.2f} frames/s",
                         "attention": f"{r['attention']:.2f} frames/s",
                         "speed-up": f"{r['attention'] / r['latent']:.1f}x"})
    notes = [f"{size}x{size}, one view; LCM 5 steps, guidance 1; the stream: 5 stages, cfg none, tiny VAE, "
             f"{args.frames} frames a run after {WARM_FRAMES} untimed; latent and attention runs interleaved, "
             f"{args.repeats} of each after one untimed, medians; "
             f"{args.dtype}",
             f"SD: {model_summary(args.model)}; FLUX.1: {model_summary(flux)}",
             "random weights show the cost of each mode, not which draws a scene better"]
    return record(args, "region_modes", f"Region modes ({args.size}): attention against latent", rows, notes,
                  canvas=f"{size}x{size}")


if __name__ == "__main__":
    main()
