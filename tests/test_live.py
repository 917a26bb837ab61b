"""`smd stream`: frame outputs, live scene edits with --watch, and the preview server."""

from __future__ import annotations

import json
import os
import urllib.request
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smd_cli.app.live import FrameSink, LiveState, PreviewServer, SceneWatcher, run_stream
from smd_cli.app.requests import scene_stream
from smd_cli.scenes.scene import load_scene


def test_gif_has_the_right_frame_count(run_cli, tiny_model, scene_dir, tmp_path):
    result = run_cli("stream", scene_dir / "scene.yaml", "--model", tiny_model, "--device", "cpu",
                     "--frames", "5", "--out", tmp_path / "s.gif")
    assert result.exit_code == 0, result.stderr
    gif = Image.open(tmp_path / "s.gif")
    assert gif.n_frames == 5 and gif.size == (64, 64)
    assert "5 frames" in result.stderr


def test_frames_as_numbered_pngs(run_cli, tiny_model, scene_dir, tmp_path):
    result = run_cli("stream", scene_dir / "scene.yaml", "--model", tiny_model, "--device", "cpu",
                     "--frames", "3", "--out", tmp_path / "frames")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [
        "frame-00001.png", "frame-00002.png", "frame-00003.png"]


def test_streams_never_overwrite_earlier_outputs(run_cli, tiny_model, scene_dir, tmp_path):
    def stream(*args):
        result = run_cli("stream", scene_dir / "scene.yaml", "--model", tiny_model, "--device", "cpu",
                         "--frames", "2", *args)
        assert result.exit_code == 0, result.stderr
        return result.stdout.strip()

    assert stream("--out", tmp_path / "s.gif") == str(tmp_path / "s.gif")
    assert stream("--out", tmp_path / "s.gif") == str(tmp_path / "s-1.gif")
    assert stream("--out", tmp_path / "s.gif", "--overwrite") == str(tmp_path / "s.gif")
    stream("--out", tmp_path / "frames")
    stream("--out", tmp_path / "frames")  # numbered on after the first run's frames
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"frame-0000{i}.png" for i in range(1, 5)]
    stream("--out", tmp_path / "frames", "--overwrite")
    assert len(list((tmp_path / "frames").iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files


def test_mp4_output(run_cli, tiny_model, scene_dir, tmp_path):
    imageio = pytest.importorskip("imageio.v2", reason="MP4 output is the optional [mp4] extra")
    result = run_cli("stream", scene_dir / "scene.yaml", "--model", tiny_model, "--device", "cpu",
                     "--frames", "4", "--fps", "4", "--out", tmp_path / "s.mp4")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "s.mp4")
    reader = imageio.get_reader(str(tmp_path / "s.mp4"))
    frames = [frame for frame in reader]
    assert len(frames) == 4 and frames[0].shape[:2] == (64, 64)
    again = run_cli("stream", scene_dir / "scene.yaml", "--model", tiny_model, "--device", "cpu",
                    "--frames", "1", "--out", tmp_path / "s.mp4")
    assert again.stdout.strip() == str(tmp_path / "s-1.mp4")  # written beside it, then named: never half an MP4
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["s-1.mp4", "s.mp4"] and not list(tmp_path.glob(".*"))


def test_ctrl_c_finishes_the_gif_with_the_frames_so_far(pipe, scene_dir, tmp_path):
    live = scene_stream(load_scene(scene_dir / "scene.yaml"), pipe)

    def interrupt(index, frame, run):
        if index == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stream(live, FrameSink(tmp_path / "cut.gif", 8), on_frame=interrupt)  # no limit: runs until Ctrl-C
    assert Image.open(tmp_path / "cut.gif").n_frames == 3


def test_a_stream_takes_the_scenes_steps_and_names_what_it_ignores(pipe, scene_dir):
    from smd_cli.scenes.scene import validate_scene

    sf = validate_scene({"width": 32, "height": 32, "steps": 3, "layers": [{"prompt": "a cat"}]})
    assert len(scene_stream(sf, pipe).schedule) == 3
    sf = validate_scene({"width": 32, "height": 32, "scheduler": "ddim", "steps": 4, "circular": True,
                         "tile_stride": 8, "layers": [{"prompt": "a cat"}]})
    with pytest.warns(UserWarning, match="it ignores scheduler: ddim, steps: 4, tile_stride: 8"):
        assert len(scene_stream(sf, pipe).schedule) == 5  # LCM's own
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scene_stream(load_scene(scene_dir / "scene.yaml"), pipe)  # nothing ignored, nothing said


def test_a_gif_keeps_a_bounded_number_of_frames_and_says_so(tmp_path, monkeypatch):
    from smd_cli.app import live

    monkeypatch.setattr(live, "MAX_GIF_BYTES", 3 * 8 * 8 * 3)  # three 8x8 frames
    sink = FrameSink(tmp_path / "long.gif", 8)
    with pytest.warns(UserWarning, match="it keeps the first 3 frames") as said:
        for shade in range(0, 250, 50):
            sink.add(Image.new("RGB", (8, 8), (shade, 0, 0)))
    assert len(said) == 1 and sink.count == 5
    assert Image.open(sink.close()).n_frames == 3


def test_bad_outputs_are_refused_before_loading(run_cli, scene_dir, tmp_path):
    result = run_cli("stream", scene_dir / "scene.yaml", "--frames", "1", "--out", tmp_path / "x.avi")
    assert result.exit_code == 2 and "give a folder, a .gif or an .mp4 file" in result.stderr
    try:
        import imageio  # noqa: F401
    except ImportError:
        result = run_cli("stream", scene_dir / "scene.yaml", "--frames", "1", "--out", tmp_path / "x.mp4")
        assert result.exit_code == 2 and "pip install 'smd-cli[mp4]'" in result.stderr
    result = run_cli("stream", scene_dir / "scene.yaml", "--cfg", "bogus")
    assert result.exit_code == 2 and "--cfg must be one of none, full, self, initialize" in result.stderr
    result = run_cli("stream", scene_dir / "scene.yaml", "--preview", "localhost:notaport")
    assert result.exit_code == 2 and "--preview expects PORT, HOST:PORT or [IPV6]:PORT" in result.stderr


def _touch_later(path: Path, seconds: int) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))


