"""Export folders: consolidated weights for inference and sharing.

``export(checkpoint)`` writes ``DIR/model.safetensors`` (the family's state dict, EMA weights when the run kept
an EMA and ``use_ema``), ``DIR/config.yaml`` (the resolved training config with stage-1 paths nulled: every
weight is in the folder) and ``DIR/export.json`` (source, step, whether EMA was used), under a temporary name
renamed when complete. ``t2i_train.checkpoint`` reads such a folder back like a checkpoint.
``python -m t2i_train.export`` (``t2i_train.cli.export``) parses arguments and calls ``export``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from t2i_train.errors import CheckpointError


def export(checkpoint: str, output_dir: str | None = None, use_ema: bool = True) -> dict[str, Any]:
    """Write the export folder for ``checkpoint`` (see the module docstring); returns what was written."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from t2i_train.checkpoint import (
        EXPORT_CONFIG,
        EXPORT_WEIGHTS,
        load_family,
        model_state_dict,
        read_checkpoint,
        without_stage1_paths,
    )

    source = Path(checkpoint).expanduser()
    ckpt = read_checkpoint(source)
    out = Path(output_dir) if output_dir else source.resolve().parent.parent / "export"
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose another output_dir or remove it")
    if ckpt.get(
        "t2i_external"
    ):  # frozen pretrained / stage-1 parts left out of the checkpoint: read them back
        weights = load_family(source, use_ema=use_ema, ckpt=ckpt).state_dict()
    else:
        weights = model_state_dict(ckpt, use_ema)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    config = {**ckpt["t2i_config"], "model": without_stage1_paths(ckpt["t2i_config"]["model"])}
    info = {
        "source": str(source),
        "global_step": ckpt.get("global_step"),
        "ema": bool(use_ema and ckpt.get("ema")),
        "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
    (tmp / EXPORT_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    (tmp / "export.json").write_text(json.dumps(info, indent=2))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return {"output_dir": str(out), **info}
