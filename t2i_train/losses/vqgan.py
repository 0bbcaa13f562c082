"""VQGAN loss: reconstruction + vector-quantization terms, optional perceptual and adversarial terms.

Generator total (Esser et al., Taming Transformers):
    rec = l1_weight*|x - x̂| + l2_weight*(x - x̂)^2 + perceptual_weight*P(x, x̂)
    loss = rec + codebook_weight*vq_loss + [step >= disc_start] * adversarial_weight * λ * (-mean D(x̂))
with the adaptive weight λ = |∇_L rec| / (|∇_L g_adv| + 1e-4) at the decoder's output layer L, clamped to
[0, adaptive_weight_max] and detached. The discriminator minimises the hinge loss
    0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(sg(x̂)))).

``forward(outputs)`` (used by the single-optimizer task and for validation) gives the terms without the
adversarial part. ``generator_terms`` / ``discriminator_terms`` are what ``GANTask`` calls.

The perceptual term is an LPIPS-style distance on frozen ImageNet VGG16 features (channel-normalised, equal
layer weights: no learned linear heads). It needs the torchvision VGG16 weights file on disk, either at
``perceptual_weights`` or in torch hub's cache; nothing is downloaded. Without it a positive
``perceptual_weight`` is a ConfigError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i_train.errors import ConfigError
from t2i_train.losses.base import Loss
from t2i_train.models.loading import weight_loading_enabled

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's name for the ImageNet VGG16 weights
_STAT_KEYS = (
    "codebook_loss",
    "commitment_loss",
    "perplexity",
    "usage_fraction",
    "alive_fraction",
    "restarted",
)


class VGGPerceptual(nn.Module):
    """LPIPS-style distance: squared difference of unit-normalised VGG16 features at 5 ReLU stages."""

    STAGE_ENDS = (4, 9, 16, 23, 30)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features

    def __init__(self, weights_path: Path) -> None:
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16(weights=None).features
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        features.load_state_dict(
            {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        )
        self.features = features[: self.STAGE_ENDS[-1]].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = (torch.cat([x, y]).float() + 1.0) / 2.0
        h = (h - self.mean) / self.std
        total = h.new_zeros(())
        start = 0
        for end in self.STAGE_ENDS:
            h = self.features[start:end](h)
            a, b = F.normalize(h, dim=1, eps=1e-10).chunk(2)
            total = total + (a - b).pow(2).sum(1).mean()
            start = end
        return total


def find_vgg_weights(path: str | None) -> Path:
    candidates = (
        [Path(path).expanduser()] if path else [Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"loss.perceptual_weight>0 needs ImageNet VGG16 weights, not found at {candidates[0]} "
        f"(put torchvision's {VGG16_FILE} there or set loss.perceptual_weights=PATH, or loss.perceptual_weight=0)"
    )


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """|∇ rec_loss| / (|∇ g_loss| + 1e-4) at ``last_layer``, clamped and detached (balances the GAN term)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class VQGANLoss(Loss):
    config_name = "vqgan"

    def __init__(
        self,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        codebook_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        perceptual_weights: str | None = None,
        adversarial_weight: float = 0.0,
        disc_start: int = 0,
        adaptive: bool = True,
        adaptive_weight_max: float = 1e4,
    ) -> None:
        super().__init__()
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight
        self.codebook_weight = codebook_weight
        self.perceptual_weight = perceptual_weight
        self.adversarial_weight = adversarial_weight
        self.disc_start = disc_start
        self.adaptive = adaptive
        self.adaptive_weight_max = adaptive_weight_max
        self._perceptual: VGGPerceptual | None = None
        if perceptual_weight > 0 and weight_loading_enabled():
            # Held outside the module tree: frozen, never saved in checkpoints, moved lazily to the data device.
            object.__setattr__(self, "_perceptual", VGGPerceptual(find_vgg_weights(perceptual_weights)))

    def _perceptual_distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        net = self._perceptual
        if net is None:
            return x.new_zeros((), dtype=torch.float32)
        if net.mean.device != x.device:
            net.to(x.device)
        return net(x, y)

    # -------------------------------------------------------------------------------------------- terms
    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reconstruction + VQ terms (no adversarial part): the whole loss when there is no discriminator."""
        x, x_hat = outputs["inputs"].float(), outputs["reconstructions"].float()
        l1 = (x - x_hat).abs().mean()
        l2 = (x - x_hat).pow(2).mean()
        rec = self.l1_weight * l1 + self.l2_weight * l2
        terms = {"rec_l1": l1, "rec_l2": l2}
        if self.perceptual_weight > 0:
            terms["perceptual"] = self._perceptual_distance(x, x_hat)
            rec = rec + self.perceptual_weight * terms["perceptual"]
        terms["rec_loss"] = rec
        terms["vq_loss"] = outputs["vq_loss"]
        # PSNR in dB for images in [0, 1] (inputs live in [-1, 1], so the range is 2).
        terms["psnr"] = 10.0 * torch.log10(4.0 / l2.detach().clamp_min(1e-10))
        terms.update({k: outputs[k].detach() for k in _STAT_KEYS if k in outputs})
        terms["loss"] = rec + self.codebook_weight * outputs["vq_loss"]
        return terms

    def discriminator_active(self, step: int) -> bool:
        return self.adversarial_weight > 0 and step >= self.disc_start

    def generator_terms(
        self, outputs: dict[str, torch.Tensor], model: Any, step: int
    ) -> dict[str, torch.Tensor]:
        """Generator (autoencoder) terms; adds the adaptive-weighted adversarial term once D is active."""
        terms = self.forward(outputs)
        if not self.discriminator_active(step):
            return terms
        g_adv = -model.discriminate(outputs["reconstructions"]).float().mean()
        if self.adaptive and torch.is_grad_enabled():
            weight = adaptive_weight(terms["rec_loss"], g_adv, model.last_layer, self.adaptive_weight_max)
        else:
            weight = g_adv.new_ones(())
        terms["g_adv"] = g_adv
        terms["adaptive_weight"] = weight
        terms["loss"] = terms["loss"] + self.adversarial_weight * weight * g_adv
        return terms

    def discriminator_terms(
        self, outputs: dict[str, torch.Tensor], model: Any, step: int
    ) -> dict[str, torch.Tensor] | None:
        """Hinge loss on real inputs vs detached reconstructions; None before ``disc_start``."""
        if not self.discriminator_active(step):
            return None
        real = model.discriminate(outputs["inputs"].detach()).float()
        fake = model.discriminate(outputs["reconstructions"].detach()).float()
        loss = hinge_discriminator_loss(real, fake)
        return {"loss": loss, "logits_real": real.mean().detach(), "logits_fake": fake.mean().detach()}
