"""The Python API's inputs: prompt encoding and truncation, prompt strength, background layers, bad inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import assert_near

from smd_cli.core.errors import SmdError
from smd_cli.engine.pipeline import PromptTruncatedWarning

SIZE = 64


def run(pipe, prompts, **kwargs):
    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(1))
    kwargs.setdefault("bootstrap_steps", 0)
    return pipe(prompts, height=SIZE, width=SIZE, latents=latents, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs)


def test_each_distinct_prompt_is_encoded_once(pipe, monkeypatch):
    pipe._text_cache.clear()  # the pipeline is shared by the session's tests
    seen = []
    original = pipe.text_encoder.forward
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda ids, **k: seen.append(ids.shape[0]) or original(ids, **k))
    masks = np.zeros((3, SIZE, SIZE), np.float32)
    masks[:, :, :] = 1
    run(pipe, ["a red fox", "a red fox", "a green field"], masks=masks)
    assert seen == [2]  # one batch holding the two distinct prompts
    run(pipe, ["a red fox", "a green field", "a blue lake"], masks=masks)
    assert seen == [2, 1]  # remembered: only the new prompt is encoded


def test_long_prompts_are_read_whole_positive_and_negative(pipe):
    long = " ".join(["photo"] * 120)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        image = run(pipe, [long], negative_prompts=[long + " cat"], guidance_scale=2.0)
    assert np.isfinite(image).all()


def test_prompt_strength_zero_paints_the_background_prompt(pipe):
    """E_p = E_bg + w (E_p - E_bg): at w = 0 a layer denoises under the background prompt."""
    masks = np.zeros((1, SIZE, SIZE), np.float32)
    masks[0, :, : SIZE // 2] = 1
    plain = run(pipe, ["blue sky"])
    mixed = run(pipe, ["a cat"], masks=masks, prompt_strengths=0.0, background_prompt="blue sky")
    assert_near(plain, mixed)  # the same prompt in other batches (the layer's rows and the background's)
    unmixed = run(pipe, ["a cat"], masks=masks, prompt_strengths=1.0, background_prompt="blue sky")
    assert np.abs(unmixed - plain).mean() > 1e-4  # the tiny random text encoder differs little per prompt


def test_uncovered_area_is_generated_from_the_background_prompt(pipe):
    """A layer over half the canvas and the background prompt over the rest equal two explicit layers."""
    half = np.zeros((1, SIZE, SIZE), np.float32)
    half[0, :, : SIZE // 2] = 1
    implicit = run(pipe, ["a cat"], masks=half, background_prompt="blue sky")
    explicit = run(pipe, ["blue sky", "a cat"], masks=np.concatenate([1 - half, half]))
    np.testing.assert_allclose(implicit, explicit, atol=1e-6)


def test_bootstrapping_changes_multi_layer_results_but_not_plain_sampling(pipe):
    half = np.zeros((2, SIZE, SIZE), np.float32)
    half[0, :, : SIZE // 2] = 1
    half[1, :, SIZE // 2:] = 1
    without = run(pipe, ["a cat", "blue sky"], masks=half, bootstrap_steps=0)
    with_boot = run(pipe, ["a cat", "blue sky"], masks=half, bootstrap_steps=2)
    assert np.abs(without - with_boot).mean() > 1e-3
    np.testing.assert_allclose(run(pipe, ["a cat"], bootstrap_steps=2), run(pipe, ["a cat"], bootstrap_steps=0),
                               atol=1e-6)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"masks": np.ones((2, SIZE, SIZE))}, "masks: 2 for 1 prompts; give one per prompt"),
    ({"masks": np.full((1, SIZE, SIZE), 255.0)}, "mask values must lie in [0, 1]"),
    ({"masks": np.ones((1, SIZE, 2 * SIZE))}, "the aspect ratios differ"),
    ({"mask_strengths": [1, 1]}, "mask_strengths: 2 for 1 prompts"),
    ({"mask_type": "fuzzy"}, "mask_type must be"),
    ({"timesteps": [2000, 10]}, "timesteps must lie in [0, 999]"),
])
def test_bad_api_inputs_raise_smd_errors(pipe, kwargs, fragment):
    with pytest.raises(SmdError) as exc:
        run(pipe, ["a cat"], **kwargs)
    assert fragment in str(exc.value)


def test_canvas_must_fit_the_vae_factor(pipe):
    with pytest.raises(SmdError, match="not divisible by the model's downscale factor 2"):
        pipe.sample("a cat", height=33, width=32)


def test_output_types(pipe):
    latent = run(pipe, ["a cat"])
    assert latent.shape == (SIZE, SIZE, 3)
    x0 = pipe("a cat", height=SIZE, width=SIZE, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert tuple(x0.shape) == (1, 4, SIZE // 2, SIZE // 2)
    steps = []
    pipe("a cat", height=SIZE, width=SIZE, callback=lambda k, n, x: steps.append((k, n)))
    assert steps == [(k, 5) for k in range(5)]
