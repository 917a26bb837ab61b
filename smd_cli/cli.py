"""The `smd` command line: a thin shell over the library. No math and no model logic here.

Heavy modules are imported inside the commands that need them, so `smd --help` and
`smd validate` never load torch or diffusers.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
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
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
out = Console(highlight=False, soft_wrap=True, markup=False)


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
OUT = typer.Option(None, "--out", "-o", help="Output file or folder; may use {scene}, {seed}, {steps}. "
                   "Default: the scene's `output`, else {scene}-{seed}.png.")
SEED = typer.Option(None, "--seed", min=0, help="Random seed (default: the scene's, else random).")
STEPS = typer.Option(None, "--steps", min=1, max=1000, help="Number of steps (LCM default 5).")
SCHEDULER = typer.Option(None, "--scheduler", help="lcm (default), ddim or euler.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.")
DTYPE = typer.Option("auto", "--dtype", help="auto, float32, float16 or bfloat16.")
LCM_LORA = typer.Option(None, "--lcm-lora", help="LCM LoRA: hub id, file or folder, or 'none' "
                        "(default: the SD1.5 LCM LoRA where it fits).")
VAE = typer.Option(None, "--vae", help="'tiny' for the tiny autoencoder (TAESD), or a hub id or folder of one.")
MAX_BATCH = typer.Option(None, "--max-batch", min=1, help="(layer, view) pairs per UNet call "
                         "(default: from free memory on CUDA, 8 on the CPU).")
SET = typer.Option([], "--set", help=SET_HELP, show_default=False)


@dataclass
class RunOptions:
    """What the generating commands share: model choice, outputs, and scene overrides."""

    model: Optional[str] = None
    config: Optional[str] = None
    output: Optional[str] = None
    device: str = "auto"
    dtype: str = "auto"
    lcm_lora: Optional[str] = None
    vae: Optional[str] = None
    max_batch: Optional[int] = None
    overrides: list = field(default_factory=list)


def _overrides(set_: list[str], **values) -> list:
    return [(k, v) for k, v in values.items() if v is not None] + list(set_)


@app.command()
def generate(
    scenes: List[Path] = typer.Argument(None, help="Scene files (YAML). Omit them to use --prompt.",
                                        show_default=False),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Plain text-to-image without a scene."),
    negative_prompt: str = typer.Option("", "--negative-prompt", "-n", help="Negative prompt for --prompt."),
    width: Optional[int] = typer.Option(None, "--width", min=8, help="Canvas width in pixels."),
    height: Optional[int] = typer.Option(None, "--height", min=8, help="Canvas height in pixels."),
    model: Optional[str] = MODEL, config: Optional[str] = CONFIG, output: Optional[str] = OUT,
    seed: Optional[int] = SEED, steps: Optional[int] = STEPS, scheduler: Optional[str] = SCHEDULER,
    device: str = DEVICE, dtype: str = DTYPE, lcm_lora: Optional[str] = LCM_LORA, vae: Optional[str] = VAE,
    max_batch: Optional[int] = MAX_BATCH, set_: List[str] = SET,
) -> None:
    """Generate one image per scene, loading the model once for all of them."""
    with user_errors():
        from smd_cli.scene import load_scene, scene_from_prompt

        opts = RunOptions(model, config, output, device, dtype, lcm_lora, vae, max_batch, _overrides(
            set_, seed=seed, steps=steps, width=width, height=height, scheduler=scheduler))
        files = list(scenes or [])
        if not files and prompt is None:
            raise SmdError("give one or more scene files, or --prompt \"...\"")
        if files and prompt is not None:
            raise SmdError("give either scene files or --prompt, not both")
        loaded = ([scene_from_prompt(prompt, negative_prompt, _as_overrides(opts.overrides))] if prompt is not None
                  else [load_scene(f, _as_overrides(opts.overrides)) for f in files])
        _run(loaded, opts)


@app.command()
def inpaint(
    scenes: List[Path] = typer.Argument(..., help="Scene files (YAML) whose background.image is the picture.",
                                        show_default=False),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="The picture to paint on "
                                         "(instead of the scene's background.image)."),
    model: Optional[str] = MODEL, config: Optional[str] = CONFIG, output: Optional[str] = OUT,
    seed: Optional[int] = SEED, steps: Optional[int] = STEPS, scheduler: Optional[str] = SCHEDULER,
    device: str = DEVICE, dtype: str = DTYPE, lcm_lora: Optional[str] = LCM_LORA, vae: Optional[str] = VAE,
    max_batch: Optional[int] = MAX_BATCH, set_: List[str] = SET,
) -> None:
    """Paint the scene's layers over a picture; outside every mask the picture stays as it was."""
    with user_errors():
        from smd_cli.scene import load_scene

        if image is not None and not image.is_file():
            raise SmdError(f"--image {image}: file not found")
        opts = RunOptions(model, config, output, device, dtype, lcm_lora, vae, max_batch, _overrides(
            set_, seed=seed, steps=steps, scheduler=scheduler))
        if image is not None:
            opts.overrides.append((("background", "image"), str(image.resolve())))
        loaded = [load_scene(f, _as_overrides(opts.overrides)) for f in scenes]
        for sf in loaded:
            if sf.scene.background.image is None:
                raise sf.error(("background",), "inpainting needs a picture: set background.image in the scene "
                                                "or pass --image PATH")
        _run(loaded, opts)


