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

from smd_cli.errors import SmdError

KIB, MIB = 1024, 1024**2
MAX_SCENE_BYTES = 4 * MIB  # a scene is a few kilobytes; far beyond this is not a scene
MAX_IMAGE_BYTES = 512 * MIB  # masks and pictures
MAX_IMAGE_PIXELS = 2**28  # 16384 x 16384: the largest canvas, at full resolution
HASH_BLOCK = MIB


class UnreadableFile(SmdError):
    """A file that is not a regular file, is too large, or is an image too large to decode."""


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
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
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


def image_size(path: str | Path) -> tuple[int, int]:
    """An image's (width, height) from its header alone, checked against the pixel limit."""
    from PIL import Image

    with open_regular(path) as fh, Image.open(fh) as image:
        check_pixels(image.size)
        return image.size


def decode_image(data: bytes):
    """A fully decoded PIL image from bytes, its size checked from the header before decoding."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        check_pixels(image.size)
        image.load()
        return image.copy()


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / KIB:.1f} KiB" if n >= KIB else f"{n} bytes"
