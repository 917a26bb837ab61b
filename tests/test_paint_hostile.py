"""`smd paint` against pages and clients that are not its own: other sites (DNS rebinding, foreign
origins), messages of every wrong shape and size, floods, many and silent tabs, hostile uploads and
hostile brush names. Each is refused with a message or handled; the server stays up and streaming,
prints no traceback and writes nothing outside its save folder."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import Page
from PIL import Image

from smd_cli.core.errors import SmdError


def ws_url(server) -> str:
    return server.url.replace("http", "ws") + "ws"


def request(server, method: str, path: str, *, host: str | None = None, origin: str | None = None,
            body=None, headers: dict | None = None, chunked: bool = False) -> tuple[int, bytes]:
    """One HTTP request with the Host and Origin given (http.client would send its own Host). A
    server that answers before the whole body is sent may close the connection: its answer counts."""
    address, port = server.sock.getsockname()[:2]
    connection = http.client.HTTPConnection(address, port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", f"127.0.0.1:{port}" if host is None else host)
        if origin is not None:
            connection.putheader("Origin", origin)
        for key, value in (headers or {}).items():
            connection.putheader(key, value)
        if chunked:
            connection.putheader("Transfer-Encoding", "chunked")
        elif body is not None and "Content-Length" not in (headers or {}):
            connection.putheader("Content-Length", str(len(body)))
        try:
            connection.endheaders(body, encode_chunked=chunked)
        except (BrokenPipeError, ConnectionResetError):  # answered and closed before the body was all sent
            pass
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def port_of(server) -> int:
    return server.sock.getsockname()[1]


def png_bytes(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


async def alive(server, session) -> None:
    """A new tab still gets the state, and the stream still makes frames for it."""
    import websockets

    async with websockets.connect(ws_url(server)) as ws:
        page = Page(ws)
        await page.until(lambda p: p.state is not None)
        await page.send(op="play")
        await page.until(lambda p: p.shown is not None and p.shown["kind"] == "frame")
        start = page.shown["number"]
        await page.until(lambda p: p.shown["number"] > start)
        await page.send(op="play", on=False)
        await page.until(lambda p: p.state["playing"] is False)


def assert_clean(capfd, session, tmp_path) -> None:
    """No traceback printed, and nothing written but into the save folder (and pytest's own)."""
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    outside = {p for p in written if session.save_dir not in p.parents}
    assert outside == set(), outside


# --- who may drive it ----------------------------------------------------------------------------


def test_a_rebinding_host_is_refused_on_the_page_the_websocket_and_the_upload(served, capfd, tmp_path):
    import websockets

    session, server = served
    port = port_of(server)
    picture = png_bytes(Image.new("RGB", (64, 64), (255, 0, 0)))
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"localhost.evil.example:{port}",
                 "", f"127.0.0.1:{port}@evil", "[::1"):
        assert request(server, "GET", "/", host=host)[0] == 400, host
        assert request(server, "GET", "/frame.jpg", host=host)[0] == 400, host
        assert request(server, "POST", "/picture", host=host, body=picture)[0] == 400, host
    assert session.painting.picture is None
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null", f"https://127.0.0.1:{port}",
                   f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port}/path", "not a url"):
        assert request(server, "POST", "/picture", origin=origin, body=picture)[0] == 403, origin
    assert session.painting.picture is None
    # The page as the browser asks for it, by either loopback name.
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        status, body = request(server, "GET", "/", host=host)
        assert status == 200 and b'data-testid="canvas"' in body

    async def connect(uri: str, **options) -> dict:
        async with websockets.connect(uri, **options) as ws:
            return json.loads(await ws.recv())

    address = server.sock.getsockname()[0]
    rebinding = f"ws://evil.example:{port}/ws"  # the browser's Host after the name moved to 127.0.0.1
    with pytest.raises(websockets.exceptions.InvalidStatus):
        asyncio.run(connect(rebinding, host=address, port=port))
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null"):
        with pytest.raises(websockets.exceptions.InvalidStatus):
            asyncio.run(connect(ws_url(server), origin=origin))
    assert asyncio.run(connect(ws_url(server), origin=f"http://localhost:{port}"))["type"] == "state"
    assert asyncio.run(connect(f"ws://localhost:{port}/ws", host=address, port=port))["type"] == "state"
    asyncio.run(alive(server, session))
    assert_clean(capfd, session, tmp_path)


