"""Hostile files and faults, one class at a time: reads without bound, recursion, foreign records,
masks that lie about their range or colours, everything that must fail before a model loads, and
what reaches the terminal. Each test would have caught its class, not only one example of it."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from smd_cli.core.errors import SceneError, SmdError

MIB = 1024**2
LAYER = "layers:\n  - {prompt: a cat}\n"
PROPERTIES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def no_hang():
    """A test that blocks (a FIFO opened for reading, say) fails after 60 s instead of hanging CI."""
    def stop(signum, frame):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def png_bytes(size=(32, 32), color=(255, 255, 255), mode="RGB", pnginfo=None) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG", pnginfo=pnginfo)
    return buffer.getvalue()


def bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG whose header promises `width` x `height` pixels: decoding it would take gigabytes."""
    data = bytearray(png_bytes((1, 1), 0, mode="L"))
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # and its checksum
    return bytes(data)


def make(kind: str, path: Path) -> Path:
    """A file of `kind` at `path`: not a regular file, too large, or an image that lies."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    elif kind == "huge":  # sparse: 600 MiB on paper, nothing on disk
        with open(path, "wb") as fh:
            fh.truncate(600 * MIB)
    elif kind == "bomb":
        path.write_bytes(bomb())
    return path


KINDS = {"fifo": "FIFO", "dev-zero": "character device", "folder": "a folder", "huge": "600.0 MiB",
         "bomb": "decompression bomb"}


def watched(pipe, scene: Path):
    """A stream of `scene`, and a watcher on its files."""
    from smd_cli.app.live import SceneWatcher
    from smd_cli.app.requests import scene_stream
    from smd_cli.scenes.scene import load_scene

    watcher = SceneWatcher(scene)
    watcher.watch(load_scene(scene))
    return scene_stream(load_scene(scene), pipe), watcher


# --- 1. reads without bound -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder", "huge"])
def test_a_scene_file_that_is_not_a_scene(run_cli, tmp_path, kind):
    scene = make(kind, tmp_path / "s.yaml")
    result = run_cli("validate", scene)
    assert result.exit_code == 2 and KINDS[kind] in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("role", ["mask", "mask sizing the canvas", "palette", "picture"])
def test_image_files_that_are_not_images_to_read(run_cli, tmp_path, kind, role):
    make(kind, tmp_path / "x.png")
    sized = "" if role == "mask sizing the canvas" else "width: 32\nheight: 32\n"
    if role == "picture":
        text = f"{sized}background: {{image: x.png}}\n{LAYER}"
    elif role == "palette":
        text = f"{sized}layers:\n  - {{prompt: a, mask: {{palette: x.png, color: '#ff0000'}}}}\n"
    else:
        text = f"{sized}layers:\n  - {{prompt: a, mask: x.png}}\n"
    result = run_cli("validate", write(tmp_path / "s.yaml", text))
    assert result.exit_code == 2, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path / "x.png") in errors[0] and KINDS[kind] in errors[0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_records_that_are_not_images_to_read(run_cli, tmp_path, kind):
    image = make(kind, tmp_path / "r.png")
    for command in ("show", "reproduce"):
        result = run_cli(command, image)
        assert result.exit_code == 2 and KINDS[kind] in result.stderr and "Traceback" not in result.stderr


def test_a_canvas_from_an_image_obeys_the_size_limit(run_cli, tmp_path):
    Image.new("L", (8, 2000), 255).save(tmp_path / "thin.png")
    result = run_cli("validate", write(tmp_path / "s.yaml", "width: 16384\nlayers:\n  - {prompt: a, mask: thin.png}\n"))
    assert result.exit_code == 2
    assert "this 8x2000 image makes the canvas 16384x4096000, but each side must be 8 to 16384" in result.stderr


def test_a_watched_stream_refuses_a_bomb_and_keeps_going(pipe, tmp_path):
    from smd_cli.app.live import FrameSink, run_stream

    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    live, watcher = watched(pipe, write(tmp_path / "s.yaml", "seed: 1\nwidth: 64\nheight: 64\nlayers:\n"
                                                             "  - {prompt: a, mask: m.png}\n"))
    reloads: list[str] = []

    def swap(index, frame, run):
        if index == 1:
            (tmp_path / "m.png").write_bytes(bomb())

    run = run_stream(live, FrameSink(None, 8), frames=3, watcher=watcher, on_frame=swap, on_reload=reloads.append)
    assert run.frames == 3 and any("decompression bomb" in text and "kept the last good scene" in text
                                   for text in reloads)


# --- 2. recursion -----------------------------------------------------------------------------


def nested(depth: int, form: str) -> str:
    if form == "list":
        return "[" * depth + "]" * depth
    if form == "map":
        return "{a: " * depth + "1" + "}" * depth
    return "\n".join(["x0: &a0 [1]"] + [f"x{i}: &a{i} [*a{i - 1}]" for i in range(1, depth)])


@PROPERTIES
@given(depth=st.integers(1, 5000), form=st.sampled_from(["list", "map", "aliases"]))
def test_documents_of_any_depth_are_a_scene_or_an_smd_error(tmp_path, depth, form):
    from smd_cli.scenes.scene import load_scene

    body = nested(depth, form)
    text = f"{body}\n{LAYER}" if form == "aliases" else f"extra: {body}\n{LAYER}"
    try:
        load_scene(write(tmp_path / "s.yaml", text))
    except SceneError as exc:
        assert "\n" not in str(exc)


@pytest.mark.slow
@PROPERTIES
@given(depth=st.integers(1, 5000), form=st.sampled_from(["list", "map"]))
def test_set_values_of_any_depth(tmp_path, depth, form):
    from smd_cli.scenes.scene import load_scene

    scene = write(tmp_path / "s.yaml", LAYER)
    try:
        load_scene(scene, [f"background.prompt={nested(depth, form)}"])
    except SceneError as exc:
        assert "\n" not in str(exc)


def test_aliases_that_refer_to_themselves(run_cli, tmp_path):
    for text in ("x: &a [*a]\n" + LAYER, "layers: &l [{prompt: a, more: *l}]\n"):
        result = run_cli("validate", write(tmp_path / "s.yaml", text))
        assert result.exit_code == 2 and "refers to a list or mapping that contains it" in result.stderr


def record_png(path: Path, **chunks: str) -> Path:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_itxt(key.replace("_", "-"), value)
    path.write_bytes(png_bytes((8, 8), pnginfo=info))
    return path


@pytest.mark.slow
@PROPERTIES
@given(depth=st.integers(1, 5000))
def test_deep_records_are_damaged_records(tmp_path, depth):
    from smd_cli.app.records import read_record

    for chunks in ({"smd_scene": f"a: {nested(depth, 'list')}\n" + LAYER},
                   {"smd_scene": LAYER, "smd_timings": "[" * depth + "]" * depth}):
        try:
            read_record(record_png(tmp_path / "r.png", **chunks))
        except SmdError as exc:
            assert "\n" not in str(exc)


texts = st.text(max_size=40) | st.sampled_from(["", "{}", "[]", "null", "1e999", "-5", "{a: 1}", "../../x",
                                                "/dev/zero", "a\x1b[2Jb", "[" * 300])


@PROPERTIES
@given(scene=texts | st.just(LAYER), files=texts, seed=texts, name=texts, timings=texts, model=texts)
def test_any_record_fields_give_a_record_or_an_smd_error(tmp_path, scene, files, seed, name, timings, model):
    from smd_cli.app.records import as_dict, read_record

    path = record_png(tmp_path / "r.png", smd_scene=scene, smd_files=files, smd_seed=seed, smd_name=name,
                      smd_timings=timings, smd_model=model)
    try:
        record = read_record(path)
    except SmdError as exc:
        assert "\n" not in str(exc)
        return
    json.dumps(as_dict(record))  # `smd show --json` can always print it
    try:
        record.scene_file()
    except SmdError:
        pass


def test_one_scene_failing_unexpectedly_does_not_stop_the_batch(run_cli, tiny_model, tmp_path, monkeypatch):
    from smd_cli.scenes import canvas

    original = canvas.scene_masks

    def flaky(sf, *args, **kwargs):
        if sf.name == "b":
            raise RecursionError("maximum recursion depth exceeded")
        return original(sf, *args, **kwargs)

    monkeypatch.setattr(canvas, "scene_masks", flaky)
    scenes = [write(tmp_path / f"{n}.yaml", f"seed: 1\nwidth: 32\nheight: 32\n{LAYER}") for n in "abc"]
    result = run_cli("generate", *scenes, "--model", tiny_model, "--device", "cpu", "--out", tmp_path / "{scene}.png",
                     "--json")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted((r["scene"], r["status"]) for r in rows) == [("a", "done"), ("b", "invalid"), ("c", "done")]
    assert "RecursionError: maximum recursion depth exceeded" in result.stderr


def test_an_unexpected_failure_in_a_reload_does_not_stop_the_stream(pipe, tmp_path, monkeypatch):
    from smd_cli.app import live

    stream, watcher = watched(pipe, write(tmp_path / "s.yaml", f"seed: 1\nwidth: 64\nheight: 64\n{LAYER}"))
    monkeypatch.setattr(watcher, "changed", lambda: True)
    monkeypatch.setattr(watcher, "reload", lambda: (_ for _ in ()).throw(MemoryError("a bad day")))
    reloads: list[str] = []
    run = live.run_stream(stream, live.FrameSink(None, 8), frames=2, watcher=watcher, on_reload=reloads.append)
    assert run.frames == 2 and "kept the last good scene: MemoryError: a bad day" in reloads[0]


# --- 4. concurrent writers ----------------------------------------------------------------------


def test_two_streams_into_one_folder_never_overwrite(tmp_path):
    from smd_cli.app.live import FrameSink

    a, b = FrameSink(tmp_path / "frames", 8), FrameSink(tmp_path / "frames", 8)  # both start at frame 1
    colours = []
    for i in range(6):
        colour = (i * 40, 0, 0)
        (a if i % 2 else b).add(Image.new("RGB", (4, 4), colour))
        colours.append(colour)
    files = sorted((tmp_path / "frames").iterdir())
    assert [f.name for f in files] == [f"frame-{n:05d}.png" for n in range(1, 7)]
    assert sorted(Image.open(f).getpixel((0, 0)) for f in files) == sorted(colours)  # every frame kept


# --- 5. records from strangers ------------------------------------------------------------------


@pytest.fixture()
def made(run_cli, tiny_model, tmp_path) -> Path:
    """An image made by smd from a scene with a mask file."""
    Image.new("L", (32, 32), 255).save(tmp_path / "m.png")
    scene = write(tmp_path / "s.yaml", "seed: 3\nwidth: 32\nheight: 32\nlayers:\n  - {prompt: a, mask: m.png}\n")
    out = tmp_path / "made.png"
    assert run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--out", out).exit_code == 0
    return out


def rewrite(image: Path, target: Path, **changes: str) -> Path:
    """The image with some of its text chunks changed, as a stranger might."""
    original = Image.open(image)
    info = PngInfo()
    for key, value in {**original.text, **{k.replace("_", "-"): v for k, v in changes.items()}}.items():
        info.add_itxt(key, value)
    original.save(target, pnginfo=info)
    return target


def test_a_record_name_cannot_place_the_output_elsewhere(run_cli, made, tmp_path):
    crafted = rewrite(made, tmp_path / "crafted.png", smd_name="../../escaped")
    result = run_cli("reproduce", crafted, "--out", f"{tmp_path}/out/")
    assert result.exit_code == 0, result.stderr
    written = Path(result.stdout.strip())
    assert written.parent == tmp_path / "out" and "/" not in written.name
    assert not list(tmp_path.parent.glob("escaped*"))


def test_recorded_files_that_are_not_files(run_cli, made, tmp_path):
    scene = yaml.safe_load(Image.open(made).text["smd-scene"])
    os.mkfifo(tmp_path / "pipe.png")
    scene["layers"][0]["mask"] = {"image": str(tmp_path / "pipe.png")}
    crafted = rewrite(made, tmp_path / "crafted.png", smd_scene=yaml.safe_dump(scene),
                      smd_files=json.dumps({str(tmp_path / "pipe.png"): "0" * 64}))
    shown = run_cli("show", crafted)
    assert shown.exit_code == 0 and "unreadable: a FIFO (named pipe), not a regular file" in shown.stdout
    result = run_cli("reproduce", crafted, "--out", tmp_path / "again.png")
    assert result.exit_code == 2 and "FIFO" in result.stderr and f"reads {tmp_path / 'pipe.png'}" in result.stderr


def test_reproduce_lists_every_file_it_reads_not_only_the_recorded_ones(run_cli, made, tiny_model, tmp_path):
    scene = yaml.safe_load(Image.open(made).text["smd-scene"])
    Image.new("L", (32, 32), 255).save(tmp_path / "unlisted.png")
    scene["layers"][0]["mask"] = {"image": str(tmp_path / "unlisted.png")}
    scene["seed"] = 99  # the scene's seed disagrees with the record's: the record's seed is the image's
    crafted = rewrite(made, tmp_path / "crafted.png", smd_scene=yaml.safe_dump(scene), smd_files="{}\n")
    result = run_cli("reproduce", crafted, "--model", tiny_model, "--out", tmp_path / "again.png")
    assert result.exit_code == 0, result.stderr
    assert (f"reads {tmp_path / 'unlisted.png'}" in result.stderr
            and f"reads {Path(tiny_model).absolute()}" in result.stderr)
    assert yaml.safe_load(Image.open(tmp_path / "again.png").text["smd-seed"]) == 3
    assert "identical" in result.stderr


def test_a_text_chunk_past_the_limit(run_cli, tmp_path):
    info = PngInfo()
    info.add_text("smd-scene", LAYER + "#" * (2 * MIB), zip=True)  # 2 MiB once decompressed
    (tmp_path / "big.png").write_bytes(png_bytes((8, 8), pnginfo=info))
    result = run_cli("show", tmp_path / "big.png")
    assert result.exit_code == 2 and "cannot read the image" in result.stderr and "Traceback" not in result.stderr


def test_reproduce_check_json_and_never_onto_its_source(run_cli, made, tmp_path):
    same = run_cli("reproduce", made, "--check", "--json", "--out", tmp_path / "a.png")
    assert same.exit_code == 0 and json.loads(same.stdout)["identical"] is True
    half = np.zeros((32, 32), np.uint8)
    half[:, :16] = 255
    Image.fromarray(half).save(tmp_path / "m.png")  # the mask changed since
    differs = run_cli("reproduce", made, "--check", "--json", "--out", tmp_path / "b.png")
    assert differs.exit_code == 1 and json.loads(differs.stdout)["identical"] is False
    assert run_cli("reproduce", made, "--out", tmp_path / "b.png").exit_code == 0  # without --check: made is 0
    onto = run_cli("reproduce", made, "--out", made, "--overwrite")
    assert onto.exit_code == 2 and "is the image being reproduced" in onto.stderr


# --- 6. the preview server ----------------------------------------------------------------------


def test_a_busy_port_or_unknown_host_fails_before_the_model_loads(run_cli, tiny_model, tmp_path, monkeypatch):
    import socket

    from smd_cli.engine import pipeline

    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    scene = write(tmp_path / "s.yaml", f"width: 32\nheight: 32\n{LAYER}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("stream", scene, "--model", tiny_model, "--preview", f"127.0.0.1:{port}")
    assert result.exit_code == 2 and f"127.0.0.1:{port}: cannot listen there: the port is in use" in result.stderr
    result = run_cli("stream", scene, "--model", tiny_model, "--preview", "no-such-host.invalid:0")
    assert result.exit_code == 2 and "unknown host 'no-such-host.invalid'" in result.stderr


def test_the_preview_server_under_rude_and_idle_clients(capfd):
    import socket
    import threading
    import time
    import urllib.request

    from smd_cli.app.live import LiveState, PreviewServer

    state = LiveState(frame=Image.new("RGB", (8, 8)), frames=1)
    server = PreviewServer(state, "127.0.0.1", 0, max_clients=4, timeout=0.5).start()
    host, port = server.address
    try:
        before = threading.active_count()
        idle = [socket.create_connection((host, port)) for _ in range(20)]  # a bounded loop of idle clients
        time.sleep(0.2)  # what is asserted: no more threads than the bound, however long they wait
        assert threading.active_count() <= before + 4  # no thread past the bound
        rude = socket.create_connection((host, port))
        rude.sendall(b"GET /frame.jpg HTTP/1.1\r\n")  # half a request, then gone
        rude.close()
        for connection in idle:
            connection.close()
        deadline = time.monotonic() + 30
        while threading.active_count() > before and time.monotonic() < deadline:  # they time out, freeing threads
            time.sleep(0.05)
        lingering = socket.create_connection((host, port))
        lingering.settimeout(30)
        assert lingering.recv(1) == b""  # an idle connection is closed by the server (after 0.5 s)
        lingering.close()
        with urllib.request.urlopen(f"http://{host}:{port}/state.json", timeout=5) as response:
            assert json.load(response)["frames"] == 1
    finally:
        server.stop()
    assert capfd.readouterr().err == ""  # disconnects and timeouts are silent


def test_ipv6_preview_where_the_machine_has_it():
    import socket
    import urllib.request

    from smd_cli.app.live import LiveState, PreviewServer, parse_address

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    assert parse_address("[::1]:0") == ("::1", 0)
    try:
        server = PreviewServer(LiveState(), *parse_address("[::1]:0")).start()
    except SmdError:
        pytest.skip("::1 cannot be bound here")
    try:
        assert server.url.startswith("http://[::1]:")
        with urllib.request.urlopen(server.url + "state.json", timeout=5) as response:
            assert json.load(response)["frames"] == 0
    finally:
        server.stop()


# --- 7. masks -----------------------------------------------------------------------------------


def test_16_bit_masks_are_read_at_their_range(tmp_path):
    from smd_cli.method import masks as M
    from smd_cli.scenes import canvas as C
    from smd_cli.scenes.scene import load_scene

    ramp = (np.linspace(0, 65535, 64)[None, :] * np.ones((32, 1))).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "m16.png")
    assert Image.open(tmp_path / "m16.png").mode == "I;16"
    np.testing.assert_allclose(M.image_mask(Image.open(tmp_path / "m16.png"))[0], ramp[0] / 65535, atol=1e-6)
    sf = load_scene(write(tmp_path / "s.yaml", "width: 64\nheight: 32\nlayers:\n  - {prompt: a, mask: m16.png}\n"))
    assert C.scene_masks(sf).masks[0].mean() == pytest.approx(0.5, abs=0.02)  # not every non-zero pixel


def test_a_mistyped_palette_colour_on_the_command_line(run_cli, scene_dir):
    result = run_cli("validate", scene_dir / "scene.yaml", "--set", "layers[0].mask.color=#e757b1x")
    assert result.exit_code == 2  # not a colour at all
    result = run_cli("validate", scene_dir / "scene.yaml", "--set", "layers[0].mask.color=#123456")
    assert result.exit_code == 2 and "colour #123456 matches no pixel of palette.png" in result.stderr
    assert "its main colours are" in result.stderr


# --- 8. validation and dry runs -----------------------------------------------------------------


def test_every_problem_of_a_scene_in_file_order(run_cli, tmp_path):
    scene = write(tmp_path / "s.yaml", "seeed: 1\nwidth: 32\nheight: 32\nguidance_scale: -1\nlayers:\n"
                                       "  - {prompt: a, mask: nope.png}\n  - {prompt: b, mask: gone.png}\n"
                                       "  - {promt: c}\n")
    result = run_cli("validate", scene)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 3, result.stderr
    assert "s.yaml:1: seeed: unknown key" in errors[0] and "s.yaml:4: guidance_scale" in errors[1]
    assert "s.yaml:8: layers[2].promt: unknown key 'promt'; did you mean 'prompt'?" in errors[2]
    masks = write(tmp_path / "t.yaml", "width: 32\nheight: 32\nlayers:\n  - {prompt: a, mask: nope.png}\n"
                                       "  - {prompt: b, mask: gone.png}\n")
    result = run_cli("validate", masks)
    assert [line.split(": ")[2] for line in result.stderr.splitlines()] == ["layers[0].mask", "layers[1].mask"]


def test_a_syntax_error_names_where_the_broken_construct_starts(run_cli, tmp_path):
    scene = write(tmp_path / "s.yaml", "seed: 1\nlayers:\n  - prompt: \"a cat\n    mask: m.png\nwidth: 64\n")
    result = run_cli("validate", scene)
    assert result.exit_code == 2
    assert "s.yaml:3: not valid YAML: found unexpected end of stream at line 6, in a quoted string that starts " \
           "here" in result.stderr


def test_validate_takes_a_thousand_layers(run_cli, tmp_path):
    layers = "".join(f"  - {{prompt: p{i}, mask: {{rect: [{i % 32}, {i // 32}, {i % 32 + 1}, {i // 32 + 1}]}}}}\n"
                     for i in range(1000))
    result = run_cli("validate", write(tmp_path / "s.yaml", f"width: 64\nheight: 64\nlayers:\n{layers}"))
    assert result.exit_code == 0, result.stderr
    assert "1000 layer(s)" in result.stdout and "p999" in result.stdout


def test_a_dry_run_checks_what_would_fail_after_the_work(run_cli, tiny_model, tmp_path, monkeypatch):
    from smd_cli.engine import pipeline

    monkeypatch.setattr(pipeline, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    scene = write(tmp_path / "s.yaml", f"seed: 1\nwidth: 32\nheight: 32\n{LAYER}")

    def dry(*args):
        return run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--dry-run", *args)

    assert dry().exit_code == 0
    too_long = dry("--out", tmp_path / ("x" * 300 + ".png"))
    assert too_long.exit_code == 2 and "more than the 255 a file name may have" in too_long.stderr
    unencodable = dry("--out", str(tmp_path / "a\ud800.png"))
    assert unencodable.exit_code == 2 and "the file system cannot store that name" in unencodable.stderr
    late = dry("--set", "timesteps=[5000, 10]")
    assert late.exit_code == 2 and "timesteps must lie in [0, 999] for this model" in late.stderr
    many = dry("--steps", "60")
    assert many.exit_code == 2 and "lcm takes at most 50 steps" in many.stderr
    lora = dry("--lcm-lora", tmp_path / "missing-lora")
    assert lora.exit_code == 2 and "LCM LoRA file or folder not found" in lora.stderr
    vae = dry("--vae", "nobody/no-such-vae")
    assert vae.exit_code == 2 and "hf download nobody/no-such-vae --include config.json" in vae.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, a hub id not downloaded yet cannot be checked: said
    later = dry("--vae", "nobody/no-such-vae")
    assert later.exit_code == 0 and "not checked yet: s: VAE nobody/no-such-vae is not downloaded yet" in later.stderr


def test_absurd_work_is_counted_before_it_starts(run_cli, tiny_model, tmp_path):
    scene = write(tmp_path / "s.yaml", f"seed: 1\nwidth: 1024\nheight: 64\ntile_size: 64\ntile_stride: 2\n{LAYER}")
    result = run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--dry-run")
    assert result.exit_code == 0 and "warning: s: 481 views per layer and step" in result.stderr
    many = write(tmp_path / "m.yaml", f"width: 32\nheight: 32\n{LAYER}")
    result = run_cli("generate", many, "--model", tiny_model, "--device", "cpu", "--dry-run", "--repeat", "1001",
                     "--out", tmp_path / "{index}.png")
    assert result.exit_code == 0 and "warning: this batch makes 1001 images" in result.stderr


# --- 9. the terminal ----------------------------------------------------------------------------


def test_control_characters_are_escaped_wherever_they_are_printed(run_cli, tiny_model, tmp_path):
    evil = "a\x1b[2Jcat\x07\nx]"  # the bracket closed: a lone one is a prompt-weight error
    scene = write(tmp_path / "s.yaml", f"seed: 1\nwidth: 32\nheight: 32\nlayers:\n  - name: {json.dumps(evil)}\n"
                                       f"    prompt: {json.dumps(evil)}\n")
    for args in (("validate", scene), ("generate", scene, "--model", tiny_model, "--device", "cpu", "--verbose",
                                       "--out", tmp_path / "x.png")):
        result = run_cli(*args)
        assert result.exit_code == 0, result.stderr
        for stream in (result.stdout, result.stderr):
            assert "\x1b" not in stream and "\x07" not in stream
    assert "a\\x1b[2Jcat\\x07\\nx]" in run_cli("validate", scene).stdout  # its table shows name and prompt
    bad = write(tmp_path / "b.yaml", f"layers:\n  - {{prompt: a, mask: {json.dumps(evil + '.png')}}}\n")
    result = run_cli("validate", bad)
    assert result.exit_code == 2 and "\x1b" not in result.stderr and "\\x1b" in result.stderr


# --- 10. --watch --------------------------------------------------------------------------------


def test_watch_says_what_needs_a_restart_and_finds_a_mask_that_appears(pipe, tmp_path):
    from smd_cli.app.live import FrameSink, run_stream
    from smd_cli.app.requests import STREAM_FIXED
    from smd_cli.scenes.scene import Scene

    live_keys = {"layers", "background", "negative_prefix", "output"}
    assert set(Scene.model_fields) == set(STREAM_FIXED) | live_keys  # a new scene key must be placed in one
    text = "seed: 1\nwidth: 64\nheight: 64\nlayers:\n  - {prompt: a}\n"
    scene = write(tmp_path / "s.yaml", text)
    live, watcher = watched(pipe, scene)
    reloads: list[str] = []

    def edit(index, frame, run):
        if index == 1:
            write(scene, text.replace("seed: 1", "seed: 2").replace("{prompt: a}", "{prompt: b}"))
        elif index == 2:
            write(scene, text + "  - {prompt: c, mask: later.png}\n")
        elif index == 3:
            Image.new("L", (64, 64), 255).save(tmp_path / "later.png")
        os.utime(scene) if index < 3 else None

    run_stream(live, FrameSink(None, 8), frames=5, watcher=watcher, on_frame=edit, on_reload=reloads.append)
    assert "layer1: prompt; restart to apply seed" in reloads[0]
    assert "later.png" in reloads[1] and "kept the last good scene" in reloads[1]
    assert "added layer2" in reloads[2] and [layer.prompt for layer in live.layers] == ["a", "c"]
