"""Denoising loss of latent diffusion: MSE between the UNet's prediction and its target (ε or v).

Optional min-SNR-γ weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"):
a timestep with signal-to-noise ratio SNR(t) = ᾱ_t / (1 - ᾱ_t) weighs

- ε-prediction: ``min(SNR, γ) / SNR``
- v-prediction: ``min(SNR, γ) / (SNR + 1)``

so the many nearly-noiseless timesteps stop dominating the gradient; γ = 5 in the paper.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from t2i_train.losses.base import Loss


def min_snr_weights(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-γ for ε- (``v_prediction=False``) or v-prediction."""
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr.clamp_min(1e-12)


class DiffusionMSE(Loss):
    """Reads ``pred``, ``target`` [B, ...], ``snr`` [B] and ``v_prediction`` (a bool tensor) from the family."""

    config_name: ClassVar[str] = "diffusion_mse"

    def __init__(self, min_snr_gamma: float | None = None) -> None:
        super().__init__()
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"loss.min_snr_gamma must be > 0 or null, got {min_snr_gamma}")
        self.min_snr_gamma = min_snr_gamma

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred, target = outputs["pred"].float(), outputs["target"].float()
        per_sample = (pred - target).pow(2).flatten(1).mean(1)
        mse = per_sample.mean()
        if self.min_snr_gamma is None:
            return {"loss": mse, "mse": mse.detach()}
        weights = min_snr_weights(outputs["snr"].float(), self.min_snr_gamma, bool(outputs["v_prediction"]))
        return {"loss": (weights * per_sample).mean(), "mse": mse.detach()}
