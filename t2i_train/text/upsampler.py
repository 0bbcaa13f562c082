"""Caption upsampling at sampling time (DALL-E 3, Betker et al. 2023, section 3.5 / appendix C).

A model trained on long descriptive captions follows short user prompts poorly; DALL-E 3 therefore rewrites
("upsamples") each short prompt into a descriptive caption before encoding it. Three upsamplers, all
``Upsampler(prompts: list[str]) -> list[str]`` and built by :func:`build_upsampler`:

- ``none``: prompts unchanged.
- ``template``: deterministic. For the shapes world, parse colour / shape / position out of the prompt and fill
  one of the shapes ``DESCRIPTIVE_TEMPLATES`` (the captions ``caption_keys=[descriptive]`` trains on); or, with
  ``template="A detailed photo of {prompt}, ..."``, wrap any prompt in a user string.
- ``causal_lm``: any transformers causal LM continues a few-shot instruction; its first generated line is the
  upsampled prompt.
"""

from __future__ import annotations

import inspect
import logging
import random
import re
from typing import Any

import torch

from t2i_train.data.synthetic import (
    BACKGROUND_NAME,
    COLOURS,
    DESCRIPTIVE_TEMPLATES,
    EXTENT_FRACTION,
    POSITION_NAMES,
    SHAPES,
)
from t2i_train.errors import ConfigError
from t2i_train.text.causal_lm import (
    appends_eos,
    first_line,
    lm_max_positions,
    load_causal_lm,
    sampling_options,
    seeded_generate,
)

log = logging.getLogger(__name__)

KINDS = ("none", "template", "causal_lm")
NEUTRAL_SIZE_WORD = "medium-sized"
# spelling variants mapped onto the shapes vocabulary
POSITION_ALIASES = {"centre": "center", "middle": "center"}


class Upsampler:
    """Maps short prompts to the prompts the image model is given (same length, same order)."""

    kind = "none"

    def __call__(self, prompts: list[str]) -> list[str]:
        return list(prompts)


# --- template ---------------------------------------------------------------------------------------------


def _alternation(words: list[str]) -> re.Pattern[str]:
    # longest first, so "top left" wins over "top" and "left" at the same offset
    ordered = sorted(words, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in ordered) + r")\b")


_COLOUR_RE = _alternation(list(COLOURS))
_SHAPE_RE = _alternation(list(SHAPES))
_POSITION_RE = _alternation([*POSITION_NAMES, *POSITION_ALIASES])


def parse_shapes_prompt(prompt: str) -> tuple[str, str, str] | None:
    """(colour, shape, position) named in a shapes prompt, or None unless each occurs exactly once.

    Matching is on whole words, case-insensitive, hyphens read as spaces ("top-left"); a prompt naming two
    colours (two objects, or a colour word elsewhere) is ambiguous and therefore None.
    """
    text = " ".join(prompt.lower().replace("-", " ").split())
    found = []
    for pattern in (_COLOUR_RE, _SHAPE_RE, _POSITION_RE):
        words = {POSITION_ALIASES.get(m, m) for m in pattern.findall(text)}
        if len(words) != 1:
            return None
        found.append(words.pop())
    return found[0], found[1], found[2]


class TemplateUpsampler(Upsampler):
    """Deterministic rewrite: shapes prompts into a descriptive template, or any prompt into ``template``.

    Args:
        template: a user string holding ``{prompt}`` (e.g. "A detailed photo of {prompt}, studio light");
            when given, every prompt is wrapped in it and nothing is parsed.
        template_index: which of the shapes ``DESCRIPTIVE_TEMPLATES``; None = a choice seeded by ``seed`` and
            the prompt (the same prompt always gets the same template, whatever else is in the batch).
        seed: seed of that choice.
        image_size: the canvas size the descriptive captions name; the extent is the nominal 0.34·size and the
            size word neutral ("medium-sized"), since a short prompt says nothing about either.
        background: the background colour the captions name.
    """

    kind = "template"

    def __init__(
        self,
        template: str | None = None,
        template_index: int | None = None,
        seed: int = 0,
        image_size: int = 32,
        background: str = BACKGROUND_NAME,
    ) -> None:
        if template is not None and "{prompt}" not in template:
            raise ConfigError(f"upsampler.template={template!r} must contain {{prompt}}")
        if template_index is not None and not 0 <= template_index < len(DESCRIPTIVE_TEMPLATES):
            raise ConfigError(
                f"upsampler.template_index={template_index}: choose 0..{len(DESCRIPTIVE_TEMPLATES) - 1} "
                "(or null for a seeded choice)"
            )
        self.template = template
        self.template_index = template_index
        self.seed = seed
        self.fields = {
            "size": image_size,
            "extent": round(EXTENT_FRACTION * image_size),
            "size_word": NEUTRAL_SIZE_WORD,
            "background": background,
        }

    def __call__(self, prompts: list[str]) -> list[str]:
        if self.template is not None:
            return [self.template.replace("{prompt}", p) for p in prompts]
        out, unparsed = [], []
        for prompt in prompts:
            triple = parse_shapes_prompt(prompt)
            if triple is None:
                unparsed.append(prompt)
            out.append(prompt if triple is None else self.describe(prompt, *triple))
        if unparsed:
            log.warning(
                "upsampler=template: %d of %d prompts name no single colour, shape and position and pass "
                "through unchanged (e.g. %r)",
                len(unparsed),
                len(prompts),
                unparsed[0],
            )
        return out

    def describe(self, prompt: str, colour: str, shape: str, position: str) -> str:
        """The descriptive caption of one parsed prompt."""
        index = self.template_index
        if index is None:
            index = random.Random(f"{self.seed}\0{prompt}").randrange(len(DESCRIPTIVE_TEMPLATES))
        return DESCRIPTIVE_TEMPLATES[index].format(
            colour=colour, shape=shape, position=position, **self.fields
        )


