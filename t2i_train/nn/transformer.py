"""Pre-norm transformer blocks shared by the token-based families (Muse, CM3leon, GILL's mapper).

Attention runs through ``F.scaled_dot_product_attention`` so the fused (flash / memory-efficient) kernels are
used where the device has them. Masks follow one convention everywhere: a boolean tensor where ``True`` means
"this key takes part" (the same convention as the text encoders' ``mask``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


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
    ) -> torch.Tensor:
        """x [B, Lq, dim]; context [B, Lk, context_dim] (defaults to x); key_mask [B, Lk] bool (True = keep)."""
        source = x if context is None else context
        q = self._split(self.to_q(x))
        k, v = (self._split(t) for t in self.to_kv(source).chunk(2, dim=-1))
        if key_mask is None and causal and q.shape[2] == k.shape[2]:
            mask, is_causal = None, True  # lets SDPA pick its causal fast path
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
    ) -> torch.Tensor:
        x = x + self.drop(self.self_attn(self.norm_self(x), key_mask=self_mask, causal=causal))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block has cross-attention: pass a context")
            x = x + self.drop(self.cross_attn(self.norm_cross(x), context, key_mask=context_mask))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class Transformer(nn.Module):
    """A stack of ``TransformerBlock`` with a final norm; optional activation checkpointing.

    ``gradient_checkpointing`` recomputes each block in the backward pass (memory for compute); it only acts
    while training with gradients enabled.
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
    ) -> torch.Tensor:
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, context, context_mask, self_mask, causal, use_reentrant=False)
            else:
                x = block(x, context, context_mask, self_mask, causal)
        return self.norm(x)
