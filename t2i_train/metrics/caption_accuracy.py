"""Does a caption of a shapes image name its colour, shape and position? A rule-based text reader.

``read_attributes(caption)`` finds the shapes world's words (``t2i_train.data.synthetic``'s vocabulary) in a
caption: an attribute counts as read when the caption names exactly one value of it (a caption naming two
colours names neither). Positions are matched longest phrase first, so "top left" is not also "top" and
"left"; "centre" reads as "center". ``caption_accuracy(captions, metas)`` compares with the samples' JSON and
reports per-attribute and all-three accuracy.

``python -m t2i_train.caption_accuracy checkpoint=CKPT [style=dsc] [per_combination=10]`` (also as
``python -m t2i_train.metrics.caption_accuracy``; arguments parsed in ``t2i_train.cli.caption_accuracy``) scores a
captioner on its synthetic set's validation split (training combinations, unseen images) and on fresh renders
of the held-out combinations (never in training).
``python -m t2i_train.caption_accuracy shards=DIR [caption_key=dsc]`` audits captions already in shards
(e.g. what ``python -m t2i_train.recaption`` wrote) against each sample's JSON. Decoding options pass through to ``Captioner.caption``:
``method=beam num_beams=4 rerank=4`` keeps, of the 4 best beams, the one the captioner's CLIP matches best.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from t2i_train.data.synthetic import COLOURS, POSITION_NAMES, SHAPES

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "position")
ALIASES: dict[str, str] = {"centre": "center"}
_POSITION_WORDS = sorted({*POSITION_NAMES, "centre"}, key=len, reverse=True)
_PATTERNS: dict[str, re.Pattern[str]] = {
    "colour": re.compile(r"\b(" + "|".join(COLOURS) + r")\b"),
    "shape": re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b"),
    "position": re.compile(r"\b(" + "|".join(re.escape(p) for p in _POSITION_WORDS) + r")\b"),
}


def read_attributes(caption: str) -> dict[str, str | None]:
    """{colour, shape, position} named in ``caption`` (None: not named, or named ambiguously)."""
    text = " ".join(caption.lower().replace("-", " ").split())
    out: dict[str, str | None] = {}
    for name, pattern in _PATTERNS.items():
        found = {ALIASES.get(m, m) for m in pattern.findall(text)}
        out[name] = found.pop() if len(found) == 1 else None
    return out


def caption_accuracy(captions: Sequence[str], metas: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Fraction of captions naming the sample's colour, shape, position, and all three (``all``)."""
    if len(captions) != len(metas):
        raise ValueError(f"{len(captions)} captions for {len(metas)} samples")
    if not captions:
        return {**{a: 0.0 for a in ATTRIBUTES}, "all": 0.0, "count": 0}
    hits = np.zeros((len(captions), len(ATTRIBUTES)), dtype=bool)
    for i, (caption, meta) in enumerate(zip(captions, metas, strict=True)):
        read = read_attributes(caption)
        hits[i] = [read[a] is not None and read[a] == meta.get(a) for a in ATTRIBUTES]
    result = {a: float(hits[:, j].mean()) for j, a in enumerate(ATTRIBUTES)}
    return {**result, "all": float(hits.all(axis=1).mean()), "count": len(captions)}


def has_attributes(meta: Mapping[str, Any]) -> bool:
    """Whether a sample's JSON carries the shapes world's colour/shape/position (synthetic data)."""
    return all(isinstance(meta.get(a), str) for a in ATTRIBUTES)


# ------------------------------------------------------------------------------------------- evaluation
def render_scenes(
    combos: Sequence[tuple[str, str, str]], per_combination: int, size: int, seed: int = 12345
) -> tuple[Any, list[dict[str, Any]]]:
    """``per_combination`` fresh renders of each combination: (images [N,3,size,size] in [-1, 1], metas)."""
    import random

    from t2i_train.data.synthetic import make_sample
    from t2i_train.data.transforms import to_batch

    rng, text_rng = np.random.default_rng(seed), random.Random(seed)
    images, metas = [], []
    for combo in combos:
        for _ in range(per_combination):
            image, meta = make_sample(combo, size, rng, text_rng)
            images.append(np.asarray(image, dtype=np.uint8))
            metas.append(meta)
    return to_batch(images), metas


