"""What smd's two web servers (`smd paint` and `smd stream --preview`) share: one stack, Starlette
apps served by uvicorn, with the same rules for who may connect and for how long.

- `Guard` is the Host and Origin check (`smd_cli.app.web.access`) as ASGI middleware: a request or
  WebSocket that is not this server's is refused before any route sees it.
- `listen` binds the socket before anything slow happens (a busy port fails before a model loads);
  `WebServer` serves an app on it with uvicorn, in this thread (`run`) or a daemon thread (`start`).
- Connections are bounded (uvicorn's `limit_concurrency`: past it, a request is answered 503) and a
  connection must send a whole request head within `timeout` seconds of connecting or of its last
  answer, else it is closed (`_protocol`).
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from typing import Any

from smd_cli.app.web.access import Access, access_for, url_for
from smd_cli.core.errors import SmdError


class Guard:
    """ASGI middleware: a request or WebSocket whose Host or Origin is not this server's is refused
    before any route sees it (`smd_cli.app.web.access`). `option` names the command-line option that
    sets the names (said in the refusal), `what` the thing another site may not use."""

    def __init__(self, app, access: Access, option: str = "smd paint --host", what: str = "this app"):
        self.app, self.access = app, access
        self.wrong_host = f"this server answers only to the names it was started for (see {option})"
        self.wrong_origin = f"another site may not use {what}"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            from starlette.datastructures import Headers
            from starlette.responses import JSONResponse
            from starlette.websockets import WebSocketClose

            headers = Headers(scope=scope)
            problem = None
            if not self.access.host_ok(headers.get("host")):
                problem = 400, self.wrong_host
            elif not self.access.origin_ok(headers.get("origin")):
                problem = 403, self.wrong_origin
            if problem is not None:
                if scope["type"] == "websocket":
                    await WebSocketClose(code=1008, reason=problem[1])(scope, receive, send)
                else:
                    await JSONResponse({"error": problem[1]}, status_code=problem[0])(scope, receive, send)
                return
        await self.app(scope, receive, send)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or an SmdError saying why there can be none."""
    try:
        return bind(host, port)
    except (OSError, UnicodeError, OverflowError) as exc:
        raise SmdError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}"
                       + ("; pick another --port" if getattr(exc, "errno", None) in (98, 48) else "")) from None


def bind(host: str, port: int) -> socket.socket:
    """A socket listening on `host` (IPv4, or IPv6 for an address with a colon) and `port`; raises
    what the operating system says."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def url_of(sock: socket.socket, host: str | None = None) -> str:
    """The app's address: under the name it was started with (`access.url_for`)."""
    bound, port = sock.getsockname()[:2]
    return url_for(host or bound, port)


@functools.cache
def _protocol() -> type:
    """uvicorn's h11 protocol, with a deadline for the request head.

    uvicorn times out a connection only between requests (`timeout_keep_alive`, armed when an answer
    is complete), and any byte received cancels that timer. A client that connects and never sends a
    request, or trickles a request one byte at a time, would hold its connection (and its place
    under `limit_concurrency`) for ever; neither `h11_max_incomplete_event_size` (a size, not a
    time) nor `limit_concurrency` (counted only when a request arrives) closes it. So here a timer of
    `timeout_keep_alive` seconds starts when a connection is made and again when an answer is
    complete, and only a whole request head (an HTTP request or a WebSocket upgrade) stops it:
    trickled bytes do not. When it fires the connection is closed without a word, as an idle
    keep-alive connection is. A subclass rather than a watchdog task because the protocol already
    knows the moments that matter and runs on the server's event loop; h11 rather than "auto" so
    that the deadline holds whichever optional parsers are installed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _deadline: Any = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            scope = self.scope
            super().handle_events()
            if self.scope is not scope:  # a whole request head arrived (an upgrade included)
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # before: a pipelined request handled in there disarms it again
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(self.timeout_keep_alive, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return DeadlineH11Protocol


class WebServer:
    """uvicorn serving an ASGI app on an already bound socket, in this thread (`run`) or another
    (`start`). `app` is called with the server's `Access` (known once the socket is bound). At most
    `max_connections` connections are served at once, and a connection has `timeout` seconds to send
    each request head (see `_protocol`)."""

    thread_name = "smd-web"

    def __init__(self, app, sock: socket.socket, host: str | None = None, *, timeout: float = 5.0,
                 max_connections: int = 64, log_level: str = "warning", **config: Any):
        import uvicorn

        self.sock, self.url = sock, url_of(sock, host)
        self.access = access_for(host or sock.getsockname()[0], sock.getsockname()[1])
        settings = uvicorn.Config(app(self.access), log_level=log_level, lifespan="off", http=_protocol(),
                                  limit_concurrency=max_connections, timeout_keep_alive=timeout, **config)
        self.server = uvicorn.Server(settings)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self) -> "WebServer":
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
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
