"""The DALL-E 3 recipe's pure parts: caption-blend overrides and the ablation table."""

from __future__ import annotations

from typing import Any

from t2i_train.recipes.dalle3 import caption_overrides, render_table


def _arm(fraction: float, seen_all: float) -> dict[str, Any]:
    scores = {"all": seen_all, "colour": 1.0, "shape": 0.5, "position": 0.25, "n": 8, "clip_score": 30.0}
    return {"synthetic_fraction": fraction, "seen": scores, "heldout": {**scores, "clip_score": 31.5}}


def test_caption_overrides_per_blend() -> None:
    assert caption_overrides(0.0) == ["data.caption_keys=[json.alt_text]", "data.caption_probs=null"]
    assert caption_overrides(1.0) == ["data.caption_keys=[dsc]", "data.caption_probs=null"]
    assert caption_overrides(0.95) == [
        "data.caption_keys=[dsc,json.alt_text]",
        "data.caption_probs=[0.95,0.05]",
    ]


def test_table_has_one_row_per_arm_and_both_captioner_decodings() -> None:
    report = {
        "seconds": 600,
        "vae_psnr_db": 30.1,
        "caption_rerank": 4,
        "recaptioned_accuracy": {"train": {"all": 1.0}, "val": {"all": 0.998}},
        "captioner": {"heldout": {"all": 0.875}, "heldout_rerank": {"all": 0.9375}},
        "arms": {"synthetic_00": _arm(0.0, 0.125), "synthetic_95": _arm(0.95, 0.5)},
    }
    table = render_table(report)
    assert "| alt-text only | 12.5% (100.0% / 50.0% / 25.0%) | 12.5% | 30.00 / 31.50 |" in table
    assert "| 95% synthetic DSC | 50.0%" in table
    assert "recaptioned train shards 100.0%; recaptioned val shards 99.8%" in table
    assert "87.5% greedy" in table and "93.8% with beam 4 + CLIP reranking of the 4 beams" in table
    report["captioner"] = {"heldout": {"all": 0.875}, "heldout_rerank": None}
    assert "reranking" not in render_table(report) and "10.0 min in all" in render_table(report)
