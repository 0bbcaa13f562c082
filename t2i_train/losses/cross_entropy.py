"""Next-token cross-entropy of a language model, on the labelled positions only (the captioner)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from t2i_train.losses.base import Loss

IGNORE_INDEX = -100


class NextTokenCrossEntropy(Loss):
    """CE between ``logits`` [B, T, V] and ``targets`` [B, T], where ``targets`` already holds the *next*
    token of each position and ``IGNORE_INDEX`` (-100) where nothing is predicted (image prefix, style prompt,
    padding).

    The mean is over every labelled token of the batch, so long captions weigh more than short ones, as in
    language-model training. Also reports ``token_acc``, the arg-max accuracy on those tokens, and
    ``tokens``, how many there were.
    """

    config_name: ClassVar[str] = "cross_entropy"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        targets = outputs["targets"]
        keep = targets != IGNORE_INDEX
        logits = outputs["logits"][keep].float()
        labels = targets[keep]
        if labels.numel() == 0:  # no sample of the batch had a caption of its style: nothing to learn
            zero = outputs["logits"].sum() * 0.0
            return {"loss": zero, "ce": zero.detach(), "token_acc": zero.detach(), "tokens": zero.detach()}
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(dim=-1) == labels).float().mean()
        tokens = torch.tensor(float(labels.numel()), device=ce.device)
        return {"loss": ce, "ce": ce.detach(), "token_acc": acc, "tokens": tokens}
