"""CLIP stage 1 -> GALIP through it -> sample (with CLIP score), interpolation strips, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_TRAIN, assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("galip_cli")
    data = ["data.synthetic.count=256", "data.synthetic.val_count=32", f"data.cache_dir={root / 'cache'}"]
    clip = root / "clip"
    proc = run_cli(
        "t2i_train",
        "experiment=shapes_clip",
        "trainer.max_steps=2",
        f"hydra.run.dir={clip}",
        *data,
        *TINY_TRAIN,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    clip_ckpt = clip / "checkpoints" / "last.ckpt"
    galip = root / "galip"
    proc = run_cli(
        "t2i_train",
        "experiment=shapes_galip",
        f"model.clip.checkpoint={clip_ckpt}",
        "trainer.max_steps=2",
        f"hydra.run.dir={galip}",
        *data,
        *TINY_TRAIN,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"clip": clip_ckpt, "galip": galip / "checkpoints" / "last.ckpt", "root": root}


def test_galip_checkpoint_leaves_its_stage1_clip_out(runs: dict[str, Path]) -> None:
    ckpt = torch.load(runs["galip"], map_location="cpu", weights_only=False)
    assert ckpt["t2i_external"] == ["clip"]
    assert not any(k.startswith("model.clip.") for k in ckpt["state_dict"])
    assert any(k.startswith("model.generator.") for k in ckpt["state_dict"])
    assert len(ckpt["optimizer_states"]) == 2  # G and NetD+NetC


def test_sample_adds_clip_scores(runs: dict[str, Path], tmp_path: Path) -> None:
    prompts = "[a red circle in the top left,a blue square in the center]"
    for name, extra in (("own", []), ("scorer", [f"clip_scorer={runs['clip']}"])):
        out = tmp_path / name
        proc = run_cli(
            "t2i_train.sample",
            f"checkpoint={runs['galip']}",
            f"prompts={prompts}",
            f"output_dir={out}",
            "images_per_prompt=2",
            "clip_score=true",
            *extra,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert len(lines) == 4 and all(0.0 <= line["clip_score"] <= 100.0 for line in lines)
        assert "mean CLIP score" in proc.stdout
    # the GALIP's own frozen CLIP is the stage-1 CLIP, so both scorers agree
    own = [
        json.loads(x)["clip_score"] for x in (tmp_path / "own" / "manifest.jsonl").read_text().splitlines()
    ]
    other = [
        json.loads(x)["clip_score"] for x in (tmp_path / "scorer" / "manifest.jsonl").read_text().splitlines()
    ]
    assert own == pytest.approx(other, abs=1e-3)


def test_interpolation_strips(runs: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    for mode, expected in (("z", 2), ("text", 1)):
        out = tmp_path / mode
        proc = run_cli(
            "t2i_train.sample",
            f"checkpoint={runs['galip']}",
            "prompts=[a red circle in the top left,a blue square in the center]",
            f"output_dir={out}",
            f"interpolate={mode}",
            "steps=5",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert len(lines) == expected and all(line["steps"] == 5 for line in lines)
        width, height = Image.open(out / lines[0]["file"]).size
        assert width > 4 * height  # one row of 5 images


def test_sample_refuses_stage1_checkpoints_and_missing_scorer(runs: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli("t2i_train.sample", f"checkpoint={runs['clip']}", "prompts=[a]", f"output_dir={tmp_path}")
    assert_one_line_error(proc, "model=clip", "does not generate images")
    proc = run_cli(
        "t2i_train.sample",
        f"checkpoint={runs['galip']}",
        "prompts=[a]",
        f"output_dir={tmp_path}",
        "interpolate=q",
    )
    assert_one_line_error(proc, "interpolate must be z or text")
