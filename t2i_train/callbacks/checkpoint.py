"""Lightning's ModelCheckpoint, minus the saves made while the NaN/Inf guard is skipping updates.

A step whose update was skipped (``T2ITask.guard``) holds the same weights as the step before it, and during a
run of such steps those weights are the ones that produced NaN. Writing them would add nothing, and with
``checkpoint.keep_last`` it would rotate the last checkpoints from before the trouble away.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes nothing for a batch whose update the non-finite guard skipped."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        guard = getattr(pl_module, "guard", None)
        if guard is not None and guard.skipping:
            log.debug("step %d: update skipped (non-finite), no periodic checkpoint", trainer.global_step)
            return
        super().on_train_batch_end(trainer, pl_module, *args)
