"""KV cache of the shared transformer blocks: incremental decoding gives what the full causal forward gives."""

from __future__ import annotations

import pytest
import torch

from t2i_train.nn.transformer import CausalTransformerLM, KVCache, Transformer

VOCAB = 61


def tiny_lm(seed: int = 0, max_length: int = 64) -> CausalTransformerLM:
    torch.manual_seed(seed)
    return CausalTransformerLM(VOCAB, max_length, dim=32, depth=3, heads=4, mlp_dim=64).eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preallocate", [True, False])
@torch.no_grad()
def test_incremental_logits_equal_the_full_forward(preallocate: bool) -> None:
    """Prefill 5 tokens, then 6 single-token steps and one 3-token chunk: every position's logits match the
    uncached forward of the whole sequence (float32, batch 3)."""
    model = tiny_lm()
    seq = ids(3, 14)
    full = model(seq)
    cache = model.new_cache() if preallocate else KVCache(len(model.transformer.blocks))
    pieces = [model(seq[:, :5], cache=cache)]
    for t in range(5, 11):
        pieces.append(model(seq[:, t : t + 1], cache=cache))
        assert cache.length == t + 1
    pieces.append(model(seq[:, 11:14], cache=cache))
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_greedy_decoding_with_and_without_the_cache_gives_the_same_tokens() -> None:
    model = tiny_lm(seed=2)
    prompt = ids(4, 6, seed=3)
    cached = model.generate_greedy(prompt, 40, use_cache=True)
    uncached = model.generate_greedy(prompt, 40, use_cache=False)
    assert cached.shape == (4, 46)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :6], prompt)
    assert len(set(cached[:, 6:].flatten().tolist())) > 1  # a real decode, not one constant token


@torch.no_grad()
def test_a_step_attends_to_what_the_cache_holds() -> None:
    """The same new token at the same position after two different prompts: different logits. A cache that is
    ignored (each step attending only to itself) would give equal ones."""
    model = tiny_lm()
    token = ids(2, 1, seed=4)
    steps = []
    for seed in (5, 6):
        cache = model.new_cache()
        model(ids(2, 7, seed=seed), cache=cache)
        steps.append(model(token, cache=cache))
    assert not torch.allclose(steps[0], steps[1], atol=1e-3)


@torch.no_grad()
def test_padded_prompt_keys_stay_masked_in_later_steps() -> None:
    """A left-padded prompt's ``key_mask`` is kept by the cache: the pad ids never change any logits of the real
    positions, and cached steps equal the masked full forward."""
    model = tiny_lm()
    seq = ids(2, 10, seed=7)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :3] = False  # row 0: three pad tokens before its prompt
    full = model(seq, key_mask=mask)
    other_pads = seq.clone()
    other_pads[0, :3] = (seq[0, :3] + 1) % VOCAB
    cache = model.new_cache()
    pieces = [model(other_pads[:, :6], key_mask=mask[:, :6], cache=cache)]
    pieces += [model(seq[:, t : t + 1], cache=cache) for t in range(6, 10)]
    cached = torch.cat(pieces, dim=1)
    torch.testing.assert_close(cached[0, 3:], full[0, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached[1], full[1], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(cached).all()


@torch.no_grad()
def test_cached_blocks_with_cross_attention_match_the_full_forward() -> None:
    """A decoder with cross-attention to a context (e.g. conditioning tokens): the context is given every step,
    only the self-attention is cached."""
    torch.manual_seed(0)
    net = Transformer(16, 2, 2, 32, cross_attention=True, context_dim=8).eval()
    x, ctx = torch.randn(2, 7, 16), torch.randn(2, 4, 8)
    ctx_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    full = net(x, ctx, ctx_mask, causal=True)
    cache = net.new_cache(7)
    pieces = [net(x[:, :3], ctx, ctx_mask, causal=True, cache=cache)]
    pieces += [net(x[:, t : t + 1], ctx, ctx_mask, causal=True, cache=cache) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_misuse_is_an_error() -> None:
    model = tiny_lm(max_length=8)
    cache = model.new_cache()
    model(ids(2, 6), cache=cache)
    with pytest.raises(ValueError, match="exceed max_length=8"):
        model(ids(2, 3), cache=cache)
    with pytest.raises(ValueError, match="batch of 2"):
        model(ids(3, 1), cache=cache)
    with pytest.raises(ValueError, match="3 layers, the transformer 2"):
        Transformer(16, 2, 2, 32)(torch.randn(1, 2, 16), causal=True, cache=KVCache(3))
