"""The `smd` command line: a thin shell over the library that parses, prints and exits.

Batches are planned and run by `smd_cli.app.batch`, scenes rendered by `smd_cli.app.requests`, streams run
by `smd_cli.app.live`; `smd_cli.app.options` defines the options the commands share and `smd_cli.app.report`
prints what happens. This module holds the commands: it turns their options into the library's
arguments and outcomes into exit codes. Heavy modules are imported inside the commands that
need them, so that `smd --help` and `smd validate` never load torch or diffusers.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Iterator, List, Optional

import typer

from smd_cli import __version__
from smd_cli.app.options import (
    GENERATING,
    MODEL_OPTIONS,
    OPTIONS,
    REPORTING,
    batch_options,
    check_reporting,
    library_options,
    shared,
)
from smd_cli.app.report import error, out, put, say, show_warning
from smd_cli.core import defaults
from smd_cli.core.errors import (
    SmdError,
    end_on_signals,
    exit_now,
    interrupt_on_signals,
    interrupted_code,
    was_interrupted,
)
from smd_cli.core.files import UnreadableFile, check_regular, is_file

if TYPE_CHECKING:
    from smd_cli.app import batch
    from smd_cli.app.report import Reporter

app = typer.Typer(
    name="smd",
    help="Region-based multi-prompt image generation with StreamMultiDiffusion.\n\n"
         "Paint masks, give each a prompt in a YAML scene, and run `smd generate scene.yaml`.",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print smd's own errors as one clean line and exit with their code (2); Ctrl-C, SIGTERM and
    SIGHUP end the command cleanly with 128 + the signal's number. Anything else is a bug in smd:
    one line too, with the traceback only when SMD_TRACEBACK is set."""
    previous = warnings.showwarning
    warnings.showwarning = show_warning
    try:
        with interrupt_on_signals():
            yield
    except SmdError as exc:
        for message in exc.messages():
            error(message)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        say(f"interrupted by {exc}" if str(exc) else "interrupted")
        raise typer.Exit(interrupted_code(exc)) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if os.environ.get("SMD_TRACEBACK"):
            raise
        error(f"unexpected {type(exc).__name__}: {exc} (a bug in smd: please report it; set SMD_TRACEBACK=1 for "
              "the traceback)")
        raise typer.Exit(1) from None
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


# ---------------------------------------------------------------------------------------------
# Commands


def size_option(name: str, help: str, *short: str):
    """A canvas side on the command line, with the bounds of a scene's width and height."""
    return typer.Option(None, name, *short, min=defaults.MIN_SIZE, max=defaults.MAX_SIZE, help=help)


# Guidance in a stream (smd stream and smd paint).
CFG_OPTION = typer.Option(defaults.STREAM_CFG_TYPE, "--cfg",
                          help=f"Guidance in the stream: {', '.join(defaults.STREAM_CFG_TYPES)}.")


@app.command()
def validate(
    scenes: List[Path] = typer.Argument(..., help="Scene files (YAML) to check.", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", help="Model whose downscale factor the canvas must fit "
                                        "(read from its config only; nothing is loaded)."),
    set_: List[str] = OPTIONS["set_"][1],
    allow_large: bool = OPTIONS["allow_large"][1],
) -> None:
    """Check scene files without loading any model: keys, values, mask, control image and LoRA
    files, ControlNet folders, the work they ask for, coverage.

    \b
    Examples:
      smd validate scenes/*.yaml
      smd validate scenes/village.yaml --set width=1024 --model ./my-sd15-folder
    """
    from smd_cli.app import report
    from smd_cli.app.batch import Options, check_controls, sources_of
    from smd_cli.scenes.canvas import model_canvas
    from smd_cli.scenes.scene import load_scene

    failed = 0
    for path in scenes:
        try:
            with user_errors():
                sf = load_scene(path, set_)
                for problem in check_controls(sf)[1][:1]:
                    raise problem
                masks, factor = model_canvas(sf, sources_of(sf, Options(model=model, device="cpu", dtype="auto")).model,
                                             allow_large=allow_large)
                report.coverage(sf, masks, str(path), factor is not None)
        except typer.Exit:
            if was_interrupted():  # Ctrl-C stops the whole command, not one scene
                raise
            failed += 1
    if failed:
        raise typer.Exit(2)


