"""The model layer never imports Hydra, and the one stage-1 helper loads, freezes and warns."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import t2i_train
from t2i_train.errors import ConfigError
from t2i_train.models.base import Family
from t2i_train.models.loading import no_weight_loading
from t2i_train.models.stage1 import attach_stage1, warn_random_stage1
from t2i_train.models.vqgan import VQGAN

MODEL_LAYER = ("models", "nn", "losses")


def _model_layer_modules() -> list[str]:
    root = Path(t2i_train.__file__).parent
    names = []
    for package in MODEL_LAYER:
        names.append(f"t2i_train.{package}")
        for info in pkgutil.walk_packages([str(root / package)], prefix=f"t2i_train.{package}."):
            names.append(info.name)
    return sorted(names)


def _tiny_vqgan() -> VQGAN:
    return VQGAN(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=16, codebook_size=16,
                 codebook_dim=8, mid_block=False)  # fmt: skip


_TINY_VQGAN_CONFIG = {
    "_target_": "t2i_train.models.vqgan.VQGAN",
    "base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 16, "codebook_size": 16,
    "codebook_dim": 8, "mid_block": False,
}  # fmt: skip


class Holder(Family):
    """The smallest family with a stage-1 part."""

    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        self.part = part


@pytest.fixture()
def saved_vqgan(tmp_path: Path) -> tuple[Path, VQGAN]:
    """A tiny VQGAN saved as a training checkpoint (config + state dict), as the trainer writes one."""
    torch.manual_seed(1)
    trained = _tiny_vqgan()
    state = {f"model.{k}": v for k, v in trained.state_dict().items()}
    path = tmp_path / "vq.ckpt"
    torch.save({"t2i_config": {"model": _TINY_VQGAN_CONFIG}, "state_dict": state}, path)
    return path, trained


def test_the_model_layer_and_stage1_loading_never_import_hydra(saved_vqgan: tuple[Path, VQGAN]) -> None:
    """Every module under models/, nn/ and losses/ imported in a fresh interpreter, then a stage-1 checkpoint
    attached (the checkpoint reader rebuilds its family): hydra is not in sys.modules."""
    modules = _model_layer_modules()
    assert "t2i_train.models.stage1" in modules and "t2i_train.models.galip" in modules
    path, _ = saved_vqgan
    code = "\n".join(
        [
            "import importlib, sys",
            f"for name in {modules!r}:",
            "    importlib.import_module(name)",
            "assert not [m for m in sys.modules if m.split('.')[0] == 'hydra'], 'import'",
            "from t2i_train.models.stage1 import attach_stage1",
            "from t2i_train.checkpoint import build_from_config",
            "from tests.unit.test_stage1 import Holder, _TINY_VQGAN_CONFIG",
            "model = Holder(build_from_config(_TINY_VQGAN_CONFIG))",
            f"assert attach_stage1(model, 'part', {str(path)!r}, option='part_checkpoint', kind='VQGAN')",
            "hydra = sorted(m for m in sys.modules if m.split('.')[0] == 'hydra')",
            "assert not hydra, hydra[:5]",
        ]
    )
    root = Path(t2i_train.__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


def test_attach_loads_and_freezes_a_saved_checkpoint(saved_vqgan: tuple[Path, VQGAN]) -> None:
    path, trained = saved_vqgan
    torch.manual_seed(2)
    model = Holder(_tiny_vqgan())
    assert attach_stage1(model, "part", str(path), option="part_checkpoint", kind="VQGAN")
    for name, tensor in trained.state_dict().items():
        assert torch.equal(model.part.state_dict()[name], tensor), name
    assert set(model.external_modules()) == {"part"} and set(model.frozen_modules()) == {"part"}
    assert not model.part.training and not any(p.requires_grad for p in model.part.parameters())
    assert list(model.trainable_parameters()) == []

    with no_weight_loading():  # rebuilding from a checkpoint that holds every weight: the file is not read
        skipped = Holder(_tiny_vqgan())
        assert not attach_stage1(skipped, "part", str(path), option="part_checkpoint", kind="VQGAN")
    assert set(skipped.frozen_modules()) == {"part"} and skipped.external_modules() == {}
    assert not torch.equal(skipped.part.quantizer.codebook, trained.quantizer.codebook)

    random = Holder(_tiny_vqgan())
    assert not attach_stage1(random, "part", None, option="part_checkpoint", kind="VQGAN", from_source=True)
    assert set(random.external_modules()) == {"part"}  # a pretrained name: external without a checkpoint


def test_attach_names_the_option_when_the_checkpoint_does_not_fit(saved_vqgan: tuple[Path, VQGAN]) -> None:
    path, _ = saved_vqgan
    other = VQGAN(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=16, codebook_size=32,
                  codebook_dim=8, mid_block=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"part_checkpoint .*vq\.ckpt does not fit model\.part .*VQGAN"):
        attach_stage1(Holder(other), "part", str(path), option="part_checkpoint", kind="VQGAN")
    with pytest.raises(ConfigError, match=r"lacks \d+ weights of model\.part"):
        attach_stage1(Holder(nn.Sequential(_tiny_vqgan(), nn.Linear(2, 2))), "part", str(path),
                      option="part_checkpoint", kind="VQGAN")  # fmt: skip


def test_random_stage1_warns_once_per_instance_and_part_in_training() -> None:
    model = Holder(nn.Linear(2, 2)).train()
    with pytest.warns(UserWarning, match="RANDOM PART"):
        warn_random_stage1(model, "part", "RANDOM PART")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_random_stage1(model, "part", "RANDOM PART")  # once
        warn_random_stage1(Holder(nn.Linear(2, 2)).eval(), "part", "RANDOM PART")  # not in eval
    with pytest.warns(UserWarning, match="OTHER"):
        warn_random_stage1(model, "other", "OTHER")  # per part
