"""Weighted prompts in AUTOMATIC1111's syntax and prompts past CLIP's 77 tokens (`smd_cli.method.prompts`)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_near, rel_err

from smd_cli.method.prompts import PromptSyntaxError, PromptTruncatedWarning, parse, plain

LONG = ", ".join(f"a {word} house" for word in ["red", "blue", "tall", "small", "green", "old", "new", "wide"] * 3)


@pytest.mark.parametrize("prompt, fragments", [
    ("a cat", [("a cat", 1.0)]),
    ("(a:1.0)", [("a", 1.0)]),
    ("a (red:1.5) hat", [("a ", 1.0), ("red", 1.5), (" hat", 1.0)]),
    ("(red)", [("red", 1.1)]),
    ("((red))", [("red", pytest.approx(1.21))]),
    ("[red]", [("red", pytest.approx(1 / 1.1))]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
    (r"\(not weighted\) 16:9", [("(not weighted) 16:9", 1.0)]),
    ("( red : 1.25 )", [(" red ", 1.25)]),
    ("", [("", 1.0)]),
])
def test_the_syntax_reads_as_automatic1111_reads_it(prompt, fragments):
    assert parse(prompt) == fragments


@pytest.mark.parametrize("prompt, message", [
    ("(red hat", "'(' at character 1 is never closed"),
    ("red] hat", "']' at character 4 closes nothing"),
    ("[red)", "')' at character 5 closes nothing"),
    ("(red:-1)", "weight -1 at character 5 is outside 0 to 100"),
])
def test_weights_that_do_not_parse_are_refused_with_the_place(prompt, message):
    with pytest.raises(PromptSyntaxError, match=re.escape(message)):
        parse(prompt)


def test_plain_text_is_the_prompt_without_its_escapes():
    assert plain(r"a \(b\)") == "a (b)" and plain("(a:1)") == "a" and plain("(a)") is None


def test_a_weight_of_one_encodes_exactly_as_the_plain_prompt(pipe):
    torch.testing.assert_close(pipe.encode_prompts(["(a red fox:1.0)"]).states,
                               pipe.encode_prompts(["a red fox"]).states, rtol=0, atol=0)


def test_compels_reading_of_an_unweighted_prompt_equals_diffusers(pipe):
    """The weighted path, given weights of 1, makes the token states diffusers' pipeline makes."""
    from smd_cli.method.prompts import WeightedEncoder

    encoder = WeightedEncoder(pipe.tokenizer, pipe.text_encoder, penultimate=False, device=pipe.device)
    with torch.no_grad():  # as the pipeline reads prompts: with autograd on, attention runs other kernels
        states = encoder.states(["a red fox"])
    # compel calls the encoder with an attention mask and sets each state to empty + 1 (z - empty):
    # float32 rounding of the same math, not the same bits (see FLOAT32_REORDERED).
    assert_near(states, pipe.family.encode_plain(["a red fox"]).states)


def test_a_weight_scales_its_tokens_away_from_the_empty_prompt(pipe):
    """compel's rule: token states of a weighted fragment become empty + w (z - empty); the others stay."""
    z = pipe.family.encode_plain(["red fox"]).states[0]
    empty = pipe.family.encode_plain([""]).states[0]
    weighted = pipe.encode_prompts(["(red:1.5) fox"]).states[0]
    red = len(pipe.tokenizer("red", add_special_tokens=False).input_ids)
    inside = slice(1, 1 + red)
    assert_near(weighted[inside], empty[inside] + 1.5 * (z[inside] - empty[inside]))  # compel's path, and ours
    outside = torch.ones(len(z), dtype=torch.bool)
    outside[inside] = False
    assert_near(weighted[outside], z[outside])