@app.command()
@shared(*GENERATING)
def generate(
    scenes: List[Path] = typer.Argument(None, help="Scene files (YAML). Omit them to use --prompt.",
                                        show_default=False),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Plain text-to-image without a scene."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", "-n", help="With --prompt, its negative "
                                                  "prompt; with scenes, put before every layer's (negative_prefix)."),
    width: Optional[int] = size_option("--width", "Canvas width in pixels."),
    height: Optional[int] = size_option("--height", "Canvas height in pixels."),
    opts: SimpleNamespace = None,
) -> None:
    """Generate images from scenes (one per scene and seed), loading the model once for all of them.

    A scene that fails does not stop the others: a summary follows, and the exit code is 0 when
    every image was made, 1 when some failed, 2 when none could start.

    \b
    Examples:
      smd generate scenes/sunset-lake.yaml
      smd generate scenes/*.yaml --seeds 1-4 --out 'out/{scene}-{seed}.png'
      smd generate --prompt "a photo of the dolomites" --steps 4 -g 1.5
      smd generate scenes/village.yaml --set layers[0].prompt="a castle" --dry-run
      smd generate scenes/village.yaml --vary layers[1].mask_std=0:16:8 --vary region_mode=latent,attention --grid
    """
    with user_errors():
        from smd_cli.scenes.scene import scene_from_prompt

        files = list(scenes or [])
        if not files and prompt is None:
            raise SmdError("give one or more scene files, or --prompt \"...\"")
        if files and prompt is not None:
            raise SmdError("give either scene files or --prompt, not both")
        options = batch_options(opts, width=width, height=height, negative_prefix=negative_prompt if files else None)
        items = files if prompt is None else [scene_from_prompt(prompt, negative_prompt or "", options.overrides)]
        raise typer.Exit(_run(items, options, opts)[1])


@app.command()
@shared(*GENERATING)
def inpaint(
    scenes: List[Path] = typer.Argument(..., help="Scene files (YAML) whose background.image is the picture.",
                                        show_default=False),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="The picture to paint on "
                                         "(instead of the scene's background.image)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", "-n", help="Put before every layer's "
                                                  "negative prompt (negative_prefix)."),
    opts: SimpleNamespace = None,
) -> None:
    """Paint the scene's layers over a picture; outside every mask the picture stays as it was.

    \b
    Examples:
      smd inpaint scenes/street-inpaint.yaml
      smd inpaint scenes/street-inpaint.yaml --image holiday.jpg --seeds 1-3
    """
    with user_errors():
        from smd_cli.app.requests import needs_picture

        try:
            if image is not None:
                check_regular(image)
        except FileNotFoundError:
            raise SmdError(f"--image {image}: file not found") from None
        except (UnreadableFile, OSError) as exc:
            raise SmdError(f"--image {image}: cannot read it: {exc}") from None
        options = batch_options(opts, negative_prefix=negative_prompt)
        if image is not None:
            options.overrides[("background", "image")] = str(image.resolve())
        raise typer.Exit(_run(list(scenes), options, opts, check=needs_picture)[1])


