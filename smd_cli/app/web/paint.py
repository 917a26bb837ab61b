"""`smd paint`: the semantic palette in the browser, live on the stream.

Three parts, each with one job:

- `PaintSession` owns the painting (`smd_cli.app.painting`), the stream and the one thread that runs
  the model. Edits change the painting under a lock and return at once; before each frame the
  thread hands the stream whatever changed since the last one (`render.apply_scene`, as `smd
  stream --watch` does for file edits), so a stroke is in the next frame's input. A new region mode,
  which a running stream cannot take, gets a new stream, made on that thread between two frames.
  Full images ("one image", "batch") run on the same thread between frames, pause the stream, and are held
  until play is pressed again, so that a person can look at them and keep one. The thread never
  waits on the network: it leaves each image in a slot that the page's connections read when
  they can.
- `make_app` is the web layer (Starlette): the page, a WebSocket per tab that carries edits in
  and state, masks and images out, and an upload route for the background picture. What a page
  may send is `Edit` below and nothing else; who may send it is `smd_cli.app.web.access`. Every queue is
  bounded: a tab's pending state and masks are flags that newer ones overwrite, stale frames are
  dropped, and a tab that stops reading only stalls its own connection.
- `Server` runs the app with uvicorn on a socket bound by `listen` (127.0.0.1 unless told otherwise),
  on the stack `smd stream --preview` shares (`smd_cli.app.web.server`: the Host and Origin guard,
  bounded connections, a deadline for each request head).

Why this stack: the page needs frames pushed as soon as they exist and strokes sent as they are
drawn, both over one long-lived connection, which a WebSocket does and plain HTTP polling does
not; Starlette and uvicorn are small, well kept, and serve WebSockets without a build step or a
front-end framework. Gradio's image editor, which the original app used, was too slow for drawing.
The page is one HTML file in the package with no external resource, so it works offline.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import io
import json
import queue
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from smd_cli.app.painting import MAX_STROKE_POINTS, BrushFields, Finite, Painting, Text, not_a_page_setting
from smd_cli.app.web.access import Access, is_loopback
from smd_cli.app.web.server import Guard, WebServer
from smd_cli.app.web.server import listen as listen  # the command binds with it before the model loads
from smd_cli.core import defaults
from smd_cli.core.errors import SmdError

PAGE = Path(__file__).parent / "paint.html"
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # a background picture sent from the page
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one edit (a long stroke is a few hundred kilobytes)
MAX_CLIENTS = 16  # tabs connected at once
RECENT = 8  # frames and images kept for "save image" besides the held ones
FRAME_QUALITY = 90  # JPEG quality of the frames sent to the page
BATCH_SIZE = 4  # images of "batch"


# ---------------------------------------------------------------------------------------------
# What a page may send: one JSON object per WebSocket message, its "op" saying which edit.


class _Edit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Stroke(_Edit):
    op: Literal["stroke"]
    brush: int
    points: Annotated[list[Annotated[list[Finite], Field(min_length=2, max_length=2)]],  # [[x, y], ...]
                      Field(min_length=1, max_length=MAX_STROKE_POINTS)]
    size: Finite = 16.0
    erase: bool = False


class Undo(_Edit):
    op: Literal["undo"]


class AddBrush(_Edit):
    op: Literal["add_brush"]
    fields: BrushFields = BrushFields()


class RemoveBrush(_Edit):
    op: Literal["remove_brush"]
    brush: int


class MoveBrush(_Edit):
    op: Literal["move_brush"]
    brush: int
    to: int


class UpdateBrush(_Edit):
    op: Literal["update_brush"]
    brush: int
    fields: BrushFields


class Background(_Edit):
    op: Literal["background"]
    prompt: Text | None = None
    negative_prompt: Text | None = None


class RemovePicture(_Edit):
    op: Literal["remove_picture"]


class Seed(_Edit):
    op: Literal["seed"]
    seed: int | None = None


class RegionMode(_Edit):
    op: Literal["region_mode"]
    mode: Literal[defaults.REGION_MODES]  # type: ignore[valid-type]


class Play(_Edit):
    op: Literal["play"]
    on: bool = True


class Images(_Edit):
    op: Literal["one_image", "batch"]


class Save(_Edit):
    op: Literal["save"]


class SaveImage(_Edit):
    op: Literal["save_image"]
    number: int | None = None  # the image the page shows; None: the newest


Edit = Annotated[Union[Stroke, Undo, AddBrush, RemoveBrush, MoveBrush, UpdateBrush, Background, RemovePicture,
                       Seed, RegionMode, Play, Images, Save, SaveImage], Field(discriminator="op")]
_EDITS = TypeAdapter(Edit)
OPS = ("stroke", "undo", "add_brush", "remove_brush", "move_brush", "update_brush", "background",
       "remove_picture", "seed", "region_mode", "play", "one_image", "batch", "save", "save_image")


def parse_edit(message: str | bytes | dict) -> Any:
    """An edit from its JSON text (or a dict), or an SmdError saying what is wrong with it."""
    if isinstance(message, (str, bytes)) and len(message) > MAX_MESSAGE_BYTES:
        raise SmdError(f"an edit of {len(message)} bytes is too large; at most {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(message) if isinstance(message, (str, bytes)) else message
    except (ValueError, RecursionError):
        raise SmdError("an edit is one JSON object, and this is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("op"), str):
        raise SmdError('an edit is a JSON object with an "op"')
    if data["op"] not in OPS:
        raise SmdError(f"unknown edit {data['op'][:40]!r}; the edits are {', '.join(OPS)}")
    try:
        return _EDITS.validate_python(data)
    except ValidationError as exc:
        raise _refused(data["op"], exc) from None


def _refused(op: str, exc: ValidationError) -> SmdError:
    """What is wrong with an edit, from pydantic's first complaint."""
    problem = exc.errors(include_url=False)[0]
    where = [str(p) for p in problem["loc"][1:]]  # past the union's tag
    if problem["type"] == "extra_forbidden" and where[:1] == ["fields"]:
        return SmdError(f"{op}: {not_a_page_setting(repr(where[-1][:40]))}")
    key = ".".join(where)
    return SmdError(f"{op}: {key + ': ' if key else ''}{problem['msg']}")


