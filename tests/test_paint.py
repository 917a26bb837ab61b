"""`smd paint`: the painting's rules without a browser, the server over a real WebSocket, and the
page in headless Chromium (skipped where no Chromium is installed)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SCENES, Page, decoded
from PIL import Image

from smd_cli.core.errors import SmdError


@pytest.fixture
def village(tmp_path) -> Path:
    shutil.copytree(SCENES, tmp_path / "scenes")
    return tmp_path / "scenes" / "village.yaml"


def painting_of(path: Path):
    from smd_cli.app.painting import Painting
    from smd_cli.scenes.scene import load_scene

    return Painting.from_scene(load_scene(path))


# --- the painting -------------------------------------------------------------------------------


def test_a_scene_round_trips_through_a_painting(village, run_cli):
    painting = painting_of(village)
    assert [b.layer.name for b in painting.brushes] == ["hills", "river", "houses"]
    assert [b.colour for b in painting.brushes] == ["#3cb043", "#2f7fe0", "#e757b0"]  # the palette's colours
    saved = painting.save(village.parent, "village")
    assert saved.name == "village-1.yaml"  # beside the original, never over it
    again = painting_of(saved)
    for before, after in zip(painting.brushes, again.brushes, strict=True):
        assert before.mask.tobytes() == after.mask.tobytes()  # byte-identical masks
        assert before.layer == after.layer
    original, written = yaml.safe_load(village.read_text()), yaml.safe_load(saved.read_text())
    for key in ("seed", "steps", "mask_type", "bootstrap", "negative_prefix", "background", "output"):
        assert written[key] == original[key], key
    assert [layer.get("mask_std") for layer in written["layers"]] == [None, None, 4]
    assert run_cli("validate", saved).exit_code == 0
    assert painting.save(village.parent, "village").name == "village-2.yaml"


def test_saving_elsewhere_keeps_what_relative_paths_meant(village, tmp_path):
    text = village.read_text().replace("output: out/{scene}-{seed}.png", "output: out/{scene}-{seed}.png\nvae: tiny")
    village.write_text(text)
    saved = painting_of(village).save(tmp_path / "elsewhere", "../../escape")
    assert saved.parent == tmp_path / "elsewhere" and saved.name == "escape.yaml"  # only inside the folder
    data = yaml.safe_load(saved.read_text())
    assert data["output"] == str(village.parent / "out" / "{scene}-{seed}.png") and data["vae"] == "tiny"
    assert sorted(p.name for p in (saved.parent / "escape").iterdir()) == ["01-hills.png", "02-river.png",
                                                                           "03-houses.png"]


def test_a_stroke_paints_exactly_its_brush(village):
    painting = painting_of(village)
    before = [b.mask.copy() for b in painting.brushes]
    painting.stroke(1, [[100, 100], [200, 100]], size=20)
    changed = painting.brushes[1].mask
    assert changed[100, 150] == 255 and changed[100, 95] == 255  # along the line, and its round end
    assert changed[130, 150] == before[1][130, 150] and changed[100, 215] == before[1][100, 215]
    assert np.array_equal(painting.brushes[0].mask, before[0]) and np.array_equal(painting.brushes[2].mask, before[2])
    painting.stroke(1, [[150, 100]], size=10, erase=True)
    assert painting.brushes[1].mask[100, 150] == 0
    assert painting.undo() and painting.brushes[1].mask[100, 150] == 255
    assert painting.undo() and np.array_equal(painting.brushes[1].mask, before[1])
    assert painting.undo() is False


def test_brush_edits_are_checked_as_scene_layers_are(village):
    painting = painting_of(village)
    with pytest.raises(SmdError, match="brush 2: mask_strength: Input should be less than or equal to 1"):
        painting.update_brush(1, mask_strength=2)
    with pytest.raises(SmdError, match="a brush has no setting seed"):
        painting.update_brush(1, seed=3)
    with pytest.raises(SmdError, match="there is no brush 7"):
        painting.stroke(7, [[1, 1]], 4)
    with pytest.raises(SmdError, match="finite"):
        painting.stroke(0, [[float("nan"), 1]], 4)
    painting.update_brush(2, prompt="a castle", prompt_strength=0.5, colour="#123456")
    assert painting.brushes[2].layer.prompt == "a castle" and painting.state()["brushes"][2]["colour"] == "#123456"
    new = painting.add_brush(prompt="a bridge")
    painting.stroke(new, [[10, 10]], 8)
    painting.move_brush(new, 0)
    assert [b.layer.prompt for b in painting.brushes][:2] == ["a bridge", "green rolling hills"]
    assert painting.undo() and painting.brushes[new].layer.prompt == "a bridge"  # the move taken back
    assert painting.undo() and not painting.brushes[new].mask.any()  # then the stroke
    for _ in range(3):
        painting.remove_brush(0)
    with pytest.raises(SmdError, match="keeps at least one brush"):
        painting.remove_brush(0)
    with pytest.raises(SmdError, match="seed: .*greater than or equal to 0"):
        painting.set_seed(-1)


def test_undo_takes_back_every_edit_of_the_painting_in_a_bounded_history(village):
    from smd_cli.app.painting import UNDO_DEPTH

    painting = painting_of(village)

    def snapshot():
        return (painting.state(), [b.mask.tobytes() for b in painting.brushes],
                None if painting.picture is None else painting.picture.tobytes())

    states = [snapshot()]
    edits = [lambda: painting.stroke(0, [[10, 10], [90, 90]], 12),
             lambda: painting.add_brush(name="bridge", prompt="a stone bridge", colour="#123456"),
             lambda: painting.stroke(3, [[50, 50]], 20),
             lambda: painting.update_brush(1, prompt="a frozen river", mask_strength=0.5, colour="#abcdef"),
             lambda: painting.move_brush(3, 0),
             lambda: painting.remove_brush(2),
             lambda: painting.update_background(prompt="a night sky", negative_prompt="sun"),
             lambda: painting.set_picture(Image.new("RGB", (32, 32), (9, 99, 199))),
             lambda: painting.set_seed(77),
             lambda: painting.set_picture(None)]
    for edit in edits:
        edit()
        states.append(snapshot())
    assert painting.state()["undo"] == len(edits)
    for expected in reversed(states[:-1]):
        versions = painting.version, painting.picture_version
        assert painting.undo()
        assert painting.version > versions[0]
        now = snapshot()
        assert now[1:] == expected[1:]
        same = {k: v for k, v in now[0].items() if k not in ("undo", "version", "picture_version")}
        assert same == {k: v for k, v in expected[0].items() if k not in ("undo", "version", "picture_version")}
        if now[2] != states[states.index(expected) + 1][2]:
            assert painting.picture_version > versions[1]  # the page fetches the picture again
    assert painting.undo() is False
    refused = painting.state()
    with pytest.raises(SmdError):
        painting.update_brush(0, mask_strength=5)
    painting.stroke(0, [[-200, -200]], 4)  # paints nothing: nothing to take back either
    assert painting.state()["undo"] == refused["undo"] == 0
    for i in range(UNDO_DEPTH + 10):
        painting.stroke(0, [[i, i]], 2)
    assert painting.state()["undo"] == UNDO_DEPTH


def test_a_blank_painting_saves_a_scene_that_generates(tiny_model, tmp_path, run_cli):
    from smd_cli.app.painting import Painting

    painting = Painting.blank(64, 64)
    painting.update_brush(0, prompt="a red ball")
    painting.stroke(0, [[20, 20], [40, 40]], 12)
    painting.update_background(prompt="a white room")
    painting.set_seed(3)
    saved = painting.save(tmp_path, "painting")
    result = run_cli("generate", saved, "--model", tiny_model, "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / "x.png").size == (64, 64)
    assert yaml.safe_load(saved.read_text())["background"] == {"prompt": "a white room"}


# --- the server ---------------------------------------------------------------------------------


def test_edits_reach_the_stream_and_every_tab(served):
    import websockets

    session, server = served
    url = server.url.replace("http", "ws") + "ws"

    async def run():
        async with websockets.connect(url) as a, websockets.connect(url) as b:
            one, two = Page(a), Page(b)
            await one.until(lambda p: p.state is not None and 0 in p.masks)
            assert one.state["playing"] is False and one.shown is None  # paused until play is pressed
            await one.send(op="play")
            await one.until(lambda p: p.shown is not None)
            await one.send(op="update_brush", brush=0, fields={"prompt": "a red ball"})
            await one.send(op="stroke", brush=0, points=[[10, 10], [50, 50]], size=10)
            await two.until(lambda p: p.state is not None and p.state["brushes"][0]["prompt"] == "a red ball"
                            and 0 in p.masks and decoded(p.masks[0])[30, 30] == 255)  # the other tab sees it
            mask = decoded(two.masks[0])
            assert mask[5, 55] == 0
            painted = one.shown["number"]
            await one.until(lambda p: p.shown["number"] >= painted + 2)
            layer = session.stream.layers[0]
            assert layer.prompt == "a red ball" and np.array_equal(layer.mask > 0.5, mask > 127)
            await one.send(op="update_brush", brush=0, fields={"mask_strength": 3})
            await one.until(lambda p: getattr(p, "last", {}).get("type") == "error")
            assert "mask_strength" in one.last["message"]
            await one.send(op="save")
            await one.until(lambda p: getattr(p, "last", {}).get("type") == "saved")
            return one.last["path"]

    saved = Path(asyncio.run(run()))
    assert saved == session.save_dir / "painting.yaml"
    assert yaml.safe_load(saved.read_text())["layers"][0]["prompt"] == "a red ball"


def test_the_server_refuses_strangers_and_bad_pictures(served):
    import websockets

    session, server = served

    async def foreign():
        async with websockets.connect(server.url.replace("http", "ws") + "ws",
                                      origin="http://evil.example") as ws:
            await ws.recv()

    with pytest.raises(websockets.exceptions.WebSocketException):
        asyncio.run(foreign())

    def post(body: bytes, origin: str | None = None):
        request = urllib.request.Request(server.url + "picture", data=body, method="POST",
                                         headers={"Origin": origin} if origin else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    assert post(b"not an image") == (400, {"error": "the picture cannot be used: not an image Pillow can read"})
    host, port = server.sock.getsockname()[:2]
    with socket.create_connection((host, port), timeout=30) as raw:  # refused from its headers, unread
        raw.sendall(f"POST /picture HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 40000000\r\n\r\n"
                    .encode())
        answer = b""
        while not answer.endswith(b"}"):
            chunk = raw.recv(4096)
            if not chunk:
                break
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413") and "larger than 32 MiB" in answer
    with pytest.raises(SmdError, match="at most 32 MiB"):
        session.set_picture(b"\0" * (33 * 1024 * 1024))
    picture = io.BytesIO()
    Image.new("RGB", (128, 128), (0, 0, 255)).save(picture, format="PNG")
    assert post(picture.getvalue(), origin="http://evil.example")[0] == 403
    assert post(picture.getvalue()) == (200, {"ok": True, "message": "picture uploaded"})
    assert session.painting.picture.size == (64, 64)  # fitted to the canvas
    with urllib.request.urlopen(server.url + "picture", timeout=30) as response:
        assert Image.open(response).getpixel((5, 5)) == (0, 0, 255)


def wait_until(condition, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _blank_with_picture(p):
    p.set_picture(Image.new("RGB", (64, 64), (0, 0, 255)))


PAGE_STATES = {  # states of a painting the page can reach, each a scene that streams
    "blank": lambda p: None,
    "a picture, nothing painted": _blank_with_picture,
    "a picture and empty brushes": lambda p: (_blank_with_picture(p), p.add_brush(prompt="a cat"),
                                              p.add_brush(prompt="a dog")),
    "all erased": lambda p: (p.stroke(0, [[10, 10], [50, 50]], 10), p.stroke(0, [[10, 10], [50, 50]], 30, True)),
    "a picture removed again": lambda p: (_blank_with_picture(p), p.stroke(0, [[20, 20]], 8), p.set_picture(None)),
    "everything undone": lambda p: (_blank_with_picture(p), p.stroke(0, [[20, 20]], 8), p.undo(), p.undo()),
}


@pytest.mark.parametrize("state", PAGE_STATES)
def test_every_state_the_page_can_reach_streams_and_makes_images(served, state):
    from smd_cli.app.painting import Painting
    from smd_cli.scenes.scene import load_scene

    session, server = served
    with session.lock:
        PAGE_STATES[state](session.painting)
    session.edit({"op": "play"})
    wait_until(lambda: session.frames >= 3 or session.error)
    session.edit({"op": "one_image"})
    wait_until(lambda: not session.making)
    assert session.error is None, session.error
    assert [s.kind for s in session.held] == ["image"] and session.playing is False
    if session.painting.picture is not None and not any(b.mask.any() for b in session.painting.brushes):
        for shown in (session.held[0], session.recent[-2]):  # the image, and the last frame
            assert np.abs(np.asarray(shown.image, np.int32) - [0, 0, 255]).max() <= 2  # the picture, kept
    saved = session.painting.save(session.save_dir, "state")
    reopened = Painting.from_scene(load_scene(saved))  # a painting saved as it was opens again
    assert [b.mask.tobytes() for b in reopened.brushes] == [b.mask.tobytes() for b in session.painting.brushes]


def test_the_picture_is_encoded_once_per_change(served, monkeypatch):
    from smd_cli.app.web import paint

    session, server = served
    encoded = []
    original = paint._png
    monkeypatch.setattr(paint, "_png", lambda image: encoded.append(image.size) or original(image))
    picture = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(picture, format="PNG")
    session.set_picture(picture.getvalue())
    for _ in range(3):
        session.edit({"op": "seed", "seed": 5})  # edits that leave the picture alone
        with urllib.request.urlopen(server.url + "picture", timeout=30) as response:
            assert Image.open(response).getpixel((3, 3)) == (0, 0, 255)
    assert encoded == [(64, 64)]
    assert session.state()["picture_version"] == 1


def test_a_busy_port_fails_before_the_model_loads(run_cli, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("paint", "--model", tmp_path / "not-there", "--port", port)
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_listening_beyond_this_machine_is_said(run_cli, tmp_path):
    from smd_cli.app.web.paint import check_host

    with pytest.warns(UserWarning, match="anyone who can reach this machine"):
        check_host("0.0.0.0")
    check_host("127.0.0.1")


# --- region modes -------------------------------------------------------------------------------


def test_the_region_mode_switch_restarts_the_stream_saves_and_is_undone(served):
    import websockets

    session, server = served
    first = session.stream

    async def run():
        async with websockets.connect(server.url.replace("http", "ws") + "ws") as ws:
            page = Page(ws)
            await page.until(lambda p: p.state is not None)
            assert page.state["region_mode"] == "latent" and first.region_mode == "latent"
            await page.send(op="play")
            await page.until(lambda p: p.shown is not None)
            await page.send(op="region_mode", mode="attention")
            await page.until(lambda p: p.state["region_mode"] == "attention")
            switched = page.state["version"]
            assert session.stream is not first and session.stream.region_mode == "attention"  # a new stream
            start = page.shown["number"]
            await page.until(lambda p: p.shown["number"] > start and p.shown["kind"] == "frame"
                             and p.shown["version"] >= switched)  # frames of the new stream
            attention = session.stream
            await page.send(op="save")
            await page.until(lambda p: getattr(p, "last", {}).get("type") == "saved")
            saved = page.last["path"]
            await page.send(op="region_mode", mode="attention")  # the mode it is in: nothing to do
            await page.send(op="undo")
            await page.until(lambda p: p.state["region_mode"] == "latent")
            undone = page.state["version"]
            await page.until(lambda p: p.shown["version"] >= undone and p.shown["kind"] == "frame")
            assert session.stream is not attention and session.stream.region_mode == "latent"
            return saved, page.state

    saved, state = asyncio.run(run())
    assert session.error is None, session.error
    assert yaml.safe_load(Path(saved).read_text())["region_mode"] == "attention"
    assert state["undo"] == 0  # one edit (the switch), taken back
    assert session.painting.scene.region_mode == "latent"


def test_a_region_mode_refused_for_the_painting_keeps_the_old_stream(tiny_model, tmp_path):
    import websockets
    from tinymodel import write_tiny_lora

    from smd_cli.app.painting import Painting
    from smd_cli.app.web.paint import PaintSession, Server, listen
    from smd_cli.engine.pipeline import StableMultiDiffusionPipeline
    from smd_cli.scenes.scene import load_scene

    lora = write_tiny_lora(tiny_model, tmp_path / "lora")
    scene = tmp_path / "s.yaml"
    scene.write_text(f"width: 64\nheight: 64\nlayers:\n  - {{prompt: a cat, mask: {{rect: [0, 0, 0.5, 1]}}, "
                     f"loras: [{lora}]}}\n  - {{prompt: a lake, mask: {{rect: [0.5, 0, 1, 1]}}}}\n")
    pipe = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model))
    session = PaintSession(Painting.from_scene(load_scene(scene)), pipe, save_dir=tmp_path / "saved",
                           stem="s").start()
    server = Server(session, listen("127.0.0.1", 0)).start()
    first = session.stream

    async def run():
        async with websockets.connect(server.url.replace("http", "ws") + "ws") as ws:
            page = Page(ws)
            await page.until(lambda p: p.state is not None)
            await page.send(op="play")
            await page.until(lambda p: p.shown is not None)
            await page.send(op="region_mode", mode="attention")
            await page.until(lambda p: getattr(p, "last", {}).get("type") == "error")
            refused = page.last["message"]
            start = page.shown["number"]
            await page.until(lambda p: p.shown["number"] > start)  # the old stream goes on
            await page.send(op="region_mode", mode="hybrid")  # the LoRA brush keeps its own rows
            await page.until(lambda p: p.state["region_mode"] == "hybrid")
            switched = page.state["version"]
            await page.until(lambda p: p.shown["version"] >= switched and p.shown["kind"] == "frame")
            return refused, page.state

    try:
        assert session.state()["region_mode"] == "latent"
        refused, state = asyncio.run(run())
        assert "region_mode hybrid" in refused and "layers[0]" in refused
        assert state["undo"] == 1  # the refused switch is no edit; the hybrid one is
        assert session.stream is not first and session.stream.region_mode == "hybrid"
        assert session.error is None, session.error
    finally:
        server.stop()
        session.close()


def test_region_mode_edits_are_checked(served):
    from smd_cli.app.web.paint import parse_edit

    session, server = served
    assert parse_edit({"op": "region_mode", "mode": "hybrid"}).mode == "hybrid"
    for bad, said in (({"op": "region_mode", "mode": "foo"}, "region_mode: mode: Input should be 'latent'"),
                      ({"op": "region_mode", "mode": "attention", "extra": 1}, "region_mode: extra: Extra inputs"),
                      ({"op": "region_mode", "mode": 1}, "region_mode: mode: Input should be 'latent'"),
                      ({"op": "region_mode"}, "region_mode: mode: Field required")):
        with pytest.raises(SmdError, match=said):
            session.edit(bad)
    with pytest.raises(SmdError, match="region_mode must be one of latent, attention, hybrid"):
        session.set_region_mode("foo")  # Python callers too
    assert session.painting.scene.region_mode == "latent" and session.state()["undo"] == 0
    assert session.stream.region_mode == "latent"


@pytest.mark.parametrize("given, scene_mode, expected", [(None, "hybrid", "hybrid"),
                                                          ("attention", "hybrid", "attention"),
                                                          ("attention", None, "attention")])
def test_smd_paint_starts_in_the_region_mode_asked_for(run_cli, tiny_model, tmp_path, monkeypatch, given,
                                                       scene_mode, expected):
    from smd_cli.app.web import paint

    sessions, seen = [], []
    opened = paint.open_paint
    monkeypatch.setattr(paint, "open_paint", lambda *a, **k: sessions.append(opened(*a, **k)) or sessions[-1])

    def serve(server):  # instead of serving until Ctrl-C: the session as a page would find it
        seen.append((sessions[-1].state()["region_mode"], sessions[-1].stream.region_mode))
        server.sock.close()

    monkeypatch.setattr(paint.Server, "run", serve)
    args = ["paint", "--model", tiny_model, "--device", "cpu", "--port", 0, "--save-dir", tmp_path]
    if scene_mode is not None:
        scene = tmp_path / "s.yaml"
        scene.write_text(f"width: 64\nheight: 64\nregion_mode: {scene_mode}\nlayers:\n  - {{prompt: a cat}}\n")
        args.insert(1, scene)
    else:
        args += ["-W", 64, "-H", 64]
    if given is not None:
        args += ["--region-mode", given]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert seen == [(expected, expected)]


def test_a_wrong_region_mode_option_fails_before_the_model_loads(run_cli, tmp_path):
    for scene in ([], [tmp_path / "s.yaml"]):
        (tmp_path / "s.yaml").write_text("width: 64\nheight: 64\nlayers:\n  - {prompt: a cat}\n")
        result = run_cli("paint", *scene, "--model", tmp_path / "not-there", "--port", 0, "--region-mode", "foo")
        assert result.exit_code == 2 and "region_mode" in result.stderr and "attention" in result.stderr, result.stderr


# --- the page in a real browser -------------------------------------------------------------------


def chromium() -> str | None:
    return os.environ.get("SMD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


# Whether the display shows a decoded frame made from painting version >= v and numbered >= n; if
# so its pixels are kept in window.shownPixels in the same synchronous call, before a newer frame can
# replace it.
FRAME_SINCE = """([v, n]) => {
  const d = document.querySelector("[data-testid=display]");
  if (d.dataset.kind !== "frame" || Number(d.dataset.version) < v || Number(d.dataset.number) < n
      || !d.complete || d.naturalWidth === 0) return false;
  const c = document.createElement("canvas");
  c.width = d.naturalWidth; c.height = d.naturalHeight;
  const g = c.getContext("2d"); g.drawImage(d, 0, 0);
  window.shownPixels = Array.from(g.getImageData(0, 0, c.width, c.height).data);
  window.shownNumber = Number(d.dataset.number);
  return true;
}"""


def shown_pixels(page) -> np.ndarray:
    """The pixels FRAME_SINCE kept, as [64, 64, 3]."""
    return np.array(page.evaluate("window.shownPixels"), np.int32).reshape(64, 64, 4)[..., :3]


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="needs Chromium (apt-get install chromium)")
def test_the_original_apps_four_steps_in_the_browser(served, tiny_model, tmp_path, run_cli):
    """The original app's documented steps in their order: upload a background picture, type prompts
    into new brushes, draw, play; frames show the strokes over the picture. Then one image stays on
    the display, a batch shows four to step through, save keeps the one shown, undo takes back a
    removed brush, and the scene saved renders with `smd generate`."""
    from playwright.sync_api import expect, sync_playwright

    session, server = served
    blue = tmp_path / "blue.png"
    Image.new("RGB", (128, 128), (0, 0, 255)).save(blue)
    pictures: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.on("request", lambda r: pictures.append(r.method) if "/picture" in r.url else None)
        page.goto(server.url)
        expect(page.get_by_test_id("brush-0")).to_be_visible()
        expect(page.get_by_test_id("hint")).to_contain_text("Press play")  # paused until play

        # 1. Upload a background picture, before anything is painted.
        page.get_by_test_id("background-upload").set_input_files(str(blue))
        expect(page.get_by_test_id("message")).to_contain_text("picture uploaded")
        expect(page.locator("#picture")).to_be_visible()

        # 2. Type prompts into new brushes.
        page.get_by_test_id("prompt").fill("a red ball")
        page.get_by_test_id("prompt").press("Tab")  # change fires when the field is left
        expect(page.get_by_test_id("brush-0")).to_contain_text("a red ball")
        page.get_by_test_id("add-brush").click()
        expect(page.get_by_test_id("brush-1")).to_be_visible()
        page.get_by_test_id("prompt").fill("a green tree")
        page.get_by_test_id("prompt").press("Tab")
        expect(page.get_by_test_id("brush-1")).to_contain_text("a green tree")

        # 3. Draw with the second brush: a band across the middle, 12 painting pixels wide.
        box = page.get_by_test_id("canvas").bounding_box()
        scale = box["width"] / 64  # the canvas is shown larger than the painting
        page.get_by_test_id("size").fill(str(round(12 * scale)))
        page.mouse.move(box["x"] + 4 * scale, box["y"] + 32 * scale)
        page.mouse.down()
        for x in range(4, 61, 4):
            page.mouse.move(box["x"] + x * scale, box["y"] + 32 * scale)
        page.mouse.up()
        page.wait_for_function("() => document.querySelector('#undo').disabled === false")
        painted = session.painting.version
        assert session.painting.brushes[1].mask[32, 8:56].all() and session.frames == 0

        # 4. Press play: frames made with the stroke, over the picture.
        page.get_by_test_id("play").click()
        page.wait_for_function(FRAME_SINCE, arg=[painted, 0])
        first = page.evaluate("window.shownNumber")
        depth = len(session.stream.schedule)  # frames until every stage has seen the stroke
        page.wait_for_function(FRAME_SINCE, arg=[painted, first + depth])
        expect(page.get_by_test_id("hint")).to_be_hidden()
        pixels = shown_pixels(page)
        far_from_blue = np.abs(pixels - [0, 0, 255]).sum(-1)
        assert np.median(far_from_blue[:10]) < 40 and np.median(far_from_blue[-10:]) < 40  # the picture kept
        assert np.median(far_from_blue[29:36, 12:52]) > 60  # the stroke painted from its prompt

        # One image: the stream pauses and the image stays on the display.
        page.get_by_test_id("one-image").click()
        page.wait_for_function("() => document.querySelector('[data-testid=display]').dataset.kind === 'image'")
        display = page.get_by_test_id("display")
        number, frames = display.get_attribute("data-number"), session.frames
        page.wait_for_timeout(3000)  # what is asserted: seconds later, nothing has replaced it
        assert display.get_attribute("data-number") == number and display.get_attribute("data-kind") == "image"
        assert session.frames == frames and session.playing is False
        expect(page.get_by_test_id("caption")).to_contain_text("seed")

        # A batch: four images with consecutive seeds, stepped through; save keeps the one shown.
        page.get_by_test_id("batch").click()
        expect(page.get_by_test_id("held-3")).to_be_visible(timeout=60_000)
        seeds = [int(page.get_by_test_id(f"held-{i}").get_attribute("title").split()[-1]) for i in range(4)]
        assert seeds == list(range(seeds[0], seeds[0] + 4))
        assert page.locator("#held img").count() == 4
        page.get_by_test_id("held-0").click()
        page.keyboard.press("ArrowRight")
        assert display.get_attribute("data-seed") == str(seeds[1])
        page.get_by_test_id("save-image").click()
        expect(page.get_by_test_id("message")).to_contain_text("saved the image on display")

        # Undo takes back a removed brush, with its mask.
        page.get_by_test_id("brush-1").click()
        page.get_by_test_id("remove-brush").click()
        expect(page.get_by_test_id("brush-1")).to_have_count(0)
        page.get_by_test_id("undo").click()
        expect(page.get_by_test_id("brush-1")).to_contain_text("a green tree")
        assert session.painting.brushes[1].mask[32, 8:56].all()

        page.get_by_test_id("save").click()
        expect(page.get_by_test_id("message")).to_contain_text("saved")
        screenshot = page.screenshot(path=str(tmp_path / "paint.png"))
        browser.close()
    if os.environ.get("SMD_SCREENSHOT"):
        Path(os.environ["SMD_SCREENSHOT"]).write_bytes(screenshot)
    assert pictures == ["POST", "GET"]  # uploaded once, fetched once, whatever was edited after
    from smd_cli.app.records import read_record

    image = session.save_dir / f"painting-image-{seeds[1]}.png"
    assert read_record(image).seed == seeds[1]
    saved = session.save_dir / "painting.yaml"
    data = yaml.safe_load(saved.read_text())
    assert [layer["prompt"] for layer in data["layers"]] == ["a red ball", "a green tree"]
    assert data["background"]["image"].endswith("background.png")
    mask = np.asarray(Image.open(saved.parent / data["layers"][1]["mask"]))
    rows, cols = np.nonzero(mask)
    assert 24 <= rows.min() and rows.max() <= 40 and cols.min() <= 6 and cols.max() >= 58  # where it was drawn
    assert not np.asarray(Image.open(saved.parent / data["layers"][0]["mask"])).any()
    result = run_cli("generate", saved, "--model", tiny_model, "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 0, result.stderr


def test_a_scene_opens_for_painting_with_its_palette_as_brushes(village, tiny_model):
    from smd_cli.app import batch
    from smd_cli.app.web.paint import open_paint

    options = batch.Options(model=str(tiny_model), device="cpu")
    session = open_paint(village, options, width=64, height=64)
    try:
        assert [b["name"] for b in session.state()["brushes"]] == ["hills", "river", "houses"]
        assert session.save_dir == village.parent and session.stem == "village"
        assert [layer.prompt for layer in session.stream.layers] == ["green rolling hills", "a winding river",
                                                                      "small cottages with red roofs"]
        assert session.stream.background_prompt == "a clear blue sky"
    finally:
        session.close()


def test_one_image_a_batch_and_saving_the_image_on_display(served):
    import websockets

    from smd_cli.app.records import read_record

    session, server = served

    async def run():
        async with websockets.connect(server.url.replace("http", "ws") + "ws") as ws:
            page = Page(ws)
            await page.send(op="seed", seed=11)
            await page.until(lambda p: p.state is not None and p.state["seed"] == 11)
            await page.send(op="play", on=False)
            await page.send(op="one_image")
            await page.until(lambda p: p.shown is not None and p.shown["kind"] == "image")
            assert page.shown["seed"] == 11
            await page.send(op="save_image")
            await page.until(lambda p: getattr(p, "last", {}).get("type") == "saved")
            saved = page.last["path"]
            start = len(page.history)
            await page.send(op="batch")
            await page.until(lambda p: p.shown["seed"] == 14)
            return saved, [m["seed"] for m in page.history[start:]]

    saved, seeds = asyncio.run(run())
    assert seeds == [11, 12, 13, 14]  # every image of a batch reaches every tab, in turn
    assert session.playing is False and [s.seed for s in session.held] == seeds  # held until play
    record = read_record(saved)
    assert Path(saved).name == "painting-image-11.png" and record.seed == 11
    assert record.scene["width"] == 64 and record.scene["layers"][0]["prompt"] == ""


def test_smd_paint_serves_until_a_signal(tiny_model, tmp_path):
    import signal
    import subprocess
    import sys

    import websockets

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    worker = subprocess.Popen([sys.executable, "-m", "smd_cli", "paint", "--model", str(tiny_model), "--device", "cpu",
                               "--port", "0", "--width", "64", "--height", "64", "--save-dir", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = worker.stdout.readline().strip()  # the one line on standard output: where the app is
        assert url.startswith("http://127.0.0.1:"), worker.stderr.read()
        with urllib.request.urlopen(url, timeout=30) as response:
            assert 'data-testid="canvas"' in response.read().decode()

        async def frame():
            async with websockets.connect(url.replace("http", "ws") + "ws") as ws:
                page = Page(ws)
                await page.send(op="play")
                await page.until(lambda p: p.shown is not None)
                await page.send(op="save")
                await page.until(lambda p: getattr(p, "last", {}).get("type") == "saved")

        asyncio.run(frame())
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=60)
    assert worker.returncode == 128 + signal.SIGTERM, err
    assert "stopped after" in err and "Traceback" not in err
    assert (tmp_path / "painting.yaml").is_file()