@app.command()
@shared(*GENERATING)
def panorama(
    prompt: str = typer.Argument(..., help="The prompt, or a scene file with one layer and a wide canvas."),
    negative_prompt: str = typer.Option("", "--negative-prompt", "--negative", "-n", help="Negative prompt."),
    width: Optional[int] = size_option("--width", f"Width in pixels (default {defaults.PANORAMA_WIDTH})."),
    height: Optional[int] = size_option("--height", f"Height in pixels (default {defaults.PANORAMA_HEIGHT})."),
    circular: bool = typer.Option(False, "--circular", help="A 360-degree panorama: the left and right "
                                  "edges join without a seam."),
    circular_axes: Optional[str] = typer.Option(None, "--circular-axes", metavar="x|y|both",
                                                help="The edges that join: x (as --circular), y (top and bottom) "
                                                     "or both (a seamless texture); scene key circular."),
    opts: SimpleNamespace = None,
) -> None:
    """Generate a wide image from one prompt, denoised in overlapping views.

    \b
    Examples:
      smd panorama "A photo of Alps" --width 3072 --height 512
      smd panorama "a photo of a city at night" --circular --seeds 1-4
      smd panorama scenes/alps-panorama.yaml
    """
    with user_errors():
        from smd_cli.app.requests import one_layer
        from smd_cli.scenes.scene import scene_from_prompt

        is_scene = prompt.endswith((".yaml", ".yml"))
        if is_scene and not is_file(prompt):
            raise SmdError(f"{prompt}: scene file not found (a prompt that ends in .yaml: write it differently)")
        if circular_axes is not None and circular_axes not in defaults.CIRCULAR_AXES:
            raise SmdError(f"--circular-axes must be x, y or both, got {circular_axes!r}")
        options = batch_options(opts, circular=circular_axes or circular or None,
                                 width=width if width or is_scene else defaults.PANORAMA_WIDTH,
                                 height=height if height or is_scene else defaults.PANORAMA_HEIGHT)
        item = Path(prompt) if is_scene else scene_from_prompt(prompt, negative_prompt, options.overrides,
                                                               name="panorama")
        raise typer.Exit(_run([item], options, opts, check=one_layer)[1])


@app.command()
@shared(*MODEL_OPTIONS, "seed", "max_batch", "vae_tiles", "set_", "overwrite", "allow_large", "threads", *REPORTING)
def upscale(
    image: Path = typer.Argument(..., help="The picture to upscale (PNG, JPEG or WebP).", show_default=False),
    scene: Optional[Path] = typer.Argument(None, help="The scene whose layers denoise it again (default: the "
                                           "scene recorded in IMAGE).", show_default=False),
    scale: float = typer.Option(..., "--scale", help="Upscale this many times (above 1; scene key hires.scale)."),
    strength: float = typer.Option(defaults.HIRES_STRENGTH, "--strength", help="How much of the schedule runs "
                                   "again, 0 to 1 (scene key hires.strength)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="The pass's schedule, of which it runs the last "
                                        "strength share (scene key hires.steps; default: the scene's steps)."),
    output: Optional[str] = typer.Option(None, "--out", "-o", help="Where to write the new image (default: "
                                         "IMAGE's name with -upscaled, beside it)."),
    opts: SimpleNamespace = None,
) -> None:
    """Run the hires pass on an existing picture: upscale it and denoise it again with a scene's layers.

    Its record is the scene with `hires`: `smd reproduce` makes it again from the scene, which gives
    the same pixels when IMAGE is what the scene makes.

    \b
    Examples:
      smd upscale out/village-3.png --scale 2
      smd upscale photo.png scenes/village.yaml --scale 2 --strength 0.4 --out big.png
    """
    with user_errors():
        from smd_cli.app.batch import Options, reproducing
        from smd_cli.app.records import read_record
        from smd_cli.core.files import image_size
        from smd_cli.scenes.scene import load_scene, merge_overrides

        check_reporting(opts)
        try:
            width, height = image_size(image)
        except FileNotFoundError:
            raise SmdError(f"{image}: file not found") from None
        except (UnreadableFile, OSError) as exc:
            raise SmdError(f"{image}: cannot read it: {exc}") from None
        given = [("width", width), ("height", height), (("hires", "scale"), scale), (("hires", "strength"), strength)]
        given += [(("hires", "steps"), steps)] if steps is not None else []
        given += [(k, v) for k, v in (("seed", opts.seed), ("vae_tiles", opts.vae_tiles)) if v is not None]
        overrides = merge_overrides(given + list(opts.set))
        output = output if output is not None else str(image.with_name(f"{image.stem}-upscaled.png"))
        if scene is not None:
            item = load_scene(scene, overrides)
            options = library_options(opts, output=output)
        else:
            try:
                record = read_record(image)
            except SmdError as exc:
                raise SmdError(f"{exc}; give a scene: smd upscale {image} SCENE --scale {scale:g}") from None
            recorded, options = reproducing(record, image, output, model=opts.model, config=opts.config,
                                            device=opts.device, dtype=opts.dtype, max_batch=opts.max_batch,
                                            overwrite=opts.overwrite, allow_large=opts.allow_large)
            item = _with_overrides(recorded, overrides)
        options = Options(**{**vars(options), "upscale": str(image)})
        raise typer.Exit(_run([item], options, opts)[1])