# ---------------------------------------------------------------------------------------------
# The session


@dataclass
class Shown:
    """An image for the display: a stream frame or a full image, numbered from 1."""

    number: int
    kind: str  # "frame" or "image"
    jpeg: bytes
    image: Image.Image
    seed: int | None = None
    record: Any = None
    version: int = 0  # the painting's edits (`Painting.version`) this image was made with
    run: int = 0  # full images: which "one image" or "batch" made it, and its place there
    index: int = 0
    count: int = 0

    def message(self, frames: int) -> dict:
        return {"type": "shown", "number": self.number, "kind": self.kind, "seed": self.seed, "frames": frames,
                "version": self.version, "run": self.run, "index": self.index, "count": self.count}


class PaintSession:
    """A painting, its stream and the thread that runs the model for both."""

    def __init__(self, painting: Painting, pipe, *, save_dir: Path, stem: str, cfg_type: str = "none"):
        self.painting, self.pipe, self.cfg_type = painting, pipe, cfg_type
        self.save_dir, self.stem = Path(save_dir), stem
        self.lock = threading.Lock()
        self.stream = self._new_stream(painting.scene_file(), painting.scene_masks())
        self.applied = painting.version
        self.playing = False  # as in the original app: set up the painting, then press play
        self.shown: Shown | None = None  # the newest image made
        self.held: list[Shown] = []  # the last "one image" or "batch", kept until the next
        self.recent: collections.deque[Shown] = collections.deque(maxlen=RECENT)
        self.runs = 0
        self.making = False  # a "one image" or "batch" is asked for or under way
        self.frames = 0  # stream frames made
        self.error: tuple[int, str] | None = None  # the model thread's last error, numbered
        self.on_shown: list[Callable[[], None]] = []  # called from the model thread after each new image
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._switch: tuple[str, concurrent.futures.Future] | None = None  # a region mode asked for
        self._wake = threading.Event()
        self._closed = False
        self._picture_png: tuple[int, bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="smd-paint-model", daemon=True)

    def start(self) -> "PaintSession":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        switch = self._switch
        if switch is not None and not switch[1].done():
            switch[1].set_exception(SmdError("the app stopped before the regions were switched"))
        self.stream.close()

    # Edits, from any thread.

    def edit(self, message: Any) -> Any:
        """Apply one edit from the page (an `Edit`, or its JSON text or dict); raises SmdError with
        what is wrong. Returns the new brush's index for add_brush, the path written for saves."""
        m = message if isinstance(message, BaseModel) else parse_edit(message)
        if m.op == "save":
            return self.save()
        if m.op == "region_mode":
            return self.set_region_mode(m.mode)
        if m.op == "save_image":
            return self.save_image(m.number)
        p = self.painting
        result = None
        with self.lock:
            if m.op == "stroke":
                p.stroke(m.brush, m.points, m.size, m.erase)
            elif m.op == "undo":
                result = p.undo()
            elif m.op == "add_brush":
                result = p.add_brush(**m.fields.model_dump(exclude_none=True))
            elif m.op == "remove_brush":
                p.remove_brush(m.brush)
            elif m.op == "move_brush":
                p.move_brush(m.brush, m.to)
            elif m.op == "update_brush":
                p.update_brush(m.brush, **m.fields.model_dump(exclude_none=True))
            elif m.op == "background":
                p.update_background(m.prompt, m.negative_prompt)
            elif m.op == "remove_picture":
                p.set_picture(None)
            elif m.op == "seed":
                p.set_seed(m.seed)
            elif m.op == "play":
                self.playing = m.on
            elif m.op in ("one_image", "batch"):
                if self.making:
                    raise SmdError("images are being made: wait for them, then ask again")
                self.making, self.playing = True, False  # the display holds them until play is pressed
                self._jobs.put_nowait(1 if m.op == "one_image" else BATCH_SIZE)
        self._wake.set()
        return result

    def save(self) -> str:
        with self.lock:
            return str(self.painting.save(self.save_dir, self.stem))

    def set_region_mode(self, mode: str) -> None:
        """Sample the regions in `mode` (`defaults.REGION_MODES`). A running stream cannot change
        its mode, so a new one is made from the painting, on the model thread between two frames,
        and this waits for it: if the mode is refused for this painting (a brush's own LoRA in
        attention mode, say), the SmdError is raised here and the painting and its stream stay
        as they were; otherwise the new stream replaces the old one and the mode is an edit of the
        painting (saved, and taken back by undo)."""
        if mode not in defaults.REGION_MODES:
            raise SmdError(f"region_mode must be one of {', '.join(defaults.REGION_MODES)}, got {mode!r}")
        with self.lock:
            if mode == self.painting.scene.region_mode:
                return None
            if self.making:
                raise SmdError("images are being made: wait for them, then switch the regions")
            if self._switch is not None:
                raise SmdError("the regions are being switched: wait for it, then ask again")
            if self._closed:
                raise SmdError("the app is stopping")
            done: concurrent.futures.Future = concurrent.futures.Future()
            self._switch = (mode, done)
        if not self._thread.is_alive():  # not started (a session driven from Python): no frame to wait for
            self._take_switch()
        self._wake.set()
        return done.result()

    def set_picture(self, data: bytes) -> str:
        """The background picture from uploaded bytes, decoded with the limits of scene images;
        returns what the page should say of it."""
        from smd_cli.core.files import UnreadableFile, decode_image
        from smd_cli.method.masks import aspect_mismatch

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
            width, height = self.painting.width, self.painting.height
        self._wake.set()
        if aspect_mismatch(image.size, width, height):
            return (f"picture uploaded; it is {image.size[0]}x{image.size[1]}, stretched to the {width}x{height} "
                    "canvas (crop it to the canvas's shape to keep its proportions)")
        return "picture uploaded"

    def picture_png(self) -> bytes | None:
        """The background picture as PNG, encoded once per picture."""
        with self.lock:
            picture, version = self.painting.picture, self.painting.picture_version
        if picture is None:
            return None
        cached = self._picture_png
        if cached is None or cached[0] != version:
            cached = self._picture_png = (version, _png(picture))
        return cached[1]

    def find(self, number: int | None) -> Shown:
        """The image numbered `number` if it is still kept (None: the newest)."""
        shown = self.shown
        if shown is None:
            raise SmdError("no image yet: press play, or one image")
        if number is None:
            return shown
        for kept in (*self.held, *self.recent):
            if kept.number == number:
                return kept
        raise SmdError(f"image {number} is no longer kept: save the image on display sooner after it appears")

    def save_image(self, number: int | None = None) -> str:
        """Image `number` (the one on the page's display), with its record, beside the saved scenes
        (never over a file)."""
        from smd_cli.app.requests import Result, image_record

        shown = self.find(number)
        seed = shown.seed if shown.seed is not None else self.painting.scene.seed
        record = shown.record
        if record is None:  # a stream frame: the record of the painting as it is now
            with self.lock:
                sf = self.painting.scene_file()
            record = image_record(self.pipe, sf, seed=seed if seed is not None else 0, width=self.painting.width,
                                  height=self.painting.height, timings={}, files={})
        name = f"{self.stem}-{shown.kind}-{seed if seed is not None else shown.number}.png"
        self.save_dir.mkdir(parents=True, exist_ok=True)
        return str(Result(shown.image, seed, record=record).save(self.save_dir / name))

    def state(self) -> dict:
        with self.lock:
            state = self.painting.state()
        return {**state, "playing": self.playing, "making": self.making, "frames": self.frames,
                "save_dir": str(self.save_dir)}

    def masks(self, which: Any = None) -> list[dict]:
        """Brushes' masks as PNG for the page: all, or the indices in `which`."""
        with self.lock:
            count = len(self.painting.brushes)
            indices = range(count) if which is None else sorted(i for i in which if 0 <= i < count)
            arrays = [(i, self.painting.brushes[i].mask) for i in indices]
        return [{"brush": i, "png": base64.b64encode(_png(Image.fromarray(mask, "L"))).decode("ascii")}
                for i, mask in arrays]

    def unsent(self, after: int) -> list[Shown]:
        """What a tab that has seen up to image `after` should get: every held image it has not
        seen, in order, and the newest frame if it is newer still (older frames are dropped)."""
        out = [s for s in self.held if s.number > after]
        shown = self.shown
        if shown is not None and shown.kind == "frame" and shown.number > max([after] + [s.number for s in out]):
            out.append(shown)
        return out

    # The model thread.

    def _run(self) -> None:
        while not self._closed:
            try:
                if self._switch is not None:
                    self._take_switch()
                elif not self._jobs.empty():
                    self._images(self._jobs.get())
                elif self.playing:
                    self._apply()
                    version = self.applied
                    self._show("frame", self.stream(), version=version)
                    self.frames += 1
                else:
                    self._wake.wait(0.5)
                    self._wake.clear()
            except Exception as exc:  # shown on the page; the app goes on
                from smd_cli.core.errors import unexpected

                self.making = self.playing = False
                said = str(exc) if isinstance(exc, SmdError) else unexpected(exc)
                self.error = ((self.error or (0, ""))[0] + 1, said)
                self._notify()

    def _new_stream(self, sf, masks):
        """A stream of the painting `sf` with its `masks`: how the session starts one, and starts
        another when the region mode changes (a running stream cannot change it)."""
        from smd_cli.app.requests import scene_stream

        stream = scene_stream(sf, self.pipe, cfg_type=self.cfg_type, masks=masks)
        # An edit goes into every stage at once and the frames keep coming: the next frame shows it
        # in part, the one after the stream's depth fully. (A flush would hold the display for a
        # whole depth of calls on every stroke.)
        stream.autoflush = False
        return stream

    def _replace_stream(self, stream) -> None:
        old, self.stream = self.stream, stream
        old.close()

    def _take_switch(self) -> None:
        """The region mode asked for by `set_region_mode`: a new stream of the painting in that mode,
        which replaces the old one only once it is made; its refusal goes back to the asker."""
        from smd_cli.scenes.scene import SceneFile

        switch = self._switch
        if switch is None:
            return
        mode, done = switch
        try:
            with self.lock:
                version = self.painting.version
                sf, masks = self.painting.scene_file(), self.painting.scene_masks()
            stream = self._new_stream(SceneFile(sf.scene.model_copy(update={"region_mode": mode}), sf.path,
                                                label=sf.label), masks)
            with self.lock:
                fresh = self.painting.version == version  # no edit came while the stream was made
                self.painting.set_region_mode(mode)
                self._replace_stream(stream)
                self.applied = self.painting.version if fresh else version  # the next frame applies the rest
        except BaseException as exc:  # the asker says it; the old stream goes on
            self._switch = None
            done.set_exception(exc)
        else:
            self._switch = None
            done.set_result(None)
            self._notify()

    def _apply(self) -> None:
        """Hand the stream what the painting changed since the last frame. A region mode other than
        the stream's (an undo of a switch) needs a new stream."""
        from smd_cli.app.requests import apply_scene

        with self.lock:
            if self.painting.version == self.applied:
                return
            version = self.painting.version
            sf, masks = self.painting.scene_file(), self.painting.scene_masks()
        if sf.scene.region_mode != self.stream.region_mode:
            stream = self._new_stream(sf, masks)
            with self.lock:
                self._replace_stream(stream)
        else:
            apply_scene(self.stream, sf, masks)
        self.applied = version

    def _images(self, count: int) -> None:
        """`count` full images at the scene's settings, seeds from the painting's seed on."""
        from smd_cli.app.requests import generate
        from smd_cli.scenes.scene import SceneFile, random_seed

        try:
            self._apply()  # the stream too, so that what the display says it shows is so
            with self.lock:
                sf, masks, version = self.painting.scene_file(), self.painting.scene_masks(), self.painting.version
            first = sf.scene.seed if sf.scene.seed is not None else random_seed()
            self.runs += 1
            self.held = []
            for index, seed in enumerate(range(first, first + count)):
                one = SceneFile(sf.scene.model_copy(update={"seed": seed}), sf.path, label=sf.label)
                result = generate(self.pipe, one, masks=masks)
                shown = self._shown("image", result.image, version=version, seed=seed, record=result.record,
                                    run=self.runs, index=index, count=count)
                self.held = [*self.held, shown]
                self._publish(shown)
        finally:
            self.making = False
            self._notify()

    def _show(self, kind: str, image: Image.Image, **details: Any) -> None:
        self._publish(self._shown(kind, image, **details))

    def _shown(self, kind: str, image: Image.Image, **details: Any) -> Shown:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=FRAME_QUALITY)
        number = self.shown.number + 1 if self.shown else 1
        return Shown(number, kind, out.getvalue(), image, **details)

    def _publish(self, shown: Shown) -> None:
        self.shown = shown
        self.recent.append(shown)
        self._notify()

    def _notify(self) -> None:
        for callback in list(self.on_shown):
            callback()


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# The web layer


