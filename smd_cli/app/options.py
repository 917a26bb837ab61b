"""The options several `smd` commands share: each defined once, in `OPTIONS`, and given to a
command by `@shared(...)`, which hands their values to it as one namespace; `batch_options` turns
them into the library's `batch.Options`. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, List, Optional

import typer

from smd_cli.core import defaults
from smd_cli.core.errors import SmdError

if TYPE_CHECKING:
    from smd_cli.app import batch

O = typer.Option  # noqa: E741 - short, so that each option's line reads as one
OPTIONS: dict[str, tuple[Any, Any]] = {  # parameter name: (type, option)
    "model": (Optional[str], O(None, "--model", "-m", help="Hub id, local diffusers folder or .safetensors file "
                                                           "(default: the scene's, else SMD_MODEL or the config "
                                                           "file's, else SD1.5 + LCM LoRA).")),
    "config": (Optional[str], O(None, "--config", help="A diffusers folder with the configs of a .safetensors model.")),
    "output": (Optional[str], O(None, "--out", "-o", help="Output file, folder or template with {scene}, {seed}, "
                                                          "{steps}, {index}, {date}, {time} (default: the scene's "
                                                          "`output`, else {scene}-{seed}.png).")),
    "seed": (Optional[int], O(None, "--seed", min=0, max=defaults.SEED_LIMIT - 1,
                              help="Random seed (default: the scene's, else random).")),
    "seeds": (Optional[str], O(None, "--seeds", help="One image per seed: 1,2,3 or 10-20 or a mix.")),
    "repeat": (Optional[int], O(None, "--repeat", min=1, help="N images per scene with random seeds (printed).")),
    "steps": (Optional[int], O(None, "--steps", min=1, max=defaults.MAX_STEPS,
                               help=f"Number of steps (LCM default {defaults.STEPS['lcm']}).")),
    "guidance_scale": (Optional[float], O(None, "--guidance-scale", "-g", min=0.0, max=defaults.MAX_GUIDANCE_SCALE,
                                          help="Classifier-free guidance (scene key guidance_scale; 1: none).")),
    "tile_size": (Optional[int], O(None, "--tile-size", min=defaults.MIN_SIZE, max=defaults.MAX_SIZE,
                                   help="Views of this many pixels for larger canvases (scene key tile_size; "
                                        "default: the model's native size, 512 on SD 1.x, 1024 on SDXL, SD3 and "
                                        "FLUX.1).")),
    "scheduler": (Optional[str], O(None, "--scheduler",
                                   help=f"{', '.join(defaults.SCHEDULERS[:-1])} or {defaults.SCHEDULERS[-1]} "
                                        f"(default {defaults.SCHEDULER}).")),
    "device": (Optional[str], O(None, "--device", help="auto, cpu, cuda, cuda:N or mps (default: SMD_DEVICE, "
                                                       "the config file's, else auto).")),
    "dtype": (Optional[str], O(None, "--dtype", help="auto, float32, float16 or bfloat16 (default: SMD_DTYPE, the "
                                                     "config file's, else auto).")),
    "lcm_lora": (Optional[str], O(None, "--lcm-lora", help="LCM LoRA (hub id, file or folder) or 'none' "
                                                           "(default: the model family's, where it has one).")),
    "vae": (Optional[str], O(None, "--vae", help="'tiny' (the family's TAESD), or a hub id or folder of an "
                                                 "autoencoder.")),
    "vae_tiles": (Optional[str], O(None, "--vae-tiles", metavar="SIZE|off",
                                   help="Decode (and encode) in tiles of SIZE pixels, exactly as in one pass, in "
                                        "memory set by the tile; 'off' for one pass (scene key vae_tiles; default: "
                                        "tiles past 2048 x 2048 pixels or when one pass would not fit).")),
    "max_batch": (Optional[int], O(None, "--max-batch", min=1, help="(layer, view) pairs per UNet call (default: "
                                                                    "from free memory on CUDA, 8 on the CPU).")),
    "set_": (List[str], O([], "--set", show_default=False, help="Override a scene key, e.g. --set "
                                                                "layers[0].prompt='a cat' (repeatable).")),
    "overwrite": (bool, O(False, "--overwrite", help="Replace existing files instead of numbering the new ones.")),
    "vary": (List[str], O([], "--vary", show_default=False, help="Sweep a scene key: one image per value, e.g. "
                                                                "--vary layers[0].mask_std=0:16:8 or --vary "
                                                                "region_mode=latent,attention (up to 3 keys).")),
    "grid": (bool, O(False, "--grid", help="Also write a contact sheet of the images, labelled by the varied "
                                           "keys: <first output folder>/<scene>-grid.png and .json.")),
    "grid_out": (Optional[str], O(None, "--grid-out", help="Write the contact sheet here (a .png; implies "
                                                           "--grid); pages are numbered -page1, -page2, ...")),
    "yes": (bool, O(False, "--yes", help="Make a --vary sweep of more than 1,000 images.")),
    "json_": (bool, O(False, "--json", help="One JSON object per image on stdout; all else on stderr.")),
    "dry_run": (bool, O(False, "--dry-run", help="Check everything and list what would be made; load no model.")),
    "quiet": (bool, O(False, "--quiet", "-q", help="Print only errors and the output paths.")),
    "verbose": (bool, O(False, "--verbose", "-v", help="Also print memory estimates, timings and tracebacks.")),
    "distributed": (bool, O(False, "--distributed", help="Share the images among processes, one per GPU.")),
    "processes": (Optional[int], O(None, "--processes", min=1, help="Processes for --distributed (default: one "
                                                                    "per GPU).")),
    "region_crop": (bool, O(False, "--region-crop", help="Denoise each layer only around its mask (close to, not "
                                                         "equal to, the default).")),
    "region_mode": (Optional[str], O(None, "--region-mode", help="latent (a denoiser row per layer, the default), "
                                                                 "attention (every layer in one row) or hybrid "
                                                                 "(scene key region_mode).")),
    "hires_scale": (Optional[float], O(None, "--hires-scale", help="A second pass: upscale the image this many "
                                                                   "times and denoise it again with the same layers "
                                                                   "(scene key hires.scale; above 1).")),
    "hires_strength": (Optional[float], O(None, "--hires-strength",
                                          help="How much of the schedule the second pass runs again, 0 to 1 "
                                               f"(scene key hires.strength; default {defaults.HIRES_STRENGTH}).")),
    "hires_steps": (Optional[int], O(None, "--hires-steps", help="The second pass's schedule, of which it runs the "
                                                                 "last strength share (scene key hires.steps; "
                                                                 "default: the scene's steps).")),
    "compile_": (bool, O(False, "--compile", help="torch.compile the UNet (CUDA graphs in smd stream).")),
    "channels_last": (bool, O(False, "--channels-last", help="Channels-last memory for the UNet (the VAE uses it "
                                                            "on a CPU).")),
    "threads": (Optional[int], O(None, "--threads", min=1, help="CPU threads for torch (fewer than the cores when "
                                                                "the machine is busy).")),
    "offload": (bool, O(False, "--offload", help="Keep the weights in CPU memory and move each model to the GPU "
                                                 "while it runs (for GPUs too small for the model).")),
    "allow_large": (bool, O(False, "--allow-large", help=f"Run scenes past {defaults.LARGE_WORK:,} denoiser passes "
                                                         "an image (views x layers x steps); past "
                                                         f"{defaults.MAX_WORK:,} smd refuses even so.")),
}
MODEL_OPTIONS = ("model", "config", "device", "dtype", "lcm_lora", "vae", "offload")
REPORTING = ("json_", "quiet", "verbose")
GENERATING = ("model", "config", "output", "seed", "seeds", "repeat", "steps", "scheduler", "guidance_scale",
              "tile_size", "device", "dtype", "lcm_lora", "vae", "vae_tiles", "max_batch", "set_",
              "vary", "grid", "grid_out", "yes", "overwrite", "json_", "dry_run",
              "quiet", "verbose", "distributed", "processes", "region_crop", "region_mode",
              "hires_scale", "hires_strength", "hires_steps", "compile_", "channels_last", "threads",
              "offload", "allow_large")


def shared(*names: str):
    """Give a command the named options of `OPTIONS`; it receives their values as one `opts` namespace."""
    def decorate(command):
        hints = typing.get_type_hints(command)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != "opts"]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=OPTIONS[name][1],
                                   annotation=OPTIONS[name][0]) for name in names]

        @functools.wraps(command)
        def wrapper(**values):
            opts = SimpleNamespace(**{name.rstrip("_"): values.pop(name) for name in names})
            return command(**values, opts=opts)

        wrapper.__signature__ = inspect.Signature(own + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate


def library_options(opts: SimpleNamespace, **fields) -> batch.Options:
    """The batch's options: each shared option a command has, under its own name, then `fields`."""
    from smd_cli.app.batch import Options

    given = {f.name: getattr(opts, f.name) for f in dataclasses.fields(Options) if hasattr(opts, f.name)}
    return Options(**{**given, **fields})


