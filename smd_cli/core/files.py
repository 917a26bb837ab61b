"""Reading the files a scene, a command line or a stranger's image names: regular files only,
bounded in size, images checked from their header before their pixels are decoded.

A path may be a device (`/dev/zero`), a FIFO, a directory, a symlink to any of these, or a file far
larger than anything smd needs: each is refused with `UnreadableFile` (which callers place at the
scene key or option that named it) instead of exhausting memory or hanging. No torch at import.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from smd_cli.core import defaults
from smd_cli.core.errors import SmdError

KIB, MIB = 1024, 1024**2
MAX_SCENE_BYTES = 4 * MIB  # a scene is a few kilobytes; far beyond this is not a scene
MAX_IMAGE_BYTES = 512 * MIB  # masks and pictures
MAX_IMAGE_PIXELS = defaults.MAX_SIZE**2  # the largest canvas, at full resolution
HASH_BLOCK = MIB


class UnreadableFile(SmdError):
    """A file that is not a regular file, is too large, or is an image too large to decode."""


def expand_user(path: str | Path) -> Path:
    """`path` with a leading `~` or `~user` made that home folder, as a shell does; left as written
    where there is none (no HOME and no password entry: a service account), where pathlib's
    `expanduser` raises RuntimeError."""
    return Path(os.path.expanduser(path))


def _stat(path: str | Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (OSError, ValueError):  # missing, unreadable, too long a name, a NUL in it
        return None


def exists(path: str | Path) -> bool:
    """Whether `path` names something; a name the system refuses (too long, a NUL) names nothing."""
    return _stat(path) is not None


def is_file(path: str | Path) -> bool:
    """Whether `path` is a regular file, false for any name the system refuses."""
    st = _stat(path)
    return st is not None and stat.S_ISREG(st.st_mode)


def is_dir(path: str | Path) -> bool:
    """Whether `path` is a folder, false for any name the system refuses."""
    st = _stat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def kind(mode: int) -> str:
    """What a file that is not a regular file is, for messages."""
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading; anything else raises `UnreadableFile`.

    The file is opened without blocking, so that a FIFO cannot hang the open, and checked on the
    open descriptor, so that a file swapped for a device after a check is still caught.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except ValueError:  # a NUL in the name: no file has it
        raise UnreadableFile("a name with a NUL character in it, which no file can have") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableFile(f"{kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The whole file, which must be a regular file of at most `limit` bytes."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise UnreadableFile(f"{_size(max(size, len(data)))}, more than the {_size(limit)} smd reads")
    return data


# A LoRA or other weights file that a record hashes: the largest LoRAs are a few GB.
MAX_MODEL_BYTES = 16 * 1024**3


def sha256(path: str | Path, limit: int = MAX_IMAGE_BYTES) -> str:
    """The SHA-256 of a regular file of at most `limit` bytes, read in blocks."""
    digest = hashlib.sha256()
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise UnreadableFile(f"{_size(size)}, more than the {_size(limit)} smd reads")
        for block in _blocks(fh, limit):
            digest.update(block)
    return digest.hexdigest()


def _blocks(fh: BinaryIO, limit: int) -> Iterator[bytes]:
    read = 0
    while block := fh.read(HASH_BLOCK):
        read += len(block)
        if read > limit:
            raise UnreadableFile(f"more than the {_size(limit)} smd reads")
        yield block


def check_pixels(size: tuple[int, int]) -> None:
    """Refuse an image whose header promises more pixels than smd decodes (a decompression bomb)."""
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise UnreadableFile(f"{width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} smd decodes "
                             "(a decompression bomb?)")


def check_regular(path: str | Path) -> None:
    """Raise FileNotFoundError, or `UnreadableFile` for anything but a regular file."""
    open_regular(path).close()


def open_image(fp):
    """A PIL image opened from its header, its pixel count checked before anything is decoded.

    PIL's own check would raise inside `Image.open`, with another limit and message; it is off
    while smd opens the image and makes the same check itself, right after the header.
    """
    from PIL import Image

    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        image = Image.open(fp)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    try:
        check_pixels(image.size)
    except UnreadableFile:
        image.close()
        raise
    return image


def image_size(path: str | Path) -> tuple[int, int]:
    """An image's (width, height) from its header alone, checked against the size and pixel limits."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_IMAGE_BYTES:
            raise UnreadableFile(f"{_size(size)}, more than the {_size(MAX_IMAGE_BYTES)} smd reads")
        with open_image(fh) as image:
            return image.size


def decode_image(data: bytes):
    """A fully decoded PIL image from bytes, its size checked from the header before decoding."""
    with open_image(io.BytesIO(data)) as image:
        image.load()
        return image.copy()


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / KIB:.1f} KiB" if n >= KIB else f"{n} bytes"

def no_home() -> str | None:
    """Why this process has no home folder (a service account: HOME unset and no entry in the
    password database), or None where it has one."""
    if os.path.expanduser("~") != "~":
        return None
    uid = os.getuid() if hasattr(os, "getuid") else "?"
    return f"HOME is unset and user {uid} has no entry in the password database"
