"""Training under a real SLURM cluster (slurm/local_cluster.sh on localhost): sbatch, requeue, submitit sweeps.

Every test drives the public entry points as a user would (`sbatch slurm/train.sbatch ...`, `scontrol requeue`,
`python -m t2i_train -m hydra/launcher=submitit_slurm ...`) with a tiny Muse on the small shapes set.
"""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.slurm.conftest import (
    TRAIN_SBATCH,
    Jobs,
    job_info,
    job_state,
    release_requeued,
    wait_until,
)

pytestmark = pytest.mark.slurm


def global_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def newest_step_checkpoint(run_dir: Path) -> int:
    """The highest N among <run dir>/checkpoints/step_N.ckpt (-1 when there is none yet)."""
    steps = [
        int(m.group(1))
        for p in (run_dir / "checkpoints").glob("step_*.ckpt")
        if (m := re.search(r"(\d+)", p.name))
    ]
    return max(steps, default=-1)


def logged_step_segments(metrics_csv: Path) -> list[list[int]]:
    """The training steps in logs/metrics.csv in file order, split where a restarted attempt begins."""
    with metrics_csv.open(newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    segments: list[list[int]] = []
    for step in steps:
        if not segments or step <= segments[-1][-1]:
            segments.append([])
        segments[-1].append(step)
    return segments


def test_sbatch_trains_and_writes_last_checkpoint(
    slurm_jobs: Jobs, tiny_train: list[str], tmp_path: Path
) -> None:
    # Outside a job the script submits itself (creating logs/ first); leading dash options go to sbatch.
    proc = subprocess.run(
        ["bash", str(TRAIN_SBATCH), "--parsable", "--job-name=t2i-a", *tiny_train, "trainer.max_steps=4"],
        cwd=tmp_path,
        env=slurm_jobs.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    job = slurm_jobs.track(proc.stdout.strip())
    log = tmp_path / "logs" / f"t2i-a-{job}.out"
    state = slurm_jobs.wait(job, timeout=180, log=log)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    run_dir = tmp_path / "runs" / f"t2i-a-{job}"
    assert global_step(run_dir / "checkpoints" / "last.ckpt") == 4
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert f"job {job} (restart 0)" in text and f"job {job} finished with exit code 0" in text
    assert "SLURM auto-requeueing enabled" in text  # Lightning took the SLURM environment from srun


def test_requeued_job_resumes_without_losing_or_repeating_steps(
    slurm_jobs: Jobs, tiny_train: list[str], tmp_path: Path
) -> None:
    """Interrupt one job twice: `scontrol requeue` (preemption: SIGTERM), then USR1 (what `--signal=USR1@90`
    sends before the time limit: Lightning saves hpc_ckpt_<n>.ckpt and requeues the job itself)."""
    max_steps = 20
    (tmp_path / "logs").mkdir()
    job = slurm_jobs.sbatch(
        "--job-name=t2i-rq",
        str(TRAIN_SBATCH),
        *tiny_train,
        f"trainer.max_steps={max_steps}",
        "checkpoint.every_n_steps=2",
        cwd=tmp_path,
    )
    run_dir = tmp_path / "runs" / f"t2i-rq-{job}"
    log = tmp_path / "logs" / f"t2i-rq-{job}.out"
    last = run_dir / "checkpoints" / "last.ckpt"

    def running_with_checkpoint_after(step: int) -> bool:
        state = job_state(job)
        assert state in ("PENDING", "RUNNING"), f"job ended early ({state}):\n{log.read_text()[-3000:]}"
        return state == "RUNNING" and newest_step_checkpoint(run_dir) > step

    def back_in_queue() -> bool:
        return job_state(job) == "PENDING"

    # 1. scontrol requeue: SLURM kills the job (SIGTERM); last.ckpt is written and the job goes back to the queue.
    wait_until(lambda: running_with_checkpoint_after(0), 150, "a first step checkpoint")
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    wait_until(back_in_queue, 60, "the requeued job to be pending")
    first_stop = global_step(last)
    assert first_stop >= 2, first_stop
    release_requeued(job)

    # 2. USR1 to the job's tasks: Lightning's SLURM handler saves <run dir>/hpc_ckpt_1.ckpt and requeues.
    wait_until(lambda: running_with_checkpoint_after(first_stop), 150, "a checkpoint of the resumed attempt")
    proc = subprocess.run(["scancel", "--signal=USR1", job], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    wait_until(back_in_queue, 90, "the job to requeue itself on USR1")
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert hpc, f"no hpc_ckpt_*.ckpt in {run_dir}:\n{log.read_text()[-3000:]}"
    assert global_step(hpc[-1]) > first_stop
    # resume=auto must continue from the furthest of last.ckpt (written on the SIGTERM that follows the
    # requeue) and Lightning's hpc checkpoint; the logged steps below check that it did
    second_stop = max(global_step(last), global_step(hpc[-1]))
    assert second_stop < max_steps
    release_requeued(job)

    state = slurm_jobs.wait(job, timeout=150, log=log)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert job_info(job).get("Restarts") == "2"
    for restart in range(3):
        assert f"job {job} (restart {restart})" in text
    assert text.count(f"resuming from {run_dir}") == 2, text[-3000:]
    assert "Handling auto-requeue signal" in text
    assert global_step(last) == max_steps

    # Each attempt logs exactly the steps from where the previous one stopped: none lost, none repeated.
    # (Lightning's CSVLogger may drop the rows of earlier attempts when a run resumes; those still logged
    # must match.)
    bounds = [0, first_stop, second_stop, max_steps]
    expected = [list(range(bounds[i], bounds[i + 1])) for i in range(3)]
    segments = logged_step_segments(run_dir / "logs" / "metrics.csv")
    assert 1 <= len(segments) <= 3, segments
    assert segments == expected[-len(segments) :], (segments, bounds)


def test_submitit_multirun_submits_one_job_per_sweep_point(
    tiny_train: list[str], slurm_cluster: None, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    try:
        proc = run_cli(
            "t2i_train",
            "-m",
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.cpus_per_task=1",
            f"hydra.sweep.dir={sweep}",
            "optimizer.lr=1e-3,2e-3",
            *tiny_train,
            "trainer.max_steps=4",
            cwd=tmp_path,
            timeout=240,
            env={"OMP_NUM_THREADS": "1"},
        )
    finally:  # never leave sweep jobs behind (e.g. when the launcher timed out)
        for folder in (sweep / ".submitit").glob("*_*"):
            if job_state(folder.name) not in ("COMPLETED", "UNKNOWN"):
                subprocess.run(["scancel", folder.name], capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    task_logs = sorted((sweep / ".submitit").glob("*_*/*_log.out"))
    assert len(task_logs) == 2, task_logs  # one SLURM array task per sweep point
    for num, lr in enumerate(("0.001", "0.002")):
        run_dir = sweep / str(num)
        assert global_step(run_dir / "checkpoints" / "last.ckpt") == 4
        assert f"optimizer.lr={lr}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    for task_log in task_logs:
        assert "SLURM auto-requeueing enabled" in task_log.read_text()  # Lightning ran under srun
