"""`smd paint`: the semantic palette in the browser, live on the stream.

Three parts, each with one job:

- `PaintSession` owns the painting (`smd_cli.painting`), the stream and the one thread that runs
  the model. Edits change the painting under a lock and return at once; before each frame the
  thread hands the stream whatever changed since the last one (`render.apply_scene`, as `smd
  stream --watch` does for file edits), so a stroke is in the next frame's input. Full images
  ("one image", "batch") run on the same thread between frames. The thread never waits on the
  network: it leaves each frame in a slot that the page's connections read when they can.
- `make_app` is the web layer (Starlette): the page, a WebSocket per tab that carries edits in
  and state, masks and frames out (stale frames are dropped, never queued), and an upload route
  for the background picture. It holds no state of its own.
- `serve` binds the socket (127.0.0.1 unless told otherwise) and runs uvicorn.

Why this stack: the page needs frames pushed as soon as they exist and strokes sent as they are
drawn, both over one long-lived connection, which a WebSocket does and plain HTTP polling does
not; Starlette and uvicorn are small, well kept, and serve WebSockets without a build step or a
front-end framework. Gradio's image editor, which the original app used, was too slow for drawing.
The page is one HTML file in the package with no external resource, so it works offline.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import queue
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from smd_cli.errors import SmdError
from smd_cli.painting import Painting

PAGE = Path(__file__).parent / "web" / "paint.html"
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # a background picture sent from the page
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one edit (a long stroke is a few hundred kilobytes)
FRAME_QUALITY = 90  # JPEG quality of the frames sent to the page
BATCH_SIZE = 4  # images of "batch"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class Shown:
    """The image the display shows: a stream frame or a full image, numbered from 1."""

    number: int
    kind: str  # "frame" or "image"
    jpeg: bytes
    image: Image.Image
    seed: int | None = None
    record: Any = None
    version: int = 0  # the painting's edits (`Painting.version`) this image was made with


class PaintSession:
    """A painting, its stream and the thread that runs the model for both."""

    def __init__(self, painting: Painting, pipe, *, save_dir: Path, stem: str, cfg_type: str = "none"):
        from smd_cli.render import scene_stream

        self.painting, self.pipe = painting, pipe
        self.save_dir, self.stem = Path(save_dir), stem
        self.lock = threading.Lock()
        self.stream = scene_stream(painting.scene_file(), pipe, cfg_type=cfg_type, masks=painting.scene_masks())
        # An edit goes into every stage at once and the frames keep coming: the next frame shows it
        # in part, the one after the stream's depth fully. (A flush would hold the display for a
        # whole depth of calls on every stroke.)
        self.stream.autoflush = False
        self.applied = painting.version
        self.playing = True
        self.shown: Shown | None = None
        self.frames = 0  # stream frames made
        self.on_shown: list[Callable[[], None]] = []  # called from the model thread after each new image
        self.errors: list[str] = []
        self._jobs: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="smd-paint-model", daemon=True)

    def start(self) -> "PaintSession":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.stream.close()

    # Edits, from any thread.

    def edit(self, op: str, message: dict) -> Any:
        """Apply one edit from the page; raises SmdError with what is wrong."""
        p = self.painting
        with self.lock:
            if op == "stroke":
                p.stroke(_int(message, "brush"), message.get("points") or [], message.get("size", 16),
                         bool(message.get("erase")))
            elif op == "undo":
                return p.undo()
            elif op == "add_brush":
                return p.add_brush(**_fields(message))
            elif op == "remove_brush":
                p.remove_brush(_int(message, "brush"))
            elif op == "move_brush":
                p.move_brush(_int(message, "brush"), _int(message, "to"))
            elif op == "update_brush":
                p.update_brush(_int(message, "brush"), **_fields(message))
            elif op == "background":
                p.update_background(message.get("prompt"), message.get("negative_prompt"))
            elif op == "remove_picture":
                p.set_picture(None)
            elif op == "seed":
                seed = message.get("seed")
                p.set_seed(None if seed in (None, "") else _int(message, "seed"))
            elif op == "play":
                self.playing = bool(message.get("on", True))
            elif op in ("one_image", "batch"):
                self._jobs.put(1 if op == "one_image" else BATCH_SIZE)
            elif op == "save":
                return str(p.save(self.save_dir, self.stem))
            elif op == "save_image":
                return str(self.save_image())
            else:
                raise SmdError(f"unknown edit {op!r}")
        self._wake.set()
        return None

    def set_picture(self, data: bytes) -> None:
        """The background picture from uploaded bytes, decoded with the limits of scene images."""
        from smd_cli.files import UnreadableFile, decode_image

        if len(data) > MAX_UPLOAD_BYTES:
            raise SmdError(f"the picture is {len(data) / 2**20:.1f} MiB; at most {MAX_UPLOAD_BYTES // 2**20} MiB")
        try:
            image = decode_image(data)
        except UnreadableFile as exc:
            raise SmdError(f"the picture cannot be used: {exc}") from None
        except Exception:  # anything Pillow cannot decode
            raise SmdError("the picture cannot be used: not an image Pillow can read") from None
        with self.lock:
            self.painting.set_picture(image)
        self._wake.set()

    def save_image(self) -> Path:
        """The image on display, with its record, beside the saved scenes (never over a file)."""
        from smd_cli.render import Result

        from smd_cli.render import image_record

        shown = self.shown
        if shown is None:
            raise SmdError("no image yet: wait for the first frame")
        seed = shown.seed if shown.seed is not None else self.painting.scene.seed
        record = shown.record
        if record is None:  # a stream frame: the record of the painting as it is now
            sf = self.painting.scene_file()
            record = image_record(self.pipe, sf, seed=seed if seed is not None else 0, width=self.painting.width,
                                  height=self.painting.height, timings={}, files={})
        name = f"{self.stem}-{shown.kind}-{seed if seed is not None else shown.number}.png"
        self.save_dir.mkdir(parents=True, exist_ok=True)
        return Result(shown.image, seed, record=record).save(self.save_dir / name)

    def state(self) -> dict:
        with self.lock:
            state = self.painting.state()
        return {**state, "playing": self.playing, "frames": self.frames, "save_dir": str(self.save_dir)}

    def masks(self, which: list[int] | None = None) -> list[dict]:
        with self.lock:
            indices = range(len(self.painting.brushes)) if which is None else which
            return [{"brush": i, "png": base64.b64encode(self.painting.mask_png(i)).decode("ascii")}
                    for i in indices if 0 <= i < len(self.painting.brushes)]

    # The model thread.

    def _run(self) -> None:
        while not self._closed:
            try:
                if not self._jobs.empty():
                    self._images(self._jobs.get())
                elif self.playing:
                    self._apply()
                    self._show("frame", self.stream())
                    self.frames += 1
                else:
                    self._wake.wait(0.5)
                    self._wake.clear()
            except Exception as exc:  # shown on the page; the app goes on
                from smd_cli.errors import unexpected

                self.errors.append(str(exc) if isinstance(exc, SmdError) else unexpected(exc))
                self.playing = False
                self._notify()

    def _apply(self) -> None:
        """Hand the stream what the painting changed since the last frame."""
        from smd_cli.render import apply_scene

        with self.lock:
            if self.painting.version == self.applied:
                return
            version = self.painting.version
            sf, masks = self.painting.scene_file(), self.painting.scene_masks()
        apply_scene(self.stream, sf, masks)
        self.applied = version

    def _images(self, count: int) -> None:
        """`count` full images at the scene's settings, seeds from the painting's seed on."""
        from smd_cli.render import generate
        from smd_cli.scene import SceneFile, random_seed

        self._apply()  # the stream too, so that what the display says it shows is so
        with self.lock:
            sf, masks = self.painting.scene_file(), self.painting.scene_masks()
        first = sf.scene.seed if sf.scene.seed is not None else random_seed()
        for seed in range(first, first + count):
            one = SceneFile(sf.scene.model_copy(update={"seed": seed}), sf.path, label=sf.label)
            result = generate(self.pipe, one, masks=masks)
            self._show("image", result.image, seed=seed, record=result.record)

    def _show(self, kind: str, image: Image.Image, *, seed: int | None = None, record: Any = None) -> None:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=FRAME_QUALITY)
        number = self.shown.number + 1 if self.shown else 1
        self.shown = Shown(number, kind, out.getvalue(), image, seed, record, self.applied)
        self._notify()

    def _notify(self) -> None:
        for callback in list(self.on_shown):
            callback()


def _int(message: dict, key: str) -> int:
    value = message.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SmdError(f"{key} must be a whole number, got {value!r}")
    return value


def _fields(message: dict) -> dict:
    fields = message.get("fields") or {}
    if not isinstance(fields, dict):
        raise SmdError("fields must be a mapping of brush settings")
    return fields


# ---------------------------------------------------------------------------------------------
# The web layer


def make_app(session: PaintSession, *, allowed_origins: set[str] | None = None):
    """The Starlette app: `/` the page, `/ws` a tab's connection, `/picture` the upload,
    `/frame.jpg` the image on display."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    page = PAGE.read_text(encoding="utf-8")
    clients: set["Client"] = set()

    class Client:
        def __init__(self, ws: WebSocket):
            self.ws = ws
            self.messages: asyncio.Queue = asyncio.Queue()
            self.new_image = asyncio.Event()

    loop_holder: dict[str, asyncio.AbstractEventLoop] = {}

    def shown_from_thread() -> None:  # the model thread: wake every tab, never wait
        loop = loop_holder.get("loop")
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(lambda: [c.new_image.set() for c in list(clients)])
            except RuntimeError:  # the server stopped meanwhile
                pass

    session.on_shown.append(shown_from_thread)

    def broadcast(message: dict) -> None:
        for client in list(clients):
            client.messages.put_nowait(message)

    def origin_ok(headers) -> bool:
        origin = headers.get("origin")
        if origin is None or allowed_origins is None:
            return True
        return origin in allowed_origins or origin == f"http://{headers.get('host')}"

    async def index(request):
        return HTMLResponse(page)

    async def frame(request):
        shown = session.shown
        if shown is None:
            return Response(status_code=204)
        return Response(shown.jpeg, media_type="image/jpeg", headers={"X-Frame-Number": str(shown.number)})

    async def picture_file(request):
        with session.lock:
            picture = session.painting.picture
        if picture is None:
            return Response(status_code=404)
        out = io.BytesIO()
        picture.save(out, format="PNG")
        return Response(out.getvalue(), media_type="image/png", headers={"Cache-Control": "no-store"})

    async def picture(request):
        if not origin_ok(request.headers):
            return JSONResponse({"error": "another site may not change this painting"}, status_code=403)
        length = int(request.headers.get("content-length") or 0)
        if length > MAX_UPLOAD_BYTES:
            return JSONResponse({"error": f"the picture is larger than {MAX_UPLOAD_BYTES // 2**20} MiB"},
                                status_code=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD_BYTES:
                return JSONResponse({"error": f"the picture is larger than {MAX_UPLOAD_BYTES // 2**20} MiB"},
                                    status_code=413)
        try:
            await asyncio.to_thread(session.set_picture, bytes(body))
        except SmdError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        broadcast({"type": "state", **session.state()})
        return JSONResponse({"ok": True})

    async def sender(client: Client) -> None:
        sent = 0
        while True:
            wait_message = asyncio.ensure_future(client.messages.get())
            wait_image = asyncio.ensure_future(client.new_image.wait())
            done, pending = await asyncio.wait({wait_message, wait_image}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if wait_message in done:
                await client.ws.send_text(json.dumps(wait_message.result()))
            if wait_image in done:
                client.new_image.clear()
                shown = session.shown
                if session.errors:
                    await client.ws.send_text(json.dumps({"type": "error", "message": session.errors.pop()}))
                if shown is not None and shown.number != sent:  # only the newest: older ones are dropped
                    sent = shown.number
                    await client.ws.send_text(json.dumps({"type": "shown", "number": shown.number, "kind": shown.kind,
                                                          "seed": shown.seed, "frames": session.frames,
                                                          "version": shown.version}))
                    await client.ws.send_bytes(shown.jpeg)

    async def connection(ws: WebSocket) -> None:
        if not origin_ok(ws.headers):
            await ws.close(code=1008)
            return
        loop_holder["loop"] = asyncio.get_running_loop()
        await ws.accept()
        client = Client(ws)
        clients.add(client)
        client.messages.put_nowait({"type": "state", **session.state()})
        for mask in session.masks():
            client.messages.put_nowait({"type": "mask", **mask})
        client.new_image.set()
        task = asyncio.create_task(sender(client))
        try:
            while True:
                text = await ws.receive_text()
                await handle(client, text)
        except WebSocketDisconnect:
            pass
        finally:
            clients.discard(client)
            task.cancel()

    async def handle(client: Client, text: str) -> None:
        try:
            if len(text) > MAX_MESSAGE_BYTES:
                raise SmdError(f"an edit of {len(text)} bytes is too large")
            message = json.loads(text)
            if not isinstance(message, dict) or not isinstance(message.get("op"), str):
                raise SmdError("an edit is a JSON object with an op")
            op = message["op"]
            result = await asyncio.to_thread(session.edit, op, message) if op in ("save", "save_image") \
                else session.edit(op, message)
        except (SmdError, ValueError) as exc:
            client.messages.put_nowait({"type": "error", "message": str(exc)})
            return
        if op in ("save", "save_image"):
            client.messages.put_nowait({"type": "saved", "what": op, "path": result})
            return
        broadcast({"type": "state", **session.state()})
        changed = {"stroke": [message.get("brush")], "undo": [result], "add_brush": [result],
                   "update_brush": [message.get("brush")]}.get(op)  # (a new colour recolours the mask)
        if op in ("remove_brush", "move_brush"):
            changed = None
            for mask in session.masks():
                broadcast({"type": "mask", **mask})
        for mask in session.masks([i for i in changed or [] if isinstance(i, int)]):
            broadcast({"type": "mask", **mask})

    return Starlette(routes=[Route("/", index), Route("/frame.jpg", frame),
                             Route("/picture", picture, methods=["POST"]), Route("/picture", picture_file),
                             WebSocketRoute("/ws", connection)])


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or an SmdError saying why there can be none."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise SmdError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                       + ("; pick another --port" if exc.errno in (98, 48) else "")) from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


class Server:
    """uvicorn serving the app on an already bound socket, in this thread (`run`) or another (`start`)."""

    def __init__(self, session: PaintSession, sock: socket.socket):
        import uvicorn

        self.sock, self.url = sock, url_of(sock)
        origins = {self.url.rstrip("/")}
        if self.url.startswith("http://127.0.0.1:"):
            origins.add(self.url.rstrip("/").replace("127.0.0.1", "localhost"))
        config = uvicorn.Config(make_app(session, allowed_origins=origins), log_level="warning",
                                ws_max_size=MAX_MESSAGE_BYTES, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self.run, name="smd-paint-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()


def check_host(host: str) -> None:
    """Binding anywhere but this machine lets others paint and save files here: say so."""
    if host not in LOCAL_HOSTS:
        warnings.warn(f"--host {host}: anyone who can reach this machine can use the app and save files into "
                      "the save folder", stacklevel=2)


def open_paint(scene: Path | None, options, *, width: int | None = None, height: int | None = None,
               save_dir: Path | None = None, cfg_type: str = "none", on_event=None) -> PaintSession:
    """Check all that can fail before a model loads (the scene and its masks, the save folder), then
    load the model (`options`) and start the stream on the painting."""
    import dataclasses

    from smd_cli import defaults
    from smd_cli.batch import ModelCache, sources_of, with_preset
    from smd_cli.live import check_cfg_type
    from smd_cli.models import check_source, resolve_device, resolve_dtype, set_threads
    from smd_cli.outputs import check_writable
    from smd_cli.scene import load_scene, validate_scene

    check_cfg_type(cfg_type)
    if scene is not None:
        sf = with_preset(load_scene(scene, options.overrides), options)
        painting = Painting.from_scene(sf, width, height)
        stem, folder = sf.name, save_dir or sf.base_dir
    else:
        sf = validate_scene({"layers": [{"prompt": ""}]}, overridden=set())
        painting = Painting.blank(width or defaults.SIZE, height or defaults.SIZE)
        stem, folder = "painting", save_dir or Path.cwd()
    check_writable(Path(folder) / f"{stem}.yaml")
    sources = sources_of(sf, options)
    check_source(sources.model)
    if options.threads:
        set_threads(options.threads)
    device = resolve_device(options.device)
    cache = ModelCache(dataclasses.replace(options, compile=False), device, resolve_dtype(options.dtype, device),
                       on_event)
    return PaintSession(painting, cache.get(sources), save_dir=Path(folder), stem=stem, cfg_type=cfg_type).start()
