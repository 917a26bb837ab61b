"""The arithmetic of a hires pass (docs/large-pictures.md "Two passes: hires"), without torch: the
larger canvas, and the tail of a schedule a denoising strength keeps.

The second pass is an img2img: its clean start is noised to the level of the first step kept and
the shared step loop (`sampler.sample`) runs the rest of the schedule.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

S = TypeVar("S")


def hires_size(width: int, height: int, scale: float, multiple: int) -> tuple[int, int]:
    """The canvas `scale` times `width` x `height`, each side rounded to a `multiple` of the
    model's grid (its VAE factor, times its patch on SD3 and FLUX.1)."""
    def side(n: int) -> int:
        return max(multiple, round(n * scale / multiple) * multiple)

    return side(width), side(height)


def kept_steps(steps: int, strength: float) -> int:
    """How many of `steps` a pass from `strength` runs: the last `int(steps * strength)`, as
    diffusers' img2img pipelines cut theirs (0: the start comes back as it is)."""
    return min(int(steps * strength), steps)


def cut_schedule(schedule: S, strength: float) -> S:
    """The tail of a `sampler.Schedule` that a pass from `strength` runs: its last `kept_steps`
    steps, with their levels, scalings and the level the last step lands on."""
    start = len(schedule) - kept_steps(len(schedule), strength)  # type: ignore[arg-type]
    s = schedule
    return dataclasses.replace(s, timesteps=s.timesteps[start:], alphas=s.alphas[start:],  # type: ignore
                               sigmas=s.sigmas[start:], c_skip=s.c_skip[start:], c_out=s.c_out[start:], init_scale=1.0)
