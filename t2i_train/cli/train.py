"""`python -m t2i_train [overrides]`: train any family from the Hydra config tree (the work is
``t2i_train.training.train``)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import (
    CONF_DIR,
    allow_new_keys,
    check_config_types,
    check_group_choices,
    check_overrides,
    hydra_argv,
    quiet_third_party,
    startup_guard,
    user_errors_exit,
)
from t2i_train.errors import ConfigError
from t2i_train.training import train


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
@user_errors_exit
def _hydra_main(cfg: DictConfig) -> float | None:
    quiet_third_party()  # wandb offline, no telemetry: the launcher's defaults, not the library's
    hydra_cfg = HydraConfig.get()
    with startup_guard(Path(hydra_cfg.runtime.output_dir), hydra_cfg.output_subdir):
        if cfg.model is None or "_target_" not in cfg.model:
            raise ConfigError("no model selected; pass model=<family> (see `python -m t2i_train --help`)")
        check_config_types(cfg)
        return train(cfg).get("optimized_metric")  # returned to Hydra's sweeper (e.g. hparams_search=...)


def main() -> None:
    # the submitit launcher configs keep the plugin's schema names; Hydra 1.3 warns about that on every run
    warnings.filterwarnings("ignore", message=".*validated against ConfigStore schema")
    sys.argv[1:] = apply_trust_argument(sys.argv[1:])  # trust_checkpoint=true (see t2i_train.checkpoint_io)
    sys.argv[1:] = hydra_argv(sys.argv[1:])  # brace patterns as a user writes them; grammar errors: one line
    check_group_choices(sys.argv[1:])
    sys.argv[1:] = allow_new_keys(sys.argv[1:], ("sampling.kwargs.", "task."))
    check_overrides(sys.argv[1:], "train")  # a plain run's typos: one line, before Hydra writes
    _hydra_main()


if __name__ == "__main__":
    main()
