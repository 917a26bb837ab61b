"""Conformance with diffusers and the invariants of docs/method.md §4, on tiny random models (CPU, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import latents, rel_err

# diffusers' pipelines and smd run the same math in other batches and orders, so their images agree
# to float32 rounding, not bit for bit: rel_err < 1e-4 (FLOAT32_REORDERED in conftest) where a wrong
# step, weight or mask gives 1e-3 to 1. The same pipeline twice on the same inputs: exactly equal.
DEFAULT_TIMESTEPS = [999, 919, 759, 499, 259]
SIZE = 64  # pixels: 32 x 32 latents with the tiny VAE's factor 2


def test_default_schedule_is_the_spec_one(pipe):
    s = pipe.schedule()
    assert s.timesteps == DEFAULT_TIMESTEPS
    assert [round(x, 4) for x in s.sigmas[:-1]] == [0.9977, 0.9942, 0.9735, 0.8499, 0.5840]
    assert s.sigmas[-1] == 0.0 and s.alphas[-1] == 1.0


@pytest.mark.parametrize("steps", [None, 4, 2])
def test_plain_sampling_equals_diffusers(pipe, reference_pipe, steps):
    kwargs = {"timesteps": DEFAULT_TIMESTEPS} if steps is None else {"num_inference_steps": steps}
    expected = reference_pipe("a photo of the sun", guidance_scale=1.0, height=SIZE, width=SIZE,
                              output_type="np", latents=latents(), generator=torch.Generator().manual_seed(0),
                              **kwargs).images[0]
    got = pipe.sample("a photo of the sun", num_inference_steps=steps, height=SIZE, width=SIZE,
                      latents=latents(), generator=torch.Generator().manual_seed(0), output_type="np")
    assert got.shape == expected.shape
    assert rel_err(expected, got) < 1e-4


def test_plain_sampling_with_guidance_equals_diffusers(pipe, reference_pipe):
    expected = reference_pipe("a photo of the sun", negative_prompt="a cat", guidance_scale=3.0, height=SIZE,
                              width=SIZE, timesteps=DEFAULT_TIMESTEPS, output_type="np", latents=latents(2),
                              generator=torch.Generator().manual_seed(5)).images[0]
    got = pipe("a photo of the sun", "a cat", guidance_scale=3.0, height=SIZE, width=SIZE,
               latents=latents(2), generator=torch.Generator().manual_seed(5), output_type="np")
    assert rel_err(expected, got) < 1e-4


def test_guidance_distilled_unet_equals_diffusers(tiny_lcm_model):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from smd_cli import StableMultiDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(str(tiny_lcm_model), safety_checker=None,
                                                  requires_safety_checker=False)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ours = StableMultiDiffusionPipeline("cpu", hf_key=str(tiny_lcm_model))
    for g in (1.0, 4.0):
        expected = ref("a blue sky", guidance_scale=g, height=SIZE, width=SIZE, timesteps=DEFAULT_TIMESTEPS,
                       output_type="np", latents=latents(3), generator=torch.Generator().manual_seed(1)).images[0]
        got = ours("a blue sky", guidance_scale=g, height=SIZE, width=SIZE, latents=latents(3),
                   generator=torch.Generator().manual_seed(1), output_type="np")
        assert rel_err(expected, got) < 1e-4, g


def test_the_pipeline_wraps_loaded_components(reference_pipe, pipe):
    from smd_cli import StableMultiDiffusionPipeline

    wrapped = StableMultiDiffusionPipeline.from_pipe(reference_pipe, device="cpu")
    a = wrapped.sample("a cat", height=SIZE, width=SIZE, latents=latents(), generator=torch.Generator().manual_seed(0),
                       output_type="np")
    b = pipe.sample("a cat", height=SIZE, width=SIZE, latents=latents(), generator=torch.Generator().manual_seed(0),
                    output_type="np")
    np.testing.assert_array_equal(a, b)


def _split_masks(n: int, size: int = SIZE) -> np.ndarray:
    """n vertical bands that partition the canvas."""
    masks = np.zeros((n, size, size), np.float32)
    edges = np.linspace(0, size, n + 1).astype(int)
    for i in range(n):
        masks[i, :, edges[i]: edges[i + 1]] = 1.0
    return masks


@pytest.mark.parametrize("mask_type", ["discrete", "semi-continuous", "continuous"])
def test_same_prompt_everywhere_equals_plain_sampling(pipe, mask_type):
    plain = pipe.sample("a large tree", height=SIZE, width=SIZE, latents=latents(),
                        generator=torch.Generator().manual_seed(0), output_type="np")
    layered = pipe(["a large tree"] * 3, masks=_split_masks(3), mask_type=mask_type, bootstrap_steps=0,
                   latents=latents(), generator=torch.Generator().manual_seed(0), output_type="np")
    assert rel_err(plain, layered) < 1e-4


def test_overlapping_same_prompt_layers_equal_plain_sampling(pipe):
    masks = np.zeros((2, SIZE, SIZE), np.float32)
    masks[0, :, :40] = 1.0
    masks[1, :, 24:] = 1.0
    plain = pipe.sample("a large tree", height=SIZE, width=SIZE, latents=latents(),
                        generator=torch.Generator().manual_seed(0), output_type="np")
    layered = pipe(["a large tree"] * 2, masks=masks, bootstrap_steps=0, latents=latents(),
                   generator=torch.Generator().manual_seed(0), output_type="np")
    assert rel_err(plain, layered) < 1e-4


def test_different_prompts_change_their_own_regions(pipe):
    """Sanity check that masks matter: a different prompt in one band changes the image."""
    plain = pipe.sample("a large tree", height=SIZE, width=SIZE, latents=latents(),
                        generator=torch.Generator().manual_seed(0), output_type="np")
    mixed = pipe(["a large tree", "blue lake"], masks=_split_masks(2), bootstrap_steps=0, latents=latents(),
                 generator=torch.Generator().manual_seed(0), output_type="np")
    assert rel_err(plain, mixed) > 1e-3


def test_same_seed_same_pixels_other_seed_differs(pipe, tmp_path):
    from conftest import write

    from smd_cli import generate
    from smd_cli.scenes.scene import load_scene

    scene = write(tmp_path / "s.yaml", f"""
width: {SIZE}
height: {SIZE}
seed: 11
bootstrap: {{steps: 2}}
background: {{prompt: "blue sky"}}
layers:
  - {{prompt: "the sun", mask: {{ellipse: [0.5, 0.5, 0.25, 0.25]}}}}
  - {{prompt: "a large tree", mask: {{rect: [0, 0.6, 0.5, 1.0]}}, mask_std: 2}}
""")
    first = np.asarray(generate(pipe, load_scene(scene)).image)
    second = np.asarray(generate(pipe, load_scene(scene)).image)
    other = np.asarray(generate(pipe, load_scene(scene, ["seed=12"])).image)
    np.testing.assert_array_equal(first, second)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1.0


def test_seed_everything_makes_global_rng_runs_repeat(pipe):
    from smd_cli import seed_everything

    seed_everything(3)
    a = pipe.sample("a cat", height=SIZE, width=SIZE, output_type="np")
    seed_everything(3)
    b = pipe.sample("a cat", height=SIZE, width=SIZE, output_type="np")
    np.testing.assert_array_equal(a, b)