def _with_overrides(sf, overrides: dict):
    """A loaded scene with command-line keys set, validated again."""
    from smd_cli.scenes.scene import _apply_overrides, validate_scene

    data = sf.scene.model_dump(mode="json", exclude_unset=True)
    overridden = _apply_overrides(data, overrides, sf.path)
    made = validate_scene(data, path=sf.path, lines=sf.lines, overridden=sf.overridden | overridden)
    made.label = sf.label
    return made


@app.command()
def show(
    image: Path = typer.Argument(..., help="An image (PNG, JPEG or WebP) made by smd.", show_default=False),
    json_: bool = typer.Option(False, "--json", help="Print the record as JSON instead of YAML."),
) -> None:
    """Print how an image was made: scene, seed, model, versions, timings, and whether its files changed.

    \b
    Examples:
      smd show out/village-3.png
      smd show out/village-3.jpg --json | jq .seed
    """
    with user_errors():
        import json

        from smd_cli.app.records import as_dict, describe, read_record

        record = read_record(image)
        if json_:
            out.print(json.dumps(as_dict(record), indent=2, default=str))  # a crafted record may hold dates
        else:
            out.print(describe(record), end="")


@app.command()
@shared("config", "max_batch", "overwrite", "allow_large", *REPORTING)
def reproduce(
    image: Path = typer.Argument(..., help="An image (PNG, JPEG or WebP) made by smd.", show_default=False),
    output: Optional[str] = typer.Option(None, "--out", "-o", help="Where to write the new image "
                                         "(default: IMAGE's name with -reproduced, beside it)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Use this model instead of the recorded "
                                        "one (moved folders)."),
    device: Optional[str] = typer.Option(None, "--device", help="Default: the recorded kind of device "
                                         "(cpu, cuda, mps); results are identical only on the same kind."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Default: the recorded one."),
    check: bool = typer.Option(False, "--check", help="Exit 1 when the new image differs from IMAGE."),
    opts: SimpleNamespace = None,
) -> None:
    """Make an image again from the record in it, and say whether the result is identical.

    The record is someone's image: the files it names are listed before anything reads them.

    \b
    Examples:
      smd reproduce out/village-3.png
      smd reproduce shared.png --model ~/models/sd15 --out again.png --check
    """
    with user_errors():
        from smd_cli.app import report
        from smd_cli.app.batch import reads, reproducing
        from smd_cli.app.records import compare_images, read_record

        check_reporting(opts)
        record = read_record(image)
        reporter = report.Reporter(opts.quiet, opts.verbose, opts.json, results=False)  # printed with the comparison
        sf, options = reproducing(record, image, output, model=model, config=opts.config, device=device,
                                  dtype=dtype, max_batch=opts.max_batch, overwrite=opts.overwrite,
                                  allow_large=opts.allow_large)
        report.record(image, record, reads(sf, options), reporter)
        outcomes, code = _run([sf], options, opts, reporter=reporter)
        done = [o for o in outcomes if o.path]
        same = compare_images(image, Path(done[0].path)) if done else None
        report.reproduced(outcomes, same, opts.json)
        raise typer.Exit(1 if check and code == 0 and not same.identical else code)


@app.command()
def grid(
    images: List[Path] = typer.Argument(..., help="Images made by smd (two or more).", show_default=False),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="The sheet, a .png (default: "
                                          "<first image's folder>/<its scene>-grid.png); its record goes "
                                          "beside it as .json."),
    overwrite: bool = OPTIONS["overwrite"][1],
) -> None:
    """Lay out images smd made in a labelled contact sheet, by the settings that differ between them.

    Their records say how each was made: the keys whose values differ (the seed too) become rows,
    columns and pages (one sheet per page, numbered).

    \b
    Examples:
      smd grid out/village-*.png --out out/sheet.png
    """
    with user_errors():
        from smd_cli.app import grid as sheets
        from smd_cli.app.records import read_record
        from smd_cli.core.outputs import safe_name

        cells, axes = sheets.from_records(list(images))
        path = output or images[0].with_name(f"{safe_name(read_record(images[0]).name)}-grid.png")
        for sheet in sheets.write_sheets(cells, axes, path, overwrite=overwrite):
            put(str(sheet))


