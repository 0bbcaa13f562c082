"""How much of a prompt (or an image) a frozen model's features keep: linear probes for colour, shape, position.

GILL reads a frozen LM's hidden states at its [IMG] tokens; when those states do not hold the prompt's attributes,
no amount of mapper or retrieval-head training recovers them. A linear probe (softmax regression on standardised
features, trained on part of a shapes set, scored on the rest) measures that ceiling in a few CPU minutes, before a
GILL run is spent on a stage-1 model::

    from t2i_train.checkpoint import load_family
    from t2i_train.metrics.state_probe import gill_state_probes
    print(gill_state_probes(load_family("runs/gill/checkpoints/last.ckpt"), ["data/shapes32/shapes-000000.tar"]))

Chance is 1/6 (colour), 1/3 (shape), 1/9 (position) on the shapes world.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from t2i_train.metrics.caption_accuracy import ATTRIBUTES, has_attributes


def probe_accuracy(
    features: torch.Tensor,
    labels: Sequence[str],
    train_fraction: float = 0.8,
    steps: int = 400,
    seed: int = 0,
) -> float:
    """Held-out accuracy of a linear softmax probe from ``features`` [N, D] to ``labels`` (N strings)."""
    if len(labels) != features.shape[0] or len(labels) < 10:
        raise ValueError(
            f"need >= 10 labelled feature rows, got {features.shape[0]} rows, {len(labels)} labels"
        )
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(len(y) * train_fraction)
    train, test = order[:cut], order[cut:]
    x = features.detach().float()
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    with torch.enable_grad():
        weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
        bias = torch.zeros(len(classes), requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
        for _ in range(steps):
            loss = F.cross_entropy(x[train] @ weight + bias, y[train]) + 1e-3 * weight.square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return float(((x[test] @ weight + bias).argmax(1) == y[test]).float().mean())


def probe_attributes(
    features: torch.Tensor, metas: Sequence[dict[str, Any]], **kwargs: Any
) -> dict[str, float]:
    """{colour, shape, position} -> probe accuracy of ``features`` [N, D] for the samples' JSON ``metas``."""
    return {a: probe_accuracy(features, [str(m[a]) for m in metas], **kwargs) for a in ATTRIBUTES}


@torch.no_grad()
def gill_state_probes(
    model: Any, urls: Sequence[str], count: int = 1000, caption_key: str = "descriptive", batch_size: int = 50
) -> dict[str, dict[str, float]]:
    """Probes of a GILL's frozen parts on ``count`` samples of ``urls``: the LM's state at [IMG0] (``img0``), at
    all r [IMG] positions side by side (``img_all``), both after the ``caption_key`` caption, and CLIP's pooled
    image features (``clip``, the image side)."""
    import random

    from t2i_train.data.transforms import decode_image, to_batch

    metas, images = _labelled_samples(urls, count, caption_key)
    size, rng = int(model.clip.image_size), random.Random(0)
    img0, img_all, clip = [], [], []
    for start in range(0, len(metas), batch_size):
        rows = metas[start : start + batch_size]
        states = model.image_pass([m[caption_key] for m in rows], teach=False).img_states
        img0.append(states[:, 0].float().cpu())
        img_all.append(states.flatten(1).float().cpu())
        decoded = [
            decode_image(data, size, "resize", False, rng) for data in images[start : start + batch_size]
        ]
        pixels = to_batch(decoded).to(model.device)
        clip.append(model.clip_features(pixels).float().cpu())
    features = {"img0": img0, "img_all": img_all, "clip": clip}
    return {name: probe_attributes(torch.cat(parts), metas) for name, parts in features.items()}


def _labelled_samples(
    urls: Sequence[str], count: int, caption_key: str
) -> tuple[list[dict[str, Any]], list[bytes]]:
    from t2i_train.data.datamodule import resolve_urls
    from t2i_train.data.shard_map import read_raw_samples
    from t2i_train.data.transforms import parse_meta

    metas, images = [], []
    for url in resolve_urls(list(urls)):
        for raw in read_raw_samples(url):
            meta = parse_meta(raw)
            if has_attributes(meta) and isinstance(meta.get(caption_key), str) and "png" in raw:
                metas.append(meta)
                images.append(raw["png"])
            if len(metas) >= count:
                return metas, images
    if len(metas) < 10:
        raise ValueError(f"{urls}: {len(metas)} samples with colour/shape/position and json.{caption_key}")
    return metas, images
