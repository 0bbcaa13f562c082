"""2-process training on CPU (gloo): DDP and FSDP2 follow the single-process loss curve at the same global batch,
and FSDP2 checkpoints resume, export and sample like any other."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.distributed

STEPS = 30
GLOBAL_BATCH = 16
# The processes see different samples and draw different masks than the single process (each rank reads its
# own shards and seeds from its rank), so the curves agree statistically, not bit for bit: the mean loss of the
# last 10 steps must agree within this much (the loss falls from ~5.55 to ~5.15 over the run; measured gap 0.005).
# DDP and FSDP2 see the same samples and masks, so they must agree much more closely (measured: to 1e-4).
TOLERANCE = 0.1
SAME_DATA_TOLERANCE = 0.01


def train(tmp: Path, name: str, devices: int, strategy: str, *extra: str) -> Path:
    run_dir = tmp / name
    command = [
        sys.executable, "-m", "t2i_train", "model=muse", f"strategy={strategy}",
        "trainer.accelerator=cpu", f"trainer.devices={devices}", f"trainer.max_steps={STEPS}",
        "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "sampling.every_n_steps=0", "checkpoint.every_n_steps=10",
        "data.synthetic.count=512", "data.synthetic.val_count=32", f"data.cache_dir={tmp}/cache",
        "data.num_workers=0", f"data.batch_size={GLOBAL_BATCH // devices}", "data.shuffle_buffer=64",
        "model.dim=64", "model.depth=2", "model.mlp_dim=128", "optimizer.lr=2e-3", "scheduler=constant",
        "logger=csv", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def tail_mean(curve: dict[int, float]) -> float:
    last = sorted(curve)[-10:]
    return sum(curve[s] for s in last) / len(last)


def test_ddp_and_fsdp2_follow_the_single_process_curve(tmp_path: Path) -> None:
    single = losses(train(tmp_path, "single", 1, "auto"))
    ddp = losses(train(tmp_path, "ddp", 2, "ddp"))
    fsdp2_dir = train(tmp_path, "fsdp2", 2, "fsdp2", "ema_decay=0.9")
    fsdp2 = losses(fsdp2_dir)
    assert len(single) == len(ddp) == len(fsdp2) == STEPS
    first = sorted(single)[0]
    assert abs(ddp[first] - single[first]) < 0.05 and abs(fsdp2[first] - single[first]) < 0.05
    assert tail_mean(single) < single[first] - 0.3  # it learnt something
    for name, curve in (("ddp", ddp), ("fsdp2", fsdp2)):
        gap = abs(tail_mean(curve) - tail_mean(single))
        assert gap < TOLERANCE, (
            f"{name}: last-10-step mean loss {tail_mean(curve):.3f} vs {tail_mean(single):.3f}"
        )

    # the sharded checkpoint folder: resume (2 processes), then export and sample on one process
    last = fsdp2_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir()
    train(tmp_path, "fsdp2", 2, "fsdp2", "ema_decay=0.9", "resume=auto", f"trainer.max_steps={STEPS + 4}")
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run(
        [sys.executable, "-m", "t2i_train.export", f"checkpoint={last}", f"output_dir={tmp_path}/export"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["global_step"] == STEPS + 4 and report["ema"]
    done = subprocess.run(
        [sys.executable, "-m", "t2i_train.sample", f"checkpoint={last}", "prompts=[a red circle]",
         f"output_dir={tmp_path}/samples", "sampling.steps=2"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_scalar_parameter_trains_under_fsdp2_and_loads_on_one_process(tmp_path: Path) -> None:
    """open_clip's ``logit_scale`` is 0-d, which fully_shard refuses: FSDP2 holds it as [1], and the checkpoint
    loads back into a single-process build (where it is a scalar again)."""
    from t2i_train.checkpoint import load_family, read_checkpoint

    run_dir = tmp_path / "clip"
    command = [
        sys.executable, "-m", "t2i_train", "model=clip", "strategy=fsdp2", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.max_steps=2", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
        "sampling.every_n_steps=0", "checkpoint.every_n_steps=1", "data.synthetic.count=512",
        "data.synthetic.val_count=32", f"data.cache_dir={tmp_path}/cache", "data.num_workers=0", "data.batch_size=4",
        "logger=csv", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "logit_scale held as [1]" in done.stdout + done.stderr
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = read_checkpoint(last)["state_dict"]
    key = next(k for k in saved if k.endswith("logit_scale"))
    assert saved[key].shape == (1,)
    model = load_family(last, use_ema=False)
    loaded = dict(model.named_parameters())[key[len("model.") :]]
    assert loaded.shape == () and loaded.item() == saved[key].item()
