"""Pixel-level reconstruction quality (PSNR) for the VQGAN / VAE reconstruction report."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio


class PSNR(NamedTuple):
    """PSNR in dB: one value per image, and their mean."""

    per_image: torch.Tensor  # [B], float32 on the CPU
    mean: float


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> PSNR:
    """PSNR of each image of `x` against the same image of `y` ([B,C,H,W] or a single [C,H,W]).

    `data_range` is max - min of the pixel scale: 1.0 for [0, 1], 2.0 for [-1, 1], 255 for uint8.
    The mean is the average of per-image PSNRs (the usual reconstruction report), not the PSNR of
    the pooled MSE. Identical images give +inf (and so does the mean if any image is exact).
    """
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() == 3:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected [B,C,H,W] or [C,H,W], got {tuple(x.shape)}")
    per_image = peak_signal_noise_ratio(
        x.detach().float(), y.detach().float(), data_range=data_range, reduction="none", dim=(1, 2, 3)
    )
    per_image = per_image.reshape(-1).cpu()
    return PSNR(per_image=per_image, mean=float(per_image.mean()))
