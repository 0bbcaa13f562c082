"""A real one-node SLURM cluster on localhost (slurm/local_cluster.sh) and helpers to drive jobs on it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

CLUSTER_SCRIPT = ROOT / "slurm" / "local_cluster.sh"
TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
}


def _run(*cmd: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kwargs)


def _slurm_installed() -> bool:
    return all(
        shutil.which(tool) for tool in ("sbatch", "squeue", "scontrol", "slurmctld", "slurmd", "munged")
    )


def _why_not_installable() -> str | None:
    """None when this machine can install slurm-wlm + munge with apt-get; else the reason it cannot."""
    if shutil.which("apt-get") is None:
        return "slurm is not installed and there is no apt-get to install slurm-wlm/munge"
    if os.geteuid() != 0 and (shutil.which("sudo") is None or _run("sudo", "-n", "true").returncode != 0):
        return "slurm is not installed and installing slurm-wlm/munge needs root (or passwordless sudo)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    """Install (when missing and possible) and start the local cluster; stop it at the end if we started it."""
    if not _slurm_installed():
        reason = _why_not_installable()
        if reason:
            pytest.skip(reason)
        proc = _run("bash", str(CLUSTER_SCRIPT), "install", timeout=900)
        if proc.returncode != 0:
            lines = (proc.stdout + proc.stderr).strip().splitlines() or ["(no output)"]
            pytest.skip(f"slurm-wlm/munge could not be installed: {lines[-1]}")
    was_running = _run("bash", str(CLUSTER_SCRIPT), "status").returncode == 0
    proc = _run("bash", str(CLUSTER_SCRIPT), "start", timeout=180)
    assert proc.returncode == 0, f"slurm/local_cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    yield
    if not was_running:
        _run("bash", str(CLUSTER_SCRIPT), "stop", timeout=60)


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Reason, Restarts, ...); {} once SLURM has forgotten the job."""
    proc = _run("scontrol", "show", "job", "-o", job_id)
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def job_state(job_id: str) -> str:
    return job_info(job_id).get("JobState", "UNKNOWN")


def wait_until(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.25) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def release_requeued(job_id: str, timeout: float = 90) -> None:
    """Start a requeued job now: SLURM holds requeued batch jobs ~2 minutes (Reason=BeginTime) before they may
    run again; `scontrol update StartTime=now` lifts that once the job is back to PENDING."""

    def running_again() -> bool:
        info = job_info(job_id)
        state = info.get("JobState", "UNKNOWN")
        if state == "PENDING" and info.get("Reason") == "BeginTime":
            _run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        return state in {"RUNNING"} | FINISHED

    wait_until(running_again, timeout, f"requeued job {job_id} to run again", poll=0.5)


class Jobs:
    """Submits jobs for one test and cancels whatever is still queued or running when the test ends."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.ids: list[str] = []

    def sbatch(self, *args: str, cwd: Path) -> str:
        proc = _run("sbatch", "--parsable", *args, cwd=cwd, env=self.env)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        return self.track(proc.stdout.strip().split(";")[0])

    def track(self, job_id: str) -> str:
        self.ids.append(job_id)
        return job_id

    def wait(self, job_id: str, timeout: float, log: Path | None = None) -> str:
        """The job's final state; on timeout the job is cancelled and the test fails with its log's tail."""

        def finished() -> str | None:
            state = job_state(job_id)
            return state if state in FINISHED else None

        try:
            return str(wait_until(finished, timeout, f"job {job_id} to finish", poll=0.5))
        except AssertionError:
            _run("scancel", job_id)
            tail = log.read_text()[-3000:] if log is not None and log.is_file() else "(no log)"
            raise AssertionError(
                f"job {job_id} not finished after {timeout:.0f}s: {job_info(job_id)}\n{tail}"
            ) from None

    def cancel_all(self) -> None:
        for job_id in self.ids:
            if job_state(job_id) not in FINISHED | {"UNKNOWN"}:
                _run("scancel", job_id)


@pytest.fixture
def slurm_jobs(slurm_cluster: None) -> Iterator[Jobs]:
    env = {
        **os.environ,
        "T2I_PYTHON": sys.executable,
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "offline",
        # one thread per training process: the node has few cores and jobs may run side by side
        "OMP_NUM_THREADS": "1",
    }
    jobs = Jobs(env)
    yield jobs
    jobs.cancel_all()


@pytest.fixture
def tiny_train(small_data_overrides: list[str]) -> list[str]:
    """Overrides for a seconds-long CPU training run (tiny Muse on the session's small shapes set)."""
    return [
        *small_data_overrides,
        "model.dim=32",
        "model.depth=1",
        "model.mlp_dim=64",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "sampling.every_n_steps=0",
        "++callbacks.samples.at_end=false",
    ]
