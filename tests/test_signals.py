"""SIGTERM and SIGHUP end a command as Ctrl-C does: finished work kept and whole, temporary files
gone, the summary printed, and the exit code 128 + the signal. Run as real processes, signalled
from outside, as `timeout` or a closing terminal would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import as_from_a_shell, write
from PIL import Image

SCENE = "seed: 1\nwidth: 32\nheight: 32\nlayers:\n  - {prompt: a cat}\n"


def start(*args: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "smd_cli", *args], cwd=cwd, env=env, preexec_fn=as_from_a_shell,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the process never got there")
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_batch_ends_cleanly_on_a_signal(tiny_model, tmp_path, signum):
    write(tmp_path / "s.yaml", SCENE)
    worker = start("generate", "s.yaml", "--model", str(tiny_model), "--device", "cpu", "--seeds", "1-400",
                   "--out", "o/{seed}.png", cwd=tmp_path)
    wait_for(lambda: len(list((tmp_path / "o").glob("*.png"))) >= 2)
    worker.send_signal(signum)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 128 + signum, err
    made = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert made and all(re.fullmatch(r"\d+\.png", name) for name in made)  # no temporary files left
    assert sorted(Path(p).name for p in out.split()) == made  # every finished image reported
    assert f"interrupted by {signal.Signals(signum).name}" in err and "summary" in err and "skipped" in err
    for name in made:
        Image.open(tmp_path / "o" / name).load()  # and each one whole


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_an_image_is_written_waits_until_it_is_reported(tiny_model, tmp_path, signum):
    from smd_cli.app import batch
    from smd_cli.core.errors import interrupt_on_signals, interrupted_code

    scene = write(tmp_path / "s.yaml", SCENE)
    options = batch.Options(model=str(tiny_model), device="cpu", seeds=[1, 2, 3],
                            output=str(tmp_path / "o" / "{seed}.png"))
    events: list = []

    def on_event(event) -> None:
        events.append(event)
        if isinstance(event, batch.Message) and event.text.startswith("image 1/"):
            os.kill(os.getpid(), signum)  # the file is written; its outcome is not reported yet

    with interrupt_on_signals():
        outcomes = batch.run(batch.plan([scene], options), options, on_event=on_event)
        code = interrupted_code()
    assert [o.status for o in outcomes] == ["done", "skipped", "skipped"]
    assert [e.outcome.path for e in events if isinstance(e, batch.Finished)] == [str(tmp_path / "o" / "1.png")]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["1.png"]
    assert code == 128 + signum
    assert events[-1].text == ("interrupted" if signum == signal.SIGINT
                               else f"interrupted by {signal.Signals(signum).name}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stream_finishes_its_gif_on_a_signal(tiny_model, tmp_path, signum):
    write(tmp_path / "s.yaml", SCENE)
    worker = start("stream", "s.yaml", "--model", str(tiny_model), "--device", "cpu", "--out", "s.gif",
                   "--preview", "127.0.0.1:0", cwd=tmp_path)
    line = ""
    while "preview at" not in line:  # the one line the stream prints before its frames
        line = worker.stderr.readline()
        assert line or worker.poll() is None, worker.stderr.read()
    url = line.split("preview at ")[1].strip()

    def frames() -> int:
        with urllib.request.urlopen(url + "state.json", timeout=5) as response:
            return json.load(response)["frames"]

    wait_for(lambda: frames() >= 3)
    worker.send_signal(signum)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 128 + signum, err
    gif = Image.open(tmp_path / "s.gif")
    assert gif.n_frames >= 3 and out.strip() == "s.gif"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.gif", "s.yaml"]  # no temporary files
