"""The shared causal-LM helpers (t2i_train/text/causal_lm.py) used by the captioner, the upsampler and GILL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from t2i_train.errors import ConfigError
from t2i_train.losses.cross_entropy import IGNORE_INDEX
from t2i_train.text.causal_lm import (
    add_tokens,
    appends_eos,
    build_causal_lm,
    byte_tokenizer,
    decode_until_eos,
    decoding_options,
    embed_ids,
    first_line,
    lm_max_positions,
    lm_width,
    load_causal_lm,
    prefix_lm_logits,
    rerank_options,
    seeded_generate,
    torch_dtype,
)

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}


def tiny_lm(seed: int = 0, **config: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_causal_lm(None, {**TINY, **config}, byte_tokenizer()).eval()


def test_config_lm_is_sized_to_the_tokenizer() -> None:
    tokenizer = byte_tokenizer()
    lm = tiny_lm(n_layer=None)  # None keeps the default (4 layers)
    assert lm.config.vocab_size == len(tokenizer) == 384
    assert lm.config.eos_token_id == lm.config.bos_token_id == tokenizer.eos_token_id == 1
    assert lm.config.pad_token_id == tokenizer.pad_token_id == 0
    assert (lm.config.n_layer, lm_width(lm), lm_max_positions(lm)) == (4, 32, 64)
    assert tiny_lm(vocab_size=512).config.vocab_size == 512
    same = [tiny_lm(seed=s).transformer.wte.weight for s in (3, 3, 4)]
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], same[2])
    with pytest.raises(ConfigError, match=r"model\.gill\.lm\.vocab_size 100 < the tokenizer's 384"):
        build_causal_lm(None, {"vocab_size": 100}, tokenizer, key="model.gill.lm")


def test_decoding_and_rerank_options() -> None:
    assert decoding_options("greedy", 4, 0.9, 1.0) == {"do_sample": False, "num_beams": 1}
    assert decoding_options("beam", 3, 0.9, 1.0) == {"do_sample": False, "num_beams": 3}
    assert decoding_options("top_p", 4, 0.8, 0.7) == {
        "do_sample": True,
        "top_p": 0.8,
        "top_k": 0,
        "temperature": 0.7,
    }
    assert rerank_options("top_p", 4, 1) == {}
    assert rerank_options("top_p", 4, 3) == {"num_return_sequences": 3}
    assert rerank_options("beam", 2, 5) == {"num_return_sequences": 5, "num_beams": 5}
    for bad, match in (
        (lambda: decoding_options("sample", 4, 0.9, 1.0), "greedy, beam, top_p"),
        (lambda: decoding_options("beam", 0, 0.9, 1.0), "num_beams must be >= 1"),
        (lambda: decoding_options("top_p", 4, 1.5, 1.0), r"top_p must be in \(0, 1\]"),
        (lambda: rerank_options("greedy", 4, 2), "needs candidates"),
        (lambda: rerank_options("beam", 4, -1), "rerank must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            bad()


@torch.no_grad()
def test_seeded_generate_from_a_prefix_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    lm = tiny_lm()
    prefix = torch.randn(2, 3, lm_width(lm), generator=torch.Generator().manual_seed(0))
    options = {
        "inputs_embeds": prefix,
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "max_new_tokens": 12,
        "eos_token_id": 1,
        "pad_token_id": 0,
        **decoding_options("top_p", 1, 1.0, 1.0),
    }
    torch.manual_seed(123)
    first = seeded_generate(lm, 7, **options)
    after = torch.rand(3)
    torch.manual_seed(999)  # a different global state: the same ids
    assert torch.equal(seeded_generate(lm, 7, **options), first)
    assert not torch.equal(seeded_generate(lm, 8, **options), first)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the caller's RNG stream did not move
    assert first.shape[0] == 2 and first.shape[1] <= 12


@torch.no_grad()
def test_prefix_lm_logits_teach_only_the_tokens_after_each_rows_prompt() -> None:
    lm = tiny_lm()
    prefix = torch.randn(2, 2, lm_width(lm))
    rows = [([40, 41, 42, 1], 1), ([50, 1], 0)]  # row 0: one prompt token; row 1: none
    logits, targets = prefix_lm_logits(lm, prefix, rows, pad_token_id=0)
    assert logits.shape == (2, 6, 384)
    x = IGNORE_INDEX
    # position t predicts token t + 1: prefix (2) + row tokens, shifted left by one
    assert targets.tolist() == [[x, x, 41, 42, 1, x], [x, 50, 1, x, x, x]]
    # right padding is inert: row 1 alone gives the same logits on its real positions
    alone = lm(inputs_embeds=torch.cat([prefix[1:], embed_ids(lm, torch.tensor([[50, 1]]))], dim=1)).logits
    torch.testing.assert_close(logits[1:, :4], alone, rtol=1e-5, atol=1e-5)


def test_decode_until_eos_and_first_line() -> None:
    tokenizer = byte_tokenizer()
    ids = tokenizer(" a red circle ", add_special_tokens=False).input_ids
    assert decode_until_eos(tokenizer, [*ids, 1, *ids], 1) == "a red circle"
    assert decode_until_eos(tokenizer, ids, 1) == "a red circle"
    assert first_line("  A blue square.\nShort: next") == "A blue square."


def test_appends_eos_tells_t5_style_tokenizers_apart() -> None:
    assert appends_eos(byte_tokenizer())
    vocab = {"x": 0, "<eos>": 1, "<unk>": 2}
    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), eos_token="<eos>"
    )
    assert not appends_eos(plain)


def test_add_tokens_grows_the_embeddings_and_keeps_the_old_rows() -> None:
    tokenizer, lm = byte_tokenizer(), tiny_lm()
    before = lm.get_input_embeddings().weight.detach().clone()
    ids = add_tokens(lm, tokenizer, ["[IMG0]", "[IMG1]", "[IMG2]"])
    assert ids == [384, 385, 386]
    assert tokenizer("a[IMG1]b", add_special_tokens=False).input_ids == [100, 385, 101]
    weight = lm.get_input_embeddings().weight
    assert weight.shape == (387, 32) and lm.get_output_embeddings().weight.shape == (387, 32)
    assert torch.equal(weight[:384], before)
    assert lm(input_ids=torch.tensor([ids])).logits.shape == (1, 3, 387)
    assert add_tokens(lm, tokenizer, ["[IMG0]"]) == [384]  # adding again: same id, no growth
    assert lm.get_input_embeddings().weight.shape[0] == 387


def test_loading_errors_name_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model\.gill\.lm=.*nothing: no such directory"):
        load_causal_lm(str(tmp_path / "nothing"), key="model.gill.lm")
    with pytest.raises(ConfigError, match=r"model\.dtype=bogus is not a torch dtype"):
        torch_dtype("bogus", key="model.dtype")
    assert torch_dtype(None) == "auto" and torch_dtype("bfloat16") is torch.bfloat16