def check_reporting(opts: SimpleNamespace) -> None:
    """The reporting options (REPORTING) agree with each other."""
    if opts.quiet and opts.verbose:
        raise SmdError("give --quiet or --verbose, not both")


def hires_overrides(opts: SimpleNamespace) -> dict:
    """--hires-scale, --hires-strength and --hires-steps as scene keys (`hires.scale`, ...)."""
    return {("hires", name): getattr(opts, f"hires_{name}") for name in ("scale", "strength", "steps")
            if getattr(opts, f"hires_{name}", None) is not None}


def batch_options(opts: SimpleNamespace, **scene_keys) -> batch.Options:
    """The batch's options of a generating command, checking those that conflict before any scene is
    read. `scene_keys` are the command's own scene keys (width, circular, ...)."""
    from smd_cli.app.batch import parse_seeds
    from smd_cli.app.sweeps import Sweep
    from smd_cli.core.outputs import check_template
    from smd_cli.scenes.scene import merge_overrides

    if opts.seed is not None and (opts.seeds or opts.repeat):
        raise SmdError("give --seed, --seeds or --repeat, not several of them")
    if opts.seeds and opts.repeat:
        raise SmdError("give --seeds or --repeat, not both")
    check_reporting(opts)
    if opts.output is not None:
        check_template(opts.output)
    vae_tiles = getattr(opts, "vae_tiles", None)
    if vae_tiles is not None:
        from smd_cli.method.views import vae_tiles_setting

        try:
            vae_tiles = vae_tiles_setting(vae_tiles) or "auto"
        except SmdError as exc:
            raise SmdError("--" + str(exc).replace("_", "-", 1)) from None
    values = dict(seed=opts.seed, region_crop=opts.region_crop or None, region_mode=opts.region_mode,
                  vae_tiles=vae_tiles,
                  steps=opts.steps, scheduler=opts.scheduler,
                  guidance_scale=opts.guidance_scale, tile_size=opts.tile_size, **scene_keys)
    values.update(hires_overrides(opts))
    overrides = merge_overrides([(k, v) for k, v in values.items() if v is not None] + list(opts.set))
    if opts.grid_out is not None:
        from smd_cli.app.grid import check_sheet_path

        check_sheet_path(opts.grid_out)
    return library_options(opts, overrides=overrides, seeds=parse_seeds(opts.seeds) if opts.seeds else None,
                           sweep=Sweep.parse(list(opts.vary)) if opts.vary else None)
