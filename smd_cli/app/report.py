"""Terminal output for people, as `smd` prints it: a batch's events, its plan and summary, and the
coverage of a scene's masks. Results go to standard output, everything else to standard error;
progress shows only on a terminal. A Python caller gets the command's output with
`batch.run(plan, options, on_event=Reporter())`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator

from rich.console import Console
from rich.progress import ProgressColumn
from rich.table import Table
from rich.text import Text

from smd_cli.core.errors import printable

if TYPE_CHECKING:
    from smd_cli.app import batch
    from smd_cli.app.live import StreamRun
    from smd_cli.app.records import Comparison, Record
    from smd_cli.scenes.canvas import Coverage, SceneMasks
    from smd_cli.scenes.scene import SceneFile

# Piped into a file or another program, tables are as wide as their content: no cell is cut short.
PIPE_WIDTH = 10_000
# No markup, highlighting or emoji codes: a path like `x:cat:1.png` must print as it is on disk.
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False,
              width=None if sys.stderr.isatty() else PIPE_WIDTH)
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False,
              width=None if sys.stdout.isatty() else PIPE_WIDTH)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for the command line: one yellow line."""
    err.print(Text.assemble(("warning:", "yellow"), " ", printable(str(message))))


def error(text: str) -> None:
    err.print(Text.assemble(("error:", "red"), " ", printable(text)))  # the text as it is: no markup in it


def say(text: str) -> None:
    """A line on standard error, with any control characters in it escaped (a name or path from a
    scene or a stranger's image must not move the cursor, clear the screen or start a new line)."""
    err.print(printable(text))


def put(text: str) -> None:
    """A result line (a path) on standard output, escaped the same way. Into a pipe or a file, the
    bytes of a name that are not UTF-8 go as those bytes, so that a script opens the file the line
    names; on a terminal they are escaped (`\\xe8`), as for people."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None and not sys.stdout.isatty():
        try:
            line = os.fsencode(printable(text, keep_bytes=True)) + b"\n"
        except UnicodeEncodeError:  # not a file name this system could have: escape it
            line = None
        if line is not None:
            sys.stdout.flush()
            buffer.write(line)
            buffer.flush()
            return
    out.print(printable(text))


def short(text: str, limit: int = 48) -> str:
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _row(table: Table, *cells: str) -> None:
    table.add_row(*(printable(str(cell)) for cell in cells))


class Reporter:
    """Prints a batch's events (an `on_event` for `batch.plan` and `batch.run`)."""

    def __init__(self, quiet: bool = False, verbose: bool = False, json: bool = False, results: bool = True,
                 dry_run: bool = False):
        self.quiet, self.verbose, self.json, self.dry_run = quiet, verbose, json, dry_run
        self.results = results  # print outcomes (paths, or JSON lines) as they come
        self.live: Any = None  # the status line or progress bar shown now
        self.task: Any = None

    def __call__(self, event: batch.Event) -> None:
        from smd_cli.app import batch

        if isinstance(event, batch.Message):
            {"info": self.info, "detail": self.detail, "unchecked": self.unchecked, "error": error}[event.level](
                event.text)
        elif isinstance(event, batch.Loading):
            if err.is_terminal and not self.quiet:
                self.live = err.status(f"loading {event.model} on {event.device} ({event.dtype})")
                self.live.start()
        elif isinstance(event, batch.Loaded):
            self.close()
            if event.description is not None:
                self.info(f"loaded {event.description} in {event.seconds:.1f} s")
        elif isinstance(event, batch.Progress):
            self._progress(event)
        elif isinstance(event, batch.Finished):
            if event.outcome.status != batch.DONE:
                self.close()
            for line in (event.traceback or "").splitlines():
                self.detail(line)
            if event.outcome.status != batch.DONE:
                error(f"{event.outcome.scene} (seed {event.outcome.seed}): {event.outcome.error}")
            self.result(event.outcome)

    def _progress(self, event: batch.Progress) -> None:
        """Two bars: the images of the batch (with the time left), and the steps of this image."""
        if not err.is_terminal or self.quiet:
            return
        if self.live is None or self.task is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                                 TimeRemainingColumn(), console=err, transient=True)
            self.live.start()
            self.task = (self.live.add_task("images", total=event.images, completed=event.image - 1),
                         self.live.add_task("", total=event.steps))
        images, steps = self.task
        name = f"image {event.image}/{event.images}: {short(event.job.scene.name, 24)}"
        if event.step == 0:
            self.live.reset(steps, total=event.steps, description=name)
        self.live.update(steps, completed=event.step)
        if event.step == event.steps:  # the steps are done; decoding (minutes, for a large canvas) and saving
            self.live.update(steps, description=f"{name}: decoding")
            self.live.update(images, completed=event.image)
    def close(self) -> None:
        """Take down the status line or progress bars, if any are shown."""
        if self.live is not None:
            self.live.stop()
        self.live = self.task = None

    def info(self, text: str) -> None:
        if not self.quiet:
            say(text)

    def detail(self, text: str) -> None:
        if self.verbose:
            say(text)

    def unchecked(self, text: str) -> None:
        """A check that waits until the model loads: said in a dry run (which loads none) or with --verbose."""
        if self.dry_run or self.verbose:
            say(f"not checked yet: {text}")

    def result(self, outcome: batch.Outcome) -> None:
        """An image made (its path) or, with --json, any outcome as one JSON line."""
        from smd_cli.app import batch

        if not self.results:
            return
        if self.json:
            out.print(json.dumps(outcome.as_json()), soft_wrap=True)
        elif outcome.path and outcome.status == batch.DONE:
            put(outcome.path)


