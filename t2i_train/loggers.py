"""Loggers that survive resumes."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _KeepHistoryWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv`` when a run starts; a resumed or requeued
    run would lose its history. This one renames it to ``metrics.<n>.csv`` (n = 1, 2, ... per earlier
    attempt) instead, so ``metrics.csv`` is the latest attempt and nothing is lost."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        n = 1
        while (target := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
            n += 1
        path.rename(target)


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, keeping the metrics of earlier attempts of the same run dir."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepHistoryWriter(log_dir=self.log_dir)
        return self._experiment
