"""Frozen parts loaded from a stage-1 checkpoint or a pretrained name stay out of training checkpoints.

They are rebuilt from the sources named in the saved config when sampling, exporting or resuming; an export
folder holds every weight and stands alone; a source that changed since training is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from t2i_train.checkpoint import (
    absolute_stage1_paths,
    build_from_config,
    load_family,
    upgrade_model_config,
    without_stage1_paths,
)
from t2i_train.cli.common import CONF_DIR
from t2i_train.errors import CheckpointError
from t2i_train.export_folder import export
from t2i_train.text.t5 import T5TextEncoder
from t2i_train.training import train


def _overrides(run_dir: Path, small_data_overrides: list[str], steps: int) -> list[str]:
    return [
        *small_data_overrides,
        f"run_dir={run_dir}",
        f"trainer.max_steps={steps}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.limit_val_batches=0",
        "sampling.every_n_steps=0",
        "checkpoint.every_n_steps=100",
        "logger=none",
    ]


def _train(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return train(compose(config_name="train", overrides=overrides))


def _keys(path: Path) -> tuple[set[str], dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return set(ckpt["state_dict"]), ckpt


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory, small_data_overrides: list[str]) -> dict[str, Path]:
    """A 2-step VQGAN checkpoint and a tiny T5 written with save_pretrained (what a real user downloads)."""
    root = tmp_path_factory.mktemp("stage1")
    _train(["model=vqgan", *_overrides(root / "vq", small_data_overrides, 2)])
    t5_dir = root / "t5"
    T5TextEncoder(init_seed=123).model.save_pretrained(t5_dir)
    return {"vq": root / "vq" / "checkpoints" / "last.ckpt", "t5": t5_dir}


def test_stage1_and_pretrained_weights_are_left_out_and_read_back(
    tmp_path: Path, stage1: dict[str, Path], small_data_overrides: list[str]
) -> None:
    vq = tmp_path / "vq.ckpt"
    shutil.copy(stage1["vq"], vq)
    muse = [
        "model=muse",
        f"model.image_tokenizer_checkpoint={vq}",
        f"model.text_encoder.pretrained={stage1['t5']}",
        "model.text_encoder.tokenizer=byt5",
    ]
    run = tmp_path / "muse"
    _train([*muse, *_overrides(run, small_data_overrides, 2)])
    last = run / "checkpoints" / "last.ckpt"
    keys, ckpt = _keys(last)
    assert sorted(ckpt["t2i_external"]) == ["image_tokenizer", "text_encoder"]
    assert not any(k.startswith(("model.image_tokenizer.", "model.text_encoder.")) for k in keys)
    assert any(k.startswith("model.transformer.") for k in keys)

    # sample/export path: the frozen parts come back from their sources, identical to them
    model = load_family(last)
    vq_model = load_family(stage1["vq"])
    for name, tensor in vq_model.state_dict().items():
        assert torch.equal(model.image_tokenizer.state_dict()[name], tensor), name
    t5 = T5TextEncoder(init_seed=123).model.state_dict()
    for name, tensor in model.text_encoder.model.state_dict().items():
        assert torch.equal(tensor, t5[name]), name

    # resume: strict loading still works with the left-out keys
    result = _train([*muse, *_overrides(run, small_data_overrides, 3), "resume=auto"])
    assert result["global_step"] == 3

    # an export holds everything and survives the stage-1 file going away
    out = tmp_path / "export"
    export(str(last), output_dir=str(out))
    vq.unlink()
    with pytest.raises(CheckpointError, match="leaves out its frozen"):
        load_family(last)
    exported = load_family(out)
    for name, tensor in vq_model.state_dict().items():
        assert torch.equal(exported.image_tokenizer.state_dict()[name], tensor), name

    # a stage-1 checkpoint overwritten by another training is refused, not silently swapped in
    other = torch.load(stage1["vq"], map_location="cpu", weights_only=False)
    other["state_dict"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in other["state_dict"].items()}
    torch.save(other, vq)
    with pytest.raises(CheckpointError, match="differs from the one this run was trained with"):
        load_family(last)


def test_checkpoints_without_external_parts_keep_every_weight(
    tmp_path: Path, small_data_overrides: list[str]
) -> None:
    """The tiny default (random frozen T5 and image tokenizer, built from the config) saves them: no source exists."""
    run = tmp_path / "muse"
    _train(["model=muse", *_overrides(run, small_data_overrides, 1)])
    keys, ckpt = _keys(run / "checkpoints" / "last.ckpt")
    assert not ckpt.get("t2i_external")
    assert any(k.startswith("model.image_tokenizer.") for k in keys)
    assert any(k.startswith("model.text_encoder.") for k in keys)


def test_relative_stage1_paths_are_saved_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the paths a family declares (``external_paths``, nested ones included) are rewritten."""
    (tmp_path / "vq.ckpt").write_bytes(b"x")
    (tmp_path / "clip.ckpt").write_bytes(b"x")
    (tmp_path / "notes_checkpoint").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    muse = {"_target_": "t2i_train.models.muse.Muse", "image_tokenizer_checkpoint": "vq.ckpt"}
    config = {
        "model": {**muse, "other_checkpoint": "notes_checkpoint", "x": [1]},
        "data": {"x_checkpoint": "vq.ckpt"},
    }
    fixed = absolute_stage1_paths(config)
    assert fixed["model"]["image_tokenizer_checkpoint"] == str((tmp_path / "vq.ckpt").resolve())
    assert fixed["model"]["other_checkpoint"] == "notes_checkpoint" and fixed["model"]["x"] == [1]
    assert fixed["data"] == {"x_checkpoint": "vq.ckpt"}
    galip = {"_target_": "t2i_train.models.galip.GALIP", "clip": {"checkpoint": "clip.ckpt", "config": None}}
    nested = absolute_stage1_paths({"model": galip})["model"]["clip"]
    assert nested == {"checkpoint": str((tmp_path / "clip.ckpt").resolve()), "config": None}
    assert (
        without_stage1_paths(galip)["clip"]["checkpoint"] is None
        and galip["clip"]["checkpoint"] == "clip.ckpt"
    )


def test_checkpoints_from_before_the_image_tokenizer_rename_still_load(tmp_path: Path) -> None:
    """A Muse checkpoint whose config and state dict say ``tokenizer`` (and ``tokenizer_trained``) reads as today's."""
    config = {
        "_target_": "t2i_train.models.muse.Muse",
        "text_encoder": {"_target_": "t2i_train.text.t5.T5TextEncoder", "d_model": 32, "d_ff": 64, "num_layers": 1,
                         "num_heads": 2, "d_kv": 16},
        "tokenizer": {"_target_": "t2i_train.models.vqgan.VQGAN", "base_channels": 32, "channel_mult": [1, 2],
                      "num_res_blocks": 1, "z_channels": 16, "codebook_size": 16, "codebook_dim": 8},
        "tokenizer_checkpoint": None,
        "image_size": 16, "dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64,
    }  # fmt: skip
    model = build_from_config(upgrade_model_config(config))
    model.image_tokenizer_trained.fill_(True)
    old = {"model." + k.replace("image_tokenizer", "tokenizer", 1): v for k, v in model.state_dict().items()}
    assert any(k.startswith("model.tokenizer.") for k in old) and "model.tokenizer_trained" in old
    torch.save({"t2i_config": {"model": config}, "state_dict": old}, tmp_path / "old.ckpt")
    loaded = load_family(tmp_path / "old.ckpt")
    assert bool(loaded.image_tokenizer_trained)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
