"""GILL (t2i_train.models.gill, t2i_train.losses.gill): what trains, the [IMG] tokens, the losses, the targets."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from t2i_train.errors import ConfigError
from t2i_train.losses.gill import GILLLoss, L2Distill, l2_distill
from t2i_train.models.gill import GILL
from tests.helpers import compose_train

CAPTIONS = [
    "a red circle in the top left",
    "The image shows a single filled blue square in the center.",
    "a green triangle, bottom right",
    "yellow circle",
]


@pytest.fixture(scope="module")
def gill() -> GILL:
    cfg = compose_train(["model=gill", "model.concat_prob=0.0"])
    return instantiate(cfg.model, _convert_="all")


def batch(count: int = 4, seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(count, 3, 32, 32, generator=generator) * 2 - 1,
        "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(count)],
    }


def frozen_state(model: GILL) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.clone()
        for name, module in model.frozen_modules().items()
        for k, v in module.state_dict().items()
    }


def test_only_the_new_parts_train_and_the_frozen_ones_stay_byte_identical(gill: GILL) -> None:
    model = copy.deepcopy(gill).train()
    before = frozen_state(model)
    trainable = dict(model.named_trainable_parameters())
    assert {n.split(".")[0] for n in trainable} == {
        "img_input",
        "img_output",
        "visual_prefix",
        "image_retrieval",
        "text_retrieval",
        "logit_scale",
        "mapper",
    }
    assert not any(n.startswith(("lm.", "clip.", "target_encoder.")) for n in trainable)
    optimizer = torch.optim.AdamW(list(model.trainable_parameters()), lr=1e-2)
    loss = GILLLoss()
    for step in range(2):
        optimizer.zero_grad()
        loss(model(batch(seed=step)))["loss"].backward()
        for name, param in trainable.items():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        optimizer.step()
        model.after_optimizer_step()
    after = frozen_state(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(p.grad is None for n, p in model.named_parameters() if n.split(".")[0] in ("lm", "clip"))


def test_image_token_rows_are_renormalised_to_the_frozen_rows_mean_norm(gill: GILL) -> None:
    model = copy.deepcopy(gill)
    frozen = model.lm.lm.get_input_embeddings().weight.norm(dim=-1).mean()
    with torch.no_grad():
        model.img_input.mul_(torch.tensor([[3.0], [0.1], [1.0], [7.0]]))
        model.img_output.mul_(5.0)
    model.after_optimizer_step()
    assert torch.allclose(model.img_input.norm(dim=-1), frozen.expand(4), rtol=1e-5)
    out_norm = model.lm.lm.get_output_embeddings().weight.norm(dim=-1).mean()
    assert torch.allclose(model.img_output.norm(dim=-1), out_norm.expand(4), rtol=1e-5)


def test_image_tokens_are_spliced_in_not_added_to_the_frozen_embedding(gill: GILL) -> None:
    table = gill.lm.lm.get_input_embeddings()
    assert table.num_embeddings == gill.vocab_rows  # no row was added to the frozen LM
    ids = torch.tensor([[5, gill.image_token_ids[0], gill.image_token_ids[3]]])
    embeds = gill.embed(ids)
    assert torch.equal(embeds[0, 0], table.weight[5])
    assert torch.equal(embeds[0, 1], gill.img_input[0]) and torch.equal(embeds[0, 2], gill.img_input[3])
    logits = gill.logits(torch.randn(2, gill.width))
    assert logits.shape == (2, gill.vocab_rows + gill.image_token_count)


def test_only_img0_is_taught_in_the_image_pass(gill: GILL) -> None:
    passed = gill.image_pass(CAPTIONS[:2])
    assert passed.targets.tolist() == [gill.image_token_ids[0]] * 2
    assert passed.img_states.shape == (2, gill.image_token_count, gill.width)
    # the [IMG0] logits are the ones at the caption's last token, in the same sequence the states come from
    ids = torch.tensor([[*gill.caption_ids(CAPTIONS[0]), *gill.image_token_ids]])
    hidden = gill.hidden_states(gill.embed(ids), torch.ones(ids.shape))
    last = len(gill.caption_ids(CAPTIONS[0])) - 1
    assert torch.allclose(passed.logits[0], gill.logits(hidden[0, last]), atol=1e-4)
    assert torch.allclose(passed.img_states[0], hidden[0, last + 1 :], atol=1e-4)


def test_the_caption_pass_reads_start_token_then_prefix_then_caption(gill: GILL) -> None:
    """The LM sees its start token first, as in all its training; the prefix follows; the caption is taught."""
    start = gill.start_ids()
    assert start, "the tiny GILL's CLIP BPE tokenizer adds a start token"
    seen: list[torch.Tensor] = []
    real = gill.hidden_states

    def spy(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen.append(embeds.detach())
        return real(embeds, mask)

    features = torch.randn(1, gill.clip.width)
    gill.hidden_states = spy  # type: ignore[method-assign]
    try:
        _, targets = gill.caption_pass(features, [CAPTIONS[0]])
    finally:
        del gill.hidden_states
    prefix = gill.visual_prefix(features).view(gill.prefix_tokens, gill.width).detach()
    embeds = seen[0][0]
    assert torch.equal(embeds[: len(start)], gill.embed(torch.tensor([start]))[0].detach())
    assert torch.equal(embeds[len(start) : len(start) + gill.prefix_tokens], prefix)
    caption = gill.caption_ids(CAPTIONS[0])[len(start) :]
    assert targets.tolist() == [*caption, gill.eos_token_id]


def test_retrieval_can_read_every_image_token_state() -> None:
    cfg = compose_train(["model=gill", "model.retrieval_states=all"])
    model = instantiate(cfg.model, _convert_="all")
    states = torch.randn(3, model.image_token_count, model.width)
    embedding = model.text_embedding(states)
    assert embedding.shape == (3, model.text_retrieval.out_features)
    changed = states.clone()
    changed[:, -1] += 1.0  # the last [IMG] state alone moves the embedding
    assert not torch.allclose(model.text_embedding(changed), embedding)
    with pytest.raises(InstantiationException, match="retrieval_states must be one of first, all"):
        instantiate(compose_train(["model=gill", "model.retrieval_states=mean"]).model, _convert_="all")


def test_img1_and_later_are_forced_after_img0_and_never_decoded_alone(gill: GILL) -> None:
    model = copy.deepcopy(gill).eval()
    hidden = model.hidden_states(
        model.embed(torch.tensor([model.caption_ids("a red")])), torch.ones(1, 2)
    ).detach()
    direction = hidden[0, -1] / hidden[0, -1].norm()
    with torch.no_grad():  # [IMG2] would win every step if it could be decoded on its own
        model.img_output[2] = direction * 1e4
    first = model.respond(["a red"], max_new_tokens=3)[0]
    assert model.image_token_ids[2] not in first["ids"] and not first["image"]
    with (
        torch.no_grad()
    ):  # now [IMG0] wins: the rest of the [IMG] tokens follow it, in order, and the row ends
        model.img_output[0] = direction * 1e5
    answer = model.respond(["a red"], max_new_tokens=5)[0]
    assert answer["image"]
    start = answer["ids"].index(model.image_token_ids[0])
    assert answer["ids"][start:] == model.image_token_ids


def test_l2_distill_matches_a_hand_computed_reference() -> None:
    mapped = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 1.0], [2.0, 2.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, 5.0]]])
    # per-token distances: 5, 1 | 0, 3 -> mean 2.25; on the real tokens (mask) 5, 0, 3 -> 8 / 3
    assert l2_distill(mapped, target).item() == pytest.approx(2.25)
    mask = torch.tensor([[True, False], [True, True]])
    assert l2_distill(mapped, target, mask).item() == pytest.approx(8 / 3)
    terms = L2Distill()({"mapped": mapped, "target": target, "target_mask": mask})
    assert terms["loss"].item() == pytest.approx(8 / 3) and "cosine" in terms


def test_pre_encoded_targets_give_the_on_the_fly_loss(gill: GILL) -> None:
    model = copy.deepcopy(gill).eval()
    plain = batch()
    fields = model.pre_encode_captions(plain["caption"])
    stored = {**plain, **fields, **model.pre_encode(plain["image"])}
    loss = L2Distill()
    torch.manual_seed(0)
    on_the_fly = loss(model(plain))["loss"]
    torch.manual_seed(0)
    pre_encoded = loss(model(stored))["loss"]
    assert pre_encoded.item() == pytest.approx(on_the_fly.item(), rel=2e-3)  # targets stored in float16
    # a row whose caption changed since encoding is recomputed, not trained on a stale target
    swapped = {**stored, "caption": [plain["caption"][1], *plain["caption"][1:]]}
    target, _ = model.batch_target(swapped)
    fresh, _ = model.encode_target(swapped["caption"])
    assert torch.allclose(target[0], fresh[0])


def test_target_rewrite_distils_every_wording_to_one_templates_target(gill: GILL) -> None:
    from t2i_train.data.synthetic import DESCRIPTIVE_TEMPLATES, descriptive_prompt
    from t2i_train.text.upsampler import TemplateUpsampler

    model = copy.deepcopy(gill).eval()
    model.target_rewrite = TemplateUpsampler(template_index=0)
    wordings = [
        "a red circle in the top left",
        "top left: a red circle",
        descriptive_prompt("red", "circle", "top left", template=2),
    ]
    target, mask = model.encode_target(wordings)
    reference, reference_mask = gill.encode_target(
        [descriptive_prompt("red", "circle", "top left", template=0)]
    )
    for row in range(len(wordings)):  # three wordings, one target: template 0's
        assert torch.equal(mask[row], reference_mask[0]) and torch.allclose(target[row], reference[0])
    assert len(DESCRIPTIVE_TEMPLATES) > 1 and not torch.allclose(
        gill.encode_target(wordings[2:])[0], reference
    )
    # stored targets carry the rewritten text's hash: pre-encoded by this model, they are used as they are
    plain = {"caption": wordings}
    stored = {**plain, **model.pre_encode_captions(wordings)}
    assert torch.allclose(model.batch_target(stored)[0], target, atol=1e-2)
    # ... and targets encoded without the rewrite are stale for it (recomputed, never trained on)
    unrewritten = {**plain, **gill.pre_encode_captions(wordings)}
    assert torch.allclose(model.batch_target(unrewritten)[0], target)


def test_target_rewrite_must_be_an_upsampler_node() -> None:
    with pytest.raises(InstantiationException, match="target_rewrite must be null or an upsampler node"):
        instantiate(
            compose_train(["model=gill", "+model.target_rewrite.template_index=0"]).model, _convert_="all"
        )


def test_a_checkpoint_trained_to_another_target_encoder_is_refused(gill: GILL) -> None:
    cfg = compose_train(["model=gill", "model.target_encoder.init_seed=1"])
    other = instantiate(cfg.model, _convert_="all")
    with pytest.raises(ConfigError, match="different target text encoder"):
        other.load_state_dict(gill.state_dict())


def test_an_lm_of_another_width_than_the_config_is_one_line(tmp_path: Any) -> None:
    cfg = compose_train(["model=gill", "model.lm.hidden_size=256"])
    with pytest.raises(Exception, match="hidden size 128") as caught:  # Hydra wraps the family's error
        instantiate(cfg.model, _convert_="all")
    assert isinstance(caught.value.__cause__ or caught.value, ConfigError)


def test_generate_without_a_generator_says_what_to_set(gill: GILL) -> None:
    assert not gill.available("generate")
    with pytest.raises(ConfigError, match="generator_checkpoint"):
        gill.generate(["a red circle"])


def test_retrieve_without_an_index_says_how_to_build_one(gill: GILL) -> None:
    with pytest.raises(ConfigError, match=r"t2i_train\.index"):
        gill.retrieve(["a red circle"], k=1, index=None)


def _saved_diffusion(tmp_path: Path, *overrides: str) -> Path:
    """A real (random, tiny) diffusion checkpoint, as a training run would store it."""
    cfg = compose_train(["model=diffusion", *overrides])
    node = OmegaConf.to_container(cfg.model, resolve=True)
    model = instantiate(node, _convert_="all")
    model.latent_scale.fill_(1.0)  # as after a first training batch
    path = tmp_path / "diffusion.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"t2i_config": {"model": node}, "state_dict": state}, path)
    return path


def test_the_generator_is_loaded_on_first_use_and_draws_from_the_mapper(gill: GILL, tmp_path: Path) -> None:
    model = copy.deepcopy(gill).eval()
    model.generator_checkpoint = str(_saved_diffusion(tmp_path))
    assert model.generator is None and model.available("generate")
    images = model.generate(["a red circle in the top left"], steps=2, seed=0)
    assert images.shape == (1, 3, 32, 32) and 0 <= float(images.min()) <= float(images.max()) <= 1
    assert "generator" in model.external_modules()  # left out of training checkpoints
    assert not any(p.requires_grad for p in model.generator.parameters())


def test_a_generator_with_another_text_encoder_is_one_line(gill: GILL, tmp_path: Path) -> None:
    model = copy.deepcopy(gill).eval()
    model.generator_checkpoint = str(_saved_diffusion(tmp_path, "model.text_encoder.init_seed=1"))
    with pytest.raises(ConfigError, match=r"is not model\.target_encoder"):
        model.generate(["a red circle"], steps=1)


def test_paper_size_counts_offline_without_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    """experiment=gill_opt6_7b: trainable 50.1M (mapper 31.96M) as the paper's code gives, with OPT-6.7B, CLIP
    ViT-L/14 and SD-1.5's text encoder frozen and counted apart, built on the meta device with no download."""
    from t2i_train.model_summary import build_on_meta, summarize

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = summarize(build_on_meta(compose_train(["experiment=gill_opt6_7b"])))
    parts = report["components"]
    assert report["trainable"] == pytest.approx(50.1e6, rel=0.01)
    assert parts["mapper"]["trainable"] == pytest.approx(31.96e6, rel=0.03)
    assert parts["lm"]["frozen_component"] and parts["lm"]["frozen"] == pytest.approx(6.66e9, rel=0.01)
    assert parts["clip"]["frozen_component"] and parts["clip"]["trainable"] == 0
    assert parts["target_encoder"]["frozen"] == pytest.approx(123e6, rel=0.01)


def test_a_rebuilt_checkpoint_keeps_its_generator_path(gill: GILL, tmp_path: Path) -> None:
    """The generator is a resource read at use (``resource_paths``), not a stage-1 part copied into the weights:
    rebuilding a checkpoint that holds every weight must not drop its path (``external_paths`` are dropped)."""
    from t2i_train.checkpoint import absolute_stage1_paths, load_family

    diffusion = _saved_diffusion(tmp_path)
    node = OmegaConf.to_container(compose_train(["model=gill"]).model, resolve=True)
    node["generator_checkpoint"] = (
        str(diffusion.relative_to(Path.cwd())) if diffusion.is_relative_to(Path.cwd()) else str(diffusion)
    )
    config = absolute_stage1_paths({"model": node})
    assert config["model"]["generator_checkpoint"] == str(diffusion.resolve())
    state = {f"model.{k}": v for k, v in gill.state_dict().items()}
    torch.save({"t2i_config": config, "state_dict": state}, tmp_path / "gill.ckpt")
    rebuilt = load_family(tmp_path / "gill.ckpt")
    assert rebuilt.generator_checkpoint == str(diffusion.resolve()) and rebuilt.available("generate")