@app.command()
def panorama(
    prompt: str = typer.Argument(..., help="The prompt, or a scene file with one layer and a wide canvas."),
    negative_prompt: str = typer.Option("", "--negative", "-n", help="Negative prompt."),
    width: Optional[int] = typer.Option(None, "--width", min=8, help="Width in pixels (default 3072)."),
    height: Optional[int] = typer.Option(None, "--height", min=8, help="Height in pixels (default 512)."),
    circular: bool = typer.Option(False, "--circular", help="A 360-degree panorama: the left and right "
                                  "edges join without a seam."),
    model: Optional[str] = MODEL, config: Optional[str] = CONFIG, output: Optional[str] = OUT,
    seed: Optional[int] = SEED, steps: Optional[int] = STEPS, scheduler: Optional[str] = SCHEDULER,
    device: str = DEVICE, dtype: str = DTYPE, lcm_lora: Optional[str] = LCM_LORA, vae: Optional[str] = VAE,
    max_batch: Optional[int] = MAX_BATCH, set_: List[str] = SET,
) -> None:
    """Generate a wide image from one prompt, denoised in overlapping views."""
    with user_errors():
        from smd_cli.scene import load_scene, scene_from_prompt

        is_scene = prompt.endswith((".yaml", ".yml")) and Path(prompt).is_file()
        opts = RunOptions(model, config, output, device, dtype, lcm_lora, vae, max_batch, _overrides(
            set_, seed=seed, steps=steps, scheduler=scheduler, circular=circular or None,
            width=width if width or is_scene else PANORAMA_WIDTH, height=height if height or is_scene else PANORAMA_HEIGHT))
        if is_scene:
            sf = load_scene(prompt, _as_overrides(opts.overrides))
            if len(sf.scene.layers) != 1:
                raise sf.error(("layers",), f"a panorama scene has one layer, this one has {len(sf.scene.layers)}; "
                                            "use `smd generate` for several")
        else:
            sf = scene_from_prompt(prompt, negative_prompt, _as_overrides(opts.overrides), name="panorama")
        _run([sf], opts)


PANORAMA_WIDTH, PANORAMA_HEIGHT = 3072, 512


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
) -> None:
    """Stream frames from a scene while you edit it: runs until --frames/--seconds or Ctrl-C."""
    with user_errors():
        from smd_cli.live import FrameSink, LiveState, PreviewServer, SceneWatcher, parse_address, run_stream
        from smd_cli.masks import checked_canvas, scene_masks
        from smd_cli.models import check_source, vae_downscale_factor
        from smd_cli.scene import load_scene

        from smd_cli.scene import STREAM_CFG_TYPES

        if cfg_type not in STREAM_CFG_TYPES:
            raise SmdError(f"--cfg must be one of {', '.join(STREAM_CFG_TYPES)}, got {cfg_type!r}")
        overrides = _as_overrides(list(set_))
        sf = load_scene(scene, overrides)
        check_source(model or sf.source(sf.scene.model))
        scene_masks(sf, *checked_canvas(sf, vae_downscale_factor(model or sf.source(sf.scene.model)) or 8))
        address = parse_address(preview) if preview else None
        opts = RunOptions(model, config, None, device, dtype, lcm_lora, vae)
        sink = FrameSink(output, fps)  # checks the output kind before the model loads
        pipe = _pipeline({}, opts, sf)
        from smd_cli.live import scene_stream

        live = scene_stream(sf, pipe, cfg_type=cfg_type)
        state = LiveState(prompts=[layer.prompt for layer in live.layers])
        server = None
        if address is not None:
            server = PreviewServer(state, *address).start()
            host, port = server.address
            err.print(f"preview at http://{host}:{port}/")
        watcher = SceneWatcher(scene, overrides) if watch else None
        if watcher is not None:
            watcher.watch(sf)
        status = err.status("starting") if err.is_terminal else contextlib.nullcontext()
        try:
            with status as line:
                def show(index, frame, run) -> None:
                    if line is not None:
                        line.update(f"{index} frames, {run.fps:.2f} frames/s, {run.last_call * 1000:.0f} ms a "
                                    f"frame, last reload: {run.last_reload}")

                run = run_stream(live, sink, frames=frames, seconds=seconds, watcher=watcher, state=state,
                                 on_frame=show, on_reload=lambda text: err.print(f"reload: {text}"))
        finally:
            if server is not None:
                server.stop()
        err.print(f"{run.frames} frames, {run.fps:.2f} frames/s")
        if output is not None:
            out.print(str(output))


