"""The family contract, checked the same way for every model config in ``t2i_train/conf/model/*.yaml``.

Each family runs in its *debug flavour*: its default model YAML, which is already tiny (32-px images, a few
thin blocks, random stage-1 parts built from a seed). The configs are composed exactly as
``python -m t2i_train model=<family>`` composes them and the task comes from the CLI's ``build_task``, so the
sizes live in the YAML only and adding a family means adding its YAML: this module picks it up.

Checks (generic: capabilities are asked with ``model.can(...)``, never a family name):
1. one optimizer step of the family's real task and loss on a real shapes batch: finite loss, finite
   gradients on every trainable parameter, and the trainable weights move;
2. frozen parts (``frozen_modules()``) get no gradient and stay bit-identical through the step;
3. ``generate`` (where ``available("generate")``; GILL's default has no generator attached): [B, 3, H, W] in
   [0, 1], same seed -> same images, another seed
   -> other images;
4. a checkpoint written by the trainer, read back by ``t2i_train.checkpoint.load_family`` into a fresh
   build, gives identical weights and outputs;
5. a build on the meta device with weight loading off (as ``python -m t2i_train.summary``) and its summary.
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from t2i_train.checkpoint import load_family
from t2i_train.cli.common import CONF_DIR
from t2i_train.model_summary import build_on_meta, summarize
from t2i_train.models.base import Family
from t2i_train.training import build_task
from tests.helpers import compose_train, tensors_equal

FAMILIES = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))
BATCH = 4
PROMPTS = ["a red circle in the top left", "a blue square in the center"]


def family_config(family: str, data_cache: Path, run_dir: Path) -> DictConfig:
    """``python -m t2i_train model=<family>`` on a small shapes set, as composed by the CLI."""
    return compose_train(
        [
            f"model={family}",
            "data.synthetic.count=256",
            "data.synthetic.val_count=16",
            "data.synthetic.samples_per_shard=128",
            f"data.cache_dir={data_cache}",
            "data.num_workers=0",
            f"data.batch_size={BATCH}",
            "data.shuffle_buffer=16",
            f"run_dir={run_dir}",
            "trainer.accelerator=cpu",
        ]
    )


def shapes_batch(cfg: DictConfig) -> dict[str, Any]:
    """The first training batch of the config's own data module."""
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


