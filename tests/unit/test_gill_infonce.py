"""GILL's retrieval InfoNCE under 2-process gloo equals one process on the same global batch (a light module:
the spawned ranks import only the loss)."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from t2i_train.losses.gill import GILLLoss

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _features(count: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(count, 16, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(count, 16, generator=generator), dim=-1)
    return {"image_features": image, "text_features": text, "logit_scale": torch.tensor(10.0)}


def _rank_loss(rank: int, port: int, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        features = _features()
        half = {k: (v[rank * 4 : rank * 4 + 4] if v.dim() else v) for k, v in features.items()}
        image = half["image_features"].clone().requires_grad_(True)
        terms = GILLLoss().contrastive({**half, "image_features": image})
        terms["loss"].backward()
        results[rank] = (float(terms["loss"]), image.grad.clone())
    finally:
        torch.distributed.destroy_process_group()


def test_infonce_gathers_across_ranks_like_one_process_on_the_global_batch() -> None:
    features = _features()
    image = features["image_features"].clone().requires_grad_(True)
    single = GILLLoss().contrastive({**features, "image_features": image})
    single["loss"].backward()
    results = mp.Manager().dict()
    mp.spawn(_rank_loss, args=(_free_port(), results), nprocs=2, join=True)
    for rank in range(2):
        loss, grad = results[rank]
        assert loss == pytest.approx(float(single["loss"]), rel=1e-5)
        # each rank's local shard keeps its gradient: d(global loss)/d(its own rows)
        assert torch.allclose(grad, image.grad[rank * 4 : rank * 4 + 4], atol=1e-6)