def test_the_preview_answers_only_to_its_own_names():
    from smd_cli.app.live import LiveState, PreviewServer

    state = LiveState(frame=Image.new("RGB", (8, 8)), frames=1)
    server = PreviewServer(state, "127.0.0.1", 0).start()
    host, port = server.address
    try:
        def get(path: str, **headers) -> int:
            connection = http.client.HTTPConnection(host, port, timeout=10)
            connection.putrequest("GET", path, skip_host=True)
            for key, value in headers.items():
                connection.putheader(key, value)
            connection.endheaders()
            status = connection.getresponse().status
            connection.close()
            return status

        for path in ("/", "/frame.jpg", "/state.json"):
            assert get(path, Host=f"evil.example:{port}") == 400
            assert get(path, Host=f"127.0.0.1:{port}", Origin="http://evil.example") == 403
            assert get(path, Host=f"127.0.0.1:{port}") == 200
            assert get(path, Host=f"localhost:{port}", Origin=f"http://localhost:{port}") == 200
    finally:
        server.stop()
    everywhere = PreviewServer(state, "0.0.0.0", 0)
    try:  # the address said for a wildcard is one it answers to
        assert everywhere.url.startswith("http://127.0.0.1:")
        assert everywhere.access.host_ok(everywhere.url.split("/")[2])
    finally:
        everywhere.stop()


def test_the_names_a_server_answers_to():
    from smd_cli.app.web.access import access_for

    local = access_for("127.0.0.1", 8000)
    assert local.host_ok("127.0.0.1:8000") and local.host_ok("localhost:8000") and local.host_ok("[::1]:8000")
    for bad in (None, "", "127.0.0.1", "127.0.0.1:80", "127.0.0.1:8000:1", "evil.example:8000", "[::1",
                "127.0.0.1:+8000", "127.0.0.1: 8000", "127.0.0.1:99999999"):
        assert not local.host_ok(bad), bad
    assert local.origin_ok(None) and local.origin_ok("http://localhost:8000")
    for bad in ("null", "", "http://localhost:8000/", "https://localhost:8000", "http://user@localhost:8000",
                "http://[::1"):
        assert not local.origin_ok(bad), bad
    named = access_for("my-box.lan", 9000)
    assert named.host_ok("my-box.lan:9000") and named.host_ok("localhost:9000")
    assert "http://my-box.lan:9000" in named.origins
    everywhere = access_for("0.0.0.0", 9000)
    import socket

    assert everywhere.host_ok(f"{socket.gethostname().lower()}:9000") and not everywhere.host_ok("evil.example:9000")


def test_listening_beyond_this_machine_says_which_pages_it_accepts(monkeypatch, run_cli, tmp_path):
    """`smd paint --host` other than loopback warns, then prints the pages it will accept."""
    import socket

    from smd_cli.app.web import paint

    class Session:  # what the server needs of a session, without a model
        on_shown: list = []
        save_dir, frames = tmp_path, 0

        def close(self):
            pass

    monkeypatch.setattr(paint, "open_paint", lambda *a, **k: Session())
    monkeypatch.setattr(paint.Server, "run", lambda self: None)
    result = run_cli("paint", "--host", "0.0.0.0", "--port", "0")
    assert result.exit_code == 0, result.stderr
    assert "anyone who can reach this machine can use the app" in result.stderr
    from urllib.parse import urlsplit

    from smd_cli.app.web.access import access_for

    url = urlsplit(result.stdout.strip())  # the address it prints is one it answers to
    assert url.hostname == "127.0.0.1" and access_for("0.0.0.0", url.port).host_ok(url.netloc)
    accepted = next(line for line in result.stderr.splitlines() if "accepting pages from" in line)
    assert "http://127.0.0.1:" in accepted and "http://localhost:" in accepted
    assert f"http://{socket.gethostname().lower()}:" in accepted or "more" in accepted
    local = run_cli("paint", "--port", "0")
    assert local.exit_code == 0 and "accepting pages" not in local.stderr and "anyone" not in local.stderr


# --- what a page may send ------------------------------------------------------------------------


@pytest.mark.parametrize("field", [{"loras": [{"path": "/etc/passwd"}]}, {"controlnet": [{"model": "x", "image": "y"}]},
                                   {"reference": {"image": "/etc/passwd"}}, {"mask": "/etc/passwd"},
                                   {"model": "some/hub-id"}, {"loras": []}])