def summary(outcomes: list[batch.Outcome], quiet: bool, interrupted: bool, which: str = "") -> None:
    """A table of every image at the end of a batch (always after a failure or Ctrl-C)."""
    from smd_cli.app.batch import DONE, tally

    troubled = interrupted or any(o.status != DONE for o in outcomes)
    if (len(outcomes) < 2 and not interrupted) or (quiet and not troubled):
        return
    table = Table(title=f"summary{which}", title_justify="left")
    for column in ("scene", "seed", "status", "output", "seconds"):
        table.add_column(column, justify="right" if column in ("seed", "seconds") else "left")
    for o in outcomes:
        _row(table, o.scene, "-" if o.seed is None else str(o.seed), o.status, o.path or short(o.error or "-", 60),
             f"{o.seconds:.1f}" if o.seconds else "-")
    err.print(table)
    err.print(tally(outcomes))


def record(image, record: Record, reads: list[str], reporter: Reporter) -> None:
    """What a record says it will make, and every file it will read, before anything is read."""
    reporter.info(f"{image}: {record.name}, seed {record.seed}, model {record.model}")
    for path in reads:
        reporter.info(f"  reads {path}")


def reproduced(outcomes: list[batch.Outcome], same: Comparison | None, as_json: bool) -> None:
    """The outcome of `smd reproduce`, and whether the image is the same, in words or JSON."""
    if same is not None:
        say(same.summary)
    for outcome in outcomes:
        if as_json:
            out.print(json.dumps({**outcome.as_json(), "identical": same.identical if outcome.path else None}))
        elif outcome.path:
            put(outcome.path)


def plan(plan: batch.Plan, options: batch.Options, as_json: bool) -> None:
    """What a run would make, without loading a model: a table, or JSON lines."""
    from smd_cli.models.loading import dtype_name

    rows = plan.rows(options)
    if as_json:
        for row in rows:
            out.print(json.dumps(row), soft_wrap=True)
        return
    table = Table(title=f"{len(rows)} image(s) on {plan.device} ({dtype_name(plan.dtype)}); "
                        "nothing loaded", title_justify="left")
    swept = any("vary" in r for r in rows)
    for column in ("scene", *(["values"] if swept else []), "seed", "size", "layers", "steps", "model", "output"):
        table.add_column(column)
    for r in rows:
        size = f"{r['width']}x{r['height']}"
        values = [", ".join(f"{k}={v}" for k, v in r.get("vary", {}).items())] if swept else []
        _row(table, r["scene"], *values, r["seed"], size, r["layers"], r["steps"], r["model"], r["path"])
    out.print(table)
    if rows:
        passes, seconds = plan.estimate()
        out.print(f"estimated time: {duration(seconds)} for {len(rows)} image(s), {passes:,} denoiser passes "
                  f"(views x layers x steps) on {plan.device.type if hasattr(plan.device, 'type') else plan.device}; "
                  "a rough figure for the model's family, loading not counted")


