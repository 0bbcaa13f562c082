"""A causal language model pre-trained on the shards' captions: the ``lm`` stage-1 family.

GILL (and any stage-2 family that reads or writes text through a frozen LM) needs an LM that knows the language
of its data. This family trains one with next-token cross-entropy on the captions of the shards, every caption
style of a sample in turn, and ``load_frozen_lm`` gives it to stage-2 families, frozen::

    python -m t2i_train experiment=shapes_lm hydra.run.dir=runs/lm
    lm = load_frozen_lm(checkpoint="runs/lm/checkpoints/last.ckpt", hidden_size=128)
    lm.complete(["the image shows a single filled"])    # greedy continuation: "red circle in the ..."

- ``lm``: a transformers causal LM: ``pretrained`` (a name or folder), or random from ``config`` (a
  ``GPT2Config`` dict over ``TINY_LM_CONFIG``, or any architecture with a ``model_type`` key, e.g. OPT-6.7B's;
  see ``t2i_train.text.causal_lm.build_causal_lm``), initialised from ``init_seed`` in a forked RNG.
- tokenizer: ``clip_bpe`` (default: CLIP's word-level BPE vocabulary, built offline), a name or folder, or None
  for ``pretrained``'s own (ByT5's bytes without ``pretrained``).
- A taught text is ``[start] text [EOS]``, at most ``max_tokens`` ids: ``[start]`` is what the tokenizer itself
  puts first with ``add_special_tokens=True`` (CLIP's ``<|startoftext|>``; nothing for GPT-2 / ByT5), and every
  token after it is taught, EOS included. ``complete`` and stage-2 families prompt with the same start
  (``encode``), so the LM continues a prompt as it read texts in training.
- ``text_keys``: where the texts are (``caption``, the data module's pick; ``json.<field>`` of the sample's
  JSON). Each sample is taught one of the distinct texts it has, drawn uniformly: from torch's RNG in training
  (seeded per step by the task), from a crc32 hash of the sample key in evaluation (reproducible validation
  loss), as the captioner draws its styles.
- ``join_prob``: the probability that a training sample is taught all its distinct texts in one sequence
  instead (``[start] a [EOS] [start] b [EOS] ...``, in a random order). The later texts of such a sequence
  repeat what the first one named, so the LM learns to carry words over from its context, which a frozen LM
  needs to read a stage-2 family's soft tokens (GILL's visual prefix, its [IMG] states): trained on single
  captions only, the shapes LM's next-token loss after a trained 2-token image prefix was 1.09 nats with the
  right image and 1.18 with another one (300 steps of the prefix alone).
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Block, GPT2LMHeadModel
from transformers.models.opt.modeling_opt import OPTDecoderLayer, OPTForCausalLM

from t2i_train.errors import ConfigError
from t2i_train.losses.cross_entropy import IGNORE_INDEX, NextTokenCrossEntropy
from t2i_train.models.base import Family
from t2i_train.models.loading import no_weight_loading, weight_loading_enabled
from t2i_train.text.causal_lm import (
    CLIP_BPE,
    build_causal_lm,
    build_tokenizer,
    cut_at_eos,
    lm_hidden_size,
    lm_max_positions,
    seeded_generate,
    start_ids,
)

#: The tiny LM of the shapes world: 4 GPT-2 blocks of width 128 (4 heads), 128 positions, no dropout.
TINY_LM_CONFIG: dict[str, Any] = {
    "n_layer": 4,
    "n_embd": 128,
    "n_head": 4,
    "n_positions": 128,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
DEFAULT_TEXT_KEYS: tuple[str, ...] = ("caption", "json.caption", "json.descriptive", "json.alt_text")
_SPACED_PUNCTUATION = re.compile(r" ([,.;:!?])")
_SPACED_DIGITS = re.compile(r"(?<=\d) (?=\d)")
_SPACED_HYPHEN = re.compile(r"(?<=\w) - (?=\w)")


# ------------------------------------------------------------------------------------------------ helpers
def check_hidden_size(actual: int, expected: int | None, key: str, source: str) -> None:
    """ConfigError (one line) when ``expected`` is set and the LM of ``source`` has another hidden size."""
    if expected is not None and int(expected) != int(actual):
        raise ConfigError(
            f"{key}={expected} but the LM of {source} has hidden size {actual}; set {key}={actual} or pick an "
            f"LM of hidden size {expected}"
        )


def _check_text_keys(keys: Sequence[str], key: str) -> list[str]:
    keys = list(keys)
    bad = [k for k in keys if k != "caption" and not (k.startswith("json.") and len(k) > len("json."))]
    if not keys or bad:
        raise ConfigError(
            f"{key}.text_keys {keys} must be a non-empty list of caption (the data module's pick) or "
            "json.<field> keys"
        )
    return keys


def _source(pretrained: str | None, config: Mapping[str, Any] | None, key: str) -> str:
    if pretrained:
        return f"{key}.pretrained={pretrained}"
    return f"{key}.config" if config is not None else "the tiny default config"


#: LMs whose logits are exactly ``get_output_embeddings()(base_model(...).last_hidden_state)`` (no soft-capping or
#: scaling of the logits): ``lm_logits`` runs their head on the taught positions only.
HEAD_ON_HIDDEN: tuple[type[nn.Module], ...] = (GPT2LMHeadModel, OPTForCausalLM)


def lm_logits(
    lm: nn.Module, rows: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM on right-padded rows of ids: (logits [B, T, V], targets [B, T]).

    ``targets[:, t]`` is the row's token at ``t + 1`` (the next token), ``IGNORE_INDEX`` past its end and at
    its last position: every token of a row but its first is taught (``prefix_lm_logits`` with an empty prefix,
    fed ``input_ids`` so LMs that scale or project their embeddings get them as they expect).

    For ``HEAD_ON_HIDDEN`` LMs the output head runs on the taught positions only and the logits elsewhere are
    0: with CLIP's 49,408 ids the head is most of a tiny LM's cost, and a batch of one descriptive caption
    and many short ones is mostly padding (2.4x fewer head rows on the shapes captions).
    """
    device = lm.get_input_embeddings().weight.device
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        targets[i, : len(row) - 1] = ids[i, 1 : len(row)]
        mask[i, : len(row)] = 1
    ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
    if not isinstance(lm, HEAD_ON_HIDDEN):
        return lm(input_ids=ids, attention_mask=mask, use_cache=False).logits, targets
    hidden = lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    head = lm.get_output_embeddings()
    keep = targets != IGNORE_INDEX
    logits = hidden.new_zeros((*targets.shape, head.out_features))
    logits[keep] = head(hidden[keep])
    return logits, targets