def test_a_brush_with_a_model_or_file_field_is_refused(served, field, capfd, tmp_path):
    import websockets

    session, server = served
    before = [b.layer for b in session.painting.brushes]

    async def run() -> tuple[list[str], dict]:
        async with websockets.connect(ws_url(server)) as ws:
            page = Page(ws)
            await page.until(lambda p: p.state is not None)
            errors = []
            for message in ({"op": "add_brush", "fields": {"prompt": "a cat", **field}},
                            {"op": "update_brush", "brush": 0, "fields": field}):
                page.last = {}
                await page.send(**message)
                await page.until(lambda p: getattr(p, "last", {}).get("type") == "error")
                errors.append(page.last["message"])
            return errors, page.state

    errors, state = asyncio.run(run())
    key = next(iter(field))
    for error in errors:
        assert f"no setting '{key}' the page may set" in error and "come from the scene file" in error
    assert [b.layer for b in session.painting.brushes] == before and len(state["brushes"]) == 1
    with pytest.raises(SmdError, match=f"no setting {key}"):
        session.painting.add_brush(**field)  # the painting's own rule, for Python callers too
    assert len(session.painting.brushes) == 1
    assert_clean(capfd, session, tmp_path)


MALFORMED = [
    "", "not json", "{", "[]", "null", "3", '"op"', "{}", '{"op": 5}', '{"op": null}', '{"op": "format_disk"}',
    '{"op": "' + "x" * 100_000 + '"}',
    '{"op": "stroke"}', '{"op": "stroke", "brush": "0", "points": [[1, 2]]}',
    '{"op": "stroke", "brush": 0, "points": "abc"}', '{"op": "stroke", "brush": 0, "points": 5}',
    '{"op": "stroke", "brush": 0, "points": [[1, 2, 3]]}', '{"op": "stroke", "brush": 0, "points": [[1]]}',
    '{"op": "stroke", "brush": 0, "points": [{"x": 1, "y": 2}]}', '{"op": "stroke", "brush": 0, "points": []}',
    '{"op": "stroke", "brush": 0, "points": [[NaN, 1]]}', '{"op": "stroke", "brush": 0, "points": [[Infinity, 1]]}',
    '{"op": "stroke", "brush": 0, "points": [[1e308, 1e308]]}',
    '{"op": "stroke", "brush": 0, "points": [[1, 2]], "size": 0}',
    '{"op": "stroke", "brush": 0, "points": [[1, 2]], "size": -3}',
    '{"op": "stroke", "brush": 0, "points": [[1, 2]], "size": 1e9}',
    '{"op": "stroke", "brush": 0, "points": [[1, 2]], "size": "big"}',
    '{"op": "stroke", "brush": 0, "points": [[1, 2]], "erase": "yes"}',
    '{"op": "stroke", "brush": -1, "points": [[1, 2]]}',
    '{"op": "stroke", "brush": 99999999999999999999, "points": [[1, 2]]}',
    '{"op": "stroke", "brush": 1.5, "points": [[1, 2]]}', '{"op": "stroke", "brush": true, "points": [[1, 2]]}',
    '{"op": "stroke", "brush": 0, "points": [[1, 2]], "extra": 1}',
    '{"op": "stroke", "brush": 1' + "0" * 5000 + ', "points": [[1, 2]]}',
    '{"op": "remove_brush", "brush": 0}', '{"op": "remove_brush", "brush": 7}', '{"op": "remove_brush"}',
    '{"op": "move_brush", "brush": 0, "to": 5}', '{"op": "move_brush", "brush": 0, "to": -1}',
    '{"op": "move_brush", "brush": 0}', '{"op": "update_brush", "brush": 0, "fields": "prompt"}',
    '{"op": "update_brush", "brush": 0, "fields": {"mask_strength": 3}}',
    '{"op": "update_brush", "brush": 0, "fields": {"mask_strength": "1"}}',
    '{"op": "update_brush", "brush": 0, "fields": {"mask_std": -1}}',
    '{"op": "update_brush", "brush": 0, "fields": {"prompt": 5}}',
    '{"op": "update_brush", "brush": 0, "fields": {"prompt": "(unbalanced:1.2"}}',
    '{"op": "update_brush", "brush": 0, "fields": {"prompt": "' + "x" * 10_000 + '"}}',
    '{"op": "update_brush", "brush": 0, "fields": {"colour": "red"}}',
    '{"op": "update_brush", "brush": 0, "fields": {"colour": "#12345g"}}',
    '{"op": "update_brush", "brush": 5, "fields": {}}',
    '{"op": "update_brush", "brush": 0, "fields": {"__class__": 1}}',
    '{"op": "background", "prompt": ["a"]}', '{"op": "background", "picture": "/etc/passwd"}',
    '{"op": "seed", "seed": -1}', '{"op": "seed", "seed": 1e30}', '{"op": "seed", "seed": "3"}',
    '{"op": "seed", "seed": 18446744073709551616}', '{"op": "play", "on": "yes"}',
    '{"op": "region_mode", "mode": "foo"}', '{"op": "region_mode", "mode": "attention", "extra": 1}',
    '{"op": "region_mode", "mode": 1}', '{"op": "region_mode", "mode": ["attention"]}', '{"op": "region_mode"}',
    '{"op": "region_mode", "mode": "Attention"}', '{"op": "region_mode", "mode": null}',
    '{"op": "one_image", "count": 1000}', '{"op": "save", "path": "/tmp/x"}', '{"op": "save_image", "number": "1"}',
    '{"op": "save_image", "number": 123456}', '{"op": "undo", "steps": 5}',
    "[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000,
]


