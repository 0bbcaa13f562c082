"""T5TextEncoder: reproducible random weights, masks, truncation, loading from a saved directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer

from t2i_train.errors import ConfigError
from t2i_train.models.loading import no_weight_loading
from t2i_train.text.base import pad_condition
from t2i_train.text.t5 import T5TextEncoder

PROMPTS = ["a red circle in the top left", "top: a blue square", ""]


def test_same_seed_same_weights_regardless_of_global_rng() -> None:
    torch.manual_seed(123)
    a = T5TextEncoder(init_seed=7)
    state = torch.get_rng_state()
    b = T5TextEncoder(init_seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # construction leaves the global RNG alone
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = T5TextEncoder(init_seed=8)
    assert not torch.equal(a.model.shared.weight, c.model.shared.weight)
    emb_a, mask_a = a(PROMPTS)
    emb_b, mask_b = b(PROMPTS)
    assert torch.equal(emb_a, emb_b) and torch.equal(mask_a, mask_b)


def test_output_shapes_masks_and_determinism() -> None:
    enc = T5TextEncoder(d_model=32, d_ff=64, num_heads=2, d_kv=16)
    emb, mask = enc(PROMPTS)
    longest = len(PROMPTS[0].encode()) + 1  # bytes + EOS
    assert enc.dim == 32
    assert emb.shape == (3, longest, 32) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [len(p.encode()) + 1 for p in PROMPTS]
    assert torch.count_nonzero(emb[~mask]) == 0  # padding embeddings are zero
    again, _ = enc(PROMPTS)
    assert torch.equal(emb, again)
    # a prompt's embedding does not depend on what it is batched with (up to padding)
    alone, alone_mask = enc([PROMPTS[1]])
    n = int(alone_mask.sum())
    assert torch.allclose(emb[1, :n], alone[0, :n], atol=1e-5)


def test_truncation_and_fixed_padding() -> None:
    enc = T5TextEncoder(max_length=8, padding="max_length")
    emb, mask = enc(["short", "a much longer prompt than eight bytes"])
    assert emb.shape[1] == 8
    assert mask.sum(1).tolist() == [6, 8]
    with pytest.raises(ConfigError):
        T5TextEncoder(padding="left")


def test_dtype() -> None:
    enc = T5TextEncoder(dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in enc.parameters())
    emb, _ = enc(PROMPTS[:1])
    assert emb.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        T5TextEncoder(dtype="float33")


def test_null_condition_is_the_padded_empty_prompt() -> None:
    enc = T5TextEncoder()
    null, null_mask = enc.null_condition(4, 10)
    assert null.shape == (4, 10, enc.dim) and null_mask.shape == (4, 10)
    empty, empty_mask = pad_condition(*enc([""]), 10)
    assert torch.equal(null[2], empty[0]) and torch.equal(null_mask[3], empty_mask[0])
    assert null_mask[0].tolist() == [True] + [False] * 9


def test_save_pretrained_then_load(tmp_path: Path) -> None:
    enc = T5TextEncoder(init_seed=3)
    enc.model.save_pretrained(tmp_path)
    ByT5Tokenizer().save_pretrained(tmp_path)  # pretrained dirs carry their tokenizer (AutoTokenizer path)
    loaded = T5TextEncoder(pretrained=str(tmp_path), init_seed=99)
    assert loaded.tokenizer_name == str(tmp_path)
    assert isinstance(loaded.tokenizer, ByT5Tokenizer)
    a, _ = enc(PROMPTS)
    b, _ = loaded(PROMPTS)
    assert torch.equal(a, b)  # the saved weights, not init_seed=99's
    with pytest.raises(ConfigError, match="d_model"):
        T5TextEncoder(pretrained=str(tmp_path), d_model=32)


def test_no_weight_loading_builds_from_dims_on_meta(tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    with no_weight_loading(), torch.device("meta"):
        enc = T5TextEncoder(
            pretrained=str(missing),
            d_model=4096,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            d_kv=64,
            vocab_size=32128,
        )
    assert enc.dim == 4096
    assert all(p.device.type == "meta" for p in enc.parameters())
    assert sum(p.numel() for p in enc.parameters()) > 4.5e9  # T5-XXL encoder ≈ 4.7B
    assert enc._tokenizer is None  # nothing read yet


def test_prompt_cache_matches_the_encoder_and_is_bypassed_while_trainable() -> None:
    enc = T5TextEncoder(cache_size=3)
    prompts = ["a red circle", "blue square at the top", "a red circle", ""]
    enc.eval()
    uncached = enc(prompts)  # weights still take gradients: no cache
    assert enc.cache is not None and enc.cache.misses == 0
    enc.requires_grad_(False)
    for _ in range(2):
        emb, mask = enc(prompts)
        assert torch.equal(mask, uncached[1]) and torch.allclose(emb, uncached[0], atol=1e-6)
    assert enc.cache.misses == 3 and enc.cache.hits == 5
    enc(["one", "two", "three"])
    assert len(enc.cache.entries) == 3 and "a red circle" not in enc.cache.entries  # least recently used went
    fixed = T5TextEncoder(cache_size=8, padding="max_length", max_length=20).requires_grad_(False).eval()
    emb, mask = fixed(prompts)
    assert emb.shape[1] == 20 and torch.allclose(emb, fixed.encode(prompts)[0], atol=1e-6)


def test_clip_bpe_tokenizer_matches_open_clip_offline(tmp_path, monkeypatch) -> None:
    """The offline CLIP BPE tokenizer (built from open_clip's bundled merges) gives open_clip's ids."""
    import open_clip

    from t2i_train.text import clip_bpe

    monkeypatch.setenv("T2I_CACHE", str(tmp_path))
    clip_bpe.clip_bpe_tokenizer.cache_clear()
    tokenizer = clip_bpe.clip_bpe_tokenizer()
    assert (
        len(tokenizer) == clip_bpe.VOCAB_SIZE and (tmp_path / "clip_bpe_tokenizer" / "merges.txt").is_file()
    )
    text = "On a uniform dark gray background, one medium-sized red circle is placed in the top left."
    ids = tokenizer([text])["input_ids"][0]
    reference = open_clip.tokenize([text])[0]
    assert ids == reference[reference > 0].tolist()
    encoder = T5TextEncoder(tokenizer="clip_bpe", vocab_size=clip_bpe.VOCAB_SIZE, max_length=77)
    emb, mask = encoder([text, "a red circle"])
    assert emb.shape[:2] == mask.shape and int(mask[1].sum()) == 5  # start, a, red, circle, end
    clip_bpe.clip_bpe_tokenizer.cache_clear()
