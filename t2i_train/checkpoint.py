"""Reading families back from training checkpoints and exported weights.

A training checkpoint is Lightning's ``.ckpt`` with two additions written by the task:
``checkpoint["t2i_config"]`` (the whole resolved Hydra config as plain containers) and, when EMA is on,
``checkpoint["ema"]`` (EMA weights keyed like ``model.state_dict()``).

An export (``python -m t2i_train.export``) is a folder: ``model.safetensors`` (the consolidated weights, EMA
when the run had it), ``config.yaml`` (the resolved config) and ``export.json``. Everything that reads a
checkpoint accepts either form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from t2i_train.errors import CheckpointError
from t2i_train.models.base import Family

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint folder (FSDP2 / ModelParallelStrategy)
LIGHTNING_META = "meta.pt"  # the non-tensor part Lightning writes beside a distributed checkpoint


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training ``.ckpt`` or an export folder, as a dict with ``t2i_config`` and ``state_dict``."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / EXPORT_WEIGHTS).is_file():
        return read_export(path)
    if path.is_dir() and (path / DCP_METADATA).is_file():
        return read_distributed_checkpoint(path)
    if path.is_dir() and (path / "checkpoint").is_dir():
        return read_deepspeed_checkpoint(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder without {EXPORT_WEIGHTS}; pass a .ckpt file or a folder written by t2i_train.export"
        )
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


def load_family(path: str | Path, use_ema: bool = True, ckpt: dict[str, Any] | None = None) -> Family:
    """Rebuild the family stored in a training checkpoint, with its (EMA) weights, in eval mode.

    ``ckpt``: the already-read checkpoint at ``path`` (saves reading a big file twice).
    """
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    model_cfg = _without_stage1_paths(ckpt["t2i_config"]["model"])
    model = instantiate(model_cfg, _convert_="all")
    missing, unexpected = model.load_state_dict(model_state_dict(ckpt, use_ema), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its model config: missing={list(missing)[:5]} unexpected={list(unexpected)[:5]}"
        )
    return model.eval()


def read_export(folder: Path) -> dict[str, Any]:
    """An export folder in the shape of a training checkpoint (weights already EMA where the run had EMA)."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    config_path = folder / EXPORT_CONFIG
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder} has {EXPORT_WEIGHTS} but no {EXPORT_CONFIG}; re-run t2i_train.export"
        )
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    weights = load_file(str(folder / EXPORT_WEIGHTS))
    return {"t2i_config": config, "state_dict": {f"model.{k}": v for k, v in weights.items()}}


def read_distributed_checkpoint(folder: Path) -> dict[str, Any]:
    """A sharded checkpoint folder written under ``strategy=fsdp2``, consolidated on CPU (no process group)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta_path = folder / LIGHTNING_META
    meta = torch.load(meta_path, map_location="cpu", weights_only=False) if meta_path.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        full_path = Path(tmp) / "full.pt"
        try:
            dcp_to_torch_save(str(folder), str(full_path))
        except Exception as exc:
            raise CheckpointError(f"cannot read distributed checkpoint {folder}: {exc}") from exc
        full = torch.load(full_path, map_location="cpu", weights_only=False)
    checkpoint = {**meta, **full}
    if "t2i_config" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{folder} is not a t2i_train checkpoint (no t2i_config/state_dict inside)")
    return checkpoint


def read_deepspeed_checkpoint(folder: Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint folder (``strategy=deepspeed_stage_*``), consolidated with Lightning's converter."""
    import tempfile

    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.ckpt"
        try:
            convert_zero_checkpoint_to_fp32_state_dict(str(folder), str(out))
        except Exception as exc:
            raise CheckpointError(f"cannot read DeepSpeed checkpoint {folder}: {exc}") from exc
        checkpoint = torch.load(out, map_location="cpu", weights_only=False)
    if "t2i_config" not in checkpoint:
        raise CheckpointError(f"{folder} is not a t2i_train checkpoint (no t2i_config inside)")
    return checkpoint