def test_malformed_and_wrong_messages_are_each_answered_with_an_error(served, capfd, tmp_path):
    import websockets

    session, server = served
    before = session.painting.state()

    async def run() -> list[str]:
        async with websockets.connect(ws_url(server), max_size=None) as ws:
            page = Page(ws)
            await page.until(lambda p: p.state is not None)
            answers = []
            for text in MALFORMED:
                page.last = {}
                await ws.send(text)
                await page.until(lambda p: getattr(p, "last", {}).get("type") == "error")
                answers.append(page.last["message"])
            await ws.send(b"\x00\x01binary")
            page.last = {}
            await page.until(lambda p: getattr(p, "last", {}).get("type") == "error")
            answers.append(page.last["message"])
            return answers

    answers = asyncio.run(run())
    assert len(answers) == len(MALFORMED) + 1
    for text, answer in zip(MALFORMED, answers):
        assert answer and len(answer) < 400 and "Traceback" not in answer, (text[:80], answer)
    assert "unknown edit 'format_disk'" in answers[MALFORMED.index('{"op": "format_disk"}')]
    assert "keeps at least one brush" in answers[MALFORMED.index('{"op": "remove_brush", "brush": 0}')]
    assert "there is no brush 7" in answers[MALFORMED.index('{"op": "remove_brush", "brush": 7}')]
    assert answers[-1] == "an edit is a JSON text message, not binary"
    for text in ('{"op": "region_mode", "mode": "foo"}', '{"op": "region_mode", "mode": 1}'):
        assert "region_mode: mode: Input should be 'latent', 'attention' or 'hybrid'" in answers[MALFORMED.index(text)]
    assert "extra: Extra inputs are not permitted" in answers[
        MALFORMED.index('{"op": "region_mode", "mode": "attention", "extra": 1}')]
    after = session.painting.state()
    assert after["brushes"] == before["brushes"] and after["seed"] == before["seed"]  # nothing was changed
    assert after["region_mode"] == "latent" and after["undo"] == 0 and session.stream.region_mode == "latent"
    assert not session.painting.brushes[0].mask.any()
    asyncio.run(alive(server, session))
    assert_clean(capfd, session, tmp_path)


def test_enormous_strokes_messages_and_floods(served, capfd, tmp_path):
    import websockets

    from smd_cli.app.painting import MAX_STROKE_POINTS, UNDO_DEPTH
    from smd_cli.app.web.paint import MAX_MESSAGE_BYTES

    session, server = served
    longest = [[float(i % 64), float(i * 7 % 64)] for i in range(MAX_STROKE_POINTS)]

    async def run() -> None:
        async with websockets.connect(ws_url(server), max_size=None) as ws:
            page = Page(ws)
            await page.until(lambda p: p.state is not None)
            await page.send(op="stroke", brush=0, points=longest, size=3)  # the largest stroke allowed
            await page.until(lambda p: p.state["version"] >= 1)
            page.last = {}
            await page.send(op="stroke", brush=0, points=longest + [[1, 1]], size=3)
            await page.until(lambda p: getattr(p, "last", {}).get("type") == "error")
            assert f"at most {MAX_STROKE_POINTS}" in page.last["message"]
            for i in range(1000):  # a flood of edits, sent without waiting for answers
                await page.send(op="stroke", brush=0, points=[[i % 64, 5], [(i * 3) % 64, 60]], size=2,
                                erase=bool(i % 2))
                await page.send(op="update_brush", brush=0, fields={"prompt": f"flood {i}"})
            await page.until(lambda p: p.state["brushes"][0]["prompt"] == "flood 999", timeout=120)
            assert page.state["undo"] == UNDO_DEPTH  # the history stays bounded
        async with websockets.connect(ws_url(server), max_size=None) as ws:  # one message past the limit
            await ws.send("{" + " " * MAX_MESSAGE_BYTES + "}")
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                while True:
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # "message too big"

    asyncio.run(run())
    assert session.painting.brushes[0].layer.prompt == "flood 999"
    asyncio.run(alive(server, session))
    assert_clean(capfd, session, tmp_path)


