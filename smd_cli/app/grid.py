"""Contact sheets: the images of a batch in a labelled grid, rows and columns by the first two
varied keys and one sheet per value of the others (docs/batches.md, "Tuning a scene"). Each sheet
`NAME.png` has its record `NAME.json` beside it: the axes, the label texts and every cell's file,
values and place on the sheet. A sheet is made from a planned and run sweep (`from_batch`) or from
images smd made, by reading their records (`from_records`). Nothing here imports torch:

    from smd_cli.app import grid

    cells, axes = grid.from_records(["out/a.png", "out/b.png"])
    grid.write_sheets(cells, axes, "out/sheet.png")
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smd_cli.app.sweeps import format_key, label
from smd_cli.core.errors import SmdError

if TYPE_CHECKING:
    from PIL import Image

    from smd_cli.app import batch

CELL = 256  # pixels of an image's longer side on a sheet
FONT_SIZE = 18  # of the labels
PAD = 10  # pixels between cells and around labels
MISSING = (224, 224, 224)  # a cell whose image failed or is not there


@dataclass
class Axis:
    """A key that varies across the sheet's images, with its values (as printed) in order."""

    key: str
    labels: list[str]


@dataclass
class Cell:
    """One image of the sheet: its file (None: it failed) and its value of each axis."""

    file: str | None
    values: dict[str, str] = field(default_factory=dict)


def check_sheet_path(path: str | Path) -> None:
    """A sheet is a PNG file (its record goes beside it as .json)."""
    if str(path).endswith(("/", "\\")) or Path(path).suffix.lower() != ".png":
        raise SmdError(f"--grid-out {path}: a contact sheet is a .png file, e.g. --grid-out sheet.png")


def layout(axes: list[Axis]) -> tuple[Axis | None, Axis | None, list[Axis]]:
    """Rows, columns and pages: one key goes across; two are rows and columns; the rest are pages."""
    if len(axes) == 1:
        return None, axes[0], []
    return (axes[0] if axes else None), (axes[1] if len(axes) > 1 else None), list(axes[2:])


def thumbnail(image: Image.Image, size: int = CELL) -> Image.Image:
    """An image as its cell shows it: RGB, its longer side `size` pixels (small images enlarged pixel
    for pixel, large ones reduced with Lanczos)."""
    from PIL import Image

    image = image.convert("RGB")
    scale = size / max(image.size)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if target == image.size:
        return image
    return image.resize(target, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def font(size: int = FONT_SIZE):
    """Pillow's own font at `size` pixels (its bitmap font where Pillow has no FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


# ---------------------------------------------------------------------------------------------
# The cells and axes of a batch, or of images' records


def from_batch(plan: batch.Plan, outcomes: list[batch.Outcome]) -> tuple[list[Cell], list[Axis]]:
    """The sheet of a run batch: its sweep's keys in order, then the seed and the scene where there
    are several; a cell per planned image (None for one that failed)."""
    done = {o.index: o.path for o in outcomes if o.index is not None and o.status == "done" and o.path}
    axes: list[Axis] = []
    sweep = next((job.variant for job in plan.jobs if job.variant), None)
    if sweep is not None:
        for key in sweep.labels:
            axes.append(Axis(key, list(dict.fromkeys(job.variant.labels[key] for job in plan.jobs))))
    for key, value in (("seed", lambda job: str(job.seed)), ("scene", lambda job: job.scene.name)):
        labels = list(dict.fromkeys(value(job) for job in plan.jobs))
        if len(labels) > 1:
            axes.append(Axis(key, labels))
    cells = []
    for job in plan.jobs:
        values = dict(job.variant.labels) if job.variant else {}
        values.update(seed=str(job.seed), scene=job.scene.name)
        cells.append(Cell(done.get(job.index), {a.key: values[a.key] for a in axes}))
    return cells, axes


def from_records(paths: list[str | Path]) -> tuple[list[Cell], list[Axis]]:
    """The sheet of images smd made: the keys whose values differ between their records (scene keys
    in the scene's order, then the seed and the scene's name), each image a cell."""
    from smd_cli.app.records import read_record

    if len(paths) < 2:
        raise SmdError("smd grid needs two or more images to compare")
    settings = []
    for path in paths:
        record = read_record(path)  # SmdError for an image without a record
        flat = _flatten(record.scene)
        flat.pop("seed", None)
        settings.append({**flat, "seed": record.seed, "scene": record.name})
    keys = list(dict.fromkeys(k for s in settings for k in s))
    varying = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in settings}) > 1]
    if not varying:
        raise SmdError(f"these {len(paths)} images were made with the same settings: nothing varies to lay out")
    axes = [Axis(k, _ordered([s.get(k) for s in settings])) for k in varying]
    cells = [Cell(str(path), {k: label(s.get(k)) for k in varying}) for path, s in zip(paths, settings)]
    seen: dict[tuple, str] = {}
    for cell in cells:
        where = tuple(cell.values.values())
        if where in seen:
            raise SmdError(f"{seen[where]} and {cell.file} were made with the same settings; give one of them")
        seen[where] = cell.file
    return cells, axes


def _flatten(data: Any, key: tuple = ()) -> dict[str, Any]:
    """A scene's leaves by key path (`layers[0].mask_std`); a list of plain values is one leaf."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, (*key, str(k))))
        return out
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, (*key, i)))
        return out
    return {format_key(key): data}


def _ordered(values: list[Any]) -> list[str]:
    """Distinct values as printed: numbers from low to high, anything else in the order met."""
    distinct = list({json.dumps(v, sort_keys=True, default=str): v for v in values}.values())
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        distinct.sort()
    return [label(v) for v in distinct]


