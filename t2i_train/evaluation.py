"""Evaluation as a library: prompt following of a sample folder and stage-1 reconstruction quality.

``python -m t2i_train.evaluate`` (``t2i_train.cli.evaluate``) parses arguments and calls these; the recipes
call them directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from t2i_train.errors import ConfigError
from t2i_train.models.capabilities import require


def prompt_following(samples_dir: str | Path, output: str | Path | None = None) -> dict[str, Any]:
    """Judge every image of a sample folder (its ``manifest.jsonl``, written by ``t2i_train.sampling``) with the
    rule-based shapes reader (colour, shape, position); writes the result to ``output`` (default
    ``DIR/eval.json``) and returns it."""
    from t2i_train.metrics.shapes_reader import evaluate_samples_dir

    directory = Path(samples_dir)
    if not (directory / "manifest.jsonl").is_file():
        raise ConfigError(
            f"{directory}/manifest.jsonl not found; write samples with `python -m t2i_train.sample`"
        )
    result = evaluate_samples_dir(directory)
    result.pop("readings", None)
    Path(output or directory / "eval.json").write_text(json.dumps(result, indent=2))
    return result


@torch.no_grad()
def reconstruction(
    checkpoint: str,
    urls: str,
    image_size: int = 32,
    max_images: int = 1024,
    batch_size: int = 64,
    output: str | None = None,
) -> dict[str, Any]:
    """PSNR (dB, images in [0, 1]) of a stage-1 model's reconstructions of up to ``max_images`` images from
    ``urls``, and, for VQ tokenizers (``codebook_size`` + ``encode_to_indices``), the codebook usage."""
    from t2i_train.checkpoint import load_family
    from t2i_train.data.datamodule import ShardDataModule
    from t2i_train.metrics.image_quality import psnr

    model = load_family(checkpoint)
    require(model, "reconstruct", f"evaluate reconstruction checkpoint={checkpoint}")
    data = ShardDataModule(train_urls=urls, batch_size=batch_size, num_workers=0, image_size=image_size)
    data.setup("fit")
    codebook = getattr(model, "codebook_size", None)  # VQ tokenizers: also count the codes in use
    used = torch.zeros(codebook, dtype=torch.bool) if codebook else None
    scores, seen = [], 0
    for batch in data.train_dataloader():
        images = batch["image"][: max_images - seen]
        recon = model.reconstruct(images)
        scores.append(psnr((recon.clamp(-1, 1) + 1) / 2, (images + 1) / 2).per_image)
        if used is not None:
            used[model.encode_to_indices(images).flatten().unique()] = True
        seen += len(images)
        if seen >= max_images:
            break
    values = torch.cat(scores)
    result: dict[str, Any] = {
        "checkpoint": checkpoint,
        "images": seen,
        "psnr_db": round(values.mean().item(), 3),
        "psnr_db_min": round(values.min().item(), 3),
    }
    if used is not None:
        result.update(codebook_used=int(used.sum()), codebook_size=codebook)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
    return result
