"""Output paths and image files: templates checked before any model loads, atomic writes."""

from __future__ import annotations

import os
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from smd_cli.errors import OutputError

if TYPE_CHECKING:
    from PIL import Image

TEMPLATE_FIELDS = ("scene", "seed", "steps")
DEFAULT_TEMPLATE = "{scene}-{seed}.png"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def check_template(template: str, extension: bool = True) -> None:
    """Raise `OutputError` for an unknown `{field}`, a malformed template or a missing image extension."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise OutputError(f"bad output template {template!r}: {exc}") from None
    for name in fields:
        if name not in TEMPLATE_FIELDS:
            known = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            raise OutputError(f"unknown field {{{name}}} in output template {template!r}; known: {known}")
    try:  # format specs and conversions fail only when filled in: try them now, before any work
        filled = template.format(scene="scene", seed=0, steps=0)
    except (ValueError, TypeError, IndexError) as exc:
        raise OutputError(f"bad output template {template!r}: {exc}") from None
    if extension and not (template.endswith(("/", os.sep)) or Path(template).is_dir()):
        if Path(filled).suffix.lower() not in IMAGE_SUFFIXES:
            raise OutputError(f"output {template!r} needs an image extension: one of "
                              f"{', '.join(sorted(IMAGE_SUFFIXES))}, or a folder ending in /")


def output_path(template: str, *, scene: str, seed: int, steps: int) -> Path:
    """Fill a template; a folder (existing, or written with a trailing slash) gets the default name."""
    if template.endswith(("/", os.sep)) or Path(template).is_dir():
        template = str(Path(template) / DEFAULT_TEMPLATE)
    check_template(template)
    return Path(template.format(scene=scene, seed=seed, steps=steps)).expanduser()


def save_image(image: Image.Image, path: Path, pnginfo=None) -> Path:
    """Write atomically: a temporary file in the same folder, then a rename, so no file is ever half-written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lstrip(".").upper()
            image.save(fh, format=fmt, **({"pnginfo": pnginfo} if pnginfo is not None and fmt == "PNG" else {}))
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
