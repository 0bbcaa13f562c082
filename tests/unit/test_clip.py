"""The clip family, its contrastive loss, the frozen CLIP loader and the CLIP score (open_clip underneath)."""

from __future__ import annotations

import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from t2i_train.errors import ConfigError
from t2i_train.losses.clip_contrastive import CLIPContrastive
from t2i_train.losses.masked_ce import MaskedCrossEntropy
from t2i_train.metrics.clip_score import clip_score, load_scorer
from t2i_train.models.clip import (
    CLIPFamily,
    FrozenCLIP,
    build_open_clip,
    clip_tokenizer,
    frozen_clip_from_checkpoint,
    load_frozen_clip,
)
from t2i_train.models.loading import no_weight_loading

CAPTIONS = [
    "a red circle in the top left",
    "a blue square in the center",
    "a green triangle in the bottom right",
    "a yellow circle in the right",
    "a purple square in the top",
    "a cyan triangle in the left",
    "a red triangle in the bottom",
    "a blue circle in the top right",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: many small ops, which a second thread only slows down on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------- building
def test_tiny_clip_builds_fast_and_identically_from_its_seed() -> None:
    start = time.perf_counter()
    model = build_open_clip()
    assert time.perf_counter() - start < 1.0
    assert isinstance(model, open_clip.CLIP)
    assert tuple(model.visual.image_size) == (32, 32) and model.visual.grid_size == (4, 4)
    assert len(model.visual.transformer.resblocks) == 4 and model.context_length == 32
    assert _same_weights(model, build_open_clip())
    assert not _same_weights(model, build_open_clip(init_seed=1))


def test_dict_config_and_tokenizer() -> None:
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    model = build_open_clip(config=config, context_length=12)
    assert model.context_length == 12
    tokens = clip_tokenizer(None, 12)(["a red circle", "a blue square in the top left"])
    assert tokens.shape == (2, 12) and tokens.dtype == torch.long
    assert model.encode_text(tokens, normalize=True).shape == (2, 32)


def test_bad_architecture_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="config=null"):
        build_open_clip("ViT-B-32", config={"embed_dim": 8})
    with pytest.raises(ConfigError, match="unknown open_clip model_name"):
        build_open_clip("ViT-NOPE")
    with pytest.raises(ConfigError, match="needs model_name"):
        build_open_clip(pretrained="openai")


