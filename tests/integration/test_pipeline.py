"""`python -m t2i_train.pipeline` (what `make train` runs), shrunk to a few steps: every stage, then a re-run
that resumes instead of retraining."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.conftest import run_cli

FAST = ["trainer.max_steps=2", "data.batch_size=8", "data.num_workers=0", "trainer.enable_progress_bar=false"]


def test_pipeline_runs_every_stage_and_resumes(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    args = ["t2i_train.pipeline", f"--data={data}", f"--out={out}", "--count=256", "--images-per-prompt=1"]
    stages = ["--vqgan", *FAST, "--muse", *FAST, "sampling.kwargs.steps=2"]
    proc = run_cli(*args, *stages)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["vqgan_psnr_db"] > 0 and report["seen"]["n"] == 48 and report["heldout"]["n"] > 0
    assert (out / "tokens" / "encoded.json").is_file() and (out / "tokens" / "val" / "encoded.json").is_file()
    assert (out / "samples_seen" / "grid.png").is_file()
    assert "muse recipe: done" in proc.stdout
    muse_ckpt = out / "muse" / "checkpoints" / "last.ckpt"
    assert torch.load(muse_ckpt, map_location="cpu", weights_only=False)["global_step"] == 2

    # a second run with more Muse steps continues from the checkpoints instead of starting over
    more = ["--vqgan", *FAST, "--muse", *FAST[1:], "trainer.max_steps=3", "sampling.kwargs.steps=2"]
    proc = run_cli(*args, *more)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(muse_ckpt, map_location="cpu", weights_only=False)["global_step"] == 3
    vq = torch.load(out / "vqgan" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert vq["global_step"] == 2


def test_dalle3_recipe_runs_every_stage(tmp_path: Path) -> None:
    """CLIP -> captioner -> recaptioned shards -> VAE -> latents -> one diffusion model per blend -> table."""
    data, out = tmp_path / "data", tmp_path / "out"
    args = ["t2i_train.pipeline", "--recipe=dalle3", f"--data={data}", f"--out={out}", "--count=256"]
    args += ["--images-per-prompt=1", "--blends=0,0.95", "--caption-rerank=0"]
    stages = [
        "--clip",
        *FAST,
        "--captioner",
        *FAST,
        "--vae",
        *FAST,
        "--diffusion",
        *FAST,
        "sampling.kwargs.steps=2",
    ]
    proc = run_cli(*args, *stages)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["arms"]) == {"synthetic_00", "synthetic_95"}
    blended = report["arms"]["synthetic_95"]
    assert "dsc" in blended["caption_counts"] and set(blended["caption_counts"]) <= {"dsc", "json.alt_text"}
    assert blended["seen"]["n"] == 48 and blended["heldout"]["clip_score"] >= 0
    assert report["arms"]["synthetic_00"]["caption_counts"] == {"json.alt_text": 16}  # 2 steps x 8
    train_audit = report["recaptioned_accuracy"]["train"]
    assert train_audit["count"] + train_audit["missing"] == 256
    recaptioned = out / "recaptioned" / "train"
    assert any(recaptioned.glob("*.tar")) and (recaptioned / "recaptioned.json").is_file()
    assert "| alt-text only |" in (out / "ablation.md").read_text() and "| 95% synthetic DSC |" in proc.stdout


def test_diffusion_recipe_samples_from_descriptive_prompts(tmp_path: Path) -> None:
    """VAE -> latents -> diffusion on the descriptive captions; samples drawn from upsampled prompts."""
    data, out = tmp_path / "data", tmp_path / "out"
    args = ["t2i_train.pipeline", "--recipe=diffusion", f"--data={data}", f"--out={out}", "--count=256"]
    stages = ["--images-per-prompt=1", "--vae", *FAST, "--diffusion", *FAST, "sampling.kwargs.steps=2"]
    proc = run_cli(*args, *stages)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == "diffusion" and report["vae_psnr_db"] > 0 and report["seen"]["n"] == 48
    line = json.loads((out / "samples_seen" / "manifest.jsonl").read_text().splitlines()[0])
    assert len(line["upsampled_prompt"]) > 100 and "diffusion recipe: done" in proc.stdout


def test_cm3leon_recipe_runs_both_arms_and_the_decoding_table(tmp_path: Path) -> None:
    """VQGAN -> tokens -> CM3leon -> samples, captions, decoders -> CLIP -> neighbours -> the RA arm -> its
    samples with each prompt's neighbours prepended; every number in report.json."""
    data, out = tmp_path / "data", tmp_path / "out"
    args = ["t2i_train.pipeline", "--recipe=cm3leon", f"--data={data}", f"--out={out}", "--count=256"]
    stages = ["--images-per-prompt=1", "--vqgan", *FAST, "--cm3leon", *FAST, "--clip", *FAST]
    proc = run_cli(*args, *stages, "--cm3leon_ra", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == "cm3leon" and report["plain_seen"]["n"] == 48 and report["ra_seen"]["n"] == 48
    assert set(report["decoding"]) == {"no_cfg", "cfg3", "cd_k", "topp_cd"}
    assert report["captions"]["heldout"]["count"] > 0
    ra = torch.load(out / "cm3leon_ra" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ra["t2i_config"]["model"]["retrieved_docs"] == 2
    assert (out / "tokens_ra" / "neighbours.json").is_file() and (
        out / "tokens_ra" / "val" / "neighbours.json"
    ).is_file()
    assert "CM3leon + 2 retrieved, text -> image, seen" in proc.stdout
