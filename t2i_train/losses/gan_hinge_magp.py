"""GALIP's adversarial loss: hinge terms with a mismatch term and the matching-aware gradient penalty (MA-GP).

With D(f, e) = NetC(NetD(f), e) on frozen-CLIP tap features f = C(x) and sentence embeddings e:

    D loss = L_real + (L_fake + L_mis) / 2 + MA-GP
      L_real = mean relu(1 - D(C(x), e))
      L_fake = mean relu(1 + D(sg(C(G(z, e))), e))
      L_mis  = mean relu(1 + D(C(x), ê)),   ê = e rolled by one over the batch (ê_i = e_{i+1})
      MA-GP  = k · mean_i ‖[∇_{C(x)} D ; ∇_e D]_i‖₂^p   (one joint norm per sample over both gradients)
    G loss = -mean D(C(G(z, e)), e) - λ · mean cos(CLIP_img(G(z, e)), e)

Defaults k=2, p=6, λ=4 (Tao et al. 2023). ``discriminator_terms`` / ``generator_terms`` are what
``t2i_train.gan_task.GANTask`` calls; ``forward`` (validation) gives the CLIP alignment of the generated
images, which needs no discriminator.

Mixed precision: the penalty's gradients are taken of the float32-cast scores; under float16 autocast the
scores are multiplied by ``fp16_gp_scale`` before ``autograd.grad`` (and the gradients divided back in float32)
so small gradients do not underflow in the half-precision backward; the norm is always computed in float32.
Lightning's GradScaler only scales the final ``loss`` given to ``manual_backward``, so it does not interact
with this inner ``autograd.grad``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from t2i_train.losses.base import Loss


def discriminator_scores(model: Any, features: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """D(f, e) as float32 [B] through the family's ``discriminator`` (NetD) and ``netc`` (NetC)."""
    return model.netc(model.discriminator(features), text_emb).float()


def mismatched(text_emb: torch.Tensor) -> torch.Tensor:
    """The batch's sentence embeddings rolled by one (row i gets row i+1's), detached."""
    return torch.roll(text_emb.detach(), shifts=-1, dims=0)


def matching_aware_gp(
    scores: torch.Tensor,
    features: torch.Tensor,
    text_emb: torch.Tensor,
    weight: float = 2.0,
    power: float = 6.0,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """``weight · mean(‖[∇_f D ; ∇_e D]‖₂^power)`` with one norm per sample over both flattened gradients.

    ``scores`` [B] must have been computed from the leaves ``features`` and ``text_emb`` (which require
    grad). The penalty keeps its graph (``create_graph``) so it is trained through. ``‖g‖^p`` is evaluated as
    ``(Σ g²)^{p/2}``, which has a gradient at g = 0 where the square root would not.
    """
    grads = torch.autograd.grad(
        scores.sum() * grad_scale, (features, text_emb), create_graph=True, retain_graph=True
    )
    flat = torch.cat([g.float().flatten(1) for g in grads], dim=1) / grad_scale
    return weight * flat.pow(2).sum(dim=1).pow(power / 2.0).mean()


class GanHingeMAGP(Loss):
    """Hinge + mismatch + MA-GP for the discriminator, adversarial + CLIP alignment for the generator.

    Args:
        gp_weight: k of MA-GP (2). gp_power: p (6).
        clip_weight: λ of the generator's CLIP alignment term (4).
        mismatch_weight: weight of L_mis inside ``(L_fake + L_mis) / 2`` (1; 0 drops it).
        fp16_gp_scale: factor on the scores before the penalty's ``autograd.grad`` when they come out of a
            float16 autocast (see the module docstring).
    """

    config_name = "gan_hinge_magp"

    def __init__(
        self,
        gp_weight: float = 2.0,
        gp_power: float = 6.0,
        clip_weight: float = 4.0,
        mismatch_weight: float = 1.0,
        fp16_gp_scale: float = 1024.0,
    ) -> None:
        super().__init__()
        self.gp_weight = gp_weight
        self.gp_power = gp_power
        self.clip_weight = clip_weight
        self.mismatch_weight = mismatch_weight
        self.fp16_gp_scale = fp16_gp_scale

    def clip_alignment(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """mean cos(CLIP_img(G(z, e)), e)."""
        return F.cosine_similarity(outputs["fake_emb"].float(), outputs["text_emb"].float(), dim=-1).mean()

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Validation terms (no discriminator needed): the CLIP alignment of the generated images."""
        align = self.clip_alignment(outputs)
        return {"g_clip_align": align, "loss": -self.clip_weight * align}

    def discriminator_terms(
        self, outputs: dict[str, torch.Tensor], model: Any, step: int
    ) -> dict[str, torch.Tensor]:
        text_emb = outputs["text_emb"].detach()
        real = outputs["real_features"].detach()
        penalise = torch.is_grad_enabled() and self.gp_weight > 0
        if penalise:
            real = real.clone().requires_grad_(True)
            text_emb = text_emb.clone().requires_grad_(True)
        h_real = model.discriminator(real)
        raw_real = model.netc(h_real, text_emb)
        s_real = raw_real.float()
        s_mis = model.netc(h_real, mismatched(text_emb)).float()
        s_fake = discriminator_scores(model, outputs["fake_features"].detach(), text_emb.detach())
        d_real = F.relu(1.0 - s_real).mean()
        d_fake = F.relu(1.0 + s_fake).mean()
        d_mis = F.relu(1.0 + s_mis).mean()
        if penalise:
            scale = self.fp16_gp_scale if raw_real.dtype == torch.float16 else 1.0
            gp = matching_aware_gp(s_real, real, text_emb, self.gp_weight, self.gp_power, scale)
        else:
            gp = s_real.new_zeros(())
        loss = d_real + (d_fake + self.mismatch_weight * d_mis) / 2.0 + gp
        return {
            "loss": loss,
            "d_real": d_real,
            "d_fake": d_fake,
            "d_mismatch": d_mis,
            "ma_gp": gp,
            "score_real": s_real.mean().detach(),
            "score_fake": s_fake.mean().detach(),
            "score_mismatch": s_mis.mean().detach(),
        }

    def generator_terms(
        self, outputs: dict[str, torch.Tensor], model: Any, step: int
    ) -> dict[str, torch.Tensor]:
        text_emb = outputs["text_emb"].detach()
        g_adv = -discriminator_scores(model, outputs["fake_features"], text_emb).mean()
        align = self.clip_alignment(outputs)
        return {"loss": g_adv - self.clip_weight * align, "g_adv": g_adv, "g_clip_align": align}
