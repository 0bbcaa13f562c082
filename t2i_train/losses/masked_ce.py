"""Cross-entropy over masked token positions only (Muse / MaskGIT)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from t2i_train.losses.base import Loss


class MaskedCrossEntropy(Loss):
    """CE between ``logits`` [B, N, K] and ``targets`` [B, N] at positions where ``mask`` [B, N] is True.

    The mean is over all masked tokens of the batch (not a mean of per-example means), so every masked token
    weighs the same. Also reports ``masked_acc``, the arg-max accuracy on the masked tokens (no gradient).
    """

    config_name: ClassVar[str] = "masked_ce"

    def __init__(self, label_smoothing: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = outputs["mask"].bool()
        logits = outputs["logits"][mask].float()
        targets = outputs["targets"][mask]
        ce = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(dim=-1) == targets).float().mean()
        return {"loss": ce, "masked_ce": ce.detach(), "masked_acc": acc}
