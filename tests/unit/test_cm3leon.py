"""CM3leon (t2i_train.models.cm3leon, t2i_train.losses.cm3): token space, CM3 span rules, decoding rules."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from t2i_train.errors import ConfigError
from t2i_train.losses.cm3 import CM3Loss
from t2i_train.models.cm3leon import (
    CM3Leon,
    TokenSpace,
    apply_top_k_top_p,
    cm3_document,
    cm3_restore,
    pick_tokens,
    sample_span_count,
    sample_spans,
)
from tests.helpers import compose_train

SPACE = TokenSpace(text=10, image=6, sentinels=4)
CAPTIONS = [
    "a red circle in the top left",
    "blue square, center",
    "a green triangle in the bottom right",
    "x",
]


@pytest.fixture(scope="module")
def cm3leon() -> CM3Leon:
    return instantiate(compose_train(["model=cm3leon"]).model, _convert_="all")


def batch(count: int = 4) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "image_tokens": torch.randint(0, 256, (count, 64), generator=generator),
        "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(count)],
    }


def test_token_space_lays_out_text_image_specials_then_sentinels() -> None:
    assert SPACE.image_start == 10 and SPACE.break_id == 16 and SPACE.pad_id == 20
    assert SPACE.sentinel(0) == 21 and SPACE.size == 25
    ids = torch.arange(SPACE.size)
    assert SPACE.is_image(ids).nonzero().flatten().tolist() == list(range(10, 16))
    assert SPACE.is_sentinel(ids).nonzero().flatten().tolist() == list(range(21, 25))
    with pytest.raises(ValueError, match="out of range"):
        SPACE.sentinel(4)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_spans_never_overlap_and_never_cross_a_segment_boundary(count: int) -> None:
    segments = [(0, 7), (8, 20)]  # text, <break> at 7, image
    generator = torch.Generator().manual_seed(count)
    for _ in range(300):
        spans = sample_spans(segments, count, generator)
        assert 1 <= len(spans) <= count and spans == sorted(spans)
        for start, end in spans:
            assert end > start and any(s <= start and end <= e for s, e in segments)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start


def test_span_count_is_poisson_and_clamped() -> None:
    generator = torch.Generator().manual_seed(0)
    draws = [sample_span_count(1.0, 100, generator) for _ in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(1.0, abs=0.06)
    assert sum(d == 0 for d in draws) / len(draws) == pytest.approx(math.exp(-1), abs=0.03)
    assert max(sample_span_count(1.0, 2, generator) for _ in range(500)) == 2
    assert sample_span_count(0.0, 3) == 0


def test_spans_move_to_the_end_behind_their_sentinels() -> None:
    body = [1, 2, 3, 16, 11, 12, 13, 14]
    doc = cm3_document(body, [(1, 3), (5, 7)], SPACE)
    s0, s1 = SPACE.sentinel(0), SPACE.sentinel(1)
    assert doc == [1, s0, 16, 11, s1, 14, s0, 2, 3, SPACE.eoss_id, s1, 12, 13, SPACE.eoss_id, SPACE.eod_id]
    assert cm3_document(body, [], SPACE) == [*body, SPACE.eod_id]


def test_the_original_document_is_restored_from_every_masked_one() -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        text = torch.randint(
            0, 10, (int(torch.randint(1, 8, (1,), generator=generator)),), generator=generator
        )
        image = torch.randint(10, 16, (9,), generator=generator)
        body = [*text.tolist(), SPACE.break_id, *image.tolist()]
        segments = [(0, len(text)), (len(text) + 1, len(body))]
        spans = sample_spans(segments, sample_span_count(1.5, 4, generator), generator)
        assert cm3_restore(cm3_document(body, spans, SPACE), SPACE) == body


def test_sentinel_and_padding_targets_weigh_nothing(cm3leon: CM3Leon) -> None:
    torch.manual_seed(0)
    out = cm3leon(batch(16))
    space = cm3leon.space
    targets, weights = out["targets"], out["weights"]
    sentinel, pad = space.is_sentinel(targets), targets == space.pad_id
    assert bool(sentinel.any()) and bool(pad.any())  # both occur in 16 documents at λ = 1
    assert bool((weights[sentinel | pad] == 0).all()) and bool((weights[~(sentinel | pad)] == 1).all())
    terms = CM3Loss()(out)
    ce = torch.nn.functional.cross_entropy(out["logits"][weights > 0], targets[weights > 0])
    assert terms["loss"].item() == pytest.approx(ce.item(), rel=1e-5)


def test_documents_come_in_both_orders_and_dropped_text_becomes_mask(cm3leon: CM3Leon) -> None:
    model = copy.deepcopy(cm3leon)
    model.span_rate = 0.0
    text, image = (
        model.text_ids("a red circle"),
        list(range(model.space.image_start, model.space.image_start + 64)),
    )
    model.text_first_prob, model.cond_drop_prob = 1.0, 0.0
    assert model.training_sequence(text, image)[0] == [
        *text,
        model.space.break_id,
        *image,
        model.space.eod_id,
    ]
    model.text_first_prob = 0.0
    assert model.training_sequence(text, image)[0] == [
        *image,
        model.space.break_id,
        *text,
        model.space.eod_id,
    ]
    model.text_first_prob, model.cond_drop_prob = 1.0, 1.0
    assert model.training_sequence(text, image)[0][:2] == [model.space.mask_id, model.space.break_id]


def test_every_image_code_keeps_its_raster_index_when_spans_move_it(cm3leon: CM3Leon) -> None:
    model = copy.deepcopy(cm3leon)
    model.span_rate, model.max_spans = 3.0, 3
    start = model.space.image_start
    image = list(range(start, start + 64))  # code i is raster position i: the index must say so
    torch.manual_seed(0)
    moved = 0
    for _ in range(50):
        tokens, grid, _ = model.training_sequence(model.text_ids("a red circle"), image)
        for token, index in zip(tokens, grid, strict=True):
            assert index == (token - start if model.space.is_image(torch.tensor(token)) else -1)
        moved += sum(model.space.is_sentinel(torch.tensor(tokens)).tolist()) > 0
    assert moved > 30  # most of the 50 documents had spans moved behind sentinels


def test_cfg_is_uncond_plus_scale_times_the_difference() -> None:
    cond = torch.tensor([[2.0, 1.0, 0.0]])
    uncond = torch.tensor([[3.0, 0.0, 0.0]])
    # log-softmax differences: cond favours token 0 less than uncond does, so s = 3 turns to token 1
    c, u = cond.log_softmax(-1), uncond.log_softmax(-1)
    assert (u + 3.0 * (c - u)).argmax().item() == 1
    assert pick_tokens(cond, uncond, "sample", guidance_scale=3.0, temperature=0).item() == 1
    assert pick_tokens(cond, uncond, "sample", guidance_scale=1.0, temperature=0).item() == 0
    assert pick_tokens(cond, None, "sample", temperature=0).item() == 0


def test_cd_k_scores_log_ratio_inside_its_head() -> None:
    cond = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    uncond = torch.tensor([[0.6, 0.1, 0.1, 0.2]]).log()
    # head = p_c >= alpha * (k-th largest p_c); score log p_c - log p_u = [-0.18, 1.10, 0.41, -1.39]
    assert pick_tokens(cond, uncond, "cd", cd_alpha=1.0, cd_k=1, temperature=0).item() == 0  # head {0}
    assert pick_tokens(cond, uncond, "cd", cd_alpha=0.6, cd_k=2, temperature=0).item() == 1  # head {0, 1}
    # head {0}: the nucleus of the CFG distribution (s = 1: p_c) at top_p 0.6 adds token 1
    assert pick_tokens(cond, uncond, "topp_cd", 1.0, 0, None, 0.6, cd_alpha=1.0, cd_k=1).item() == 1


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(apply_top_k_top_p(logits, None, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(apply_top_k_top_p(logits, 1, None)).sum().item() == 1


def test_cached_decoding_gives_the_uncached_tokens_and_padding_changes_nothing(cm3leon: CM3Leon) -> None:
    prompts = ["a red circle in the top left", "blue"]
    for decoder in ("sample", "cd"):
        cached = cm3leon.generate_tokens(prompts, decoder=decoder, seed=3, temperature=0)
        uncached = cm3leon.generate_tokens(prompts, decoder=decoder, seed=3, temperature=0, use_cache=False)
        assert torch.equal(cached, uncached)
    alone = cm3leon.generate_tokens(prompts[1:], seed=3, temperature=0)
    assert torch.equal(alone[0], cm3leon.generate_tokens(prompts, seed=3, temperature=0)[1])
    assert int(cached.min()) >= 0 and int(cached.max()) < cm3leon.space.image  # image codes only


def test_captions_decode_text_tokens_only(cm3leon: CM3Leon) -> None:
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    captions = cm3leon.caption(images, max_new_tokens=6)
    assert len(captions) == 2 and all(isinstance(c, str) and len(c.encode()) <= 6 for c in captions)


def test_a_vqgan_with_another_codebook_is_one_line() -> None:
    cfg = compose_train(["model=cm3leon", "model.image_tokenizer.codebook_size=128"])
    with pytest.raises(
        InstantiationException, match=r"codebook has 128 codes but model\.image_vocab_size=256"
    ):
        instantiate(cfg.model, _convert_="all")


def test_a_sequence_too_short_for_one_image_is_one_line() -> None:
    cfg = compose_train(["model=cm3leon", "model.max_length=60"])
    with pytest.raises(
        InstantiationException, match="max_length=60 is too short for one image: 64 image tokens"
    ):
        instantiate(cfg.model, _convert_="all")


def test_a_tokenizer_larger_than_the_text_space_is_one_line() -> None:
    model = instantiate(compose_train(["model=cm3leon", "model.text_vocab_size=100"]).model, _convert_="all")
    with pytest.raises(ConfigError, match=r"384 ids but model\.text_vocab_size=100"):
        model.text_ids("a red circle")


@pytest.mark.parametrize(("size", "expected"), [("350m", 0.37e9), ("760m", 0.79e9), ("7b", 6.72e9)])
def test_paper_sizes_count_offline_without_allocating(
    size: str, expected: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """experiment=cm3leon_<size>: the decoder (embedding tied to the head) as the spec's analytic count,
    built on the meta device with no tokenizer or weights downloaded."""
    from t2i_train.model_summary import build_on_meta, summarize

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = summarize(build_on_meta(compose_train([f"experiment=cm3leon_{size}"])))
    assert report["trainable"] == pytest.approx(expected, rel=0.02)
    assert report["components"]["image_tokenizer"]["trainable"] == 0