@app.command()
@shared(*MODEL_OPTIONS, "set_", "overwrite", "quiet", "compile_", "channels_last", "threads", "allow_large",
        "region_mode")
def stream(
    scene: Path = typer.Argument(..., help="Scene file (YAML) to stream.", show_default=False, metavar="SCENE"),
    frames: Optional[int] = typer.Option(None, "--frames", min=1, help="Stop after N frames."),
    seconds: Optional[float] = typer.Option(None, "--seconds", min=0.0, help="Stop after S seconds."),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="A folder (numbered PNGs), FILE.gif or "
                                          "FILE.mp4. Without it frames are only shown (--preview)."),
    fps: float = typer.Option(defaults.STREAM_FPS, "--fps", min=0.1, help="Frame rate of a GIF or MP4."),
    watch: bool = typer.Option(False, "--watch", help="Apply edits of the scene file and its images live."),
    preview: Optional[str] = typer.Option(None, "--preview", help="Serve live frames over HTTP at [HOST:]PORT "
                                          "(default host 127.0.0.1)."),
    cfg_type: str = CFG_OPTION,
    overlap_decode: bool = typer.Option(False, "--overlap-decode", help="Decode each frame while the UNet "
                                        "works on the next (a GPU side stream; a thread elsewhere)."),
    opts: SimpleNamespace = None,
) -> None:
    """Stream frames from a scene while you edit it: runs until --frames/--seconds or Ctrl-C.

    An existing GIF or MP4 is kept (the new one gets -1, -2, ...); frames in an existing folder
    are numbered on after the ones there. --overwrite replaces instead.

    \b
    Examples:
      smd stream scenes/village.yaml --watch --preview 8000 --vae tiny
      smd stream scenes/village.yaml --frames 50 --out village.gif
    """
    with user_errors():
        from smd_cli.app.live import StreamRun, open_session
        from smd_cli.app.report import Reporter, stream_status
        from smd_cli.app.web.access import describe, is_loopback
        from smd_cli.scenes.scene import merge_overrides

        reporter = Reporter(quiet=opts.quiet)
        try:
            mode = [("region_mode", opts.region_mode)] if opts.region_mode else []
            options = library_options(opts, overrides=merge_overrides(mode + list(opts.set)))
            session = open_session(scene, options, output=output, fps=fps, watch=watch, preview=preview,
                                   cfg_type=cfg_type, overlap_decode=overlap_decode, on_event=reporter)
        finally:
            reporter.close()
        if session.server is not None:
            reporter.info(f"preview at {session.server.url}")
            if not is_loopback(session.server.address[0]):
                reporter.info(f"anyone who can reach this machine can watch the frames; accepting pages from "
                              f"{describe(session.server.access)}")
        run, interrupted = StreamRun(), False
        try:
            with stream_status(opts.quiet) as show:
                session.run(frames=frames, seconds=seconds, on_frame=show, run=run,
                            on_reload=lambda text: reporter.info(f"reload: {text}"))
        except KeyboardInterrupt as exc:
            interrupted = exc
            say(f"interrupted after {run.frames} frames" + (f"; kept in {run.written}" if run.written else ""))
        finally:
            session.close()
        if not interrupted:
            reporter.info(f"{run.frames} frames, {run.fps:.2f} frames/s")
        if run.written is not None:
            put(str(run.written))
        raise typer.Exit(interrupted_code(interrupted) if interrupted else 0)


