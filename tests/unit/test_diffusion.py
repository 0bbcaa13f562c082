"""Latent diffusion (diffusers UNet + AutoencoderKL) and its losses: math, conditioning, sampling, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from t2i_train.errors import CheckpointError, ConfigError, DataError
from t2i_train.losses.diffusion_mse import DiffusionMSE, min_snr_weights
from t2i_train.losses.vae import VAELoss
from t2i_train.models.diffusion import SAMPLERS, LatentDiffusion
from t2i_train.models.vae import VAE
from t2i_train.text.t5 import T5TextEncoder

TINY_UNET = {
    "block_out_channels": [32, 32],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}


def tiny_vae() -> VAE:
    return VAE(block_out_channels=(8, 16, 16), norm_num_groups=8, image_size=16)


def tiny_diffusion(**kwargs) -> LatentDiffusion:
    torch.manual_seed(0)
    text = T5TextEncoder(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, max_length=32)
    options = {"unet": TINY_UNET, "image_size": 16, **kwargs}
    return LatentDiffusion(text_encoder=text, vae=tiny_vae(), **options)


# ------------------------------------------------------------------------------------------------ losses
def test_min_snr_weights_match_the_paper() -> None:
    snr = torch.tensor([0.5, 1.0, 5.0, 10.0])
    eps = min_snr_weights(snr, 5.0, v_prediction=False)
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 1.0, 0.5]))
    v = min_snr_weights(snr, 5.0, v_prediction=True)
    assert torch.allclose(v, torch.tensor([0.5 / 1.5, 0.5, 5 / 6, 5 / 11]))
    with pytest.raises(ValueError):
        min_snr_weights(snr, 0.0, v_prediction=False)


def test_diffusion_mse_plain_and_weighted() -> None:
    pred, target = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    snr = torch.tensor([0.1, 1.0, 10.0, 100.0])
    outputs = {"pred": pred, "target": target, "snr": snr, "v_prediction": torch.tensor(False)}
    plain = DiffusionMSE()(outputs)
    assert torch.allclose(plain["loss"], F.mse_loss(pred, target))
    weighted = DiffusionMSE(min_snr_gamma=5.0)(outputs)
    per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
    expected = (per_sample * torch.tensor([1.0, 1.0, 0.5, 0.05])).mean()
    assert torch.allclose(weighted["loss"], expected)
    assert torch.allclose(weighted["mse"], plain["loss"])


def test_vae_loss_terms() -> None:
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    kl = torch.tensor([30.0, 50.0])
    terms = VAELoss(l1_weight=1.0, l2_weight=0.5, kl_weight=0.1)(
        {"inputs": x, "reconstructions": x, "kl": kl}
    )
    assert torch.allclose(terms["loss"], torch.tensor(0.1 * 40.0 / (3 * 8 * 8)))
    assert terms["psnr"] > 90
    noisy = VAELoss()({"inputs": x, "reconstructions": x + 0.1, "kl": kl})
    assert torch.allclose(noisy["rec_l1"], torch.tensor(0.1), atol=1e-6)


# --------------------------------------------------------------------------------------------------- VAE
def test_vae_shapes_and_pre_encode() -> None:
    vae = tiny_vae().eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    assert vae.downsample_factor == 4 and vae.latent_shape(16) == (4, 4, 4)
    fields = vae.pre_encode(images)
    assert fields["latents"].shape == (3, 4, 4, 4) and fields["latents"].dtype == torch.float16
    recon = vae.reconstruct(images)
    assert recon.shape == images.shape and recon.abs().max() <= 1
    vae.train()
    out = vae({"image": images})
    assert out["kl"].shape == (3,) and out["reconstructions"].shape == images.shape
    with pytest.raises(ConfigError, match="divisible"):
        vae.latent_shape(18)


# --------------------------------------------------------------------------------------------- diffusion
def test_forward_targets_and_snr() -> None:
    model = tiny_diffusion(prediction_type="v_prediction", latent_scale=0.5)
    batch = {"latents": torch.randn(4, 4, 4, 4), "caption": ["a red circle"] * 4}
    out = model(batch)
    assert out["pred"].shape == out["target"].shape == (4, 4, 4, 4)
    assert bool(out["v_prediction"]) and (out["snr"] > 0).all()
    with pytest.raises(DataError, match="latents of shape"):
        model({"latents": torch.randn(2, 4, 8, 8), "caption": ["x", "y"]})


def test_epsilon_target_is_the_added_noise() -> None:
    """Re-derive the noise from the noised latents: x_t = √ᾱ z + √(1-ᾱ) ε must hold for the returned ε."""
    model = tiny_diffusion(latent_scale=1.0, cond_drop_prob=0.0)
    latents = torch.randn(4, 4, 4, 4)
    captured = {}
    unet_forward = model.unet.forward

    def spy(sample, timestep, **kwargs):
        captured["x_t"], captured["t"] = sample, timestep
        return unet_forward(sample, timestep, **kwargs)

    model.unet.forward = spy
    out = model({"latents": latents, "caption": ["a"] * 4})
    alpha = model.noise_scheduler.alphas_cumprod[captured["t"]].view(-1, 1, 1, 1)
    rebuilt = alpha.sqrt() * latents + (1 - alpha).sqrt() * out["target"]
    assert torch.allclose(rebuilt, captured["x_t"], atol=1e-5)
    assert torch.allclose(out["snr"], (alpha / (1 - alpha)).flatten())


def test_latent_scale_is_estimated_once_and_saved() -> None:
    model = tiny_diffusion()
    assert float(model.latent_scale) == 0.0
    latents = 4.0 * torch.randn(16, 4, 4, 4)
    model({"latents": latents, "caption": ["a"] * 16})
    scale = float(model.latent_scale)
    assert scale == pytest.approx(1 / latents.std().item(), rel=1e-4)
    model({"latents": 10 * latents, "caption": ["a"] * 16})
    assert float(model.latent_scale) == scale
    assert "latent_scale" in model.state_dict()


def test_condition_dropout_replaces_the_caption() -> None:
    model = tiny_diffusion(cond_drop_prob=1.0, latent_scale=1.0).train()
    latents = torch.randn(2, 4, 4, 4)
    preds = []
    for caption in ("a red circle", "a blue square in the top left"):
        torch.manual_seed(3)
        preds.append(model({"latents": latents, "caption": [caption] * 2})["pred"])
    assert torch.allclose(preds[0], preds[1])
    model.cond_drop_prob = 0.0
    torch.manual_seed(3)
    other = model({"latents": latents, "caption": ["a blue square in the top left"] * 2})["pred"]
    assert not torch.allclose(preds[0], other)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_generates_reproducibly(sampler: str) -> None:
    model = tiny_diffusion(latent_scale=0.7).eval()
    first = model.generate(["a red circle", "a cyan square"], steps=3, sampler=sampler, seed=1)
    again = model.generate(["a red circle", "a cyan square"], steps=3, sampler=sampler, seed=1)
    assert first.shape == (2, 3, 16, 16) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)


def test_guidance_and_negative_prompts_change_the_result() -> None:
    model = tiny_diffusion(latent_scale=0.7).eval()
    plain = model.generate_latents(["a red circle"], steps=2, guidance_scale=1.0, seed=0)
    guided = model.generate_latents(["a red circle"], steps=2, guidance_scale=5.0, seed=0)
    negative = model.generate_latents(
        ["a red circle"], steps=2, guidance_scale=5.0, seed=0, negative_prompts=["a blue square"]
    )
    assert not torch.allclose(plain, guided) and not torch.allclose(guided, negative)


def test_bad_sampling_options_are_config_errors() -> None:
    model = tiny_diffusion(latent_scale=0.7).eval()
    with pytest.raises(ConfigError, match="sampler must be one of"):
        model.generate(["a"], sampler="heun2")
    with pytest.raises(ConfigError, match="steps"):
        model.generate(["a"], steps=0)
    with pytest.raises(ConfigError, match="never trained"):
        tiny_diffusion().generate(["a"], steps=1)
    with pytest.raises(ConfigError, match="prediction_type"):
        tiny_diffusion(prediction_type="sample")


def test_missing_vae_checkpoint_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        tiny_diffusion(vae_checkpoint=str(tmp_path / "missing.ckpt"))


@pytest.mark.parametrize(("prediction_type", "ratio"), [("epsilon", 0.7), ("v_prediction", 0.9)])
def test_it_learns_a_fixed_batch(prediction_type: str, ratio: float) -> None:
    """A few dozen steps on one batch must cut the denoising loss below its starting value (v, whose target
    holds the latents themselves at high noise, comes down more slowly)."""
    model = tiny_diffusion(prediction_type=prediction_type, latent_scale=1.0, cond_drop_prob=0.0).train()
    loss_fn = DiffusionMSE(min_snr_gamma=5.0)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    latents = torch.randn(8, 4, 4, 4).sign()
    batch = {"latents": latents, "caption": [f"caption {i % 2}" for i in range(8)]}

    def average_loss(seed: int) -> float:
        torch.manual_seed(seed)
        with torch.no_grad():
            return sum(loss_fn(model(batch))["mse"].item() for _ in range(8)) / 8

    before = average_loss(0)
    for step in range(60):
        torch.manual_seed(100 + step)
        loss = loss_fn(model(batch))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = average_loss(0)
    assert after < ratio * before, (before, after)
    assert math.isfinite(after)
