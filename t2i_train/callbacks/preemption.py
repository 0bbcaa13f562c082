"""Save ``last.ckpt`` when the job is told to stop (SIGTERM, SIGUSR1), so `resume=auto` loses nothing.

- SIGTERM (SLURM preemption, `scancel`, `scontrol requeue`, Kubernetes): Lightning finishes the current
  step and raises ``SIGTERMException`` on every rank; this callback then writes ``last.ckpt``.
- SIGUSR1 outside SLURM's auto-requeue (a scheduler's "time is nearly up" warning): the run stops after
  the current step and writes ``last.ckpt``. Under SLURM with auto-requeue, Lightning owns
  SIGUSR1 (it writes ``hpc_ckpt_<n>.ckpt`` into the run dir and requeues the job); `resume=auto` picks
  whichever of that and ``last.ckpt`` is newer.

Either way the command then exits with ``EXIT_STOPPED`` (75, see ``t2i_train.errors``), not 0: the run is not
finished, and ``resume=auto`` continues it at the same step.

DataLoader workers ignore SIGTERM (the data module's ``worker_init_fn``): SLURM signals the whole process group,
and a worker that died first would crash the main process before it could save.

Checkpoint files are written atomically (``t2i_train.checkpoint_io.AtomicCheckpointIO``: a temporary file in the
same folder, fsync, rename), so a kill during the save leaves the previous file intact.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from t2i_train.run_state import disarm_child_process_observer, is_lost_peer_error

log = logging.getLogger(__name__)


class SaveOnSignal(L.Callback):
    """Write ``path`` (the run's ``last.ckpt``) when a stop signal arrives; see the module docstring."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.requested = False
        #: the signal that stopped the run ("SIGTERM" / "SIGUSR1"), None while it runs
        self.stopped_by: str | None = None
        self._previous: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        env = trainer._accelerator_connector.cluster_environment
        slurm_owns_usr1 = isinstance(env, SLURMEnvironment) and env.auto_requeue
        if stage == "fit" and not slurm_owns_usr1 and hasattr(signal, "SIGUSR1"):
            try:
                self._previous = signal.signal(signal.SIGUSR1, self._on_usr1)
            except ValueError:  # not the main thread: leave signals alone
                self._previous = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def _on_usr1(self, signum: int, frame: Any) -> None:
        log.info("received SIGUSR1: stopping after this step and saving %s", self.path)
        self.requested = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            self._save(trainer, "SIGUSR1")
            trainer.should_stop = True
            self.requested = False

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self._save(trainer, "SIGTERM")
        elif trainer.world_size > 1 and is_lost_peer_error(exception):
            disarm_child_process_observer()  # rank 0 reports the loss itself (training.fit)

    def _save(self, trainer: L.Trainer, why: str) -> None:
        self.stopped_by = why
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            # the command that continues the run follows in the "stopped by" line (t2i_train.training.fit)
            log.info("%s: saved %s at step %d", why, self.path, trainer.global_step)
