"""VQGAN image tokenizer (stage 1 of Muse and CM3leon): conv encoder, vector quantizer, conv decoder.

Optional PatchGAN discriminator: when on (``use_discriminator``; the tiny YAML ties it to
``loss.adversarial_weight > 0``), the family trains with ``t2i_train.gan_task.GANTask`` (alternating D/G
updates), otherwise with the generic single-optimizer task.

Interface used by stage-2 families: ``encode_to_indices``, ``decode_indices``, ``reconstruct``,
``codebook_size``, ``downsample_factor``, ``latent_shape``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from t2i_train.errors import ConfigError
from t2i_train.losses.vqgan import VQGANLoss
from t2i_train.models.base import Family
from t2i_train.nn.conv import Decoder, Encoder, ResBlock
from t2i_train.nn.quantizer import VectorQuantizer


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al.; as used by Taming Transformers): a map of real/fake logits.

    ``layers`` stride-2 4x4 convolutions (widths ``channels * min(2**i, 8)``), one stride-1 4x4 convolution,
    then a 4x4 convolution to one logit per patch. Normalisation is BatchNorm (``norm="batch"``), GroupNorm
    or none.
    """

    def __init__(
        self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm: str = "batch"
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"disc_layers must be >= 1, got {layers}")
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"disc_norm must be batch, group or none, got {norm!r}")
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [
                nn.Conv2d(width, out, 4, stride, 1, bias=norm == "none"),
                self._norm(norm, out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        self.apply(self._init)

    @staticmethod
    def _norm(kind: str, channels: int) -> nn.Module:
        if kind == "batch":
            return nn.BatchNorm2d(channels)
        if kind == "group":
            return nn.GroupNorm(min(32, channels), channels)
        return nn.Identity()

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class VQGAN(Family):
    """Conv VQGAN. Paper size (Muse base tokenizer): f=16 via ``channel_mult=[1,1,2,2,4]``,
    ``base_channels=128``, ``num_res_blocks=2``, ``codebook_size=8192``."""

    family_name = "vqgan"
    accepted_losses = (VQGANLoss,)
    block_classes = (ResBlock,)

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        decoder_base_channels: int | None = None,
        decoder_res_blocks: int | None = None,
        z_channels: int = 256,
        attention_at_lowest: bool = False,
        mid_block: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
        codebook_size: int = 8192,
        codebook_dim: int = 256,
        beta: float = 0.25,
        l2_normalized: bool = False,
        dead_code_threshold: float = 0.03,
        restart_every: int = 100,
        usage_decay: float = 0.99,
        data_init: bool = True,
        use_discriminator: bool | float = False,
        disc_layers: int = 3,
        disc_channels: int = 64,
        disc_norm: str = "batch",
    ) -> None:
        """``use_discriminator`` is truthy-tested so a YAML can pass ``loss.adversarial_weight`` itself;
        ``decoder_*`` default to the encoder's values (Muse widens only the super-res decoder)."""
        super().__init__()
        mult = [int(m) for m in channel_mult]
        self.codebook_size = int(codebook_size)
        self.downsample_factor = 2 ** (len(mult) - 1)
        shared = dict(attention_at_lowest=attention_at_lowest, mid_block=mid_block, dropout=dropout)
        self.encoder = Encoder(
            in_channels, base_channels, mult, num_res_blocks, z_channels, norm_groups=norm_groups, **shared
        )
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)
        self.quantizer = VectorQuantizer(
            codebook_size,
            codebook_dim,
            beta,
            l2_normalized,
            dead_code_threshold,
            restart_every,
            usage_decay,
            data_init,
        )
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, 1)
        self.decoder = Decoder(
            in_channels,
            decoder_base_channels or base_channels,
            mult,
            decoder_res_blocks or num_res_blocks,
            z_channels,
            norm_groups=norm_groups,
            **shared,
        )
        self.discriminator = (
            PatchDiscriminator(in_channels, disc_channels, disc_layers, disc_norm)
            if use_discriminator
            else None
        )

    # ------------------------------------------------------------------------------------------ task glue
    @property
    def task_class(self) -> str:  # type: ignore[override]
        return "t2i_train.gan_task.GANTask" if self.discriminator is not None else "t2i_train.task.T2ITask"

    def check_loss(self, loss: nn.Module) -> None:
        super().check_loss(loss)
        weight = float(getattr(loss, "adversarial_weight", 0.0))
        if weight > 0 and self.discriminator is None:
            raise ConfigError(
                f"loss.adversarial_weight={weight} needs a discriminator: set model.use_discriminator=true"
            )
        if weight <= 0 and self.discriminator is not None:
            raise ConfigError(
                "model.use_discriminator is on but loss.adversarial_weight=0: set a positive weight "
                "or model.use_discriminator=false"
            )

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        disc = {id(p) for p in self.discriminator_parameters()}
        return (p for p in self.trainable_parameters() if id(p) not in disc)

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        if self.discriminator is None:
            return iter(())
        return (p for p in self.discriminator.parameters() if p.requires_grad)

    def discriminate(self, images: torch.Tensor) -> torch.Tensor:
        """Patch logits of the discriminator for ``images`` in [-1, 1]."""
        if self.discriminator is None:
            raise ConfigError("this VQGAN has no discriminator (model.use_discriminator=false)")
        return self.discriminator(images)

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's output convolution weight (where the adaptive GAN weight compares gradients)."""
        return self.decoder.last_layer

    # ------------------------------------------------------------------------------------------ training
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        z = self.quant_conv(self.encoder(images))
        z_q, indices, terms = self.quantizer(z)
        reconstructions = self.decoder(self.post_quant_conv(z_q))
        return {"inputs": images, "reconstructions": reconstructions, "indices": indices, **terms}

    # ------------------------------------------------------------------------------- stage-2 interface
    def latent_shape(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """Token grid (h, w) for images of ``image_size`` (an int or (H, W))."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        f = self.downsample_factor
        if h % f or w % f:
            raise ConfigError(f"image size {h}x{w} is not divisible by the VQGAN downsample factor {f}")
        return h // f, w // f

    @torch.no_grad()
    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> token ids LongTensor [B, H/f, W/f] (no statistics updated)."""
        return self.quantizer.indices(self.quant_conv(self.encoder(images)))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> images [B, 3, h*f, w*f] in [-1, 1]."""
        z_q = self.quantizer.embed(indices.long()).to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z_q)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def pre_encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``image_tokens`` [B, h, w] (int16 when the codebook fits) for Muse and other token models."""
        indices = self.encode_to_indices(images)
        dtype = torch.int16 if self.codebook_size <= torch.iinfo(torch.int16).max else torch.int32
        return {"image_tokens": indices.to(dtype)}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Encode, quantize and decode ``images`` in [-1, 1]; returns images in [-1, 1]."""
        return self.decode_indices(self.encode_to_indices(images))
