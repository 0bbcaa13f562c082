"""GALIP's loss: hinge terms, the rolled mismatch term and the matching-aware gradient penalty."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from t2i_train.losses.gan_hinge_magp import GanHingeMAGP, matching_aware_gp, mismatched
from t2i_train.models.galip import Discriminator, NetC

WIDTH, TAPS, GRID, TEXT, BATCH = 8, 3, 4, 6, 5


class TinyD(nn.Module):
    """A small NetD + NetC with non-zero γ, β so every path of D carries gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.discriminator = Discriminator(WIDTH, TAPS, out_channels=12)
        self.netc = NetC(12, TEXT, GRID, hidden=8)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(("gamma", "beta")):
                    p.fill_(0.7)

    def score(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.netc(self.discriminator(features), text)


def features(n: int = BATCH) -> torch.Tensor:
    return torch.randn(n, TAPS, WIDTH, GRID, GRID)


def outputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "real_features": features(),
        "fake_features": features(),
        "text_emb": torch.randn(BATCH, TEXT),
        "fake_emb": torch.randn(BATCH, TEXT),
    }


def reference_gp(d: TinyD, f: torch.Tensor, e: torch.Tensor, k: float, p: float) -> torch.Tensor:
    """Per sample: D of that sample alone, its gradients w.r.t. its features and embedding, one joint norm."""
    terms = []
    for i in range(f.shape[0]):
        fi = f[i : i + 1].clone().requires_grad_(True)
        ei = e[i : i + 1].clone().requires_grad_(True)
        gf, ge = torch.autograd.grad(d.score(fi, ei).sum(), (fi, ei))
        norm = torch.sqrt((gf**2).sum() + (ge**2).sum())
        terms.append(norm**p)
    return k * torch.stack(terms).mean()


def test_ma_gp_matches_a_per_sample_autograd_reference() -> None:
    d = TinyD()
    f, e = features(), torch.randn(BATCH, TEXT)
    leaf_f, leaf_e = f.clone().requires_grad_(True), e.clone().requires_grad_(True)
    gp = matching_aware_gp(d.score(leaf_f, leaf_e).float(), leaf_f, leaf_e, weight=2.0, power=6.0)
    expected = reference_gp(d, f, e, 2.0, 6.0)
    torch.testing.assert_close(gp, expected, rtol=1e-5, atol=1e-12)
    # other k and p
    leaf_f, leaf_e = f.clone().requires_grad_(True), e.clone().requires_grad_(True)
    gp = matching_aware_gp(d.score(leaf_f, leaf_e), leaf_f, leaf_e, weight=0.5, power=2.0)
    torch.testing.assert_close(gp, reference_gp(d, f, e, 0.5, 2.0), rtol=1e-5, atol=1e-12)


def test_ma_gp_is_one_joint_norm_not_two_separate_ones() -> None:
    d = TinyD()
    f = features().requires_grad_(True)
    e = torch.randn(BATCH, TEXT, requires_grad=True)
    scores = d.score(f, e)
    gf, ge = torch.autograd.grad(scores.sum(), (f, e), retain_graph=True)
    separate = 2.0 * (gf.flatten(1).norm(dim=1) ** 6 + ge.norm(dim=1) ** 6).mean()
    joint = matching_aware_gp(scores, f, e)
    assert ge.abs().sum() > 0 and gf.abs().sum() > 0  # both parts contribute
    assert not torch.allclose(joint, separate, rtol=1e-3)
    assert joint > separate  # (a + b)^3 > a^3 + b^3 for a, b > 0


