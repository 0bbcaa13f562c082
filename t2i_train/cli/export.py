"""`python -m t2i_train.export checkpoint=CKPT [output_dir=DIR] [use_ema=true]`

Writes consolidated weights for inference and sharing: `DIR/model.safetensors` (the family's state dict, EMA
weights when the run kept an EMA and use_ema=true), `DIR/config.yaml` (the resolved training config; every weight is in the folder, so stage-1 paths are nulled) and
`DIR/export.json` (source, step, whether EMA was used). DIR defaults to `<run dir>/export`. Sample from it as
from a checkpoint: `python -m t2i_train.sample checkpoint=DIR ...`. The folder is written under a temporary
name and renamed when complete. The folder is written by `t2i_train.export_folder.export`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import fail, user_errors_exit
from t2i_train.export_folder import export

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


@user_errors_exit
def run(args: dict[str, Any]) -> dict[str, Any]:
    return export(**args)


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse_args(apply_trust_argument(sys.argv[1:] if argv is None else argv))), indent=2))


if __name__ == "__main__":
    main()
