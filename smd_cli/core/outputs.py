"""Output paths and image files: templates checked before any model loads, atomic writes, no overwrites."""

from __future__ import annotations

import errno
import os
import re
import secrets
import string
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from smd_cli.core.errors import OutputError, printable, unfinished
from smd_cli.core.files import exists, expand_user, is_dir

if TYPE_CHECKING:
    from PIL import Image

TEMPLATE_FIELDS = ("scene", "seed", "steps", "index", "date", "time", "vary")
MAX_NUMBERED = 100_000  # name-1.png ... name-99999.png
MAX_NAME_CHARS = 100  # of a scene's name in a file name
NAME_MAX = 255  # bytes in one part of a path, on every common file system
DEFAULT_TEMPLATE = "{scene}-{seed}.png"
JPEG_SUFFIXES = (".jpg", ".jpeg")
IMAGE_SUFFIXES = {".png", *JPEG_SUFFIXES, ".webp"}
_EXAMPLE = {"scene": "scene", "seed": 0, "steps": 0, "index": 0, "date": "2000-01-01", "time": "000000",
            "vary": "key=value"}
# `{vary}` without a sweep is empty, and takes the separator before it along (`{scene}-{vary}.png`).
_EMPTY_VARY = re.compile(r"[-_.]?\{vary\}")


