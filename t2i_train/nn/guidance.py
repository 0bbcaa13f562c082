"""Classifier-free guidance (CFG) shared by every family that samples with a conditional/unconditional pair.

Convention: ``guided = uncond + s · (cond - uncond)``; ``s = 1`` is the plain conditional prediction and
``s = 0`` the unconditional one. Muse writes ``(1 + g)·cond - g·uncond``, i.e. ``s = 1 + g``.

Guidance schedules ramp the *extra* guidance ``s - 1`` over the sampling steps (Muse ramps guidance up while
decoding so early, high-entropy steps stay diverse):

- ``constant``: full scale at every step;
- ``linear``:   weight ``(t + 1) / T``;
- ``cosine``:   weight ``(1 - cos(π (t + 1) / T)) / 2`` (slow start, slow finish).
"""

from __future__ import annotations

import math

import torch

GUIDANCE_SCHEDULES = ("constant", "linear", "cosine")


def apply_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale · (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def guidance_weight(step: int, total_steps: int, schedule: str = "constant") -> float:
    """Fraction in (0, 1] of the extra guidance applied at ``step`` (0-based) of ``total_steps``."""
    if total_steps < 1 or not 0 <= step < total_steps:
        raise ValueError(f"step {step} is outside 0..{total_steps - 1}")
    progress = (step + 1) / total_steps
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return progress
    if schedule == "cosine":
        return (1.0 - math.cos(math.pi * progress)) / 2.0
    raise ValueError(f"unknown guidance schedule {schedule!r}; use one of {', '.join(GUIDANCE_SCHEDULES)}")


def guidance_scale_at(step: int, total_steps: int, scale: float, schedule: str = "constant") -> float:
    """The CFG scale ``s`` to use at ``step``: ``1 + (scale - 1) · guidance_weight(step, ...)``."""
    return 1.0 + (scale - 1.0) * guidance_weight(step, total_steps, schedule)
