"""Large pictures: peak memory and time of decoding in one pass against exact tiles (`vae_tiles`).

Two autoencoders with random weights decode a latent at three canvas sizes, once in one pass and
once in tiles of `--tile` pixels (`smd_cli.models.vae_tiles`, docs/large-pictures.md): the model's
own (`--model`, default the tiny random SD model with VAE factor 8) and an AutoencoderKL with SD
1.5's real shapes (`benchmarks.gpu.VAE`). Each decode runs in a fresh subprocess, whose peak
resident memory (VmHWM, else ru_maxrss) is its own, so the table gives each decode's peak, its
wall time, and the largest difference between the two pictures (in [-1, 1]).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import base_parser, finish_args, model_summary, record

CANVASES = {"cpu": ("128", "256", "512"), "full": ("512", "1024", "2048")}  # 4x the pixels each step
TILES = {"cpu": 128, "full": 512}
REPO = Path(__file__).resolve().parents[1]

DECODE = """
import json, resource, sys, time, torch
sys.path.insert(0, {repo!r})
from diffusers import AutoencoderKL
from benchmarks.gpu import VAE
from smd_cli.models.loading import load_vae
from smd_cli.models.vae_tiles import tiled_decode
torch.set_num_threads({threads})
device, dtype = torch.device({device!r}), getattr(torch, {dtype!r})
torch.manual_seed({seed})  # the same random weights in each process
vae = load_vae({vae!r}, dtype=dtype) if {vae!r} else AutoencoderKL(**VAE)
if {upcast!r}:
    dtype = torch.float32  # SDXL's autoencoder decodes in float32 (force_upcast)
vae = vae.to(device, dtype).eval()
f = 2 ** (len(vae.config.block_out_channels) - 1)
z = torch.randn(1, vae.config.latent_channels, {height} // f, {width} // f,
                generator=torch.Generator().manual_seed({seed})).to(device, dtype)
started = time.perf_counter()
with torch.no_grad():
    picture = tiled_decode(vae, z, {tile}) if {tile} else vae.decode(z).sample
if device.type == "cuda":
    torch.cuda.synchronize(device)
seconds = time.perf_counter() - started
torch.save(picture.float().cpu(), {out!r})
status = dict(line.split(":", 1) for line in open("/proc/self/status")) if sys.platform == "linux" else {{}}
peak = int(status["VmHWM"].split()[0]) if "VmHWM" in status else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gpu = torch.cuda.max_memory_allocated(device) // 1024 if device.type == "cuda" else 0
print(json.dumps({{"seconds": seconds, "peak KiB": peak, "gpu KiB": gpu}}))
"""


def canvas(text: str) -> tuple[int, int]:
    """`512` (a square) or `8192x1024` (width x height) as (height, width)."""
    width, _, height = text.partition("x")
    return int(height or width), int(width)


def decode(args, vae: str, size: tuple[int, int], tile: int, out: Path) -> dict:
    """One decode in a fresh process: its seconds and peak memory (KiB)."""
    code = DECODE.format(repo=str(REPO), threads=args.threads or 0, device=str(args.device), dtype=str(args.dtype)[6:],
                         vae=vae, height=size[0], width=size[1], seed=args.seed, tile=tile, out=str(out),
                         upcast=args.upcast)
    done = subprocess.run([sys.executable, "-c", code.replace("torch.set_num_threads(0)\n", "")],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=None, help="the tile in pixels (default 128 at --size cpu, "
                                                                 "512 at full)")
    parser.add_argument("--canvases", nargs="+", default=None,
                        help="canvases: a side (512) or WxH (8192x1024) each (default 128 256 512 at --size cpu, "
                             "512 1024 2048 at full)")
    parser.add_argument("--autoencoders", choices=("both", "model", "shaped"), default="both",
                        help="the model's own, the SD 1.5-shaped AutoencoderKL, or both (default)")
    parser.add_argument("--upcast", action="store_true",
                        help="decode in float32 whatever --dtype says, as SDXL's autoencoder does")
    args = finish_args(parser.parse_args(argv))
    import tempfile

    import torch

    tile = args.tile or TILES[args.size]
    canvases = args.canvases or CANVASES[args.size]
    memory = "GPU MiB" if str(args.device).startswith("cuda") else "peak MiB"
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        vaes = [(f"the model's ({model_summary(args.model)})", str(Path(args.model) / "vae")),
                ("SD 1.5-shaped AutoencoderKL", "")]
        for name, vae in {"both": vaes, "model": vaes[:1], "shaped": vaes[1:]}[args.autoencoders]:
            for text in canvases:
                size = canvas(text)
                runs = {t: decode(args, vae, size, t, Path(scratch) / f"{t}.pt") for t in (0, tile)}
                pictures = {t: torch.load(Path(scratch) / f"{t}.pt") for t in runs}
                key = "gpu KiB" if memory == "GPU MiB" else "peak KiB"
                rows.append({"autoencoder": name, "canvas": f"{size[1]}x{size[0]}",
                             f"one pass {memory}": runs[0][key] // 1024, f"tiled {memory}": runs[tile][key] // 1024,
                             "one pass s": f"{runs[0]['seconds']:.2f}", "tiled s": f"{runs[tile]['seconds']:.2f}",
                             "tiled / one pass time": f"{runs[tile]['seconds'] / runs[0]['seconds']:.1f}x",
                             "largest difference": f"{float((pictures[0] - pictures[tile]).abs().max()):.1e}"})
    dtype = "float32 (upcast)" if args.upcast else args.dtype
    notes = [f"random weights, {dtype}, seed {args.seed}; each decode in a fresh process (its peak memory "
             f"includes torch's and the weights'); tiles of {tile} pixels"]
    return record(args, "vae_tiles", f"Large pictures ({args.size}): one-pass against exact tiled VAE decoding",
                  rows, notes, vae_tile=tile, autoencoders=args.autoencoders)


if __name__ == "__main__":
    main()
