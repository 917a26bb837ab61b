"""The original project's README examples, run as written apart from the import, model key, device and
the mask loading (from local files instead of URLs, with numpy instead of torchvision)."""

from __future__ import annotations

from functools import reduce

import pytest
import torch
from conftest import REFERENCE, load_mask
from PIL import Image


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference scenes not available on this machine")
def test_region_based_example(tiny_model_f8, tmp_path):
    from smd_cli import StableMultiDiffusionPipeline, seed_everything

    seed = 2024
    device = "cpu"

    # Load the module.
    seed_everything(seed)
    device = torch.device(device)
    smd = StableMultiDiffusionPipeline(
        device,
        hf_key=str(tiny_model_f8),
        sd_version='1.5',
    )

    # Load prompts.
    prompts = [
        # Background prompt.
        '1girl, 1boy, times square',
        # Foreground prompts.
        '1boy, looking at viewer, brown hair, casual shirt',
        '1girl, looking at viewer, pink hair, leather jacket',
    ]
    negative_prompts = [
        '',
        '1girl',  # (Optional) The first prompt is a boy so we don't want a girl.
        '1boy',  # (Optional) The first prompt is a girl so we don't want a boy.
    ]
    negative_prompt_prefix = 'worst quality, bad quality, normal quality, cropped, framed'
    negative_prompts = [negative_prompt_prefix + ', ' + p for p in negative_prompts]

    # Load masks.
    masks = []
    for i in range(1, 3):
        mask = load_mask(REFERENCE / "timessquare" / f"timessquare_{i}.png")
        masks.append(mask)
    # In this example, background is simply set as non-marked regions.
    background = reduce(torch.logical_and, [m == 0 for m in masks])
    masks = torch.stack([background] + masks, dim=0).float()

    height, width = masks.shape[-2:]  # (768, 768) in this example.

    # Sample an image.
    image = smd(
        prompts,
        negative_prompts,
        masks=masks,
        mask_strengths=1,
        mask_stds=0,
        height=height,
        width=width,
        bootstrap_steps=2,
    )
    image.save(tmp_path / 'my_beautiful_creation.png')
    assert Image.open(tmp_path / 'my_beautiful_creation.png').size == (768, 768)


def test_basic_stable_diffusion_example(tiny_model, tmp_path):
    from smd_cli import StableMultiDiffusionPipeline

    device = "cpu"

    # Load the module.
    device = torch.device(device)
    smd = StableMultiDiffusionPipeline(device, hf_key=str(tiny_model))

    # Sample an image.
    image = smd.sample('A photo of the dolomites')
    image.save(tmp_path / 'my_creation.png')
    # The default canvas is the model's native size: 16 latents x factor 2 for the tiny model.
    assert Image.open(tmp_path / 'my_creation.png').size == (32, 32)
