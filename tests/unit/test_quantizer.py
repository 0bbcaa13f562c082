"""VectorQuantizer: nearest code, straight-through gradients, loss terms, usage tracking, dead-code restarts."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from t2i_train.nn.quantizer import VectorQuantizer


def _quantizer(codebook: torch.Tensor, **kwargs: object) -> VectorQuantizer:
    q = VectorQuantizer(codebook.shape[0], codebook.shape[1], data_init=False, **kwargs)
    with torch.no_grad():
        q.codebook.copy_(codebook)
    return q


def _as_map(vectors: torch.Tensor) -> torch.Tensor:
    """[N, dim] -> [1, dim, 1, N] (a one-row feature map)."""
    return vectors.t().reshape(1, vectors.shape[1], 1, vectors.shape[0])


CODES = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])


def test_nearest_code_is_chosen_and_returned() -> None:
    q = _quantizer(CODES).eval()
    z = _as_map(torch.tensor([[0.9, 0.1], [0.1, 0.8], [-0.7, -0.9], [0.05, -0.1], [0.6, 0.0]]))
    z_q, idx, _ = q(z)
    assert idx.shape == (1, 1, 5)
    assert idx.flatten().tolist() == [1, 2, 3, 0, 1]
    torch.testing.assert_close(z_q, _as_map(CODES[[1, 2, 3, 0, 1]]))
    assert q.indices(z).flatten().tolist() == [1, 2, 3, 0, 1]
    torch.testing.assert_close(q.embed(idx), z_q)


def test_l2_normalized_lookup_uses_cosine() -> None:
    codes = torch.tensor([[10.0, 0.0], [0.0, 0.1]])
    q = _quantizer(codes, l2_normalized=True).eval()
    z = _as_map(torch.tensor([[0.1, 0.3]]))  # closer to code 0 in Euclidean terms, to code 1 in angle
    z_q, idx, _ = q(z)
    assert idx.item() == 1
    torch.testing.assert_close(z_q.flatten(), torch.tensor([0.0, 1.0]))


def test_straight_through_gradient_and_loss_terms() -> None:
    q = _quantizer(CODES, beta=0.25).train()
    q.restart_every = 0
    z = _as_map(torch.tensor([[0.9, 0.1], [0.1, 0.8], [-0.7, -0.9]])).requires_grad_(True)
    z_q, _, terms = q(z)
    target = _as_map(CODES[[1, 2, 3]])
    expected = F.mse_loss(target, z.detach())
    torch.testing.assert_close(terms["codebook_loss"], expected)
    torch.testing.assert_close(terms["commitment_loss"], expected)
    torch.testing.assert_close(terms["vq_loss"], expected * 1.25)

    # straight-through: d(sum z_q)/dz is the identity, and the codebook gets no gradient from z_q
    (z_q * torch.arange(6.0).reshape(1, 2, 1, 3)).sum().backward()
    torch.testing.assert_close(z.grad, torch.arange(6.0).reshape(1, 2, 1, 3))
    assert q.codebook.grad is None or q.codebook.grad.abs().sum() == 0

    # codebook loss moves only the chosen codes; commitment loss only the encoder output
    z.grad = None
    _, _, terms = q(z)
    terms["codebook_loss"].backward()
    assert z.grad is None or z.grad.abs().sum() == 0
    assert q.codebook.grad[0].abs().sum() == 0 and q.codebook.grad[1:].abs().sum() > 0
    q.codebook.grad = None
    _, _, terms = q(z)
    terms["commitment_loss"].backward()
    assert z.grad.abs().sum() > 0 and q.codebook.grad is None


def test_usage_is_tracked_and_dead_codes_restarted_from_batch() -> None:
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [50.0, 50.0], [-50.0, 50.0]])
    q = _quantizer(codes, dead_code_threshold=0.5, restart_every=3, usage_decay=0.5).train()
    z = _as_map(torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.2, -0.1], [1.1, 0.0]]))
    for _ in range(2):
        _, _, terms = q(z)
        assert terms["restarted"].item() == 0
    # shares per step: [0.5, 0.5, 0, 0]; EMA from 0 with decay 0.5 twice
    torch.testing.assert_close(q.usage, torch.tensor([0.375, 0.375, 0.0, 0.0]))
    assert terms["usage_fraction"].item() == 0.5
    torch.testing.assert_close(terms["perplexity"], torch.tensor(2.0))
    _, _, terms = q(z)  # third step: codes 2 and 3 (share 0 < 0.5/4) are restarted
    assert terms["restarted"].item() == 2
    batch_rows = {tuple(r) for r in z.reshape(2, -1).t().tolist()}
    assert {tuple(r) for r in q.codebook[2:].tolist()} <= batch_rows
    torch.testing.assert_close(q.usage[2:], torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(q.codebook[:2], codes[:2])


def test_eval_mode_and_indices_have_no_side_effects() -> None:
    q = _quantizer(CODES, dead_code_threshold=1.0, restart_every=1).eval()
    before = q.codebook.detach().clone(), q.usage.clone()
    z = _as_map(torch.randn(16, 2))
    q(z)
    q.train()
    q.indices(z)
    torch.testing.assert_close(q.codebook.detach(), before[0])
    torch.testing.assert_close(q.usage, before[1])
    assert int(q.steps) == 0


def test_data_init_takes_codes_from_first_training_batch() -> None:
    q = VectorQuantizer(8, 3, data_init=True)
    z = torch.randn(2, 3, 4, 4)
    q.train()(z)
    rows = {tuple(r) for r in z.movedim(1, -1).reshape(-1, 3).tolist()}
    assert {tuple(r) for r in q.codebook.tolist()} <= rows
    assert len({tuple(r) for r in q.codebook.tolist()}) == 8  # sampled without replacement
    assert bool(q.initialized)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restart_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different data and different local randomness per rank
    q = VectorQuantizer(16, 4, dead_code_threshold=0.5, restart_every=2, data_init=True).train()
    for _ in range(4):
        q(torch.randn(2, 4, 3, 3) * 0.01)  # tiny inputs: most codes stay unused and are restarted
    torch.save({"codebook": q.codebook.detach(), "usage": q.usage}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~10-30 s of interpreter start-up on 2 cores
@pytest.mark.distributed
def test_restarts_are_identical_across_ranks(tmp_path: object) -> None:
    mp.spawn(_restart_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(f"{tmp_path}/rank{r}.pt") for r in range(2))
    torch.testing.assert_close(a["codebook"], b["codebook"], rtol=0, atol=0)
    torch.testing.assert_close(a["usage"], b["usage"], rtol=0, atol=0)
