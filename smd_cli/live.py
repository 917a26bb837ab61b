"""Live streaming of a scene: scene files turned into stream updates, frame sinks, file watching,
and the local preview server behind `smd stream`."""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from smd_cli.errors import OutputError, SmdError
from smd_cli.masks import checked_canvas, scene_background, scene_masks
from smd_cli.scene import SceneFile, load_scene
from smd_cli.stream import StreamMultiDiffusion


def scene_stream(sf: SceneFile, pipe, *, cfg_type: str = "none", overlap_decode: bool = False,
                 compile: bool = False) -> StreamMultiDiffusion:
    """A stream set up from a scene: its canvas, settings, background and layers."""
    s = sf.scene
    width, height = checked_canvas(sf, pipe.vae_scale_factor)
    # Streams default to continuous masks (SPEC 7) unless the scene chose.
    mask_type = s.mask_type if "mask_type" in s.model_fields_set else "continuous"
    stream = StreamMultiDiffusion(
        pipeline=pipe, height=height, width=width, cfg_type=cfg_type, guidance_scale=s.guidance_scale,
        autoflush=False, mask_type=mask_type, bootstrap_steps=s.bootstrap.steps,
        bootstrap_mix_steps=s.bootstrap.mix_steps, bootstrap_leak_sensitivity=s.bootstrap.leak_sensitivity,
        cover_alpha=s.cover_alpha, seed=s.seed if s.seed is not None else 2024, timesteps=s.timesteps,
        tile_size=s.tile_size, overlap_decode=overlap_decode, compile=compile)
    apply_scene(stream, sf)
    stream.flush()
    stream.autoflush = True
    return stream


def apply_scene(stream: StreamMultiDiffusion, sf: SceneFile) -> list[str]:
    """Turn the differences between the stream and a (re)loaded scene into layer updates.

    Returns a description of what changed. The stream keeps running: no model reload, no restart.
    """
    s = sf.scene
    masks = scene_masks(sf, stream.width, stream.height).masks
    prefix = s.negative_prefix
    changes: list[str] = []
    flush, stream.autoflush = stream.autoflush, False
    try:
        picture = scene_background(sf)  # without one, the background prompt paints the uncovered area
        if picture is None and stream.background_image is not None:
            stream.remove_background_image()
            changes.append("background image removed")
        elif picture is not None and (stream.background_image is None or picture.resize(
                (stream.width, stream.height)).tobytes() != stream.background_image.tobytes()):
            stream.update_background(picture)
            changes.append("background image")
        negative_bg = _prefixed(prefix, s.background.negative_prompt)
        if s.background.prompt != (stream.background_prompt or "") or negative_bg != stream.background_negative_prompt:
            stream.update_background(prompt=s.background.prompt, negative_prompt=negative_bg)
            changes.append("background prompt")
        for i, layer in enumerate(s.layers):
            fields = dict(prompt=layer.prompt, negative_prompt=_prefixed(prefix, layer.negative_prompt),
                          mask_strength=layer.mask_strength, mask_std=layer.mask_std,
                          prompt_strength=layer.prompt_strength)
            if i >= len(stream.layers):
                stream.update_single_layer(i, mask=masks[i], **fields)
                changes.append(f"added {layer.name}")
                continue
            current = stream.layers[i]
            edits = {k: v for k, v in fields.items() if getattr(current, k) != v}
            mask_changed = current.mask is None or not np.array_equal(current.mask, masks[i])
            if edits or mask_changed:
                stream.update_single_layer(i, mask=masks[i] if mask_changed else None, **edits)
                changes.append(f"{layer.name}: " + ", ".join(list(edits) + (["mask"] if mask_changed else [])))
        while len(stream.layers) > len(s.layers):
            stream.remove_single_layer(len(stream.layers) - 1)
            changes.append("removed a layer")
    finally:
        stream.autoflush = flush
    if changes and flush:
        stream.flush()
    return changes


def _prefixed(prefix: str | None, negative: str) -> str:
    if not prefix:
        return negative
    return f"{prefix}, {negative}" if negative else prefix


class SceneWatcher:
    """Notices edits to a scene file and the images it uses, by their modification times."""

    def __init__(self, path: Path, overrides=None):
        self.path = Path(path)
        self.overrides = overrides
        self.stamps = self._stamps(None)

    def _files(self, sf: SceneFile | None) -> list[Path]:
        files = [self.path]
        if sf is not None:
            s = sf.scene
            for layer in s.layers:
                source = getattr(layer.mask, "image", None) or getattr(layer.mask, "palette", None)
                if source:
                    files.append(sf.resolve(source))
            if s.background.image:
                files.append(sf.resolve(s.background.image))
        return files

    def _stamps(self, sf: SceneFile | None) -> dict[Path, float]:
        out = {}
        for f in self._files(sf):
            try:
                out[f] = f.stat().st_mtime_ns
            except OSError:
                out[f] = -1
        return out

    def watch(self, sf: SceneFile) -> None:
        """Start watching the files of this (good) scene."""
        self.stamps = self._stamps(sf)

    def settle(self) -> None:
        """Accept the files as they are now (after a broken edit: wait for the next change)."""
        self.stamps = {f: self._stamp(f) for f in self.stamps}

    def changed(self) -> bool:
        return any(self._stamp(f) != stamp for f, stamp in self.stamps.items())

    @staticmethod
    def _stamp(f: Path) -> float:
        try:
            return f.stat().st_mtime_ns
        except OSError:
            return -1

    def reload(self) -> SceneFile:
        """The scene as it is now on disk; raises SmdError for a broken edit."""
        sf = load_scene(self.path, self.overrides)
        scene_masks(sf)
        self.watch(sf)
        return sf


