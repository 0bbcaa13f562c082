"""CLIP score (Hessel et al. 2021, torchmetrics' ``CLIPScore`` convention): 100 · max(cos(E_I, E_T), 0).

torchmetrics' class only takes Hugging Face CLIP models; this one scores with an open_clip CLIP through
``t2i_train.models.clip.FrozenCLIP``: a CLIP trained here (``model=clip`` checkpoint or export folder) or a
pretrained open_clip one (``load_scorer("open_clip:ViT-B-32/openai")``, which downloads the weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from t2i_train.errors import ConfigError
from t2i_train.models.clip import FrozenCLIP, frozen_clip_from_checkpoint, load_frozen_clip

OPEN_CLIP_PREFIX = "open_clip:"


@torch.no_grad()
def clip_score(
    images: torch.Tensor, prompts: list[str], clip: FrozenCLIP, batch_size: int = 256
) -> torch.Tensor:
    """Per-image CLIP score [B] (float32, CPU, in [0, 100]) of images [B,3,H,W] in [0, 1] against their prompts.

    Each image is scored on its own (resized to the CLIP's input size), so a score does not depend on the
    rest of the batch; ``batch_size`` only bounds memory.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    device = clip.model.logit_scale.device
    scores = []
    for start in range(0, len(prompts), batch_size):
        chunk = images[start : start + batch_size].to(device)
        image_emb = clip.encode_image(chunk.float() * 2.0 - 1.0).float()
        text_emb = clip.encode_text(list(prompts[start : start + batch_size])).float()
        cosine = (image_emb * text_emb).sum(dim=-1)
        scores.append(100.0 * cosine.clamp_min(0.0))
    return torch.cat(scores).cpu()


def load_scorer(spec: str, device: str | torch.device = "cpu") -> FrozenCLIP:
    """A frozen CLIP from ``spec``: a ``model=clip`` .ckpt / export folder, or ``open_clip:NAME/TAG``
    (e.g. ``open_clip:ViT-B-32/openai``; downloads the pretrained weights)."""
    if spec.startswith(OPEN_CLIP_PREFIX):
        name, _, tag = spec[len(OPEN_CLIP_PREFIX) :].partition("/")
        if not name or not tag:
            raise ConfigError(
                f"scorer {spec!r}: write open_clip:NAME/TAG, e.g. open_clip:ViT-B-32/openai "
                "(a CLIP without pretrained weights would score noise)"
            )
        clip = load_frozen_clip(model_name=name, pretrained=tag)
    elif Path(spec).expanduser().exists():
        clip = frozen_clip_from_checkpoint(str(Path(spec).expanduser()))
    else:
        raise ConfigError(
            f"scorer {spec!r} is neither a clip checkpoint / export folder nor open_clip:NAME/TAG"
        )
    return clip.to(device)
