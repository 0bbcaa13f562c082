"""``diffusion`` (``make train-diffusion``): ``experiment=shapes_vae`` -> held-out PSNR -> pre-encoded latents ->
``experiment=shapes_diffusion`` on the latents and the descriptive captions -> samples from the seen and held-out
prompts upsampled to descriptive ones -> prompt following against the short prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from t2i_train.recipes.base import Recipe, Run, Stage
from t2i_train.recipes.report import Autoencoder, SampledReport
from t2i_train.recipes.stages import (
    DATA_STAGE,
    last_checkpoint,
    latent_data,
    sample_splits,
    train_stage,
    vae_and_latents,
)


def vae(run: Run) -> Path:
    return vae_and_latents(run, {"train": run.data, "val": run.data / "val"})


def diffusion(run: Run) -> Path:
    overrides = ["experiment=shapes_diffusion", *latent_data(run.out / "latents", run.results["vae"])]
    train_stage(run, run.out / "diffusion", [*overrides, *run.overrides("diffusion")])
    return last_checkpoint(run.out / "diffusion")


def samples(run: Run) -> dict[str, Any]:
    # trained on descriptive captions: sampled from the prompts upsampled to descriptive ones
    return sample_splits(run, run.results["diffusion"], descriptive=True)


REPORT = SampledReport(
    "diffusion", "vae", "diffusion", seen_target=0.85, autoencoder=Autoencoder("vae", "VAE", "latents")
)
RECIPE = Recipe(
    name="diffusion",
    help="VAE -> latents -> latent diffusion on descriptive captions -> samples -> prompt following",
    stages=(
        DATA_STAGE,
        Stage("vae", vae, trains=True),
        Stage("diffusion", diffusion, trains=True),
        Stage("samples", samples),
    ),
    report=REPORT.report,
    render=REPORT.render,
    from_files=REPORT.collect,
)
