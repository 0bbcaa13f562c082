"""Loss contract: a small module mapping a family's training outputs to named terms.

``loss(outputs) -> dict[str, Tensor]`` where ``outputs`` is what ``Family.forward(batch)`` returned and the
result holds every term to log plus ``loss``, the total that is back-propagated. ``config_name`` is the name of
the loss in ``t2i_train/conf/loss/`` and is used in error messages.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class Loss(nn.Module):
    config_name: ClassVar[str] = "loss"

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError
