"""Every shipped config composes; every tiny model/experiment trains two steps on CPU."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from t2i_train.checkpoint import resolve_target
from t2i_train.cli.common import CONF_DIR
from t2i_train.models.loading import no_weight_loading
from t2i_train.training import train

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# Paper-size presets are composed and built on the meta device, never trained here.
PAPER_SIZE = {"muse_3b", "galip_coco", "gill_opt6_7b", "cm3leon_350m", "cm3leon_760m", "cm3leon_7b"}


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_there_are_configs_to_test() -> None:
    assert {"muse", "vqgan"} <= set(MODELS)
    assert {"shapes_vqgan", "shapes_muse", "muse_3b"} <= set(EXPERIMENTS)


@pytest.mark.parametrize(
    "group", ["optimizer", "scheduler", "strategy", "trainer", "logger", "callbacks", "data"]
)
def test_every_group_option_composes(group: str) -> None:
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        cfg = compose_train([f"{group}={option}"])
        assert cfg is not None


@pytest.mark.parametrize("name", MODELS)
def test_model_config_composes_and_builds_on_meta(name: str) -> None:
    cfg = compose_train([f"model={name}"])
    assert "_target_" in cfg.model and "_target_" in cfg.loss
    with no_weight_loading(), torch.device("meta"):
        model = instantiate(cfg.model, _convert_="all")
    model.check_loss(instantiate(cfg.loss))  # the family's default loss is one it accepts


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds_on_meta(name: str) -> None:
    cfg = compose_train([f"experiment={name}"])
    with no_weight_loading(), torch.device("meta"):
        model = instantiate(cfg.model, _convert_="all")
    assert sum(p.numel() for p in model.parameters()) > 0


def _two_step_overrides(tmp_path: Path, small_data_overrides: list[str]) -> list[str]:
    return [
        *small_data_overrides,
        f"run_dir={tmp_path}",
        "trainer.max_steps=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "sampling.every_n_steps=2",
        "sampling.num_prompts=2",
        "sampling.kwargs={}",
        "checkpoint.every_n_steps=1",
    ]


def _train_two_steps(overrides: list[str], tmp_path: Path) -> None:
    cfg = compose_train(overrides)
    family = resolve_target(cfg.model._target_)
    with open_dict(cfg):
        # what the family declares, not its name: a sampler with steps (Muse, diffusion) samples with 2
        takes_steps = family.can("generate") and "steps" in inspect.signature(family.generate).parameters
        cfg.sampling.kwargs = {"steps": 2} if takes_steps else {}
        if "validation_caption_tokens" in cfg.model:  # an untrained LM decodes to the token limit
            cfg.model.validation_captions, cfg.model.validation_caption_tokens = 2, 16
    result = train(cfg)
    assert result["global_step"] == 2
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and "t2i_config" in ckpt
    assert (tmp_path / "checkpoints" / "step_0000002.ckpt").is_file()


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_trains_two_steps(name: str, tmp_path: Path, small_data_overrides: list[str]) -> None:
    _train_two_steps([f"model={name}", *_two_step_overrides(tmp_path, small_data_overrides)], tmp_path)


@pytest.mark.parametrize("name", sorted(set(EXPERIMENTS) - PAPER_SIZE))
def test_tiny_experiment_trains_two_steps(name: str, tmp_path: Path, small_data_overrides: list[str]) -> None:
    _train_two_steps([f"experiment={name}", *_two_step_overrides(tmp_path, small_data_overrides)], tmp_path)


def test_vqgan_with_discriminator_trains_through_the_cli_config(
    tmp_path: Path, small_data_overrides: list[str]
) -> None:
    """GANTask (manual optimization) must get its clipping from trainer.gradient_clip_val, not the Trainer."""
    overrides = [
        "model=vqgan",
        "loss.adversarial_weight=0.1",
        *_two_step_overrides(tmp_path, small_data_overrides),
    ]
    _train_two_steps(overrides, tmp_path)


STRATEGIES = sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml"))
GPU_ONLY = {s for s in STRATEGIES if s.startswith(("fsdp", "deepspeed")) and s != "fsdp2"}


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_builds_or_refuses_cpu_with_one_line(name: str) -> None:
    """GPU-only strategies stop with a clear ConfigError on a CPU trainer; the others build with the family's
    blocks and frozen parts wired in."""
    from t2i_train.errors import ConfigError
    from t2i_train.training import build_strategy

    cfg = compose_train([f"strategy={name}", "model=muse", "trainer.accelerator=cpu", "trainer.devices=2"])
    with no_weight_loading(), torch.device("meta"):
        model = instantiate(cfg.model, _convert_="all")
    if name in GPU_ONLY:
        with pytest.raises(ConfigError, match="needs GPUs"):
            build_strategy(cfg, model)
    elif name == "xla":
        import importlib.util

        if importlib.util.find_spec("torch_xla") is None:
            with pytest.raises(ConfigError, match="torch_xla"):
                build_strategy(cfg, model)
    else:
        strategy = build_strategy(cfg, model)
        if name == "fsdp2":
            assert strategy._data_parallel_size == 2  # every process shards, not one group per node


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA")
@pytest.mark.gpu
def test_fsdp_wraps_the_family_blocks_and_ignores_frozen_parts() -> None:
    from t2i_train.nn.transformer import TransformerBlock
    from t2i_train.training import build_strategy

    cfg = compose_train(["strategy=fsdp", "model=muse", "trainer.accelerator=gpu"])
    model = instantiate(cfg.model, _convert_="all")
    strategy = build_strategy(cfg, model)
    assert TransformerBlock in strategy._policy._module_classes  # type: ignore[attr-defined]
    assert model.text_encoder in strategy.kwargs["ignored_modules"]


def test_compile_blocks_compiles_only_trained_blocks() -> None:
    cfg = compose_train(["model=muse"])
    model = instantiate(cfg.model, _convert_="all")
    assert model.compile_blocks() == len(model.transformer.blocks) == cfg.model.depth


def test_logger_none_drops_the_lr_monitor(tmp_path: Path) -> None:
    from t2i_train.training import build_callbacks

    def names(*overrides: str) -> set[str]:
        cfg = compose_train([f"run_dir={tmp_path}", *overrides])
        return {type(c).__name__ for c in build_callbacks(cfg, [])}

    assert "LearningRateMonitor" not in names("logger=none") and "SaveOnSignal" in names("logger=none")
    assert "LearningRateMonitor" in names()
