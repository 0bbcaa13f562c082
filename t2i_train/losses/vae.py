"""KL autoencoder loss: reconstruction + a small KL pull of the posterior towards N(0, I).

    loss = l1_weight·|x - x̂| + l2_weight·(x - x̂)² + perceptual_weight·P(x, x̂) + kl_weight·KL / (3·H·W)

Reconstruction terms are means over pixels. The KL is summed over latent elements per image and divided by
the image's pixel-element count, so ``kl_weight`` means what it means in Stable Diffusion's loss (which
sums both terms per image): 1e-6 there. ``P`` is the LPIPS-style VGG16 distance of the VQGAN loss (needs
the torchvision weights file on disk; nothing is downloaded).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from t2i_train.losses.base import Loss
from t2i_train.losses.vqgan import VGGPerceptual, find_vgg_weights
from t2i_train.models.loading import weight_loading_enabled


class VAELoss(Loss):
    config_name: ClassVar[str] = "vae"

    def __init__(
        self,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        kl_weight: float = 1.0e-6,
        perceptual_weight: float = 0.0,
        perceptual_weights: str | None = None,
    ) -> None:
        super().__init__()
        if min(l1_weight, l2_weight, kl_weight, perceptual_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        self.l1_weight, self.l2_weight = l1_weight, l2_weight
        self.kl_weight, self.perceptual_weight = kl_weight, perceptual_weight
        self._perceptual: VGGPerceptual | None = None
        if perceptual_weight > 0 and weight_loading_enabled():
            # outside the module tree: frozen, never saved in checkpoints (as in the VQGAN loss)
            object.__setattr__(self, "_perceptual", VGGPerceptual(find_vgg_weights(perceptual_weights)))

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, x_hat = outputs["inputs"].float(), outputs["reconstructions"].float()
        l1 = (x - x_hat).abs().mean()
        l2 = (x - x_hat).pow(2).mean()
        kl = outputs["kl"].float().mean() / x[0].numel()
        total = self.l1_weight * l1 + self.l2_weight * l2 + self.kl_weight * kl
        terms = {"rec_l1": l1.detach(), "rec_l2": l2.detach(), "kl": kl.detach()}
        if self.perceptual_weight > 0 and self._perceptual is not None:
            if self._perceptual.mean.device != x.device:
                self._perceptual.to(x.device)
            perceptual = self._perceptual(x, x_hat)
            total = total + self.perceptual_weight * perceptual
            terms["perceptual"] = perceptual.detach()
        with torch.no_grad():
            mse = (x.clamp(-1, 1) - x_hat.clamp(-1, 1)).pow(2).mean() / 4  # images in [-1, 1] -> [0, 1] scale
            terms["psnr"] = -10 * torch.log10(mse.clamp_min(1e-10))
        return {"loss": total, **terms}
