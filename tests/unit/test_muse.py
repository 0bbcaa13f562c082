"""Muse base stage on a tiny config: forward/backward, condition dropout, generation, stage-1 loading."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from t2i_train.errors import ConfigError, DataError
from t2i_train.losses.base import Loss
from t2i_train.losses.masked_ce import MaskedCrossEntropy
from t2i_train.models.loading import no_weight_loading
from t2i_train.models.muse import Muse
from t2i_train.nn.transformer import Transformer
from t2i_train.text.t5 import T5TextEncoder

CAPTIONS = ["a red circle in the top left", "a blue square in the center", "a cyan triangle in the bottom"]


class TinyVQ(nn.Module):
    """Stand-in VQ tokenizer with the VQGAN interface Muse relies on (real conv layers and a codebook)."""

    def __init__(self, codebook_size: int = 32, downsample_factor: int = 4, channels: int = 8) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.downsample_factor = downsample_factor
        f = downsample_factor
        self.encoder = nn.Conv2d(3, channels, f, stride=f)
        self.codebook = nn.Embedding(codebook_size, channels)
        self.decoder = nn.ConvTranspose2d(channels, 3, f, stride=f)

    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        z = self.encoder(images).permute(0, 2, 3, 1)  # [B, h, w, C]
        distances = (z[..., None, :] - self.codebook.weight).pow(2).sum(-1)
        return distances.argmin(-1)

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.decoder(self.codebook(idx).permute(0, 3, 1, 2)))


def test_transformer_masks() -> None:
    """Shared blocks (also used by CM3leon/GILL): key padding and causal masks hide what they should."""
    torch.manual_seed(0)
    net = Transformer(16, 2, 2, 32, cross_attention=True, context_dim=8).eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 4, 8)
    keep = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = net(x, ctx, keep)
    ctx2 = ctx.clone()
    ctx2[0, 2:] += 10.0  # only padded keys of row 0 change
    assert torch.allclose(net(x, ctx2, keep), out, atol=1e-6)
    assert not torch.allclose(net(x, ctx2), net(x, ctx), atol=1e-3)
    causal = net(x, ctx, causal=True)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(2, 2, 16)  # the future of positions 0..2
    later = net(x2, ctx, causal=True)
    assert torch.allclose(later[:, :3], causal[:, :3], atol=1e-6)
    assert not torch.allclose(later[:, 3:], causal[:, 3:], atol=1e-3)


def tiny_muse(**overrides: object) -> Muse:
    torch.manual_seed(0)
    args = dict(
        text_encoder=T5TextEncoder(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16),
        image_tokenizer=TinyVQ(),
        image_size=16,
        dim=32,
        depth=2,
        heads=2,
        mlp_dim=64,
    )
    args.update(overrides)
    return Muse(**args)


def batch(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, "caption": CAPTIONS[:n]}


def test_forward_backward_shapes_and_frozen_parts() -> None:
    model = tiny_muse()
    model.train()
    assert not model.text_encoder.training and not model.image_tokenizer.training
    out = model(batch())
    assert out["logits"].shape == (3, 16, 32)
    assert out["targets"].shape == (3, 16) and out["mask"].shape == (3, 16)
    assert out["mask"].dtype == torch.bool and (out["mask"].sum(1) >= 1).all()
    assert torch.equal(out["targets"], model.encode_images(batch()["image"]))
    terms = MaskedCrossEntropy()(out)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    trainable = dict(model.named_trainable_parameters())
    assert not any(n.startswith(("text_encoder.", "image_tokenizer.")) for n in trainable)
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert all(p.grad is None for p in model.image_tokenizer.parameters())
    for name in ("token_emb.weight", "row_emb", "col_emb", "text_proj.weight", "head.weight"):
        assert trainable[name].grad is not None and trainable[name].grad.abs().sum() > 0, name


def test_masked_inputs_reach_the_transformer() -> None:
    """Logits at a masked position must not depend on the hidden true token there."""
    model = tiny_muse(cond_drop_prob=0.0).eval()
    text, text_mask = model.encode_text(CAPTIONS[:1])
    tokens = torch.randint(0, 32, (1, 16))
    masked = tokens.clone()
    masked[0, 5] = model.mask_token_id
    other = tokens.clone()
    other[0, 5] = (tokens[0, 5] + 1) % 32
    assert not torch.allclose(model.logits(masked, text, text_mask), model.logits(other, text, text_mask))


def test_pre_encoded_tokens_and_size_check() -> None:
    model = tiny_muse()
    tokens = torch.randint(0, 32, (2, 4, 4))
    out = model({"image_tokens": tokens, "caption": CAPTIONS[:2]})
    assert torch.equal(out["targets"], tokens.view(2, 16))
    with pytest.raises(DataError, match="16 image tokens"):
        model({"image_tokens": torch.randint(0, 32, (2, 8, 8)), "caption": CAPTIONS[:2]})


def test_condition_drop_rate() -> None:
    model = tiny_muse(cond_drop_prob=0.1)
    torch.manual_seed(0)
    rate = model.sample_condition_drop(50_000).float().mean().item()
    assert rate == pytest.approx(0.1, abs=0.006)
    assert not tiny_muse(cond_drop_prob=0.0).sample_condition_drop(1000).any()


def _forward_logits(model: Muse, captions: list[str], seed: int = 5) -> torch.Tensor:
    torch.manual_seed(seed)
    return model({"image": batch(len(captions))["image"], "caption": captions})["logits"]


def test_dropped_condition_is_the_empty_prompt() -> None:
    model = tiny_muse(cond_drop_prob=1.0, cond_drop_mode="empty").train()
    never = tiny_muse(cond_drop_prob=1e-12).train()  # same weights and RNG use, never drops
    dropped = _forward_logits(model, CAPTIONS)
    assert torch.allclose(dropped, _forward_logits(never, ["", "", ""]), atol=1e-5)
    conditional = _forward_logits(never, CAPTIONS)
    assert not torch.allclose(dropped, conditional, atol=1e-3)
    # eval mode never drops the condition
    model.eval(), never.eval()
    assert torch.allclose(_forward_logits(model, CAPTIONS), _forward_logits(never, CAPTIONS), atol=1e-5)


def test_zero_mode_differs_from_empty_mode() -> None:
    zero = tiny_muse(cond_drop_prob=1.0, cond_drop_mode="zero").train()
    emb, mask = zero.null_condition(2, 7)
    assert torch.count_nonzero(emb) == 0 and mask[:, 0].all() and not mask[:, 1:].any()
    empty = tiny_muse(cond_drop_prob=1.0, cond_drop_mode="empty").train()
    assert not torch.allclose(_forward_logits(zero, CAPTIONS), _forward_logits(empty, CAPTIONS), atol=1e-4)
    with pytest.raises(ConfigError):
        tiny_muse(cond_drop_mode="none")


def test_generate_shape_range_and_seed_determinism() -> None:
    model = tiny_muse().train()
    images = model.generate(CAPTIONS[:2], steps=4, seed=0)
    assert model.training  # restored after sampling
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, model.generate(CAPTIONS[:2], steps=4, seed=0))
    assert not torch.equal(images, model.generate(CAPTIONS[:2], steps=4, seed=1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(images, model.generate(CAPTIONS[:2], steps=4, generator=g))
    for schedule in ("constant", "cosine"):
        out = model.generate(CAPTIONS[:1], steps=3, guidance_scale=1.0, guidance_schedule=schedule, seed=0)
        assert out.shape == (1, 3, 16, 16)
    negative = model.generate(CAPTIONS[:2], steps=4, seed=0, negative_prompts=["a green circle"] * 2)
    assert not torch.equal(images, negative)
    with pytest.raises(ValueError, match="exceeds"):
        model.generate(CAPTIONS[:1], steps=17)
    with pytest.raises(ConfigError):
        model.generate(CAPTIONS[:1], guidance_schedule="exp")


def test_generation_fills_every_token_with_a_codebook_entry() -> None:
    model = tiny_muse().eval()
    tokens = model.generate_tokens(CAPTIONS, steps=5, guidance_scale=2.0, seed=0)
    assert tokens.shape == (3, 16)
    assert tokens.min() >= 0 and tokens.max() < model.codebook_size  # no [MASK] left


def test_top_k_and_sample_temperature() -> None:
    model = tiny_muse().eval()

    def tokens(seed: int, **options: object) -> torch.Tensor:
        return model.generate_tokens(CAPTIONS, steps=4, temperature=0.0, seed=seed, **options)

    # top-1 without confidence noise is greedy decoding: the seed no longer matters
    assert torch.equal(tokens(0, top_k=1), tokens(1, top_k=1))
    assert torch.equal(tokens(0, sample_temperature=1e-4), tokens(1, top_k=1))
    assert not torch.equal(tokens(0), tokens(1))
    with pytest.raises(ConfigError):
        tokens(0, sample_temperature=0.0)


def test_loss_compatibility() -> None:
    model = tiny_muse()
    model.check_loss(MaskedCrossEntropy())

    class Other(Loss):
        config_name = "other"

    with pytest.raises(ConfigError, match="masked_ce"):
        model.check_loss(Other())


def test_image_tokenizer_checkpoint_is_loaded(tmp_path: Path) -> None:
    stage1 = TinyVQ()
    path = tmp_path / "vq.ckpt"
    config = {"model": {"_target_": f"{__name__}.TinyVQ", "codebook_size": 32, "downsample_factor": 4}}
    state = {f"model.{k}": v for k, v in stage1.state_dict().items()}
    torch.save({"t2i_config": config, "state_dict": state}, path)

    model = tiny_muse(image_tokenizer_checkpoint=str(path))
    assert torch.equal(model.image_tokenizer.codebook.weight, stage1.codebook.weight)
    assert bool(model.image_tokenizer_trained)
    assert not model.image_tokenizer.training and not any(
        p.requires_grad for p in model.image_tokenizer.parameters()
    )
    with no_weight_loading():
        untouched = tiny_muse(image_tokenizer_checkpoint=str(path))
    assert not torch.equal(untouched.image_tokenizer.codebook.weight, stage1.codebook.weight)
    with pytest.raises(
        ConfigError, match=r"image_tokenizer_checkpoint .* does not fit model\.image_tokenizer"
    ):
        tiny_muse(image_tokenizer=TinyVQ(codebook_size=64), image_tokenizer_checkpoint=str(path))


def test_warns_once_when_training_on_an_untrained_image_tokenizer() -> None:
    model = tiny_muse().train()
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED IMAGE TOKENIZER"):
        model(batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(batch())  # once per instance
    trained = tiny_muse().train()
    trained.image_tokenizer_trained.fill_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained(batch())


def test_paper_size_on_meta() -> None:
    """Muse-3B: 48 layers, d=2048, MLP 8192, T5-XXL, f=16 codebook 8192 at 256²: "3B" ± 10%."""
    with no_weight_loading(), torch.device("meta"):
        text = T5TextEncoder(
            pretrained="google/t5-v1_1-xxl",
            d_model=4096,
            d_ff=10240,
            num_layers=24,
            num_heads=64,
            d_kv=64,
            vocab_size=32128,
        )
        model = Muse(text, TinyVQ(8192, 16), image_size=256, dim=2048, depth=48, heads=32, mlp_dim=8192)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert 3.0e9 <= trainable <= 3.6e9
    assert model.num_tokens == 256 and model.mask_token_id == 8192


def test_learns_a_prompt_to_token_mapping() -> None:
    """Four prompts, four fixed token grids: after a short training run each prompt decodes to its grid.

    Guards the whole conditioning path (text encoder → projection → cross-attention → masked prediction →
    parallel decoding with guidance). A model that ignores the text samples one of the four grids at
    random, so it passes eight decodes (two seeds) only by luck.
    """
    torch.set_num_threads(1)
    model = tiny_muse(cond_drop_prob=0.1)
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 32, (4, 16), generator=gen)
    prompts = [*CAPTIONS, "a green square in the right"]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    loss_fn = MaskedCrossEntropy(label_smoothing=0.0)
    model.train()
    for _ in range(150):
        pick = torch.randint(0, 4, (16,), generator=gen)
        batch = {"image_tokens": targets[pick], "caption": [prompts[i] for i in pick.tolist()]}
        loss = loss_fn(model(batch))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    decoded = [
        model.generate_tokens(prompts, steps=4, guidance_scale=2.0, guidance_schedule="constant", seed=seed)
        for seed in (1, 2)
    ]
    # text-blind: ~0.27 (one grid in four, plus chance agreements); trained: ~0.9
    assert (torch.stack(decoded) == targets).float().mean() > 0.7