class _Tab:
    """One connected page. What it still has to be sent is a few flags and a short list, which
    newer news overwrites: nothing piles up for a tab that reads slowly or not at all."""

    def __init__(self, ws):
        self.ws = ws
        self.wake = asyncio.Event()
        self.state = True
        self.masks: set[int] | None = None  # None: every brush's
        self.all_masks = True
        self.notes: collections.deque[dict] = collections.deque(maxlen=8)  # replies to this tab's edits

    def tell(self, *, state: bool = False, masks: Any = (), all_masks: bool = False, note: dict | None = None):
        self.state |= state
        if all_masks:
            self.all_masks = True
        elif masks:
            self.masks = (self.masks or set()) | set(masks)
        if note is not None:
            self.notes.append(note)
        self.wake.set()


def make_app(session: PaintSession, *, access: Access | None = None):
    """The Starlette app: `/` the page, `/ws` a tab's connection, `/picture` the upload (POST) and
    the picture (GET), `/frame.jpg` the newest image. With `access`, only pages of this server."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    page = PAGE.read_text(encoding="utf-8")
    tabs: set[_Tab] = set()
    uploading = asyncio.Semaphore(1)
    loop_holder: dict[str, asyncio.AbstractEventLoop] = {}

    def shown_from_thread() -> None:  # the model thread: wake every tab, never wait
        loop = loop_holder.get("loop")
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(lambda: [tab.tell(state=True) for tab in list(tabs)])
            except RuntimeError:  # the server stopped meanwhile
                pass

    session.on_shown.append(shown_from_thread)

    def tell_all(**news) -> None:
        for tab in list(tabs):
            tab.tell(**news)

    async def index(request):
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def frame(request):
        shown = session.shown
        if shown is None:
            return Response(status_code=204)
        return Response(shown.jpeg, media_type="image/jpeg", headers={"X-Frame-Number": str(shown.number)})

    async def picture_file(request):
        png = await asyncio.to_thread(session.picture_png)
        if png is None:
            return Response(status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def picture(request):
        too_large = JSONResponse({"error": f"the picture is larger than {MAX_UPLOAD_BYTES // 2**20} MiB"},
                                 status_code=413)
        length = request.headers.get("content-length", "0").strip()
        if not length.isdigit():
            return JSONResponse({"error": "Content-Length is not a number"}, status_code=400)
        if int(length) > MAX_UPLOAD_BYTES:
            return too_large
        if uploading.locked():
            return JSONResponse({"error": "another picture is being uploaded; try again when it is done"},
                                status_code=429)
        async with uploading:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_UPLOAD_BYTES:
                    return too_large
            try:
                said = await asyncio.to_thread(session.set_picture, bytes(body))
            except SmdError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
        tell_all(state=True)
        return JSONResponse({"ok": True, "message": said})

    async def sender(tab: _Tab) -> None:
        sent, error_seen = 0, session.error[0] if session.error else 0
        while True:
            await tab.wake.wait()
            tab.wake.clear()
            while tab.notes:
                await tab.ws.send_text(json.dumps(tab.notes.popleft()))
            if session.error and session.error[0] > error_seen:
                error_seen = session.error[0]
                await tab.ws.send_text(json.dumps({"type": "error", "message": session.error[1]}))
            if tab.state:
                tab.state = False
                await tab.ws.send_text(json.dumps({"type": "state", **session.state()}))
            if tab.all_masks or tab.masks:
                which, tab.all_masks, tab.masks = (None if tab.all_masks else tab.masks), False, None
                for mask in await asyncio.to_thread(session.masks, which):
                    await tab.ws.send_text(json.dumps({"type": "mask", **mask}))
            for shown in session.unsent(sent):
                sent = shown.number
                await tab.ws.send_text(json.dumps(shown.message(session.frames)))
                await tab.ws.send_bytes(shown.jpeg)

    async def connection(ws: WebSocket) -> None:
        if len(tabs) >= MAX_CLIENTS:
            await ws.close(code=1013, reason=f"{MAX_CLIENTS} tabs are open already")
            return
        loop_holder["loop"] = asyncio.get_running_loop()
        await ws.accept()
        tab = _Tab(ws)
        tabs.add(tab)
        tab.wake.set()
        task = asyncio.create_task(sender(tab))
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    tab.tell(note={"type": "error", "message": "an edit is a JSON text message, not binary"})
                    continue
                await handle(tab, text)
        except WebSocketDisconnect:
            pass
        finally:
            tabs.discard(tab)
            task.cancel()

    async def handle(tab: _Tab, text: str) -> None:
        try:
            edit = parse_edit(text)
            result = await asyncio.to_thread(session.edit, edit)
        except SmdError as exc:
            tab.tell(note={"type": "error", "message": str(exc)})
            return
        except Exception as exc:  # a bug in smd: said on the page, the app goes on
            from smd_cli.core.errors import unexpected

            tab.tell(note={"type": "error", "message": f"unexpected error: {unexpected(exc)}"})
            return
        op = edit.op
        if op in ("save", "save_image"):
            tab.tell(note={"type": "saved", "what": op, "path": result})
            return
        if op == "stroke":
            tell_all(state=True, masks=[edit.brush])
        elif op == "update_brush":  # a new colour recolours the mask
            tell_all(state=True, masks=[edit.brush])
        elif op in ("undo", "add_brush", "remove_brush", "move_brush"):
            tell_all(state=True, all_masks=True)
        else:
            tell_all(state=True)

    app = Starlette(routes=[Route("/", index), Route("/frame.jpg", frame),
                            Route("/picture", picture, methods=["POST"]), Route("/picture", picture_file),
                            WebSocketRoute("/ws", connection)],
                    middleware=[Middleware(Guard, access=access)] if access is not None else [])
    return app


class Server(WebServer):
    """uvicorn serving the app on an already bound socket, in this thread (`run`) or another (`start`).
    A connection has `timeout` seconds to send each request head (`smd_cli.app.web.server`)."""

    thread_name = "smd-paint-web"

    def __init__(self, session: PaintSession, sock: socket.socket, host: str | None = None, *,
                 timeout: float = 5.0):
        super().__init__(lambda access: make_app(session, access=access), sock, host, timeout=timeout,
                         max_connections=4 * MAX_CLIENTS, ws_max_size=MAX_MESSAGE_BYTES)


def check_host(host: str) -> None:
    """Binding anywhere but this machine lets others paint and save files here: say so."""
    if not is_loopback(host):
        warnings.warn(f"--host {host}: anyone who can reach this machine can use the app and save files into "
                      "the save folder", stacklevel=2)


def open_paint(scene: Path | None, options, *, width: int | None = None, height: int | None = None,
               save_dir: Path | None = None, cfg_type: str = "none", on_event=None) -> PaintSession:
    """Check all that can fail before a model loads (the canvas and its views against the model, the
    work of a frame and of an image, the scene and its masks, the save folder), then load the model
    (`options`) and start the stream on the painting. An interactive canvas takes no --allow-large:
    past `defaults.LARGE_WORK` denoiser passes it is refused. A `region_mode` in `options.overrides`
    (`smd paint --region-mode`) is the painting's starting mode, a blank canvas's too."""
    from smd_cli.app.batch import load_session_model, sources_of, with_preset
    from smd_cli.app.live import check_cfg_type
    from smd_cli.core.outputs import check_writable
    from smd_cli.models.loading import check_source
    from smd_cli.scenes.canvas import canvas_size, canvas_views, check_work
    from smd_cli.scenes.presets import model_grid
    from smd_cli.scenes.scene import load_scene, validate_scene

    check_cfg_type(cfg_type)
    for option, side in (("--width", width), ("--height", height)):
        if side is not None and not defaults.MIN_SIZE <= side <= defaults.MAX_SIZE:
            raise SmdError(f"{option} {side}: each side of a canvas must be {defaults.MIN_SIZE} to "
                           f"{defaults.MAX_SIZE} pixels")
    if scene is not None:
        sf = with_preset(load_scene(scene, options.overrides), options)
        size = (width, height) if width is not None and height is not None else canvas_size(sf)
    else:
        size = (width or defaults.SIZE, height or defaults.SIZE)
        given = [v for k, v in options.overrides.items() if k in ("region_mode", ("region_mode",))]
        mode = {"region_mode": given[-1]} if given else {}  # --region-mode, or --set region_mode=...
        sf = validate_scene({"width": size[0], "height": size[1], "layers": [{"prompt": ""}], **mode},
                            overridden={("region_mode",)} if mode else set())
    sources = sources_of(sf, options)
    check_source(sources.model)
    grid = model_grid(sources.model, options.config)
    for stream in (True, False):  # the live frames, and the images the page asks for
        check_work(sf, canvas_views(sf, grid, *size, stream=stream), stream=stream)
    if scene is not None:
        painting = Painting.from_scene(sf, width, height)
        stem, folder = sf.name, save_dir or sf.base_dir
    else:
        painting = Painting.blank(*size, region_mode=mode.get("region_mode"))
        stem, folder = "painting", save_dir or Path.cwd()
    check_writable(Path(folder) / f"{stem}.yaml")
    pipe = load_session_model(options, sources, on_event)
    return PaintSession(painting, pipe, save_dir=Path(folder), stem=stem, cfg_type=cfg_type).start()
