"""Which samples each rank trained on: an audit log of sample keys, one JSON line per training batch.

``KeyLog`` appends ``{"epoch", "step", "batch_idx", "keys"}`` to ``<out_dir>/keys_rank<global_rank>.jsonl``
after every training step (``on_train_batch_end``: the optimizer step of that batch has run), flushing each line,
so a killed run leaves every line it wrote readable. A resumed run appends to the same file; batches the loader
fast-forwards past on resume never reach the model and are not logged. ``step`` is ``trainer.global_step``
after the batch (with gradient accumulation several batches share a step).

Off by default. Turn it on with the ``key_log`` callbacks option (the default callbacks plus this one):

    python -m t2i_train callbacks=key_log ...                       # -> <run_dir>/keys/keys_rank<r>.jsonl
    python -m t2i_train callbacks=key_log callbacks.key_log.out_dir=/audit/run1 ...

or add it to any other callbacks option (e.g. ``callbacks=memory``) with two overrides:

    python -m t2i_train callbacks=memory +callbacks.key_log._target_=t2i_train.callbacks.data_audit.KeyLog \
        '+callbacks.key_log.out_dir=${run_dir}/keys' ...

Use it to check that an epoch covered every sample exactly once across ranks and data workers
(``tests/reliability/test_multinode.py`` does, on a 2-node run), or to find which batch held a bad sample.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

import lightning as L


class KeyLog(L.Callback):
    """Append the ``key`` of every sample of every training batch to ``<out_dir>/keys_rank<r>.jsonl``."""

    def __init__(self, out_dir: str, fsync: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.fsync = fsync  # also survive a machine crash, at one fsync per step
        self._file: IO[str] | None = None

    def path(self, global_rank: int) -> Path:
        return self.out_dir / f"keys_rank{global_rank}.jsonl"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        keys = batch.get("key") if isinstance(batch, dict) else None
        if keys is None:
            return
        record = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "batch_idx": batch_idx,
            "keys": [str(key) for key in keys],
        }
        self._write(trainer.global_rank, json.dumps(record))

    def _write(self, global_rank: int, line: str) -> None:
        if self._file is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path(global_rank), "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._file.write(line + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_key_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of one ``keys_rank<r>.jsonl`` (a last line cut short by a kill is ignored)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
