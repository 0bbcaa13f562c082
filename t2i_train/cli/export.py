"""`python -m t2i_train.export checkpoint=CKPT [output_dir=DIR] [use_ema=true]`

Writes consolidated weights for inference and sharing: `DIR/model.safetensors` (the family's state dict, EMA
weights when the run kept an EMA and use_ema=true), `DIR/config.yaml` (the resolved training config; every weight is in the folder, so stage-1 paths are nulled) and
`DIR/export.json` (source, step, whether EMA was used). DIR defaults to `<run dir>/export`. Sample from it as
from a checkpoint: `python -m t2i_train.sample checkpoint=DIR ...`. The folder is written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import fail, user_errors_exit
from t2i_train.errors import CheckpointError

ALLOWED = ("checkpoint", "output_dir", "use_ema")


def parse_args(argv: list[str]) -> dict[str, Any]:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    args: dict[str, Any] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in ALLOWED:
            fail(f"unexpected argument '{item}'; arguments: {', '.join(f'{k}=' for k in ALLOWED)}")
        args[key] = value
    if "checkpoint" not in args:
        fail("missing checkpoint=PATH (see `python -m t2i_train.export --help`)")
    if "use_ema" in args:
        args["use_ema"] = args["use_ema"].lower() in ("1", "true", "yes")
    return args


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


@user_errors_exit
def run(args: dict[str, Any]) -> dict[str, Any]:
    return export(**args)


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse_args(apply_trust_argument(sys.argv[1:] if argv is None else argv))), indent=2))


if __name__ == "__main__":
    main()
