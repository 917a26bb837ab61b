"""The `smd` command line: a thin shell over the library. No math and no model logic here.

Heavy modules are imported inside the commands that need them, so `smd --help` and
`smd validate` never load torch or diffusers.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from smd_cli import __version__
from smd_cli.errors import SmdError

if TYPE_CHECKING:
    from smd_cli.scene import SceneFile

app = typer.Typer(
    name="smd",
    help="Region-based multi-prompt image generation with StreamMultiDiffusion.\n\n"
         "Paint masks, give each a prompt in a YAML scene, and run `smd generate scene.yaml`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# Piped into a file or another program, tables are as wide as their content: no cell is cut short.
PIPE_WIDTH = 10_000
# No markup, highlighting or emoji codes: a path like `x:cat:1.png` must print as it is on disk.
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False,
              width=None if sys.stderr.isatty() else PIPE_WIDTH)
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False,
              width=None if sys.stdout.isatty() else PIPE_WIDTH)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err.print(f"[yellow]warning:[/] {escape(str(message))}", markup=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print smd's own errors as one clean line and exit 2; Ctrl-C exits 130."""
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        yield
    except SmdError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", markup=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    finally:
        warnings.showwarning = previous


def _version(value: bool) -> None:
    if value:
        out.print(f"smd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Show the version and exit.")) -> None:
    """Region-based multi-prompt image generation with StreamMultiDiffusion."""


SET_HELP = "Override a scene key, e.g. --set layers[0].prompt='a cat' or --set bootstrap.steps=2 (repeatable)."


