"""SLURM-style preemption: SIGTERM to the whole process group (what `scancel` and preemption send), with a
DataLoader worker, before the first periodic checkpoint, twice; and kills in the middle of a save with
``$TMPDIR`` on another filesystem."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from t2i_train.checkpoint_io import checkpoint_problem, remove_orphaned_temp_files
from t2i_train.data.shards import write_synthetic_shards
from t2i_train.errors import EXIT_STOPPED
from t2i_train.run_state import newest_readable_checkpoint
from tests.conftest import ROOT

MAX_STEPS = 30


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("preempt_shards")
    write_synthetic_shards(out, count=192, samples_per_shard=96, seed=5, progress=False)
    return out


def command(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "t2i_train", "model=muse", "data=webdataset", f"data.train_urls={shards}",
        "data.image_size=32", "data.batch_size=8", "data.num_workers=1", "data.shuffle_buffer=32",
        "model.dim=32", "model.depth=1", "model.mlp_dim=64", "ema_decay=0.9", "optimizer.lr=1e-3",
        "trainer.accelerator=cpu", "trainer.deterministic=true", f"trainer.max_steps={MAX_STEPS}",
        "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "sampling.every_n_steps=0",
        # no periodic checkpoint inside the run: every stop happens "before the first checkpoint"
        "checkpoint.every_n_steps=100000", "logger=csv", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def metric_rows(run_dir: Path) -> int:
    path = run_dir / "logs" / "metrics.csv"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def sigterm_the_group_after(shards: Path, run_dir: Path, rows: int, attempt: int) -> tuple[int, str]:
    """Start a run in its own process group, wait for ``rows`` steps logged by this attempt, SIGTERM the whole
    group. (The CSV logger moves attempt k's ``metrics.csv`` to ``metrics.<k>.csv`` when attempt k+1 starts.)"""
    earlier = run_dir / "logs" / f"metrics.{attempt}.csv"
    proc = subprocess.Popen(
        command(shards, run_dir, "resume=auto"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while (
        proc.poll() is None
        and time.time() < deadline
        and (metric_rows(run_dir) < rows or (attempt and not earlier.is_file()))
    ):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be signalled"
    os.killpg(proc.pid, signal.SIGTERM)  # the main process, its data worker, everything
    output, _ = proc.communicate(timeout=180)
    return proc.returncode, output


def test_group_sigterm_twice_before_any_checkpoint_then_resume_equals_uninterrupted(
    shards: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    done = subprocess.run(command(shards, reference), capture_output=True, text=True, env=env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "preempted"
    last = run_dir / "checkpoints" / "last.ckpt"
    steps = []
    for attempt, rows in enumerate((6, 4)):  # the second attempt is signalled a few steps after it resumed
        code, output = sigterm_the_group_after(shards, run_dir, rows, attempt)
        assert code == EXIT_STOPPED, output[-3000:]
        assert "killed by signal" not in output, output[-3000:]  # the data worker outlived the signal
        assert "stopped by SIGTERM" in output and "resume=auto" in output
        steps.append(step_of(last))
        assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert 0 < steps[0] < steps[1] < MAX_STEPS, steps

    resumed = subprocess.run(
        command(shards, run_dir, "resume=auto"), capture_output=True, text=True, env=env(), cwd=ROOT
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stdout + resumed.stderr
    # exactly one last.ckpt, holding the final step (never a last-v1.ckpt beside a stale last.ckpt)
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    expected = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    got = torch.load(last, map_location="cpu", weights_only=True)
    assert got["global_step"] == expected["global_step"] == MAX_STEPS
    for key, value in expected["state_dict"].items():
        assert torch.allclose(value.float(), got["state_dict"][key].float(), atol=1e-6), key
    for key, value in expected["ema"].items():
        assert torch.allclose(value.float(), got["ema"][key].float(), atol=1e-6), key


# ------------------------------------------------------------------------------------ kill during save
WRITER = textwrap.dedent(
    """
    import sys, torch
    from t2i_train.checkpoint_io import AtomicCheckpointIO
    io, target, saved = AtomicCheckpointIO(), sys.argv[1], 0
    for step in range(1, 10_000):
        io.save_checkpoint({"global_step": step, "w": torch.full((24_000_000,), float(step))}, target)
        print(step, flush=True)
    """
)


def _other_filesystem_tmpdir(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's temporary folder (a tmpfs)")
    tmpdir = shm / f"t2i-test-{os.getpid()}"
    tmpdir.mkdir(exist_ok=True)
    return tmpdir


def test_sigkill_during_saves_with_tmpdir_elsewhere_never_leaves_a_broken_file(tmp_path: Path) -> None:
    """A 96 MB checkpoint written over and over with ``TMPDIR`` on a tmpfs, SIGKILLed at random moments: the
    target is always a complete checkpoint, and what a kill orphans is beside it, cleaned up on the next start.
    (With fsspec's transaction the temporary file lands in ``$TMPDIR`` and the cross-device move copies in
    place: a kill in that window leaves a truncated target.)"""
    tmpdir = _other_filesystem_tmpdir(tmp_path)
    target = tmp_path / "checkpoints" / "last.ckpt"
    rng = random.Random(0)
    try:
        for _ in range(4):
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                env={**env(), "TMPDIR": str(tmpdir)},
            )  # fmt: skip
            assert writer.stdout.readline().strip(), "the writer died before its first save"
            time.sleep(rng.uniform(0.0, 0.5))
            writer.kill()
            writer.wait()
            assert checkpoint_problem(target) is None, checkpoint_problem(target)
            saved_ckpt = torch.load(target, map_location="cpu", weights_only=True)
            assert bool((saved_ckpt["w"] == float(saved_ckpt["global_step"])).all())
            assert not list(tmpdir.iterdir()), "a temporary file went to $TMPDIR"
            remove_orphaned_temp_files(target.parent)
            assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()


def test_resume_auto_passes_over_unreadable_checkpoints(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    good = folder / "step_0000010.ckpt"
    torch.save({"global_step": 10}, good)
    truncated = folder / "step_0000020.ckpt"
    torch.save({"global_step": 20, "w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    empty = folder / "last.ckpt"
    empty.write_bytes(b"")  # what an in-place copy killed at its start leaves
    now = time.time()
    for age, path in enumerate((empty, truncated, good)):
        os.utime(path, (now - age, now - age))
    with caplog.at_level("WARNING"):
        assert newest_readable_checkpoint(tmp_path) == good
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert f"skipping {empty}: it is empty" in warned and f"skipping {truncated}" in warned
    good.write_bytes(b"")
    assert newest_readable_checkpoint(tmp_path) is None  # nothing readable: start fresh, never crash