# ---------------------------------------------------------------------------------------------
# Frame sinks


class FrameSink:
    """Where frames go: numbered PNGs in a folder, an animated GIF or an MP4."""

    def __init__(self, target: Path | None, fps: float, overwrite: bool = False):
        self.target = Path(target) if target is not None else None
        self.fps = fps
        self.overwrite = overwrite
        self.count = 0
        self.first = 1  # number of the first frame file in a folder
        self.frames: list[Image.Image] = []
        self.writer = None
        self.partial: Optional[Path] = None  # an MP4 being written, renamed into place on close
        suffix = self.target.suffix.lower() if self.target is not None else ""
        self.kind = {"": "folder", ".gif": "gif", ".mp4": "mp4"}.get(suffix)
        if self.target is not None and self.kind is None:
            raise OutputError(f"--out {self.target}: give a folder, a .gif or an .mp4 file")
        if self.target is not None:
            from smd_cli.outputs import check_writable

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
                self.first = max(numbers, default=0) + 1

    def add(self, frame: Image.Image) -> None:
        self.count += 1
        if self.target is None:
            return
        if self.kind == "folder":
            from smd_cli.outputs import save_image

            save_image(frame, self.target / f"frame-{self.first + self.count - 1:05d}.png", overwrite=True)
        elif self.kind == "gif":
            self.frames.append(frame)
        else:
            if self.writer is None:  # opened with the first frame: a run that makes none leaves no file
                import imageio.v2 as imageio

                from smd_cli.outputs import temporary_beside

                self.partial = temporary_beside(self.target)
                self.writer = imageio.get_writer(str(self.partial), format="FFMPEG", fps=self.fps)
            self.writer.append_data(np.asarray(frame))

    def close(self) -> Optional[Path]:
        """Finish the file with the frames so far (also after Ctrl-C); returns the path written."""
        from smd_cli.outputs import finish, write_atomic

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

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>smd stream</title>
<style>body{font-family:sans-serif;background:#111;color:#ddd;margin:1em}img{max-width:100%;display:block}
li{margin:.2em 0}</style></head><body><img id="frame" src="/frame.jpg" alt="newest frame">
<p id="status"></p><ol id="prompts"></ol><script>
async function tick(){const img=new Image();img.onload=()=>{document.getElementById('frame').src=img.src;};
img.src='/frame.jpg?'+Date.now();try{const s=await (await fetch('/state.json')).json();
document.getElementById('status').textContent=s.frames+' frames, '+s.fps.toFixed(1)+' frames/s';
const list=document.getElementById('prompts');list.innerHTML='';for(const p of s.prompts){const li=document.createElement('li');
li.textContent=p;list.appendChild(li);}}catch(e){}setTimeout(tick,250);}tick();</script></body></html>"""


@dataclass
class LiveState:
    """What the preview shows; the generation loop only swaps references, the server encodes."""

    frame: Optional[Image.Image] = None
    frames: int = 0
    fps: float = 0.0
    prompts: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class PreviewServer:
    """A standard-library HTTP server in a daemon thread: `/` page, `/frame.jpg`, `/state.json`."""

    def __init__(self, state: LiveState, host: str = "127.0.0.1", port: int = 8000):
        handler = self._handler(state)
        self.httpd = http.server.ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    def start(self) -> "PreviewServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def _handler(state: LiveState):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the terminal for the status line
                pass

            def _send(self, body: bytes, kind: str, status: int = 200) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - the http.server API
                route = self.path.split("?")[0]
                if route == "/":
                    self._send(PAGE.encode(), "text/html; charset=utf-8")
                elif route == "/frame.jpg":
                    with state.lock:
                        frame = state.frame
                    if frame is None:
                        self._send(b"no frame yet", "text/plain", 503)
                        return
                    buffer = io.BytesIO()
                    frame.save(buffer, format="JPEG", quality=90)
                    self._send(buffer.getvalue(), "image/jpeg")
                elif route == "/state.json":
                    with state.lock:
                        body = {"frames": state.frames, "fps": state.fps, "prompts": list(state.prompts)}
                    self._send(json.dumps(body).encode(), "application/json")
                else:
                    self._send(b"not found", "text/plain", 404)

        return Handler


def parse_address(text: str) -> tuple[str, int]:
    """`PORT` or `HOST:PORT`; the host defaults to 127.0.0.1 (this machine only)."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise SmdError(f"--preview expects PORT or HOST:PORT, got {text!r}") from None
    if not 0 <= number < 65536:
        raise SmdError(f"--preview port must be 0..65535, got {number}")
    return host or "127.0.0.1", number


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
        while (frames is None or run.frames < frames) and (seconds is None or time.perf_counter() - run.started < seconds):
            if watcher is not None and watcher.changed():
                try:
                    changes = apply_scene(stream, watcher.reload())
                    run.last_reload = time.strftime("%H:%M:%S") + (" " + "; ".join(changes) if changes else "")
                except SmdError as exc:
                    watcher.settle()
                    run.last_reload = f"{time.strftime('%H:%M:%S')} kept the last good scene: {exc}"
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
