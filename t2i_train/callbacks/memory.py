"""Per-rank bytes held by parameters and optimizer state (what DDP replicates and FSDP/ZeRO shard)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process stores for ``tensor`` (its own shard for a DTensor)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def memory_footprint(task: L.LightningModule, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes of trainable parameters, frozen parameters and optimizer state held by this rank."""
    trainable = sum(local_bytes(p) for p in task.parameters() if p.requires_grad)
    frozen = sum(local_bytes(p) for p in task.parameters() if not p.requires_grad)
    state = sum(
        local_bytes(value)
        for optimizer in optimizers
        for per_param in optimizer.state.values()
        for value in per_param.values()
        if torch.is_tensor(value) and value.dim() > 0
    )
    return {"trainable_param_bytes": trainable, "frozen_param_bytes": frozen, "optimizer_state_bytes": state}


class MemoryReport(L.Callback):
    """After the first optimizer step, write each rank's footprint to ``<dir>/memory_rank<r>.json`` and log it."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.done = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.done:
            return
        self.done = True
        report = memory_footprint(
            pl_module, [o.optimizer if hasattr(o, "optimizer") else o for o in trainer.optimizers]
        )
        report.update(
            rank=trainer.global_rank, world_size=trainer.world_size, strategy=type(trainer.strategy).__name__
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"memory_rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=2))
        log.info("rank %d memory: %s", trainer.global_rank, report)
