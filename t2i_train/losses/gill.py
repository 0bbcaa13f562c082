"""GILL's losses (Koh et al. 2023): captioning CE, [IMG]-token CE, retrieval InfoNCE and the mapper's distillation.

``L2Distill`` is the paper's "L2" distillation on its own (``loss=l2_distill``: train only the mapper's
objective); ``GILLLoss`` (``loss=gill``) is the full weighted sum, every term logged:

    loss = caption * l_c + (img_ret + img_gen) * l_p + contrastive * l_r + distill * l_g + target_mask * l_m

``l_p`` is the [IMG] pass's CE (caption tokens and [IMG0]); the paper's retrieval and generation passes read the
same sequence, so it is computed once and weighted by both (0.5 + 0.5). ``l_m`` (ours) is the BCE of the
mapper's real-position logits against the target's padding mask: our target encoder pads, Stable Diffusion's
does not.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from t2i_train.losses.base import Loss
from t2i_train.losses.clip_contrastive import CLIPContrastive
from t2i_train.losses.cross_entropy import IGNORE_INDEX


def l2_distill(mapped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of the per-token Euclidean distance ``||mapped - target||_2`` ([B, L, D] each).

    ``mask`` [B, L] (True on real tokens): the mean is over the real tokens only (every token when None, as
    for Stable Diffusion's 77 always-real positions)."""
    distance = (mapped.float() - target.float()).square().sum(dim=-1).clamp_min(1e-12).sqrt()
    if mask is None:
        return distance.mean()
    keep = mask.to(distance.dtype)
    return (distance * keep).sum() / keep.sum().clamp_min(1.0)


@torch.no_grad()
def token_cosine(
    mapped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean per-token cosine similarity of mapped and target tokens (over the real tokens)."""
    cosine = F.cosine_similarity(mapped.float(), target.float(), dim=-1)
    if mask is None:
        return cosine.mean()
    keep = mask.to(cosine.dtype)
    return (cosine * keep).sum() / keep.sum().clamp_min(1.0)


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE and arg-max accuracy over the labelled rows of logits [N, V] / targets [N]."""
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    logits, targets = logits[keep].float(), targets[keep]
    with torch.no_grad():
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
    return F.cross_entropy(logits, targets), accuracy


class L2Distill(Loss):
    """The distillation term alone: ``loss`` = ``distill`` (``l2_distill`` of ``mapped`` to ``target``), with
    ``cosine`` (per-token cosine) logged beside it."""

    config_name: ClassVar[str] = "l2_distill"

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = outputs.get("target_mask")
        distill = l2_distill(outputs["mapped"], outputs["target"], mask)
        cosine = token_cosine(outputs["mapped"].detach(), outputs["target"], mask)
        return {"loss": distill, "distill": distill.detach(), "cosine": cosine}


class GILLLoss(Loss):
    """GILL's total loss; weights as the paper's by default (``target_mask`` is ours, see the module docstring).

    The contrastive term is open_clip's symmetric InfoNCE over the features of every rank (all-gathered; this
    rank's shard keeps its gradient), as ``loss=clip_contrastive``.
    """

    config_name: ClassVar[str] = "gill"

    def __init__(
        self,
        caption: float = 1.0,
        img_ret: float = 0.5,
        img_gen: float = 0.5,
        contrastive: float = 1.0,
        distill: float = 1.0,
        target_mask: float = 0.1,
    ) -> None:
        super().__init__()
        self.weights = {
            "caption": caption,
            "img_ret": img_ret,
            "img_gen": img_gen,
            "contrastive": contrastive,
            "distill": distill,
            "target_mask": target_mask,
        }
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"loss weights must be >= 0, got {self.weights}")
        self.contrastive = CLIPContrastive(report_accuracy=True)
        self.distill = L2Distill()

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        w = self.weights
        caption, caption_acc = _ce(outputs["caption_logits"], outputs["caption_targets"])
        img, img_acc = _ce(outputs["img_logits"], outputs["img_targets"])
        retrieval = self.contrastive(outputs)
        distill = self.distill(outputs)
        mask_bce = F.binary_cross_entropy_with_logits(
            outputs["mask_logits"].float(), outputs["target_mask"].float()
        )
        total = (
            w["caption"] * caption
            + (w["img_ret"] + w["img_gen"]) * img
            + w["contrastive"] * retrieval["loss"]
            + w["distill"] * distill["loss"]
            + w["target_mask"] * mask_bce
        )
        return {
            "loss": total,
            "caption": caption.detach(),
            "caption_acc": caption_acc,
            "img_ce": img.detach(),
            "img_acc": img_acc,
            "contrastive": retrieval["contrastive"],
            "retrieval_acc": retrieval["accuracy_t2i"],
            "logit_scale": retrieval["logit_scale"],
            "distill": distill["distill"],
            "cosine": distill["cosine"],
            "target_mask": mask_bce.detach(),
        }
