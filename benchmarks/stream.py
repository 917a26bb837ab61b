"""Streaming: frames per second of `StreamMultiDiffusion` with 1, 3 and 8 layers and a tiny VAE.

Each call denoises every stage and layer in one UNet call and decodes one frame. Besides the rate,
the table shows how much of a call is spent outside the UNet (mask and text preparation, the
step math, decoding, conversion to PIL): the part smd's own code can still make cheaper.
`--size cpu` streams 256 x 256 instead of 512 x 512.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.common import (
    UNetProbe,
    base_parser,
    finish_args,
    model_summary,
    quiet,
    record,
    scratch_dir,
    shape_masks,
    synchronize,
    tiny_taesd,
    warm_up,
)

SIZES = {"cpu": 256, "full": 512}
LAYER_COUNTS = (1, 3, 8)
PROMPTS = ["summer mountains", "the sun", "the moon", "a giant waterfall", "a river", "clean deep blue lake",
           "a large tree", "a pine tree"]
BACKGROUND = "clear deep blue sky"


def make_stream(pipe, size: int, layers: int, seed: int, tile_size: int | None = None, region_mode: str = "latent"):
    """A stream with `layers` regions over a background prompt, flushed so every stage is busy;
    `tile_size` None is the stream's default."""
    from smd_cli import StreamMultiDiffusion

    stream = StreamMultiDiffusion(pipeline=pipe, height=size, width=size, cfg_type="none", autoflush=False,
                                  seed=seed, region_mode=region_mode,
                                  **({"tile_size": tile_size} if tile_size else {}))
    stream.update_background(prompt=BACKGROUND)
    for i, mask in enumerate(shape_masks(layers, size, size)):
        stream.update_single_layer(i, prompt=PROMPTS[i], mask=mask)
    stream.flush()
    return stream


def measure_stream(stream, frames: int, device) -> dict:
    """Per-call latencies of `frames` frames, and the time inside the UNet among them."""
    latencies = []
    with UNetProbe(stream.pipe.unet, timed=True) as probe:
        for _ in range(frames):
            synchronize(device)
            started = time.perf_counter()
            stream()
            synchronize(device)
            latencies.append(time.perf_counter() - started)
    total = sum(latencies)
    return {"UNet batch / call": probe.items // max(probe.calls, 1), "frames/s": f"{frames / total:.2f}",
            "mean latency ms": f"{1000 * statistics.mean(latencies):.1f}",
            "UNet ms / call": f"{1000 * probe.seconds / frames:.1f}",
            "outside UNet": f"{100 * (1 - probe.seconds / total):.0f}%"}


def main(argv=None) -> str:
    from smd_cli import StableMultiDiffusionPipeline

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--vae", default=None, help="AutoencoderTiny folder (default: a tiny random one)")
    parser.add_argument("--frames", type=int, default=8, help="timed frames per layer count")
    args = finish_args(parser.parse_args(argv))
    vae = args.vae or str(tiny_taesd(scratch_dir() / "taesd"))
    size = SIZES[args.size]
    pipe = StableMultiDiffusionPipeline(args.device, hf_key=args.model, vae=vae, dtype=args.dtype, lcm_lora="none")
    warm_up(pipe.unet, (size // pipe.vae_scale_factor,) * 2)
    rows = []
    with quiet():
        for layers in LAYER_COUNTS:
            stream = make_stream(pipe, size, layers, args.seed)
            rows.append({"layers": f"{layers} + background", **measure_stream(stream, args.frames, args.device)})
    notes = [f"{size}x{size}, {len(stream.schedule)} stages, cfg none, {args.frames} frames after a flush, "
             f"{args.dtype}; {model_summary(args.model)}; tiny VAE: random {type(pipe.vae).__name__} with "
             f"encoder channels {tuple(pipe.vae.config.encoder_block_out_channels)}",
             "latency is one `stream()` call: the step, decoding and the PIL image; UNet time is measured by "
             "forward pre/post hooks that synchronize the device"]
    return record(args, "stream", f"Stream ({args.size}): StreamMultiDiffusion frame rate", rows, notes,
                  canvas=f"{size}x{size}")


if __name__ == "__main__":
    main()