def test_ma_gp_is_trained_through_and_invariant_to_its_grad_scale() -> None:
    d = TinyD()
    f = features().requires_grad_(True)
    e = torch.randn(BATCH, TEXT, requires_grad=True)
    gp = matching_aware_gp(d.score(f, e), f, e)
    scaled = matching_aware_gp(d.score(f, e), f, e, grad_scale=1024.0)
    torch.testing.assert_close(gp, scaled, rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(gp, d.discriminator.main.convs[0].weight)
    assert grad.abs().sum() > 0  # create_graph: the penalty reaches D's weights


def test_ma_gp_has_a_gradient_at_zero() -> None:
    f = torch.zeros(2, 3, requires_grad=True)
    e = torch.zeros(2, 2, requires_grad=True)
    scores = (f * 0).sum(1) + (e * 0).sum(1)  # D constant: zero input gradients
    gp = matching_aware_gp(scores, f, e)
    assert float(gp) == 0.0 and torch.isfinite(gp)


def test_mismatch_rolls_the_embeddings_by_one() -> None:
    e = torch.arange(12.0).view(4, 3)
    rolled = mismatched(e)
    for i in range(4):
        assert torch.equal(rolled[i], e[(i + 1) % 4])


def test_discriminator_terms_against_hand_computation() -> None:
    d, out = TinyD(), outputs()
    terms = GanHingeMAGP(gp_weight=2.0, gp_power=6.0).discriminator_terms(out, d, step=0)
    f_real, f_fake, e = out["real_features"], out["fake_features"], out["text_emb"]
    with torch.no_grad():
        s_real, s_fake = d.score(f_real, e), d.score(f_fake, e)
        s_mis = d.score(f_real, torch.cat([e[1:], e[:1]]))
    d_real = torch.clamp(1 - s_real, min=0).mean()
    d_fake = torch.clamp(1 + s_fake, min=0).mean()
    d_mis = torch.clamp(1 + s_mis, min=0).mean()
    gp = reference_gp(d, f_real, e, 2.0, 6.0)
    torch.testing.assert_close(terms["d_real"], d_real)
    torch.testing.assert_close(terms["d_fake"], d_fake)
    torch.testing.assert_close(terms["d_mismatch"], d_mis)
    torch.testing.assert_close(terms["ma_gp"], gp, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(terms["loss"], d_real + (d_fake + d_mis) / 2 + gp, rtol=1e-5, atol=1e-7)
    assert {"score_real", "score_fake", "score_mismatch"} <= set(terms)


def test_discriminator_loss_backward_reaches_only_d() -> None:
    d, out = TinyD(), outputs()
    out["fake_features"] = out["fake_features"].requires_grad_(True)  # stands for G's graph
    terms = GanHingeMAGP().discriminator_terms(out, d, step=0)
    terms["loss"].backward()
    assert out["fake_features"].grad is None  # the fake images are detached in the D step
    unused = {id(p) for b in d.discriminator.blocks for p in b.shortcut.parameters()}  # same-width shortcuts
    assert all((p.grad is None) == (id(p) in unused) for p in d.parameters())


def test_generator_terms_against_hand_computation() -> None:
    d, out = TinyD(), outputs()
    out["fake_features"] = out["fake_features"].requires_grad_(True)
    terms = GanHingeMAGP(clip_weight=4.0).generator_terms(out, d, step=0)
    with torch.no_grad():
        g_adv = -d.score(out["fake_features"], out["text_emb"]).mean()
    align = F.cosine_similarity(out["fake_emb"], out["text_emb"]).mean()
    torch.testing.assert_close(terms["g_adv"], g_adv)
    torch.testing.assert_close(terms["g_clip_align"], align)
    torch.testing.assert_close(terms["loss"], g_adv - 4.0 * align)
    terms["loss"].backward()
    assert out["fake_features"].grad is not None  # G is trained through D


def test_validation_terms_need_no_discriminator() -> None:
    out = outputs()
    terms = GanHingeMAGP(clip_weight=4.0)(out)
    align = F.cosine_similarity(out["fake_emb"], out["text_emb"]).mean()
    torch.testing.assert_close(terms["g_clip_align"], align)
    torch.testing.assert_close(terms["loss"], -4.0 * align)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_penalty_under_cpu_autocast_is_finite_and_close_to_fp32(dtype: torch.dtype) -> None:
    d, out = TinyD(), outputs()
    loss = GanHingeMAGP()
    reference = loss.discriminator_terms(out, d, step=0)
    with torch.autocast("cpu", dtype=dtype):
        terms = loss.discriminator_terms(out, d, step=0)
    assert terms["ma_gp"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    torch.testing.assert_close(terms["ma_gp"], reference["ma_gp"], rtol=0.3, atol=1e-6)
    terms["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)