def template_fields(template: str) -> list[str]:
    """The `{field}` names a template uses, raising `OutputError` for a malformed one."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise OutputError(f"bad output template {template!r}: {exc}") from None


def check_template(template: str) -> None:
    """Raise `OutputError` for an unknown `{field}`, a malformed template or a missing image extension."""
    for name in template_fields(template):
        if name not in TEMPLATE_FIELDS:
            known = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            raise OutputError(f"unknown field {{{name}}} in output template {template!r}; known: {known}")
    try:  # format specs and conversions fail only when filled in: try them now, before any work
        filled = template.format(**_EXAMPLE)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise OutputError(f"bad output template {template!r}: {exc}") from None
    if not is_folder(template):
        if Path(filled).suffix.lower() not in IMAGE_SUFFIXES:
            raise OutputError(f"output {template!r} needs an image extension: one of "
                              f"{', '.join(sorted(IMAGE_SUFFIXES))}, or a folder ending in /")


def is_folder(template: str) -> bool:
    """A template names a folder when it ends with a slash or is an existing folder."""
    return names_folder(template) or is_dir(expand_user(template))


def names_folder(template: str) -> bool:
    """A template ending with a slash names a folder, which is made when missing."""
    return template.endswith(("/", os.sep))


def output_path(template: str, *, scene: str, seed: int, steps: int, index: int = 0,
                when: datetime | None = None, vary: str = "") -> Path:
    """Fill a template; a folder (existing, or written with a trailing slash) gets the default name.

    `{date}` is YYYY-MM-DD and `{time}` HHMMSS, both local time of `when` (default: now); `{vary}` the
    values of a sweep's image (`smd_cli.app.sweeps`), already a safe file-name part.
    """
    if is_folder(template):
        template = str(Path(template) / DEFAULT_TEMPLATE)
    check_template(template)
    if not vary:
        template = _EMPTY_VARY.sub("", template)
    when = when or datetime.now()
    return expand_user(template.format(scene=safe_name(scene), seed=seed, steps=steps, index=index,
                                       date=when.strftime("%Y-%m-%d"), time=when.strftime("%H%M%S"),
                                       vary=vary))


def with_vary(template: str) -> str:
    """A template that names each image of a sweep apart: as it is when it has `{vary}`, else with
    `-{vary}` before its extension (a folder's default name too)."""
    if "vary" in template_fields(template):
        return template
    if is_folder(template):
        template = str(Path(template) / DEFAULT_TEMPLATE)
    path = Path(template)
    return str(path.with_name(f"{path.stem}-{{vary}}{path.suffix}"))


def safe_name(name: str) -> str:
    """A scene's name as one file-name component: no folders (`/`, `\\`), no `..`, no control
    characters, so that a name from a stranger's image cannot place a file elsewhere."""
    cleaned = "".join("_" if c in "/\\" or not c.isprintable() else c for c in name).strip()
    cleaned = cleaned.lstrip(".") or "_"
    return cleaned[:MAX_NAME_CHARS]


def check_name(path: Path) -> None:
    """Refuse a path the file system cannot take: a NUL, a character its encoding cannot write, or a
    part longer than a file name may be."""
    text = str(path)
    try:
        if "\0" in text:
            raise UnicodeEncodeError("utf-8", text, text.index("\0"), text.index("\0") + 1, "NUL")
        parts = [os.fsencode(part) for part in Path(text).parts]
    except UnicodeEncodeError:
        raise OutputError(f"cannot write {printable(text)}: the file system cannot store that name") from None
    for part in parts:
        if len(part) > NAME_MAX:
            raise OutputError(f"cannot write {printable(text)}: a part of it is {len(part)} bytes long, more than "
                              f"the {NAME_MAX} a file name may have")


def check_writable(path: Path) -> None:
    """Fail now, before any generation, if `path` cannot be a file name, or its folder cannot be
    created or written to."""
    check_name(path)
    first = expand_user(path).parts[:1]
    if first and first[0].startswith("~") and not exists(first[0]):  # not expanded: no such home folder
        raise OutputError(f"cannot write {path}: there is no home folder {first[0]} here, and smd does not make a "
                          f"folder named {first[0]}; give the full path")
    folder = expand_user(path).absolute().parent
    existing = folder
    while not exists(existing):
        if existing.parent == existing:
            break
        existing = existing.parent
    if not is_dir(existing):
        raise OutputError(f"cannot write {path}: {existing} is a file, not a folder")
    try:  # a real probe: permission bits say nothing to root, read-only mounts say nothing to access()
        with tempfile.TemporaryFile(dir=existing, prefix=".smd-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write {path}: folder {existing} is not writable "
                          f"({exc.strerror or exc})") from None


def numbered(path: Path, n: int) -> Path:
    """`out.png`, `out-1.png`, `out-2.png`, ..."""
    return path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")


def save_image(image: Image.Image, path: Path, *, overwrite: bool = False, names: Iterable[Path] | None = None,
               **options) -> Path:
    """Write an image atomically (see `write_atomic`), in the format its suffix names; `options` go
    to Pillow's save (`pnginfo`, `exif`, `xmp`)."""
    path = Path(path)
    fmt = "JPEG" if path.suffix.lower() in JPEG_SUFFIXES else path.suffix.lstrip(".").upper()
    return write_atomic(path, lambda fh: image.save(fh, format=fmt, **options), overwrite, names)


def temporary_beside(path: Path) -> Path:
    """A fresh, empty temporary file `.STEM-XXXXXXXX.SUFFIX` in `path`'s folder (created with it),
    for writers that need a name. It is registered before it exists (`errors.unfinished`), so that
    a second signal, which ends smd at once, never leaves it behind."""
    check_name(path)
    stem = os.fsdecode(os.fsencode(path.stem)[:NAME_MAX - 32])  # a long name leaves room for the rest
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            tmp = path.parent / f".{stem}-{secrets.token_hex(4)}{path.suffix}"
            unfinished(tmp)
            try:  # 0o666 less the umask: outputs get the usual permissions
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            except FileExistsError:
                unfinished(tmp, done=True)
                continue
            except BaseException:
                unfinished(tmp, done=True)
                raise
            os.close(fd)
            return tmp
        raise FileExistsError(errno.EEXIST, "no free temporary name")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _discard(tmp: Path) -> None:
    """Remove a temporary file that did not take its name (or did, and is gone), and forget it."""
    Path(tmp).unlink(missing_ok=True)
    unfinished(tmp, done=True)


def finish(tmp: Path, path: Path, overwrite: bool = False, names: Iterable[Path] | None = None) -> Path:
    """Give a finished temporary file its name and return the name taken.

    An existing file is kept unless `overwrite`: the new one then gets the first free name of
    `names` (by default `stem-1`, `stem-2`, ...), claimed atomically, so that parallel writers
    never collide.
    """
    try:
        if overwrite:
            os.replace(tmp, path)
            return path
        return _claim(str(tmp), path, names if names is not None else (numbered(path, n) for n in range(MAX_NUMBERED)))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        _discard(tmp)


def write_atomic(path: Path, write, overwrite: bool = False, names: Iterable[Path] | None = None) -> Path:
    """Write a file through `write(fh)` atomically and return the path written.

    The bytes go to a temporary file in the same folder, which then takes its name in one step,
    so no file is ever half-written, even on Ctrl-C.
    """
    tmp = temporary_beside(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
    except OSError as exc:
        _discard(tmp)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        _discard(tmp)
        raise
    return finish(tmp, path, overwrite, names)


def _claim(tmp: str, path: Path, names: Iterable[Path]) -> Path:
    """Give the finished temporary file the first free name; never replaces a file."""
    for target in names:
        try:
            os.link(tmp, target)  # fails if target exists: claiming and naming are one step
            return target
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if not target.exists():  # a file system without hard links: check, then rename
                os.replace(tmp, target)
                return target
    raise OutputError(f"cannot write {path}: no free numbered name left")