def test_many_and_silent_tabs(served, capfd, tmp_path):
    """Tabs past the limit are turned away; tabs that never read hold nothing that grows, and the
    others are served meanwhile."""
    import websockets

    from smd_cli.app.web.paint import MAX_CLIENTS

    session, server = served

    async def run() -> tuple[int, int]:
        silent = []
        refused = 0
        for _ in range(MAX_CLIENTS + 6):
            try:
                ws = await websockets.connect(ws_url(server), max_queue=1, max_size=None, close_timeout=0.5)
            except websockets.exceptions.InvalidStatus:
                refused += 1
                continue
            silent.append(ws)
        try:
            # The silent tabs are connected, read nothing, while frames stream past them.
            opened = len(silent)
            for ws in silent[-2:]:  # make room for a tab that reads
                await ws.close()
            async with websockets.connect(ws_url(server)) as ws:
                page = Page(ws)
                await page.until(lambda p: p.state is not None)
                await page.send(op="play")
                await page.until(lambda p: p.shown is not None)
                start = page.shown["number"]
                await page.until(lambda p: p.shown["number"] >= start + 10)  # served while the others sleep
                await page.send(op="play", on=False)
                await page.until(lambda p: p.state["playing"] is False)
            return opened, refused
        finally:
            for ws in silent:
                await ws.close()

    opened, refused = asyncio.run(run())
    assert opened + refused == MAX_CLIENTS + 6
    assert refused >= 6 and opened <= MAX_CLIENTS  # (a closing tab may free a place early)
    asyncio.run(alive(server, session))
    assert_clean(capfd, session, tmp_path)


def test_a_connection_that_sends_nothing_or_dribbles_is_closed(capfd):
    """A client that connects and never sends a request, or sends one a byte at a time, is closed
    once the server's timeout has passed; others are served meanwhile, and nothing is printed."""
    import select
    import socket
    import time

    from smd_cli.app.web.paint import Server, listen

    class Session:  # what the app needs of a session to serve /frame.jpg, without a model
        on_shown: list = []
        shown = None

    server = Server(Session(), listen("127.0.0.1", 0), timeout=0.3).start()
    address = server.sock.getsockname()[:2]
    try:
        started = time.monotonic()
        silent = socket.create_connection(address)
        dribbling = socket.create_connection(address)
        assert request(server, "GET", "/frame.jpg")[0] == 204  # served while those two hold connections
        head = f"GET /frame.jpg HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\nX-Slow: {'a' * 1000}\r\n".encode()
        closed = False
        for byte in head:  # a byte every 20 ms: 20 s for the whole head, far past the timeout
            try:
                dribbling.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if select.select([dribbling], [], [], 0.02)[0]:
                closed = dribbling.recv(1) == b""
                break
        assert closed and time.monotonic() - started < 10  # closed mid-head: trickled bytes do not reset it
        silent.settimeout(10)
        assert silent.recv(1) == b""  # the silent one too, with nothing said
        assert time.monotonic() - started < 10
        silent.close()
        dribbling.close()
        assert request(server, "GET", "/frame.jpg")[0] == 204  # and the server goes on
    finally:
        server.stop()
    assert capfd.readouterr().err == ""