def test_vit_b32_builds_on_meta_and_without_weights_offline() -> None:
    """A pretrained tag never downloads on the meta device or under no_weight_loading (QuickGELU kept)."""
    with torch.device("meta"):
        family = CLIPFamily(model_name="ViT-B-32", pretrained="openai")
    assert next(family.parameters()).device.type == "meta"
    assert sum(p.numel() for p in family.parameters()) == 151_277_313
    with no_weight_loading():
        clip = load_frozen_clip(model_name="ViT-B-32", pretrained="openai")
    assert (clip.image_size, clip.embed_dim, clip.width) == (224, 512, 768)
    assert isinstance(clip.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert clip.tokenizer(["a photo"]).shape == (1, 77)


# ---------------------------------------------------------------------------------------------- family
def test_family_forward_shapes_and_contract() -> None:
    family = CLIPFamily()
    out = family({"image": _images(4), "caption": CAPTIONS[:4]})
    assert out["image_features"].shape == out["text_features"].shape == (4, 64)
    assert out["logit_scale"].shape == () and torch.isclose(out["logit_scale"], torch.tensor(1 / 0.07))
    for key in ("image_features", "text_features"):
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert family.pre_encode(_images(3))["clip_image_emb"].shape == (3, 64)
    frozen = family.frozen_copy()
    assert _same_weights(frozen.model, family.clip) and all(p.requires_grad for p in family.parameters())
    scorer = family.clip_scorer()  # what clip_score=true scores with when no clip_scorer= is given
    assert family.can("clip_scorer") and isinstance(scorer, FrozenCLIP) and scorer.model is not family.clip
    assert _same_weights(scorer.model, family.clip) and all(p.requires_grad for p in family.parameters())
    assert not family.can("generate")  # the sample-grid callback skips it instead of crashing
    with pytest.raises(ConfigError, match="model=clip does not generate images"):
        family.generate(["a red circle"])
    family.check_loss(CLIPContrastive())
    with pytest.raises(ConfigError, match="model=clip cannot be trained with loss=masked_ce"):
        family.check_loss(MaskedCrossEntropy())


def test_loss_is_open_clip_infonce_with_accuracy() -> None:
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = F.normalize(image + 0.3 * torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    terms = CLIPContrastive()({"image_features": image, "text_features": text, "logit_scale": scale})
    logits = scale * image @ text.T
    target = torch.arange(6)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.isclose(terms["loss"], expected) and torch.isclose(terms["contrastive"], expected)
    assert terms["accuracy"] == (logits.argmax(1) == target).float().mean()
    assert terms["accuracy_t2i"] == (logits.argmax(0) == target).float().mean()
    assert terms["logit_scale"] == 10.0


def test_contrastive_loss_decreases_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    family, loss = CLIPFamily(), CLIPContrastive()
    batch = {"image": _images(8), "caption": CAPTIONS}
    optimizer = torch.optim.AdamW(family.trainable_parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        terms = loss(family(batch))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        history.append(float(terms["loss"]))
    assert history[-1] < 0.5 * history[0]
    assert float(terms["accuracy"]) == 1.0


def test_logit_scale_is_clamped_in_training() -> None:
    family = CLIPFamily(max_logit_scale=20.0)
    with torch.no_grad():
        family.clip.logit_scale.fill_(10.0)
    out = family.train()({"image": _images(2), "caption": CAPTIONS[:2]})
    assert torch.isclose(out["logit_scale"], torch.tensor(20.0))


# ------------------------------------------------------------------------------------------ frozen CLIP
def test_frozen_clip_encodes_normalised_and_passes_gradients_to_images() -> None:
    clip = load_frozen_clip()
    assert isinstance(clip.model, open_clip.CLIP) and (clip.image_size, clip.embed_dim, clip.width) == (
        32,
        64,
        64,
    )
    assert _same_weights(clip.model, build_open_clip())  # random but reproducible
    text = clip.encode_text(CAPTIONS[:3])
    assert text.shape == (3, 64) and torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    images = _images(2, size=64).requires_grad_(True)  # resized to 32 inside
    emb = clip.encode_image(images)
    assert emb.shape == (2, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    emb.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.model.training


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory: pytest.TempPathFactory, small_data_overrides: list[str]) -> Path:
    """A model=clip run of two steps through the training CLI's ``train``."""
    from hydra import compose, initialize_config_dir

    from t2i_train.cli.common import CONF_DIR
    from t2i_train.training import train

    run_dir = tmp_path_factory.mktemp("clip_run")
    overrides = [
        "model=clip",
        *small_data_overrides,
        f"run_dir={run_dir}",
        "trainer.max_steps=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.limit_val_batches=0",
        "optimizer.lr=1e-2",
        "scheduler.warmup_steps=0",
        "logger=none",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    assert train(cfg)["global_step"] == 2
    return run_dir


def test_frozen_clip_from_a_trained_checkpoint_and_its_export(clip_run: Path, tmp_path: Path) -> None:
    from t2i_train.checkpoint import load_family
    from t2i_train.export_folder import export

    ckpt = clip_run / "checkpoints" / "last.ckpt"
    trained = load_family(ckpt)
    assert isinstance(trained, CLIPFamily)
    assert not _same_weights(trained.clip, build_open_clip())  # two steps moved the weights
    clip = load_frozen_clip(checkpoint=str(ckpt))
    assert _same_weights(clip.model, trained.clip)
    assert _same_weights(frozen_clip_from_checkpoint(str(ckpt)).model, trained.clip)
    folder = export(str(ckpt), output_dir=str(tmp_path / "export"))["output_dir"]
    assert _same_weights(load_frozen_clip(checkpoint=folder).model, trained.clip)
    with no_weight_loading():  # the summary / meta path: the configured architecture, random weights
        assert _same_weights(load_frozen_clip(checkpoint=str(ckpt)).model, build_open_clip())
    other = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    with pytest.raises(ConfigError, match="does not fit the configured CLIP"):
        load_frozen_clip(checkpoint=str(ckpt), config=other)
    scorer = load_scorer(str(ckpt))
    assert isinstance(scorer, FrozenCLIP) and _same_weights(scorer.model, trained.clip)


# ------------------------------------------------------------------------------------------- CLIP score
def test_clip_score_formula_range_and_batch_independence() -> None:
    clip = load_frozen_clip(init_seed=3)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 32, 32, generator=g)
    prompts = CAPTIONS[:6]
    scores = clip_score(images, prompts, clip)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        e_img = F.normalize(clip.model.encode_image((images - mean) / std), dim=-1)
        e_txt = F.normalize(
            clip.model.encode_text(open_clip.SimpleTokenizer(context_length=32)(prompts)), dim=-1
        )
    by_hand = 100 * torch.clamp((e_img * e_txt).sum(-1), min=0)
    assert scores.shape == (6,) and torch.allclose(scores, by_hand, atol=1e-4)
    assert ((scores >= 0) & (scores <= 100)).all()
    alone = torch.cat([clip_score(images[i : i + 1], prompts[i : i + 1], clip) for i in range(6)])
    assert torch.allclose(alone, scores, atol=1e-4)
    assert torch.allclose(clip_score(images, prompts, clip, batch_size=4), scores, atol=1e-4)
    with pytest.raises(ValueError, match="prompts"):
        clip_score(images, prompts[:2], clip)


def test_load_scorer_refuses_unknown_specs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="open_clip:NAME/TAG"):
        load_scorer("open_clip:ViT-B-32")
    with pytest.raises(ConfigError, match="neither"):
        load_scorer(str(tmp_path / "missing.ckpt"))
