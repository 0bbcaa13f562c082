"""Caption upsampling: the shapes template parser, user templates, and a causal LM (tiny GPT2, offline)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer, ByT5Tokenizer

from t2i_train.data.synthetic import DESCRIPTIVE_TEMPLATES, all_combinations, canonical_prompt
from t2i_train.errors import ConfigError
from t2i_train.text.upsampler import (
    DEFAULT_INSTRUCTION,
    CausalLMUpsampler,
    TemplateUpsampler,
    build_upsampler,
    first_line,
    parse_shapes_prompt,
)
from tests.helpers import save_tiny_lm

# --- template -----------------------------------------------------------------------------------------------


def test_every_canonical_prompt_parses_back_to_its_triple() -> None:
    combos = all_combinations()
    assert len(combos) == 162
    for combo in combos:
        assert parse_shapes_prompt(canonical_prompt(*combo)) == combo


@pytest.mark.parametrize("template_index", [None, 0, 1, 2])
def test_upsampled_text_names_colour_shape_and_position(template_index: int | None) -> None:
    combos = all_combinations()
    upsampled = build_upsampler("template", template_index=template_index)(
        [canonical_prompt(*c) for c in combos]
    )
    for (colour, shape, position), text in zip(combos, upsampled):
        assert f"{colour} {shape}" in text and f"in the {position}" in text, text
        assert parse_shapes_prompt(text) == (colour, shape, position)  # nothing contradicting in the template
        assert "medium-sized" in text and "dark gray" in text and "11" in text and "32" in text


def test_longest_position_phrase_wins_and_other_wordings_parse() -> None:
    assert parse_shapes_prompt("a red circle in the top left") == ("red", "circle", "top left")
    assert parse_shapes_prompt("a red circle in the top") == ("red", "circle", "top")
    assert parse_shapes_prompt("Bottom-Right: a CYAN square") == ("cyan", "square", "bottom right")
    assert parse_shapes_prompt("a purple triangle in the centre of the image") == (
        "purple",
        "triangle",
        "center",
    )
    for ambiguous in (
        "a dog",
        "a red circle",
        "a red and a blue circle in the top",
        "a red circle left of a square",
    ):
        assert parse_shapes_prompt(ambiguous) is None, ambiguous


def test_unparseable_prompts_pass_through_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    prompts = ["a dog on a skateboard", "a red circle in the top left", "a red and a blue square in the top"]
    with caplog.at_level(logging.WARNING, logger="t2i_train.text.upsampler"):
        out = build_upsampler("template", template_index=0)(prompts)
    assert out[0] == prompts[0] and out[2] == prompts[2]
    assert out[1] == DESCRIPTIVE_TEMPLATES[0].format(
        size_word="medium-sized",
        colour="red",
        shape="circle",
        position="top left",
        background="dark gray",
        extent=11,
        size=32,
    )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 3" in warnings[0].getMessage()


def test_seeded_template_choice_depends_only_on_seed_and_prompt() -> None:
    prompts = [canonical_prompt(*c) for c in all_combinations()]
    upsampler = TemplateUpsampler(seed=3)
    first = upsampler(prompts)
    assert upsampler(prompts[::-1]) == first[::-1]  # independent of the batch around a prompt
    assert TemplateUpsampler(seed=3)(prompts) == first
    assert TemplateUpsampler(seed=4)(prompts) != first
    assert len({text.split(" ", 3)[1] for text in first}) == len(DESCRIPTIVE_TEMPLATES)  # all three used


def test_image_size_sets_the_canvas_and_extent() -> None:
    (text,) = TemplateUpsampler(template_index=0, image_size=64)(["a green square in the right"])
    assert "about 22 pixels across on a 64 by 64 pixel canvas" in text


def test_user_template_wraps_any_prompt() -> None:
    upsampler = build_upsampler("template", template="A detailed photo of {prompt}, studio lighting")
    assert upsampler(["a dog", "a red circle"]) == [
        "A detailed photo of a dog, studio lighting",
        "A detailed photo of a red circle, studio lighting",
    ]
    with pytest.raises(ConfigError, match=r"\{prompt\}"):
        build_upsampler("template", template="no placeholder")


def test_none_and_bad_choices() -> None:
    assert build_upsampler("none")(["a", "b"]) == ["a", "b"]
    with pytest.raises(
        ConfigError, match="unknown upsampler 'llm'; choose one of: none, template, causal_lm"
    ):
        build_upsampler("llm")
    with pytest.raises(ConfigError, match="upsampler=template has no option model"):
        build_upsampler("template", model="gpt2")
    with pytest.raises(ConfigError, match="template_index=3"):
        build_upsampler("template", template_index=3)
    with pytest.raises(ConfigError, match=r"needs upsampler\.model"):
        build_upsampler("causal_lm")


# --- causal LM ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_gpt2"))


def test_saved_tokenizer_loads_back_through_auto_tokenizer(tiny_lm: Path) -> None:
    assert isinstance(AutoTokenizer.from_pretrained(tiny_lm), ByT5Tokenizer)


def test_causal_lm_is_deterministic_and_batching_does_not_change_it(tiny_lm: Path) -> None:
    prompts = ["a red circle in the top left", "a cat", "a blue square in the center of the picture"]
    options = {"model": str(tiny_lm), "instruction": "Describe: {prompt}\n", "max_new_tokens": 12}
    greedy = build_upsampler("causal_lm", **options, batch_size=3)(prompts)
    assert build_upsampler("causal_lm", **options, batch_size=1)(prompts) == greedy  # left padding is inert
    assert len(greedy) == 3 and all(isinstance(t, str) and t and "\n" not in t for t in greedy)
    sampled = build_upsampler("causal_lm", **options, temperature=1.0, seed=5)
    first = sampled(prompts)
    assert sampled(prompts) == first
    assert build_upsampler("causal_lm", **options, temperature=1.0, seed=6)(prompts) != first


def test_causal_lm_returns_only_the_continuation(tmp_path: Path) -> None:
    upsampler = build_upsampler(
        "causal_lm", model=str(save_tiny_lm(tmp_path, constant_token="x")), max_new_tokens=7
    )
    assert upsampler.instruction == DEFAULT_INSTRUCTION
    assert upsampler(["a red circle in the top left", "b"]) == ["xxxxxxx", "xxxxxxx"]


def test_empty_continuation_falls_back_to_the_prompt(tmp_path: Path) -> None:
    upsampler = CausalLMUpsampler(model=str(save_tiny_lm(tmp_path, constant_token="\n")), max_new_tokens=4)
    assert upsampler(["a red circle in the top left"]) == ["a red circle in the top left"]
    assert first_line("  A blue square.\nShort: next") == "A blue square."
    assert first_line(" \n ") == ""


def test_prompt_longer_than_the_lm_context_is_one_error(tmp_path: Path) -> None:
    upsampler = CausalLMUpsampler(model=str(save_tiny_lm(tmp_path, n_positions=128)), max_new_tokens=8)
    with pytest.raises(ConfigError, match="exceed the LM's 128 positions"):
        upsampler(["a red circle"])  # the default instruction alone is ~500 bytes


def test_missing_model_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="no such directory") as info:
        build_upsampler("causal_lm", model=str(tmp_path / "nothing"))
    assert "\n" not in str(info.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ConfigError, match=r"upsampler\.model=t2i-train/no-such-lm: no causal LM found"
    ) as info:
        build_upsampler("causal_lm", model="t2i-train/no-such-lm")
    assert "HF_HUB_OFFLINE" in str(info.value)
