"""Attention-mode regions (docs/method.md §10): every layer in one denoiser row, kept to its mask by
the attention; hybrid keeps rows for layers with their own controls. Tiny random models, CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import denoiser_rows, rel_err, write
from tinymodel import write_tiny_lora

from smd_cli import StableMultiDiffusionPipeline
from smd_cli.core.errors import SmdError
from smd_cli.method import regions

FAMILIES = ["sd", "sdxl", "sd3", "flux"]
SIZE = 64  # pixels: 32 latent pixels with the tiny models' VAE factor 2


@pytest.fixture(scope="module")
def pipes(tiny_model, tiny_sdxl, tiny_sd3, tiny_flux):
    folders = {"sd": tiny_model, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}
    return {name: StableMultiDiffusionPipeline("cpu", hf_key=str(folder), lcm_lora="none")
            for name, folder in folders.items()}


def _run(pipe, prompts, masks=None, **kw):
    settings = dict(height=SIZE, width=SIZE, num_inference_steps=2, output_type="latent", guidance_scale=1.5,
                    generator=torch.Generator().manual_seed(3))
    return pipe(prompts, masks=masks, **{**settings, **kw})


def _halves(count: int = 2) -> np.ndarray:
    masks = np.zeros((count, SIZE, SIZE), np.float32)
    for i in range(count):
        masks[i, :, i * SIZE // count:(i + 1) * SIZE // count] = 1
    return masks


@pytest.mark.parametrize("family", FAMILIES)
def test_one_layer_over_the_canvas_is_plain_sampling(pipes, family):
    pipe = pipes[family]
    plain = _run(pipe, "a red fox")
    assert rel_err(plain, _run(pipe, "a red fox", region_mode="attention")) < 1e-4
    assert rel_err(plain, _run(pipe, "a red fox", region_mode="hybrid")) < 1e-4


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_one_prompt_on_two_halves_is_plain_sampling(pipes, family):
    pipe = pipes[family]
    plain = _run(pipe, "a red fox")
    assert rel_err(plain, _run(pipe, ["a red fox"] * 2, _halves(), region_mode="attention")) < 1e-4


def test_two_prompts_differ_from_either_alone_and_from_latent_mode(pipes):
    pipe = pipes["sd"]
    both = _run(pipe, ["a red fox", "a blue lake"], _halves(), region_mode="attention")
    assert torch.isfinite(both).all()
    for alone in (_run(pipe, "a red fox"), _run(pipe, "a blue lake"),
                  _run(pipe, ["a red fox", "a blue lake"], _halves())):
        assert rel_err(alone, both) > 1e-3


class _Spy:
    """Every scaled_dot_product_attention with a mask that blocks (a text encoder's padding mask is
    finite): its queries, keys and mask."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = F.scaled_dot_product_attention

        def spy(query, key, value, attn_mask=None, **kw):
            if attn_mask is not None and torch.isneginf(attn_mask).any():
                self.calls.append((query.detach(), key.detach(), attn_mask.detach()))
            return real(query, key, value, attn_mask=attn_mask, **kw)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)

    def probabilities(self):
        for query, key, mask in self.calls:
            logits = query.float() @ key.float().transpose(-1, -2) / query.shape[-1] ** 0.5 + mask.float()
            yield logits.softmax(-1)


def _outside(grid: tuple[int, int], masks: np.ndarray) -> torch.Tensor:
    """[G, positions]: where each layer's mask, average-pooled to `grid`, is zero."""
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(masks)[None], grid)[0]
    return (pooled == 0).flatten(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prompt_is_never_read_outside_its_region(pipes, family, monkeypatch):
    pipe = pipes[family]
    spy = _Spy(monkeypatch)
    made = []

    class Recorded(regions.Regions):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(regions, "Regions", Recorded)
    monkeypatch.setattr(regions, "SPARSE", 0.0)  # one dense call per attention, its mask whole
    masks = _halves()  # left and right: no background, each layer's region is its half
    _run(pipe, ["a red fox", "a big old elk"], masks, region_mode="attention", guidance_scale=1.0)
    assert spy.calls and len(made) == 1
    spans = made[0].spans  # each layer's tokens in the joined row (T5's trimmed to what each prompt uses)
    if family == "flux":  # the tiny SD3 has no T5: CLIP's 77 each
        assert spans[0][1] - spans[0][0] != spans[1][1] - spans[1][0]
    latent = SIZE // pipe.vae_scale_factor
    for probs in spy.probabilities():
        assert torch.isfinite(probs).all()
        keys = probs.shape[-1]
        if family in ("sd", "sdxl"):  # cross-attention: image positions -> both prompts' tokens
            side = int(round((probs.shape[-2]) ** 0.5))
            outside = _outside((side, side), masks)
            for g, (start, end) in enumerate(spans):
                reads = probs[..., start:end].sum(-1)  # [B, heads, positions]
                assert reads[..., outside[g]].abs().max() == 0
                assert reads[..., ~outside[g]].min() > 0
            continue
        # joint attention: image tokens and both prompts' tokens, image first (SD3) or text first (FLUX.1)
        side = latent // 2
        count = side * side
        image = slice(0, count) if family == "sd3" else slice(keys - count, keys)
        text = count if family == "sd3" else 0
        outside = _outside((side, side), masks)
        for g, (start, end) in enumerate(spans):
            own = slice(text + start, text + end)
            image_reads = probs[..., image, own].sum(-1)  # image positions reading prompt g
            assert image_reads[..., outside[g]].abs().max() == 0 and image_reads[..., ~outside[g]].min() > 0
            text_reads = probs[..., own, image]  # prompt g's tokens reading image positions
            assert text_reads[..., outside[g]].abs().max() == 0
            other = slice(text + spans[1 - g][0], text + spans[1 - g][1])
            assert probs[..., own, other].abs().max() == 0  # nor the other prompt's tokens


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_split_cross_attention_equals_the_masked_one(pipes, family, monkeypatch):
    """On a CPU the cross-attention runs per set of layers a position reads, never on blocked scores."""
    pipe = pipes[family]
    masks = _nine()
    prompts = [f"prompt {i}" for i in range(len(masks))]
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append(q.shape[-2] * k.shape[-2]) or real(q, k, v, **kw))
    split = _run(pipe, prompts, masks, region_mode="attention")
    split_scores = sum(calls)
    calls.clear()
    monkeypatch.setattr(regions, "SPARSE", 0.0)
    dense = _run(pipe, prompts, masks, region_mode="attention")
    assert rel_err(dense, split) < 1e-5
    assert split_scores < 0.7 * sum(calls)  # the blocked scores were not computed


def _nine() -> np.ndarray:
    masks = np.zeros((9, SIZE, SIZE), np.float32)
    for i in range(9):
        r, c = divmod(i, 3)
        masks[i, r * 20:r * 20 + 24, c * 20:c * 20 + 24] = 1
    return masks


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_nine_layers_take_one_row_per_view_and_step(pipes, family):
    pipe = pipes[family]
    prompts = [f"thing {i}" for i in range(9)]
    steps = 2
    latent_rows = denoiser_rows(pipe, lambda: _run(pipe, prompts, _nine(), guidance_scale=1.0, max_batch=64))
    rows = denoiser_rows(pipe, lambda: _run(pipe, prompts, _nine(), region_mode="attention", guidance_scale=1.0,
                                    max_batch=64))
    assert rows == [1] * steps and latent_rows == [9] * steps  # the nine rects cover the canvas: no background
    if family == "sd":
        cfg = denoiser_rows(pipe, lambda: _run(pipe, prompts, _nine(), region_mode="attention", guidance_scale=3.0))
        assert cfg == [2] * steps


