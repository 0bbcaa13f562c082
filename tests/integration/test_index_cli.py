"""`python -m t2i_train.index` end to end in a subprocess: a model=clip checkpoint indexes small shards (the
files, the summary line), and a bad argument is one `error:` line (exit 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from t2i_train.data.shards import write_synthetic_shards
from tests.helpers import assert_one_line_error, run_cli, save_random_clip


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model=clip checkpoint as training writes it (config and random weights), saved directly."""
    return save_random_clip(tmp_path_factory.mktemp("clip") / "last.ckpt")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bank") / "shapes"
    write_synthetic_shards(out, count=12, size=32, seed=1, samples_per_shard=4, progress=False)
    return out


def test_index_cli_builds_the_index_and_prints_the_summary(
    clip_ckpt: Path, shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    proc = run_cli(
        "t2i_train.index", f"checkpoint={clip_ckpt}", f"urls={shards}", f"output={out}", "batch_size=5"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"index.faiss", "keys.jsonl", "index.json"} <= {p.name for p in out.iterdir()}
    assert len(list((out / "parts").glob("*.npy"))) == 3
    assert len((out / "keys.jsonl").read_text().splitlines()) == 12
    assert json.loads((out / "index.json").read_text())["count"] == 12
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"indexed 12 images \(D=64, factory=Flat\) into {out} in [\d.]+s; 12 images embedded at [\d.]+ images/s",
        summary,
    ), summary


def test_index_cli_bad_argument_is_one_line(clip_ckpt: Path, shards: Path, tmp_path: Path) -> None:
    base = [f"checkpoint={clip_ckpt}", f"urls={shards}", f"output={tmp_path / 'o'}"]
    assert_one_line_error(run_cli("t2i_train.index", *base, "colour=red"), "unknown argument 'colour'")
