"""NaN never overwrites good weights: a diverging run stops with one line and keeps its finite checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from t2i_train.errors import CheckpointError, TrainingDiverged
from t2i_train.task import NonFiniteGuard
from tests.helpers import TINY_TRAIN, assert_one_line_error, run_cli


def test_a_diverging_run_stops_with_one_line_and_keeps_finite_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        "t2i_train", "model=muse", *TINY_TRAIN, "trainer.max_steps=30", "model.dim=32", "model.depth=1",
        "model.mlp_dim=64", "data.synthetic.count=256", "data.synthetic.val_count=16",
        f"data.cache_dir={tmp_path / 'cache'}", "optimizer.lr=1e30", "checkpoint.every_n_steps=1",
        "checkpoint.keep_last=2", "nonfinite.max_consecutive=3", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert_one_line_error(proc, "training diverged", "4 steps in a row, up to step", "optimizer.lr")
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "the checkpoint of the last finite update must be kept"
    for path in checkpoints:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["global_step"] <= 2, f"{path.name} was written during the NaN streak"
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


class _Trainer:
    """The two trainer attributes the guard reads (a single-process run)."""

    world_size = 1
    precision = "32-true"


def test_the_guard_skips_a_transient_nan_and_trips_after_the_limit() -> None:
    guard = NonFiniteGuard(max_consecutive=2)
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.tensor([1.0, float("nan"), 0.0])
    guard.start_batch()
    guard.note_loss(torch.tensor(1.0))
    assert not guard.update_is_finite([weight], _Trainer())  # a NaN gradient alone skips the step
    guard.end_batch(step=1, rank=0)
    guard.start_batch()
    weight.grad = torch.ones(3)
    assert guard.update_is_finite([weight], _Trainer())
    guard.end_batch(step=2, rank=0)
    assert guard.consecutive == 0 and guard.skipped_total == 1
    for step in (3, 4):
        guard.start_batch()
        guard.note_loss(torch.tensor(float("inf")))
        assert not guard.update_is_finite([weight], _Trainer())
        guard.end_batch(step=step, rank=0)
    guard.start_batch()
    guard.note_loss(torch.tensor(float("nan")))
    guard.update_is_finite([weight], _Trainer())
    with pytest.raises(TrainingDiverged, match="3 steps in a row, up to step 5"):
        guard.end_batch(step=5, rank=0)


def test_a_checkpoint_with_nan_weights_is_refused() -> None:
    guard = NonFiniteGuard()
    guard.check_weights({"model.w": torch.ones(2)}, _Trainer(), step=3)
    with pytest.raises(CheckpointError, match=r"step 3: weights are NaN/Inf \(e.g. model.w\)"):
        guard.check_weights({"model.w": torch.tensor([1.0, float("nan")])}, _Trainer(), step=3)
