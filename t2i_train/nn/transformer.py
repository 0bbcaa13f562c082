"""Pre-norm transformer blocks shared by the token-based families (Muse, CM3leon, GILL's mapper).

Attention runs through ``F.scaled_dot_product_attention`` so the fused (flash / memory-efficient) kernels are
used where the device has them. Masks follow one convention everywhere: a boolean tensor where ``True`` means
"this key takes part" (the same convention as the text encoders' ``mask``).

Incremental decoding (a decoder-only model emitting hundreds of tokens, as CM3leon does): ``causal=True`` with a
:class:`KVCache` keeps every layer's self-attention keys and values, so each step runs only the new tokens
against all previous positions instead of the whole sequence again. ``Transformer.forward(x_new,
causal=True, cache=cache)`` after a prefill ``Transformer.forward(prompt, causal=True, cache=cache)`` gives the
outputs the uncached ``forward(cat(prompt, x_new), causal=True)`` gives at the new positions. The blocks hold no
positional encoding: a model adding positions starts the new tokens at ``cache.length`` (as
:class:`CausalTransformerLM` does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerKV:
    """One layer's cached self-attention keys and values [B, H, T, dim_head] and how many positions they hold.

    With ``max_length`` the buffers are allocated once, at the first write (shape, dtype and device of the
    keys), and each step writes its positions in place: no reallocation per token. Without it each step
    concatenates (simpler, for short or unknown lengths).
    """

    def __init__(self, max_length: int | None = None) -> None:
        self.max_length = max_length
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values [B, H, n, dim_head]; return all of them [B, H, T + n, ...]."""
        start, end = self.length, self.length + k.shape[2]
        if self.keys is not None and self.keys.shape[0] != k.shape[0]:
            raise ValueError(f"the cache holds a batch of {self.keys.shape[0]}, got {k.shape[0]} rows")
        if self.max_length is None:
            self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
            self.values = v if self.values is None else torch.cat([self.values, v], dim=2)
        else:
            if end > self.max_length:
                raise ValueError(f"the KV cache holds {self.max_length} positions; {end} were asked for")
            if self.keys is None or self.values is None:
                b, h, _, d = k.shape
                self.keys = k.new_empty(b, h, self.max_length, d)
                self.values = v.new_empty(b, h, self.max_length, v.shape[3])
            self.keys[:, :, start:end] = k
            self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Self-attention keys and values of every layer of a :class:`Transformer`, for incremental decoding.

    ``length`` is the number of positions already seen (the position of the next token). ``key_mask`` [B,
    length] (True = a real token) is kept when some forward passed a ``self_mask`` (e.g. a left-padded prompt),
    so later steps keep ignoring those padded keys.
    """

    def __init__(self, depth: int, max_length: int | None = None) -> None:
        self.layers = [LayerKV(max_length) for _ in range(depth)]
        self.max_length = max_length
        self.key_mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def extend_mask(self, new_mask: torch.Tensor | None, batch: int, new: int, device: torch.device) -> None:
        """Append the new positions' key mask [B, new] (None: all real) to ``key_mask``."""
        if new_mask is None and self.key_mask is None:
            return
        if new_mask is None:
            new_mask = torch.ones(batch, new, dtype=torch.bool, device=device)
        past = self.key_mask
        if past is None:
            past = torch.ones(batch, self.length, dtype=torch.bool, device=device)
        self.key_mask = torch.cat([past, new_mask.bool()], dim=1)