def test_hybrid_keeps_rows_for_layers_with_their_own_lora(pipes, tiny_model, tmp_path):
    pipe = pipes["sd"]
    lora = write_tiny_lora(tiny_model, tmp_path / "lora")
    prompts = [f"thing {i}" for i in range(3)]
    masks = _halves(3)
    own = [None, str(lora), None]
    with pytest.raises(SmdError, match=r"layers\[1\].*region_mode hybrid"):
        _run(pipe, prompts, masks, region_mode="attention", layer_loras=own)
    rows = denoiser_rows(pipe, lambda: _run(pipe, prompts, masks, region_mode="hybrid", layer_loras=own,
                                    guidance_scale=1.0))
    assert sum(rows) == 2 * 2  # per step: the joined row, and the LoRA layer's own
    hybrid = _run(pipe, prompts, masks, region_mode="hybrid", layer_loras=own)
    latent = _run(pipe, prompts, masks, layer_loras=own)
    assert torch.isfinite(hybrid).all() and rel_err(latent, hybrid) > 1e-4


def test_canvas_controls_need_latent_mode(pipes):
    from PIL import Image

    with pytest.raises(SmdError, match="over the whole canvas"):
        _run(pipes["sd"], "a fox", region_mode="attention", reference=Image.new("RGB", (64, 64)))


def test_the_stream_makes_one_row_per_stage_whatever_the_layers(pipes):
    from smd_cli import StreamMultiDiffusion

    pipe = pipes["sd"]
    for count in (1, 3, 8):
        stream = StreamMultiDiffusion(pipeline=pipe, height=SIZE, width=SIZE, region_mode="attention")
        masks = _halves(count)
        for i in range(count):
            stream.update_single_layer(idx=i, prompt=f"thing {i}", mask=masks[i])
        stream.flush()
        assert denoiser_rows(pipe, stream.step) == [len(stream.schedule)]
        frame = stream()
        assert np.asarray(frame).std() > 0


def test_region_mode_from_a_scene_the_command_line_and_the_record(run_cli, tiny_model, tmp_path):
    from smd_cli.app.records import read_record

    scene = write(tmp_path / "two.yaml", "seed: 5\nwidth: 64\nheight: 64\nsteps: 2\nlcm_lora: none\n"
                                         "layers:\n  - {prompt: a fox, mask: {rect: [0, 0, 32, 64]}}\n"
                                         "  - {prompt: a lake, mask: {rect: [32, 0, 64, 64]}}\n")
    out = tmp_path / "two.png"
    done = run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--region-mode", "attention",
                   "--out", out)
    assert done.exit_code == 0, done.stderr
    assert read_record(out).scene["region_mode"] == "attention"
    again = run_cli("reproduce", out, "--model", tiny_model, "--device", "cpu", "--out", tmp_path / "again.png")
    assert again.exit_code == 0, again.stderr
    assert np.array_equal(np.asarray(__import__("PIL.Image").Image.open(out)),
                          np.asarray(__import__("PIL.Image").Image.open(tmp_path / "again.png")))
    bad = run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--region-mode", "layers",
                  "--dry-run")
    assert bad.exit_code == 2 and "region_mode" in bad.stderr and "attention" in bad.stderr


def test_smd_stream_in_attention_mode(run_cli, tiny_model, tmp_path):
    scene = write(tmp_path / "brushes.yaml", "width: 64\nheight: 64\nlcm_lora: none\nlayers:\n"
                                             "  - {prompt: a fox, mask: {rect: [0, 0, 32, 64]}}\n"
                                             "  - {prompt: a lake, mask: {rect: [32, 0, 64, 64]}}\n")
    done = run_cli("stream", scene, "--model", tiny_model, "--device", "cpu", "--frames", "2", "--region-mode",
                   "attention", "--out", tmp_path / "frames")
    assert done.exit_code == 0, done.stderr
    assert len(list((tmp_path / "frames").glob("*.png"))) == 2


def test_the_memory_estimate_counts_the_attention_biases(tiny_model, tiny_flux):
    from smd_cli.engine.memory import estimate_memory

    def estimate(model, joined):
        return estimate_memory(str(model), width=SIZE, height=SIZE, factor=2, tile_size=SIZE, max_batch=1,
                               cfg=False, dtype_bytes=2, joined=joined)

    for model in (tiny_model, tiny_flux):
        latent, three, nine = estimate(model, 0), estimate(model, 3), estimate(model, 9)
        assert latent.regions == 0 and 0 < three.regions < nine.regions
        assert nine.total == latent.total + nine.regions
