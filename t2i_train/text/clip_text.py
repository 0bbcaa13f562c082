"""A frozen CLIP text tower (transformers ``CLIPTextModel``) as a ``TextEncoder``: Stable Diffusion's text space.

Stable Diffusion 1.x reads all 77 positions of its CLIP text encoder's last hidden state: prompts are padded
to 77 with the end token and nothing is masked. This encoder returns exactly that (mask all True), so a family
that learns into SD's text space (GILL's mapper) trains against what SD's UNet reads.

``pretrained`` (e.g. ``runwayml/stable-diffusion-v1-5`` with ``subfolder: text_encoder``) loads the weights;
without it (or with weight loading off, as in the meta-device summary) the architecture is built from the
arguments (SD-1.5's by default: width 768, 12 layers, 12 heads, FFN 3072). The tokenizer is CLIP's BPE, which
``clip_bpe`` rebuilds offline (the same 49,408 ids as SD's tokenizer).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from t2i_train.models.loading import weight_loading_enabled
from t2i_train.text.base import TextEncoder
from t2i_train.text.clip_bpe import VOCAB_SIZE, clip_bpe_tokenizer


class CLIPTextEncoder(TextEncoder):
    """Prompts -> CLIP text hidden states [B, max_length, width], every position real (SD's convention)."""

    def __init__(
        self,
        pretrained: str | None = None,
        subfolder: str | None = None,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        max_length: int = 77,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        self.max_length = max_length
        #: True when the weights came from ``from_pretrained`` (left out of training checkpoints)
        self.loaded_pretrained = bool(pretrained and weight_loading_enabled())
        if self.loaded_pretrained:
            options = {"subfolder": subfolder} if subfolder else {}
            self.model = CLIPTextModel.from_pretrained(pretrained, **options)
        else:
            config = CLIPTextConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=hidden_size,
                num_hidden_layers=num_hidden_layers,
                num_attention_heads=num_attention_heads,
                intermediate_size=intermediate_size,
                max_position_embeddings=max_length,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                self.model = CLIPTextModel(config)
        self.model.eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)

    @property
    def tokenizer(self) -> Any:
        return clip_bpe_tokenizer()

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )["input_ids"].to(self.device)
        hidden = self.model(input_ids=ids).last_hidden_state.float()
        return hidden, torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
