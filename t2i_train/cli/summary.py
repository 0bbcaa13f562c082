"""`python -m t2i_train.summary [train overrides]`: parameter counts per component, as JSON.

The model is built on the meta device with weight loading switched off, so paper-size configs (billions of
parameters, pretrained encoders) are counted in seconds without memory or downloads.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from t2i_train.cli.common import CONF_DIR, check_group_choices, user_errors_exit
from t2i_train.weights import no_weight_loading

USAGE = """usage: python -m t2i_train.summary [overrides ...]

Prints parameter counts (total / trainable / frozen) of the model that `python -m t2i_train` would train with
the same overrides, per top-level component, as JSON. Example:
    python -m t2i_train.summary experiment=muse_3b
"""


def count(module: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def summarize(model: nn.Module) -> dict[str, Any]:
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


def compose_train_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_on_meta(cfg: DictConfig) -> nn.Module:
    with no_weight_loading(), torch.device("meta"):
        return instantiate(cfg.model, _convert_="all")


@user_errors_exit
def run(overrides: list[str]) -> dict[str, Any]:
    cfg = compose_train_config(overrides)
    return summarize(build_on_meta(cfg))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    check_group_choices(argv)
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
