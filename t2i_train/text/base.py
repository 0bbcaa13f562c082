"""The interface every text encoder implements (T5 here; CLIP text and causal LMs elsewhere)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

Encode = Callable[[list[str]], "tuple[torch.Tensor, torch.Tensor]"]


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


class PromptCache:
    """LRU cache of a frozen text encoder's output per prompt (unpadded), reassembled into padded batches.

    A frozen encoder maps a prompt to the same embedding every step, and a dataset repeats captions (the
    shapes set has ~650 distinct ones), so caching skips most encoder calls. Only valid while the encoder's
    weights do not change: the owning encoder bypasses it in training mode or when any weight takes gradients.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def __call__(
        self, prompts: list[str], encode: Encode, pad_to: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.entries))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        found = {p: self.entries[p] for p in prompts if p in self.entries}
        if missing:
            emb, mask = encode(missing)
            for i, prompt in enumerate(missing):
                found[prompt] = emb[i, : int(mask[i].sum())]
        for prompt, value in found.items():
            self.entries[prompt] = value
            self.entries.move_to_end(prompt)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        rows = [found[p] for p in prompts]
        length = pad_to or max(1, max(r.shape[0] for r in rows))
        emb = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.bool, device=emb.device)
        for i, row in enumerate(rows):
            kept = min(row.shape[0], length)  # a row longer than pad_to is cut, as the encoder would
            emb[i, :kept] = row[:kept]
            mask[i, :kept] = True
        return emb, mask
