"""The interface every text encoder implements (T5 here; CLIP text and causal LMs elsewhere)."""

from __future__ import annotations

import torch
from torch import nn


class TextEncoder(nn.Module):
    """Maps prompts to per-token embeddings.

    ``forward(prompts) -> (embeddings [B, L, dim] float, mask [B, L] bool)`` where ``mask`` is True on real
    tokens (False on padding, whose embeddings are zero). ``dim`` is the embedding width; it is known from the
    constructor arguments, so a family can size its layers without running (or loading) the encoder.
    """

    dim: int

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def null_condition(self, batch_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's embedding, padded (or cut) to ``length`` and repeated ``batch_size`` times.

        This is the "unconditional" input of classifier-free guidance when a family feeds the encoded empty
        string rather than zeros (open-muse does).
        """
        emb, mask = self([""])
        emb, mask = pad_condition(emb, mask, length)
        return emb.expand(batch_size, -1, -1), mask.expand(batch_size, -1)


def pad_condition(emb: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (or cut) embeddings [B, L, D] and their mask [B, L] to ``length`` tokens."""
    current = emb.shape[1]
    if current >= length:
        return emb[:, :length], mask[:, :length]
    extra = length - current
    emb = torch.cat([emb, emb.new_zeros(emb.shape[0], extra, emb.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return emb, mask
