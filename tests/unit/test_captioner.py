"""The captioner family: what is taught (loss masks), style prompts, decoding methods, learning, round trips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from t2i_train.errors import ConfigError
from t2i_train.losses.cross_entropy import IGNORE_INDEX, NextTokenCrossEntropy
from t2i_train.metrics.caption_accuracy import render_scenes
from t2i_train.models.captioner import Captioner

TINY_LM = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 96}
COMBOS = [("red", "circle", "top left"), ("blue", "square", "center"), ("green", "triangle", "bottom")]


def tiny(**kwargs: Any) -> Captioner:
    options = {"lm_config": TINY_LM, "prefix_tokens": 2, "prefix_hidden": 32, "max_caption_tokens": 64}
    return Captioner(**{**options, **kwargs})


def batch_of(metas: list[dict[str, Any]], images: torch.Tensor) -> dict[str, Any]:
    return {
        "image": images,
        "caption": [m["caption"] for m in metas],
        "meta": metas,
        "key": [f"{i:09d}" for i in range(len(metas))],
    }


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train faster on one intra-op thread (and share the 2 cores better)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes() -> dict[str, Any]:
    images, metas = render_scenes(COMBOS, 1, 32, seed=0)
    return batch_of(metas, images)


def test_targets_are_the_caption_and_eos_only(scenes: dict[str, Any]) -> None:
    model = tiny(style_probs={"dsc": 1.0}).eval()
    out = model(scenes)
    targets, plen = out["targets"], model.prefix_length
    prompt = model._encode("describe:")
    for i, meta in enumerate(scenes["meta"]):
        caption = [*model._encode(meta["descriptive"])[: model.max_caption_tokens - 1], model.eos_token_id]
        labelled = targets[i][targets[i] != IGNORE_INDEX].tolist()
        assert labelled == caption
        # position t predicts token t+1: the first caption token is predicted at the style prompt's last token
        first = plen + len(prompt) - 1
        assert (targets[i, :first] == IGNORE_INDEX).all() and targets[i, first] == caption[0]
    assert out["logits"].shape[:2] == targets.shape


def test_loss_ignores_prefix_and_prompt_logits(scenes: dict[str, Any]) -> None:
    model = tiny().eval()
    out = model(scenes)
    loss = NextTokenCrossEntropy()
    base = loss(out)["loss"]
    untaught = out["targets"] == IGNORE_INDEX
    noisy = out["logits"] + 50 * torch.randn_like(out["logits"]) * untaught[..., None]
    assert torch.allclose(loss({**out, "logits": noisy})["loss"], base)
    assert loss(out)["tokens"] == (~untaught).sum()


def test_styles_follow_probabilities_and_targets_come_from_their_keys(scenes: dict[str, Any]) -> None:
    model = tiny(style_probs={"ssc": 1.0}).eval()
    out = model(scenes)
    for i, meta in enumerate(scenes["meta"]):
        labelled = out["targets"][i][out["targets"][i] != IGNORE_INDEX].tolist()
        assert labelled == [*model._encode(meta["caption"])[:63], model.eos_token_id]
    model = tiny().train()
    torch.manual_seed(0)
    styles = model.choose_styles({"caption": ["x"] * 400})
    assert 150 < styles.count("dsc") < 250 and set(styles) == {"ssc", "dsc"}


def test_a_sample_without_its_styles_caption_is_taught_another_drawn_style(scenes: dict[str, Any]) -> None:
    metas = [{k: v for k, v in m.items() if k != "descriptive"} for m in scenes["meta"]]
    model = tiny(style_probs={"dsc": 0.999, "ssc": 0.001}).eval()  # every sample draws dsc
    out = model({**scenes, "meta": metas})
    labelled = out["targets"][0][out["targets"][0] != IGNORE_INDEX].tolist()
    assert labelled == [*model._encode(metas[0]["caption"]), model.eos_token_id]
    only_dsc = tiny(style_probs={"dsc": 1.0}).eval()  # fine-tuning on one style teaches no other
    assert (only_dsc({**scenes, "meta": metas})["targets"] == IGNORE_INDEX).all()
    empty = [{} for _ in metas]
    terms = NextTokenCrossEntropy()(model({**scenes, "meta": empty}))
    assert terms["loss"] == 0 and terms["tokens"] == 0


def test_bad_style_configs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="style_probs"):
        tiny(style_probs={"long": 1.0})
    with pytest.raises(ConfigError, match="n_positions"):
        tiny(max_caption_tokens=200)
    with pytest.raises(ConfigError, match="freeze_lm"):
        tiny(freeze_lm=True)
    with pytest.raises(ConfigError, match="prefix"):
        tiny(prefix="words")


def test_style_prompt_changes_the_output(scenes: dict[str, Any]) -> None:
    model = tiny().eval()
    captions = scenes["caption"]
    short = model.sequence_logprob(scenes["image"], captions, style="ssc")
    long = model.sequence_logprob(scenes["image"], captions, style="dsc")
    assert short.shape == (3,) and not torch.allclose(short, long)
    with pytest.raises(ConfigError, match="style"):
        model.caption(scenes["image"], style="poem")


def test_beam_with_one_beam_is_greedy_and_top_p_is_seeded(scenes: dict[str, Any], one_thread: None) -> None:
    model = tiny().eval()
    images = scenes["image"]
    greedy = model.caption(images, method="greedy", max_new_tokens=16)
    assert model.caption(images, method="beam", num_beams=1, max_new_tokens=16) == greedy
    assert len(model.caption(images, method="beam", num_beams=3, max_new_tokens=16)) == len(images)
    sample = model.caption(images, method="top_p", top_p=0.95, max_new_tokens=16, seed=3)
    assert model.caption(images, method="top_p", top_p=0.95, max_new_tokens=16, seed=3) == sample
    assert model.caption(images, method="top_p", top_p=0.95, max_new_tokens=16, seed=4) != sample
    with pytest.raises(ConfigError, match="method"):
        model.caption(images, method="sample")


def test_rerank_keeps_the_candidate_clip_matches_best(scenes: dict[str, Any], one_thread: None) -> None:
    model = tiny().eval()
    images = scenes["image"]
    options = {"method": "top_p", "top_p": 0.95, "temperature": 2.0, "max_new_tokens": 12, "seed": 5}
    # the same seed and options return the same K candidates per image, image by image
    embeds = model._prompt_embeds(images, "dsc")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        ids = model.lm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=12,
            eos_token_id=model.eos_token_id,
            pad_token_id=model.pad_token_id,
            do_sample=True,
            top_p=0.95,
            top_k=0,
            temperature=2.0,
            num_return_sequences=4,
        )
    candidates = [model._decode(row) for row in ids.tolist()]
    grouped = [candidates[i * 4 : (i + 1) * 4] for i in range(len(images))]
    assert any(
        len(set(group)) > 1 for group in grouped
    )  # sampling at temperature 2 gives distinct candidates
    chosen = model.caption(images, rerank=4, **options)
    for image, group, caption in zip(images, grouped, chosen, strict=True):
        scores = model.clip.encode_text(group) @ model.clip.encode_image(image[None])[0]
        assert caption == group[int(scores.argmax())]
    assert model.caption(images, rerank=1, **options) == model.caption(images, **options)
    assert len(model.caption(images, method="beam", num_beams=2, rerank=3, max_new_tokens=8)) == len(images)
    with pytest.raises(ConfigError, match="rerank=4 needs candidates"):
        model.caption(images, method="greedy", rerank=4)
    with pytest.raises(ConfigError, match="rerank must be >= 0"):
        model.caption(images, method="beam", rerank=-1)


def test_patch_prefix_has_one_token_per_vit_token(scenes: dict[str, Any]) -> None:
    model = tiny(prefix="patches").eval()
    assert model.prefix_length == 1 + 16  # tiny CLIP: 32 px / patch 8 -> 4x4 patches + CLS
    assert model.prefix_embeds(scenes["image"]).shape == (3, 17, TINY_LM["n_embd"])


def test_clip_stays_frozen_and_out_of_the_optimizer() -> None:
    model = tiny()
    trainable = {n.split(".")[0] for n, _ in model.named_trainable_parameters()}
    assert trainable == {"lm", "prefix"}
    assert list(model.frozen_modules()) == ["clip"] and not model.external_modules()  # random CLIP: saved
    assert not Captioner.generates_images()


def test_learns_a_handful_of_captions_in_two_styles(scenes: dict[str, Any], one_thread: None) -> None:
    """Three images, two styles trained jointly (shape name / short caption): a hundred steps of next-token
    CE learn to say each image's caption in the style its prompt asks for. (Patch prefix: a random CLIP's
    pooled embedding barely tells the images apart; its patch tokens do.)"""
    torch.manual_seed(0)
    model = tiny(prefix="patches", style_keys={"ssc": "json.shape", "dsc": "json.caption"}).train()
    batch = batch_of(scenes["meta"] * 4, scenes["image"].repeat(4, 1, 1, 1))
    loss = NextTokenCrossEntropy()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(100):
        terms = loss(model(batch))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    model.eval()
    assert model.caption(scenes["image"], style="ssc") == [m["shape"] for m in scenes["meta"]]
    assert model.caption(scenes["image"], style="dsc") == scenes["caption"]


def test_export_round_trip_through_load_family(scenes: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from t2i_train.checkpoint import load_family

    options = {"lm_config": TINY_LM, "prefix_tokens": 2, "prefix_hidden": 32, "max_caption_tokens": 64}
    torch.manual_seed(1)
    model = Captioner(**options, init_seed=5)
    with torch.no_grad():
        for p in model.prefix.parameters():
            p.add_(torch.randn_like(p))  # weights no fresh build has
    folder = tmp_path / "export"
    folder.mkdir()
    save_file(
        {k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(folder / "model.safetensors")
    )
    config = {"_target_": "t2i_train.models.captioner.Captioner", **options}
    import yaml

    (folder / "config.yaml").write_text(yaml.safe_dump({"model": config}))
    loaded = load_family(folder)
    assert isinstance(loaded, Captioner)
    model.eval()
    assert loaded.caption(scenes["image"], max_new_tokens=10) == model.caption(
        scenes["image"], max_new_tokens=10
    )


def test_prefix_noise_only_in_training(scenes: dict[str, Any]) -> None:
    model = tiny(prefix_noise=1.0)
    model.eval()
    assert torch.equal(model.prefix_embeds(scenes["image"]), model.prefix_embeds(scenes["image"]))
    model.train()
    assert not torch.equal(model.prefix_embeds(scenes["image"]), model.prefix_embeds(scenes["image"]))
    with pytest.raises(ConfigError, match="prefix_noise"):
        tiny(prefix_noise=-1.0)


def test_validation_metrics_score_the_first_shapes_batch(scenes: dict[str, Any]) -> None:
    """The family hook the generic task logs as val/<style>_all (it replaced a captioner task subclass)."""
    from t2i_train.metrics.caption_accuracy import caption_accuracy

    model = tiny(validation_captions=2, validation_caption_tokens=8).eval()
    metrics = model.validation_metrics(scenes, 0)
    assert set(metrics) == {f"{style}_all" for style in model.style_probs}
    captions = model.caption(scenes["image"][:2], style="dsc", method="greedy", max_new_tokens=8)
    assert metrics["dsc_all"] == caption_accuracy(captions, scenes["meta"][:2])["all"]
    assert model.validation_metrics(scenes, 1) == {}  # the first batch only
    assert model.validation_metrics({**scenes, "meta": [{}] * 3}, 0) == {}  # not shapes data
    assert tiny(validation_captions=0).validation_metrics(scenes, 0) == {}
