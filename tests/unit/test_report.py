"""The closing summary of the shapes recipes: the right stages, numbers and targets per recipe."""

from __future__ import annotations

import json
from pathlib import Path

from t2i_train.recipes import get


def _write_eval(out: Path, split: str, all_three: float) -> None:
    folder = out / f"samples_{split}"
    folder.mkdir(parents=True)
    scores = {"all": all_three, "colour": 1.0, "shape": all_three, "position": 1.0, "n": 192}
    (folder / "eval.json").write_text(json.dumps(scores))


def test_muse_report_checks_psnr_and_the_90_percent_target(tmp_path: Path) -> None:
    (tmp_path / "vqgan").mkdir()
    (tmp_path / "vqgan" / "psnr.json").write_text(
        json.dumps({"psnr_db": 29.4, "codebook_used": 256, "codebook_size": 256})
    )
    _write_eval(tmp_path, "seen", 0.88)
    _write_eval(tmp_path, "heldout", 0.7)
    muse = get("muse")
    assert muse.from_files is not None
    report = muse.from_files(tmp_path, 600)
    text = muse.render(tmp_path, report)
    assert report["vqgan_psnr_db"] == 29.4 and report["seen"]["all"] == 0.88
    assert "muse recipe: done in 10.0 min" in text and "VQGAN held-out PSNR: 29.4 dB" in text
    assert "seen prompts (192 images): 88.0% all three" in text and "(target 0.9 not met)" in text
    assert f"{tmp_path}/muse/checkpoints/last.ckpt" in text and "pre-encoded tokens" in text


def test_galip_report_has_no_vqgan_and_an_85_percent_target(tmp_path: Path) -> None:
    _write_eval(tmp_path, "seen", 0.88)
    _write_eval(tmp_path, "heldout", 0.5)
    galip = get("galip")
    assert galip.from_files is not None
    report = galip.from_files(tmp_path, None)
    text = galip.render(tmp_path, report)
    assert "vqgan_psnr_db" not in report and "VQGAN" not in text
    assert "galip prompt following, seen prompts (192 images): 88.0% all three" in text
    seen, heldout = (line for line in text.splitlines() if "prompt following" in line)
    assert seen.endswith("(target met)") and heldout.endswith("(target 0.6 not met)")
    assert f"{tmp_path}/clip/checkpoints/last.ckpt, {tmp_path}/galip/checkpoints/last.ckpt" in text
