"""Muse's training mask schedule, its parallel-decoding schedule and the CFG helper."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from t2i_train.models.muse import cosine_mask_counts, decode_schedule, random_token_mask
from t2i_train.nn.guidance import apply_cfg, guidance_scale_at, guidance_weight


# ---------------------------------------------------------------------------------------- training masks
def test_mask_counts_bounds_and_extremes() -> None:
    n = 64
    u = torch.tensor([0.0, 0.25, 0.5, 0.999999, 1.0])
    counts = cosine_mask_counts(u, n)
    assert counts.dtype == torch.long
    assert counts[0] == n  # u=0: everything masked
    assert counts[1] == round(math.cos(math.pi / 8) * n)
    assert counts[2] == round(math.cos(math.pi / 4) * n)
    assert counts[3] == 1 and counts[4] == 1  # r → 0 still masks one token
    big = cosine_mask_counts(torch.rand(10_000, generator=torch.Generator().manual_seed(0)), n)
    assert big.min() >= 1 and big.max() <= n


def test_mask_counts_follow_cosine_mean() -> None:
    n = 256
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(1))
    ratio = cosine_mask_counts(u, n).double().mean() / n
    assert ratio.item() == pytest.approx(2 / math.pi, abs=0.005)  # E[cos(πu/2)] = 2/π


def test_random_token_mask_exact_counts_and_uniform_positions() -> None:
    n, b = 16, 20_000
    counts = torch.randint(1, n + 1, (b,), generator=torch.Generator().manual_seed(2))
    mask = random_token_mask(counts, n, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (b, n) and mask.dtype == torch.bool
    assert torch.equal(mask.sum(1), counts)
    # every position is equally likely to be masked
    per_position = mask.double().mean(0)
    expected = counts.double().mean() / n
    assert torch.allclose(per_position, torch.full_like(per_position, expected.item()), atol=0.015)


# ------------------------------------------------------------------------------------- decoding schedule
@pytest.mark.parametrize(("n", "steps"), [(64, 12), (256, 24), (16, 16), (64, 1), (4096, 8), (10, 9)])
def test_decode_schedule_last_step_fills_every_token(n: int, steps: int) -> None:
    counts = decode_schedule(n, steps)
    assert len(counts) == steps
    assert counts[-1] == 0
    assert all(c >= 1 for c in counts[:-1])  # nothing is finished before the last step
    previous = [n, *counts[:-1]]
    assert all(c < p for c, p in zip(counts, previous))  # strictly decreasing: each step reveals ≥ 1


def test_decode_schedule_matches_cosine_where_unclamped() -> None:
    n, steps = 256, 12
    counts = decode_schedule(n, steps)
    for t in range(steps - 1):
        assert counts[t] == math.floor(n * math.cos(math.pi / 2 * (t + 1) / steps))


def test_decode_schedule_clamps() -> None:
    # N = T = 8: the raw cosine counts are 7, 7, 6, 5, 4, 3, 1 (a repeat, then a jump); clamping to
    # [1, previous - 1] makes every step reveal exactly one token
    raw = [math.floor(8 * math.cos(math.pi / 2 * (t + 1) / 8)) for t in range(7)]
    assert raw == [7, 7, 6, 5, 4, 3, 1]
    assert decode_schedule(8, 8) == [7, 6, 5, 4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="exceeds"):
        decode_schedule(4, 5)
    with pytest.raises(ValueError):
        decode_schedule(4, 0)


# ---------------------------------------------------------------------------------------------------- CFG
def test_cfg_formula() -> None:
    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(apply_cfg(cond, uncond, 1.0), cond)
    assert torch.equal(apply_cfg(cond, uncond, 0.0), uncond)
    assert torch.allclose(apply_cfg(cond, uncond, 3.0), torch.tensor([4.0, -5.0]))
    # Muse's (1+g)·cond - g·uncond is s = 1 + g
    g = 2.0
    assert torch.allclose(apply_cfg(cond, uncond, 1 + g), (1 + g) * cond - g * uncond)


def test_guidance_schedules() -> None:
    steps = 8
    for schedule in ("constant", "linear", "cosine"):
        weights = [guidance_weight(t, steps, schedule) for t in range(steps)]
        assert weights[-1] == pytest.approx(1.0)  # full guidance at the last step
        assert all(0 < w <= 1 for w in weights)
        assert all(b >= a for a, b in itertools.pairwise(weights))  # ramps up, never down
    assert [guidance_weight(t, 4, "linear") for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert guidance_weight(0, 4, "constant") == 1.0
    assert guidance_weight(1, 4, "cosine") == pytest.approx(0.5)
    assert guidance_weight(0, 4, "cosine") < guidance_weight(0, 4, "linear")
    assert guidance_scale_at(0, 4, 5.0, "linear") == pytest.approx(2.0)  # 1 + (5 - 1)·0.25
    assert guidance_scale_at(3, 4, 5.0, "linear") == pytest.approx(5.0)
    assert guidance_scale_at(0, 4, 1.0, "cosine") == 1.0
    with pytest.raises(ValueError, match="unknown guidance schedule"):
        guidance_weight(0, 4, "exponential")
    with pytest.raises(ValueError):
        guidance_weight(4, 4, "linear")
