"""KL autoencoder (stage 1 of latent diffusion): diffusers' ``AutoencoderKL``, trained or loaded by name.

The tiny default maps 32x32 shapes to 4x8x8 latents (f=4). ``pretrained`` loads any diffusers
AutoencoderKL (``stabilityai/sd-vae-ft-mse``, or a Stable Diffusion repo with ``subfolder: vae``) for real
runs; the dimensions below are then ignored.

Interface used by stage-2 families (``t2i_train.models.diffusion``): ``encode_latents`` (posterior mean or a
sample), ``decode_latents``, ``reconstruct``, ``latent_channels``, ``downsample_factor``, ``scaling_factor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from t2i_train.errors import ConfigError
from t2i_train.losses.vae import VAELoss
from t2i_train.models.base import Family
from t2i_train.models.loading import weight_loading_enabled


def build_autoencoder_kl(
    pretrained: str | None,
    subfolder: str | None,
    block_out_channels: Sequence[int],
    layers_per_block: int,
    latent_channels: int,
    norm_num_groups: int,
    mid_block_attention: bool,
    image_size: int,
) -> tuple[nn.Module, bool]:
    """(AutoencoderKL, whether pretrained weights were loaded).

    With ``pretrained`` but weight loading switched off (``t2i_train.models.loading.no_weight_loading``), only the
    named model's config is read and the architecture is built with random weights.
    """
    from diffusers import AutoencoderKL

    if pretrained:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        if weight_loading_enabled():
            return AutoencoderKL.from_pretrained(pretrained, **kwargs), True
        return AutoencoderKL.from_config(AutoencoderKL.load_config(pretrained, **kwargs)), False
    channels = [int(c) for c in block_out_channels]
    if any(c % norm_num_groups for c in channels):
        raise ConfigError(
            f"model.block_out_channels {channels} must be multiples of model.norm_num_groups={norm_num_groups}"
        )
    depth = len(channels)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=image_size,
        mid_block_add_attention=mid_block_attention,
    )
    return model, False


class VAE(Family):
    """diffusers ``AutoencoderKL`` as a family: trained with ``loss=vae`` (reconstruction + KL).

    Args:
        pretrained / subfolder: a diffusers AutoencoderKL name or directory (null: build from the dims).
        block_out_channels: encoder widths; ``len - 1`` halvings, so [32, 64, 64] is f=4.
        layers_per_block, latent_channels, norm_num_groups, mid_block_attention: the architecture.
        image_size: training resolution (recorded in the diffusers config as ``sample_size``).
        sample_posterior: train on a posterior sample (true, as Stable Diffusion) or on its mean.
    """

    family_name: ClassVar[str] = "vae"
    accepted_losses: ClassVar[tuple[type[nn.Module], ...]] = (VAELoss,)

    def __init__(
        self,
        pretrained: str | None = None,
        subfolder: str | None = None,
        block_out_channels: Sequence[int] = (32, 64, 64),
        layers_per_block: int = 1,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        mid_block_attention: bool = True,
        image_size: int = 32,
        sample_posterior: bool = True,
    ) -> None:
        super().__init__()
        self.autoencoder, self.loaded_pretrained = build_autoencoder_kl(
            pretrained,
            subfolder,
            block_out_channels,
            layers_per_block,
            latent_channels,
            norm_num_groups,
            mid_block_attention,
            image_size,
        )
        config = self.autoencoder.config
        self.latent_channels = int(config.latent_channels)
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        #: diffusers' recorded latent scale (0.18215 for Stable Diffusion's); None for a VAE trained here
        self.scaling_factor = float(config.scaling_factor) if pretrained else None
        self.sample_posterior = sample_posterior
        from diffusers.models.autoencoders.autoencoder_kl import Decoder, Encoder

        self.block_classes = (Encoder, Decoder)

    # ------------------------------------------------------------------------------------------ training
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        posterior = self.autoencoder.encode(images).latent_dist
        latents = posterior.sample() if self.sample_posterior and self.training else posterior.mode()
        reconstructions = self.autoencoder.decode(latents).sample
        return {"inputs": images, "reconstructions": reconstructions, "kl": posterior.kl()}

    # ------------------------------------------------------------------------------- stage-2 interface
    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(channels, h, w) of the latents of ``image_size``² images."""
        if image_size % self.downsample_factor:
            raise ConfigError(
                f"image size {image_size} is not divisible by the VAE downsample factor {self.downsample_factor}"
            )
        side = image_size // self.downsample_factor
        return self.latent_channels, side, side

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> unscaled latents [B, C, H/f, W/f] (posterior mean unless ``sample``)."""
        posterior = self.autoencoder.encode(images.to(self._dtype())).latent_dist
        return posterior.sample() if sample else posterior.mode()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images [B, 3, H, W] in [-1, 1]."""
        return self.autoencoder.decode(latents.to(self._dtype())).sample.clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode_latents(self.encode_latents(images))

    @torch.no_grad()
    def pre_encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``latents`` [B, C, h, w] (the posterior mean, float16) for latent diffusion."""
        return {"latents": self.encode_latents(images).to(torch.float16)}

    def _dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype
