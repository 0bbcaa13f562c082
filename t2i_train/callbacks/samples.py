"""Periodic sample grids: a fixed prompt set (or fixed reconstructions) saved as PNG and sent to the logger.

The grids are ``t2i_train.sampling.labelled_grid``'s, as in a sample folder's ``grid.png``: images upscaled
(nearest) to about ``grid_cell`` px with their prompts (or ``input`` / ``reconstruction``) written beside or
above them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from t2i_train.sampling import GRID_CELL, labelled_grid, save_grid

log = logging.getLogger(__name__)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps, draw a grid and write ``<out_dir>/step_<N>.png``.

    Families that can ``generate`` sample ``prompts``; families that can only ``reconstruct`` (stage-1
    tokenizers) show a fixed training batch above its reconstruction; others draw nothing.
    """

    def __init__(
        self,
        out_dir: str,
        every_n_steps: int = 500,
        prompts: list[str] | None = None,
        sampling: dict[str, Any] | None = None,
        seed: int = 0,
        at_end: bool = True,
        grid_cell: int = GRID_CELL,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.prompts = list(prompts or [])
        self.sampling = dict(sampling or {})
        self.seed = seed
        self.at_end = at_end
        self.grid_cell = grid_cell
        self._fixed_images: torch.Tensor | None = None
        self._last_step = -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._fixed_images is None and "image" in batch:
            self._fixed_images = batch["image"][:8].detach().clone()
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.draw(trainer, pl_module)

    def draw(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._last_step = trainer.global_step
        grid = self.make(pl_module)
        if grid is None or not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{trainer.global_step:07d}.png"
        save_grid(grid, path)
        log.info("sample grid written to %s", path)
        for logger in trainer.loggers:
            _log_image(logger, grid, trainer.global_step)

    @torch.no_grad()
    def make(self, pl_module: Any) -> torch.Tensor | None:
        model = pl_module.model
        if self.prompts and _can(model, "generate"):
            generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
            images = pl_module.sample_images(self.prompts, generator=generator, **self.sampling)
            columns = min(8, len(self.prompts))
            return labelled_grid(images.float().cpu().clamp(0, 1), self.prompts, columns, cell=self.grid_cell)
        if self._fixed_images is not None and _can(model, "reconstruct"):
            was_training = model.training
            model.eval()
            images = self._fixed_images.to(pl_module.device)
            recon = model.reconstruct(images)
            model.train(was_training)
            both = torch.cat([images, recon.to(images.dtype)]).float().cpu()
            labels = ["input"] * len(images) + ["reconstruction"] * len(images)
            return labelled_grid((both.clamp(-1, 1) + 1) / 2, labels, len(images), cell=self.grid_cell)
        return None


def _can(model: Any, capability: str) -> bool:
    """``model.available(capability)`` (``Family.available``: implemented, and its parts attached); False for a
    model without it."""
    can = getattr(model, "available", None) or getattr(model, "can", None)
    return bool(can(capability)) if callable(can) else False


def _log_image(logger: Any, grid: torch.Tensor, step: int) -> None:
    experiment = getattr(logger, "experiment", None)
    name = type(logger).__name__
    try:
        if name == "TensorBoardLogger":
            experiment.add_image("samples", grid, step)
        elif name == "WandbLogger":
            logger.log_image(key="samples", images=[grid], step=step)
    except Exception as exc:  # a logger failing to take an image must not stop training
        log.warning("could not log the sample grid to %s: %s", name, exc)
