"""A crafted checkpoint runs no code, through every command and reader that opens a checkpoint.

The payload is a real pickle whose ``__reduce__`` calls ``os.system`` to create a marker file; every case checks
the marker is absent afterwards and the command printed one ``error:`` line naming the opt-in. The opt-in
itself (``trust_checkpoint=true``) is checked to run it, so the marker check can fail.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2i_train.checkpoint import read_checkpoint
from t2i_train.checkpoint_io import TORCH_FORCE_ENV, TRUST_ENV, apply_trust_argument, checkpoint_problem
from t2i_train.data.shards import write_synthetic_shards
from t2i_train.errors import CheckpointError
from tests.helpers import TINY_TRAIN, assert_one_line_error, run_cli

REFUSAL = "refusing to load"
OPT_IN = "trust_checkpoint=true"


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real muse checkpoint from a 2-step run (the malicious files are built from it)."""
    root = tmp_path_factory.mktemp("secure")
    run_dir = root / "run"
    proc = run_cli(
        "t2i_train", "model=muse", *TINY_TRAIN, "trainer.max_steps=2", "model.dim=32", "model.depth=1",
        "model.mlp_dim=64", "data.synthetic.count=256", "data.synthetic.val_count=16",
        f"data.cache_dir={root / 'cache'}", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture()
def evil(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(a copy of the real checkpoint with the payload inside, the marker it would create)."""
    marker = tmp_path / "PWNED"
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    ckpt["t2i_config"]["note"] = Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    return path, marker


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("secure_shards")
    write_synthetic_shards(out, count=16, samples_per_shard=16, seed=2, progress=False)
    return out


def commands(path: Path, tmp: Path, shards: Path) -> dict[str, list[str]]:
    return {
        "sample": ["t2i_train.sample", f"checkpoint={path}", "prompts=[a red circle]", f"output_dir={tmp}/s"],
        "export": ["t2i_train.export", f"checkpoint={path}", f"output_dir={tmp}/e"],
        "encode": ["t2i_train.encode", f"checkpoint={path}", f"input_urls={shards}", f"output_dir={tmp}/enc"],
        "recaption": ["t2i_train.recaption", f"checkpoint={path}", f"input_urls={shards}", f"output_dir={tmp}/r"],
        "evaluate": ["t2i_train.evaluate", "reconstruction", f"checkpoint={path}", f"urls={shards}"],
        "caption_accuracy": ["t2i_train.metrics.caption_accuracy", f"checkpoint={path}"],
        "resume": ["t2i_train", *TINY_TRAIN, f"resume={path}", f"hydra.run.dir={tmp}/run", "trainer.max_steps=3"],
        "stage1": [
            "t2i_train", *TINY_TRAIN, f"model.image_tokenizer_checkpoint={path}", f"hydra.run.dir={tmp}/run1",
            "trainer.max_steps=1",
        ],
    }  # fmt: skip


@pytest.mark.parametrize(
    "command", ["sample", "export", "encode", "recaption", "evaluate", "caption_accuracy", "resume", "stage1"]
)
def test_every_command_refuses_the_payload(
    command: str, evil: tuple[Path, Path], tmp_path: Path, shards: Path
) -> None:
    path, marker = evil
    proc = run_cli(*commands(path, tmp_path, shards)[command])
    assert not marker.exists(), f"{command} ran the code inside the checkpoint"
    assert_one_line_error(proc, REFUSAL, OPT_IN, "posix.system")


def test_trusting_the_file_is_an_explicit_opt_in(
    evil: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, marker = evil
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.delenv(TORCH_FORCE_ENV, raising=False)
    assert apply_trust_argument(["model=muse", OPT_IN]) == ["model=muse"]  # what every CLI's main() does
    read_checkpoint(path)
    assert marker.exists(), (
        "trust_checkpoint=true should load the file as torch.load(weights_only=False) does"
    )
    monkeypatch.setenv(TRUST_ENV, "0")
    apply_trust_argument([])
    assert os.environ[TORCH_FORCE_ENV] == "1"  # untrusted: every torch.load in the process is weights-only


def test_readers_refuse_in_process(evil: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path, marker = evil
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(CheckpointError, match=REFUSAL):
        read_checkpoint(path)
    problem = checkpoint_problem(path)
    assert problem is not None and problem.startswith(REFUSAL)
    assert not marker.exists()


def test_distributed_checkpoint_metadata_is_checked_before_torch_unpickles_it(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.distributed.checkpoint reads ``.metadata`` with plain pickle; a crafted one must not get there."""
    import torch.distributed.checkpoint as dcp

    monkeypatch.delenv(TRUST_ENV, raising=False)
    marker = tmp_path / "PWNED"
    folder = tmp_path / "sharded.ckpt"
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    dcp.save({"state_dict": ckpt["state_dict"]}, checkpoint_id=str(folder), no_dist=True)
    torch.save({k: v for k, v in ckpt.items() if k != "state_dict"}, folder / "meta.pt")
    assert (
        read_checkpoint(folder)["state_dict"].keys() == ckpt["state_dict"].keys()
    )  # the honest folder reads

    metadata = folder / ".metadata"
    honest = metadata.read_bytes()
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=REFUSAL):
        read_checkpoint(folder)
    assert not marker.exists()

    metadata.write_bytes(honest)  # and a crafted meta.pt beside honest shards
    torch.save({"t2i_config": Payload(marker)}, folder / "meta.pt")
    with pytest.raises(CheckpointError, match=REFUSAL):
        read_checkpoint(folder)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_line(trained: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.ckpt"
    shutil.copy(trained, broken)
    with open(broken, "r+b") as f:
        f.truncate(broken.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as info:
        read_checkpoint(broken)
    assert str(broken) in str(info.value) and "\n" not in str(info.value)
    assert checkpoint_problem(broken) == "it is not a complete torch checkpoint (truncated or foreign file)"


def test_no_pickle_is_needed_for_the_projects_own_checkpoints(trained: Path) -> None:
    """Training checkpoints load weights-only as they are (no safe-globals registration needed)."""
    env = {k: v for k, v in os.environ.items() if k != TRUST_ENV}
    code = f"import torch; torch.load({str(trained)!r}, weights_only=True)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
