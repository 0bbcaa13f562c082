"""CLIP (Radford et al. 2021) through the real open_clip library: the ``clip`` stage-1 family and the frozen
CLIP that stage-2 families (GALIP) and the CLIP score read.

Usage::

    from t2i_train.models.clip import build_open_clip, clip_tokenizer, load_frozen_clip

    model = build_open_clip()                                   # tiny random CLIP (32², patch 8), no download
    model = build_open_clip("ViT-B-32", pretrained="openai")    # downloads, unless under no_weight_loading()
    clip = load_frozen_clip(checkpoint="runs/clip/checkpoints/last.ckpt")  # a model=clip run (or export)
    text = clip.encode_text(["a red circle in the top left"])   # [B, embed_dim], L2-normalised
    image = clip.encode_image(images)                           # images [B,3,H,W] in [-1, 1] -> [B, embed_dim]
    clip.model.visual                                           # the open_clip VisionTransformer itself

Architecture: an open_clip name (``model_name="ViT-B-32"``; ``pretrained`` a tag such as ``openai``) or a dict
``{embed_dim, vision_cfg, text_cfg}`` given to ``open_clip.CLIP`` (default: ``TINY_CLIP_CONFIG``). Random
weights come from a private RNG seeded with ``init_seed``, so every process builds the same CLIP. Nothing is
downloaded unless a ``pretrained`` tag is given, weight loading is enabled (``t2i_train.models.loading``) and the
model is not being built on the meta device.

A frozen CLIP loaded from a ``checkpoint`` keeps the architecture of its arguments (model_name / config, the
tiny default when both are None) and takes the checkpoint's weights, so a stage-2 checkpoint rebuilt from its
config (where stage-1 paths are dropped) has the same modules; a mismatch is a ConfigError. Stage-2 families
(GALIP, the captioner) take it as one config node, ``clip: {_target_: t2i_train.models.clip.load_frozen_clip,
checkpoint, model_name, pretrained, config, context_length, init_seed}``.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from torch import nn

from t2i_train.errors import ConfigError
from t2i_train.losses.clip_contrastive import CLIPContrastive
from t2i_train.models.base import Family
from t2i_train.models.loading import no_weight_loading, weight_loading_enabled

#: The tiny CLIP of the shapes world: 32² images as a 4x4 grid of 8px patches, 4 ViT blocks of width 64
#: (4 heads), a 2-block text transformer over open_clip's BPE vocabulary (shipped in the package).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


# ------------------------------------------------------------------------------------------------- build
def _on_meta_device() -> bool:
    return torch.empty(0).device.type == "meta"


def _named_config(model_name: str, pretrained: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """open_clip's built-in config of ``model_name`` (+ the pretrained tag's QuickGELU / mean / std)."""
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ConfigError(
            f"unknown open_clip model_name {model_name!r}; see open_clip.list_models() (e.g. ViT-B-32)"
        )
    cfg = copy.deepcopy(cfg)
    preprocess: dict[str, Any] = {}
    tag = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    if tag:
        cfg["quick_gelu"] = bool(tag.get("quick_gelu", cfg.get("quick_gelu", False)))
        preprocess = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
    # a towers' own pretrained weights (timm / Hugging Face) would be a download: never for a bare build
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    if "hf_model_name" in cfg.get("text_cfg", {}):
        cfg["text_cfg"]["hf_model_pretrained"] = False
    return cfg, preprocess


def _dict_config(config: dict[str, Any] | None, context_length: int) -> dict[str, Any]:
    cfg = copy.deepcopy(dict(config) if config is not None else TINY_CLIP_CONFIG)
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise ConfigError(f"clip config lacks {sorted(missing)}: give embed_dim, vision_cfg and text_cfg")
    cfg["vision_cfg"] = dict(cfg["vision_cfg"])
    cfg["text_cfg"] = dict(cfg["text_cfg"])
    cfg["text_cfg"].setdefault("context_length", context_length)
    return cfg


def _instantiate(cfg: dict[str, Any], init_seed: int) -> nn.Module:
    """``open_clip.CLIP`` (or ``CustomTextCLIP``) from a config dict, initialised from ``init_seed``."""
    cfg = dict(cfg)
    if "multimodal_cfg" in cfg:
        raise ConfigError("CoCa configs (multimodal_cfg) are not a CLIP; pick a CLIP architecture")
    custom_text = bool(cfg.pop("custom_text", False)) or "hf_model_name" in cfg["text_cfg"]
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    if _on_meta_device():
        return cls(**cfg, output_dict=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return cls(**cfg, output_dict=True)


def _set_preprocess(model: nn.Module, overrides: dict[str, Any]) -> None:
    cfg = {
        "size": model.visual.image_size,
        "mean": open_clip.OPENAI_DATASET_MEAN,
        "std": open_clip.OPENAI_DATASET_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        **overrides,
    }
    open_clip.set_model_preprocess_cfg(model, cfg)


def build_open_clip(
    model_name: str | None = None,
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    context_length: int = 32,
    init_seed: int = 0,
) -> open_clip.CLIP:
    """An open_clip CLIP with ``output_dict=True``.

    ``model_name``: an open_clip architecture (its own context length is kept: pretrained positions fix it);
    ``pretrained``: a tag for it (``openai``, ``laion2b_s34b_b79k``, ...) or a weights file, loaded only while
    weight loading is enabled and off the meta device. ``config``: ``{embed_dim, vision_cfg, text_cfg}`` for
    ``open_clip.CLIP`` (``context_length`` fills ``text_cfg.context_length`` when absent); neither: the tiny
    default. Random weights are drawn from ``init_seed``.
    """
    if model_name and config is not None:
        raise ConfigError(
            f"the clip has both model_name={model_name!r} and a config dict: pass config=null with a model_name"
        )
    if pretrained and not model_name:
        raise ConfigError(f"pretrained={pretrained!r} needs model_name (the open_clip architecture)")
    if model_name and pretrained and weight_loading_enabled() and not _on_meta_device():
        quick_gelu = bool((open_clip.get_pretrained_cfg(model_name, pretrained) or {}).get("quick_gelu"))
        return open_clip.create_model(
            model_name, pretrained=pretrained, force_quick_gelu=quick_gelu, output_dict=True
        )
    if model_name:
        cfg, preprocess = _named_config(model_name, pretrained)
    else:
        cfg, preprocess = _dict_config(config, context_length), {}
    model = _instantiate(cfg, init_seed)
    _set_preprocess(model, preprocess)
    return model


@functools.lru_cache(maxsize=8)
def clip_tokenizer(model_name: str | None = None, context_length: int | None = None) -> Any:
    """open_clip's tokenizer: ``get_tokenizer(model_name)`` for names, the BPE ``SimpleTokenizer`` otherwise.

    Called with a list of strings it returns LongTensor [B, context_length]. Cached: the BPE table takes a
    moment to read.
    """
    if model_name:
        return open_clip.get_tokenizer(model_name, context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length or 77)


# -------------------------------------------------------------------------------------------- pre-process
def clip_preprocess(images: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Images [B,3,H,W] in [-1, 1] -> CLIP input: resized to the model's size, mean/std normalised.

    Differentiable (GALIP's generator loss goes through it). The resize is bicubic with anti-aliasing, as
    open_clip's PIL pipeline does for downscaling.
    """
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = tuple(model.visual.image_size)
    dtype = _dtype_of(model)
    x = (images.to(torch.float32) + 1.0) / 2.0
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(cfg["mean"], device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"], device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - mean) / std).to(dtype)


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.visual.parameters()).dtype


