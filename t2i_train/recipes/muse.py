"""``muse`` (``make train``, the default): VQGAN -> held-out PSNR -> pre-encoded tokens (train and val) ->
``experiment=shapes_muse`` on the tokens -> samples for the seen and held-out prompts -> prompt following."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from t2i_train.recipes.base import Recipe, Run, Stage
from t2i_train.recipes.report import Autoencoder, SampledReport
from t2i_train.recipes.stages import (
    DATA_STAGE,
    autoencoder_and_codes,
    last_checkpoint,
    sample_splits,
    train_stage,
)


def vqgan(run: Run) -> Path:
    """``experiment=shapes_vqgan``, its PSNR, and the train and val shards pre-encoded into ``OUT/tokens``."""
    splits = {".": run.data, "val": run.data / "val"}
    return autoencoder_and_codes(run, "vqgan", "shapes_vqgan", splits, run.out / "tokens")


def muse(run: Run) -> Path:
    """``experiment=shapes_muse`` on the pre-encoded tokens, through the VQGAN; returns Muse's checkpoint."""
    tokens = run.out / "tokens"
    overrides = [
        "experiment=shapes_muse",
        f"data.train_urls={tokens}",
        f"data.val_urls={tokens / 'val'}",
        "data.fields=[image_tokens]",
        "data.load_images=false",
        f"model.image_tokenizer_checkpoint={run.results['vqgan']}",
        "torch_threads=2",  # the data worker only reads tokens: both cores go to the transformer
        *run.overrides("muse"),
    ]
    train_stage(run, run.out / "muse", overrides)
    return last_checkpoint(run.out / "muse")


def samples(run: Run) -> dict[str, Any]:
    return sample_splits(run, run.results["muse"])


REPORT = SampledReport(
    "muse", "vqgan", "muse", seen_target=0.90, autoencoder=Autoencoder("vqgan", "VQGAN", "tokens", True, True)
)
RECIPE = Recipe(
    name="muse",
    help="VQGAN -> tokens -> Muse -> samples -> prompt following (make train)",
    stages=(
        DATA_STAGE,
        Stage("vqgan", vqgan, trains=True),
        Stage("muse", muse, trains=True),
        Stage("samples", samples),
    ),
    report=REPORT.report,
    render=REPORT.render,
    from_files=REPORT.collect,
)
