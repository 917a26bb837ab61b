"""Fast paths: region cropping, channels-last, torch.compile and decoding beside the UNet in a
stream. Each is off by default (but channels-last memory for the VAE on a CPU) and must keep
results equal (or, for cropping, close)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import assert_near, write
from PIL import Image

from smd_cli.method.sampler import RegionCrop
from smd_cli.method.views import View, layout


def test_crop_window_holds_the_mask_with_its_margin_on_the_grid():
    view = layout(64, 96, (32, 32), (16, 16))[1]  # rows 0:32, cols 16:48
    mask = torch.zeros(64, 96)
    mask[10:14, 30:33] = 1  # inside the view at rows 10:14, cols 14:17
    window = RegionCrop(margin=3, granularity=4).window(view, mask)
    rows, cols = window.rows, window.cols
    assert (rows.stop - rows.start) % 4 == 0 and (cols.stop - cols.start) % 4 == 0
    assert rows.start <= 10 - 3 and rows.stop >= 14 + 3 and cols.start <= 30 - 3 and cols.stop >= 33 + 3
    assert 0 <= rows.start and rows.stop <= 32 and 16 <= cols.start and cols.stop <= 48
    np.testing.assert_array_equal(window.weight, view.weight[..., rows.start:rows.stop, cols.start - 16:cols.stop - 16])
    big = torch.zeros(64, 96)
    big[2:30, 18:46] = 1  # most of the view: cropping would not pay
    assert RegionCrop(margin=3, granularity=4).window(view, big) is view
    wrapped = View(slice(0, 8), torch.tensor([6, 7, 0, 1, 2, 3, 4, 5]))
    edge = torch.zeros(8, 8)
    edge[0:2, 0] = 1  # column 0 is position 2 of the wrapped view
    sub = RegionCrop(margin=0, granularity=2, max_share=0.9).window(wrapped, edge)
    assert sub.cols.tolist() == [0, 1] and sub.rows == slice(0, 2)


def _small_regions(height=64, width=192):
    masks = np.zeros((3, height, width), np.float32)
    masks[0, 4:20, 8:40] = 1
    masks[1, 40:60, 140:180] = 1
    masks[2, 24:40, 80:100] = 1
    return masks


def test_region_crop_denoises_less_and_stays_close(pipe):
    shapes = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    kwargs = dict(masks=_small_regions(), height=64, width=192, tile_size=64, output_type="np",
                  background_prompt="sky", bootstrap_steps=0)
    try:
        full = pipe(["a", "b", "c"], generator=torch.Generator().manual_seed(0), **kwargs)
        full_shapes, shapes[:] = list(shapes), []
        cropped = pipe(["a", "b", "c"], generator=torch.Generator().manual_seed(0), region_crop=True, **kwargs)
    finally:
        hook.remove()
    assert set(full_shapes) == {(32, 32)}
    assert any(h * w < 32 * 32 for h, w in shapes)  # some layers were evaluated on a crop only
    diff = np.abs(cropped - full)
    assert diff.mean() < 1e-3 and diff.max() < 0.05, (diff.mean(), diff.max())


def test_region_crop_changes_nothing_where_masks_fill_their_views(pipe):
    masks = np.ones((2, 64, 64), np.float32)
    masks[1, :, :32] = 0
    kwargs = dict(masks=masks, height=64, width=64, output_type="np")
    full = pipe(["a", "b"], generator=torch.Generator().manual_seed(1), **kwargs)
    cropped = pipe(["a", "b"], generator=torch.Generator().manual_seed(1), region_crop=True, **kwargs)
    np.testing.assert_array_equal(cropped, full)


def test_region_crop_from_the_command_line_is_recorded(run_cli, tiny_model, tmp_path):
    import yaml

    scene = write(tmp_path / "s.yaml", "seed: 1\nwidth: 192\nheight: 64\ntile_size: 64\nlayers:\n"
                  "  - {prompt: a, mask: {rect: [8, 4, 40, 20]}}\n  - {prompt: b, mask: {rect: [140, 40, 180, 60]}}\n")
    out = tmp_path / "c.png"
    result = run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--region-crop", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert yaml.safe_load(Image.open(out).text["smd-scene"])["region_crop"] is True
    again = run_cli("reproduce", out)
    assert again.exit_code == 0 and "identical to" in again.stderr


def test_channels_last_gives_the_same_image(tiny_model):
    from smd_cli import StableMultiDiffusionPipeline

    plain = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model))
    fast = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model)).optimize(channels_last=True)
    kwargs = dict(masks=_small_regions(64, 64), height=64, width=64, output_type="np")
    a = plain(["a", "b", "c"], generator=torch.Generator().manual_seed(2), **kwargs)
    b = fast(["a", "b", "c"], generator=torch.Generator().manual_seed(2), **kwargs)
    assert_near(b, a)  # other convolution kernels: the same sums in another order


def test_the_vae_is_channels_last_on_a_cpu_and_decodes_as_contiguous_memory_does(pipe, reference_pipe):
    """On a CPU every pipeline keeps its autoencoder in channels-last memory (it decodes faster
    there: see benchmarks/decode.py), whether it loaded the model or wrapped a diffusers pipeline;
    the UNet only with the option. The pixels are those of contiguous memory up to float rounding."""
    from smd_cli import StableMultiDiffusionPipeline

    def channels_last(module) -> bool:
        convs = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
        return all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)

    wrapped = StableMultiDiffusionPipeline.from_pipe(reference_pipe, device="cpu")
    assert channels_last(pipe.vae) and channels_last(wrapped.vae)
    assert not channels_last(pipe.unet)
    latent = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    fast = pipe.decode(latent)
    pipe.vae.to(memory_format=torch.contiguous_format)
    try:
        plain = pipe.decode(latent)
    finally:
        pipe.vae.to(memory_format=torch.channels_last)
    assert fast.shape == plain.shape == (1, 3, 32, 48)
    assert_near(fast, plain)


def test_compiled_unet_traces_one_graph_per_batch_shape(tiny_model):
    """The compile path on the CPU, with dynamo's eager backend (inductor's CPU build takes minutes):
    t reaches the UNet as a tensor, so one graph serves every timestep, and batches are padded to
    powers of two, so three pairs run as a batch of four."""
    from torch._dynamo.utils import counters

    from smd_cli import StableMultiDiffusionPipeline

    def batch_sizes(unet, run) -> set[int]:
        sizes = []
        hook = unet.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
        try:
            run()
        finally:
            hook.remove()
        return set(sizes)

    pipe = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_model))
    masks = np.zeros((3, 64, 64), np.float32)
    masks[0, :32, :32], masks[1, :32, 32:], masks[2, 32:, :32] = 1, 1, 1  # the last quarter is background
    kwargs = dict(masks=masks, height=64, width=64, output_type="np", max_batch=8, background_prompt="sky")
    late = dict(kwargs, mask_strengths=[1.0, 1.0, 0.9])  # the third layer joins in the last steps only
    expected = pipe(["a", "b", "c"], generator=torch.Generator().manual_seed(0), **kwargs)
    assert batch_sizes(pipe.unet, lambda: pipe(["a", "b", "c"], **late)) == {3, 4}

    torch._dynamo.reset()
    counters.clear()
    pipe.optimize(compile=True, backend="eager")
    images = []
    sizes = batch_sizes(pipe.unet._orig_mod, lambda: images.append(
        pipe(["a", "b", "c"], generator=torch.Generator().manual_seed(0), **kwargs)))
    assert_near(images[0], expected)
    assert sizes == {4} and counters["stats"]["unique_graphs"] == 1  # 3 layers + background: 4 pairs
    assert batch_sizes(pipe.unet._orig_mod, lambda: pipe(["a", "b", "c"], **late)) == {4}  # 3 padded to 4
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor and CUDA graphs are measured on a GPU")
def test_compiled_stream_on_a_gpu_matches(tiny_model):
    from smd_cli import StableMultiDiffusionPipeline, StreamMultiDiffusion

    pipe = StableMultiDiffusionPipeline("cuda", hf_key=str(tiny_model), dtype="float32")
    frames = []
    for compile in (False, True):
        stream = StreamMultiDiffusion(pipeline=pipe, height=64, width=64, seed=3, compile=compile)
        stream.update_single_layer(0, prompt="a cat")
        frames.append([np.asarray(stream()) for _ in range(4)][-1])
    assert np.abs(frames[0].astype(int) - frames[1].astype(int)).max() <= 2


def test_overlapped_decoding_gives_the_same_frames(pipe):
    from smd_cli import StreamMultiDiffusion

    def frames(overlap: bool, count: int = 5) -> list[np.ndarray]:
        stream = StreamMultiDiffusion(pipeline=pipe, height=64, width=64, seed=5, overlap_decode=overlap)
        stream.update_single_layer(0, prompt="a red ball", mask=_small_regions(64, 64)[2] + 0.0)
        out = [np.asarray(stream()) for _ in range(count)]
        stream.update_single_layer(0, prompt="a blue cube")
        out += [np.asarray(stream()) for _ in range(3)]
        stream.close()  # the decoding thread, if one started, is gone
        assert not [t for t in threading.enumerate() if t.name.startswith("smd-decode")]
        return out, stream.calls

    plain, plain_calls = frames(False)
    overlapped, overlapped_calls = frames(True)
    for a, b in zip(plain[:5], overlapped[:5]):
        np.testing.assert_array_equal(a, b)
    # The overlapped stream runs one call ahead: the frame right after an update still shows the
    # state before it, and from the next one on the frames are the plain stream's again.
    assert not np.array_equal(overlapped[5], plain[5])
    for a, b in zip(plain[6:], overlapped[6:]):
        np.testing.assert_array_equal(a, b)
    assert overlapped_calls == plain_calls + 1