# ------------------------------------------------------------------------------------------------ family
log = logging.getLogger(__name__)


class CausalLanguageModel(Family):
    """A causal LM trained on the captions of the data (see the module docstring).

    Args:
        pretrained: a transformers causal-LM name or folder to start from (its weights while weight loading is
            on; its architecture, or ``config`` when that has a ``model_type``, when it is off).
        config: the architecture of a random LM: ``GPT2Config`` keys over ``TINY_LM_CONFIG`` (None values keep
            the default), or a dict with ``model_type`` for any transformers architecture. The vocabulary is
            the tokenizer's unless set.
        tokenizer: ``clip_bpe`` (CLIP's BPE, no download), a name or folder; None: ``pretrained``'s (ByT5's
            bytes without one). With ``pretrained``, use its tokenizer (None): its embeddings index it.
        text_keys: where the training texts are: ``caption`` or ``json.<field>``; one is drawn per sample.
        max_tokens: a taught sequence's length limit, start token and EOS included (texts are cut).
        init_seed: seed of the random initialisation (the same LM in every process).
        hidden_size: when set, the LM's hidden size must equal it (a ConfigError names both).
        join_prob: probability that a training sample is taught all its texts in one sequence (see the module
            docstring); never in evaluation, so the validation loss stays per text.
        key: the config node's name in error messages (``load_frozen_lm`` passes ``model.lm``).
    """

    family_name: ClassVar[str] = "lm"
    accepted_losses: ClassVar[tuple[type[nn.Module], ...]] = (NextTokenCrossEntropy,)
    block_classes: ClassVar[tuple[type[nn.Module], ...]] = (GPT2Block, OPTDecoderLayer)

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = CLIP_BPE,
        text_keys: Sequence[str] = DEFAULT_TEXT_KEYS,
        max_tokens: int = 96,
        init_seed: int = 0,
        hidden_size: int | None = None,
        join_prob: float = 0.0,
        key: str = "model",
    ) -> None:
        super().__init__()
        self.text_keys = _check_text_keys(text_keys, key)
        if not 0.0 <= float(join_prob) <= 1.0:
            raise ConfigError(f"{key}.join_prob={join_prob} must be a probability in [0, 1]")
        self.join_prob = float(join_prob)
        self.tokenizer_name = tokenizer or pretrained
        self.tokenizer = _tokenizer_unless_counting(self.tokenizer_name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.lm = build_causal_lm(
                pretrained, config, self.tokenizer, defaults=TINY_LM_CONFIG, key=f"{key}.config"
            )
        self._has_weights = bool(pretrained)
        check_hidden_size(self.width, hidden_size, f"{key}.hidden_size", _source(pretrained, config, key))
        self.start_ids = start_ids(self.tokenizer) if self.tokenizer is not None else []
        self.max_tokens = self._check_max_tokens(int(max_tokens), key)

    def _check_max_tokens(self, max_tokens: int, key: str) -> int:
        limit = lm_max_positions(self.lm)
        if max_tokens < len(self.start_ids) + 2 or (limit is not None and max_tokens > limit):
            raise ConfigError(
                f"{key}.max_tokens={max_tokens} must hold a start token, a text token and EOS "
                f"({len(self.start_ids) + 2}) and fit the LM's {limit} positions"
            )
        return max_tokens

    @property
    def width(self) -> int:
        """The LM's hidden size (what a stage-2 family maps into and reads out of)."""
        return lm_hidden_size(self.lm)

    @property
    def has_weights(self) -> bool:
        """Whether the weights come from outside a random init (``pretrained``, or a checkpoint when loaded by
        ``load_frozen_lm``, whether or not weight loading was on)."""
        return self._has_weights

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.eos_token_id)

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    def encode(self, text: str, eos: bool = True) -> list[int]:
        """``[start] text [EOS]`` as taught (``eos=False``: a prompt to continue), cut to ``max_tokens``."""
        room = self.max_tokens - len(self.start_ids) - int(eos)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])[:room]
        return [*self.start_ids, *ids, *([self.eos_token_id] if eos else [])]

    # ---------------------------------------------------------------------------------------- training
    def sample_texts(self, batch: Mapping[str, Any], index: int) -> list[str]:
        """The distinct texts of sample ``index`` under ``text_keys``, in key order (empty ones left out)."""
        from t2i_train.data.transforms import read_caption

        metas = batch.get("meta") or [{}] * len(batch["caption"])
        texts = []
        for key in self.text_keys:
            if key == "caption":
                text = batch["caption"][index]
                text = text.strip() if isinstance(text, str) else None
            else:
                text = read_caption({}, metas[index] or {}, key)
            if text:
                texts.append(text)
        return list(dict.fromkeys(texts))

    def choose_texts(self, batch: Mapping[str, Any]) -> list[str | None]:
        """One text per sample, uniform over its texts: torch's RNG in training, the key's crc32 in eval."""
        count = len(batch["caption"])
        if self.training:
            draws = torch.rand(count).tolist()
        else:
            keys = batch.get("key") or [str(i) for i in range(count)]
            draws = [zlib.crc32(str(k).encode()) / 2**32 for k in keys]
        out: list[str | None] = []
        for index, u in enumerate(draws):
            texts = self.sample_texts(batch, index)
            out.append(texts[min(int(u * len(texts)), len(texts) - 1)] if texts else None)
        return out

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``logits`` [B, T, V] and ``targets`` [B, T]: the next token of each position, ``IGNORE_INDEX`` on
        padding (and on the whole row of a sample without a text)."""
        join = self.training and self.join_prob > 0
        rows = [
            self.joined_row(batch, i)
            if join and torch.rand(()) < self.join_prob
            else (self.encode(text) if text is not None else self._empty_row())
            for i, text in enumerate(self.choose_texts(batch))
        ]
        logits, targets = lm_logits(self.lm, rows, self.pad_token_id)
        return {"logits": logits, "targets": targets}

    def joined_row(self, batch: Mapping[str, Any], index: int) -> list[int]:
        """All distinct texts of sample ``index``, each as taught, in a random order (torch's RNG), cut to the
        LM's positions."""
        texts = self.sample_texts(batch, index)
        if not texts:
            return self._empty_row()
        order = torch.randperm(len(texts)).tolist()
        row = [i for j in order for i in self.encode(texts[j])]
        limit = lm_max_positions(self.lm)
        return row[:limit] if limit is not None else row

    def _empty_row(self) -> list[int]:
        return list(self.start_ids) or [self.eos_token_id]  # one token: nothing after it is taught

    # ---------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def complete(self, prompts: Sequence[str], max_new_tokens: int = 32, seed: int = 0) -> list[str]:
        """Greedy continuations of ``prompts`` (the new text only, up to EOS), at most ``max_new_tokens``.

        Prompts start like the taught texts (``encode(prompt, eos=False)``); those of one token length run as
        one batch, so no padding changes what the LM sees. CLIP's BPE decodes punctuation, hyphens and each digit
        as separate words (``left , drawn``, ``medium - sized``, ``3 2 pixels``); those spaces are dropped.
        """
        encoded = [self.encode(p, eos=False) or [self.eos_token_id] for p in prompts]
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            groups.setdefault(len(ids), []).append(i)
        out = [""] * len(encoded)
        for length, index in groups.items():
            ids = torch.tensor([encoded[i] for i in index], dtype=torch.long, device=self.device)
            new = self._greedy(ids, max_new_tokens, seed)[:, length:]
            for i, row in zip(index, new.tolist(), strict=True):
                out[i] = self._decode(row)
        return out

    def _greedy(self, ids: torch.Tensor, max_new_tokens: int, seed: int) -> torch.Tensor:
        limit = lm_max_positions(self.lm)
        room = max_new_tokens if limit is None else min(max_new_tokens, limit - ids.shape[1])
        if room <= 0:
            return ids
        return seeded_generate(
            self.lm,
            seed,
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=room,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )

    def _decode(self, ids: Sequence[int]) -> str:
        text = str(
            self.tokenizer.decode(cut_at_eos(ids, self.eos_token_id), skip_special_tokens=True)
        ).strip()
        if type(self.tokenizer).__name__.startswith("CLIPTokenizer"):
            text = _SPACED_PUNCTUATION.sub(r"\1", text)
            text = _SPACED_HYPHEN.sub("-", _SPACED_DIGITS.sub("", text))
        return text


# ------------------------------------------------------------------------------------------------ loader
def _tokenizer_unless_counting(name: str | None) -> Any:
    """The tokenizer; while weights are not being loaded (a meta-device parameter count, a rebuild from a full
    checkpoint) a hub name is only looked up in the local cache, and None when it is not there: counting a
    pretrained LM must not need its files (its architecture comes from ``config``)."""
    counting = not weight_loading_enabled() or torch.empty(0).device.type == "meta"
    if not counting or name in (None, CLIP_BPE) or Path(str(name)).expanduser().exists():
        return build_tokenizer(name)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except OSError:
        log.warning("tokenizer %s is not in the local cache; counting parameters without it", name)
        return None


def _checkpoint_family(path: str, key: str) -> CausalLanguageModel:
    """The ``model=lm`` family of a training checkpoint or export folder, or one ConfigError line."""
    from t2i_train.checkpoint import load_family, read_checkpoint  # lazy: reads checkpoints

    ckpt = read_checkpoint(path)
    target = str((ckpt["t2i_config"].get("model") or {}).get("_target_", ""))
    if not target.endswith(f"{__name__}.{CausalLanguageModel.__name__}"):
        raise ConfigError(f"{key}.checkpoint {path} holds a {target or 'non-t2i'} model, not model=lm")
    family = load_family(path, ckpt=ckpt)
    assert isinstance(family, CausalLanguageModel)
    return family


def _load_checkpoint(model: CausalLanguageModel, path: str, hidden_size: int | None, key: str) -> None:
    """Copy a ``model=lm`` checkpoint's LM into ``model`` (which keeps its configured architecture)."""
    from t2i_train.models.stage1 import load_stage1_weights

    trained = _checkpoint_family(path, key)
    source = f"{key}.checkpoint {path}"
    check_hidden_size(trained.width, hidden_size, f"{key}.hidden_size", source)
    if trained.width != model.width:
        raise ConfigError(
            f"{source} holds an LM of hidden size {trained.width} but {key}.config builds {model.width}; make "
            f"{key}.pretrained / {key}.config describe the checkpoint's LM"
        )
    if trained.tokenizer_name != model.tokenizer_name:
        raise ConfigError(
            f"{source} was trained with tokenizer {trained.tokenizer_name} but {key}.tokenizer is "
            f"{model.tokenizer_name}; set {key}.tokenizer={trained.tokenizer_name}"
        )
    option, part = f"{key}.checkpoint", f"{key.removeprefix('model.')}.config"
    load_stage1_weights(model, path, option, part, "LM", strict=True, loader=lambda _: trained)


def load_frozen_lm(
    checkpoint: str | None = None,
    pretrained: str | None = None,
    config: dict[str, Any] | None = None,
    tokenizer: str | None = CLIP_BPE,
    hidden_size: int | None = None,
    init_seed: int = 0,
    max_tokens: int = 96,
) -> CausalLanguageModel:
    """A frozen LM for a stage-2 family's ``lm`` node (error messages name ``model.lm.<key>``).

    Weights from ``checkpoint`` (a ``model=lm`` training checkpoint or export folder; only while weight loading
    is enabled), else ``pretrained`` (a transformers name or folder: its weights while loading is on, its
    architecture, or ``config``'s with a ``model_type``, when off), else random from ``config`` (smoke tests).
    The architecture is always the one the arguments describe, so a stage-2 checkpoint rebuilt from its config
    (stage-1 paths dropped) has the same modules; a checkpoint that does not fit is one ConfigError line, as is
    an LM (built or in the checkpoint) whose hidden size is not ``hidden_size``.

    The result is in eval mode without gradients, its ``lm`` frozen (external when it has weights from outside
    the run); ``has_weights`` says whether a checkpoint or pretrained name was given.
    """
    key = "model.lm"
    options = {"config": config, "tokenizer": tokenizer, "max_tokens": max_tokens, "init_seed": init_seed}
    if checkpoint and weight_loading_enabled():
        with no_weight_loading():  # the checkpoint's weights replace any pretrained ones: skip the download
            model = CausalLanguageModel(pretrained, hidden_size=hidden_size, key=key, **options)
        _load_checkpoint(model, str(checkpoint), hidden_size, key)
    else:
        model = CausalLanguageModel(pretrained, hidden_size=hidden_size, key=key, **options)
    model._has_weights = bool(checkpoint or pretrained)
    model.freeze("lm", external=model.has_weights)
    model.requires_grad_(False)
    return model.eval()
