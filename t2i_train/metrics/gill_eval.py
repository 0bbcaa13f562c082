"""GILL's own numbers on a shapes set: text -> image retrieval recall and the mapper's distillation fidelity.

- :func:`retrieval_recall`: for every colour/shape/position combination present in a bank of images (the
  validation split), its prompt (the descriptive template's wording, the language GILL was trained on) retrieves
  the top k of the FAISS index; a hit is a retrieved image of that combination (read from its JSON). R@1, R@5.
- :func:`distillation_fidelity`: on captions, the mapper's output against the target text encoder's (the
  per-token Euclidean distance GILL is trained on, and the per-token cosine), over the target's real tokens.

Both ask the model for capabilities (``retrieve``; ``generation_condition`` / ``encode_target``), not its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from t2i_train.metrics.caption_accuracy import ATTRIBUTES, has_attributes


def bank_attributes(urls: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Sample key -> (colour, shape, position) of every sample of ``urls`` with those attributes."""
    from t2i_train.data.shard_map import read_raw_samples
    from t2i_train.data.transforms import parse_meta

    out = {}
    for url in urls:
        for raw in read_raw_samples(url):
            meta = parse_meta(raw)
            if has_attributes(meta):
                out[str(raw["__key__"])] = tuple(str(meta[a]) for a in ATTRIBUTES)
    return out


def combination_prompt(combo: tuple[str, ...]) -> str:
    """The descriptive template's caption of a (colour, shape, position) combination."""
    from t2i_train.data.synthetic import descriptive_prompt

    return str(descriptive_prompt(*combo))


@torch.no_grad()
def retrieval_recall(
    model: Any, index: str, urls: Sequence[str], ks: Sequence[int] = (1, 5), batch_size: int = 64
) -> dict[str, Any]:
    """R@k of text -> image retrieval over the bank ``urls`` indexed in ``index`` (see the module docstring)."""
    attributes = bank_attributes(urls)
    combos = sorted(set(attributes.values()))
    prompts = [combination_prompt(c) for c in combos]
    k = max(ks)
    hits: list[list[Any]] = []
    for start in range(0, len(prompts), batch_size):
        hits += model.retrieve(prompts[start : start + batch_size], k=k, index=index)
    result: dict[str, Any] = {"prompts": len(prompts), "bank": len(attributes)}
    for cut in ks:
        found = [
            any(attributes.get(h.key) == combo for h in row[:cut])
            for row, combo in zip(hits, combos, strict=True)
        ]
        result[f"r@{cut}"] = sum(found) / max(1, len(found))
    result["examples"] = [
        {
            "prompt": p,
            "top1": row[0].key,
            "top1_attributes": list(attributes.get(row[0].key, ())),
            "score": row[0].score,
        }
        for p, row in list(zip(prompts, hits, strict=True))[:3]
    ]
    return result


@torch.no_grad()
def distillation_fidelity(model: Any, captions: Sequence[str], batch_size: int = 64) -> dict[str, float]:
    """Mean per-token Euclidean distance and cosine of the mapper's output to the target encoder's, over the
    target's real tokens, and how often the mapper's real-position head agrees with the target's padding."""
    from t2i_train.losses.gill import l2_distill, token_cosine

    distance = cosine = agree = 0.0
    tokens = 0.0
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        target, mask = model.encode_target(chunk)
        mapped, predicted = model.generation_condition(chunk)
        real = float(mask.sum())
        distance += float(l2_distill(mapped, target, mask)) * real
        cosine += float(token_cosine(mapped, target, mask)) * real
        agree += float((predicted == mask).float().mean()) * len(chunk)
        tokens += real
    count = max(1, len(captions))
    return {
        "captions": len(captions),
        "distance": distance / max(tokens, 1.0),
        "cosine": cosine / max(tokens, 1.0),
        "mask_agreement": agree / count,
    }
