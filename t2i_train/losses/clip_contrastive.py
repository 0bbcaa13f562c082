"""CLIP's symmetric InfoNCE loss, as open_clip trains it (``open_clip.loss.ClipLoss``).

Under DDP / FSDP2 the features of every rank are gathered, so each image is contrasted against the captions
of the global batch. ``local_loss`` computes only the local rows of the logit matrix (memory O(B·global B)
instead of O(global B²)); ``gather_with_grad`` back-propagates through the gather (needed with
``local_loss``, see open_clip's README). Rank and world size are read from ``torch.distributed`` at every
call: the process group only exists once the trainer has started, after this loss was built.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss

from t2i_train.losses.base import Loss


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CLIPContrastive(Loss):
    """Terms: ``loss`` (= ``contrastive``), ``logit_scale`` and, with ``report_accuracy``, the in-batch top-1
    retrieval accuracies ``accuracy`` (image -> text) and ``accuracy_t2i`` (text -> image) on this rank's
    batch (a duplicate caption counts as a miss)."""

    config_name: ClassVar[str] = "clip_contrastive"

    def __init__(
        self, local_loss: bool = False, gather_with_grad: bool = False, report_accuracy: bool = True
    ) -> None:
        super().__init__()
        self.clip_loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True)
        self.report_accuracy = report_accuracy

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.clip_loss.rank, self.clip_loss.world_size = _rank_and_world()
        image = outputs["image_features"].float()
        text = outputs["text_features"].float()
        scale = outputs["logit_scale"].float()
        bias = outputs.get("logit_bias")
        loss = self.clip_loss(image, text, scale, None if bias is None else bias.float())
        terms = {"loss": loss, "contrastive": loss.detach(), "logit_scale": scale.detach().reshape(())}
        if self.report_accuracy:
            terms.update(in_batch_accuracy(image.detach(), text.detach()))
        return terms


@torch.no_grad()
def in_batch_accuracy(image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-1 retrieval accuracy within the batch: image i should pick caption i, and caption i image i."""
    similarity = image @ text.T
    target = torch.arange(similarity.shape[0], device=similarity.device)
    return {
        "accuracy": (similarity.argmax(dim=1) == target).float().mean(),
        "accuracy_t2i": (similarity.argmax(dim=0) == target).float().mean(),
    }