@app.command()
def validate(
    scenes: List[Path] = typer.Argument(..., help="Scene files (YAML) to check.", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", help="Model whose downscale factor the canvas must fit "
                                        "(read from its config only; nothing is loaded)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP, show_default=False),
) -> None:
    """Check scene files without loading any model: keys, values, mask files, coverage."""
    from rich.table import Table

    from smd_cli.masks import checked_canvas, coverage_report, scene_masks
    from smd_cli.models import vae_downscale_factor
    from smd_cli.scene import load_scene

    failed = 0
    for path in scenes:
        with contextlib.suppress(typer.Exit):
            try:
                with user_errors():
                    sf = load_scene(path, set_)
                    width, height = checked_canvas(sf, vae_downscale_factor(model or sf.source(sf.scene.model)) or 8)
                    sm = scene_masks(sf, width, height)
                    rows, uncovered = coverage_report(sm.masks, sm.names)
                    table = Table(title=f"{path}  {width}x{height}, {len(rows)} layer(s)", title_justify="left")
                    for column in ("#", "layer", "prompt", "mask", "coverage", "overlaps"):
                        table.add_column(column, justify="right" if column in ("#", "coverage") else "left")
                    for i, (row, layer) in enumerate(zip(rows, sf.scene.layers)):
                        overlaps = ", ".join(f"{k} {v:.1f}%" for k, v in row.overlaps.items()) or "-"
                        table.add_row(str(i), row.name, _short(layer.prompt), _describe_mask(layer.mask),
                                      f"{row.coverage:.1f}%", overlaps)
                    out.print(table)
                    bg = sf.scene.background.prompt
                    out.print(f"uncovered (background{': ' + repr(_short(bg)) if bg else ''}): {uncovered:.1f}%\n")
            except typer.Exit:
                failed += 1
    if failed:
        raise typer.Exit(2)


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe_mask(mask) -> str:
    if mask is None:
        return "whole canvas"
    for key in ("image", "palette", "rect", "ellipse"):
        if hasattr(mask, key):
            value = getattr(mask, key)
            extra = f" {mask.color}" if key == "palette" else ""
            return f"{key} {list(value) if isinstance(value, tuple) else value}{extra}"
    return str(mask)


# Options shared by every command that generates images.
MODEL = typer.Option(None, "--model", "-m", help="Hub id, local diffusers folder or .safetensors file "
                     "(default: the scene's, else SD1.5 + LCM LoRA).")
CONFIG = typer.Option(None, "--config", help="Local diffusers folder to take configs from, for a .safetensors "
                      "--model offline.")
OUT = typer.Option(None, "--out", "-o", help="Output file or folder; may use {scene}, {seed}, {steps}, {index}, "
                   "{date}, {time}. Default: the scene's `output`, else {scene}-{seed}.png.")
SEED = typer.Option(None, "--seed", min=0, help="Random seed (default: the scene's, else random).")
SEEDS = typer.Option(None, "--seeds", help="Several seeds, one image each: 1,2,3 or 10-20 or a mix.")
REPEAT = typer.Option(None, "--repeat", min=1, help="N images per scene with random seeds (printed).")
STEPS = typer.Option(None, "--steps", min=1, max=1000, help="Number of steps (LCM default 5).")
SCHEDULER = typer.Option(None, "--scheduler", help="lcm (default), ddim or euler.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")
DTYPE = typer.Option("auto", "--dtype", help="auto, float32, float16 or bfloat16.")
LCM_LORA = typer.Option(None, "--lcm-lora", help="LCM LoRA: hub id, file or folder, or 'none' "
                        "(default: the SD1.5 LCM LoRA where it fits).")
VAE = typer.Option(None, "--vae", help="'tiny' for the tiny autoencoder (TAESD), or a hub id or folder of one.")
MAX_BATCH = typer.Option(None, "--max-batch", min=1, help="(layer, view) pairs per UNet call "
                         "(default: from free memory on CUDA, 8 on the CPU; halved on out-of-memory).")
SET = typer.Option([], "--set", help=SET_HELP, show_default=False)
OVERWRITE = typer.Option(False, "--overwrite", help="Replace existing files instead of adding -1, -2, ... "
                         "to the new file's name.")
JSON = typer.Option(False, "--json", help="One JSON object per image on stdout (scene, seed, path, seconds, "
                    "status); everything else goes to stderr.")
DRY_RUN = typer.Option(False, "--dry-run", help="Check everything and list what would be made; load no model.")
QUIET = typer.Option(False, "--quiet", "-q", help="Print only errors and the output paths.")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Also print memory estimates, timings and tracebacks.")
DISTRIBUTED = typer.Option(False, "--distributed", help="Share the images among --processes processes "
                           "with Hugging Face Accelerate (one per GPU).")
PROCESSES = typer.Option(None, "--processes", min=1, help="Processes for --distributed (default: one per GPU).")
REGION_CROP = typer.Option(False, "--region-crop", help="Denoise each layer only around its mask (faster for "
                           "small regions on large canvases; close to, not equal to, the default). Scene key "
                           "region_crop.")
COMPILE = typer.Option(False, "--compile", help="torch.compile the UNet (slow first call per batch shape; "
                       "CUDA graphs in smd stream).")
CHANNELS_LAST = typer.Option(False, "--channels-last", help="Channels-last memory layout for the UNet and VAE.")


@dataclass
class RunOptions:
    """What the generating commands share: model choice, outputs, batch shape and reporting."""

    model: Optional[str] = None
    config: Optional[str] = None
    output: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    lcm_lora: Optional[str] = None
    vae: Optional[str] = None
    max_batch: Optional[int] = None
    overrides: list = field(default_factory=list)
    seeds: Optional[str] = None
    repeat: Optional[int] = None
    overwrite: bool = False
    json: bool = False
    dry_run: bool = False
    quiet: bool = False
    verbose: bool = False
    distributed: bool = False
    processes: Optional[int] = None
    compile: bool = False
    channels_last: bool = False


def _overrides(set_: list[str], **values) -> list:
    return [(k, v) for k, v in values.items() if v is not None] + list(set_)


# Command parameters named apart from their RunOptions field (Python builtins).
RENAMED = {"json_": "json", "compile_": "compile"}


def _options(params: dict, **scene_overrides) -> RunOptions:
    """RunOptions from a command's parameters (its `locals()`), checking the options that conflict
    before any scene is read. `scene_overrides` are the command's own scene keys (steps, width, ...)."""
    names = {f.name for f in fields(RunOptions)} - {"overrides"}
    values = {RENAMED.get(k, k): v for k, v in params.items()}
    opts = RunOptions(**{k: v for k, v in values.items() if k in names})
    seed = values.get("seed")
    if seed is not None and (opts.seeds or opts.repeat):
        raise SmdError("give --seed, --seeds or --repeat, not several of them")
    if opts.seeds and opts.repeat:
        raise SmdError("give --seeds or --repeat, not both")
    if opts.quiet and opts.verbose:
        raise SmdError("give --quiet or --verbose, not both")
    opts.overrides = _overrides(values.get("set_", []), seed=seed, region_crop=values.get("region_crop") or None,
                                **scene_overrides)
    if opts.seeds is not None:
        from smd_cli.batch import parse_seeds

        parse_seeds(opts.seeds)
    if opts.output is not None:
        from smd_cli.outputs import check_template

        check_template(opts.output)
    return opts


@app.command()
def generate(
    scenes: List[Path] = typer.Argument(None, help="Scene files (YAML). Omit them to use --prompt.",
                                        show_default=False),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Plain text-to-image without a scene."),
    negative_prompt: str = typer.Option("", "--negative-prompt", "-n", help="Negative prompt for --prompt."),
    width: Optional[int] = typer.Option(None, "--width", min=8, help="Canvas width in pixels."),
    height: Optional[int] = typer.Option(None, "--height", min=8, help="Canvas height in pixels."),
    model: Optional[str] = MODEL, config: Optional[str] = CONFIG, output: Optional[str] = OUT,
    seed: Optional[int] = SEED, seeds: Optional[str] = SEEDS, repeat: Optional[int] = REPEAT,
    steps: Optional[int] = STEPS, scheduler: Optional[str] = SCHEDULER,
    device: str = DEVICE, dtype: str = DTYPE, lcm_lora: Optional[str] = LCM_LORA, vae: Optional[str] = VAE,
    max_batch: Optional[int] = MAX_BATCH, set_: List[str] = SET, overwrite: bool = OVERWRITE, json_: bool = JSON,
    dry_run: bool = DRY_RUN, quiet: bool = QUIET, verbose: bool = VERBOSE, distributed: bool = DISTRIBUTED,
    processes: Optional[int] = PROCESSES, region_crop: bool = REGION_CROP, compile_: bool = COMPILE,
    channels_last: bool = CHANNELS_LAST,
) -> None:
    """Generate images from scenes (one per scene and seed), loading the model once for all of them.

    A scene that fails does not stop the others: a summary follows, and the exit code is 0 when
    every image was made, 1 when some failed, 2 when none could start.
    """
    params = locals()
    with user_errors():
        from smd_cli.scene import scene_from_prompt

        opts = _options(params, steps=steps, width=width, height=height, scheduler=scheduler)
        files = list(scenes or [])
        if not files and prompt is None:
            raise SmdError("give one or more scene files, or --prompt \"...\"")
        if files and prompt is not None:
            raise SmdError("give either scene files or --prompt, not both")
        if prompt is not None:
            _run([scene_from_prompt(prompt, negative_prompt, _as_overrides(opts.overrides))], opts)
        else:
            _run(files, opts)


@app.command()
def inpaint(
    scenes: List[Path] = typer.Argument(..., help="Scene files (YAML) whose background.image is the picture.",
                                        show_default=False),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="The picture to paint on "
                                         "(instead of the scene's background.image)."),
    model: Optional[str] = MODEL, config: Optional[str] = CONFIG, output: Optional[str] = OUT,
    seed: Optional[int] = SEED, seeds: Optional[str] = SEEDS, repeat: Optional[int] = REPEAT,
    steps: Optional[int] = STEPS, scheduler: Optional[str] = SCHEDULER,
    device: str = DEVICE, dtype: str = DTYPE, lcm_lora: Optional[str] = LCM_LORA, vae: Optional[str] = VAE,
    max_batch: Optional[int] = MAX_BATCH, set_: List[str] = SET, overwrite: bool = OVERWRITE, json_: bool = JSON,
    dry_run: bool = DRY_RUN, quiet: bool = QUIET, verbose: bool = VERBOSE, distributed: bool = DISTRIBUTED,
    processes: Optional[int] = PROCESSES, region_crop: bool = REGION_CROP, compile_: bool = COMPILE,
    channels_last: bool = CHANNELS_LAST,
) -> None:
    """Paint the scene's layers over a picture; outside every mask the picture stays as it was."""
    params = locals()
    with user_errors():
        if image is not None and not image.is_file():
            raise SmdError(f"--image {image}: file not found")
        opts = _options(params, steps=steps, scheduler=scheduler)
        if image is not None:
            opts.overrides.append((("background", "image"), str(image.resolve())))

        def needs_picture(sf: SceneFile) -> None:
            if sf.scene.background.image is None:
                raise sf.error(("background",), "inpainting needs a picture: set background.image in the scene "
                                                "or pass --image PATH")

        _run(list(scenes), opts, check=needs_picture)


