"""smd against the reference implementation (ironjr/StreamMultiDiffusion) on identical weights.

Runs the public reference code from a copy given by path (`--reference PATH`: a clone of
github.com/ironjr/StreamMultiDiffusion); without one, or where it cannot be imported (it needs
torchvision, built for the installed torch, and einops), it says why and measures nothing. Both
sides load the same tiny random SD model folder (or `--model`) and run it without an LCM LoRA:
the reference always loads latent-consistency/lcm-lora-sdv1-5 from the hub, and its loading is
made a no-op here so that both sides run the same weights. Measured, interleaved, median of
`--repeats` timed runs after one untimed run of each:

1. a 512 x 3072 panorama: the reference's `sample_panorama` (its 512 px windows, one view and its
   unconditional twin per UNet call) against smd's `sample_panorama` (its default views, batched);
2. the 9-prompt 1920 x 768 scene (8 layers as shapes, the background prompt a first layer over
   the rest, as the original README gives it), each side's
   `__call__` with its own default views (the reference's 768 px tiles; smd's `views.default_tile`).

`--size cpu` divides every size, the tiles included, by 8.
"""

from __future__ import annotations

import contextlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    REFERENCE,
    base_parser,
    finish_args,
    model_summary,
    quiet,
    record,
    shape_masks,
    synchronize,
)
from benchmarks.regional import BACKGROUND, PROMPTS

PROMPT = "a photo of the dolomites"
PANORAMA = (512, 3072)
SCENE = (768, 1920)
REFERENCE_TILE = 768  # the reference's __call__ default
NATIVE = 512  # SD 1.x's, smd's default tile (and the reference's panorama window)


