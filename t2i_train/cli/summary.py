"""`python -m t2i_train.summary [train overrides]`: parameter counts per component, as JSON.

The model is built on the meta device with weight loading switched off, so paper-size configs (billions of
parameters, pretrained encoders) are counted in seconds without memory or downloads (see
`t2i_train.model_summary`).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from t2i_train.cli.common import CONF_DIR, check_group_choices, hydra_argv, user_errors_exit
from t2i_train.model_summary import build_on_meta, summarize

USAGE = """usage: python -m t2i_train.summary [overrides ...]

Prints parameter counts (total / trainable / frozen) of the model that `python -m t2i_train` would train with
the same overrides, per top-level component, as JSON. Example:
    python -m t2i_train.summary experiment=muse_3b
"""


def compose_train_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@user_errors_exit
def run(overrides: list[str]) -> dict[str, Any]:
    cfg = compose_train_config(overrides)
    return summarize(build_on_meta(cfg))


def main(argv: list[str] | None = None) -> None:
    argv = hydra_argv(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    check_group_choices(argv)
    print(json.dumps(run(argv), indent=2))


if __name__ == "__main__":
    main()
