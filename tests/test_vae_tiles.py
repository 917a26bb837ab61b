"""Large pictures (docs/large-pictures.md): the VAE decoding and encoding in tiles gives the one-pass
result up to float rounding, in memory that grows with the tile rather than the picture; canvases
that wrap on both axes (`circular: both`) have no seam in pixels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smd_cli.method.views import layout, tiling, vae_tiles_setting, wrap_axes

TESTS = Path(__file__).resolve().parent
# Measured max abs error of tiled against one-pass, float32 (pixels in [-1, 1], range 2): 1e-6..1e-5
# on every VAE below; the bound is 1e-3 of the output's range.
BOUND = 1e-3


def within_bound(tiled: torch.Tensor, whole: torch.Tensor) -> float:
    error = float((tiled - whole).abs().max())
    assert error < BOUND * float(whole.max() - whole.min()), error
    return error


@pytest.fixture(scope="module")
def sdxl_f8(tmp_path_factory):
    """SDXL with a VAE that downscales by 8, as SD's does."""
    from tinymodel import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-f8"), vae_blocks=4)


@pytest.mark.parametrize("model", ["tiny_model", "sdxl_f8", "tiny_sd3", "tiny_flux"])
def test_tiled_vae_equals_one_pass(model, request):
    """Every family's decode and encode (scale and shift included) in 64-pixel tiles, on a canvas
    that is no multiple of the tile."""
    from smd_cli import StableMultiDiffusionPipeline

    pipe = StableMultiDiffusionPipeline("cpu", hf_key=str(request.getfixturevalue(model)))
    f = pipe.vae_scale_factor
    width, height = 136, 200  # multiples of every model's grid here (SD3's and FLUX's patches too)
    latents = torch.randn(1, pipe.family.channels, height // f, width // f, generator=torch.Generator().manual_seed(1))
    whole = pipe.decode(latents, vae_tiles="off")
    within_bound(pipe.decode(latents, vae_tiles=64), whole)  # 2e-6..6e-6 measured
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    within_bound(pipe.encode_image(picture, 64), pipe.encode_image(picture, "off"))  # 1e-6 measured


def test_sixteen_channel_and_tiny_autoencoders_tile_exactly(tmp_path):
    """SD3's and FLUX.1's shape (16 latent channels, no quant convs, factor 8) and AutoencoderTiny."""
    from diffusers import AutoencoderTiny
    from tinymodel import build_tiny_taesd, tiny_vae

    from smd_cli.models.vae_tiles import tiled_decode, tiled_encode

    torch.manual_seed(0)
    flux = tiny_vae(4, 16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                    shift_factor=0.1159).eval()
    taesd = AutoencoderTiny.from_pretrained(build_tiny_taesd(tmp_path / "taesd", blocks=4)).eval()
    pixels = torch.rand(1, 3, 200, 136) * 2 - 1
    with torch.no_grad():
        z = torch.randn(1, 16, 25, 17)
        within_bound(tiled_decode(flux, z, 64), flux.decode(z).sample)  # 3e-6 measured
        within_bound(tiled_encode(flux, pixels, 64), flux.encode(pixels).latent_dist.mode())  # 2e-6 measured
        z = torch.randn(1, 4, 25, 17)
        within_bound(tiled_decode(taesd, z, 64), taesd.decode(z).sample)  # 1e-7 measured
        within_bound(tiled_encode(taesd, pixels, 64), taesd.encode(pixels).latents)  # 4e-9 measured


def test_the_mid_block_attention_in_chunks_is_the_attention(monkeypatch):
    from tinymodel import tiny_vae

    from smd_cli.models import vae_tiles

    torch.manual_seed(0)
    attn = tiny_vae(2).eval().decoder.mid_block.attentions[0]
    monkeypatch.setattr(vae_tiles, "ATTENTION_ELEMENTS", 200)  # 200 // 63 = 3 queries a chunk
    x = torch.randn(1, 16, 7, 9)
    with torch.no_grad():
        whole = attn(x)
        assert torch.allclose(vae_tiles.attend(attn, x, chunked=True), whole, atol=1e-5)
        assert torch.allclose(vae_tiles.attend(attn, x), whole, atol=1e-5)


def _full_resolution_work(vae, decode) -> int:
    """The output pixels the decoder's last convolution computes while `decode()` runs."""
    done = []
    hook = vae.decoder.conv_out.register_forward_hook(lambda m, i, out: done.append(out.shape[-2] * out.shape[-1]))
    try:
        with torch.no_grad():
            decode()
    finally:
        hook.remove()
    return sum(done)


def test_tiled_decode_computes_each_layer_once():
    """No tile is run again for a later norm: the last convolution computes the picture's pixels
    and the halos' (a few pixels a side), not several pictures' worth."""
    from tinymodel import tiny_vae

    from smd_cli.models.vae_tiles import tiled_decode

    torch.manual_seed(0)
    vae = tiny_vae(4).eval()
    z = torch.randn(1, 4, 32, 40)
    whole = _full_resolution_work(vae, lambda: vae.decode(z))
    tiled = _full_resolution_work(vae, lambda: tiled_decode(vae, z, 64))
    assert whole == 256 * 320
    assert whole <= tiled < 1.25 * whole, tiled / whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_in_memory_or_in_files_the_pixels_are_the_same(dtype, tmp_path, monkeypatch):
    """Between stages the picture is kept in host memory (beside a GPU) or in files (beside a CPU):
    the same bits either way, bfloat16 included, and the files are gone afterwards."""
    import tempfile

    from tinymodel import tiny_vae

    from smd_cli.models.vae_tiles import tiled_decode, tiled_encode

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch.manual_seed(0)
    vae = tiny_vae(4).eval().to(dtype)
    z = torch.randn(1, 4, 25, 17, dtype=dtype)
    pixels = torch.rand(1, 3, 200, 136, dtype=dtype) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tiled_decode(vae, z, 64, keep="files"), tiled_decode(vae, z, 64, keep="memory"))
        assert torch.equal(tiled_encode(vae, pixels, 64, keep="files"), tiled_encode(vae, pixels, 64, keep="memory"))
        if dtype == torch.float32:
            within_bound(tiled_decode(vae, z, 64, keep="files"), vae.decode(z).sample)
    assert list(tmp_path.glob("smd-*")) == []  # torch may keep its own caches there


