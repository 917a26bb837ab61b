"""`smd stream`: a live session on a scene, watching its files, frame sinks, and the local preview server.

Scenes become streams and live updates in `smd_cli.app.requests` (`scene_stream`, `apply_scene`); the
preview is served by `smd_cli.app.web.preview`, on the same web stack as `smd paint`.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
from PIL import Image

from smd_cli.app.requests import apply_scene, restart_needed, scene_stream
from smd_cli.app.web.preview import PreviewServer
from smd_cli.core import defaults
from smd_cli.core.errors import OutputError, SmdError, unexpected
from smd_cli.engine.stream import StreamMultiDiffusion
from smd_cli.scenes.scene import SceneFile, load_scene, scene_files

if TYPE_CHECKING:
    from smd_cli.app import batch


class SceneWatcher:
    """Notices edits to a scene file and the images it uses, by their modification times."""

    def __init__(self, path: Path, overrides=None):
        self.path = Path(path)
        self.overrides = overrides
        self.running: SceneFile | None = None  # the scene the stream was started with
        self.stamps = self._stamps(None)

    def _stamps(self, sf: SceneFile | None) -> dict[Path, float]:
        files = [self.path] + (list(scene_files(sf).values()) if sf is not None else [])
        return {f: self._stamp(f) for f in files}

    def watch(self, sf: SceneFile) -> None:
        """Watch the files of this scene (the first one watched is the one the stream runs)."""
        self.running = self.running or sf
        self.stamps = self._stamps(sf)

    def changed(self) -> bool:
        return any(self._stamp(f) != stamp for f, stamp in self.stamps.items())

    @staticmethod
    def _stamp(f: Path) -> float:
        try:
            return f.stat().st_mtime_ns
        except OSError:
            return -1

    def reload(self) -> SceneFile:
        """The scene as it is now on disk; raises for a broken edit. Either way the files the scene
        names from now on are watched, so that a mask file it lacked is noticed when it appears."""
        try:
            sf = load_scene(self.path, self.overrides)
        except BaseException:
            self.stamps = self._stamps(None)
            raise
        self.stamps = self._stamps(sf)
        return sf  # its masks are read, and checked, by `apply_scene`, before the stream changes


# ---------------------------------------------------------------------------------------------
# Frame sinks


# A GIF is written when the stream ends, so its frames wait in memory: at most this many bytes of them.
MAX_GIF_BYTES = 512 * 2**20


class FrameSink:
    """Where frames go: numbered PNGs in a folder, an animated GIF or an MP4."""

    def __init__(self, target: Path | None, fps: float, overwrite: bool = False):
        self.target = Path(target) if target is not None else None
        self.fps = fps
        self.overwrite = overwrite
        self.count = 0
        self.next = 1  # the number the next frame file in a folder tries first
        self.frames: list[Image.Image] = []
        self.writer = None
        self.partial: Optional[Path] = None  # an MP4 being written, renamed into place on close
        suffix = self.target.suffix.lower() if self.target is not None else ""
        self.kind = {"": "folder", ".gif": "gif", ".mp4": "mp4"}.get(suffix)
        if self.target is not None and self.kind is None:
            raise OutputError(f"--out {self.target}: give a folder, a .gif or an .mp4 file")
        if self.target is not None:
            from smd_cli.core.outputs import check_writable

            check_writable(self.target / "frame.png" if self.kind == "folder" else self.target)
        if self.kind == "mp4":
            try:
                import imageio.v2  # noqa: F401 - the writer opens with the first frame
            except ImportError:
                raise OutputError("MP4 output needs imageio with ffmpeg: pip install 'smd-cli[mp4]' "
                                  "(or: pip install imageio imageio-ffmpeg)") from None
        elif self.kind == "folder" and self.target is not None:
            self.target.mkdir(parents=True, exist_ok=True)
            if not overwrite:  # continue after the frames of an earlier run instead of replacing them
                numbers = [int(p.stem[6:]) for p in self.target.glob("frame-*.png") if p.stem[6:].isdigit()]
                self.next = max(numbers, default=0) + 1

    def add(self, frame: Image.Image) -> None:
        self.count += 1
        if self.target is None:
            return
        if self.kind == "folder":
            from smd_cli.core.outputs import save_image

            # Each frame claims the next free number, so that two streams into one folder interleave
            # their frames instead of replacing each other's.
            name = self._frame(self.next)
            written = save_image(frame, name, overwrite=self.overwrite,
                                 names=(self._frame(n) for n in itertools.count(self.next)))
            self.next = int(written.stem[6:]) + 1
        elif self.kind == "gif":
            if len(self.frames) * frame.width * frame.height * 3 < MAX_GIF_BYTES:
                self.frames.append(frame)
            elif len(self.frames) == self.count - 1:  # said once, at the first frame left out
                warnings.warn(f"--out {self.target}: a GIF is kept in memory until the stream ends; it keeps the "
                              f"first {len(self.frames)} frames. For longer streams give a folder or an .mp4 file",
                              stacklevel=2)
        else:
            if self.writer is None:  # opened with the first frame: a run that makes none leaves no file
                import imageio.v2 as imageio

                from smd_cli.core.outputs import temporary_beside

                self.partial = temporary_beside(self.target)
                self.writer = imageio.get_writer(str(self.partial), format="FFMPEG", fps=self.fps)
            self.writer.append_data(np.asarray(frame))

    def _frame(self, number: int) -> Path:
        return self.target / f"frame-{number:05d}.png"

    def close(self) -> Optional[Path]:
        """Finish the file with the frames so far (also after Ctrl-C); returns the path written."""
        from smd_cli.core.outputs import finish, write_atomic

        if self.target is None:
            return None
        if self.kind == "gif" and self.frames:
            first, rest = self.frames[0], self.frames[1:]
            return write_atomic(self.target, lambda fh: first.save(
                fh, format="GIF", save_all=True, append_images=rest, loop=0,
                duration=max(int(1000 / self.fps), 20)), self.overwrite)
        if self.kind == "mp4" and self.writer is not None:
            self.writer.close()
            self.writer = None
            return finish(self.partial, self.target, self.overwrite)
        return self.target if self.count else None


# ---------------------------------------------------------------------------------------------
# Preview server


@dataclass
class LiveState:
    """What the preview shows; the generation loop only swaps references, the server encodes."""

    frame: Optional[Image.Image] = None
    frames: int = 0
    fps: float = 0.0
    prompts: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def parse_address(text: str) -> tuple[str, int]:
    """`PORT`, `HOST:PORT` or `[IPV6]:PORT`, with a host this machine can listen on; the host
    defaults to 127.0.0.1 (this machine only)."""
    m = re.fullmatch(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^\[\]]*?)):(?P<port>[^:]*)|(?P<only>[^:]*)", text.strip())
    port = (m.group("port") if m.group("port") is not None else m.group("only")) if m else ""
    if not m or not port.isdigit():
        raise SmdError(f"--preview expects PORT, HOST:PORT or [IPV6]:PORT, got {text!r}")
    number = int(port)
    if not 0 <= number < 65536:
        raise SmdError(f"--preview port must be 0..65535, got {number}")
    host = m.group("v6") if m.group("v6") is not None else (m.group("host") or "127.0.0.1")
    try:
        socket.getaddrinfo(host, number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    except (socket.gaierror, UnicodeError) as exc:
        raise SmdError(f"--preview {text}: unknown host {host!r} ({getattr(exc, 'strerror', None) or exc})") from None
    return host, number


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class StreamRun:
    """Counters of a streaming run."""

    frames: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_call: float = 0.0
    last_reload: str = "-"
    written: Optional[Path] = None  # where the frames went, once the sink is closed

    @property
    def fps(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.frames / elapsed if elapsed > 0 else 0.0


def run_stream(stream: StreamMultiDiffusion, sink: FrameSink, *, frames: int | None = None,
               seconds: float | None = None, watcher: SceneWatcher | None = None,
               state: LiveState | None = None, on_frame: Callable[[int, Image.Image, StreamRun], None] | None = None,
               on_reload: Callable[[str], None] | None = None, run: StreamRun | None = None) -> StreamRun:
    """Generate frames until `frames` or `seconds` is reached (or forever), applying scene edits.

    A broken edit is reported through `on_reload` and the stream keeps running on the last good
    scene. The sink is closed, with the frames so far, however the loop ends (Ctrl-C included);
    pass `run` to read the counters and the written path even then.
    """
    run = run if run is not None else StreamRun()
    try:
        while ((frames is None or run.frames < frames)
               and (seconds is None or time.perf_counter() - run.started < seconds)):
            if watcher is not None and watcher.changed():
                try:
                    scene = watcher.reload()
                    changes = apply_scene(stream, scene)
                    frozen = restart_needed(watcher.running, scene) if watcher.running is not None else []
                    if frozen:
                        changes.append(f"restart to apply {', '.join(frozen)}")
                    run.last_reload = time.strftime("%H:%M:%S") + (" " + "; ".join(changes) if changes else "")
                except Exception as exc:  # no edit, however broken, stops the stream
                    reason = str(exc) if isinstance(exc, SmdError) else unexpected(exc)
                    run.last_reload = f"{time.strftime('%H:%M:%S')} kept the last good scene: {reason}"
                if on_reload is not None:
                    on_reload(run.last_reload)
            began = time.perf_counter()
            frame = stream()
            run.last_call = time.perf_counter() - began
            run.frames += 1
            sink.add(frame)
            if state is not None:
                with state.lock:
                    state.frame, state.frames, state.fps = frame, run.frames, run.fps
                    state.prompts = [layer.prompt for layer in stream.layers]
            if on_frame is not None:
                on_frame(run.frames, frame, run)
    finally:
        run.written = sink.close()
    return run


# ---------------------------------------------------------------------------------------------
# A session: what `smd stream` runs


@dataclass
class Session:
    """A live stream of a scene: the stream, where its frames go, and what watches and shows it."""

    stream: StreamMultiDiffusion
    sink: FrameSink
    state: LiveState
    server: Optional[PreviewServer] = None
    watcher: Optional[SceneWatcher] = None

    def run(self, **loop) -> StreamRun:
        """`run_stream` with this session's sink, watcher and preview (see there for `loop`)."""
        return run_stream(self.stream, self.sink, watcher=self.watcher, state=self.state, **loop)

    def close(self) -> None:
        """Stop the preview server and the stream's decoding thread (the sink is closed by `run`)."""
        if self.server is not None:
            self.server.stop()
        self.stream.close()