def duration(seconds: float) -> str:
    """Seconds as people say them: `40 s`, `12 min`, `3.5 h`."""
    if seconds < 90:
        return f"about {max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"


def models(rows: list[dict[str, str]], as_json: bool) -> None:
    """The model presets (`smd models`): a table, or JSON lines."""
    if as_json:
        for row in rows:
            out.print(json.dumps(row), soft_wrap=True)
        return
    table = Table(title=f"{len(rows)} model presets: use a name as model: or --model", title_justify="left")
    for column in ("name", "model", "family", "recipe", "GPU memory", "downloads"):
        table.add_column(column)
    for r in rows:
        _row(table, r["name"], r["model"], r["family"], r["recipe"], f"{r['gpu_memory']} ({r['dtype']})",
             r["downloads"] + (f" ({r['note']})" if r["note"] else ""))
    out.print(table)


def coverage(sf: SceneFile, masks: SceneMasks, title: str, factor_known: bool = True) -> None:
    """`smd validate`'s table: each layer's prompt, mask, share of the canvas and overlaps."""
    from smd_cli.scenes.canvas import coverage_report

    rows, uncovered = coverage_report(masks)
    table = Table(title=f"{printable(title)}  {masks.width}x{masks.height}, {len(rows)} layer(s)",
                  title_justify="left")
    for column in ("#", "layer", "prompt", "mask", "coverage", "overlaps"):
        table.add_column(column, justify="right" if column in ("#", "coverage") else "left")
    for i, (row, layer) in enumerate(zip(rows, sf.scene.layers)):
        _row(table, i, row.name, short(layer.prompt), describe_mask(layer.mask), f"{row.coverage:.1f}%",
             overlaps(row))
    out.print(table)
    bg = sf.scene.background.prompt
    out.print(f"uncovered (background{': ' + repr(short(bg)) if bg else ''}): {uncovered:.1f}%")
    if not factor_known:
        out.print("the model's downscale factor is unknown until it is downloaded; the canvas is checked against "
                  "it when it loads")
    out.print()


# A row names at most this many overlaps (the largest), so that the table grows with the layers, not their pairs.
OVERLAPS_SHOWN = 6


def overlaps(row: Coverage) -> str:
    """A layer's overlaps for `smd validate`'s table: the largest by name, else its share in all."""
    named = list(row.overlaps.items())
    if len(named) > OVERLAPS_SHOWN:
        named = sorted(named, key=lambda item: -item[1])[:OVERLAPS_SHOWN]
    text = ", ".join(f"{k} {v:.1f}%" for k, v in named)
    if len(row.overlaps) > OVERLAPS_SHOWN:
        return f"{text} and {len(row.overlaps) - OVERLAPS_SHOWN} more"
    return text or (f"{row.shared:.1f}% with others" if row.shared else "-")


def describe_mask(mask) -> str:
    """A mask as the scene gives it, in a few words."""
    if mask is None:
        return "whole canvas"
    for key in ("image", "palette", "rect", "ellipse"):
        if hasattr(mask, key):
            value = getattr(mask, key)
            extra = f" {mask.color}" if key == "palette" else ""
            return f"{key} {list(value) if isinstance(value, tuple) else value}{extra}"
    return str(mask)


@contextlib.contextmanager
def stream_status(quiet: bool) -> Iterator[Callable[[int, Any, StreamRun], None]]:
    """A status line under a running stream, on a terminal: yields the `on_frame` that updates it."""
    if not err.is_terminal or quiet:
        yield lambda index, frame, run: None
        return
    with err.status("starting") as line:
        yield lambda index, frame, run: line.update(
            f"{index} frames, {run.fps:.2f} frames/s, {run.last_call * 1000:.0f} ms a frame, "
            f"last reload: {run.last_reload}")


class _Rate(ProgressColumn):
    """A progress column: the task's rate (steps/s for an image, images/s for the batch)."""

    def render(self, task) -> Text:
        unit = "images" if task.description == "images" else "steps"
        return Text(f"{task.speed:.2f} {unit}/s" if task.speed else "")
