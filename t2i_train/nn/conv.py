"""Convolutional encoder/decoder stacks shared by the VQGAN tokenizer and the diffusion VAE.

Layout (per resolution level ``i`` with ``channels = base_channels * channel_mult[i]``): ``num_res_blocks``
residual blocks, then a stride-2 down-sampling (encoder) or nearest-neighbour up-sampling (decoder) between
levels, so the down-sampling factor is ``2 ** (len(channel_mult) - 1)``. The lowest resolution has a middle
stage of two residual blocks with optional self-attention between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest number of GroupNorm groups <= ``max_groups`` that divides ``channels``."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def norm(channels: int, max_groups: int = 32) -> nn.Module:
    """GroupNorm with up to ``max_groups`` groups; ``max_groups <= 0`` means no normalisation."""
    if max_groups <= 0:
        return nn.Identity()
    return nn.GroupNorm(group_count(channels, max_groups), channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, conv3x3) twice, 1x1 shortcut when widths differ."""

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32
    ) -> None:
        super().__init__()
        self.norm1 = norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all spatial positions, residual."""

    def __init__(self, channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MiddleBlock(nn.Sequential):
    """ResBlock, optional self-attention, ResBlock at the lowest resolution."""

    def __init__(self, channels: int, attention: bool, dropout: float, norm_groups: int) -> None:
        layers: list[nn.Module] = [ResBlock(channels, channels, dropout, norm_groups)]
        if attention:
            layers.append(AttentionBlock(channels, norm_groups))
        layers.append(ResBlock(channels, channels, dropout, norm_groups))
        super().__init__(*layers)


def _check_levels(channel_mult: Sequence[int], num_res_blocks: int) -> tuple[int, ...]:
    mult = tuple(int(m) for m in channel_mult)
    if not mult or min(mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {list(channel_mult)}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    return mult


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> features [B, out_channels, H/f, W/f] with f = 2**(levels-1)."""

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        out_channels: int = 256,
        attention_at_lowest: bool = False,
        mid_block: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        mult = _check_levels(channel_mult, num_res_blocks)
        self.downsample_factor = 2 ** (len(mult) - 1)
        channels = base_channels * mult[0]
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        layers: list[nn.Module] = []
        for level, m in enumerate(mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(channels, base_channels * m, dropout, norm_groups))
                channels = base_channels * m
            if level < len(mult) - 1:
                layers.append(Downsample(channels))
        if mid_block:
            layers.append(MiddleBlock(channels, attention_at_lowest, dropout, norm_groups))
        self.blocks = nn.Sequential(*layers)
        self.norm_out = norm(channels, norm_groups)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(x))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features [B, in_channels, h, w] -> image [B, out_channels, h*f, w*f]; mirror image of ``Encoder``."""

    def __init__(
        self,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        in_channels: int = 256,
        attention_at_lowest: bool = False,
        mid_block: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        mult = _check_levels(channel_mult, num_res_blocks)
        self.upsample_factor = 2 ** (len(mult) - 1)
        channels = base_channels * mult[-1]
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        layers: list[nn.Module] = []
        if mid_block:
            layers.append(MiddleBlock(channels, attention_at_lowest, dropout, norm_groups))
        for level in reversed(range(len(mult))):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(channels, base_channels * mult[level], dropout, norm_groups))
                channels = base_channels * mult[level]
            if level > 0:
                layers.append(Upsample(channels))
        self.blocks = nn.Sequential(*layers)
        self.norm_out = norm(channels, norm_groups)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the output convolution (used by the adaptive GAN weight)."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(z))
        return self.conv_out(F.silu(self.norm_out(h)))
