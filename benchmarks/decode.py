"""Decoding: the autoencoder's convolutions in contiguous (NCHW) against channels-last memory.

smd keeps the VAE in channels-last memory on a CPU (`StableMultiDiffusionPipeline`); this measures why, on
three autoencoders with random weights: the model's own (`--model`, default the tiny random SD
model with VAE factor 8) on a 512 x 3072 panorama's latent, an AutoencoderKL with SD 1.5's real
shapes (`benchmarks.gpu.VAE`) and an AutoencoderTiny with TAESD's, each on a square latent (256 px
at `--size cpu`, 512 px at full size). Each layout is timed `--repeats` times, interleaved, after
one untimed decode of each; the table gives the medians, their ratio and the largest difference
between the two pictures (in [-1, 1]).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks.common import base_parser, finish_args, model_summary, quiet, record, synchronize

PANORAMA = (512, 3072)  # pixels: the model's VAE decodes this panorama's latent
SQUARE = {"cpu": 256, "full": 512}  # pixels: the SD- and TAESD-shaped autoencoders decode this


def autoencoders(args):
    """(name, autoencoder, latent) of each measured case, in the run's dtype on its device."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from benchmarks.gpu import VAE
    from smd_cli.models.loading import load_vae

    generator = torch.Generator("cpu").manual_seed(args.seed)
    square = SQUARE[args.size] // 8
    model_vae = load_vae(str(Path(args.model) / "vae"), dtype=args.dtype)
    f = 2 ** (len(model_vae.config.block_out_channels) - 1)
    height, width = (side // f for side in PANORAMA)
    cases = [(f"the model's ({model_summary(args.model)}), {PANORAMA[1]}x{PANORAMA[0]}", model_vae,
              torch.randn(1, 4, height, width, generator=generator)),
             (f"SD 1.5-shaped AutoencoderKL, {SQUARE[args.size]} px", AutoencoderKL(**VAE),
              torch.randn(1, 4, square, square, generator=generator)),
             (f"TAESD-shaped AutoencoderTiny, {SQUARE[args.size]} px", AutoencoderTiny(),
              torch.randn(1, 4, square, square, generator=generator))]
    return [(name, vae.to(args.device, args.dtype).eval(), latent.to(args.device, args.dtype))
            for name, vae, latent in cases]


def main(argv=None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes of each layout (median kept)")
    args = finish_args(parser.parse_args(argv))
    import torch

    rows = []
    with quiet(), torch.no_grad():
        for name, vae, latent in autoencoders(args):
            layouts = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}
            pictures, times = {}, {layout: [] for layout in layouts}

            def decode(layout: str):
                vae.to(memory_format=layouts[layout])
                synchronize(args.device)
                started = time.perf_counter()
                pictures[layout] = vae.decode(latent).sample
                synchronize(args.device)
                return time.perf_counter() - started

            for layout in layouts:
                decode(layout)
            for _ in range(args.repeats):
                for layout in layouts:
                    times[layout].append(decode(layout))
            plain, last = (statistics.median(times[layout]) for layout in layouts)
            difference = (pictures["contiguous"].float() - pictures["channels-last"].float()).abs().max()
            rows.append({"autoencoder": name, "contiguous s": f"{plain:.3f}", "channels-last s": f"{last:.3f}",
                         "contiguous / channels-last": f"{plain / last:.2f}x",
                         "largest difference": f"{float(difference):.1e}"})
    notes = [f"random weights, {args.dtype}, seed {args.seed}; median of {args.repeats} interleaved decodes after "
             "one untimed decode of each layout"]
    side = SQUARE[args.size]
    return record(args, "decode", f"Decoding ({args.size}): VAE convolutions contiguous against channels-last", rows,
                  notes, canvas=f"{side}x{side}")


if __name__ == "__main__":
    main()
