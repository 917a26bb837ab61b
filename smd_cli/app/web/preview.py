"""`smd stream --preview`: a read-only page with the stream's newest frame, on the paint app's stack.

`make_app` is a Starlette app with three routes, each GET (and HEAD) only: `/` the page, which
polls the other two, `/frame.jpg` the newest frame and `/state.json` the frame count, frames per
second and prompts. Nothing is accepted from a page: any other method is answered 405, any other
path 404. `PreviewServer` binds the address when it is made (so that a busy port fails before a
model loads) and serves from `start`, with what `smd paint` uses too (`smd_cli.app.web.server`):
the same Host and Origin rule, a bounded number of connections, and a deadline for each request
head, so that an idle or slow client is closed rather than served for ever.
"""

from __future__ import annotations

import asyncio
import errno
import io
import threading
from typing import TYPE_CHECKING

from smd_cli.app.web.access import Access
from smd_cli.app.web.server import Guard, WebServer, bind
from smd_cli.core.errors import SmdError

if TYPE_CHECKING:
    from smd_cli.app.live import LiveState

FRAME_QUALITY = 90  # JPEG quality of the frames served

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>smd stream</title>
<style>body{font-family:sans-serif;background:#111;color:#ddd;margin:1em}img{max-width:100%;display:block}
li{margin:.2em 0}</style></head><body><img id="frame" src="/frame.jpg" alt="newest frame">
<p id="status"></p><ol id="prompts"></ol><script>
async function tick(){const img=new Image();img.onload=()=>{document.getElementById('frame').src=img.src;};
img.src='/frame.jpg?'+Date.now();try{const s=await (await fetch('/state.json')).json();
document.getElementById('status').textContent=s.frames+' frames, '+s.fps.toFixed(1)+' frames/s';
const list=document.getElementById('prompts');list.innerHTML='';
for(const p of s.prompts){const li=document.createElement('li');li.textContent=p;list.appendChild(li);}}
catch(e){}setTimeout(tick,250);}tick();</script></body></html>"""

NO_STORE = {"Cache-Control": "no-store"}


def make_app(state: LiveState, *, access: Access | None = None):
    """The preview's Starlette app: `/`, `/frame.jpg`, `/state.json`. With `access`, only requests
    that name this server, from no other site's page."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    encoded: list = [None, b""]  # the frame last encoded and its JPEG: each frame is encoded once
    encoding = threading.Lock()

    def jpeg(frame) -> bytes:
        with encoding:
            if encoded[0] is not frame:
                out = io.BytesIO()
                frame.convert("RGB").save(out, format="JPEG", quality=FRAME_QUALITY)
                encoded[:] = [frame, out.getvalue()]
            return encoded[1]

    async def index(request):
        return HTMLResponse(PAGE, headers=NO_STORE)

    async def frame(request):
        with state.lock:
            newest, number = state.frame, state.frames
        if newest is None:
            return PlainTextResponse("no frame yet", status_code=503, headers=NO_STORE)
        body = await asyncio.to_thread(jpeg, newest)  # off the event loop: other clients go on meanwhile
        return Response(body, media_type="image/jpeg", headers={**NO_STORE, "X-Frame-Number": str(number)})

    async def status(request):
        with state.lock:
            body = {"frames": state.frames, "fps": state.fps, "prompts": list(state.prompts)}
        return JSONResponse(body, headers=NO_STORE)

    guard = [Middleware(Guard, access=access, option="smd stream --preview", what="this preview")]
    return Starlette(routes=[Route("/", index, methods=["GET"]), Route("/frame.jpg", frame, methods=["GET"]),
                             Route("/state.json", status, methods=["GET"])],
                     middleware=guard if access is not None else [])


class PreviewServer(WebServer):
    """The preview of `state` at `host`:`port` (0: any free port), served from a daemon thread.

    The address is bound when the server is made and served from `start`. At most `max_clients`
    connections are served at once (past them a request is answered 503), and a connection that
    sends no whole request for `timeout` seconds, after connecting or after its last answer, is
    closed. Only requests that name this server, from no other site's page, are answered
    (`smd_cli.app.web.access`).
    """

    thread_name = "smd-preview-web"

    def __init__(self, state: LiveState, host: str = "127.0.0.1", port: int = 8000, *, max_clients: int = 16,
                 timeout: float = 10.0):
        try:
            sock = bind(host, port)
        except (OSError, UnicodeError, OverflowError) as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            reason = "the port is in use; give another, or 0 for any free one" \
                if getattr(exc, "errno", None) == errno.EADDRINUSE else getattr(exc, "strerror", None) or str(exc)
            raise SmdError(f"--preview {where}: cannot listen there: {reason}") from None
        # limit_concurrency counts the connection asking too: one more lets `max_clients` be served.
        # The terminal belongs to the stream's status line: uvicorn says only errors.
        super().__init__(lambda access: make_app(state, access=access), sock, host, timeout=timeout,
                         max_connections=max_clients + 1, log_level="error")

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]
