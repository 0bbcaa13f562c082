"""MaskedCrossEntropy: only masked positions count, mean over masked tokens, accuracy term."""

from __future__ import annotations

import math

import pytest
import torch

from t2i_train.losses.masked_ce import MaskedCrossEntropy


def _outputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 7, generator=g)
    targets = torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, [0, 2]] = True
    mask[1, 4] = True
    mask[2, [1, 2, 3]] = True
    return {"logits": logits, "targets": targets, "mask": mask}


def test_unmasked_positions_do_not_change_the_loss() -> None:
    loss = MaskedCrossEntropy(label_smoothing=0.1)
    out = _outputs()
    before = loss(out)
    changed = dict(out)
    changed["logits"] = torch.where(
        out["mask"][..., None], out["logits"], torch.randn_like(out["logits"]) * 50
    )
    changed["targets"] = torch.where(out["mask"], out["targets"], (out["targets"] + 3) % 7)
    after = loss(changed)
    assert torch.equal(before["loss"], after["loss"])
    assert torch.equal(before["masked_acc"], after["masked_acc"])
    # ... while changing a masked position does change it
    moved = dict(out)
    moved["logits"] = out["logits"].clone()
    moved["logits"][0, 0] += torch.arange(7.0)
    assert not torch.equal(loss(moved)["loss"], before["loss"])


def test_equals_hand_computation() -> None:
    out = _outputs(1)
    for smoothing in (0.0, 0.1):
        terms, k = [], out["logits"].shape[-1]
        for b, n in out["mask"].nonzero().tolist():
            logp = out["logits"][b, n].log_softmax(-1)
            nll = -logp[out["targets"][b, n]].item()
            uniform = -logp.mean().item()
            terms.append((1 - smoothing) * nll + smoothing * uniform)
        expected = sum(terms) / len(terms)  # mean over all masked tokens of the batch (6 of them)
        got = MaskedCrossEntropy(label_smoothing=smoothing)(out)
        assert got["loss"].item() == pytest.approx(expected, rel=1e-5)
        assert k == 7


def test_accuracy_and_gradient() -> None:
    out = _outputs(2)
    logits = torch.full_like(out["logits"], -10.0)
    logits.scatter_(-1, out["targets"][..., None], 10.0)  # every token right ...
    logits[2, 1] = 0.0
    logits[2, 1, (out["targets"][2, 1] + 1) % 7] = 10.0  # ... except one of the 6 masked ones
    logits.requires_grad_(True)
    got = MaskedCrossEntropy(label_smoothing=0.0)({**out, "logits": logits})
    assert got["masked_acc"].item() == pytest.approx(5 / 6)
    got["loss"].backward()
    unmasked_grad = logits.grad[~out["mask"]]
    assert torch.count_nonzero(unmasked_grad) == 0
    assert torch.count_nonzero(logits.grad[out["mask"]]) > 0
    assert math.isfinite(got["loss"].item())


def test_rejects_bad_smoothing() -> None:
    with pytest.raises(ValueError):
        MaskedCrossEntropy(label_smoothing=1.0)
