"""The family contract every model family implements (see README "Adding a family").

A family is an ``nn.Module`` that
- returns its training outputs from ``forward(batch)`` as a dict of tensors, which the configured loss
  (``t2i_train.losses``) turns into named terms (``loss`` is the total);
- lists the loss classes it accepts in ``accepted_losses`` (checked once at start-up);
- generates images with ``generate(prompts, **sampling) -> Tensor[B, 3, H, W]`` in [0, 1];
- keeps its frozen parts (text encoders, tokenizers, CLIP, LLMs) registered through ``freeze(module)``: they
  stay in eval mode, take no gradient and are left out of ``trainable_parameters()``;
- declares which of its constructor arguments are stage-1 file paths (``external_paths``), so checkpoint
  readers can drop them or make them absolute; stage-1 parts are attached with
  ``t2i_train.models.stage1.attach_stage1``;
- may add validation numbers through ``validation_metrics`` (logged by the generic task as ``val/<name>``);
- says what else it can do by implementing the methods of ``t2i_train.models.capabilities``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from t2i_train.errors import ConfigError


class Family(nn.Module):
    """Base class of every model family."""

    #: Loss classes this family can be trained with; empty means "any".
    accepted_losses: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Name used in error messages and summaries.
    family_name: ClassVar[str] = "family"
    #: The LightningModule class that trains this family (a dotted path, resolved by the train CLI).
    task_class: ClassVar[str] = "t2i_train.task.T2ITask"
    #: The repeated blocks of the trained network: the unit of FSDP wrapping / FSDP2 sharding, activation
    #: checkpointing and per-block ``torch.compile`` (``strategy.auto_wrap_policy: family``, ``compile=true``).
    block_classes: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Constructor arguments that are paths of stage-1 checkpoints, dotted from the family's config node
    #: (``"vae_checkpoint"``, ``"clip.checkpoint"``): left out when a checkpoint is rebuilt from its own
    #: weights, made absolute when a run config is saved (``t2i_train.checkpoint``).
    external_paths: ClassVar[tuple[str, ...]] = ()
    #: Constructor arguments that are paths of resources read at use, never copied into the family's weights
    #: (GILL's image generator): made absolute when a run config is saved, but kept when a checkpoint that holds
    #: every weight is rebuilt (unlike ``external_paths``, which are then dropped).
    resource_paths: ClassVar[tuple[str, ...]] = ()
    #: Old name -> new name of renamed sub-modules, buffers and config keys: older checkpoints' state dicts,
    #: external-part lists and configs are read under the new names (``upgrade_config``, ``load_family``).
    renamed_parts: ClassVar[dict[str, str]] = {}
    #: External parts that may be replaced by another source without invalidating the trained weights (GILL's
    #: image generator): their fingerprint is not recorded, so a rebuild does not insist on the same weights.
    unpinned_parts: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self._frozen_names: list[str] = []
        self._external_names: list[str] = []

    # ----------------------------------------------------------------------------------------- frozen parts
    def freeze(self, name: str, external: bool = False) -> None:
        """Mark sub-module ``name`` as frozen: eval mode, no gradient, not in the optimizer.

        ``external=True``: its weights come from outside the run (a pretrained name, a stage-1 checkpoint), so
        training checkpoints leave them out and readers rebuild them from the config (see
        ``t2i_train.checkpoint``); exports still hold them, so an export folder stands alone.
        """
        module = getattr(self, name)
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        if name not in self._frozen_names:
            self._frozen_names.append(name)
        if external and name not in self._external_names:
            self._external_names.append(name)
        if not external and name in self._external_names:
            self._external_names.remove(name)

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self._frozen_names if getattr(self, name) is not None}

    def external_modules(self) -> dict[str, nn.Module]:
        """Frozen parts whose weights come from outside the run (``freeze(name, external=True)``)."""
        return {name: getattr(self, name) for name in self._external_names if getattr(self, name) is not None}

    def train(self, mode: bool = True) -> Family:
        super().train(mode)
        for module in self.frozen_modules().values():
            module.eval()
        return self

    def trained_blocks(self) -> list[nn.Module]:
        """Instances of ``block_classes`` outside the frozen parts (a frozen tokenizer's blocks are not ours)."""
        frozen = {id(m) for module in self.frozen_modules().values() for m in module.modules()}
        return [m for m in self.modules() if isinstance(m, self.block_classes) and id(m) not in frozen]

    def compile_blocks(self, **options: Any) -> int:
        """``torch.compile`` each trained block in place (small graphs compile fast and reuse); returns how many."""
        blocks = self.trained_blocks()
        for block in blocks:
            block.compile(**options)
        return len(blocks)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    # ------------------------------------------------------------------------------------------ contract
    def check_loss(self, loss: nn.Module) -> None:
        """Raise ConfigError when ``loss`` is not one this family can be trained with."""
        if self.accepted_losses and not isinstance(loss, self.accepted_losses):
            names = ", ".join(c.config_name for c in self.accepted_losses if hasattr(c, "config_name"))
            got = getattr(loss, "config_name", type(loss).__name__)
            raise ConfigError(
                f"model={self.family_name} cannot be trained with loss={got}; use one of: {names}"
            )

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called by the task after every optimizer step (e.g. GILL rescales its new token rows). Default: none."""

    def validation_metrics(self, batch: dict[str, Any], batch_index: int) -> dict[str, float | torch.Tensor]:
        """Extra numbers for this validation batch, logged by the task as ``val/<name>`` (epoch means).

        Called in eval mode after the loss, except during Lightning's sanity check (an untrained model's
        numbers are noise and can be slow: an LM decodes to its token limit). Default: none.
        """
        return {}

    @classmethod
    def upgrade_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """A stored model config (plain containers) in today's argument names: ``renamed_parts`` applied to
        its top-level keys. Families whose arguments changed shape extend this."""
        return {cls.renamed_parts.get(k, k): v for k, v in config.items()}

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Read keys written under an old sub-module / buffer name (``renamed_parts``) under the new one."""
        for old, new in self.renamed_parts.items():
            for key in [k for k in state_dict if k.startswith(f"{prefix}{old}.") or k == f"{prefix}{old}"]:
                state_dict[prefix + new + key[len(prefix) + len(old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def can(cls, capability: str) -> bool:
        """Whether this family implements ``capability`` (a method name listed in
        ``t2i_train.models.capabilities.CAPABILITIES``): defined, and not ``Family``'s raising default."""
        method = getattr(cls, capability, None)
        return callable(method) and method is not getattr(Family, capability, None)

    def available(self, capability: str) -> bool:
        """Whether this instance can use ``capability`` now: ``can`` (the class implements it) unless the family
        says a part it needs is missing (GILL without an attached generator cannot ``generate``)."""
        return self.can(capability)

    @classmethod
    def generates_images(cls) -> bool:
        """Whether this family implements ``generate`` (CLIP and VQGAN do not: they are stage-1 models)."""
        return cls.can("generate")

    @torch.no_grad()
    def generate(self, prompts: list[str], **sampling: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise ConfigError(f"model={self.family_name} does not generate images; sample from an image family")

    @torch.no_grad()
    def pre_encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fields that ``python -m t2i_train.encode`` stores per sample for stage-2 training.

        Images [B, 3, H, W] in [-1, 1] -> {field name: tensor with leading dim B}; the names are the batch
        keys stage-2 families read instead of running this (frozen) encoder in the loop: ``image_tokens``
        (VQGAN), ``latents`` (VAE), ``clip_image_emb`` (CLIP).
        """
        raise ConfigError(f"model={self.family_name} has no pre-encoded fields; encode with a stage-1 model")
