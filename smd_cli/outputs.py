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


def check_template(template: str) -> None:
    """Raise `OutputError` for an unknown `{field}` or a malformed template."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise OutputError(f"bad output template {template!r}: {exc}") from None
    for name in fields:
        if name not in TEMPLATE_FIELDS:
            known = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            raise OutputError(f"unknown field {{{name}}} in output template {template!r}; known: {known}")


def output_path(template: str, *, scene: str, seed: int, steps: int) -> Path:
    """Fill a template; a folder (existing, or written with a trailing slash) gets the default name."""
    check_template(template)
    if template.endswith(("/", os.sep)) or Path(template).is_dir():
        template = str(Path(template) / DEFAULT_TEMPLATE)
    path = Path(template.format(scene=scene, seed=seed, steps=steps)).expanduser()
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise OutputError(f"output {str(path)!r} needs an image extension: one of {', '.join(sorted(IMAGE_SUFFIXES))}")
    return path


def save_image(image: Image.Image, path: Path, pnginfo=None) -> Path:
    """Write atomically: a temporary file in the same folder, then a rename, so no file is ever half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lstrip(".").upper()
            image.save(fh, format=fmt, **({"pnginfo": pnginfo} if pnginfo is not None and fmt == "PNG" else {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