@app.command()
def panorama(
    prompt: str = typer.Argument(..., help="The prompt, or a scene file with one layer and a wide canvas."),
    negative_prompt: str = typer.Option("", "--negative", "-n", help="Negative prompt."),
    width: Optional[int] = typer.Option(None, "--width", min=8, help="Width in pixels (default 3072)."),
    height: Optional[int] = typer.Option(None, "--height", min=8, help="Height in pixels (default 512)."),
    circular: bool = typer.Option(False, "--circular", help="A 360-degree panorama: the left and right "
                                  "edges join without a seam."),
    model: Optional[str] = MODEL, config: Optional[str] = CONFIG, output: Optional[str] = OUT,
    seed: Optional[int] = SEED, seeds: Optional[str] = SEEDS, repeat: Optional[int] = REPEAT,
    steps: Optional[int] = STEPS, scheduler: Optional[str] = SCHEDULER,
    device: str = DEVICE, dtype: str = DTYPE, lcm_lora: Optional[str] = LCM_LORA, vae: Optional[str] = VAE,
    max_batch: Optional[int] = MAX_BATCH, set_: List[str] = SET, overwrite: bool = OVERWRITE, json_: bool = JSON,
    dry_run: bool = DRY_RUN, quiet: bool = QUIET, verbose: bool = VERBOSE, distributed: bool = DISTRIBUTED,
    processes: Optional[int] = PROCESSES, region_crop: bool = REGION_CROP, compile_: bool = COMPILE,
    channels_last: bool = CHANNELS_LAST,
) -> None:
    """Generate a wide image from one prompt, denoised in overlapping views."""
    params = locals()
    with user_errors():
        from smd_cli.scene import scene_from_prompt

        is_scene = prompt.endswith((".yaml", ".yml"))
        if is_scene and not Path(prompt).is_file():
            raise SmdError(f"{prompt}: scene file not found (a prompt that ends in .yaml: write it differently)")
        opts = _options(params, steps=steps, scheduler=scheduler, circular=circular or None,
                        width=width if width or is_scene else PANORAMA_WIDTH,
                        height=height if height or is_scene else PANORAMA_HEIGHT)

        def one_layer(sf: SceneFile) -> None:
            if len(sf.scene.layers) != 1:
                raise sf.error(("layers",), f"a panorama scene has one layer, this one has {len(sf.scene.layers)}; "
                                            "use `smd generate` for several")

        if is_scene:
            _run([Path(prompt)], opts, check=one_layer)
        else:
            _run([scene_from_prompt(prompt, negative_prompt, _as_overrides(opts.overrides), name="panorama")], opts)