def _run(loaded: list, opts: RunOptions) -> None:
    """Check every scene, then load the model once and render them all."""
    from smd_cli.masks import checked_canvas, scene_masks
    from smd_cli.models import check_source, vae_downscale_factor

    prepared = []
    for sf in loaded:  # every scene, mask and model path checked before the (slow) model load
        check_source(opts.model or sf.source(sf.scene.model))
        factor = vae_downscale_factor(opts.model or sf.source(sf.scene.model)) or 8
        prepared.append(scene_masks(sf, *checked_canvas(sf, factor)))
    targets = [_output_template(sf, opts.output) for sf in loaded]
    if opts.output is not None and len(loaded) > 1 and "{scene}" not in opts.output and not _is_folder(opts.output):
        raise SmdError(f"--out {opts.output} names one file for {len(loaded)} scenes; "
                       "give a folder or a template with {scene}")
    pipes: dict[tuple, object] = {}
    for sf, masks, template in zip(loaded, prepared, targets):
        pipe = _pipeline(pipes, opts, sf)
        _render(pipe, sf, masks, template, opts.max_batch)


def _as_overrides(items: list) -> list[str] | dict:
    """CLI options and --set strings as one ordered override list."""
    from smd_cli.scene import parse_override

    pairs: dict = {}
    for item in items:
        key, value = parse_override(item) if isinstance(item, str) else (
            item[0] if isinstance(item[0], tuple) else (item[0],), item[1])
        pairs[key] = value
    return pairs


def _is_folder(text: str) -> bool:
    return text.endswith(("/", "\\")) or Path(text).is_dir()


def _output_template(sf: SceneFile, output: str | None) -> str:
    from smd_cli.outputs import DEFAULT_TEMPLATE, check_template

    if output is not None:
        check_template(output)
        return output
    if sf.scene.output is not None:
        return str(sf.resolve(sf.scene.output))
    return DEFAULT_TEMPLATE


def _pipeline(cache: dict, opts: RunOptions, sf: SceneFile):
    """One loaded pipeline per distinct model, loaded on first use."""
    model = opts.model or sf.source(sf.scene.model)
    lcm_lora = opts.lcm_lora or sf.source(sf.scene.lcm_lora) or "auto"
    vae = opts.vae or sf.source(sf.scene.vae)
    key = (model, lcm_lora, vae)
    if key not in cache:
        from smd_cli.models import resolve_device, resolve_dtype
        from smd_cli.pipeline import StableMultiDiffusionPipeline
        from smd_cli.scene import DEFAULT_MODEL

        cache.clear()  # free the previous model before loading another
        resolved = resolve_device(opts.device)
        torch_dtype = resolve_dtype(opts.dtype, resolved)
        started = time.perf_counter()
        with err.status(f"loading {model or DEFAULT_MODEL} on {resolved} ({str(torch_dtype).removeprefix('torch.')})"):
            cache[key] = StableMultiDiffusionPipeline(opts.device, hf_key=model, dtype=opts.dtype, lcm_lora=lcm_lora,
                                                      config=opts.config, vae=vae)
        pipe = cache[key]
        extras = "".join(f" + {x}" for x in (pipe.components.lcm_lora, pipe.components.vae_source) if x)
        err.print(f"loaded {pipe.components.source}{extras} in {time.perf_counter() - started:.1f} s")
    return cache[key]


def _render(pipe, sf: SceneFile, masks, template: str, max_batch: int | None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from smd_cli.outputs import output_path, save_image

    steps = len(pipe.schedule(sf.scene.steps, sf.scene.timesteps, sf.scene.scheduler))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task(sf.name, total=steps)
        result = pipe.generate(sf, masks=masks, max_batch=max_batch, callback=lambda k, n, x0: progress.update(task, completed=k + 1))
    path = output_path(template, scene=sf.name, seed=result.seed, steps=steps)
    save_image(result.image, path)
    err.print(f"{sf.name}: seed {result.seed}, {result.timings['generate']:.1f} s")
    out.print(str(path))


def main() -> None:
    app(prog_name="smd")


if __name__ == "__main__":  # pragma: no cover
    main()
