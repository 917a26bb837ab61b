"""docs/method.md §3, one formula at a time, against values worked out by hand.

Each function of the step is fed a few numbers small enough to check on paper; the expected
values below are those hand computations, not the function's own output.
"""

from __future__ import annotations

import math

import pytest
import torch

from smd_cli.method.sampler import (
    Schedule,
    StepBatch,
    aggregate,
    blend_background,
    bootstrap_blend,
    bootstrap_mix,
    centring_shift,
    clean_estimate,
    ddim_noise,
    renoise,
    shift,
    step_inputs,
    step_output,
    suppress_leak,
)
from smd_cli.method.views import full_view


def t(*values: float) -> torch.Tensor:
    """A [1, 1, 1, n] tensor: one latent row."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, -1)


def test_clean_estimate():
    # x0 = (x - sigma eps) / alpha = (2 - 0.5 * 1) / 0.5 = 3; (1 - 0.5 * 3) / 0.5 = -1.
    torch.testing.assert_close(clean_estimate(t(2, 1), t(1, 3), 0.5, 0.5), t(3, -1))
    # LCM's boundary scalings: x0 = c_out * 3 + c_skip * x = 2 * 3 + 0.25 * 2 = 6.5; 2 * -1 + 0.25 * 1 = -1.75.
    torch.testing.assert_close(clean_estimate(t(2, 1), t(1, 3), 0.5, 0.5, c_skip=0.25, c_out=2.0), t(6.5, -1.75))


def test_bootstrap_mix_is_the_share_of_white():
    # r = clamp(mix_steps - k, 0, 1)
    assert [bootstrap_mix(k, 1.5) for k in range(3)] == [1.0, 0.5, 0.0]
    assert [bootstrap_mix(k, 1.0) for k in range(2)] == [1.0, 0.0]


def test_bootstrap_blend():
    # x_p = (1 - m) b~ + m x_p: m 1 keeps x, m 0 takes b~, m 0.25 mixes: 0.75 * 4 + 0.25 * 8 = 5.
    torch.testing.assert_close(bootstrap_blend(t(8, 8, 8), t(1, 0, 0.25), t(4, 4, 4)), t(8, 4, 5))


def test_renoise():
    # alpha X0 + sigma n = 0.6 * 2 + 0.8 * -1 = 0.4
    torch.testing.assert_close(renoise(t(2), 0.6, 0.8, t(-1)), t(0.4))


def test_suppress_leak():
    # leak = mean over channels of (x0 - b~)^2; m *= tanh(leak / (2 s)).
    x0 = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1)  # two channels at one pixel
    b = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    leak = (1.0 + 4.0) / 2  # 2.5
    got = suppress_leak(torch.full((1, 1, 1, 1), 0.8), x0, b, sensitivity=0.5)
    assert got.item() == pytest.approx(0.8 * math.tanh(leak / 1.0))
    # Content equal to the background is suppressed entirely.
    assert suppress_leak(torch.ones(1, 1, 1, 1), b, b, 0.2).item() == 0.0


def test_aggregate_and_background_blend():
    value, count = t(6, 1, 0), t(3, 0.5, 0)
    # value / count where count > 0; where nothing counted, value (0) stays.
    torch.testing.assert_close(aggregate(value, count), t(2, 2, 0))
    # bg = clip(1 - count, 0, 1) = [0, 0.5, 1]: X0 = (1 - bg) X0 + bg Bg.
    torch.testing.assert_close(blend_background(t(2, 2, 0), count, t(10, 10, 10)), t(2, 6, 10))


def test_ddim_transition():
    # x_k = alpha X0 + sigma eps with alpha 0.6, sigma 0.8, X0 2, eps 1: x = 2.
    # eps* = (x - alpha X0) / sigma = (2 - 1.2) / 0.8 = 1; x_{k+1} = 0.8 * 2 + 0.6 * 1 = 2.2.
    eps = ddim_noise(t(2.0), t(2.0), 0.6, 0.8)
    torch.testing.assert_close(eps, t(1.0))
    torch.testing.assert_close(renoise(t(2.0), 0.8, 0.6, eps), t(2.2))


def test_centring_shift_and_back_is_exact():
    m = torch.zeros(1, 1, 8, 10)
    m[..., 1:3, 6:9] = 1  # rows 1-2, columns 6-8: bounding-box centre (2, 7), window centre (4, 5)
    dy, dx = centring_shift(m)
    assert (dy, dx) == (2, -2)
    assert centring_shift(torch.zeros(1, 1, 8, 10)) == (0, 0)
    assert centring_shift(torch.ones(1, 1, 8, 10)) == (0, 0)  # a full window is centred already
    x = torch.arange(80.0).reshape(1, 1, 8, 10)
    fill = torch.full_like(x, -1.0)
    moved = shift(x, dy, dx, fill)
    assert moved[0, 0, 3, 4] == x[0, 0, 1, 6]  # the box's corner, two down and two left
    assert (moved[..., :2, :] == -1).all() and (moved[..., :, 8:] == -1).all()  # padded, never wrapped
    back = shift(moved, -dy, -dx, fill)
    assert torch.equal(back[m > 0], x[m > 0])  # everything under the mask comes back exactly


def test_a_centred_layer_is_evaluated_centred_and_aggregated_in_place():
    """With an identity 'denoiser' (eps chosen so that x0 = x), centring must not move anything."""
    schedule = Schedule([999.0], [0.5, 1.0], [0.5, 0.0], [0.0], [1.0])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(1, 1, 1, 8, 8)
    masks[..., 0:2, 0:3] = 1  # a corner: centring moves it
    white = torch.full((1, 4, 8, 8), 0.5)
    batch = step_inputs(x, x, 0, schedule, masks[0], [full_view(8, 8)], torch.ones(1, 1, dtype=torch.bool),
                        bootstrap_steps=1, centre=True, white=white)
    assert isinstance(batch, StepBatch) and batch.shifts == [(3, 3)]
    assert torch.equal(batch.inputs[0][..., 3:5, 3:6], x[..., 0:2, 0:3])  # the layer sits in the middle
    eps = [(batch.inputs[0] - 0.5 * batch.inputs[0]) / 0.5]  # x0 = (x - 0.5 eps) / 0.5 = x
    x0 = step_output(batch, eps, schedule, x.shape)
    torch.testing.assert_close(x0[..., 0:2, 0:3], x[..., 0:2, 0:3])
    assert (x0[..., 2:, :] == 0).all()  # nothing else is painted