def _embed_dim(model: nn.Module) -> int:
    dim = getattr(model.visual, "output_dim", None)
    if dim is None:
        dim = model.text_projection.shape[1]
    return int(dim)


# ------------------------------------------------------------------------------------------- frozen CLIP
class FrozenCLIP(nn.Module):
    """A frozen open_clip CLIP (``.model``) with its tokenizer: normalised text and image embeddings.

    Always in eval mode and without gradients to its weights; gradients still flow to input images.
    """

    def __init__(self, model: nn.Module, model_name: str | None = None, has_weights: bool = False) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.model_name = model_name
        #: its weights come from outside the run (a checkpoint or pretrained tag was named), not random
        self.has_weights = bool(has_weights)

    def train(self, mode: bool = True) -> FrozenCLIP:
        super().train(mode)
        self.model.eval()
        return self

    @property
    def tokenizer(self) -> Any:
        return clip_tokenizer(self.model_name, int(self.model.context_length))

    @property
    def image_size(self) -> int:
        """Side of the (square) input image the vision tower takes."""
        return int(self.model.visual.image_size[0])

    @property
    def embed_dim(self) -> int:
        return _embed_dim(self.model)

    @property
    def width(self) -> int:
        """Width of the vision transformer's tokens (768 for ViT-B/32): the size of tapped block features."""
        return int(self.model.visual.transformer.width)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        device = self.model.logit_scale.device
        return self.tokenizer(list(prompts)).to(device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1, 1] -> the normalised, resized input of ``model.visual``."""
        return clip_preprocess(images, self.model)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> [B, embed_dim] L2-normalised (the EOT feature through the text projection)."""
        return self.model.encode_text(self.tokenize(prompts), normalize=True)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1, 1] (any size) -> [B, embed_dim] L2-normalised; differentiable."""
        return self.model.encode_image(self.preprocess(images), normalize=True)


def _checkpoint_clip_state(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The open_clip weights (and model config) of a ``clip`` training checkpoint or export folder."""
    from t2i_train.checkpoint import model_state_dict, read_checkpoint  # lazy: reads checkpoints

    ckpt = read_checkpoint(path)
    model_cfg = ckpt["t2i_config"].get("model") or {}
    target = str(model_cfg.get("_target_", ""))
    if not target.endswith(f"{__name__}.{CLIPFamily.__name__}"):
        raise ConfigError(f"clip checkpoint {path} holds a {target or 'non-t2i'} model, not model=clip")
    state = {k[len("clip.") :]: v for k, v in model_state_dict(ckpt).items() if k.startswith("clip.")}
    return state, model_cfg


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str, arch: dict[str, Any]) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(
            f"clip checkpoint {path} does not fit the configured CLIP ({str(exc).splitlines()[-1].strip()}); "
            f"make the clip's model_name/config describe the checkpoint's CLIP: {arch}"
        ) from exc