class GradientProbe(L.Callback):
    """Records, before every optimizer step (after backward, before the NaN guard may drop them), which
    parameters have gradients and whether they are finite."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor | None]] = []

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        model = pl_module.model  # type: ignore[attr-defined]
        self.steps.append(
            {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
        )


@dataclass
class Trained:
    """One family after one optimizer step of its task."""

    cfg: DictConfig
    batch: dict[str, Any]
    model: Family
    task: L.LightningModule
    before: dict[str, torch.Tensor]
    probe: GradientProbe
    metrics: dict[str, torch.Tensor]
    checkpoint: Path
    generated: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    def images(self, seed: int) -> torch.Tensor:
        """``generate(PROMPTS)`` from ``seed`` (once per seed: sampling is the slow part of the suite)."""
        if seed not in self.generated:
            self.generated[seed] = generate(self.model, seed)
        return self.generated[seed]


def loader(batch: dict[str, Any]) -> DataLoader:
    return DataLoader([batch], batch_size=None, collate_fn=lambda b: b)


@pytest.fixture(scope="module", params=FAMILIES)
def trained(
    request: pytest.FixtureRequest, data_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Trained:
    family = request.param
    run_dir = tmp_path_factory.mktemp(f"contract_{family}")
    cfg = family_config(family, data_cache, run_dir)
    batch = shapes_batch(cfg)
    seed_all(0)
    task = build_task(cfg)
    model = task.model
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    probe = GradientProbe()
    fit = trainer(callbacks=[probe])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random stage-1 parts warn loudly; the contract does not care
        fit.fit(task, train_dataloaders=loader(batch))
    checkpoint = run_dir / "contract.ckpt"
    fit.save_checkpoint(checkpoint)
    metrics = {k: v.detach().clone() for k, v in fit.callback_metrics.items()}
    return Trained(cfg, batch, model, task, before, probe, metrics, checkpoint)


def frozen_names(model: Family) -> set[str]:
    return {
        f"{name}.{p}" for name, module in model.frozen_modules().items() for p, _ in module.named_parameters()
    }


def family_outputs(model: Family, batch: dict[str, Any]) -> dict[str, Any]:
    """``model(batch)`` in eval mode from a fixed seed (forward passes draw masks, noise, dropped captions)."""
    model.eval()
    seed_all(123)
    with torch.no_grad():
        return {k: v for k, v in model(batch).items() if torch.is_tensor(v)}


# ------------------------------------------------------------------------------------------- 1. training
def test_training_step_has_finite_loss_and_gradients(trained: Trained) -> None:
    loss = trained.metrics.get("train/loss")
    assert loss is not None, f"the task logged no train/loss: {sorted(trained.metrics)}"
    assert torch.isfinite(loss).all(), f"train/loss is {loss}"
    assert trained.task.guard.skipped_total == 0, "the NaN guard skipped the step"
    assert trained.probe.steps, "no optimizer step ran"
    trainable = {n for n, p in trained.model.named_parameters() if p.requires_grad}
    assert trainable, "the family has nothing to train"
    with_grad: set[str] = set()
    for grads in trained.probe.steps:
        for name, grad in grads.items():
            if grad is not None:
                with_grad.add(name)
                assert torch.isfinite(grad).all(), f"gradient of {name} is not finite"
    assert with_grad, "no parameter received a gradient"
    state = trained.model.state_dict()
    moved = [n for n in trainable if not torch.equal(state[n], trained.before[n])]
    assert moved, "the optimizer step changed no trainable weight"


# ------------------------------------------------------------------------------------------ 2. frozen parts
def test_frozen_parts_get_no_gradient_and_stay_unchanged(trained: Trained) -> None:
    frozen = frozen_names(trained.model)
    for grads in trained.probe.steps:
        got = sorted(n for n in frozen if grads.get(n) is not None)
        assert not got, f"frozen parameters received gradients: {got[:5]}"
    for name, module in trained.model.frozen_modules().items():
        assert not module.training, f"frozen {name} is in training mode"
        assert not any(p.requires_grad for p in module.parameters()), f"frozen {name} requires grad"
    state = trained.model.state_dict()
    prefixes = tuple(f"{name}." for name in trained.model.frozen_modules())
    changed = [k for k in state if k.startswith(prefixes) and not torch.equal(state[k], trained.before[k])]
    assert not changed, f"frozen weights changed in the optimizer step: {changed[:5]}"


# -------------------------------------------------------------------------------------------- 3. generate
def generate(model: Family, seed: int) -> torch.Tensor:
    """``generate`` as the sample CLI calls it: a seeded generator per batch."""
    model.eval()
    torch.manual_seed(999)  # the global RNG is not the seed: only the generator below must matter
    return model.generate(PROMPTS, generator=torch.Generator().manual_seed(seed))


def test_generate_shape_range_and_seed(trained: Trained) -> None:
    model = trained.model
    if not model.available("generate"):
        pytest.skip(f"model={trained.cfg.model._target_.rsplit('.', 1)[-1]} does not generate images")
    first = trained.images(0)
    assert first.ndim == 4 and first.shape[:2] == (len(PROMPTS), 3), first.shape
    assert first.is_floating_point() and torch.isfinite(first).all()
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0, (first.min(), first.max())
    assert torch.equal(generate(model, 0), first), "the same seed gave different images"
    assert not torch.equal(trained.images(1), first), "another seed gave the same images"


# ------------------------------------------------------------------------------------ 4. checkpoint round trip
def test_checkpoint_round_trip(trained: Trained) -> None:
    fresh = load_family(trained.checkpoint)
    assert type(fresh) is type(trained.model)
    assert tensors_equal(fresh.state_dict(), trained.model.state_dict()), "weights differ after reloading"
    assert tensors_equal(family_outputs(fresh, trained.batch), family_outputs(trained.model, trained.batch))
    if fresh.available("generate"):
        assert torch.equal(generate(fresh, 0), trained.images(0)), (
            "the reloaded family generates other images"
        )


# ------------------------------------------------------------------------------------- 5. meta device, summary
@pytest.mark.parametrize("family", FAMILIES)
def test_meta_build_and_summary(family: str, tmp_path: Path) -> None:
    cfg = family_config(family, tmp_path, tmp_path)
    model = build_on_meta(cfg)
    assert isinstance(model, Family)
    params = list(model.parameters())
    assert params and all(p.device.type == "meta" for p in params), "some weights were allocated"
    summary = summarize(model)
    assert summary["total"] == sum(p.numel() for p in params) > 0
    assert summary["trainable"] + summary["frozen"] == summary["total"]
    assert summary["trainable"] == sum(p.numel() for p in model.trainable_parameters()) > 0
    frozen = set(model.frozen_modules())
    flagged = {name for name, c in summary["components"].items() if c["frozen_component"]}
    assert flagged == {name for name in frozen if name in summary["components"]}
    assert summary["frozen"] >= sum(
        p.numel() for m in model.frozen_modules().values() for p in m.parameters()
    )


def test_the_suite_found_the_model_configs() -> None:
    assert len(FAMILIES) >= 7, (
        FAMILIES
    )  # vqgan, vae, clip, muse, diffusion, galip, captioner (+ GILL, CM3leon)
