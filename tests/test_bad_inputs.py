"""The corpus of broken scenes and arguments: each one, run through the real command line, gives
the expected message fragment and exit code, as one clean line without a traceback."""

from __future__ import annotations

import io
import os
import socket
import struct
import zlib

import pytest
from PIL import Image

LAYER = "layers:\n  - {prompt: a cat}\n"
SMALL = "width: 32\nheight: 32\n"


def png(size=(32, 32), color=(255, 255, 255), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_scene(mask: str, extra: str = SMALL) -> str:
    return f"{extra}layers:\n  - prompt: a\n    mask: {mask}\n"


def fifo(path):
    os.mkfifo(path)


def dev_zero(path):
    path.symlink_to("/dev/zero")


def huge(path):
    with open(path, "wb") as fh:
        fh.truncate(600 * 1024**2)  # sparse: nothing on disk


def decompression_bomb(path):
    data = bytearray(png((1, 1), 0, mode="L"))
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


BOMB = ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n")

# (id, command, scene text or None, other files, arguments, message fragment, exit code).
# In arguments, {dir} is the case's folder and {scene} its scene file.
CORPUS = [
    ("malformed yaml", "generate", "layers: [\n", {}, [], "s.yaml:2: not valid YAML", 2),
    ("tab indentation", "generate", "layers:\n\t- prompt: a\n", {}, [], "found character '\\t'", 2),
    ("alias bomb", "generate", BOMB + LAYER, {}, [], "expands to more than 100000 values", 2),
    ("python tag", "generate", "seed: !!python/object:os.system ls\n" + LAYER, {}, [], "not valid YAML", 2),
    ("not a mapping", "generate", "- a\n- b\n", {}, [], "a scene is a mapping", 2),
    ("empty file", "generate", "", {}, [], "the scene file is empty", 2),
    ("not utf-8", "generate", b"\xff\xfe\x00", {}, [], "cannot read the scene file", 2),
    ("scene missing", "generate", None, {}, ["{dir}/nope.yaml"], "nope.yaml: scene file not found", 2),
    ("unknown key", "generate", "seeed: 3\n" + LAYER, {}, [], "s.yaml:1: seeed: unknown key 'seeed'; did you "
                                                              "mean 'seed'?", 2),
    ("steps not a number", "generate", "steps: five\n" + LAYER, {}, [], "steps: input should be a valid integer", 2),
    ("layers not a list", "generate", "layers: 3\n", {}, [], "layers: input should be a valid list, got 3", 2),
    ("prompt a list", "generate", "layers:\n  - prompt: [a, b]\n", {}, [], "layers[0].prompt: input should be "
                                                                          "a valid string", 2),
    ("nan guidance", "generate", "guidance_scale: .nan\n" + LAYER, {}, [], "must be a finite number", 2),
    ("inf blur", "generate", "layers:\n  - {prompt: a, mask_std: .inf}\n", {}, [], "must be a finite number", 2),
    ("negative blur", "generate", "layers:\n  - {prompt: a, mask_std: -2}\n", {}, [],
     "layers[0].mask_std: input should be greater than or equal to 0, got -2", 2),
    ("negative seed", "generate", "seed: -1\n" + LAYER, {}, [], "seed: input should be greater than or equal to 0", 2),
    ("empty layer list", "generate", "layers: []\n", {}, [], "layers: list should have at least 1 item", 2),
    ("layer without prompt", "generate", "layers:\n  - {name: x}\n", {}, [],
     "layers[0].prompt: this key is required", 2),
    ("canvas too wide", "generate", "width: 100000\n" + LAYER, {}, [], "less than or equal to 16384", 2),
    ("reversed rect", "generate", mask_scene("{rect: [5, 5, 1, 1]}"), {}, [], "needs x0 < x1 and y0 < y1", 2),
    ("timesteps rising", "generate", "timesteps: [500, 900]\n" + LAYER, {}, [], "strictly decreasing", 2),
    ("duplicate key", "generate", "seed: 1\nseed: 2\n" + LAYER, {}, [], "s.yaml:2: seed: key 'seed' appears twice", 2),
    ("duplicate layer names", "generate", "layers:\n  - {name: x, prompt: a}\n  - {name: x, prompt: b}\n", {}, [],
     "duplicate layer name 'x'", 2),
    ("missing mask", "generate", mask_scene("m.png"), {}, [], "layers[0].mask: mask file not found", 2),
    ("mask not an image", "generate", mask_scene("m.png"), {"m.png": b"GIF89a but not really"}, [],
     "cannot read mask image", 2),
    ("truncated mask", "generate", mask_scene("m.png"), {"m.png": png()[:60]}, [], "cannot read mask image", 2),
    ("mask of the wrong size", "generate", mask_scene("m.png"), {"m.png": png((64, 16))}, [],
     "mask image is 64x16 but the canvas is 32x32: the aspect ratios differ", 2),
    ("palette colour absent", "generate", mask_scene('{palette: p.png, color: "#00ff00"}'),
     {"p.png": png(color=(255, 0, 0))}, [],
     "colour #00ff00 matches no pixel of p.png (none within 32 of it); its main colours are #ff0000", 2),
    ("malformed mask hash", "generate", mask_scene("{image: m.png, sha256: abc}"), {"m.png": png()}, [],
     "layers[0].mask.sha256: string should match pattern", 2),
    ("all masks empty", "generate", mask_scene("m.png"), {"m.png": png(color=(0, 0, 0))}, [],
     "every layer's mask is empty", 2),
    ("canvas off the model's grid", "generate", "width: 33\nheight: 32\n" + LAYER, {}, [],
     "canvas 33x32 is not divisible by the model's downscale factor 2", 2),
    ("canvas too large for the device", "generate", "width: 8192\nheight: 8192\n" + LAYER, {}, [],
     "a 8192x8192 canvas needs about", 2),
    ("prompt weights that do not parse", "generate", SMALL + "layers:\n  - {prompt: '(cat:1.2 on a mat'}\n", {},
     ["--out", "{dir}/x.png"], "prompt weights do not parse: '(' at character 1 is never closed", 2),
    ("template field in the scene", "generate", "output: '{scene}-{sed}.png'\n" + LAYER, {}, [],
     "output: unknown field {sed} in output template", 2),
    ("template field on the command line", "generate", LAYER, {}, ["--out", "{dir}/{scene}-{nope}.png"],
     "unknown field {nope} in output template", 2),
    ("no image extension", "generate", LAYER, {}, ["--out", "{dir}/x.txt"], "needs an image extension", 2),
    ("unwritable output folder", "generate", SMALL + LAYER, {}, ["--out", "/proc/smd/x.png"],
     "cannot write /proc/smd/x.png: folder /proc is not writable", 2),
    ("output below a file", "generate", SMALL + LAYER, {"f": b"x"}, ["--out", "{dir}/f/x.png"],
     "is a file, not a folder", 2),
    ("one file for several scenes", "generate", SMALL + LAYER, {"t.yaml": SMALL + LAYER},
     ["{dir}/t.yaml", "--out", "{dir}/x.png"], "names one file for 2 scenes", 2),
    ("missing model folder", "generate", LAYER, {}, ["--model", "{dir}/models/none"],
     "model folder or file not found", 2),
    ("uncached hub model offline", "generate", SMALL + LAYER, {}, ["--model", "nobody-has/this-model-xyz"],
     "is not in the Hugging Face cache", 2),
    ("too many lcm steps", "generate", SMALL + LAYER, {}, ["--steps", "60"], "lcm takes at most 50 steps", 2),
    ("bad --set", "generate", LAYER, {}, ["--set", "noequals"], "--set expects key.path=value", 2),
    ("--set past the layers", "generate", LAYER, {}, ["--set", "layers[3].prompt=x"], "there is no layers[3]", 2),
    ("bad --seeds", "generate", LAYER, {}, ["--seeds", "5-1"], "--seeds range 5-1 runs backwards", 2),
    ("--seed with --repeat", "generate", LAYER, {}, ["--seed", "1", "--repeat", "2"], "not several of them", 2),
    ("unknown dtype", "generate", SMALL + LAYER, {}, ["--dtype", "float8"], "unknown dtype 'float8'", 2),
    ("absent gpu", "generate", SMALL + LAYER, {}, ["--device", "cuda:7"], "sees no CUDA GPU", 2),
    ("inpaint without a picture", "inpaint", SMALL + LAYER, {}, [], "inpainting needs a picture", 2),
    ("inpaint picture missing", "inpaint", SMALL + LAYER, {}, ["--image", "{dir}/photo.jpg"],
     "--image", 2),
    ("truncated inpainting picture", "inpaint", SMALL + LAYER, {"p.png": png()[:60]}, ["--image", "{dir}/p.png"],
     "background.image: cannot read background image", 2),
    ("panorama of several layers", "panorama", "layers:\n  - {prompt: a}\n  - {prompt: b}\n", {}, [],
     "a panorama scene has one layer, this one has 2", 2),
    ("stream guidance", "stream", SMALL + LAYER, {}, ["--cfg", "most"], "--cfg must be one of", 2),
    # Files that are not what they claim, wherever a scene names them.
    ("scene that is a FIFO", "validate", None, {"f.yaml": fifo}, ["{dir}/f.yaml"], "a FIFO (named pipe)", 2),
    ("scene of 600 MiB", "validate", None, {"h.yaml": huge}, ["{dir}/h.yaml"], "600.0 MiB, more than the", 2),
    ("mask from /dev/zero", "generate", mask_scene("z.png"), {"z.png": dev_zero}, [], "a character device", 2),
    ("mask that is a FIFO", "generate", mask_scene("f.png"), {"f.png": fifo}, [], "a FIFO (named pipe)", 2),
    ("decompression bomb mask", "generate", mask_scene("b.png"), {"b.png": decompression_bomb}, [],
     "100000x100000 pixels, more than the", 2),
    ("bomb sizing the canvas", "generate", "layers:\n  - {prompt: a, mask: b.png}\n", {"b.png": decompression_bomb},
     [], "(a decompression bomb?)", 2),
    ("picture from /dev/zero", "inpaint", SMALL + LAYER, {"z.png": dev_zero}, ["--image", "{dir}/z.png"],
     "a character device", 2),
    ("record that is a bomb", "show", None, {"r.png": decompression_bomb}, ["{dir}/r.png"], "decompression bomb", 2),
    ("record from /dev/zero", "reproduce", None, {"r.png": dev_zero}, ["{dir}/r.png"], "a character device", 2),
    ("canvas from a thin mask", "generate", "width: 16384\n" + mask_scene("t.png", ""), {"t.png": png((8, 2000))},
     [], "makes the canvas 16384x4096000", 2),
    # Documents deeper than any scene, or referring to themselves.
    ("deep lists", "generate", "x: " + "[" * 5000 + "]" * 5000 + "\n" + LAYER, {}, [], "nests more than 64 levels", 2),
    ("self-referring alias", "generate", "x: &a [*a]\n" + LAYER, {}, [], "refers to a list or mapping", 2),
    ("deep --set value", "generate", LAYER, {}, ["--set", "background.prompt=" + "[" * 3000 + "]" * 3000],
     "--set background.prompt: the value nests more than 64", 2),
    ("unclosed quote", "generate", 'seed: 1\nlayers:\n  - prompt: "a cat\n', {}, [],
     "s.yaml:3: not valid YAML: found unexpected end of stream at line 4, in a quoted string that starts here", 2),
    # Names the file system cannot take, and work that would fail only after it was done.
    ("output name too long", "generate", SMALL + LAYER, {}, ["--out", "{dir}/" + "x" * 300 + ".png"],
     "more than the 255 a file name may have", 2),
    ("timesteps past the model", "generate", SMALL + "timesteps: [2000, 10]\n" + LAYER, {}, ["--dry-run"],
     "timesteps must lie in [0, 999] for this model", 2),
    ("missing LCM LoRA", "generate", SMALL + LAYER, {}, ["--lcm-lora", "{dir}/lora", "--dry-run"],
     "LCM LoRA file or folder not found", 2),
    ("mistyped palette colour", "generate", mask_scene('{palette: p.png, color: "#ff0000"}'),
     {"p.png": png(color=(255, 0, 0))}, ["--set", "layers[0].mask.color=#00fe00"],
     "colour #00fe00 matches no pixel of p.png", 2),
    ("busy preview port", "stream", SMALL + LAYER, {}, ["--preview", "127.0.0.1:{busy}"], "the port is in use", 2),
    ("unknown preview host", "stream", SMALL + LAYER, {}, ["--preview", "nohost.invalid:0"], "unknown host", 2),
    ("reproduce onto itself", "reproduce", None, {}, ["{made}", "--out", "{made}"], "is the image being reproduced", 2),
    ("stream output kind", "stream", SMALL + LAYER, {}, ["--out", "{dir}/x.avi"],
     "give a folder, a .gif or an .mp4", 2),
]


def test_corpus_size():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("name, command, scene, files, args, fragment, code", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input(run_cli, tiny_model, tmp_path, monkeypatch, name, command, scene, files, args, fragment, code):
    from smd_cli.engine import memory

    # The same answer on every machine: this device has 4 GiB free.
    monkeypatch.setattr(memory, "available_memory", lambda device: 4 * 1024**3)
    for file, content in files.items():
        if callable(content):
            content(tmp_path / file)
        else:
            (tmp_path / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    scene_path = tmp_path / "s.yaml"
    if scene is not None:
        scene_path.write_bytes(scene if isinstance(scene, bytes) else scene.encode())
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    made = tmp_path / "made.png"
    if any("{made}" in a for a in args):  # an image of smd's own
        Image.new("RGB", (8, 8)).save(made, pnginfo=_record(tiny_model))
    filled = [a.replace("{dir}", str(tmp_path)).replace("{busy}", str(busy.getsockname()[1]))
              .replace("{made}", str(made)) for a in args]
    positional = [] if scene is None and command != "panorama" else [scene_path]
    if command not in ("show", "validate"):  # the commands that load a model get the tiny one
        filled += [] if "--model" in filled else ["--model", str(tiny_model)]
        filled += [] if "--device" in filled else ["--device", "cpu"]
    result = run_cli(command, *positional, *filled)
    busy.close()
    _check(result, tmp_path, fragment, code)


def _check(result, tmp_path, fragment: str, code: int) -> None:
    output = result.stderr
    assert "Traceback" not in output
    assert result.exit_code == code, output
    assert fragment in output, output
    if code == 2:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output
        assert not list(tmp_path.rglob("x.png"))  # nothing was written


def _record(model):
    """The text chunks of an image smd made from a one-layer scene with `model`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("smd-scene", f"model: {model}\nwidth: 32\nheight: 32\nseed: 1\nlcm_lora: none\n" + LAYER)
    info.add_itxt("smd-seed", "1")
    return info