# --- causal LM --------------------------------------------------------------------------------------------


def _example(short: str) -> str:
    return f"Short: {short}\nDetailed: {TemplateUpsampler(template_index=0)([short])[0]}\n"


DEFAULT_INSTRUCTION = (
    "Rewrite each short image prompt as one long, detailed caption. Keep every object, colour and position "
    "of the short prompt, describe the background and the sizes, and invent nothing else.\n"
    + _example("a red circle in the top left")
    + _example("a blue square in the center")
)
QUERY = "Short: {prompt}\nDetailed:"


class CausalLMUpsampler(Upsampler):
    """A transformers causal LM continues ``instruction`` + "Short: {prompt}\\nDetailed:".

    Args:
        model: a transformers model name or a ``save_pretrained`` directory (model and tokenizer).
        instruction: the few-shot prefix; None = ``DEFAULT_INSTRUCTION`` (a DALL-E-3-style instruction with
            two shapes examples). If it contains ``{prompt}`` it is the whole query, with the prompt put there.
        max_new_tokens: the longest continuation.
        temperature: 0 = greedy; > 0 samples, seeded by ``seed`` (same seed, same output).
        batch_size: prompts per ``generate`` call (left-padded).
        device: where the LM runs; dtype: e.g. "bfloat16" (None = the checkpoint's default).
    """

    kind = "causal_lm"

    def __init__(
        self,
        model: str | None = None,
        instruction: str | None = None,
        max_new_tokens: int = 96,
        temperature: float = 0.0,
        seed: int = 0,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        if not model:
            raise ConfigError("upsampler=causal_lm needs upsampler.model=<transformers name or directory>")
        if temperature < 0 or max_new_tokens < 1 or batch_size < 1:
            raise ConfigError(
                "upsampler: temperature must be >= 0, max_new_tokens and batch_size >= 1 "
                f"(got {temperature}, {max_new_tokens}, {batch_size})"
            )
        self.instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.batch_size = batch_size
        self.model, self.tokenizer = load_causal_lm(str(model), dtype)
        self.model.to(device or "cpu").eval()
        self.add_special_tokens = not appends_eos(self.tokenizer)

    def query(self, prompt: str) -> str:
        if "{prompt}" in self.instruction:
            return self.instruction.replace("{prompt}", prompt)
        return self.instruction + QUERY.replace("{prompt}", prompt)

    def __call__(self, prompts: list[str]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            out.extend(self.generate(prompts[start : start + self.batch_size], seed=self.seed + start))
        return out

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int) -> list[str]:
        """Upsample one batch; an empty continuation falls back to the prompt itself."""
        device = self.model.device
        enc = self.tokenizer(
            [self.query(p) for p in prompts],
            return_tensors="pt",
            padding=True,
            add_special_tokens=self.add_special_tokens,
        ).to(device)
        length = enc["input_ids"].shape[1]
        self._check_length(length)
        ids = seeded_generate(
            self.model,
            seed,
            **enc,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            **sampling_options(self.temperature),
        )
        texts = self.tokenizer.batch_decode(ids[:, length:], skip_special_tokens=True)
        return [first_line(text) or prompt for text, prompt in zip(texts, prompts)]

    def _check_length(self, length: int) -> None:
        limit = lm_max_positions(self.model)
        if limit and length + self.max_new_tokens > limit:
            raise ConfigError(
                f"upsampler: instruction + prompt ({length} tokens) + max_new_tokens={self.max_new_tokens} "
                f"exceed the LM's {limit} positions; shorten upsampler.instruction or max_new_tokens"
            )


# --- factory ----------------------------------------------------------------------------------------------

_CLASSES: dict[str, type[Upsampler]] = {
    "none": Upsampler,
    "template": TemplateUpsampler,
    "causal_lm": CausalLMUpsampler,
}


def build_upsampler(kind: str, **options: Any) -> Upsampler:
    """``none`` | ``template`` | ``causal_lm`` with that class's keyword options; an unknown kind or option is
    one ConfigError line."""
    if kind not in _CLASSES:
        raise ConfigError(f"unknown upsampler '{kind}'; choose one of: {', '.join(KINDS)}")
    cls = _CLASSES[kind]
    allowed = upsampler_options(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = f"its options: {', '.join(allowed)}" if allowed else "it takes none"
        raise ConfigError(f"upsampler={kind} has no option {', '.join(unknown)}; {known}")
    return cls(**options)


def upsampler_options(kind: str) -> list[str]:
    """The keyword options of one upsampler kind."""
    if _CLASSES[kind].__init__ is object.__init__:
        return []
    params = list(inspect.signature(_CLASSES[kind].__init__).parameters)
    return params[1:]
