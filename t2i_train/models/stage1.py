"""Stage-1 parts of a family: a frozen module (Muse's VQGAN, diffusion's VAE, GALIP's and the captioner's
CLIP) whose weights come from another training run, a pretrained name, or nowhere (random: smoke tests only).

One place for what every such family did by hand:

- ``attach_stage1(family, name, checkpoint, ...)``: copy a stage-1 checkpoint's weights into the configured
  module (only while weight loading is on, see ``t2i_train.models.loading``), then freeze it, as an external
  part when its weights come from outside the run (training checkpoints then leave it out, see
  ``t2i_train.checkpoint``);
- ``warn_random_stage1(family, name, message)``: the loud warning, once per family instance and part, at the
  first training step that runs through a randomly initialised stage 1.

The checkpoint is read by a *loader* (path -> the family stored there): by default
``t2i_train.checkpoint.load_family``, which rebuilds families with its own ``_target_`` resolver, so nothing
here imports Hydra, directly or not.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from t2i_train.errors import ConfigError
from t2i_train.models.loading import weight_loading_enabled

if TYPE_CHECKING:
    from t2i_train.models.base import Family

log = logging.getLogger(__name__)

#: Reads a stage-1 checkpoint (a training ``.ckpt`` or an export folder) into the family stored there.
Stage1Loader = Callable[[str], nn.Module]


def default_loader(path: str) -> nn.Module:
    from t2i_train.checkpoint import load_family  # lazy: the reader imports every family's base

    return load_family(path)


def load_stage1_weights(
    module: nn.Module,
    path: str,
    option: str,
    part: str,
    kind: str,
    strict: bool = False,
    loader: Stage1Loader | None = None,
) -> None:
    """Copy the weights of the family stored at ``path`` into ``module`` (which keeps its architecture).

    The configured architecture is kept, rather than swapping in the checkpoint's module, because the stage-2
    checkpoint is later rebuilt from its config with the stage-1 path dropped: config and weights must agree,
    and a mismatch is reported here, at start-up, naming ``option`` (the path's config key), ``part`` (the
    module's config key) and ``kind`` (what it should be). ``strict=False`` leaves extra stage-1 parts (a GAN
    discriminator) behind; missing weights are an error either way.
    """
    state = (loader or default_loader)(path).state_dict()
    fix = f"make model.{part} describe the checkpoint's {kind}"
    try:
        missing, _ = module.load_state_dict(state, strict=strict)
    except RuntimeError as exc:  # shape mismatches (and, when strict, missing / unexpected keys)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[-1] if len(lines) > 1 else (lines or [""])[0]
        raise ConfigError(f"{option} {path} does not fit model.{part} ({detail}); {fix}") from exc
    if missing:
        raise ConfigError(
            f"{option} {path} lacks {len(missing)} weights of model.{part} (e.g. {missing[0]}); {fix}"
        )


def attach_stage1(
    family: Family,
    name: str,
    checkpoint: str | None,
    *,
    option: str,
    kind: str,
    strict: bool = False,
    from_source: bool = False,
    loader: Stage1Loader | None = None,
) -> bool:
    """Fill ``family.<name>`` from ``checkpoint`` (only while weight loading is enabled) and freeze it.

    ``from_source``: its weights already come from outside the run (a pretrained name), so it is external
    even without a checkpoint. Returns whether the checkpoint's weights were loaded.
    """
    loaded = bool(checkpoint and weight_loading_enabled())
    if loaded:
        load_stage1_weights(getattr(family, name), str(checkpoint), option, name, kind, strict, loader)
    family.freeze(name, external=loaded or from_source)
    return loaded


def warn_random_stage1(family: nn.Module, name: str, message: str) -> None:
    """Warn (``warnings`` and the log) that ``family`` trains through a random ``name``: once per instance and
    part, only in training mode. Callers decide whether the part is random."""
    if not family.training:
        return
    warned: set[str] = family.__dict__.setdefault("_warned_random_stage1", set())
    if name in warned:
        return
    warned.add(name)
    warnings.warn(message, stacklevel=3)
    log.warning(message)