@app.command()
def models(json_: bool = typer.Option(False, "--json", help="One JSON object per preset.")) -> None:
    """List the model presets: names that stand for a model and the recipe it was made for.

    A preset's settings apply where a scene sets none; the image records the model and settings,
    not the name.

    \b
    Examples:
      smd models
      smd generate scenes/village.yaml --model sdxl-lightning --width 1024 --height 1024
    """
    with user_errors():
        from smd_cli.app.report import models as show_models
        from smd_cli.scenes.presets import table

        show_models(table(), json_)


@app.command()
@shared(*MODEL_OPTIONS, "set_", "quiet", "threads", "region_mode")
def paint(
    scene: Optional[Path] = typer.Argument(None, help="Scene file (YAML) to open; without one, a blank canvas.",
                                           show_default=False, metavar="SCENE"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to serve the app on (0: any free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but this machine's "
                             "lets others paint and save here."),
    open_browser: bool = typer.Option(False, "--open", help="Open the app in the default browser."),
    save_dir: Optional[Path] = typer.Option(None, "--save-dir", help="Where Save writes scenes, masks and images "
                                            "(default: beside the opened scene, else here)."),
    width: Optional[int] = size_option("--width", "Canvas width of a blank painting (or the scene's masks resized "
                                       "to it).", "-W"),
    height: Optional[int] = size_option("--height", "Canvas height, likewise.", "-H"),
    cfg_type: str = CFG_OPTION,
    opts: SimpleNamespace = None,
) -> None:
    """Paint with prompts in the browser: the semantic palette, live on the stream.

    Brushes are layers (a prompt and a mask); what you paint changes the stream's next frames.
    Save writes the painting as a scene with one mask PNG per brush, which `smd generate` renders
    again; nothing is ever overwritten. Runs until Ctrl-C.

    \b
    Examples:
      smd paint scenes/village.yaml --vae tiny --open
      smd paint --width 768 --height 512 --save-dir my-paintings
      smd paint scenes/village.yaml --region-mode attention
    """
    with user_errors():
        from smd_cli.app.report import Reporter
        from smd_cli.app.web.access import describe, is_loopback
        from smd_cli.app.web.paint import Server, check_host, listen, open_paint
        from smd_cli.scenes.scene import merge_overrides

        check_host(host)
        sock = listen(host, port)  # before the model loads: a busy port fails at once
        reporter = Reporter(quiet=opts.quiet)
        try:
            mode = [("region_mode", opts.region_mode)] if opts.region_mode else []  # the starting mode
            options = library_options(opts, overrides=merge_overrides(mode + list(opts.set)))
            session = open_paint(scene, options, width=width, height=height, save_dir=save_dir, cfg_type=cfg_type,
                                 on_event=reporter)
        except BaseException:
            sock.close()
            raise
        finally:
            reporter.close()
        server = Server(session, sock, host)
        reporter.info(f"painting at {server.url} (Ctrl-C to stop); saves go to {session.save_dir}")
        if not is_loopback(host):
            reporter.info(f"accepting pages from {describe(server.access)}")
        put(server.url)
        if open_browser:
            import webbrowser

            webbrowser.open(server.url)
        interrupted = None
        try:
            server.run()
        except KeyboardInterrupt as exc:
            interrupted = exc
        finally:
            session.close()
        say(f"stopped after {session.frames} frames")
        raise typer.Exit(interrupted_code(interrupted) if interrupted else 0)


# ---------------------------------------------------------------------------------------------
# Running a batch


def _run(items: list, options: batch.Options, opts: SimpleNamespace, check=None,
         reporter: Reporter | None = None) -> tuple[list, int]:
    """Plan every image (scenes x seeds), check everything, then load the model once and make them;
    print what happens and sum up. Returns the outcomes and the exit code (see `batch.exit_code`)."""
    from smd_cli.app.distributed import Shard, join_processes, launch, launched_distributed, process_count

    if getattr(opts, "distributed", False) and not launched_distributed():
        count = process_count(opts.processes, options.device)
        if count > 1:  # the same command in each process, which then share the batch
            raise typer.Exit(launch(sys.argv[1:], count, options.device))
        say("--distributed: one process, so running here")
    shard = join_processes(cpu=options.device == "cpu") if launched_distributed() else Shard()
    try:
        return _run_shard(items, options, opts, check, reporter, shard)
    finally:
        shard.close()


def _run_shard(items: list, options: batch.Options, opts: SimpleNamespace, check, reporter: Reporter | None,
               shard) -> tuple[list, int]:
    from smd_cli.app import batch, report

    reporter = reporter or report.Reporter(opts.quiet, opts.verbose, opts.json, dry_run=getattr(opts, "dry_run", False))
    plan = batch.plan(items, options, check=check, shard=shard, on_event=reporter)
    for outcome in plan.invalid if shard.main else []:
        for message in [outcome.error, *outcome.more_errors]:
            error(message)
        reporter.result(outcome)
    if getattr(opts, "dry_run", False):
        if shard.main:
            report.plan(plan, options, reporter.json)
        return plan.invalid, batch.plan_exit_code(plan)
    if not plan.jobs:
        return plan.invalid, batch.plan_exit_code(plan)
    try:
        outcomes = batch.run(plan, options, on_event=reporter)
    finally:
        reporter.close()
    if (getattr(opts, "grid", False) or getattr(opts, "grid_out", None)) and shard.main and not was_interrupted():
        _sheets(plan, outcomes, opts, reporter)

    # An image in progress was interrupted, or a signal waited while one was written.
    interrupted = any(o.status == batch.INTERRUPTED for o in outcomes) or was_interrupted()
    if shard.main or interrupted:
        report.summary(outcomes, reporter.quiet, interrupted,
                       f" of process {shard.rank + 1} of {shard.size}" if interrupted and shard.size > 1 else "")
    return outcomes, interrupted_code() if interrupted else batch.exit_code(outcomes)


def _sheets(plan: batch.Plan, outcomes: list, opts: SimpleNamespace, reporter: Reporter) -> None:
    """The contact sheet of a batch (--grid, --grid-out): by default beside its first image."""
    from smd_cli.app import grid
    from smd_cli.core.outputs import safe_name

    cells, axes = grid.from_batch(plan, outcomes)
    first = next((Path(c.file) for c in cells if c.file), None)
    if first is None:
        reporter.info("no contact sheet: no image was made")
        return
    path = opts.grid_out or first.with_name(f"{safe_name(plan.jobs[0].scene.name)}-grid.png")
    for sheet in grid.write_sheets(cells, axes, path, overwrite=opts.overwrite, title=plan.jobs[0].scene.name):
        reporter.info(f"contact sheet: {sheet} (its record: {sheet.with_suffix('.json').name})")


def main() -> None:
    from smd_cli.app.distributed import launched_distributed

    if not launched_distributed():
        _app()
        return
    # A process of a shared batch (its process group already left) ends at once with its code:
    # the interpreter's teardown can meet the process group's C++ threads and abort the process
    # (SIGABRT, "terminate called without an active exception") after its work is done.
    try:
        _app()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _app() -> None:
    """Run the app as the process: a signal outside a command's work, or a second one while the first
    is handled, ends it at once (`end_on_signals`), and an interrupted command ends it at once too;
    what fails outside the commands' `user_errors` (typer's own options) is one line too, and a home
    folder missing there says so."""
    end_on_signals()
    try:
        app(prog_name="smd")
    except SystemExit as exc:
        if was_interrupted():  # nothing is left to finish, and the teardown would let a second Ctrl-C kill smd
            exit_now(exc.code if isinstance(exc.code, int) else int(exc.code is not None))
        raise
    except Exception as exc:
        if os.environ.get("SMD_TRACEBACK"):
            raise
        from smd_cli.core.files import no_home

        missing = no_home()
        if missing and isinstance(exc, (RuntimeError, KeyError)):  # what pathlib and pwd raise for it
            error(f"this needs a home folder, and there is none ({missing}); set HOME to one")
            raise SystemExit(2) from None
        error(f"unexpected {type(exc).__name__}: {exc} (a bug in smd: please report it; set SMD_TRACEBACK=1 for "
              "the traceback)")
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    main()