# --- uploads ------------------------------------------------------------------------------------


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        check = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + check

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_hostile_uploads(served, capfd, tmp_path):
    session, server = served
    good = png_bytes(Image.new("RGB", (64, 64), (0, 255, 0)))
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(cmyk, format="JPEG")
    frames = [Image.new("P", (32, 32), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    cases = {
        "empty": (b"", 400), "not an image": (b"hello", 400), "truncated": (good[: len(good) // 2], 400),
        "a pixel bomb": (huge_png_header(100_000, 100_000), 400), "a wide bomb": (huge_png_header(2**31 - 1, 1), 400),
        "html": (b"<script>alert(1)</script>", 400),
        "16-bit grey": (png_bytes(Image.fromarray(np.full((20, 20), 40000, np.uint16))), 200),
        "CMYK JPEG": (cmyk.getvalue(), 200), "animated GIF": (gif.getvalue(), 200),
        "transparent palette": (png_bytes(Image.new("P", (10, 10)), transparency=0), 200),
        "tiny": (png_bytes(Image.new("RGB", (1, 1))), 200), "good": (good, 200),
    }
    for name, (body, status) in cases.items():
        code, answer = request(server, "POST", "/picture", body=body)
        assert code == status, (name, answer)
        reply = json.loads(answer)
        assert "error" in reply if status != 200 else reply["ok"] is True, name
        if name == "CMYK JPEG":  # 40 x 30 on a square canvas: the page says it was stretched
            assert "it is 40x30, stretched to the 64x64 canvas" in reply["message"]
        if status == 200:
            assert session.painting.picture.size == (64, 64) and session.painting.picture.mode == "RGB", name
    for length in ("abc", "-1", "1e9", "99999999999999999999"):
        try:
            code, answer = request(server, "POST", "/picture", body=b"x", headers={"Content-Length": length})
        except (ConnectionResetError, BrokenPipeError):  # refused by the HTTP parser, the connection dropped
            continue
        assert code in (400, 413), (length, code)
    big = b"\0" * (33 * 1024 * 1024)
    assert request(server, "POST", "/picture", body=big)[0] == 413
    chunks = (b"\0" * 2**20 for _ in range(40))  # no length said: read up to the limit, then refused
    assert request(server, "POST", "/picture", body=chunks, chunked=True)[0] == 413
    assert np.asarray(session.painting.picture)[0, 0].tolist() == [0, 255, 0]  # the last good one stays
    asyncio.run(alive(server, session))
    assert_clean(capfd, session, tmp_path)


def test_concurrent_uploads_are_one_at_a_time(served):
    import concurrent.futures

    session, server = served
    body = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), np.uint8)))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = [f.result()[0] for f in [pool.submit(request, server, "POST", "/picture", body=body) for _ in range(8)]]
    assert set(codes) <= {200, 429} and 200 in codes


# --- saving -------------------------------------------------------------------------------------


HOSTILE_NAMES = ["../../../etc/passwd", "/etc/passwd", "..", ".", "a/b\\c", "CON", "nul.txt", "\u202eevil\u202d.png",
                 "a\x00b", "\n\r\t", "{scene}-{seed}", "%s%n", "🎨" * 50, "x" * 200, "", " ", "-rf", "~root"]


def test_hostile_brush_names_save_inside_the_save_folder(served, capfd, tmp_path, run_cli):
    import websockets

    session, server = served

    async def run() -> str:
        async with websockets.connect(ws_url(server)) as ws:
            page = Page(ws)
            await page.until(lambda p: p.state is not None)
            for name in HOSTILE_NAMES:
                await page.send(op="add_brush", fields={"name": name, "prompt": "a thing"})
            await page.until(lambda p: len(p.state["brushes"]) == len(HOSTILE_NAMES) + 1)
            for i in range(len(HOSTILE_NAMES) + 1):
                await page.send(op="stroke", brush=i, points=[[i * 3 % 64, 10]], size=4)
            page.last = {}
            await page.send(op="save")
            await page.until(lambda p: getattr(p, "last", {}).get("type") in ("saved", "error"))
            return page.last

    last = asyncio.run(run())
    assert last["type"] == "saved", last
    saved = Path(last["path"])
    assert saved.parent == session.save_dir
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(session.save_dir in p.parents for p in files)
    for path in files:
        assert path.name.isprintable() and not path.name.startswith(("-", ".")), path.name
    data = yaml.safe_load(saved.read_text(encoding="utf-8"))
    assert [layer["name"] for layer in data["layers"][1:]] == HOSTILE_NAMES  # kept as typed, in the scene
    assert run_cli("validate", saved).exit_code == 0
    assert_clean(capfd, session, tmp_path)


def test_save_image_of_an_image_no_longer_kept(served):
    session, server = served
    with pytest.raises(SmdError, match="no image yet"):
        session.save_image(None)
    session.edit({"op": "one_image"})
    with pytest.raises(SmdError, match="images are being made"):
        session.edit({"op": "batch"})  # one request at a time: the queue is one deep
