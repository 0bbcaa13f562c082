"""Preemption safety: kill -9 at a random step, `resume=auto`, and end with the uninterrupted run's weights."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from t2i_train.data.shards import write_synthetic_shards
from t2i_train.errors import EXIT_STOPPED
from tests.conftest import ROOT

MAX_STEPS = 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume_shards")
    # 2 shards of 96: with 2 workers and batch 8 an epoch is 24 batches, so the run crosses epoch boundaries
    write_synthetic_shards(out, count=192, samples_per_shard=96, seed=4, progress=False)
    return out


def command(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "t2i_train",
        "model=muse",
        "data=webdataset",
        f"data.train_urls={shards}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=2",
        "data.shuffle_buffer=32",
        "model.dim=32",
        "model.depth=1",
        "model.mlp_dim=64",
        "ema_decay=0.9",
        "optimizer.lr=1e-3",
        "trainer.accelerator=cpu",
        "trainer.deterministic=true",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "sampling.every_n_steps=0",
        "checkpoint.every_n_steps=3",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == MAX_STEPS
    return {**ckpt["state_dict"], **{f"ema.{k}": v for k, v in ckpt["ema"].items()}}


def latest_step(run_dir: Path) -> int:
    steps = [int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.ckpt")]
    return max(steps, default=0)


# epoch mode (each epoch one pass over the shards; the run crosses epoch boundaries) and resampled mode (shards
# drawn with replacement, an "epoch" of samples_per_epoch samples)
MODES = {"epoch": [], "resampled": ["data.resampled=true", "data.samples_per_epoch=160"]}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_kill_9_then_resume_auto_equals_an_uninterrupted_run(mode: str, shards: Path, tmp_path: Path) -> None:
    extra = MODES[mode]
    reference = tmp_path / "reference"
    done = subprocess.run(
        command(shards, reference, *extra), capture_output=True, text=True, env=env(), timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "interrupted"
    kill_after = random.Random().randint(7, MAX_STEPS - 10)
    proc = subprocess.Popen(
        command(shards, run_dir, *extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env(),
        cwd=ROOT,
    )
    deadline = time.time() + 300
    while latest_step(run_dir) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_step(run_dir) < MAX_STEPS, "the run finished before it could be killed"

    resumed = subprocess.run(
        command(shards, run_dir, *extra, "resume=auto"),
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
        cwd=ROOT,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    expected, got = final_weights(reference), final_weights(run_dir)
    assert expected.keys() == got.keys()
    worst = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"killed after step {kill_after}: max weight difference {worst}"


def test_sigusr1_saves_last_checkpoint_and_stops(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "usr1"
    proc = subprocess.Popen(
        command(shards, run_dir, "trainer.max_steps=100000", "checkpoint.every_n_steps=100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
        cwd=ROOT,
    )
    metrics = run_dir / "logs" / "metrics.csv"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and len(_lines(metrics)) < 4:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, output[-3000:]  # stopped early: not "finished"
    assert "SIGUSR1: saved" in output
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert 0 < ckpt["global_step"] < 100000
    # resuming keeps the metrics of the first attempt
    resumed = subprocess.run(
        command(shards, run_dir, "resume=auto", f"trainer.max_steps={ckpt['global_step'] + 2}"),
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
        cwd=ROOT,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "logs" / "metrics.1.csv").is_file() and metrics.is_file()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def test_resume_from_the_last_batch_of_an_epoch(shards: Path, tmp_path: Path) -> None:
    """An epoch is 24 batches here; the checkpoint of step 24 closes epoch 0 and the resumed run must start
    epoch 1 from its first batch (Lightning ends the restored epoch without fetching)."""
    reference = tmp_path / "reference"
    keep = "checkpoint.keep_last=-1"
    done = subprocess.run(
        command(shards, reference, keep), capture_output=True, text=True, env=env(), timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    boundary = reference / "checkpoints" / "step_0000024.ckpt"
    resumed_dir = tmp_path / "resumed"
    done = subprocess.run(
        command(shards, resumed_dir, keep, f"resume={boundary}"),
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = final_weights(reference), final_weights(resumed_dir)
    worst = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6, f"max weight difference {worst}"
