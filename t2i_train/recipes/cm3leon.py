"""``cm3leon`` (``make train-cm3leon``): shapes -> VQGAN -> pre-encoded tokens -> CM3leon on the tokens and the
short captions -> text -> image samples of the seen and held-out prompts -> prompt following -> captions of
held-out renders from the same model (image -> text)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from t2i_train.recipes.base import Recipe, Run, Stage
from t2i_train.recipes.muse import vqgan
from t2i_train.recipes.report import Autoencoder, SampledReport
from t2i_train.recipes.stages import DATA_STAGE, last_checkpoint, sample_splits, train_stage


def cm3leon(run: Run) -> Path:
    """``experiment=shapes_cm3leon`` on the pre-encoded tokens; returns its checkpoint."""
    tokens = run.out / "tokens"
    overrides = [
        "experiment=shapes_cm3leon",
        f"data.train_urls={tokens}",
        f"data.val_urls={tokens / 'val'}",
        "data.fields=[image_tokens]",
        "data.load_images=false",
        f"model.image_tokenizer_checkpoint={run.results['vqgan']}",
        "torch_threads=2",  # the data worker only reads tokens: both cores go to the transformer
        *run.overrides("cm3leon"),
    ]
    train_stage(run, run.out / "cm3leon", overrides)
    return last_checkpoint(run.out / "cm3leon")


def samples(run: Run) -> dict[str, Any]:
    return sample_splits(run, run.results["cm3leon"])


def captions(run: Run) -> dict[str, Any]:
    """Image -> text: colour, shape and position read from the model's captions of renders of every
    combination (held-out ones apart)."""
    from t2i_train.metrics.caption_accuracy import evaluate_checkpoint

    result = evaluate_checkpoint(str(run.results["cm3leon"]), per_combination=10)
    (run.out / "captions.json").write_text(json.dumps(result, indent=2, default=str))
    return result


REPORT = SampledReport(
    "cm3leon",
    "vqgan",
    "cm3leon",
    seen_target=0.85,
    autoencoder=Autoencoder("vqgan", "VQGAN", "tokens", True, True),
)
RECIPE = Recipe(
    name="cm3leon",
    help="VQGAN -> tokens -> CM3leon (text <-> image) -> samples -> prompt following -> captions",
    stages=(
        DATA_STAGE,
        Stage("vqgan", vqgan, trains=True),
        Stage("cm3leon", cm3leon, trains=True),
        Stage("samples", samples),
        Stage("captions", captions),
    ),
    report=REPORT.report,
    render=REPORT.render,
    from_files=REPORT.collect,
)