PANORAMA_WIDTH, PANORAMA_HEIGHT = 3072, 512


@app.command()
def show(
    image: Path = typer.Argument(..., help="A PNG made by smd.", show_default=False),
    json_: bool = typer.Option(False, "--json", help="Print the record as JSON instead of YAML."),
) -> None:
    """Print how an image was made: scene, seed, model, versions, timings, and whether its files changed."""
    with user_errors():
        import json

        from smd_cli.metadata import as_dict, describe, read_record

        record = read_record(image)
        if json_:
            out.print(json.dumps(as_dict(record), indent=2))
        else:
            out.print(describe(record), end="")


@app.command()
def reproduce(
    image: Path = typer.Argument(..., help="A PNG made by smd.", show_default=False),
    output: Optional[str] = typer.Option(None, "--out", "-o", help="Where to write the new image "
                                         "(default: IMAGE's name with -reproduced, beside it)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Use this model instead of the recorded "
                                        "one (moved folders)."),
    config: Optional[str] = CONFIG,
    device: Optional[str] = typer.Option(None, "--device", help="Default: the recorded kind of device "
                                         "(cpu, cuda, mps); results are identical only on the same kind."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Default: the recorded one."),
    max_batch: Optional[int] = MAX_BATCH, overwrite: bool = OVERWRITE, json_: bool = JSON,
    quiet: bool = QUIET, verbose: bool = VERBOSE,
) -> None:
    """Make an image again from the record in it, and say whether the result is identical."""
    with user_errors():
        from smd_cli.metadata import read_record

        record = read_record(image)
        sf = record.scene_file()  # its files' hashes are checked as they are read, with a warning each
        if output is None:
            output = str(image.with_name(f"{image.stem}-reproduced.png"))
        recorded_device = (record.device or "auto").split(":")[0]  # the kind: cuda:1 ran there, cuda runs here
        opts = _options(dict(model=model, config=config or record.config, output=output,
                             device=device or recorded_device, dtype=dtype or record.dtype or "auto",
                             max_batch=max_batch, overwrite=overwrite, json=json_, quiet=quiet, verbose=verbose))
        outcomes = _run([sf], opts, exit_when_done=False)
        done = [o for o in outcomes if o.path]
        if done:
            _compare(image, Path(done[0].path))
        from smd_cli.batch import exit_code

        raise typer.Exit(exit_code(outcomes))


def _compare(original: Path, new: Path) -> None:
    import numpy as np
    from PIL import Image

    with Image.open(original) as a, Image.open(new) as b:
        x, y = np.asarray(a.convert("RGB"), np.int16), np.asarray(b.convert("RGB"), np.int16)
    if x.shape != y.shape:
        err.print(f"differs from {original}: {y.shape[1]}x{y.shape[0]} instead of {x.shape[1]}x{x.shape[0]}")
    elif (x == y).all():
        err.print(f"identical to {original}")
    else:
        diff = np.abs(x - y)
        err.print(f"differs from {original}: {100 * (diff.max(-1) > 0).mean():.1f}% of pixels, "
                  f"by up to {int(diff.max())} of 255 (another device or dtype, or changed files)")


@app.command()
def stream(
    scene: Path = typer.Argument(..., help="Scene file (YAML) to stream.", show_default=False, metavar="SCENE"),
    frames: Optional[int] = typer.Option(None, "--frames", min=1, help="Stop after N frames."),
    seconds: Optional[float] = typer.Option(None, "--seconds", min=0.0, help="Stop after S seconds."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="A folder (numbered PNGs), FILE.gif or "
                                          "FILE.mp4. Without it frames are only shown (--preview)."),
    fps: float = typer.Option(8.0, "--fps", min=0.1, help="Frame rate of a GIF or MP4."),
    watch: bool = typer.Option(False, "--watch", help="Apply edits of the scene file and its images live."),
    preview: Optional[str] = typer.Option(None, "--preview", help="Serve live frames over HTTP at [HOST:]PORT "
                                          "(default host 127.0.0.1)."),
    cfg_type: str = typer.Option("none", "--cfg", help="Guidance in the stream: none, full, self or initialize."),
    model: Optional[str] = MODEL, config: Optional[str] = CONFIG, device: str = DEVICE, dtype: str = DTYPE,
    lcm_lora: Optional[str] = LCM_LORA, vae: Optional[str] = VAE, set_: List[str] = SET,
    overwrite: bool = OVERWRITE, quiet: bool = QUIET, compile_: bool = COMPILE, channels_last: bool = CHANNELS_LAST,
    overlap_decode: bool = typer.Option(False, "--overlap-decode", help="Decode each frame while the UNet "
                                        "works on the next (a GPU side stream; a thread elsewhere)."),
) -> None:
    """Stream frames from a scene while you edit it: runs until --frames/--seconds or Ctrl-C.

    An existing GIF or MP4 is kept (the new one gets -1, -2, ...); frames in an existing folder
    are numbered on after the ones there. --overwrite replaces instead.
    """
    with user_errors():
        from smd_cli.live import (
            FrameSink,
            LiveState,
            PreviewServer,
            SceneWatcher,
            StreamRun,
            parse_address,
            run_stream,
            scene_stream,
        )
        from smd_cli.masks import checked_canvas, scene_masks
        from smd_cli.models import check_source, resolve_device, resolve_dtype, vae_downscale_factor
        from smd_cli.scene import STREAM_CFG_TYPES, load_scene

        if cfg_type not in STREAM_CFG_TYPES:
            raise SmdError(f"--cfg must be one of {', '.join(STREAM_CFG_TYPES)}, got {cfg_type!r}")
        overrides = _as_overrides(list(set_))
        sf = load_scene(scene, overrides)
        check_source(model or sf.source(sf.scene.model))
        scene_masks(sf, *checked_canvas(sf, vae_downscale_factor(model or sf.source(sf.scene.model)) or 8))
        address = parse_address(preview) if preview else None
        opts = RunOptions(model, config, None, device, dtype, lcm_lora, vae, quiet=quiet, channels_last=channels_last)
        ui = Ui(opts)
        sink = FrameSink(output, fps, overwrite)  # checks the output before the model loads
        resolved = resolve_device(device)
        pipe = _pipeline({}, opts, sf, resolved, resolve_dtype(dtype, resolved), ui)
        live = scene_stream(sf, pipe, cfg_type=cfg_type, overlap_decode=overlap_decode, compile=compile_)
        state = LiveState(prompts=[layer.prompt for layer in live.layers])
        server = None
        if address is not None:
            server = PreviewServer(state, *address).start()
            host, port = server.address
            ui.info(f"preview at http://{host}:{port}/")
        watcher = SceneWatcher(scene, overrides) if watch else None
        if watcher is not None:
            watcher.watch(sf)
        status = err.status("starting") if err.is_terminal and not quiet else contextlib.nullcontext()
        run = StreamRun()
        try:
            with status as line:
                def show(index, frame, run) -> None:
                    if line is not None:
                        line.update(f"{index} frames, {run.fps:.2f} frames/s, {run.last_call * 1000:.0f} ms a "
                                    f"frame, last reload: {run.last_reload}")

                run_stream(live, sink, frames=frames, seconds=seconds, watcher=watcher, state=state,
                           on_frame=show, on_reload=lambda text: ui.info(f"reload: {text}"), run=run)
        except KeyboardInterrupt:
            err.print(f"interrupted after {run.frames} frames" + (f"; kept in {run.written}" if run.written else ""))
            if run.written is not None:
                out.print(str(run.written))
            raise typer.Exit(130) from None
        finally:
            if server is not None:
                server.stop()
        ui.info(f"{run.frames} frames, {run.fps:.2f} frames/s")
        if run.written is not None:
            out.print(str(run.written))


class Ui:
    """Where each kind of message goes: results on stdout, everything else on stderr."""

    def __init__(self, opts: RunOptions, main: bool = True):
        self.quiet, self.verbose, self.json, self.main = opts.quiet, opts.verbose, opts.json, main

    def info(self, text: str) -> None:
        if not self.quiet:
            err.print(text)

    def detail(self, text: str) -> None:
        if self.verbose:
            err.print(text)

    def error(self, text: str) -> None:
        err.print(f"[red]error:[/] {escape(text)}", markup=True)

    def result(self, outcome) -> None:
        import json

        if self.json:
            out.print(json.dumps(outcome.as_json()), soft_wrap=True)
        elif outcome.path and outcome.status == "done":
            out.print(outcome.path)


def _run(items: list, opts: RunOptions, check=None, exit_when_done: bool = True) -> list:
    """Plan every image (scenes x seeds), check everything, then load the model once and make them.

    `items` are scene paths (read here, so that a broken one fails alone) or ready `SceneFile`s.
    A failing image does not stop the others; the exit code sums them up (see `batch.exit_code`).
    """
    from smd_cli.batch import INTERRUPTED, Shard, exit_code, join_processes, launched_distributed, with_seed
    from smd_cli.models import available_memory, check_source, resolve_device, resolve_dtype

    if opts.distributed and not launched_distributed():
        _launch(opts)  # runs this same command in several processes, then exits
    shard = join_processes(cpu=opts.device == "cpu") if launched_distributed() else Shard()
    ui = Ui(opts, main=shard.main)
    if opts.model:
        check_source(opts.model)
    device = shard.state.device if shard.state is not None and opts.device == "auto" else resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    free = shard.least(available_memory(device))  # the same in every process, so all plan the same
    jobs, invalid = _plan(items, opts, check, device, dtype, free, ui)
    if shard.size > 1:  # seeds drawn at random must be the same in every process
        from accelerate.utils import broadcast_object_list

        seeds = broadcast_object_list([[job.seed for job in jobs]])[0]
        for job, seed in zip(jobs, seeds):
            job.seed, job.scene = seed, with_seed(job.scene, seed)
    if shard.main:
        for outcome in invalid:
            ui.error(outcome.error)
            if ui.json:
                ui.result(outcome)
    _check_distinct_outputs(jobs, opts)
    if opts.dry_run:
        if shard.main:
            _print_plan(jobs, opts, ui, device, dtype)
        code = 2 if not jobs else (1 if invalid else 0)
        if exit_when_done:
            raise typer.Exit(code)
        return invalid
    if not jobs:
        raise typer.Exit(2)
    if shard.size > 1:
        ui.detail(f"process {shard.rank + 1} of {shard.size}: {len(shard.take(jobs))} of {len(jobs)} images "
                  f"on {device}")
    outcomes = _execute(shard.take(jobs), opts, ui, device, dtype)
    interrupted = any(o.status == INTERRUPTED for o in outcomes)
    everything = (invalid if shard.main else []) + outcomes
    if not interrupted:
        everything = shard.gather(everything)
    if shard.main or interrupted:
        _summary(everything, ui, interrupted, f" of process {shard.rank + 1} of {shard.size}"
                 if interrupted and shard.size > 1 else "")
    code = 130 if interrupted else exit_code(everything)
    if exit_when_done:
        raise typer.Exit(code)
    return everything


def _plan(items: list, opts: RunOptions, check, device, dtype, free: int | None, ui: Ui) -> tuple[list, list]:
    """Every image to make as a `Job`, and an `Outcome` for each scene that cannot start."""
    from datetime import datetime

    from smd_cli.batch import INVALID, Job, Outcome, parse_seeds, seeds_for, with_seed
    from smd_cli.masks import checked_canvas, scene_masks
    from smd_cli.models import check_source, vae_downscale_factor
    from smd_cli.outputs import check_writable
    from smd_cli.scene import load_scene, step_count

    now = datetime.now()
    seeds = parse_seeds(opts.seeds) if opts.seeds else None
    jobs: list = []
    invalid: list = []
    for item in items:
        file = str(item) if isinstance(item, Path) else None
        name = item.stem if isinstance(item, Path) else item.name
        try:
            sf = load_scene(item, _as_overrides(opts.overrides)) if isinstance(item, Path) else item
            if check is not None:
                check(sf)
            model = opts.model or sf.source(sf.scene.model)
            check_source(model)
            factor = vae_downscale_factor(model) or 8
            width, height = checked_canvas(sf, factor)
            masks = scene_masks(sf, width, height)
            _check_memory(sf, model, width, height, factor, device, dtype, free, opts, ui)
            template = _output_template(sf, opts.output)
            made = [Job(len(jobs) + n, with_seed(sf, seed), seed, template, masks, drawn)
                    for n, (seed, drawn) in enumerate(seeds_for(sf, seeds, opts.repeat))]
            for job in made:
                check_writable(_job_path(job, now))
        except SmdError as exc:
            invalid.append(Outcome(scene=name, file=file, seed=None, status=INVALID, error=str(exc)))
            continue
        jobs.extend(made)
        drawn = [job.seed for job in made if job.random_seed]
        if opts.repeat and drawn:
            ui.detail(f"{sf.name}: random seeds {', '.join(map(str, drawn))}")
        ui.detail(f"{sf.name}: {width}x{height}, {len(sf.scene.layers)} layer(s), "
                  f"{step_count(sf.scene)} {sf.scene.scheduler} steps")
    return jobs, invalid


def _job_path(job, when=None) -> Path:
    from smd_cli.outputs import output_path
    from smd_cli.scene import step_count

    return output_path(job.template, scene=job.scene.name, seed=job.seed, steps=step_count(job.scene.scene),
                       index=job.index, when=when)


def _check_distinct_outputs(jobs: list, opts: RunOptions) -> None:
    """Images of one batch must not share a file where one would replace another: with an explicit
    --out, or with --overwrite. (Otherwise a clash is numbered -1, -2, ... like any existing file.)"""
    if len(jobs) < 2 or (opts.output is None and not opts.overwrite):
        return
    from datetime import datetime

    now = datetime.now()
    paths = [_job_path(job, now).absolute() for job in jobs]
    if len(set(paths)) == len(paths):
        return
    scenes = len({job.scene.name for job in jobs})
    what = f"{len(jobs)} images" if scenes == 1 else f"{scenes} scenes" if scenes == len(jobs) else \
        f"{len(jobs)} images of {scenes} scenes"
    if opts.output is not None:
        raise SmdError(f"--out {opts.output} names one file for {what}; give a folder, or a template with "
                       "{scene}, {seed} or {index}")
    clash = next(p for p in paths if paths.count(p) > 1)
    raise SmdError(f"with --overwrite, images would replace each other in {clash}; give --out with {{scene}}, "
                   "{seed} or {index}, or leave out --overwrite to number them")


def _check_memory(sf: SceneFile, model, width: int, height: int, factor: int, device, dtype, free: int | None,
                  opts: RunOptions, ui: Ui) -> None:
    """Refuse, before loading anything, a canvas that clearly cannot fit on the device."""
    import torch

    from smd_cli.models import AUTO_BATCH_CPU, estimate_memory

    batch = opts.max_batch or (1 if device.type == "cuda" else AUTO_BATCH_CPU)
    cfg = sf.scene.guidance_scale > 1.0
    est = estimate_memory(model, width=width, height=height, factor=factor, tile_size=sf.scene.tile_size,
                          max_batch=batch, cfg=cfg, dtype_bytes=torch.finfo(dtype).bits // 8,
                          vae=opts.vae or sf.source(sf.scene.vae))
    gib = 1024**3
    parts = (f"weights {est.weights / gib:.1f}, UNet batch of {batch} {est.unet / gib:.1f}, "
             f"decoding {est.decode / gib:.1f}")
    ui.detail(f"{sf.name}: needs about {est.total / gib:.1f} GiB ({parts})"
              + (f", {free / gib:.1f} GiB free on {device}" if free is not None else ""))
    if free is not None and est.total > free:
        hint = "lower --max-batch or tile_size" if est.unet > est.decode else (
            "use --vae tiny, whose decoder needs far less" if est.vae_is_full else "the decoder alone is too large")
        raise sf.error(("width",), f"a {width}x{height} canvas needs about {est.total / gib:.1f} GiB on {device} "
                                   f"({parts} GiB) but only {free / gib:.1f} GiB is free; {hint}, or make the "
                                   "canvas smaller")


def _execute(jobs: list, opts: RunOptions, ui: Ui, device, dtype) -> list:
    """Make the images one after another; a failure is recorded and the batch goes on."""
    import traceback

    from smd_cli.batch import DONE, FAILED, INTERRUPTED, INVALID, SKIPPED

    pipes: dict = {}
    outcomes: list = []
    for n, job in enumerate(jobs):
        started = time.perf_counter()
        try:
            try:
                pipe = _pipeline(pipes, opts, job.scene, device, dtype, ui)
                s = job.scene.scene
                pipe.schedule(s.steps, s.timesteps, s.scheduler)
            except SmdError as exc:  # no model, or steps it cannot take: the image never started
                outcome = job.outcome(INVALID, error=str(exc))
            else:
                outcome = job.outcome(DONE, path=str(_render(pipe, job, opts, ui)))
        except KeyboardInterrupt:
            outcomes.append(job.outcome(INTERRUPTED, seconds=time.perf_counter() - started))
            outcomes += [later.outcome(SKIPPED) for later in jobs[n + 1:]]
            err.print("interrupted")
            break
        except SmdError as exc:
            outcome = job.outcome(FAILED, error=str(exc))
        except Exception as exc:  # a bug or a library failure: report it and go on with the batch
            outcome = job.outcome(FAILED, error=f"{type(exc).__name__}: {exc}")
            ui.detail(traceback.format_exc())
        outcome.seconds = time.perf_counter() - started
        if outcome.status != DONE:
            ui.error(f"{outcome.scene} (seed {job.seed}): {outcome.error}")
        ui.result(outcome)
        outcomes.append(outcome)
    return outcomes


def _summary(outcomes: list, ui: Ui, interrupted: bool, which: str = "") -> None:
    """A table of every image at the end of a batch (always after a failure or Ctrl-C)."""
    from rich.table import Table

    from smd_cli.batch import DONE, tally

    troubled = interrupted or any(o.status != DONE for o in outcomes)
    if (len(outcomes) < 2 and not interrupted) or (ui.quiet and not troubled):
        return
    table = Table(title=f"summary{which}", title_justify="left")
    for column in ("scene", "seed", "status", "output", "seconds"):
        table.add_column(column, justify="right" if column in ("seed", "seconds") else "left")
    for o in outcomes:
        table.add_row(o.scene, "-" if o.seed is None else str(o.seed), o.status,
                      o.path or _short(o.error or "-", 60), f"{o.seconds:.1f}" if o.seconds else "-")
    err.print(table)
    err.print(tally(outcomes))


def _print_plan(jobs: list, opts: RunOptions, ui: Ui, device, dtype) -> None:
    """What a run would make, without loading a model: a table, or JSON lines with --json."""
    import json

    from rich.table import Table

    from smd_cli.scene import DEFAULT_MODEL, step_count

    rows = []
    for job in jobs:
        sf = job.scene
        width, height = job.masks.width, job.masks.height
        rows.append({"scene": sf.name, "file": str(sf.path) if sf.path else None, "seed": job.seed,
                     "width": width, "height": height, "layers": len(sf.scene.layers),
                     "steps": step_count(sf.scene), "model": opts.model or sf.source(sf.scene.model) or DEFAULT_MODEL,
                     "path": str(_job_path(job)), "status": "planned"})
    if ui.json:
        for row in rows:
            out.print(json.dumps(row), soft_wrap=True)
        return
    table = Table(title=f"{len(rows)} image(s) on {device} ({str(dtype).removeprefix('torch.')}); nothing loaded",
                  title_justify="left")
    for column in ("scene", "seed", "size", "layers", "steps", "model", "output"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["scene"], str(r["seed"]), f"{r['width']}x{r['height']}", str(r["layers"]), str(r["steps"]),
                      r["model"], r["path"])
    out.print(table)


def _launch(opts: RunOptions) -> None:
    """Run this same command in one process per GPU (or --processes), then exit with the batch's code.

    The processes get the environment a launcher such as `accelerate launch` gives them (rank,
    world size, where to meet), and Accelerate joins them into one group. A Ctrl-C reaches them
    all; each keeps what it finished and says so.
    """
    import socket
    import subprocess

    count = opts.processes
    if count is None:
        import torch

        count = torch.cuda.device_count() if opts.device != "cpu" else 1
    if count <= 1:
        err.print("--distributed: one process, so running here")
        return
    with socket.socket() as probe:  # a free port for the processes to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    shared = dict(os.environ, WORLD_SIZE=str(count), LOCAL_WORLD_SIZE=str(count), MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port))
    if opts.device == "cpu":  # CPU processes share the cores instead of each taking all of them
        shared.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    workers = [subprocess.Popen([sys.executable, "-m", "smd_cli", *sys.argv[1:]],
                                env=dict(shared, RANK=str(rank), LOCAL_RANK=str(rank))) for rank in range(count)]
    try:
        codes = [worker.wait() for worker in workers]
    except KeyboardInterrupt:  # the workers had it too: let them finish their summaries
        for worker in workers:
            worker.wait()
        raise typer.Exit(130) from None
    # Every process sums up the same gathered outcomes; a different code means one of them crashed.
    raise typer.Exit(codes[0] if len(set(codes)) == 1 else max(abs(c) for c in codes))


def _as_overrides(items: list) -> list[str] | dict:
    """CLI options and --set strings as one ordered override list."""
    from smd_cli.scene import parse_override

    pairs: dict = {}
    for item in items:
        key, value = parse_override(item) if isinstance(item, str) else (
            item[0] if isinstance(item[0], tuple) else (item[0],), item[1])
        pairs[key] = value
    return pairs


def _output_template(sf: SceneFile, output: str | None) -> str:
    from smd_cli.outputs import DEFAULT_TEMPLATE, check_template

    if output is not None:
        check_template(output)
        return output
    if sf.scene.output is not None:
        folder = sf.scene.output.endswith(("/", os.sep))  # a folder to be made: keep saying so
        return str(sf.resolve(sf.scene.output)) + (os.sep if folder else "")
    return DEFAULT_TEMPLATE


def _pipeline(cache: dict, opts: RunOptions, sf: SceneFile, device, dtype, ui: Ui):
    """One loaded pipeline per distinct model, loaded on first use; a model that failed fails fast."""
    model = opts.model or sf.source(sf.scene.model)
    lcm_lora = opts.lcm_lora or sf.source(sf.scene.lcm_lora) or "auto"
    vae = opts.vae or sf.source(sf.scene.vae)
    key = (model, lcm_lora, vae)
    if key not in cache:
        from smd_cli.pipeline import StableMultiDiffusionPipeline
        from smd_cli.scene import DEFAULT_MODEL

        cache.clear()  # free the previous model before loading another
        started = time.perf_counter()
        status = err.status(f"loading {model or DEFAULT_MODEL} on {device} ({str(dtype).removeprefix('torch.')})") \
            if err.is_terminal and not ui.quiet else contextlib.nullcontext()
        try:
            with status:
                cache[key] = StableMultiDiffusionPipeline(device, hf_key=model, dtype=dtype, lcm_lora=lcm_lora,
                                                          config=opts.config, vae=vae)
        except SmdError as exc:
            cache[key] = exc
            raise
        pipe = cache[key].optimize(channels_last=opts.channels_last, compile=opts.compile)
        extras = "".join(f" + {x}" for x in (pipe.components.lcm_lora, pipe.components.vae_source) if x)
        ui.info(f"loaded {pipe.components.source}{extras} in {time.perf_counter() - started:.1f} s")
    if isinstance(cache[key], SmdError):
        raise cache[key]
    return cache[key]


def _render(pipe, job, opts: RunOptions, ui: Ui) -> Path:
    """Make one image and write it with its record; returns the path written."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from smd_cli.outputs import output_path
    from smd_cli.scene import step_count

    sf = job.scene
    steps = step_count(sf.scene)  # what the schedule, checked before this image started, will take
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal or ui.quiet) as progress:
        task = progress.add_task(sf.name, total=steps)
        result = pipe.generate(sf, masks=job.masks, max_batch=opts.max_batch,
                               callback=lambda k, n, x0: progress.update(task, completed=k + 1))
    path = output_path(job.template, scene=sf.name, seed=result.seed, steps=steps, index=job.index)
    written = result.save(path, overwrite=opts.overwrite)
    if written != path:
        ui.info(f"{path} exists; wrote {written.name} beside it (--overwrite replaces)")
    timing = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
    ui.info(f"{sf.name}: seed {result.seed}, {result.timings['generate']:.1f} s")
    ui.detail(f"{sf.name}: {timing}")
    return written


def main() -> None:
    app(prog_name="smd")


if __name__ == "__main__":  # pragma: no cover
    main()