def check_cfg_type(cfg_type: str) -> None:
    if cfg_type not in defaults.STREAM_CFG_TYPES:
        raise SmdError(f"--cfg must be one of {', '.join(defaults.STREAM_CFG_TYPES)}, got {cfg_type!r}")


def open_session(scene: Path, options: batch.Options, *, output: Path | None = None, fps: float = defaults.STREAM_FPS,
                 watch: bool = False, preview: str | None = None, cfg_type: str = defaults.STREAM_CFG_TYPE,
                 overlap_decode: bool = False, on_event=None) -> Session:
    """Check all that can fail before a model loads (the scene and its masks, the output, the preview
    address), then load the model (`options`, with `options.overrides` applied to the scene) and start
    streaming the scene. `options.compile` compiles for the stream's one fixed shape."""
    from smd_cli.app.batch import load_session_model, sources_of, with_preset
    from smd_cli.models.loading import check_source
    from smd_cli.scenes.canvas import model_canvas

    check_cfg_type(cfg_type)
    sf = with_preset(load_scene(scene, options.overrides), options)
    sources = sources_of(sf, options)
    check_source(sources.model)
    # The canvas, its views and a frame's work checked, and every mask file read, before the model loads.
    model_canvas(sf, sources.model, options.config, allow_large=options.allow_large, stream=True)
    sink = FrameSink(output, fps, options.overwrite)
    if output is None and not preview:
        warnings.warn("without --out or --preview the frames are shown nowhere and kept nowhere", stacklevel=2)
    state = LiveState()
    server = PreviewServer(state, *parse_address(preview)) if preview else None  # listens now, serves later
    try:
        stream = scene_stream(sf, load_session_model(options, sources, on_event), cfg_type=cfg_type,
                              overlap_decode=overlap_decode, compile=options.compile, allow_large=options.allow_large)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    watcher = None
    if watch:
        watcher = SceneWatcher(scene, options.overrides)
        watcher.watch(sf)
    state.prompts = [layer.prompt for layer in stream.layers]
    return Session(stream, sink, state, server.start() if server else None, watcher)
