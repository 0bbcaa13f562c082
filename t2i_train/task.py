"""The generic LightningModule: one family, one loss, one optimizer.

Families whose step is not "one loss, one optimizer" (GAN discriminator/generator alternation) subclass this
task (see ``t2i_train.gan_task``) instead of adding special cases here. A family's own validation numbers are
not a task subclass: the task logs whatever ``Family.validation_metrics`` returns (e.g. the captioner's
caption accuracy) as ``val/<name>``.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from t2i_train.errors import CheckpointError, ConfigError, TrainingDiverged
from t2i_train.losses.base import Loss
from t2i_train.models.base import Family

log = logging.getLogger(__name__)
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed every global RNG (torch CPU and CUDA, numpy, random) from (run seed, batch index, rank).

    Called before each training step, so a step's randomness (masking, condition dropout, noise) depends
    only on which step it is: a run resumed from any checkpoint draws exactly what the uninterrupted run drew,
    whatever consumed random numbers in between (sampling callbacks, validation), with no RNG state to save.
    """
    value = zlib.crc32(f"{seed}/{step}/{rank}".encode())
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


class EMA(nn.Module):
    """Exponential moving average of a family's trainable parameters.

    Only trainable parameters are shadowed (frozen encoders never change), so the memory cost is one copy of
    what the optimizer already holds. ``swapped_into(model)`` temporarily loads the averages for sampling.
    """

    def __init__(self, model: nn.Module, decay: float, start_step: int = 0) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = 0.0 if step < self.start_step else self.decay
        params = dict(model.named_parameters())
        for name in self.names:
            shadow = self.shadow[name]
            if shadow.device != params[name].device:
                shadow = self.shadow[name] = shadow.to(params[name].device)
            shadow.lerp_(params[name].detach().to(shadow.dtype), 1.0 - decay)

    def state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) CPU tensors; under FSDP2 this gathers the shards (every rank must call it)."""
        return {n: _full(t).detach().cpu() for n, t in self.shadow.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        self.shadow = {n: _like(state[n], self.shadow[n]) for n in self.names}

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the model's parameters with the averages (call twice to restore)."""
        params = dict(model.named_parameters())
        for name in self.names:
            current = params[name].detach().clone()
            params[name].copy_(self.shadow[name].to(params[name].device, params[name].dtype))
            self.shadow[name] = current


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) DTensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``reference``: sharded the same way when it is a DTensor."""
    if hasattr(reference, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(reference.dtype), reference.device_mesh, reference.placements)
    return full.to(reference.device, reference.dtype).clone()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    finite = [torch.isfinite(_local(t)).all() for t in tensors if t is not None and t.is_floating_point()]
    return bool(torch.stack(finite).all()) if finite else True


class NonFiniteGuard:
    """Keeps NaN/Inf out of the weights: a step whose loss or gradients are not finite is skipped (on every
    rank: the decision is all-reduced), ``max_consecutive`` such steps in a row stop the run with
    :class:`TrainingDiverged`, and a checkpoint whose weights are not finite is never written.

    Gradients are checked after they are all-reduced and un-scaled (``on_before_optimizer_step``); under fp16
    mixed precision the GradScaler already skips overflowing steps, so only the loss is checked there.
    """

    def __init__(self, max_consecutive: int = 5, check_grads: bool = True) -> None:
        self.max_consecutive, self.check_grads = max_consecutive, check_grads
        self.consecutive = 0
        self.skipped_total = 0
        self._loss_finite = True
        self._loss_value = 0.0
        self._skipped_batch = False

    @property
    def skipping(self) -> bool:
        """Whether this batch's update was skipped (valid from the optimizer step to the batch's end)."""
        return self._skipped_batch

    def start_batch(self) -> None:
        self._loss_finite, self._skipped_batch = True, False

    def note_loss(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._loss_finite, self._loss_value = False, float(loss.detach().float().reshape(-1)[0])

    def update_is_finite(self, params: list[torch.Tensor], trainer: Any) -> bool:
        finite = self._loss_finite
        scaler_checks = "16" in str(getattr(trainer, "precision", "")) and "bf16" not in str(
            trainer.precision
        )
        if finite and self.check_grads and not scaler_checks:
            finite = _all_finite(p.grad for p in params)
        if trainer.world_size > 1:
            finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        if not finite:
            self._skipped_batch = True
        return finite

    def end_batch(self, step: int, rank: int) -> None:
        if not self._skipped_batch:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped_total += 1
        what = f"loss {self._loss_value}" if not self._loss_finite else "a gradient is NaN/Inf"
        if rank == 0:
            log.warning(
                "step %d: %s; update skipped (%d in a row, nonfinite.max_consecutive=%d)",
                step, what, self.consecutive, self.max_consecutive,
            )  # fmt: skip
        if self.consecutive > self.max_consecutive:
            raise TrainingDiverged(
                f"training diverged: non-finite loss or gradients for {self.consecutive} steps in a row, up to "
                f"step {step} (last: {what}); no update was applied and no checkpoint holds NaN weights; lower "
                "optimizer.lr, enable gradient clipping (trainer.gradient_clip_val), or resume from an earlier "
                "checkpoint"
            )

    def check_weights(self, state: dict[str, torch.Tensor], trainer: Any, step: int) -> None:
        """Raise rather than let a checkpoint with NaN/Inf weights be written (or replace a good one)."""
        finite = _all_finite(state.values())
        if trainer is not None and trainer.world_size > 1:
            finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        if not finite:
            bad = next((k for k, v in state.items() if v.is_floating_point() and not _all_finite([v])), "?")
            raise CheckpointError(
                f"not writing a checkpoint at step {step}: weights are NaN/Inf (e.g. {bad}); the earlier "
                "checkpoints are kept; lower optimizer.lr or set nonfinite.check_grads=true"
            )


class T2ITask(L.LightningModule):
    """Trains any single-optimizer family with any loss it accepts."""

    def __init__(
        self,
        model: Family,
        loss: Loss,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        ema_decay: float | None = None,
        ema_start_step: int = 0,
        max_nonfinite_steps: int = 5,
        check_grads_finite: bool = True,
    ) -> None:
        super().__init__()
        model.check_loss(loss)
        if max_nonfinite_steps < 0:
            raise ConfigError(f"nonfinite.max_consecutive must be >= 0, got {max_nonfinite_steps}")
        self.model = model
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.ema = EMA(model, ema_decay, ema_start_step) if ema_decay else None
        #: the resolved run config, written into every checkpoint by the CLI (plain containers).
        self.run_config: dict[str, Any] | None = None
        #: base of the per-step seeds (the run's ``seed``; the CLI sets it); None leaves the RNGs alone.
        self.step_seed: int | None = None
        self.skipped_samples = 0
        #: damaged shards the data workers reported (``bad_shards`` of each batch), in order
        self.bad_shards: list[str] = []
        self.samples_trained = 0
        self.guard = NonFiniteGuard(max_nonfinite_steps, check_grads_finite)
        #: training samples per caption key (``data.caption_keys`` blending), logged as data/caption_<key>
        self.caption_counts: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.loss(self.model(batch))
        self.guard.note_loss(terms["loss"])
        self.log_terms(terms, "train", batch_size=len(batch["caption"]))
        self.log_data_stats(batch)
        return terms["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        terms = self.loss(self.model(batch))
        self.log_terms(terms, "val", batch_size=len(batch["caption"]), on_step=False)
        self.log_family_metrics(batch, batch_idx)

    def log_family_metrics(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The family's ``validation_metrics`` as ``val/<name>`` epoch means (not in the sanity check)."""
        if self.trainer.sanity_checking:
            return
        metrics = self.model.validation_metrics(batch, batch_idx)
        for name, value in metrics.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.log(
                f"val/{name}",
                value,
                on_step=False,
                on_epoch=True,
                batch_size=len(batch["caption"]),
                sync_dist=True,
            )

    def log_terms(
        self, terms: dict[str, torch.Tensor], prefix: str, batch_size: int | None = None, on_step: bool = True
    ) -> None:
        for name, value in terms.items():
            if torch.is_tensor(value) and value.numel() == 1:
                self.log(
                    f"{prefix}/{name}",
                    value.detach().float(),
                    on_step=on_step,
                    on_epoch=not on_step,
                    prog_bar=name == "loss",
                    batch_size=batch_size,
                    sync_dist=not on_step,
                )

    def log_data_stats(self, batch: dict[str, Any]) -> None:
        self.samples_trained += len(batch.get("caption") or [])
        for shard in batch.get("bad_shards") or []:
            self.bad_shards.append(str(shard))
        skipped = batch.get("skipped")
        if skipped is not None:
            self.skipped_samples += int(torch.as_tensor(skipped).sum())
            self.log("data/skipped_total", float(self.skipped_samples), on_step=True)
        sources = batch.get("caption_source")
        if sources:
            for key in sources:
                self.caption_counts[key] = self.caption_counts.get(key, 0) + 1
            total = sum(self.caption_counts.values())
            for key, count in self.caption_counts.items():
                self.log(f"data/caption_{key}", count / total, on_step=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip this update (every rank alike) when the loss or a gradient is NaN/Inf: drop the gradients, so
        the optimizer leaves the weights and its state untouched."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not self.guard.update_is_finite(params, self.trainer):
            for param in params:
                param.grad = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.guard.end_batch(self.global_step, self.global_rank)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.guard.start_batch()
        if self.step_seed is not None:
            seed_step(self.step_seed, self.batches_seen(), self.global_rank)

    def batches_seen(self) -> int:
        """Training batches started so far in the run (restored on resume; counts every micro-batch of
        gradient accumulation, unlike ``global_step``)."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.total.ready)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update.

        Updating here (rather than in ``on_train_batch_end``) puts the update before any callback of the
        same batch, so a checkpoint written at the end of a batch already holds that batch's EMA, and once per
        optimizer step under gradient accumulation.
        """
        super().optimizer_step(*args, **kwargs)
        self.model.after_optimizer_step()
        self.update_ema()

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model, self.global_step)

    # ------------------------------------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """Under ModelParallelStrategy (``strategy=fsdp2``): shard the family with FSDP2 on the data-parallel mesh.

        Each trained block is sharded on its own (its parameters are gathered just for its forward/backward),
        then the family; frozen parameters are ignored (replicated on every rank, never sharded, not trained).
        The EMA is rebuilt afterwards so its shadows are sharded like the parameters.
        """
        mesh = self._device_mesh
        if mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        dp_mesh = (
            mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        )
        frozen = {p for module in self.model.frozen_modules().values() for p in module.parameters()}
        promoted = promote_scalar_parameters(self.model, frozen)
        if promoted:
            log.info(
                "fsdp2: 0-d parameters %s held as [1] (fully_shard shards no scalar)", ", ".join(promoted)
            )
        for block in self.model.trained_blocks():
            fully_shard(block, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh, ignored_params=frozen or None)
        self._sharded = True
        log.info(sharding_summary(self.model, dp_mesh.size()))
        if self.ema is not None:
            self.ema = EMA(self.model, self.ema.decay, self.ema.start_step)

    # ------------------------------------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(list(self.model.trainable_parameters()))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["t2i_config"] = self.run_config
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state()
        self.guard.check_weights(checkpoint.get("state_dict", {}), self.trainer, self.global_step)
        checkpoint["t2i_skipped_samples"] = self.skipped_samples
        checkpoint["t2i_bad_shards"] = list(self.bad_shards)
        checkpoint["t2i_samples_trained"] = self.samples_trained
        checkpoint["t2i_caption_counts"] = dict(self.caption_counts)
        self._leave_out_external_weights(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load(checkpoint["ema"])
        self.skipped_samples = int(checkpoint.get("t2i_skipped_samples", 0))
        self.bad_shards = [str(s) for s in checkpoint.get("t2i_bad_shards", [])]
        self.samples_trained = int(checkpoint.get("t2i_samples_trained", 0))
        self.caption_counts = dict(checkpoint.get("t2i_caption_counts", {}))
        self._restore_external_weights(checkpoint)

    def _external_prefixes(self, names: Iterable[str]) -> tuple[str, ...]:
        return tuple(f"model.{name}." for name in names)

    def _leave_out_external_weights(self, checkpoint: dict[str, Any]) -> None:
        """Drop frozen parts loaded from a pretrained name or stage-1 checkpoint from the saved state dict.

        They never change, their source is in the saved config, and they can dwarf what is trained (T5-XXL's
        4.8B against Muse's 3B), so every checkpoint would otherwise store them again. Readers
        (``t2i_train.checkpoint.load_family``, resume) rebuild them from the config. Sharded (FSDP2) folders
        keep them: the distributed loader insists on every key.
        """
        external = list(self.model.external_modules())
        if not external or getattr(self.trainer.strategy, "_save_distributed_checkpoint", False):
            return
        prefixes = self._external_prefixes(external)
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        checkpoint["t2i_external"] = external
        checkpoint["t2i_external_fingerprint"] = self._external_fingerprints()

    def _external_fingerprints(self) -> dict[str, float]:
        """Fingerprints of the frozen external parts, computed once (they never change during a run)."""
        if getattr(self, "_fingerprints", None) is None:
            from t2i_train.checkpoint import weights_fingerprint

            modules = self.model.external_modules()
            unpinned = set(getattr(self.model, "unpinned_parts", ()))
            self._fingerprints = {
                name: weights_fingerprint(m) for name, m in modules.items() if name not in unpinned
            }
        return self._fingerprints

    def _restore_external_weights(self, checkpoint: dict[str, Any]) -> None:
        """On resume, take the left-out frozen weights from the freshly built model (loaded from their source)."""
        renamed = getattr(self.model, "renamed_parts", {})  # checkpoints written before a part was renamed
        external = [renamed.get(name, name) for name in checkpoint.get("t2i_external") or []]
        if not external or "state_dict" not in checkpoint:
            return
        from t2i_train.checkpoint import check_external_fingerprints

        fingerprints = checkpoint.get("t2i_external_fingerprint", {})
        check_external_fingerprints(
            self.model, {renamed.get(k, k): v for k, v in fingerprints.items()}, "resume"
        )
        prefixes = self._external_prefixes(external)
        state = checkpoint["state_dict"]
        for key, value in self.state_dict().items():
            if key.startswith(prefixes) and key not in state:
                state[key] = value

    # ------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_images(self, prompts: list[str], **sampling: Any) -> torch.Tensor:
        """Generate with the EMA weights when EMA is on, restoring the training weights afterwards."""
        was_training = self.model.training
        self.model.eval()
        if self.ema is not None:
            self.ema.swap(self.model)
        sharded = hasattr(self.model, "unshard")  # FSDP2: generate() does not go through forward's hooks
        if sharded:
            self.model.unshard()
        try:
            return self.model.generate(prompts, **sampling)
        finally:
            if sharded:
                self.model.reshard()
            if self.ema is not None:
                self.ema.swap(self.model)
            self.model.train(was_training)


def sharding_summary(model: nn.Module, ranks: int) -> str:
    """What FSDP2 did, read off the parameters themselves: sharded (DTensor) vs kept whole on every rank."""
    from torch.distributed.tensor import DTensor

    sharded = sum(p.numel() for p in model.parameters() if isinstance(p, DTensor))
    whole = [p for p in model.parameters() if not isinstance(p, DTensor)]
    trained_whole = sum(p.numel() for p in whole if p.requires_grad)
    return (
        f"fsdp2: {sharded:,} parameters sharded over {ranks} ranks; {sum(p.numel() for p in whole):,} kept whole "
        f"on every rank ({trained_whole:,} of them trained)"
    )


def promote_scalar_parameters(model: nn.Module, skip: set[nn.Parameter]) -> list[str]:
    """Turn each trained 0-d parameter (e.g. open_clip's ``logit_scale``) into a [1] one, in place.

    FSDP2 refuses to shard scalars; a [1] parameter broadcasts wherever the scalar did. Checkpoints then hold
    it as [1]; ``t2i_train.checkpoint.load_family`` reshapes it back for a single-process build.
    """
    promoted = []
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.ndim != 0 or param in skip:
                continue
            module._parameters[name] = nn.Parameter(
                param.detach().reshape(1), requires_grad=param.requires_grad
            )
            promoted.append(f"{module_name}.{name}" if module_name else name)
    return promoted
