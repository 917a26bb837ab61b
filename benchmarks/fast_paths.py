"""Fast paths, each measured against the default on the same pipeline: region cropping,
channels-last, torch.compile of the UNet, and decoding beside the UNet in the stream.

Region cropping and channels-last run on the regional scene (`benchmarks.regional`) at its full
canvas, 1920 x 768, where views are large and most layers are small. Cropping changes results
slightly (the UNet sees less context), so the table also gives the mean and largest pixel
difference to the uncropped image. `--compile` adds torch.compile (inductor), which on a CPU takes
minutes to build and is therefore left out of `make bench`. The stream rows compare
`overlap_decode` off and on with the model's own (full) VAE, whose decoding is worth hiding.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import (
    base_parser,
    finish_args,
    fresh_pipeline,
    measure,
    model_summary,
    quiet,
    record,
    warm_up,
)
from benchmarks.regional import SIZES as REGIONAL_SIZES
from benchmarks.regional import scene_inputs
from benchmarks.stream import SIZES as STREAM_SIZES
from benchmarks.stream import make_stream, measure_stream


def regional_rows(args, pipe) -> list[dict]:
    """The regional scene with each option, against the default."""
    import torch

    size = REGIONAL_SIZES["full"]
    inputs, _ = scene_inputs(size)
    window = size.tile_size // pipe.vae_scale_factor
    warm_up(pipe.unet, (min(window, size.height // pipe.vae_scale_factor), window))
    images: dict[str, np.ndarray] = {}

    def run(name: str, pipeline, **options) -> dict:
        def generate():
            generator = torch.Generator("cpu").manual_seed(args.seed)
            images[name] = pipeline(generator=generator, **inputs, **options)

        with LatentPixels(pipeline.unet) as pixels:
            m = measure(generate, pipeline.unet, args.device)
        return {"option": name, "UNet calls": m.calls, "UNet latent pixels": f"{pixels.total / 1e6:.2f} M",
                "wall s": f"{m.seconds:.2f}", "_seconds": m.seconds}

    cases = [("default", fresh_pipeline(pipe), {}),
             ("--region-crop", fresh_pipeline(pipe), {"region_crop": True}),
             ("--channels-last", fresh_pipeline(pipe).optimize(channels_last=True), {})]
    if args.compile:
        compiled = fresh_pipeline(pipe).optimize(compile=True)
        started = time.perf_counter()
        compiled(**inputs)  # compiling each batch shape happens here, outside the timed run
        compile_seconds = time.perf_counter() - started
        cases.append((f"--compile (after {compile_seconds:.0f} s compiling)", compiled, {}))
    rows = [run(name, pipeline, **options) for name, pipeline, options in cases]
    base = rows[0]["_seconds"]
    for row in rows:
        row["speed-up"] = f"{base / row.pop('_seconds'):.2f}x"
        diff = np.abs(images[row["option"]] - images["default"]) * 255
        row["pixel difference (mean / max of 255)"] = f"{diff.mean():.3f} / {diff.max():.1f}"
    return rows


class LatentPixels:
    """Adds up batch x height x width of every UNet input: the work region cropping saves."""

    def __init__(self, unet):
        self.unet, self.total = unet, 0

    def _count(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.total += sample.shape[0] * sample.shape[-2] * sample.shape[-1]

    def __enter__(self) -> "LatentPixels":
        self._handle = self.unet.register_forward_pre_hook(self._count, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def stream_rows(args, pipe) -> list[dict]:
    """Frames per second with the stream's decoding in sequence and beside the UNet (and, with
    --compile, with the UNet compiled: CUDA graphs on a GPU)."""
    size = STREAM_SIZES[args.size]
    cases = [("default", pipe, False), ("--overlap-decode", pipe, True)]
    if args.compile:
        mode = "reduce-overhead" if args.device.type == "cuda" else None
        cases.append(("--compile", fresh_pipeline(pipe).optimize(compile=True, mode=mode), False))
    rows = []
    for name, pipeline, overlap in cases:
        stream = make_stream(pipeline, size, 3, args.seed)
        stream.overlap_decode = overlap
        stream()  # compiling, and the overlapped stream's first call of two steps, stay out of the timing
        rows.append({"stream, 3 layers": name, **measure_stream(stream, args.frames, args.device)})
    return rows


def main(argv=None) -> str:
    from smd_cli import StableMultiDiffusionPipeline

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes on a CPU)")
    parser.add_argument("--frames", type=int, default=8, help="timed stream frames per setting")
    args = finish_args(parser.parse_args(argv))
    pipe = StableMultiDiffusionPipeline(args.device, hf_key=args.model, dtype=args.dtype, lcm_lora="none")
    with quiet():
        regional = regional_rows(args, pipe)
        streaming = stream_rows(args, pipe)
    scene, side = REGIONAL_SIZES["full"], STREAM_SIZES[args.size]
    notes = [f"regional scene at {scene.width}x{scene.height}, LCM 5 steps, "
             f"seed {args.seed}, {args.dtype}; {model_summary(args.model)}",
             "UNet latent pixels: batch x height x width summed over every UNet call; the pixel difference is to "
             "the default image, in 8-bit steps",
             "stream: the model's own VAE (not the tiny one), 3 layers + background; with --overlap-decode each "
             "call returns the frame the previous call denoised, decoded in a second thread while the UNet runs"]
    record(args, "fast_paths.regional", f"Fast paths ({args.device.type}): regional scene", regional, notes[:2],
           canvas=f"{scene.width}x{scene.height}", tile=scene.tile_size)
    return record(args, "fast_paths.stream", f"Fast paths ({args.device.type}): stream decoding", streaming, notes[2:],
                  canvas=f"{side}x{side}")


if __name__ == "__main__":
    main()
