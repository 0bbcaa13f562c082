"""Periodic sample grids: a fixed prompt set (or fixed reconstructions) saved as PNG and sent to the logger."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchvision.utils import make_grid, save_image

log = logging.getLogger(__name__)


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` optimizer steps, draw a grid and write ``<out_dir>/step_<N>.png``.

    Families that generate from text sample ``prompts``; families that only reconstruct (stage-1 tokenizers)
    show a fixed training batch next to its reconstruction.
    """

    def __init__(
        self,
        out_dir: str,
        every_n_steps: int = 500,
        prompts: list[str] | None = None,
        sampling: dict[str, Any] | None = None,
        seed: int = 0,
        at_end: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.prompts = list(prompts or [])
        self.sampling = dict(sampling or {})
        self.seed = seed
        self.at_end = at_end
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
        save_image(grid, path)
        log.info("sample grid written to %s", path)
        for logger in trainer.loggers:
            _log_image(logger, grid, trainer.global_step)

    @torch.no_grad()
    def make(self, pl_module: Any) -> torch.Tensor | None:
        model = pl_module.model
        if self.prompts and _can_generate(model):
            generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
            images = pl_module.sample_images(self.prompts, generator=generator, **self.sampling)
            return make_grid(images.float().cpu().clamp(0, 1), nrow=min(8, len(self.prompts)))
        if self._fixed_images is not None and hasattr(model, "reconstruct"):
            was_training = model.training
            model.eval()
            images = self._fixed_images.to(pl_module.device)
            recon = model.reconstruct(images)
            model.train(was_training)
            both = torch.cat([images, recon.to(images.dtype)]).float().cpu()
            return make_grid((both.clamp(-1, 1) + 1) / 2, nrow=len(images))
        return None


def _can_generate(model: Any) -> bool:
    return bool(getattr(model, "generates_images", lambda: False)())


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
