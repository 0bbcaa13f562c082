"""kill -9 of one rank of a 2-process DDP run: the survivor stops with one line naming the lost rank and the
command that continues, and that command resumes from the last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from t2i_train.run_state import LostRank
from tests.conftest import ROOT

pytestmark = pytest.mark.distributed


def command(tmp: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "t2i_train", "model=muse", "strategy=ddp", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.max_steps=100000", "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "sampling.every_n_steps=0",
        "checkpoint.every_n_steps=3", "data.synthetic.count=256", "data.synthetic.val_count=16", "data.synthetic.samples_per_shard=64",
        f"data.cache_dir={tmp}/cache", "data.num_workers=0", "data.batch_size=4", "data.shuffle_buffer=16",
        "model.dim=32", "model.depth=1", "model.mlp_dim=64", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rank_one(pid: int) -> int | None:
    for child in children(pid):
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if b"LOCAL_RANK=1" in environ:
            return child
    return None


def test_kill_9_of_rank_1_is_one_line_and_resume_auto_continues(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        command(tmp_path, run_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    first = run_dir / "checkpoints" / "step_0000003.ckpt"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not first.exists():
        time.sleep(0.1)
    victim = rank_one(proc.pid)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == LostRank.exit_code, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "rank 1 (killed by signal 9) of 2 died at step" in errors[0]
    assert f"resume=auto hydra.run.dir={run_dir}" in errors[0]

    step = max(
        int(torch.load(p, map_location="cpu", weights_only=True)["global_step"])
        for p in (run_dir / "checkpoints").glob("*.ckpt")
    )
    resumed = subprocess.run(
        command(tmp_path, run_dir, "resume=auto", f"trainer.max_steps={step + 2}"),
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == step + 2


def test_too_few_shards_for_the_processes_is_one_line_before_spawning(tmp_path: Path) -> None:
    """Checked before Lightning starts the other ranks: one line, not one per rank, and no banner."""
    run_dir = tmp_path / "run"
    cmd = command(tmp_path, run_dir, "trainer.devices=4", "data.synthetic.samples_per_shard=256")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: 1 training shards cannot be split over 4 processes; write more shards or set data.resampled=true"
    ], done.stderr[-3000:]
    assert "GPU available" not in done.stdout + done.stderr and "Traceback" not in done.stderr