def load_reference(path: Path):
    """The reference's pipeline class, imported from its file (its package imports every family),
    or the reason it cannot be."""
    source = path / "src" / "model" / "pipeline_stablemultidiffusion.py"
    if not source.is_file():
        return None, f"no reference implementation at {path} (expected {source.relative_to(path)})"
    sys.path.insert(0, str(path / "src"))  # it imports `util` from there
    try:
        spec = importlib.util.spec_from_file_location("reference_pipeline", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # a missing or mismatched torchvision, einops, ...
        return None, f"the reference implementation cannot be imported here: {type(exc).__name__}: {exc}"
    return module.StableMultiDiffusionPipeline, None


@contextlib.contextmanager
def no_lora_download():
    """The reference's LCM LoRA load, made a no-op: it is fetched from the hub, which may be out of
    reach, and smd's side runs without one."""
    from diffusers import StableDiffusionPipeline

    original = StableDiffusionPipeline.load_lora_weights
    StableDiffusionPipeline.load_lora_weights = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        StableDiffusionPipeline.load_lora_weights = original


def scene_masks(height: int, width: int):
    """The irworobongdo masks at this size: the published ones where ../shared/reference-scenes has
    them, else shapes in their layout; and which."""
    folder = REFERENCE / "irworobongdo"
    if not folder.is_dir():
        return shape_masks(len(PROMPTS), height, width), "8 rectangles and ellipses in its layout"
    from PIL import Image

    from smd_cli.method.masks import image_mask, resize

    masks = [(resize(image_mask(Image.open(folder / f"irworobongdo_{i}.png")), height, width) > 0.5)
             for i in range(1, len(PROMPTS) + 1)]
    return np.stack(masks).astype(np.float32), "the published irworobongdo masks"


def main(argv=None) -> str | None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=None, help="a clone of ironjr/StreamMultiDiffusion")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median kept)")
    args = finish_args(parser.parse_args(argv))
    if args.reference is None:
        print("reference benchmark skipped: no --reference PATH (a clone of ironjr/StreamMultiDiffusion) given")
        return None
    Reference, problem = load_reference(args.reference.expanduser())
    if problem:
        print(f"reference benchmark skipped: {problem}")
        return None
    import torch

    from smd_cli import StableMultiDiffusionPipeline
    from smd_cli.method.views import default_tile

    shrink = 8 if args.size == "cpu" else 1
    (ph, pw), (sh, sw) = [(h // shrink, w // shrink) for h, w in (PANORAMA, SCENE)]
    with quiet(), no_lora_download(), contextlib.redirect_stdout(sys.stderr):
        reference = Reference(args.device, dtype=args.dtype, hf_key=args.model, has_i2t=False)
    smd = StableMultiDiffusionPipeline(args.device, hf_key=args.model, dtype=args.dtype, lcm_lora="none")
    # The background as the first layer over what the others leave, as the original README's
    # examples give it (the reference's background_prompt path trips its own asserts).
    shapes, source = scene_masks(sh, sw)
    masks = np.concatenate([1 - shapes.max(axis=0, keepdims=True), shapes])
    prompts = [BACKGROUND, *PROMPTS]
    reference_masks = torch.from_numpy(masks)[:, None].to(args.device)

    def smd_tile(height: int, width: int) -> int:
        """smd's default view for the canvas, its rule applied at this size."""
        return default_tile(NATIVE // shrink, height, width, smd.vae_scale_factor * smd.family.granularity)

    def seeded(run):
        def go():
            torch.manual_seed(args.seed)
            return run()
        return go

    runs = {
        ("panorama", "reference"): seeded(lambda: reference.sample_panorama(
            PROMPT, height=ph, width=pw, tile_size=NATIVE // shrink)),
        ("panorama", "smd"): seeded(lambda: smd.sample_panorama(
            PROMPT, height=ph, width=pw, tile_size=smd_tile(ph, pw))),
        ("regional", "reference"): seeded(lambda: reference(  # a negative prompt per layer, as its asserts want
            prompts, [""] * len(prompts), masks=reference_masks, height=sh, width=sw,
            tile_size=REFERENCE_TILE // shrink)),
        ("regional", "smd"): seeded(lambda: smd(prompts, masks=masks, height=sh, width=sw, tile_size=smd_tile(sh, sw))),
    }
    times = {key: [] for key in runs}
    with quiet(), contextlib.redirect_stdout(sys.stderr):  # the reference prints progress bars
        for run in runs.values():
            run()
        for _ in range(args.repeats):
            for key, run in runs.items():
                synchronize(args.device)
                started = time.perf_counter()
                run()
                synchronize(args.device)
                times[key].append(time.perf_counter() - started)
    rows = []
    for task, canvas in (("panorama", f"{pw}x{ph}"), ("regional", f"{sw}x{sh}, 8 layers + background")):
        ref_s, smd_s = (statistics.median(times[(task, side)]) for side in ("reference", "smd"))
        rows.append({"run": task, "canvas": canvas, "reference s": f"{ref_s:.3f}", "smd s": f"{smd_s:.3f}",
                     "reference / smd": f"{ref_s / smd_s:.2f}x"})
    notes = [f"reference: {args.reference} at its own defaults (LCM schedule, 5 steps), its LCM LoRA not loaded; "
             f"smd: LCM 5 steps, guidance 1, no LCM LoRA; {model_summary(args.model)}, {args.dtype}",
             f"views: the reference's panorama windows {NATIVE // shrink} px, smd's {smd_tile(ph, pw)} px; regional: "
             f"the reference's {REFERENCE_TILE // shrink} px, smd's {smd_tile(sh, sw)} px (its default rule at this "
             "size)",
             f"regional masks: {source}; median of {args.repeats} interleaved runs after one untimed run of each; "
             "decoding included"]
    return record(args, "reference", f"Reference implementation ({args.size}): smd against ironjr/StreamMultiDiffusion",
                  rows, notes, canvas=f"{pw}x{ph} + {sw}x{sh}", tile=f"{smd_tile(ph, pw)} + {smd_tile(sh, sw)}")


if __name__ == "__main__":
    main()