def shard_samples(urls: Sequence[str], size: int) -> tuple[Any, list[dict[str, Any]]]:
    """Every sample of ``urls`` (center-cropped to ``size``): (images [N,3,size,size] in [-1, 1], metas)."""
    import random

    from t2i_train.data.shard_map import read_raw_samples
    from t2i_train.data.transforms import decode_image, first_image_key, parse_meta, to_batch

    images, metas = [], []
    for url in urls:
        for raw in read_raw_samples(url):
            images.append(
                decode_image(raw[first_image_key(raw)], size, "center_crop", False, random.Random(0))
            )
            metas.append(parse_meta(raw))
    return to_batch(images), metas


def stored_caption_accuracy(shards: str | Sequence[str], caption_key: str = "dsc") -> dict[str, Any]:
    """Accuracy of the captions stored under ``caption_key`` (``read_caption``'s keys: ``dsc``, ``txt``,
    ``json.descriptive``) in ``shards``, against each sample's JSON attributes; samples without the caption
    or without attributes are counted apart."""
    from t2i_train.data.datamodule import resolve_urls
    from t2i_train.data.shard_map import read_raw_samples
    from t2i_train.data.transforms import parse_meta, read_caption

    captions, metas, missing, unlabelled = [], [], 0, 0
    for url in resolve_urls(shards):
        for raw in read_raw_samples(url):
            meta = parse_meta(raw)
            caption = read_caption(raw, meta, caption_key)
            if caption is None:
                missing += 1
            elif not has_attributes(meta):
                unlabelled += 1
            else:
                captions.append(caption)
                metas.append(meta)
    return {
        "caption_key": caption_key,
        **caption_accuracy(captions, metas),
        "missing": missing,
        "unlabelled": unlabelled,
    }


def caption_all(model: Any, images: Any, batch_size: int = 128, **decoding: Any) -> list[str]:
    """A captioner's captions of ``images`` in batches (``decoding``: ``Captioner.caption`` options)."""
    device = next(model.parameters()).device
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        captions += model.caption(images[start : start + batch_size].to(device), **decoding)
    return captions


def evaluate_checkpoint(
    checkpoint: str, style: str = "dsc", per_combination: int = 10, batch_size: int = 128, **decoding: Any
) -> dict[str, Any]:
    """Accuracy of a captioner checkpoint on its shapes set's validation split and on held-out renders."""
    from hydra.utils import instantiate

    from t2i_train.checkpoint import load_family, read_checkpoint
    from t2i_train.data.synthetic import parse_combination
    from t2i_train.errors import ConfigError
    from t2i_train.models.capabilities import require

    ckpt = read_checkpoint(checkpoint)
    model = load_family(checkpoint, ckpt=ckpt)
    require(model, "caption", f"caption accuracy of checkpoint={checkpoint}")
    data = instantiate(ckpt["t2i_config"]["data"], _convert_="all")
    data.setup("fit")
    root = data.dataset_dir
    if root is None or not (Path(root) / "dataset.json").is_file():
        raise ConfigError(f"{checkpoint} was not trained on a shapes set with a dataset.json")
    info = json.loads((Path(root) / "dataset.json").read_text())
    size = int(info["params"]["size"])
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "style": style, **decoding}
    if data.val_shards:
        images, metas = shard_samples(data.val_shards, size)
        result["val"] = caption_accuracy(
            caption_all(model, images, batch_size, style=style, **decoding), metas
        )
    held = [parse_combination(c) for c in info.get("heldout", [])]
    if held:
        images, metas = render_scenes(held, per_combination, size)
        captions = caption_all(model, images, batch_size, style=style, **decoding)
        result["heldout"] = caption_accuracy(captions, metas)
        result["heldout_examples"] = captions[:: max(1, per_combination)][:4]
    return result


if __name__ == "__main__":  # `python -m t2i_train.metrics.caption_accuracy`: the launcher, t2i_train.cli
    import runpy

    runpy.run_module("t2i_train.cli.caption_accuracy", run_name="__main__", alter_sys=True)