def test_an_interrupted_tiled_decode_leaves_no_files(tmp_path, monkeypatch):
    import tempfile

    from tinymodel import tiny_vae

    from smd_cli.models.vae_tiles import tiled_decode

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    torch.manual_seed(0)
    vae = tiny_vae(4).eval()
    calls = []

    def interrupt(module, args, out):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    vae.decoder.conv_out.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        tiled_decode(vae, torch.randn(1, 4, 32, 40), 64, keep="files")
    assert list(tmp_path.glob("smd-*")) == []  # torch may keep its own caches there


def test_a_full_disk_is_said_plainly(tmp_path, monkeypatch):
    import errno
    import tempfile

    from tinymodel import tiny_vae

    from smd_cli.core.errors import SmdError
    from smd_cli.models import vae_tiles

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(vae_tiles.Files, "write", full)
    torch.manual_seed(0)
    with pytest.raises(SmdError, match=f"ran out of disk space in {tmp_path}.*set TMPDIR"), torch.no_grad():
        vae_tiles.tiled_decode(tiny_vae(4).eval(), torch.randn(1, 4, 32, 40), 64, keep="files")
    assert list(tmp_path.glob("smd-*")) == []  # torch may keep its own caches there


PEAK = """
import json, resource, sys, torch
sys.path.insert(0, {tests!r})
from tinymodel import tiny_vae
import smd_cli.models.vae_tiles as vt
torch.set_num_threads(1)
vt.ATTENTION_ELEMENTS = 1 << 16  # the attention's chunk, fixed as the tile is: small beside these pictures
tile, side = {tile}, {side}
torch.manual_seed(0)
vae = tiny_vae(4).eval()
z = torch.randn(1, 4, side // 8, side // 8)
with torch.no_grad():
    y = vt.tiled_decode(vae, z, tile) if tile else vae.decode(z).sample
# VmHWM: this process's own peak; ru_maxrss after a fork keeps the parent's (pytest's, models loaded).
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps(int(status["VmHWM"].split()[0]) if "VmHWM" in status
                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def peak_rss(tile: int, side: int) -> int:
    """The peak resident memory (KiB) of a process that decodes a side x side picture."""
    # Large blocks straight from the system and back, so that the peak is what was live at once.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", PEAK.format(tests=str(TESTS), tile=tile, side=side)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads a process's peak memory from /proc")
def test_decoding_memory_grows_with_the_tile_not_the_picture():
    """Four times the pixels: one pass grows by about 30 MiB (the full-resolution activations),
    128-pixel tiles by about 4 MiB (the picture itself and the latent's resolution) on Linux x86."""
    one_pass = peak_rss(0, 512) - peak_rss(0, 256)
    tiled = peak_rss(128, 512) - peak_rss(128, 256)
    print(f"peak RSS growth 256 -> 512 pixels: one pass {one_pass} KiB, tiled {tiled} KiB")
    assert one_pass > 15_000
    assert tiled < one_pass / 2


def test_views_wrap_on_both_axes():
    views = layout(48, 64, (32, 32), (24, 24), circular="both")
    total = torch.zeros(1, 1, 48, 64)
    for v in views:
        v.add_into(total, v.weight.expand(1, 1, -1, -1))
    assert torch.allclose(total, torch.ones_like(total))  # a partition of unity around the torus
    assert any(not isinstance(v.rows, slice) for v in views) and any(not isinstance(v.cols, slice) for v in views)
    assert wrap_axes(True) == (False, True) and wrap_axes("y") == (True, False) and wrap_axes(False) == (False, False)
    grid = pytest.importorskip("smd_cli.families").default_grid()
    assert tiling(grid, 512, 384, tile_size=256, circular="both").count == len(
        layout(48, 64, (32, 32), (24, 24), circular="both"))


def _steps(image: np.ndarray, axis: int) -> tuple[float, float]:
    """The mean step across the wrapped seam of `axis` (last against first), and the largest mean
    step between neighbouring lines inside."""
    img = np.moveaxis(image.astype(np.float64), axis, 0)
    inside = np.abs(img[1:] - img[:-1]).mean(axis=(1, 2))
    return float(np.abs(img[0] - img[-1]).mean()), float(inside.max())


@pytest.mark.parametrize("vae_tiles", ["off", 64])
def test_circular_both_has_no_seam_on_either_axis(pipe, vae_tiles):
    """A seamless texture: the top joins the bottom and the left the right as smoothly as any two
    neighbouring rows or columns, decoded in one pass or in tiles."""
    image = np.asarray(pipe("a photo of the sun", height=128, width=128, tile_size=64, circular="both",
                            generator=torch.Generator().manual_seed(4), vae_tiles=vae_tiles))
    for axis in (0, 1):
        seam, inside = _steps(image, axis)
        assert seam <= inside, (axis, seam, inside)


def test_vae_tiles_setting():
    assert vae_tiles_setting(None) is None and vae_tiles_setting("auto") is None
    assert vae_tiles_setting(False) == "off" and vae_tiles_setting("512") == 512
    for bad in (3, 36, "abc", True, 10**6):
        with pytest.raises(Exception, match="multiple of 8"):
            vae_tiles_setting(bad)


def test_tiled_decode_memory_estimate_is_set_by_the_tile():
    from smd_cli.engine.memory import auto_vae_tile, decode_bytes

    sd = {"block_out_channels": [128, 256, 512, 512]}
    whole = decode_bytes(8192, 8192, sd, 2, 8)
    tiled = decode_bytes(8192, 8192, sd, 2, 8, 512)
    assert tiled < whole / 10 and decode_bytes(8192, 8192, sd, 2, 8, 1024) > tiled
    assert auto_vae_tile(None, 1024, 1024, sd, 4, 8) is None  # free memory unknown: by pixels
    assert auto_vae_tile(None, 4096, 4096, sd, 4, 8) == 1024
    assert auto_vae_tile(80 * 1024**3, 1024, 1024, sd, 2, 8) is None  # a GPU or a CPU's RAM: by free memory
    assert auto_vae_tile(64 * 1024**3, 2048, 2048, sd, 4, 8) is None  # one pass while it fits, up to the pixel count
    assert auto_vae_tile(512 * 1024**3, 4096, 2048, sd, 2, 8) == 1024  # past it, tiles: they cost little more
    assert auto_vae_tile(2 * 1024**3, 8192, 8192, sd, 2, 8) is not None


def test_cli_vae_tiles_gives_the_same_picture(run_cli, tiny_model, tmp_path):
    common = ("generate", "--prompt", "a photo of the sun", "--width", "96", "--height", "80", "--model", tiny_model,
              "--device", "cpu", "--seed", "1", "--steps", "2")
    for name, setting in (("tiled", "64"), ("whole", "off")):
        result = run_cli(*common, "--vae-tiles", setting, "--out", tmp_path / f"{name}.png")
        assert result.exit_code == 0, result.stderr
    tiled, whole = (np.asarray(Image.open(tmp_path / f"{n}.png"), np.int16) for n in ("tiled", "whole"))
    assert np.abs(tiled - whole).max() <= 1  # float rounding can move a pixel across a rounding edge


@pytest.mark.parametrize("value", ["3", "abc"])
def test_cli_refuses_bad_vae_tiles(run_cli, tiny_model, value):
    result = run_cli("generate", "--prompt", "a", "--model", tiny_model, "--device", "cpu", "--vae-tiles", value,
                     "--dry-run")
    assert result.exit_code == 2
    assert "--vae-tiles must be a tile size in pixels (a multiple of 8" in result.stderr
    assert "off or auto" in result.stderr


def test_scene_refuses_bad_circular_and_vae_tiles(run_cli, tmp_path):
    for key, value, fix in (("circular", "z", "must be x (left and right join"),
                            ("vae_tiles", "3", "must be a tile size in pixels")):
        scene = tmp_path / f"{key}.yaml"
        scene.write_text(f"{key}: {value}\nlayers: [{{prompt: a}}]\n")
        result = run_cli("validate", scene)
        assert result.exit_code == 2 and key in result.stderr and fix in result.stderr, result.stderr
