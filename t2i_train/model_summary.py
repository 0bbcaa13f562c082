"""Parameter counts of a family per top-level component, for a model built on the meta device.

``build_on_meta(model_cfg)`` builds a family with weight loading switched off on the meta device, so
paper-size configs (billions of parameters, pretrained encoders) are counted in seconds without memory or
downloads; ``summarize(model)`` counts total / trainable / frozen parameters. ``python -m t2i_train.summary``
(``t2i_train.cli.summary``) composes the training config and prints ``summarize``'s result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from t2i_train.models.loading import no_weight_loading


def count(module: nn.Module) -> dict[str, int]:
    """Total, trainable (``requires_grad``) and frozen parameters of ``module``."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def summarize(model: nn.Module) -> dict[str, Any]:
    """``count`` of the model and of each top-level component holding parameters (with whether the family
    froze it), plus the model's own direct parameters."""
    frozen = set(getattr(model, "frozen_modules", dict)().keys())
    components = {}
    for name, child in model.named_children():
        counts = count(child)
        if counts["total"]:
            components[name] = {**counts, "frozen_component": name in frozen}
    direct = [p for n, p in model.named_parameters(recurse=False)]
    if direct:
        components["(own parameters)"] = {
            "total": sum(p.numel() for p in direct),
            "trainable": sum(p.numel() for p in direct if p.requires_grad),
            "frozen": sum(p.numel() for p in direct if not p.requires_grad),
            "frozen_component": False,
        }
    return {
        "family": getattr(model, "family_name", type(model).__name__),
        **count(model),
        "components": components,
    }


def build_on_meta(cfg: Any) -> nn.Module:
    """The family of a training config (its ``model`` node) on the meta device, loading no weights."""
    from hydra.utils import instantiate

    with no_weight_loading(), torch.device("meta"):
        return instantiate(cfg.model, _convert_="all")
