"""Learning-rate schedules (used through ``t2i_train/conf/scheduler/*.yaml`` with ``_partial_: true``)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up to the base lr over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` × base lr."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int) -> LambdaLR:
    """Linear warm-up, then the base lr."""
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def warmup_step_decay(
    optimizer: torch.optim.Optimizer, warmup_steps: int, step_size: int, gamma: float = 0.1
) -> LambdaLR:
    """Linear warm-up, then × ``gamma`` every ``step_size`` steps (GILL's schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return gamma ** ((step - warmup_steps) // step_size)

    return LambdaLR(optimizer, factor)
