"""`python -m t2i_train.evaluate <metric> key=value ...`: score samples or a stage-1 model.

Metrics:
  prompt_following samples_dir=DIR [output=FILE]
      Reads DIR/manifest.jsonl (written by `python -m t2i_train.sample`) and judges every image with the
      rule-based shapes reader (colour, shape, position). Prints JSON; writes DIR/eval.json unless output= is set.
  reconstruction checkpoint=CKPT urls=SHARDS [image_size=32] [max_images=1024] [batch_size=64] [output=FILE]
      Encodes and decodes images from shards with a stage-1 tokenizer (vqgan) and reports PSNR (dB, images in
      [0, 1]) and codebook usage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import fail, user_errors_exit
from t2i_train.errors import ConfigError

METRICS = ("prompt_following", "reconstruction")


def parse_args(argv: list[str]) -> tuple[str, dict[str, str]]:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    metric, rest = argv[0], argv[1:]
    if metric not in METRICS:
        fail(f"unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")
    args = {}
    for item in rest:
        if "=" not in item:
            fail(f"expected key=value, got '{item}'")
        key, value = item.split("=", 1)
        args[key] = value
    return metric, args


def prompt_following(samples_dir: str, output: str | None = None) -> dict[str, Any]:
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
    from t2i_train.checkpoint import load_family
    from t2i_train.data.datamodule import ShardDataModule
    from t2i_train.metrics.image_quality import psnr

    model = load_family(checkpoint)
    if not hasattr(model, "reconstruct"):
        raise ConfigError(f"{checkpoint} holds a {model.family_name}, which does not reconstruct images")
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
    result = {
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


@user_errors_exit
def run(metric: str, args: dict[str, str]) -> dict[str, Any]:
    if metric == "prompt_following":
        return prompt_following(**args)
    ints = {k: int(v) for k, v in args.items() if k in ("image_size", "max_images", "batch_size")}
    return reconstruction(**{**args, **ints})


def main(argv: list[str] | None = None) -> None:
    metric, args = parse_args(apply_trust_argument(sys.argv[1:] if argv is None else argv))
    try:
        print(json.dumps(run(metric, args), indent=2))
    except TypeError as exc:
        fail(f"bad arguments for {metric}: {exc} (see `python -m t2i_train.evaluate --help`)")


if __name__ == "__main__":
    main()
