"""Checkpoint plumbing: which file resume=auto picks, export round trip, CSV history kept across attempts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from t2i_train.errors import CheckpointError
from t2i_train.loggers import CSVLogger
from t2i_train.training import resolve_resume


def test_resume_auto_picks_the_newest_of_last_and_hpc(tmp_path: Path) -> None:
    assert resolve_resume("auto", tmp_path) is None
    assert resolve_resume(None, tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    torch.save({"global_step": 1}, last)
    assert resolve_resume("auto", tmp_path) == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    torch.save({"global_step": 2}, hpc)
    past = time.time() - 100
    os.utime(last, (past, past))
    assert resolve_resume("auto", tmp_path) == str(hpc)
    os.utime(hpc, (past - 10, past - 10))
    assert resolve_resume("auto", tmp_path) == str(last)
    # killed after a step checkpoint was written but before last.ckpt was updated: the step one is newest
    step = tmp_path / "checkpoints" / "step_0000010.ckpt"
    torch.save({"global_step": 3}, step)
    assert resolve_resume("auto", tmp_path) == str(step)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path)


def test_csv_logger_keeps_earlier_attempts(tmp_path: Path) -> None:
    for attempt in range(3):
        logger = CSVLogger(save_dir=tmp_path, name="logs", version="")
        logger.log_metrics({"loss": float(attempt)}, step=attempt)
        logger.save()
    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.glob("metrics*.csv")) == [
        "metrics.1.csv",
        "metrics.2.csv",
        "metrics.csv",
    ]
    assert "0.0" in (logs / "metrics.1.csv").read_text() and "2.0" in (logs / "metrics.csv").read_text()


def test_export_round_trip(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from t2i_train.checkpoint import load_family
    from t2i_train.export_folder import export
    from t2i_train.models.vqgan import VQGAN

    model_cfg = {
        "_target_": "t2i_train.models.vqgan.VQGAN",
        "base_channels": 8,
        "channel_mult": [1, 2],
        "z_channels": 8,
        "codebook_size": 16,
        "codebook_dim": 4,
        "norm_groups": 4,
    }
    torch.manual_seed(0)
    model = VQGAN(**{k: v for k, v in model_cfg.items() if k != "_target_"})
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    ema = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt_path.parent.mkdir(parents=True)
    torch.save(
        {"state_dict": state, "ema": ema, "t2i_config": {"model": model_cfg}, "global_step": 7}, ckpt_path
    )
    info = export(str(ckpt_path))
    out = tmp_path / "run" / "export"
    assert info["output_dir"] == str(out) and info["ema"] and info["global_step"] == 7
    assert OmegaConf.load(out / "config.yaml").model.codebook_size == 16
    loaded = load_family(out)
    for name, param in loaded.named_parameters():
        assert torch.equal(param, ema[name])
    raw = export(str(ckpt_path), output_dir=str(tmp_path / "raw"), use_ema=False)
    assert not raw["ema"]
    assert torch.equal(next(load_family(tmp_path / "raw").parameters()), next(model.parameters()))
    with pytest.raises(CheckpointError, match="not empty"):
        export(str(ckpt_path))
