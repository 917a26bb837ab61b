"""What the environment around `smd` may be, one class at a time, each run as the real process: an
account with no home folder (a service: HOME unset, a uid with no password entry), file names that
are not UTF-8, and a second Ctrl-C while the first is being handled. Each test would have caught its
class, not only one example of it."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import SCENES, as_from_a_shell, write
from PIL import Image

SCENE = "seed: 1\nwidth: 32\nheight: 32\nlayers:\n  - {prompt: a cat}\n"
# Where a home folder or a cache could come from, none of which a service account has.
HOME_VARIABLES = ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                  "SMD_CONFIG", "SMD_MODEL", "SMD_LCM_LORA", "SMD_DEVICE", "SMD_DTYPE")
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="running as a uid with no password entry needs root")


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HOME_VARIABLES}
    return dict(env, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", **extra)


def smd(*args: str | bytes, cwd: Path, env: dict[str, str] | None = None, uid: int | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """`smd ARGS` (bytes for names that are not UTF-8) as a process, as `uid` if given; its output as bytes."""
    command = [*as_uid(uid), sys.executable, "-m", "smd_cli", *args] if uid is not None else \
        [sys.executable, "-m", "smd_cli", *args]
    return subprocess.run(command, cwd=cwd, env=env or environment(), capture_output=True, timeout=timeout)


def as_uid(uid: int) -> list[str]:
    """The command prefix that runs a program as `uid` (with no groups). setpriv finds the program
    with root's rights, so that an interpreter installed in root's private home still starts."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    probe = subprocess.run([setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-c",
                            "import smd_cli"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"this Python cannot run as uid {uid}: {probe.stderr.decode(errors='replace')[-200:]}")
    return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def homeless(*args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    return smd(*args, cwd=cwd, env=environment(**extra), uid=unknown_uid())


def unknown_uid() -> int:
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def clean(done: subprocess.CompletedProcess) -> str:
    """Its standard error, checked to hold no traceback."""
    err = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and "unexpected" not in err, err
    return err


@pytest.fixture()
def shared_folder(tiny_model):
    """A folder any uid may read and write (pytest's own are private to root), with the example
    scenes, a one-layer scene and the tiny model in it."""
    folder = Path(tempfile.mkdtemp(prefix="smd-environment-"))
    folder.chmod(0o777)
    shutil.copytree(SCENES, folder / "scenes")
    shutil.copytree(tiny_model, folder / "tiny")
    write(folder / "s.yaml", SCENE)
    for path in folder.rglob("*"):  # copies keep pytest's private modes
        path.chmod(0o777 if path.is_dir() else 0o666)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# No home folder


def test_no_home_folder_means_no_config_file_and_a_tilde_left_as_written(monkeypatch):
    from smd_cli.app.user_config import config_path, read_config
    from smd_cli.core.files import expand_user, no_home

    for name in HOME_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert config_path() is None and read_config() == {}
    assert expand_user("~/models/x") == Path("~/models/x") and expand_user("/a/b") == Path("/a/b")
    assert "HOME is unset" in no_home()


@needs_root
def test_without_a_home_folder_every_command_runs(shared_folder):
    for args in (["--help"], ["--version"], ["generate", "--help"], ["paint", "--help"], ["models"],
                 ["--show-completion", "bash"], ["validate", "scenes/village.yaml", "scenes/sunset-lake.yaml"]):
        done = homeless(*args, cwd=shared_folder)
        clean(done)
        assert done.returncode == 0, (args, done.stderr)
    made = homeless("generate", "s.yaml", "--model", "tiny", "--device", "cpu", "--out", "out/", cwd=shared_folder)
    clean(made)
    assert made.returncode == 0 and made.stdout == b"out/s-1.png\n"
    again = homeless("reproduce", "out/s-1.png", "--device", "cpu", cwd=shared_folder)
    assert again.returncode == 0 and "identical to out/s-1.png" in clean(again)
    assert not [p for p in shared_folder.rglob("*") if p.name.startswith("~")]  # no folder named ~ made


@needs_root
@pytest.mark.parametrize("args, extra, fragment", [
    (["generate", "s.yaml", "--model", "~/models/x", "--device", "cpu"], {},
     "model folder or file not found: ~/models/x"),
    (["generate", "tilde.yaml", "--model", "tiny", "--device", "cpu"], {}, "mask file not found: ~/m.png"),
    (["generate", "s.yaml", "--model", "tiny", "--device", "cpu", "--out", "~/x.png"], {}, "no home folder ~"),
    (["stream", "s.yaml", "--model", "tiny", "--device", "cpu", "--out", "~/x.gif"], {}, "no home folder ~"),
    (["validate", "s.yaml"], {"SMD_CONFIG": "~/config.yaml"}, "~/config.yaml: no such smd config file"),
    (["generate", "s.yaml", "--device", "cpu"], {}, "set HF_HOME to a folder"),  # the default model, from the hub
    (["generate", "s.yaml", "--model", "tiny", "--device", "cpu", "--lcm-lora", "latent-consistency/lcm-lora-sdv1-5"],
     {}, "set HF_HOME to a folder"),
    (["--install-completion", "bash"], {}, "set HOME"),
], ids=["model", "mask", "out", "stream-out", "config", "hub-model", "hub-lora", "completion"])
def test_without_a_home_folder_a_tilde_or_the_hub_is_one_clean_error(shared_folder, args, extra, fragment):
    write(shared_folder / "tilde.yaml", "width: 32\nheight: 32\nlayers:\n  - {prompt: a cat, mask: ~/m.png}\n")
    done = homeless(*args, cwd=shared_folder, **extra)
    lines = clean(done).strip().splitlines()
    assert done.returncode == 2 and any(fragment in line and line.startswith("error:") for line in lines), lines
    assert not [p for p in shared_folder.rglob("*") if p.name.startswith("~")]


# ---------------------------------------------------------------------------------------------
# File names that are not UTF-8


def fs(name: bytes) -> str:
    """A file name of any bytes, as Python spells it (undecodable bytes as surrogate escapes)."""
    return os.fsdecode(name)


def test_undecodable_bytes_print_as_the_byte():
    from smd_cli.core.errors import printable
    from smd_cli.core.outputs import safe_name

    assert printable(fs(b"sc\xe8ne\n.yaml")) == "sc\\xe8ne\\n.yaml"
    assert printable(fs(b"sc\xe8ne"), keep_bytes=True) == fs(b"sc\xe8ne")
    assert safe_name(fs(b"sc\xe8ne\x1b[2J")) == "sc_ne_[2J"


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_a_record_keeps_names_that_are_not_utf8_exactly(tmp_path, suffix):
    from smd_cli.app.records import Record, chunks, read_record, save_options

    mask = fs(b"/d\xe8/m\xe9.png")
    scene = {"layers": [{"name": "cat", "prompt": "a cat", "negative_prompt": "", "mask": {"image": mask}}],
             "background": {"prompt": "", "negative_prompt": ""}, "scheduler": "lcm", "guidance_scale": 1.0,
             "steps": 4, "width": 8, "height": 8, "model": fs(b"/models/m\xe8")}
    for name in (fs(b"sc\xe8ne"), '"quoted"'):
        record = Record(scene=scene, name=name, seed=1, model=fs(b"/models/m\xe8"), files={mask: "0" * 64},
                        config=fs(b"/c\xe8"), device="cpu", dtype="float32")
        "".join(chunks(record).values()).encode("utf-8")  # each chunk is UTF-8 text: this raises otherwise
        path = tmp_path / f"r{suffix}"
        options, sidecar = save_options(record, path)
        Image.new("RGB", (8, 8)).save(path, **options)
        back = read_record(path)
        assert (back.name, back.model, back.config, back.files) == (name, record.model, record.config, record.files)
        assert back.scene["layers"][0]["mask"]["image"] == mask and back.scene["model"] == scene["model"]


@pytest.mark.slow
def test_file_names_that_are_not_utf8_work_everywhere(tmp_path, tiny_model):
    folder = Path(fs(bytes(tmp_path) + b"/d\xe8"))
    folder.mkdir()
    Image.new("L", (32, 32), 255).save(folder / fs(b"m\xe9.png"))
    # A YAML file is UTF-8 text: it names such a file with Python's escape for the byte.
    scene = write(folder / fs(b"sc\xe8ne.yaml"), SCENE.replace("a cat}", 'a cat, mask: "m\\uDCE9.png"}'))
    model = ["--model", str(tiny_model), "--device", "cpu"]

    checked = smd("validate", bytes(scene), cwd=tmp_path)
    clean(checked)
    assert checked.returncode == 0 and b"d\\xe8/sc\\xe8ne.yaml  32x32, 1 layer(s)" in checked.stdout

    made = smd("generate", bytes(scene), *model, "--out", b"o\xe7/{scene}-{seed}.png", cwd=tmp_path)
    clean(made)
    assert made.returncode == 0 and made.stdout == b"o\xe7/sc_ne-1.png\n"  # the real name, byte for byte
    Image.open(tmp_path / fs(b"o\xe7/sc_ne-1.png")).load()
    as_json = smd("generate", bytes(scene), *model, "--out", b"o\xe7/", "--json", cwd=tmp_path)
    clean(as_json)
    assert json.loads(as_json.stdout)["path"] == fs(b"o\xe7/sc_ne-1-1.png")  # the first name was taken

    again = smd("reproduce", b"o\xe7/sc_ne-1.png", "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 0 and "identical to o\\xe7/sc_ne-1.png" in clean(again)
    assert again.stdout == b"o\xe7/sc_ne-1-reproduced.png\n"
    shown = smd("show", b"o\xe7/sc_ne-1-reproduced.png", "--json", cwd=tmp_path)
    record = json.loads(shown.stdout)
    assert shown.returncode == 0 and record["name"] == fs(b"sc\xe8ne")
    assert {status["now"] for status in record["files"].values()} == {"matches"}
    assert sorted(os.listdir(tmp_path / fs(b"o\xe7"))) == [fs(b"sc_ne-1-1.png"), fs(b"sc_ne-1-reproduced.png"),
                                                           fs(b"sc_ne-1.png")]


# ---------------------------------------------------------------------------------------------
# A second Ctrl-C


class Worker:
    """`smd ARGS` running, its standard output and error read as they come."""

    def __init__(self, *args: str, cwd: Path, script: str | None = None):
        command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "smd_cli"]
        self.process = subprocess.Popen([*command, *args], cwd=cwd, env=environment(), preexec_fn=as_from_a_shell,
                                        stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                        for stream, into in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, into: bytearray) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            into.extend(chunk)

    def wait_for(self, condition, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, bytes(self.err)
            assert time.monotonic() < deadline, "the process never got there"
            time.sleep(0.005)

    def interrupt_until_it_ends(self, every: float) -> None:
        """Ctrl-C again and again, every `every` seconds, as someone who wants it to stop now."""
        while self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            time.sleep(every)

    def end(self) -> tuple[int, str]:
        code = self.process.wait(timeout=120)
        for reader in self.readers:
            reader.join(timeout=10)
        return code, bytes(self.err).decode("utf-8", "replace")


def outputs_whole(folder: Path) -> list[str]:
    """The names in `folder`, each an image that opens whole: no temporary file (`.NAME-XXXXXXXX.png`)
    and no half-written image."""
    names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert all(re.fullmatch(r"\d+\.png", name) for name in names), names
    for name in names:
        Image.open(folder / name).load()
    return names


@pytest.mark.parametrize("moment, every", [("loading", 0.005), ("denoising", 0.001), ("denoising", 0.02),
                                           ("cleanup", 0.005)])
def test_ctrl_c_again_while_the_first_is_handled_ends_at_once_and_cleanly(tiny_model, tmp_path, moment, every):
    """The first Ctrl-C comes while the model loads, while images are made, or is already being
    handled (its summary of 400 images comes next); more follow until smd ends, so that some
    land in every stage of its handling and of the process's exit, whatever the timing."""
    write(tmp_path / "s.yaml", SCENE)
    worker = Worker("generate", "s.yaml", "--model", str(tiny_model), "--device", "cpu", "--seeds", "1-400",
                    "--out", "o/{seed}.png", "--verbose", cwd=tmp_path)
    if moment == "loading":  # planned (`s: 32x32, 1 layer(s), 5 lcm steps`): the model loads next
        worker.wait_for(lambda: b" layer(s), " in worker.err)
    else:
        worker.wait_for(lambda: (tmp_path / "o").exists() and any((tmp_path / "o").glob("*.png")))
    if moment == "cleanup":
        worker.process.send_signal(signal.SIGINT)
        started = time.monotonic()
        while b"\ninterrupted" not in worker.err and worker.process.poll() is None and time.monotonic() < started + 60:
            time.sleep(0.001)
    worker.interrupt_until_it_ends(every)
    code, err = worker.end()
    assert code == 130 and "Traceback" not in err, err
    made = [f"o/{name}" for name in outputs_whole(tmp_path / "o")]
    printed = bytes(worker.out).decode().split()
    # Every image printed is there; one stopped at once may not have said its last one.
    assert set(printed) <= set(made), (printed, made)
    assert sorted(printed) == made or "stopped at once by SIGINT" in err, (printed, made)


# A second signal while a finished image is written: the first waits (SignalsHeld), the second
# ends smd at once, halfway through the file's bytes or just after it took its name.
WRITING = r"""
import io, os, signal, sys
from smd_cli.core import errors
from smd_cli.core import outputs

def twice():
    os.kill(os.getpid(), signal.SIGINT)
    while not errors._received:  # the first is held: the image goes on being written
        pass
    os.kill(os.getpid(), signal.SIGINT)

if sys.argv[1] == "halfway":
    write_atomic = outputs.write_atomic
    def halfway(path, write, *args, **kwargs):
        def half(fh):
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            fh.write(data[: len(data) // 2])
            fh.flush()
            twice()
            fh.write(data[len(data) // 2:])
        return write_atomic(path, half, *args, **kwargs)
    outputs.write_atomic = halfway
else:
    claim = outputs._claim
    def named(*args):
        taken = claim(*args)
        twice()
        return taken
    outputs._claim = named

from smd_cli.app.cli import main
sys.argv = ["smd", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("moment, left", [("halfway", []), ("named", ["1.png"])])
def test_a_second_ctrl_c_while_an_image_is_written_leaves_it_whole_or_not_at_all(tiny_model, tmp_path, moment, left):
    write(tmp_path / "s.yaml", SCENE)
    worker = Worker(moment, "generate", "s.yaml", "--model", str(tiny_model), "--device", "cpu", "--seeds", "1-3",
                    "--out", "o/{seed}.png", cwd=tmp_path, script=WRITING)
    code, err = worker.end()
    assert code == 130 and "Traceback" not in err and "stopped at once by SIGINT" in err, err
    assert outputs_whole(tmp_path / "o") == left


def test_a_signal_set_to_be_ignored_stays_ignored(tiny_model, tmp_path):
    write(tmp_path / "s.yaml", SCENE)
    folder = tmp_path / "o"
    worker = Worker("generate", "s.yaml", "--model", str(tiny_model), "--device", "cpu", "--seeds", "1-400",
                    "--out", "o/{seed}.png", cwd=tmp_path,
                    script="import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); sys.argv[0] = 'smd'; "
                           "from smd_cli.app.cli import main; main()")
    worker.wait_for(lambda: folder.exists() and any(folder.glob("*.png")))
    worker.process.send_signal(signal.SIGHUP)  # as under nohup, with the terminal closed
    made = len(list(folder.glob("*.png")))
    worker.wait_for(lambda: len(list(folder.glob("*.png"))) > made + 1)  # it goes on
    worker.process.send_signal(signal.SIGTERM)
    code, err = worker.end()
    assert code == 143 and "interrupted by SIGTERM" in err and "Traceback" not in err, err
    outputs_whole(folder)
