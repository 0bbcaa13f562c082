"""Two-optimizer task for adversarial families (VQGAN with a discriminator, GALIP).

Per batch: one forward pass of the family, then a discriminator update, then a generator update (the
generator step sees the freshly updated discriminator). Nothing here is family-specific; the family provides
``generator_parameters()``, ``discriminator_parameters()`` and the loss provides::

    generator_terms(outputs, model, step) -> dict[str, Tensor]          # with "loss"
    discriminator_terms(outputs, model, step) -> dict[str, Tensor] | None  # None: no D update this step
    forward(outputs) -> dict[str, Tensor]                               # validation terms

Decisions:
- ``trainer.global_step`` counts *generator* updates only (the discriminator optimizer is stepped through the
  strategy directly, which applies the precision plugin but does not advance Lightning's step counter), so
  ``max_steps``, checkpoint cadence, EMA start and ``disc_start`` mean "batches", as in every other family.
- Lightning refuses ``Trainer(gradient_clip_val=...)`` and ``accumulate_grad_batches`` under manual
  optimization; clipping is configured here (``gradient_clip_val`` / ``gradient_clip_algorithm``) and applied
  in ``on_before_optimizer_step``, i.e. after AMP un-scaling, to both optimizers.
- Schedulers (one per optimizer, from the same factory) are stepped here after each optimizer step.
- EMA is updated at the end of ``training_step``, after the generator step (before any callback).
- Under DDP the discriminator step leaves the generator's parameters without gradients: use a strategy with
  ``find_unused_parameters=True``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer

from t2i_train.losses.base import Loss
from t2i_train.models.base import Family
from t2i_train.task import OptimizerFactory, SchedulerFactory, T2ITask


class GANLoss(Protocol):
    def generator_terms(
        self, outputs: dict[str, torch.Tensor], model: Any, step: int
    ) -> dict[str, torch.Tensor]: ...

    def discriminator_terms(
        self, outputs: dict[str, torch.Tensor], model: Any, step: int
    ) -> dict[str, torch.Tensor] | None: ...


class GANTask(T2ITask):
    """Alternating discriminator / generator updates with manual optimization."""

    def __init__(
        self,
        model: Family,
        loss: Loss,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        ema_decay: float | None = None,
        ema_start_step: int = 0,
        discriminator_optimizer: OptimizerFactory | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        max_nonfinite_steps: int = 5,
        check_grads_finite: bool = True,
    ) -> None:
        super().__init__(
            model,
            loss,
            optimizer,
            scheduler,
            ema_decay,
            ema_start_step,
            max_nonfinite_steps,
            check_grads_finite,
        )
        for method in ("generator_terms", "discriminator_terms"):
            if not callable(getattr(loss, method, None)):
                raise TypeError(f"{type(loss).__name__} has no {method}(); GANTask needs a GAN loss")
        self.automatic_optimization = False
        self.discriminator_optimizer_factory = discriminator_optimizer or optimizer
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm

    # ------------------------------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> Any:
        g_opt = self.optimizer_factory(list(self.model.generator_parameters()))
        d_opt = self.discriminator_optimizer_factory(list(self.model.discriminator_parameters()))
        if self.scheduler_factory is None:
            return [g_opt, d_opt]
        schedulers = [
            {"scheduler": self.scheduler_factory(opt), "interval": "step"} for opt in (g_opt, d_opt)
        ]
        return [g_opt, d_opt], schedulers

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)

    def _scheduler(self, index: int) -> Any:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return None
        return schedulers[index] if isinstance(schedulers, list) else (schedulers if index == 0 else None)

    def _update(self, opt: LightningOptimizer, terms: dict[str, torch.Tensor], index: int) -> None:
        """Back-propagate ``terms['loss']`` into ``opt``'s parameters and step it (and its scheduler)."""
        opt.zero_grad()
        self.guard.note_loss(terms["loss"])  # a non-finite loss skips this batch's updates (T2ITask.guard)
        self.manual_backward(terms["loss"])
        if index == 0:
            opt.step()  # counted: global_step = generator updates
        else:
            self.trainer.strategy.optimizer_step(opt.optimizer, closure=lambda: None)
        scheduler = self._scheduler(index)
        if scheduler is not None:
            scheduler.step()

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g_opt, d_opt = self.optimizers()
        step = self.global_step
        batch_size = int(batch["image"].shape[0])
        outputs = self.model(batch)

        self.toggle_optimizer(d_opt)
        d_terms = self.loss.discriminator_terms(outputs, self.model, step)
        if d_terms is not None:
            self._update(d_opt, d_terms, index=1)
            self.log_terms(d_terms, "train/disc", batch_size=batch_size)
        self.untoggle_optimizer(d_opt)

        self.toggle_optimizer(g_opt)
        g_terms = self.loss.generator_terms(outputs, self.model, step)
        self._update(g_opt, g_terms, index=0)
        self.untoggle_optimizer(g_opt)
        self.log_terms(g_terms, "train", batch_size=batch_size)
        self.log_data_stats(batch)
        self.update_ema()
