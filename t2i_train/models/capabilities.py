"""What a family can do, asked by generic code instead of its name (``t2i_train.models.base`` is the contract).

Generic code (sampling, evaluation, recaptioning, callbacks, recipes, tests) never checks a class name or a
``_target_`` string. It asks ``model.can("caption")`` (or ``require(model, "caption", who)``, which raises the
one-line error) and calls the method. Each protocol below is one method with the signature callers use, so a
new family gains a capability by implementing that method, with no other file edited. ``Family`` itself
defines ``generate``/``pre_encode`` that only raise, so ``isinstance`` against these protocols is not the
test for a ``Family``: ``can`` is (it checks the method is the family's own). ``capabilities(model)`` lists
them, for error messages and summaries.

| protocol | method | who implements it today |
|---|---|---|
| ``ImageGenerator`` | ``generate(prompts, **sampling) -> [B,3,H,W] in [0,1]`` | muse, diffusion, galip, gill, cm3leon |
| ``Captioner`` | ``caption(images in [-1,1], **decoding) -> list[str]`` | captioner, gill, cm3leon |
| ``Reconstructor`` | ``reconstruct(images in [-1,1]) -> images in [-1,1]`` | vqgan, vae |
| ``Interpolator`` | ``interpolate(prompts_a, prompts_b, mode, steps, seed) -> [steps,3,H,W]`` | galip |
| ``PreEncoder`` | ``pre_encode(images in [-1,1]) -> {field: tensor}`` | vqgan, vae, clip |
| ``CaptionPreEncoder`` | ``pre_encode_captions(captions) -> {field: tensor}`` | gill |
| ``ClipScorerSource`` | ``clip_scorer() -> a CLIP with encode_image / encode_text`` | galip, clip, captioner |
| ``RetrievalEmbedder`` | ``embed_images_for_retrieval(images in [-1,1])``, ``embed_prompts_for_retrieval(prompts)`` -> [B,D] (L2-normalised float32, one space) | clip |
| ``Retriever`` | ``retrieve(prompts, k=1, index=DIR) -> list[list[RetrievalHit]]`` (best first) | clip (GILL, CM3leon) |
| ``Decider`` | ``decide(prompts) -> ["retrieve" or "generate", ...]`` (one pick per prompt) | gill |

``RetrievalEmbedder`` is listed under the name ``embed_images_for_retrieval`` (what ``python -m t2i_train.index``
requires of the checkpoint it embeds an image bank with); ``retrieve`` searches such an index
(``t2i_train.retrieval``: a family's ``retrieve`` delegates to ``t2i_train.retrieval.retrieve``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from t2i_train.retrieval import RetrievalHit


@runtime_checkable
class ImageGenerator(Protocol):
    def generate(self, prompts: list[str], **sampling: Any) -> torch.Tensor: ...


@runtime_checkable
class Captioner(Protocol):
    def caption(self, images: torch.Tensor, **decoding: Any) -> list[str]: ...


@runtime_checkable
class Reconstructor(Protocol):
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Interpolator(Protocol):
    def interpolate(self, prompts_a: Any, prompts_b: Any = None, **options: Any) -> torch.Tensor: ...


@runtime_checkable
class PreEncoder(Protocol):
    def pre_encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class CaptionPreEncoder(Protocol):
    """Per-sample fields computed from the caption (GILL's generation target: a frozen text encoder's output),
    stored by ``python -m t2i_train.encode`` as ``<field>.npy`` so training runs no encoder."""

    def pre_encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class ClipScorerSource(Protocol):
    def clip_scorer(self) -> Any: ...


@runtime_checkable
class RetrievalEmbedder(Protocol):
    """Images and prompts embedded in one space: [B, D] float32, L2-normalised (inner product = cosine)."""

    def embed_images_for_retrieval(self, images: torch.Tensor) -> torch.Tensor: ...

    def embed_prompts_for_retrieval(self, prompts: list[str]) -> torch.Tensor: ...


@runtime_checkable
class Retriever(Protocol):
    """The ``k`` nearest images of an index (a folder written by ``python -m t2i_train.index``) per prompt."""

    def retrieve(
        self, prompts: list[str], k: int = 1, index: str | None = None
    ) -> list[list[RetrievalHit]]: ...


@runtime_checkable
class Decider(Protocol):
    """Per prompt, whether to ``retrieve`` an image or ``generate`` one (GILL's decision head;
    ``python -m t2i_train.sample mode=auto``)."""

    def decide(self, prompts: list[str]) -> list[str]: ...


CAPABILITIES: dict[str, type] = {
    "generate": ImageGenerator,
    "caption": Captioner,
    "reconstruct": Reconstructor,
    "interpolate": Interpolator,
    "pre_encode": PreEncoder,
    "pre_encode_captions": CaptionPreEncoder,
    "clip_scorer": ClipScorerSource,
    "embed_images_for_retrieval": RetrievalEmbedder,
    "retrieve": Retriever,
    "decide": Decider,
}


def capabilities(model: Any) -> list[str]:
    """The capability names ``model`` implements, in table order (``Family`` methods that only raise do not
    count: see ``Family.can``)."""
    can = getattr(model, "can", None)
    return [name for name in CAPABILITIES if (can(name) if callable(can) else hasattr(model, name))]


def require(model: Any, capability: str, what: str) -> None:
    """Raise ConfigError ``model=X cannot <capability> ...`` when ``model`` lacks it; ``what`` says who asked."""
    from t2i_train.errors import ConfigError

    if capability not in capabilities(model):
        name = getattr(model, "family_name", type(model).__name__)
        have = ", ".join(capabilities(model)) or "none"
        raise ConfigError(f"{what} needs a model that can {capability}; model={name} can: {have}")
