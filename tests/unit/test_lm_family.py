"""The ``lm`` family (t2i_train/models/lm.py): what is taught, the text draw, the frozen loader, the OPT path."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from t2i_train.errors import ConfigError
from t2i_train.losses.cross_entropy import IGNORE_INDEX, NextTokenCrossEntropy
from t2i_train.models.lm import CausalLanguageModel, lm_logits, load_frozen_lm
from t2i_train.models.loading import no_weight_loading
from t2i_train.text.causal_lm import add_tokens, build_causal_lm, build_tokenizer

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}
TINY_OPT = {
    "model_type": "opt",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "ffn_dim": 64,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
    "word_embed_proj_dim": 32,
}
OPT_6_7B = {
    "model_type": "opt",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "ffn_dim": 16384,
    "num_attention_heads": 32,
    "vocab_size": 50272,
    "max_position_embeddings": 2048,
    "word_embed_proj_dim": 4096,
}
META = {
    "caption": "a red circle in the top left",
    "descriptive": "The image shows a single filled red circle in the top left.",
    "alt_text": "a circle",
}


def tiny(**kwargs: Any) -> CausalLanguageModel:
    return CausalLanguageModel(**{"config": TINY, "max_tokens": 48, **kwargs})


def batch_of(metas: list[dict[str, Any]], captions: list[str] | None = None) -> dict[str, Any]:
    return {
        "caption": captions if captions is not None else [m.get("caption", "") for m in metas],
        "meta": metas,
        "key": [f"{i:09d}" for i in range(len(metas))],
    }


def test_clip_bpe_tokenizer_is_a_private_copy_with_start_eos_and_pad() -> None:
    tokenizer = build_tokenizer("clip_bpe")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    ids = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "a red circle"  # the copy still strips CLIP's </w>
    add_tokens(build_causal_lm(None, TINY, tokenizer), tokenizer, ["[IMG0]"])  # GILL's new tokens
    assert len(tokenizer) == 49409 and len(build_tokenizer("clip_bpe")) == 49408


@pytest.mark.parametrize("config", [TINY, TINY_OPT], ids=["gpt2", "opt"])
def test_forward_teaches_every_token_after_the_start_and_nothing_on_padding(config: dict[str, Any]) -> None:
    model = tiny(config=config, text_keys=["caption"]).eval()
    texts = [META["caption"], META["descriptive"], "red"]
    out = model(batch_of([{}] * 3, texts))
    logits, targets = out["logits"], out["targets"]
    assert logits.shape[:2] == targets.shape and logits.shape[2] == model.lm.config.vocab_size
    for i, text in enumerate(texts):
        row = model.encode(text)
        assert row[0] == 49406 and row[-1] == model.eos_token_id  # <|startoftext|> ... <|endoftext|>
        assert targets[i].tolist() == row[1:] + [IGNORE_INDEX] * (targets.shape[1] - len(row) + 1)
    terms = NextTokenCrossEntropy()(out)
    assert torch.isfinite(terms["loss"]) and terms["tokens"] == sum(len(model.encode(t)) - 1 for t in texts)
    # the head on taught positions only gives the full forward's logits there
    rows = [model.encode(t) for t in texts]
    full = model.lm(
        input_ids=torch.tensor([rows[1]]), attention_mask=torch.ones(1, len(rows[1]), dtype=torch.long)
    ).logits
    keep = targets[1] != IGNORE_INDEX
    torch.testing.assert_close(logits[1][keep], full[0][keep], rtol=1e-5, atol=1e-5)
    same, _ = lm_logits(model.lm, rows[1:2], model.pad_token_id)
    torch.testing.assert_close(same[0][keep], full[0][keep], rtol=1e-5, atol=1e-5)


def test_each_sample_is_taught_one_of_its_distinct_texts_drawn_uniformly() -> None:
    model = tiny()  # caption, json.caption, json.descriptive, json.alt_text
    meta = dict(META)
    batch = batch_of([meta] * 300)  # caption == json.caption: three distinct texts
    assert model.sample_texts(batch, 0) == [META["caption"], META["descriptive"], META["alt_text"]]
    torch.manual_seed(0)
    counts = Counter(model.train().choose_texts(batch))
    assert set(counts) == set(META.values()) and min(counts.values()) > 70, counts
    model.eval()
    first = model.choose_texts(batch)
    assert first == model.choose_texts(batch) and len(set(first)) == 3  # by key: fixed, and still mixed
    assert tiny(text_keys=["json.alt_text"]).choose_texts(batch)[:1] == [META["alt_text"]]
    out = model(batch_of([{}], [""]))  # no text at all: nothing taught
    assert (out["targets"] == IGNORE_INDEX).all()
    with pytest.raises(ConfigError, match=r"model\.text_keys"):
        tiny(text_keys=["txt"])


def test_join_prob_teaches_all_texts_of_a_sample_in_one_sequence_in_training_only() -> None:
    model = tiny(join_prob=1.0)
    batch = batch_of([dict(META)] * 8)
    texts = model.sample_texts(batch, 0)
    torch.manual_seed(0)
    rows = [model.joined_row(batch, 0) for _ in range(12)]
    taught = {tuple(model.encode(t)) for t in texts}
    for row in rows:  # every text once, each as taught ([start] text [EOS]), in some order
        assert len(row) == sum(len(t) for t in taught)
        pieces, rest = [], list(row)
        while rest:
            piece = next(t for t in taught if tuple(rest[: len(t)]) == t)
            pieces.append(piece)
            rest = rest[len(piece) :]
        assert set(pieces) == taught
    assert len({tuple(r) for r in rows}) > 1  # the order is drawn
    out = model.train()(batch)
    assert int((out["targets"] != IGNORE_INDEX).sum(1)[0]) == len(rows[0]) - 1
    single = model.eval()(batch)  # evaluation: one text per sample, as without join_prob
    assert int((single["targets"] != IGNORE_INDEX).sum(1).max()) < len(rows[0]) - 1
    with pytest.raises(ConfigError, match=r"model\.join_prob=1\.5"):
        tiny(join_prob=1.5)


def test_complete_continues_a_learnt_text_and_batches_by_length() -> None:
    torch.manual_seed(0)
    model = tiny(text_keys=["caption"])
    text = "the image shows a single filled red circle in the top left"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = NextTokenCrossEntropy()(model(batch_of([{}], [text])))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    prompts = ["the image shows a single filled", "the image", "the image shows a single filled"]
    out = model.complete(prompts, max_new_tokens=12)
    assert out[0] == out[2] == "red circle in the top left"
    assert out == [model.complete([p], max_new_tokens=12)[0] for p in prompts]
    # CLIP's BPE decodes "-sized 32," as " - sized 3 2 ,": the text comes back as written
    assert (
        model._decode(model.encode("a medium-sized one, 11 of the 32 pixels."))
        == "a medium-sized one, 11 of the 32 pixels."
    )


def test_hidden_size_mismatch_is_one_config_error_line() -> None:
    assert tiny(hidden_size=32).width == 32
    with pytest.raises(
        ConfigError, match=r"^model\.hidden_size=64 but the LM of model\.config has hidden size 32"
    ):
        tiny(hidden_size=64)
    with pytest.raises(ConfigError, match=r"^model\.lm\.hidden_size=64 .* hidden size 32") as info:
        load_frozen_lm(config=TINY, hidden_size=64)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------- frozen from a run
@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory, small_data_overrides: list[str]) -> Path:
    """A tiny ``model=lm`` run of two steps through the training CLI's ``train``."""
    from t2i_train.training import train
    from tests.helpers import compose_train

    run_dir = tmp_path_factory.mktemp("lm_run")
    overrides = [
        "model=lm",
        *[f"model.config.{k}={v}" for k, v in TINY.items()],
        "model.max_tokens=64",
        *small_data_overrides,
        f"run_dir={run_dir}",
        "trainer.max_steps=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.limit_val_batches=0",
        "sampling.every_n_steps=0",
        "optimizer.lr=1e-2",
        "scheduler.warmup_steps=0",
        "logger=none",
    ]
    assert train(compose_train(overrides))["global_step"] == 2
    return run_dir / "checkpoints" / "last.ckpt"