# ---------------------------------------------------------------------------------------------
# Drawing and writing


def write_sheets(cells: list[Cell], axes: list[Axis], path: str | Path, *, overwrite: bool = False,
                 title: str = "") -> list[Path]:
    """Draw the sheets (one per combination of the page keys: NAME-page1.png, ...) and write each
    with its record NAME.json; returns the sheets written (an existing file is kept, as images are)."""
    from smd_cli.core.outputs import save_image, write_atomic

    path = Path(path)
    check_sheet_path(path)
    rows, columns, pages = layout(axes)
    page_values = [tuple(values) for values in _product([a.labels for a in pages])]
    present = {tuple(c.values[a.key] for a in pages) for c in cells}
    page_values = [p for p in page_values if p in present]
    written = []
    for n, page in enumerate(page_values):
        on_page = [c for c in cells if tuple(c.values[a.key] for a in pages) == page]
        heading = [title] if title else []
        heading.append(" / ".join(f"{name}: {a.key}" for name, a in (("rows", rows), ("columns", columns)) if a))
        heading += [", ".join(f"{a.key}={v}" for a, v in zip(pages, page))] if pages else []
        sheet, record = draw(on_page, rows, columns, [h for h in heading if h])
        target = path if len(page_values) == 1 else path.with_name(f"{path.stem}-page{n + 1}{path.suffix}")
        target = save_image(sheet, target, overwrite=overwrite)
        record = {"sheet": target.name, "page": n + 1, "pages": len(page_values),
                  "axes": {"rows": _axis_json(rows), "columns": _axis_json(columns),
                           "page": {a.key: v for a, v in zip(pages, page)}},
                  **record}
        text = json.dumps(record, indent=2, ensure_ascii=False).encode()
        write_atomic(target.with_suffix(".json"), lambda fh, text=text: fh.write(text), overwrite=True)
        written.append(target)
    return written


def _axis_json(axis: Axis | None) -> dict[str, Any] | None:
    return {"key": axis.key, "values": axis.labels} if axis else None


def _product(lists: list[list[str]]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for values in lists:
        out = [[*head, v] for head in out for v in values]
    return out


def draw(cells: list[Cell], rows: Axis | None, columns: Axis | None,
         heading: list[str]) -> tuple[Image.Image, dict[str, Any]]:
    """One sheet: the heading lines, a label above each column and left of each row (`key=value`), and
    each cell's image (`thumbnail`) centred in its box. Returns the sheet and what it shows."""
    from PIL import Image, ImageDraw

    face = font()
    line = math.ceil(face.getbbox("Ag=[]")[3]) + 4
    row_labels = [f"{rows.key}={v}" for v in rows.labels] if rows else [""]
    column_labels = [f"{columns.key}={v}" for v in columns.labels] if columns else [""]
    thumbs = {id(c): thumbnail(_open(c.file)) if c.file else None for c in cells}
    sizes = [t.size for t in thumbs.values() if t is not None] or [(CELL, CELL)]
    width = max(max(w for w, _ in sizes), *(math.ceil(face.getlength(t)) for t in column_labels))
    height = max(h for _, h in sizes)
    left = PAD + (max(math.ceil(face.getlength(t)) for t in row_labels) + PAD if rows else 0)
    top = PAD + line * len(heading) + (PAD if heading else 0) + (line + PAD // 2 if columns else 0)
    size = (left + len(column_labels) * (width + PAD), top + len(row_labels) * (height + PAD))
    sheet = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(sheet)
    for i, text in enumerate(heading):
        pen.text((PAD, PAD + i * line), text, fill="black", font=face)
    for j, text in enumerate(column_labels if columns else []):
        x = left + j * (width + PAD) + (width - face.getlength(text)) / 2
        pen.text((x, top - line - PAD // 2), text, fill="black", font=face)
    for i, text in enumerate(row_labels if rows else []):
        pen.text((PAD, top + i * (height + PAD) + (height - line) / 2), text, fill="black", font=face)
    placed = []
    for cell in cells:
        i = rows.labels.index(cell.values[rows.key]) if rows else 0
        j = columns.labels.index(cell.values[columns.key]) if columns else 0
        x0, y0 = left + j * (width + PAD), top + i * (height + PAD)
        thumb = thumbs[id(cell)]
        if thumb is None:
            pen.rectangle((x0, y0, x0 + width - 1, y0 + height - 1), fill=MISSING)
            pen.text((x0 + PAD, y0 + PAD), "failed", fill="black", font=face)
            box = [x0, y0, width, height]
        else:
            box = [x0 + (width - thumb.width) // 2, y0 + (height - thumb.height) // 2, thumb.width, thumb.height]
            sheet.paste(thumb, tuple(box[:2]))
        placed.append({"row": i, "column": j, "file": cell.file, "values": cell.values, "box": box})
    labels = {"heading": heading, "rows": row_labels if rows else [], "columns": column_labels if columns else []}
    return sheet, {"labels": labels, "cell": [width, height], "cells": placed}


def _open(path: str) -> Image.Image:
    """An image to show, read as a stranger's file is (bounded, its header checked first)."""
    from smd_cli.core.files import MAX_IMAGE_BYTES, UnreadableFile, open_image, read_bytes

    try:
        image = open_image(io.BytesIO(read_bytes(Path(path), MAX_IMAGE_BYTES)))
        image.load()
        return image
    except FileNotFoundError:
        raise SmdError(f"{path}: file not found") from None
    except (UnreadableFile, OSError, ValueError) as exc:
        raise SmdError(f"{path}: cannot read the image ({exc})") from None
