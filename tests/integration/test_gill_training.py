"""GILL through the real trainer: FSDP2 on 2 CPU processes with the frozen LM kept whole, and exact resume.

The tiny default GILL (``model=gill``: random frozen GPT-2, CLIP and T5 built from ``init_seed``) trains on the
synthetic shapes set; a fresh build of the same config gives the frozen weights a run must leave untouched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from t2i_train.checkpoint import read_checkpoint
from t2i_train.cli.common import CONF_DIR
from tests.conftest import ROOT

GLOBAL_BATCH = 8


def run_gill(run_dir: Path, data_cache: Path, *extra: str, devices: int = 1) -> str:
    command = [
        sys.executable, "-m", "t2i_train", "model=gill", "scheduler=constant", "trainer.accelerator=cpu",
        f"trainer.devices={devices}", "trainer.max_steps=2", "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.deterministic=true", "sampling.every_n_steps=0", "checkpoint.every_n_steps=1",
        "data.synthetic.count=512", "data.synthetic.val_count=32", f"data.cache_dir={data_cache}",
        "data.num_workers=0", f"data.batch_size={GLOBAL_BATCH // devices}", "data.shuffle_buffer=64",
        "logger=csv", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def fresh_gill() -> torch.nn.Module:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=gill"])
    return instantiate(cfg.model, _convert_="all")


def weights(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return int(ckpt["global_step"]), ckpt["state_dict"]


@pytest.mark.distributed
def test_fsdp2_trains_two_steps_with_the_frozen_lm_whole_and_untouched(
    data_cache: Path, tmp_path: Path
) -> None:
    output = run_gill(tmp_path / "fsdp2", data_cache, "strategy=fsdp2", devices=2)
    fresh = fresh_gill()
    frozen = {f"{name}.{k}" for name, m in fresh.frozen_modules().items() for k, _ in m.named_parameters()}
    assert {n.split(".")[0] for n in frozen} >= {"lm", "clip", "target_encoder"}
    frozen_count = sum(p.numel() for n, p in fresh.named_parameters() if n in frozen)
    summary = re.search(
        r"fsdp2: ([\d,]+) parameters sharded .*; ([\d,]+) kept whole .*\(([\d,]+) of them trained", output
    )
    assert summary, output[-3000:]
    sharded, whole, trained_whole = (int(g.replace(",", "")) for g in summary.groups())
    assert whole == frozen_count and trained_whole == 0, summary.group(0)
    assert sharded == sum(p.numel() for p in fresh.parameters()) - frozen_count

    step, state = weights(tmp_path / "fsdp2")
    assert step == 2
    initial = {f"model.{k}": v for k, v in fresh.state_dict().items()}
    for name in frozen:
        assert torch.equal(state[f"model.{name}"], initial[f"model.{name}"]), f"frozen {name} changed"
    rows = state["model.img_input"].float().norm(dim=-1)
    assert torch.allclose(rows, state["model.img_input_norm"].float().expand_as(rows), rtol=1e-4), (
        "[IMG] input rows were not renormalised under FSDP2"
    )
    moved = [
        k for k in ("model.img_input", "model.visual_prefix.weight", "model.mapper.queries") if k in state
    ]
    assert moved and all(not torch.equal(state[k], initial[k]) for k in moved), (
        "the trainable parts did not train"
    )


def test_resume_is_exact(data_cache: Path, tmp_path: Path) -> None:
    """2 steps, stop, ``resume=auto`` to 4 equals 4 uninterrupted steps (data position, RNG and the random
    caption concatenation included)."""
    run_gill(tmp_path / "straight", data_cache, "trainer.max_steps=4")
    run_gill(tmp_path / "resumed", data_cache)
    output = run_gill(tmp_path / "resumed", data_cache, "trainer.max_steps=4", "resume=auto")
    assert "resuming from" in output
    (step_a, expected), (step_b, got) = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert step_a == step_b == 4 and expected.keys() == got.keys()
    worst = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"max weight difference after resuming: {worst}"
