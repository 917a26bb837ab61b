"""StreamMultiDiffusion (docs/method.md §6): conformance with generate, one UNet call per frame, updates, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REFERENCE, load_mask
from PIL import Image

from smd_cli.method.sampler import randn

SIZE = 64


def _masks() -> list[np.ndarray]:
    left = np.zeros((SIZE, SIZE), np.float32)
    left[:, :28] = 1
    disc = np.zeros((SIZE, SIZE), np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc[(yy - 40) ** 2 + (xx - 44) ** 2 < 180] = 1
    return [left, disc]


def _stream(pipe, **kwargs):
    from smd_cli import StreamMultiDiffusion

    options = dict(height=SIZE, width=SIZE, cfg_type="none", autoflush=False, mask_type="continuous",
                   bootstrap_steps=2, bootstrap_mix_steps=1.5, seed=7)
    options.update(kwargs)
    stream = StreamMultiDiffusion(pipeline=pipe, **options)
    stream.update_background(Image.new("RGB", (SIZE, SIZE), (255, 255, 255)), prompt="a landscape")
    left, disc = _masks()
    everything = np.ones((SIZE, SIZE), np.float32)
    stream.update_single_layer(0, prompt="blue sky", mask=everything)
    stream.update_single_layer(1, prompt="a large tree", negative_prompt="a cat", mask=left, mask_std=2)
    stream.update_single_layer(2, prompt="the sun", mask=disc, prompt_strength=0.8)
    return stream


def test_stream_frame_equals_generate_with_the_same_noises(pipe):
    stream = _stream(pipe)
    steps = len(stream.schedule)
    frames = [stream.step() for _ in range(steps)]
    # Replay the stream's generator: the per-stage noises, then the fresh latent of call 1, whose
    # frame leaves the last stage at call T.
    generator = torch.Generator("cpu").manual_seed(7)
    noises = [randn(stream.shape, generator, pipe.device, torch.float32) for _ in range(steps - 1)]
    first = randn(stream.shape, generator, pipe.device, torch.float32)
    left, disc = _masks()
    expected = pipe(["blue sky", "a large tree", "the sun"], ["", "a cat", ""],
                    masks=[np.ones_like(left), left, disc], mask_stds=[0, 2, 0], prompt_strengths=[1, 1, 0.8],
                    mask_type="continuous", bootstrap_steps=2, bootstrap_mix_steps=1.5,
                    background=Image.new("RGB", (SIZE, SIZE), (255, 255, 255)), background_prompt="a landscape",
                    height=SIZE, width=SIZE,
                    latents=first, noises=noises, output_type="latent")
    got = frames[-1]
    assert float((got - expected).abs().sum() / expected.abs().sum()) < 1e-4


class Calls:
    def __init__(self, module):
        self.sizes = []
        self.handle = module.register_forward_hook(lambda m, a, o: self.sizes.append(a[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("cfg_type, per_frame", [("none", lambda t, p: t * p), ("full", lambda t, p: 2 * t * p),
                                                 ("self", lambda t, p: t * p), ("initialize", lambda t, p: t * p + p)])
def test_one_unet_call_per_frame(pipe, cfg_type, per_frame):
    stream = _stream(pipe, cfg_type=cfg_type, mask_type="discrete", bootstrap_steps=0, cover_alpha=1.0)
    stream.step()  # prepares
    with Calls(pipe.unet) as calls:
        for _ in range(3):
            stream()
    t, p = len(stream.schedule), 3
    assert calls.sizes == [per_frame(t, p)] * 3


def test_residual_guidance_noise_persists_between_calls(pipe):
    kept, forgot = (_stream(pipe, cfg_type="initialize", guidance_scale=2.0) for _ in range(2))
    kept.step(), forgot.step()
    # Stage 0's unconditional prediction moved down to stage 1 as a residual over its noise...
    assert (kept.stock[1] - kept.stage_noises[0][0]).abs().mean() > 1e-3
    for _ in range(len(kept.schedule)):  # ...and a stream that drops it after each call, as the
        forgot.stock = None  # reference does, gives other frames once the residual reaches the end
        a, b = kept.step(), forgot.step()
    assert (a - b).abs().mean() > 1e-4


def test_seeded_and_updates_show_within_one_flush(pipe):
    a, b = _stream(pipe), _stream(pipe)
    for _ in range(6):
        fa, fb = a(), b()
    np.testing.assert_array_equal(np.asarray(fa), np.asarray(fb))
    c = _stream(pipe, seed=8)
    for _ in range(6):
        fc = c()
    assert np.abs(np.asarray(fc, dtype=int) - np.asarray(fa, dtype=int)).mean() > 1

    seen = []
    original = pipe.text_encoder.forward
    pipe.text_encoder.forward = lambda ids, **k: seen.append(ids.shape[0]) or original(ids, **k)
    try:
        a.autoflush = True
        a.update_single_layer(2, prompt="a photo of the moon")
    finally:
        pipe.text_encoder.forward = original
    assert seen == [1]  # only the changed prompt is encoded
    # After one flush the frame is exactly what a stream that always had the new prompt gives.
    always = _stream(pipe)
    always.update_single_layer(2, prompt="a photo of the moon")
    for _ in range(6):
        always()
    always.flush()
    b.flush()
    after, new, old = a.step(), always.step(), b.step()
    torch.testing.assert_close(after, new)
    assert (after - old).abs().mean() > 1e-3


def test_adding_and_removing_layers(pipe):
    stream = _stream(pipe, autoflush=True)
    stream.update_single_layer(3, prompt="a cat", mask=np.ones((32, 32), np.float32))  # resized to the canvas
    assert len(stream.layers) == 4 and stream.layers[3].mask.shape == (SIZE, SIZE)
    stream.remove_single_layer(1)
    assert [layer.prompt for layer in stream.layers] == ["blue sky", "the sun", "a cat"]
    assert stream().size == (SIZE, SIZE)


def test_only_changed_masks_are_blurred_again(pipe, monkeypatch):
    import smd_cli.method.masks as masks

    stream = _stream(pipe)
    stream.step()
    blurs = []
    original = masks.blur
    monkeypatch.setattr(masks, "blur", lambda m, s: blurs.append(s) or original(m, s))
    stream.update_single_layer(0, prompt="clear sky")  # a prompt change: no blur again
    stream.update_single_layer(2, mask_strength=0.99)
    stream.step()
    assert [s for s in blurs if s > 0] == []
    moved = np.roll(_masks()[0], 5, axis=1)
    stream.update_single_layer(1, mask=moved)  # the one blurred layer's mask: blurred once more
    stream.step()
    assert [s for s in blurs if s > 0] == [2]


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference scenes not available on this machine")
def test_zeus_streams_end_to_end(tiny_model_f8, tmp_path):
    """The original README's streaming example, with a tiny random TAESD standing in for madebyollin/taesd."""
    from functools import reduce

    from tinymodel import build_tiny_taesd

    from smd_cli import StreamMultiDiffusion

    taesd = build_tiny_taesd(tmp_path / "taesd", blocks=4)
    seed, height, width = 2024, 768, 512
    smd = StreamMultiDiffusion("cpu", hf_key=str(tiny_model_f8), vae=str(taesd), height=height, width=width,
                               cfg_type="none", autoflush=True, use_tiny_vae=True, mask_type="continuous",
                               bootstrap_steps=2, bootstrap_mix_steps=1.5, seed=seed)
    assert type(smd.pipe.vae).__name__ == "AutoencoderTiny"
    masks = [load_mask(REFERENCE / "zeus" / f"prompt_p{i}.png") for i in range(1, 3)]
    background = reduce(torch.logical_and, [m == 0 for m in masks])
    smd.update_background(Image.new(size=(width, height), mode="RGB", color=(255, 255, 255)))
    negative = "worst quality, bad quality, normal quality, cropped, framed"
    smd.update_single_layer(idx=0, prompt="a photo of Mount Olympus", negative_prompt=negative, mask=background,
                            mask_strength=1.0, mask_std=0.0, prompt_strength=1.0)
    smd.update_single_layer(idx=1, prompt="1girl, looking at viewer, lifts arm, smile, happy, Greek goddess Athena",
                            negative_prompt=negative, mask=masks[0], mask_strength=1.0, mask_std=0.0,
                            prompt_strength=1.0)
    smd.update_single_layer(idx=2, prompt="a small, sitting owl", negative_prompt=negative, mask=masks[1],
                            mask_strength=1.0, mask_std=0.0, prompt_strength=1.0)
    frames = [smd() for _ in range(3)]
    assert all(f.size == (width, height) for f in frames)
    assert np.asarray(frames[-1]).std() > 1
