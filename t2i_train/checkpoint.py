"""Reading families back from training checkpoints.

A training checkpoint is Lightning's ``.ckpt`` with two additions written by the task:
``checkpoint["t2i_config"]`` (the whole resolved Hydra config as plain containers) and, when EMA is on,
``checkpoint["ema"]`` (EMA weights keyed like ``model.state_dict()``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from t2i_train.errors import CheckpointError
from t2i_train.models.base import Family


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass the path of a .ckpt written by training)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if "t2i_config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a t2i_train checkpoint (no t2i_config/state_dict inside)")
    return ckpt


def _without_stage1_paths(node: Any) -> Any:
    """Copy of a model config with every ``*_checkpoint`` path set to None.

    The weights of stage-1 parts are inside the checkpoint's state dict, so rebuilding the architecture
    must not require the stage-1 files to still exist.
    """
    if isinstance(node, dict):
        return {
            k: (None if k.endswith("_checkpoint") and isinstance(v, str) else _without_stage1_paths(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_without_stage1_paths(v) for v in node]
    return node


def model_state_dict(ckpt: dict[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if use_ema and ckpt.get("ema"):
        state.update(ckpt["ema"])
    return state


def load_family(path: str | Path, use_ema: bool = True) -> Family:
    """Rebuild the family stored in a training checkpoint, with its (EMA) weights, in eval mode."""
    ckpt = read_checkpoint(path)
    model_cfg = _without_stage1_paths(ckpt["t2i_config"]["model"])
    model = instantiate(model_cfg, _convert_="all")
    missing, unexpected = model.load_state_dict(model_state_dict(ckpt, use_ema), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its model config: missing={list(missing)[:5]} unexpected={list(unexpected)[:5]}"
        )
    return model.eval()
