"""The CM3 objective's loss: next-token cross-entropy weighted per target (CM3leon)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from t2i_train.losses.base import Loss


class CM3Loss(Loss):
    """``sum(w · CE(logits, targets)) / sum(w)`` with the family's ``weights`` [B, L]: 0 on padding and where
    the target is a sentinel (CM3: a sentinel only marks where a span was), ``retrieved_weight`` on the tokens
    of retrieved documents, 1 elsewhere. Logs the CE on image and on text targets apart (``ce_image``,
    ``ce_text``) and the number of weighted ``tokens``."""

    config_name: ClassVar[str] = "cm3"

    def __init__(self, z_loss: float = 0.0) -> None:
        super().__init__()
        if z_loss < 0:
            raise ValueError(f"z_loss must be >= 0, got {z_loss}")
        self.z_loss = z_loss

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, targets = outputs["logits"].float(), outputs["targets"]
        weights = outputs["weights"].float()
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(weights)
        total = weights.sum().clamp(min=1e-8)
        loss = (ce * weights).sum() / total
        terms = {"ce": loss.detach(), "tokens": weights.sum().detach()}
        if self.z_loss > 0:  # keeps the softmax normaliser near 1 (Lumina-mGPT / PaLM: 1e-5)
            z = (logits.logsumexp(-1) ** 2 * weights).sum() / total
            loss = loss + self.z_loss * z
            terms["z_loss"] = z.detach()
        image = outputs.get("image_targets")
        if image is not None:
            with torch.no_grad():
                for name, part in (("ce_image", image), ("ce_text", ~image)):
                    w = weights * part.float()
                    terms[name] = (ce * w).sum() / w.sum().clamp(min=1e-8)
        return {"loss": loss, **terms}