def _attention_mask(
    key_mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask broadcastable to [B, H, Lq, Lk] (True = attend), or None when nothing is masked."""
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :].bool()
    if causal:
        tril = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        mask = tril if mask is None else mask & tril
    return mask


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None, cross-attention otherwise.

    Args:
        dim: width of the queries (and of the output).
        heads: number of heads.
        dim_head: width per head (default ``dim // heads``).
        context_dim: width of the keys/values' source (default ``dim``).
        dropout: attention-probability dropout (training only).
        bias: whether the projections have biases (CM3leon uses none).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int | None = None,
        context_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        dim_head = dim_head or dim // heads
        if dim_head * heads == 0:
            raise ValueError(f"dim={dim} is too small for heads={heads}")
        inner = dim_head * heads
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_kv = nn.Linear(context_dim or dim, 2 * inner, bias=bias)
        self.to_out = nn.Linear(inner, dim, bias=bias)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        """x [B, Lq, dim]; context [B, Lk, context_dim] (defaults to x); key_mask [B, Lk] bool (True = keep).

        ``cache`` (self-attention only): the keys and values of the previous positions; x's are appended and
        the queries attend to all of them (``key_mask`` then covers all of them too, [B, cached + Lq]). With
        ``causal`` the query at cached position p sees keys 0..p.
        """
        source = x if context is None else context
        q = self._split(self.to_q(x))
        k, v = (self._split(t) for t in self.to_kv(source).chunk(2, dim=-1))
        if cache is not None:
            if context is not None:
                raise ValueError("a KV cache holds self-attention keys; cross-attention takes none")
            k, v = cache.append(k, v)
        if key_mask is None and causal and q.shape[2] == k.shape[2]:
            mask, is_causal = None, True  # lets SDPA pick its causal fast path
        elif key_mask is None and causal and q.shape[2] == 1:
            mask, is_causal = None, False  # one new query after the cache sees every key
        else:
            mask, is_causal = _attention_mask(key_mask, causal, q.shape[2], k.shape[2], x.device), False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    """Linear → GELU → dropout → Linear."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(
            nn.Linear(dim, hidden_dim, bias=bias),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim, bias=bias),
        )


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention to a context, MLP; each residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        cross_attention: bool = False,
        context_dim: int | None = None,
        dim_head: int | None = None,
        bias: bool = True,
        norm_affine: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_affine, bias=norm_affine and bias)

        self.norm_self = norm()
        self.self_attn = Attention(dim, heads, dim_head, dropout=dropout, bias=bias)
        self.norm_cross = norm() if cross_attention else None
        self.cross_attn = (
            Attention(dim, heads, dim_head, context_dim=context_dim, dropout=dropout, bias=bias)
            if cross_attention
            else None
        )
        self.norm_mlp = norm()
        self.mlp = FeedForward(dim, mlp_dim, dropout, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        self_mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: LayerKV | None = None,
    ) -> torch.Tensor:
        """``cache``: this block's self-attention keys/values of the previous positions (``self_mask`` then
        covers those and x's, [B, cached + L])."""
        x = x + self.drop(self.self_attn(self.norm_self(x), key_mask=self_mask, causal=causal, cache=cache))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block has cross-attention: pass a context")
            x = x + self.drop(self.cross_attn(self.norm_cross(x), context, key_mask=context_mask))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class Transformer(nn.Module):
    """A stack of ``TransformerBlock`` with a final norm; optional activation checkpointing.

    ``gradient_checkpointing`` recomputes each block in the backward pass (memory for compute); it only acts
    while training with gradients enabled, and never with a KV cache (which is for inference).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        cross_attention: bool = False,
        context_dim: int | None = None,
        dim_head: int | None = None,
        bias: bool = True,
        norm_affine: bool = True,
        final_norm: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim, heads, mlp_dim, dropout, cross_attention, context_dim, dim_head, bias, norm_affine
            )
            for _ in range(depth)
        )
        self.norm = (
            nn.LayerNorm(dim, elementwise_affine=norm_affine, bias=norm_affine and bias)
            if final_norm
            else nn.Identity()
        )
        self.gradient_checkpointing = gradient_checkpointing

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        self_mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x [B, L, dim] -> [B, L, dim]. ``self_mask`` [B, L]: which of x's tokens are keys (True = real).

        ``cache`` (from :meth:`new_cache`): x holds the positions after the ``cache.length`` ones already run;
        its keys/values (and ``self_mask``) are appended, and x attends to every cached position too. Use it
        with ``causal=True`` for decoding; without, x's tokens also see each other both ways (a prefill of a
        prefix attended bidirectionally).
        """
        if cache is not None:
            if len(cache.layers) != len(self.blocks):
                raise ValueError(
                    f"the cache has {len(cache.layers)} layers, the transformer {len(self.blocks)}"
                )
            cache.extend_mask(self_mask, x.shape[0], x.shape[1], x.device)
            self_mask = cache.key_mask
            for block, layer in zip(self.blocks, cache.layers, strict=True):
                x = block(x, context, context_mask, self_mask, causal, cache=layer)
            return self.norm(x)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, context, context_mask, self_mask, causal, use_reentrant=False)
            else:
                x = block(x, context, context_mask, self_mask, causal)
        return self.norm(x)

    def new_cache(self, max_length: int | None = None) -> KVCache:
        """An empty KV cache for this stack; ``max_length`` preallocates that many positions per layer."""
        return KVCache(len(self.blocks), max_length)


class CausalTransformerLM(nn.Module):
    """A decoder-only LM from these blocks: token + learned position embeddings, a causal
    :class:`Transformer`, a linear head. The base of a decoder over text + image tokens (CM3leon).

    Args:
        vocab_size: ids 0..vocab_size-1; max_length: the positions it has embeddings for.
        dim, depth, heads, mlp_dim, dropout, dim_head, bias, norm_affine: as for :class:`Transformer`.
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.0,
        dim_head: int | None = None,
        bias: bool = True,
        norm_affine: bool = True,
    ) -> None:
        super().__init__()
        self.max_length = max_length
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_length, dim)
        self.transformer = Transformer(
            dim, depth, heads, mlp_dim, dropout, dim_head=dim_head, bias=bias, norm_affine=norm_affine
        )
        self.head = nn.Linear(dim, vocab_size, bias=bias)

    def new_cache(self, max_length: int | None = None) -> KVCache:
        """An empty KV cache (``max_length`` positions preallocated; default: this LM's ``max_length``)."""
        return self.transformer.new_cache(max_length or self.max_length)

    def forward(
        self, ids: torch.Tensor, key_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """ids [B, L] -> next-token logits [B, L, vocab]. With ``cache`` the ids are positions ``cache.length``
        onwards and the cache grows by L."""
        start = cache.length if cache is not None else 0
        if start + ids.shape[1] > self.max_length:
            raise ValueError(f"positions up to {start + ids.shape[1]} exceed max_length={self.max_length}")
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.token_emb(ids) + self.pos_emb(positions)
        return self.head(self.transformer(x, self_mask=key_mask, causal=True, cache=cache))

    @torch.no_grad()
    def generate_greedy(self, ids: torch.Tensor, new_tokens: int, use_cache: bool = True) -> torch.Tensor:
        """ids [B, L] followed by ``new_tokens`` greedy (argmax) tokens: [B, L + new_tokens].

        ``use_cache``: run each new token alone against the KV cache (one position per step) instead of the
        whole sequence again; the tokens are the same.
        """
        cache = self.new_cache(ids.shape[1] + new_tokens) if use_cache else None
        out, step_input = ids, ids
        for _ in range(new_tokens):
            logits = self(step_input if use_cache else out, cache=cache)[:, -1]
            token = logits.argmax(dim=-1, keepdim=True)
            out = torch.cat([out, token], dim=1)
            step_input = token
        return out
