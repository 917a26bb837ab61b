"""View layouts: what tile size and stride cost a panorama, per model family.

A large canvas is denoised in overlapping views (docs/method.md §5). Bigger views mean fewer denoiser rows
but more tokens in each, and self-attention grows with the square of a view's tokens; a smaller
stride means more rows. For each family (the tests' tiny random models with VAE factor 8, or
`--model`), one panorama is made with each candidate layout: tiles of 1/2, 3/4, 1 and 3/2 of the
family's native size (the picture size it was trained at), at strides of 1/2 and 3/4 of the tile.
Reported per layout: denoiser calls and rows, latent pixels (rows x view area), attention pairs
(rows x tokens², tokens at the denoiser's finest attention: SD 1.x's latent pixels, SDXL's at half
resolution, SD3's and FLUX's 2x2 patches) and the median wall time of `--repeats` interleaved
runs. On tiny models the wall time shows the work around the denoiser more than attention; the
counts are the same as at full size. `--size cpu` divides every size by 8.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.common import (
    base_parser,
    finish_args,
    model_summary,
    quiet,
    record,
    scratch_dir,
    synchronize,
    tiny_flux,
    tiny_model,
    tiny_sd3,
    tiny_sdxl,
)

BUILDERS = {"sd": tiny_model, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}

PROMPT = "a photo of the dolomites"
# The panorama of each family, in pixels at full size: the original project's for SD 1.x, and
# the same shape at SDXL's, SD3's and FLUX's native height.
CANVAS = {"sd": (512, 3072), "sdxl": (1024, 6144), "sd3": (1024, 6144), "flux": (1024, 6144)}
NATIVE = {"sd": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}  # pixels: the size each family was trained at
TILES = (0.5, 0.75, 1.0, 1.5)  # of the native size
STRIDES = (0.5, 0.75)  # of the tile
ATTENTION_SCALE = {"sd": 1, "sdxl": 2, "sd3": 2, "flux": 2}  # latent pixels per attention token, per side


class Counter:
    """Denoiser calls, rows, latent pixels and attention pairs, from the inputs it is given."""

    def __init__(self, denoiser, family: str):
        self.denoiser, self.family = denoiser, family
        self.calls = self.rows = self.pixels = self.pairs = 0

    def _before(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if self.family == "flux":  # packed 2x2: [B, tokens, 4C]
            b, tokens = int(x.shape[0]), int(x.shape[1])
            pixels = tokens * 4
        else:
            b, pixels = int(x.shape[0]), int(x.shape[-2] * x.shape[-1])
            tokens = pixels // ATTENTION_SCALE[self.family] ** 2
        self.calls += 1
        self.rows += b
        self.pixels += b * pixels
        self.pairs += b * tokens * tokens

    def __enter__(self):
        self._handle = self.denoiser.register_forward_pre_hook(self._before, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def layouts(native: int, canvas: tuple[int, int], multiple: int) -> list[tuple[int, int]]:
    """(tile, stride) candidates in pixels, each a multiple of `multiple`, the tile no larger than
    the canvas's longer side; the single view where the canvas fits in one."""
    out = []
    for t in TILES:
        tile = max(multiple, round(native * t / multiple) * multiple)
        if tile >= max(canvas):
            out.append((max(canvas), max(canvas)))
            continue
        for s in STRIDES:
            out.append((tile, max(multiple, round(tile * s / multiple) * multiple)))
    return list(dict.fromkeys(out))


def main(argv=None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd", "sdxl", "sd3", "flux", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each layout (median kept)")
    args = parser.parse_args(argv)
    given, args.model = args.model, args.model or "-"  # finish_args builds no model: each family builds its own
    args = finish_args(args)
    args.model = given
    import torch

    from smd_cli import StableMultiDiffusionPipeline

    families = ("sd", "sdxl", "sd3", "flux") if args.family == "all" else (args.family,)
    rows, summaries = [], []
    for family in families:
        model = args.model if args.model and len(families) == 1 else str(BUILDERS[family](scratch_dir() / family))
        pipe = StableMultiDiffusionPipeline(args.device, hf_key=model, dtype=args.dtype, lcm_lora="none")
        shrink = 8 if args.size == "cpu" else 1
        height, width = (side // shrink for side in CANVAS[family])
        f, g = pipe.vae_scale_factor, pipe.family.granularity
        native = NATIVE[family] // shrink
        candidates = layouts(native, (height, width), f * g)
        steps = 4 if family in ("sd3", "flux") else None

        def run(tile: int, stride: int, pipe=pipe):
            return pipe.sample_panorama(PROMPT, height=height, width=width, tile_size=tile, tile_stride=stride,
                                        num_inference_steps=steps, output_type="latent",
                                        generator=torch.Generator("cpu").manual_seed(args.seed))

        with quiet():
            for layout in candidates:  # untimed: each shape's first run
                run(*layout)
            times = {layout: [] for layout in candidates}
            counts = {}
            for _ in range(args.repeats):
                for layout in candidates:
                    with Counter(pipe.unet, family) as counter:
                        synchronize(args.device)
                        started = time.perf_counter()
                        run(*layout)
                        synchronize(args.device)
                    times[layout].append(time.perf_counter() - started)
                    counts[layout] = counter
        fastest = min(candidates, key=lambda layout: statistics.median(times[layout]))
        for layout in candidates:
            c, median = counts[layout], statistics.median(times[layout])
            rows.append({"family": family, "canvas": f"{width}x{height}",
                         "tile / stride px": f"{layout[0]} / {layout[1]}",
                         "calls": c.calls, "rows": c.rows, "latent Mpx": f"{c.pixels / 1e6:.3f}",
                         "attention pairs (M)": f"{c.pairs / 1e6:.2f}", "wall s": f"{median:.3f}",
                         "": "fastest" if layout == fastest else ""})
        summaries.append(f"{family}: {model_summary(model)}, native {native} px at this size; "
                         f"{'flow Euler 4 steps' if steps else 'LCM 5 steps'}")
        del pipe
    notes = [*summaries, f"median of {args.repeats} interleaved runs after one untimed run of each; "
                         f"seed {args.seed}, {args.dtype}; latents only (no decoding)"]
    one = len(families) == 1
    return record(args, "views", f"View layouts ({args.size}): tile size and stride per family", rows, notes,
                  family=args.family, canvas=f"{width}x{height}" if one else None,
                  model=model_summary(model) if one else None)


if __name__ == "__main__":
    main()
