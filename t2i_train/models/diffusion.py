"""Latent diffusion (the image model of DALL-E 3 in miniature): a text-conditioned diffusers UNet over the
latents of a frozen KL autoencoder (``t2i_train.models.vae``), conditioned on a frozen T5 as in Muse.

Training: latents z (pre-encoded ``latents`` or the VAE's posterior mean) are scaled by ``latent_scale``,
noised at a uniform timestep t with diffusers' DDPM forward process, and the UNet predicts ε or
v = √ᾱ_t ε - √(1-ᾱ_t) z (``prediction_type``); ``loss=diffusion_mse`` (optional min-SNR weighting). The text
condition is replaced by the encoded empty prompt for ``cond_drop_prob`` of the samples so classifier-free
guidance works.

Sampling: any diffusers scheduler built from the training noise schedule (``sampler=ddim|dpm_solver|...``)
for ``steps`` steps with CFG ``uncond + s·(cond - uncond)`` (``negative_prompts`` replace uncond).

``latent_scale`` (z·scale has unit variance; 0.18215 for Stable Diffusion's VAE) is taken from the VAE's
diffusers config when it has one, from ``latent_scale`` when set, else estimated as 1/std of the first
training batch's latents (averaged over ranks) and stored in the checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from t2i_train.errors import ConfigError, DataError
from t2i_train.losses.diffusion_mse import DiffusionMSE
from t2i_train.models.base import Family
from t2i_train.models.loading import weight_loading_enabled
from t2i_train.models.stage1 import attach_stage1, warn_random_stage1
from t2i_train.nn.guidance import apply_cfg
from t2i_train.text.base import TextEncoder, pad_condition

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
#: sampler name -> diffusers scheduler class and extra config
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False, "steps_offset": 1}),
    "dpm_solver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def build_unet(
    pretrained: str | None, subfolder: str | None, config: dict[str, Any]
) -> tuple[nn.Module, bool]:
    """(UNet2DConditionModel, whether pretrained weights were loaded); see ``build_autoencoder_kl``."""
    from diffusers import UNet2DConditionModel

    if pretrained:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        if weight_loading_enabled():
            return UNet2DConditionModel.from_pretrained(pretrained, **kwargs), True
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(pretrained, **kwargs)), False
    try:
        return UNet2DConditionModel(**config), False
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.unet does not describe a UNet2DConditionModel: {exc}") from exc


def build_sampler(name: str, train_config: Any) -> Any:
    """A diffusers sampling scheduler sharing the training noise schedule (betas, prediction type)."""
    import diffusers

    if name not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    class_name, extra = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(train_config, **extra)


class LatentDiffusion(Family):
    """Text-conditioned UNet over frozen-VAE latents.

    Args:
        text_encoder: frozen ``TextEncoder`` (T5); a trainable linear + LayerNorm maps it to the UNet's
            ``cross_attention_dim``.
        vae: frozen ``t2i_train.models.vae.VAE``; ``vae_checkpoint`` (a ``model=vae`` checkpoint or export)
            fills it with trained weights (only while weight loading is enabled).
        unet: ``UNet2DConditionModel`` keyword arguments (ignored with ``unet_pretrained``).
        unet_pretrained / unet_subfolder: a diffusers UNet name or directory (e.g. a Stable Diffusion repo
            with ``unet``) to fine-tune.
        noise_schedule: ``DDPMScheduler`` keyword arguments (num_train_timesteps, beta_schedule, ...).
        prediction_type: ``epsilon`` or ``v_prediction``.
        image_size: image side in pixels; the latent side is image_size / the VAE's f.
        cond_drop_prob: fraction of training samples trained without their caption (for CFG).
        latent_scale: fixed latent scale (null: the VAE's, else estimated from the first batch).
    """

    family_name: ClassVar[str] = "diffusion"
    accepted_losses: ClassVar[tuple[type[nn.Module], ...]] = (DiffusionMSE,)
    external_paths: ClassVar[tuple[str, ...]] = ("vae_checkpoint",)

    def __init__(
        self,
        text_encoder: TextEncoder,
        vae: nn.Module,
        unet: dict[str, Any] | None = None,
        vae_checkpoint: str | None = None,
        unet_pretrained: str | None = None,
        unet_subfolder: str | None = None,
        noise_schedule: dict[str, Any] | None = None,
        prediction_type: str = "epsilon",
        image_size: int = 32,
        cond_drop_prob: float = 0.1,
        latent_scale: float | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"model.prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
            )
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ConfigError(f"model.cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        self.text_encoder = text_encoder
        self.vae = vae
        self.vae_checkpoint = vae_checkpoint
        vae_pretrained = bool(getattr(vae, "loaded_pretrained", False))
        self.register_buffer("vae_trained", torch.tensor(vae_pretrained))
        self.freeze("text_encoder", external=bool(getattr(text_encoder, "loaded_pretrained", False)))
        if attach_stage1(
            self,
            "vae",
            vae_checkpoint,
            option="vae_checkpoint",
            kind="VAE",
            strict=True,
            from_source=vae_pretrained,
        ):
            self.vae_trained.fill_(True)

        channels, side, _ = vae.latent_shape(image_size)
        self.image_size, self.latent_channels, self.latent_side = image_size, channels, side
        self.unet, _ = build_unet(
            unet_pretrained, unet_subfolder, self._unet_config(unet or {}, channels, side)
        )
        if int(self.unet.config.in_channels) != channels or int(self.unet.config.out_channels) != channels:
            raise ConfigError(
                f"the UNet takes {self.unet.config.in_channels} channels but the VAE's latents have {channels}"
            )
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        cross_dim = int(self.unet.config.cross_attention_dim)
        self.text_proj = nn.Linear(text_encoder.dim, cross_dim)
        self.text_norm = nn.LayerNorm(cross_dim)

        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler(**(noise_schedule or {}), prediction_type=prediction_type)
        self.prediction_type = prediction_type
        self.cond_drop_prob = cond_drop_prob
        fixed = latent_scale if latent_scale is not None else getattr(vae, "scaling_factor", None)
        # 0 = not known yet: estimated from the first training batch
        self.register_buffer("latent_scale", torch.tensor(float(fixed or 0.0)))
        from diffusers.models.unets.unet_2d_blocks import (
            CrossAttnDownBlock2D,
            CrossAttnUpBlock2D,
            DownBlock2D,
            UNetMidBlock2DCrossAttn,
            UpBlock2D,
        )

        self.block_classes = (
            CrossAttnDownBlock2D,
            DownBlock2D,
            UNetMidBlock2DCrossAttn,
            CrossAttnUpBlock2D,
            UpBlock2D,
        )

    @staticmethod
    def _unet_config(config: dict[str, Any], channels: int, side: int) -> dict[str, Any]:
        """Fill in what follows from the VAE (latent channels and side) unless the config sets it."""
        config = {key: (list(v) if isinstance(v, (list, tuple)) else v) for key, v in dict(config).items()}
        config.setdefault("in_channels", channels)
        config.setdefault("out_channels", channels)
        config.setdefault("sample_size", side)
        return config

    # ----------------------------------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder(list(prompts))

    def condition(self, text_emb: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Frozen-encoder embeddings [B, L, D] -> the UNet's cross-attention input [B, L, cross_dim].

        Padding positions are zeroed: cross-attention masks them, but a pooled text embedding
        (``unet.addition_embed_type: text``, added to the timestep embedding) reads every position.
        """
        context = self.text_norm(self.text_proj(text_emb.to(self.text_proj.weight.dtype)))
        return context * text_mask[..., None].to(context.dtype)

    def null_condition(self, batch_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.text_encoder.null_condition(batch_size, length)

    def latents_of(self, batch: dict[str, Any]) -> torch.Tensor:
        """Unscaled latents [B, C, h, w] of a batch: its pre-encoded ``latents`` or the VAE's encoding."""
        if "latents" in batch:
            latents = torch.as_tensor(batch["latents"]).to(self.text_proj.weight.device).float()
        else:
            self._warn_if_untrained_vae()
            latents = self.vae.encode_latents(batch["image"]).float()
        expected = (self.latent_channels, self.latent_side, self.latent_side)
        if tuple(latents.shape[1:]) != expected:
            raise DataError(
                f"diffusion expects latents of shape {expected} (image_size={self.image_size}) but got "
                f"{tuple(latents.shape[1:])}; match data resolution, model.image_size and the VAE"
            )
        return latents

    def _scale(self, latents: torch.Tensor) -> torch.Tensor:
        if float(self.latent_scale) == 0.0:
            self._estimate_latent_scale(latents)
        return latents * self.latent_scale

    @torch.no_grad()
    def _estimate_latent_scale(self, latents: torch.Tensor) -> None:
        std = latents.float().std()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(std)
            std /= torch.distributed.get_world_size()
        self.latent_scale.fill_(1.0 / float(std.clamp_min(1e-6)))
        log.info("latent_scale estimated from the first batch: %.5f", float(self.latent_scale))

    # ------------------------------------------------------------------------------------------ training
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``pred`` and ``target`` [B, C, h, w], ``snr`` [B], ``v_prediction`` (for ``loss=diffusion_mse``)."""
        latents = self._scale(self.latents_of(batch))
        text_emb, text_mask = self._batch_condition(batch)
        batch_size = latents.shape[0]
        if self.training and self.cond_drop_prob > 0:
            drop = torch.rand(batch_size, device=latents.device) < self.cond_drop_prob
            null_emb, null_mask = self.null_condition(batch_size, text_emb.shape[1])
            text_emb = torch.where(drop[:, None, None], null_emb.to(text_emb.dtype), text_emb)
            text_mask = torch.where(drop[:, None], null_mask, text_mask.bool())
        schedule = self.noise_scheduler
        timesteps = torch.randint(
            0, schedule.config.num_train_timesteps, (batch_size,), device=latents.device
        )
        noise = torch.randn_like(latents)
        noisy = schedule.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = schedule.get_velocity(latents, noise, timesteps)
        pred = self.unet(
            noisy,
            timesteps,
            encoder_hidden_states=self.condition(text_emb, text_mask),
            encoder_attention_mask=text_mask,
        ).sample
        alphas = schedule.alphas_cumprod.to(latents.device)[timesteps]
        return {
            "pred": pred,
            "target": target,
            "snr": alphas / (1 - alphas),
            "v_prediction": torch.tensor(self.prediction_type == "v_prediction"),
        }

    def _batch_condition(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "text_emb" not in batch:
            return self.encode_text(batch["caption"])
        emb = batch["text_emb"]
        mask = batch.get("text_mask")
        if mask is None:
            mask = torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)
        return emb, mask.bool()

    def _warn_if_untrained_vae(self) -> None:
        if self.training and not bool(self.vae_trained):
            warn_random_stage1(
                self,
                "vae",
                "DIFFUSION IS TRAINING ON THE LATENTS OF A RANDOMLY INITIALISED VAE: set model.vae_checkpoint=<vae "
                ".ckpt> (train one with model=vae) or feed pre-encoded latents; generated images will be noise",
            )

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        steps: int = 25,
        guidance_scale: float = 4.0,
        sampler: str = "ddim",
        eta: float = 0.0,
        seed: int | None = None,
        negative_prompts: list[str] | None = None,
        generator: torch.Generator | None = None,
        condition: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from ``steps`` steps of ``sampler`` with CFG ``guidance_scale``.

        ``condition``: text-encoder-space embeddings [B, L, dim] and mask [B, L] to draw from instead of the
        prompts' encoding (GILL's mapper writes into that space); the prompts then only count the images.
        """
        latents = self.generate_latents(
            prompts, steps, guidance_scale, sampler, eta, seed, negative_prompts, generator, condition
        )
        images = self.vae.decode_latents(latents / self.latent_scale)
        return ((images.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def generate_latents(
        self,
        prompts: list[str],
        steps: int = 25,
        guidance_scale: float = 4.0,
        sampler: str = "ddim",
        eta: float = 0.0,
        seed: int | None = None,
        negative_prompts: list[str] | None = None,
        generator: torch.Generator | None = None,
        condition: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Scaled latents [B, C, h, w] (divide by ``latent_scale`` before decoding)."""
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        if float(self.latent_scale) == 0.0:
            raise ConfigError("this diffusion model was never trained (latent_scale unknown); train it first")
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        scheduler = build_sampler(sampler, self.noise_scheduler.config)
        scheduler.set_timesteps(steps)
        device = self.text_proj.weight.device
        use_cfg = guidance_scale != 1.0 or negative_prompts is not None
        context, mask = self._sampling_condition(list(prompts), negative_prompts, use_cfg, condition)
        if generator is None and seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(seed)
        shape = (len(prompts), self.latent_channels, self.latent_side, self.latent_side)
        x = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler, generator, eta)
        for t in scheduler.timesteps:
            inputs = torch.cat([x, x]) if use_cfg else x
            inputs = scheduler.scale_model_input(inputs, t)
            pred = self.unet(inputs, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
            if use_cfg:
                cond, uncond = pred.chunk(2)
                pred = apply_cfg(cond, uncond, guidance_scale)
            x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
        return x

    def _sampling_condition(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None,
        use_cfg: bool,
        condition: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention input and mask of the conditional stream, followed (with CFG) by the unconditional."""
        if condition is not None:
            emb, mask = (
                condition[0].to(self.text_proj.weight.device),
                condition[1].to(self.text_proj.weight.device),
            )
            if emb.shape[0] != len(prompts) or emb.shape[-1] != self.text_encoder.dim:
                raise ConfigError(
                    f"condition embeddings {tuple(emb.shape)} do not fit {len(prompts)} prompts of this model's "
                    f"text space (width {self.text_encoder.dim})"
                )
            mask = mask.bool()
        else:
            emb, mask = self.encode_text(prompts)
        if use_cfg:
            if negative_prompts is not None:
                neg_emb, neg_mask = self.encode_text(negative_prompts)
            else:
                neg_emb, neg_mask = self.null_condition(len(prompts), emb.shape[1])
            length = max(emb.shape[1], neg_emb.shape[1])
            emb, mask = pad_condition(emb, mask, length)
            neg_emb, neg_mask = pad_condition(neg_emb.to(emb.dtype), neg_mask, length)
            emb, mask = torch.cat([emb, neg_emb]), torch.cat([mask, neg_mask])
        return self.condition(emb, mask), mask


def _step_kwargs(scheduler: Any, generator: torch.Generator | None, eta: float) -> dict[str, Any]:
    """The optional ``step()`` arguments this scheduler takes (they differ between diffusers schedulers)."""
    import inspect

    accepted = inspect.signature(scheduler.step).parameters
    options = {"generator": generator, "eta": eta}
    return {name: value for name, value in options.items() if name in accepted}