def _architecture(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``build_open_clip`` arguments of a ``model=clip`` config."""
    keys = ("model_name", "pretrained", "config", "context_length", "init_seed")
    return {k: model_cfg[k] for k in keys if model_cfg.get(k) is not None}


def frozen_clip_from_checkpoint(path: str) -> FrozenCLIP:
    """The frozen CLIP of a ``model=clip`` checkpoint or export folder, in the architecture it was trained in."""
    state, model_cfg = _checkpoint_clip_state(path)
    arch = _architecture(model_cfg)
    with no_weight_loading():
        model = build_open_clip(**arch)
    _load_weights(model, state, path, arch)
    return FrozenCLIP(model, arch.get("model_name"), has_weights=True)


def load_frozen_clip(
    checkpoint: str | None = None,
    model_name: str | None = None,
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    context_length: int = 32,
    init_seed: int = 0,
) -> FrozenCLIP:
    """A frozen CLIP: weights from ``checkpoint`` (a ``model=clip`` .ckpt or export folder; only while weight
    loading is enabled), else from ``pretrained``, else random from ``init_seed``.

    The architecture is always the one the arguments describe (see ``build_open_clip``). ``has_weights`` of
    the result says whether a checkpoint or a pretrained tag was named (whether or not loading was on).
    """
    if checkpoint and weight_loading_enabled():
        with no_weight_loading():  # the checkpoint's weights replace any pretrained ones: skip the download
            model = build_open_clip(model_name, pretrained, config, context_length, init_seed)
        state, model_cfg = _checkpoint_clip_state(checkpoint)
        _load_weights(model, state, checkpoint, _architecture(model_cfg))
    else:
        model = build_open_clip(model_name, pretrained, config, context_length, init_seed)
    return FrozenCLIP(model, model_name, has_weights=bool(checkpoint or pretrained))


def frozen_clip(clip: FrozenCLIP | Mapping[str, Any] | None) -> FrozenCLIP:
    """A stage-2 family's ``clip`` argument as a FrozenCLIP: built already (from a config node's ``_target_``),
    or the ``load_frozen_clip`` arguments as a mapping (None: the tiny random CLIP)."""
    if isinstance(clip, FrozenCLIP):
        return clip
    if clip is None or isinstance(clip, Mapping):
        options = {k: v for k, v in dict(clip or {}).items() if k != "_target_"}
        return load_frozen_clip(**options)
    raise ConfigError(f"model.clip must be a CLIP config node or a FrozenCLIP, got {type(clip).__name__}")


#: the flat arguments stage-2 families took before their CLIP became one config node -> that node's keys
LEGACY_CLIP_KEYS: dict[str, str] = {
    "clip_checkpoint": "checkpoint",
    "clip_model_name": "model_name",
    "clip_pretrained": "pretrained",
    "clip_config": "config",
    "clip_context_length": "context_length",
    "clip_init_seed": "init_seed",
}


def nest_clip_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored stage-2 model config with its old flat ``clip_*`` keys folded into one ``clip`` node."""
    config = dict(config)
    if not any(key in config for key in LEGACY_CLIP_KEYS):
        return config
    node = {"_target_": f"{__name__}.{load_frozen_clip.__name__}"}
    node.update({new: config.pop(old) for old, new in LEGACY_CLIP_KEYS.items() if old in config})
    return {**config, "clip": node}


# ------------------------------------------------------------------------------------------------ family
class CLIPFamily(Family):
    """Trainable open_clip CLIP (stage 1 of GALIP and of the CLIP score), contrastive loss.

    Args:
        model_name, pretrained, config, context_length, init_seed: the CLIP, as for ``build_open_clip``
            (``pretrained`` starts fine-tuning from those weights).
        gradient_checkpointing: recompute the transformer blocks in the backward pass.
        max_logit_scale: the learned temperature's ceiling (open_clip training clamps ``logit_scale`` to
            ln 100 after each step; here it is clamped before each training forward).

    It does not generate images (``generate`` is the base class's, so sample grids are skipped) and reads
    no pre-encoded fields; ``pre_encode`` writes ``clip_image_emb`` for stage-2 families.
    """

    family_name: ClassVar[str] = "clip"
    accepted_losses: ClassVar[tuple[type[nn.Module], ...]] = (CLIPContrastive,)
    block_classes: ClassVar[tuple[type[nn.Module], ...]] = (
        ResidualAttentionBlock,
        CustomResidualAttentionBlock,
    )

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        context_length: int = 32,
        init_seed: int = 0,
        gradient_checkpointing: bool = False,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if max_logit_scale <= 1.0:
            raise ConfigError(f"model.max_logit_scale must be > 1, got {max_logit_scale}")
        self.model_name = model_name
        self.max_logit_scale = float(max_logit_scale)
        self.clip = build_open_clip(model_name, pretrained, config, context_length, init_seed)
        if gradient_checkpointing:
            self.clip.set_grad_checkpointing(True)

    @property
    def image_size(self) -> int:
        return int(self.clip.visual.image_size[0])

    @property
    def embed_dim(self) -> int:
        return _embed_dim(self.clip)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        tokenizer = clip_tokenizer(self.model_name, int(self.clip.context_length))
        return tokenizer(list(prompts)).to(self.clip.logit_scale.device)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> [B, embed_dim], L2-normalised."""
        return self.clip.encode_text(self.tokenize(prompts), normalize=True)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1, 1] -> [B, embed_dim], L2-normalised."""
        return self.clip.encode_image(clip_preprocess(images, self.clip), normalize=True)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``image_features``, ``text_features`` (L2-normalised, [B, embed_dim]) and ``logit_scale`` (exp'd)."""
        if self.training:
            with torch.no_grad():
                self.clip.logit_scale.clamp_(0.0, math.log(self.max_logit_scale))
        images = clip_preprocess(batch["image"], self.clip)
        return self.clip(images, self.tokenize(batch["caption"]))

    @torch.no_grad()
    def pre_encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``clip_image_emb`` [B, embed_dim] (float32, L2-normalised) for stage-2 families."""
        return {"clip_image_emb": self.encode_image(images).float()}

    def frozen_copy(self) -> FrozenCLIP:
        """A frozen copy of the current CLIP (for evaluation or scoring); this family stays trainable."""
        return FrozenCLIP(copy.deepcopy(self.clip), self.model_name, has_weights=True)

    def clip_scorer(self) -> FrozenCLIP:
        """The CLIP score's scorer: a frozen copy of this CLIP (capability ``clip_scorer``)."""
        return self.frozen_copy()

    @torch.no_grad()
    def embed_images_for_retrieval(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1, 1] -> [B, embed_dim] float32, L2-normalised (capability
        ``embed_images_for_retrieval``: ``python -m t2i_train.index`` embeds an image bank with it)."""
        return self.encode_image(images).float()

    @torch.no_grad()
    def embed_prompts_for_retrieval(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> [B, embed_dim] float32, L2-normalised, in the space of ``embed_images_for_retrieval``."""
        return self.encode_text(prompts).float()

    def retrieve(self, prompts: list[str], k: int = 1, index: str | None = None) -> list[list[Any]]:
        """The ``k`` nearest images of ``index`` (a ``python -m t2i_train.index`` folder) per prompt: a list
        of ``t2i_train.retrieval.RetrievalHit`` per prompt, best first (capability ``retrieve``)."""
        from t2i_train.retrieval import retrieve  # lazy: the library layer (FAISS) only when retrieving

        return retrieve(self, prompts, k, index)