def test_a_long_prompt_is_read_whole_in_chunks(pipe):
    tokens = len(pipe.tokenizer(LONG).input_ids)
    assert tokens > 200
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        states = pipe.encode_prompts([LONG]).states
    chunks = states.shape[1] // 77  # up to 75 tokens, cut between phrases, and its own start and end each
    assert states.shape[1] == 77 * chunks and chunks >= -(-(tokens - 2) // 75)
    first = pipe.tokenizer.decode(pipe.tokenizer(LONG).input_ids[1:76])
    assert rel_err(pipe.encode_prompts([first]).states, states[:, :77]) < 0.5  # the same opening...
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    images = [pipe([p], height=64, width=64, latents=latents, generator=torch.Generator().manual_seed(0),
                   output_type="np", bootstrap_steps=0) for p in (LONG, first)]
    assert np.abs(images[0] - images[1]).mean() > 1e-4  # ...but the rest of the prompt changes the image


def test_long_and_short_prompts_share_a_batch_padded_with_the_empty_chunk(pipe):
    """Rows of different lengths (a long layer prompt, a short negative) are padded, not refused."""
    both = pipe.encode_prompts([LONG, "a cat"])
    alone = pipe.encode_prompts(["a cat"]).states
    torch.testing.assert_close(both.states[1:, :77], alone)
    empty = pipe.family.encode_plain([""]).states
    torch.testing.assert_close(both.states[1:, 77:154], empty)
    image = pipe([LONG, "(a cat:1.2)"], negative_prompts=["blurry", LONG], height=64, width=64,
                 masks=np.stack([np.tri(64, dtype=np.float32), 1 - np.tri(64, dtype=np.float32)]),
                 guidance_scale=3.0, background_prompt="(a lake:0.8)", prompt_strengths=0.7,
                 generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.isfinite(image).all()


def test_sdxl_weights_both_encoders_and_pools_the_first_chunk(tiny_sdxl):
    from smd_cli import StableMultiDiffusionPipeline

    xl = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_sdxl))
    plain_rows = xl.encode_prompts(["red fox"])
    weighted = xl.encode_prompts(["(red:1.4) fox"])
    assert weighted.states.shape == plain_rows.states.shape
    assert rel_err(plain_rows.states, weighted.states) > 1e-3
    torch.testing.assert_close(weighted.pooled, plain_rows.pooled)  # the end token is not weighted
    long = xl.encode_prompts([LONG])
    assert long.states.shape[1] > 77 and long.states.shape[-1] == plain_rows.states.shape[-1]
    image = xl([LONG], negative_prompts=[""], guidance_scale=3.0, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np")  # zeros negative, padded
    assert np.isfinite(image).all()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_t5_families_weight_their_prompts_in_one_sequence(family, tiny_sd3, tiny_flux):
    """compel's reading of an unweighted prompt is diffusers' (T5 and CLIP alike, one sequence
    each); a weight changes the conditioning and keeps its shape; a weight of 1 is the plain prompt."""
    from smd_cli import StableMultiDiffusionPipeline

    smd = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_sd3 if family == "sd3" else tiny_flux))
    plain = smd.encode_prompts(["a red fox"])
    weighted = smd.encode_prompts(["a (red:1.4) fox"])
    assert weighted.states.shape == plain.states.shape and rel_err(plain.states, weighted.states) > 1e-4
    torch.testing.assert_close(smd.encode_prompts(["(a red fox:1.0)"]).states, plain.states, rtol=0, atol=0)
    f = smd.family
    t5 = f.reader(f.tokenizer_3 if family == "sd3" else f.tokenizer_2,
                     f.text_encoder_3 if family == "sd3" else f.text_encoder_2, length=f.max_sequence_length)
    if family == "flux":  # T5 read by compel, as above for CLIP: the same math rounded another way
        with torch.no_grad():
            assert_near(t5.states(["a red fox"]).to(plain.states.dtype), plain.states)
    image = smd.sample("a (red:1.4) fox", height=64, width=64, num_inference_steps=2, output_type="np",
                       generator=torch.Generator().manual_seed(0))
    assert np.isfinite(image).all()


def test_negative_auto_makes_each_layers_prompt_a_negative_of_the_others():
    from smd_cli.engine.prepare import Layers, auto_negatives

    layers = Layers(["sky", "a cat", "a lake"], ["", "blurry", ""], np.ones((3, 4, 4), np.float32), [1.0] * 3,
                    [0.0] * 3, [1.0] * 3)
    assert auto_negatives(layers, own=2) == ["a cat, a lake", "blurry, a lake", "a cat"]


def test_negative_auto_equals_writing_the_negatives_out(pipe):
    masks = np.zeros((2, 64, 64), np.float32)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    common = dict(masks=masks, height=64, width=64, guidance_scale=3.0, output_type="np", bootstrap_steps=1,
                  latents=torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1)))
    auto = pipe(["a cat", "a lake"], negative_prompts=["blurry", ""], negative_auto=True,
                generator=torch.Generator().manual_seed(0), **common)
    written = pipe(["a cat", "a lake"], negative_prompts=["blurry, a lake", "a cat"],
                   generator=torch.Generator().manual_seed(0), **common)
    without = pipe(["a cat", "a lake"], negative_prompts=["blurry", ""], generator=torch.Generator().manual_seed(0),
                   **common)
    np.testing.assert_array_equal(auto, written)
    assert np.abs(auto - without).mean() > 1e-4


def test_negative_auto_is_a_scene_key(run_cli, tiny_model, tmp_path):
    from conftest import write

    from smd_cli.app.records import read_record

    scene = write(tmp_path / "s.yaml", "seed: 1\nwidth: 64\nheight: 64\nguidance_scale: 2\nnegative_auto: true\n"
                                       "layers:\n  - {prompt: a cat, mask: {rect: [0, 0, 0.5, 1]}}\n"
                                       "  - {prompt: a lake, mask: {rect: [0.5, 0, 1, 1]}}\n")
    result = run_cli("generate", scene, "--model", tiny_model, "--device", "cpu", "--out", tmp_path / "x.png")
    assert result.exit_code == 0 and read_record(tmp_path / "x.png").scene["negative_auto"] is True
    bad = write(tmp_path / "b.yaml", "negative_auto: 'yes'\nlayers:\n  - {prompt: a}\n")
    assert run_cli("validate", bad).exit_code == 2