def _frozen_options() -> dict[str, Any]:
    """``load_frozen_lm``'s description of the run's LM (a stage-2 config's ``lm`` node)."""
    return {"config": {**TINY, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, "max_tokens": 64}


def test_load_frozen_lm_from_a_trained_checkpoint_and_its_export(lm_run: Path, tmp_path: Path) -> None:
    from t2i_train.checkpoint import load_family
    from t2i_train.export_folder import export

    trained = load_family(lm_run)
    assert isinstance(trained, CausalLanguageModel)
    frozen = load_frozen_lm(checkpoint=str(lm_run), hidden_size=32, **_frozen_options())
    batch = batch_of([META, META], [META["caption"], "a blue square"])
    torch.manual_seed(0)
    expected = trained.eval()(batch)["logits"]
    assert torch.equal(frozen(batch)["logits"], expected)
    assert frozen.has_weights and not frozen.training and not frozen.lm.training
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()  # a stage-2 family in training mode keeps it frozen
    assert not frozen.lm.training and not list(frozen.trainable_parameters())
    assert set(frozen.external_modules()) == {"lm"}
    folder = export(str(lm_run), output_dir=str(tmp_path / "export"))["output_dir"]
    assert torch.equal(
        load_frozen_lm(checkpoint=folder, **_frozen_options()).eval()(batch)["logits"], expected
    )
    with no_weight_loading():  # a summary / rebuild: the configured architecture, random, no checkpoint read
        random = load_frozen_lm(checkpoint=str(tmp_path / "missing.ckpt"), **_frozen_options())
    assert random.has_weights and not torch.equal(random(batch)["logits"], expected)


def test_a_checkpoint_of_another_width_or_family_is_one_config_error(lm_run: Path, tmp_path: Path) -> None:
    narrow = {**TINY, "n_embd": 16}
    with pytest.raises(ConfigError, match=rf"^model\.lm\.hidden_size=16 .*checkpoint {lm_run} .*size 32"):
        load_frozen_lm(checkpoint=str(lm_run), config=narrow, hidden_size=16, max_tokens=64)
    with pytest.raises(ConfigError, match=r"hidden size 32 but model\.lm\.config builds 16"):
        load_frozen_lm(checkpoint=str(lm_run), config=narrow, max_tokens=64)
    with pytest.raises(ConfigError, match=r"tokenizer clip_bpe but model\.lm\.tokenizer is None"):
        load_frozen_lm(checkpoint=str(lm_run), tokenizer=None, hidden_size=32, **_frozen_options())
    other = _other_family_export(tmp_path / "clip")
    with pytest.raises(
        ConfigError, match=r"^model\.lm\.checkpoint .* holds a t2i_train\.models\.clip\.CLIPFamily"
    ):
        load_frozen_lm(checkpoint=str(other), **_frozen_options())


def _other_family_export(folder: Path) -> Path:
    import yaml
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({"clip.logit_scale": torch.zeros(())}, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(
        yaml.safe_dump({"model": {"_target_": "t2i_train.models.clip.CLIPFamily"}})
    )
    return folder


# ------------------------------------------------------------------------------------- paper sizes, offline
def test_opt_6_7b_builds_on_the_meta_device_without_a_download(monkeypatch: pytest.MonkeyPatch) -> None:
    import t2i_train.text.causal_lm as causal_lm

    def offline(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("reached for the network / the Hugging Face cache")

    monkeypatch.setattr(causal_lm.AutoConfig, "from_pretrained", offline)
    monkeypatch.setattr(causal_lm.AutoModelForCausalLM, "from_pretrained", offline)
    with no_weight_loading(), torch.device("meta"):
        model = CausalLanguageModel(pretrained="facebook/opt-6.7b", config=OPT_6_7B, hidden_size=4096)
        frozen = load_frozen_lm(pretrained="facebook/opt-6.7b", config=OPT_6_7B, hidden_size=4096)
    for lm in (model, frozen):
        params = list(lm.parameters())
        assert all(p.device.type == "meta" for p in params)
        assert 6.6e9 < sum(p.numel() for p in params) < 6.8e9, sum(p.numel() for p in params)
        assert type(lm.lm).__name__ == "OPTForCausalLM" and lm.width == 4096 and lm.has_weights
    assert len(model.trained_blocks()) == 32