def test_watch_applies_edits_and_survives_broken_ones(pipe, scene_dir):
    path = scene_dir / "scene.yaml"
    live = scene_stream(load_scene(path), pipe)
    watcher = SceneWatcher(path)
    watcher.watch(load_scene(path))
    original_mask = live.layers[2].mask.copy()
    reloads: list[str] = []
    seen: dict[int, tuple] = {}

    def edit(index, frame, run):
        mask = live.layers[2].mask.copy() if len(live.layers) > 2 else None
        seen[index] = ([layer.prompt for layer in live.layers], mask, np.asarray(frame))
        if index == 2:  # a prompt edit and a repainted mask image
            path.write_text(path.read_text().replace('prompt: "the sun"', 'prompt: "the moon"'))
            _touch_later(path, 1)
            repainted = np.zeros((64, 64, 4), np.uint8)
            repainted[:, :20, 3] = 255
            Image.fromarray(repainted, "RGBA").save(scene_dir / "masks" / "right.png")
            _touch_later(scene_dir / "masks" / "right.png", 1)
        if index == 4:  # a broken edit
            path.write_text(path.read_text() + "\n  - {prompt: [unclosed\n")
            _touch_later(path, 2)
        if index == 6:  # fixed again, with a layer removed
            text = path.read_text().split("\n  - {prompt: [unclosed")[0]
            text = text[: text.index("  - name: tree")] + 'output: out/{scene}-{seed}.png\n'
            path.write_text(text)
            _touch_later(path, 3)

    run = run_stream(live, FrameSink(None, 8), frames=8, watcher=watcher, on_frame=edit, on_reload=reloads.append)
    assert run.frames == 8
    assert seen[2][0][0] == "the sun" and seen[3][0][0] == "the moon"
    assert not np.array_equal(seen[3][1], original_mask) and seen[3][1][:, :20].min() == 1
    assert any("kept the last good scene" in r and "not valid YAML" in r for r in reloads)
    assert seen[5][0] == seen[4][0]  # still streaming the last good scene
    assert len(seen[7][0]) == 2  # the fixed scene's two layers (the tree removed)


def test_preview_serves_a_decodable_frame_to_a_real_client():
    state = LiveState(frame=Image.new("RGB", (32, 24), (200, 30, 40)), frames=3, fps=2.5,
                      prompts=["a photo of the sun"])
    server = PreviewServer(state, "127.0.0.1", 0).start()
    host, port = server.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/frame.jpg", timeout=10) as reply:
            assert reply.headers["Content-Type"] == "image/jpeg"
            frame = Image.open(BytesIO(reply.read()))
            frame.load()
        assert frame.size == (32, 24)
        assert np.abs(np.asarray(frame, dtype=int)[12, 16] - [200, 30, 40]).max() < 8
        with urllib.request.urlopen(f"http://{host}:{port}/state.json", timeout=10) as reply:
            assert json.loads(reply.read()) == {"frames": 3, "fps": 2.5, "prompts": ["a photo of the sun"]}
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as reply:
            assert b"/frame.jpg" in reply.read()
    finally:
        server.stop()


def test_stream_command_with_preview(run_cli, tiny_model, scene_dir):
    result = run_cli("stream", scene_dir / "scene.yaml", "--model", tiny_model, "--device", "cpu",
                     "--frames", "2", "--preview", "127.0.0.1:0")
    assert result.exit_code == 0, result.stderr
    assert "preview at http://127.0.0.1:" in result.stderr
