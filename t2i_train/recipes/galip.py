"""``galip`` (``make train-galip``): ``experiment=shapes_clip`` -> ``experiment=shapes_galip`` through that CLIP
-> samples for the seen and held-out prompts -> prompt following."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from t2i_train.recipes.base import Recipe, Run, Stage
from t2i_train.recipes.report import SampledReport
from t2i_train.recipes.stages import DATA_STAGE, last_checkpoint, sample_splits, train_stage


def clip(run: Run) -> Path:
    train_stage(
        run,
        run.out / "clip",
        ["experiment=shapes_clip", f"data.train_urls={run.data}", *run.overrides("clip")],
    )
    return last_checkpoint(run.out / "clip")


def galip(run: Run) -> Path:
    overrides = [
        "experiment=shapes_galip",
        f"data.train_urls={run.data}",
        f"model.clip.checkpoint={run.results['clip']}",
    ]
    train_stage(run, run.out / "galip", [*overrides, *run.overrides("galip")])
    return last_checkpoint(run.out / "galip")


def samples(run: Run) -> dict[str, Any]:
    return sample_splits(run, run.results["galip"])


REPORT = SampledReport("galip", "clip", "galip", seen_target=0.85)
RECIPE = Recipe(
    name="galip",
    help="CLIP -> GALIP through it -> samples -> prompt following (make train-galip)",
    stages=(
        DATA_STAGE,
        Stage("clip", clip, trains=True),
        Stage("galip", galip, trains=True),
        Stage("samples", samples),
    ),
    report=REPORT.report,
    render=REPORT.render,
    from_files=REPORT.collect,
)
