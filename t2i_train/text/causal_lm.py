"""A transformers causal LM as a component: building and loading it, feeding it a prefix of embeddings, decoding.

Shared by the families and tools that drive a causal LM:

- the captioner (``models/captioner.py``): a GPT-2 from a config dict (or any pretrained causal LM) fed an image
  prefix through ``inputs_embeds``, taught captions after it, decoded greedy / beam / nucleus;
- the caption upsampler (``text/upsampler.py``): a pretrained causal LM continuing a few-shot text prompt;
- GILL next: a frozen pretrained LM taking image-prefix embeddings and producing [IMG] tokens.

Four groups of helpers:

- **build / load**: :func:`build_tokenizer` (a name or folder, ``clip_bpe`` (CLIP's word-level BPE, built
  offline) or ByT5's byte-level tokenizer, which needs no file), :func:`build_causal_lm` (pretrained weights,
  a ``GPT2LMHeadModel`` from a ``GPT2Config`` dict sized to the tokenizer, or any architecture from a dict with
  ``model_type``), :func:`load_causal_lm` (model + left-padding tokenizer, with one-line errors and
  ``HF_HUB_OFFLINE``), :func:`add_tokens` (new special tokens such as GILL's [IMG] tokens, embeddings
  grown to match), :func:`start_ids`, :func:`lm_width`, :func:`lm_hidden_size`, :func:`lm_max_positions`;
- **prefix**: :func:`mapper`, :class:`EmbeddingPrefix` (ClipCap), :class:`PatchPrefix`; :func:`embed_ids`,
  :func:`prefix_lm_logits` (the LM on [prefix, tokens] with next-token targets on the taught tokens only);
- **decoding options**: :func:`decoding_options` (``greedy`` / ``beam`` / ``top_p``), :func:`rerank_options`,
  :func:`sampling_options` (a temperature on the LM's own generation defaults); all validate before any model
  loads, so a bad option is one ConfigError line;
- **decoding**: :func:`seeded_generate` (transformers ``generate`` under a private, seeded RNG: the same seed
  gives the same output whatever the global RNG state), :func:`decode_until_eos`, :func:`first_line`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from t2i_train.errors import ConfigError
from t2i_train.losses.cross_entropy import IGNORE_INDEX
from t2i_train.models.loading import weight_loading_enabled

DECODING_METHODS: tuple[str, ...] = ("greedy", "beam", "top_p")
#: The tiny LM of the shapes world: 4 GPT-2 blocks of width 128 (over ByT5's 384 byte-level ids by default).
TINY_GPT2_CONFIG: dict[str, Any] = {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 256}


# ------------------------------------------------------------------------------------------------ build / load
def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for the local Hugging Face cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~"))


def byte_tokenizer() -> Any:
    """ByT5's byte-level tokenizer (384 ids, EOS 1, pad 0): no vocabulary file, nothing to download."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


#: ``build_tokenizer``'s name of CLIP's BPE vocabulary (``t2i_train.text.clip_bpe``), built without a download.
CLIP_BPE = "clip_bpe"


def clip_tokenizer_copy() -> Any:
    """CLIP's BPE tokenizer as a ``CLIPTokenizer`` (EOS ``<|endoftext|>``, also its pad), a private copy.

    ``clip_bpe_tokenizer()`` is cached (one instance per process); a copy keeps ``add_tokens`` on one model's
    tokenizer (GILL's [IMG] tokens) out of every other tokenizer built afterwards. A deep copy is ~10x faster
    than a fresh build, but loses the ``</w>`` stripping ``CLIPTokenizer`` patches onto its backend's
    ``decode``: it is patched again.
    """
    import copy

    from t2i_train.text.clip_bpe import clip_bpe_tokenizer

    tokenizer = copy.deepcopy(clip_bpe_tokenizer())
    rewrap = getattr(tokenizer, "_wrap_decode_method_backend_tokenizer", None)
    if callable(rewrap):
        rewrap()
    return tokenizer


def build_tokenizer(name: str | None) -> Any:
    """``AutoTokenizer.from_pretrained(name)``; ``"clip_bpe"``: CLIP's BPE vocabulary (word-level, 49,408 ids,
    no download: a tiny LM reads words far better than bytes); None: the byte-level ByT5 tokenizer.

    The tokenizer must have an EOS token: the prefix LMs here end every taught sequence with it. CLIP's pads
    with EOS (its own pad token is ``<|endoftext|>``; set so if a version has none).
    """
    if name is None:
        return byte_tokenizer()
    tokenizer = clip_tokenizer_copy() if name == CLIP_BPE else AutoTokenizer.from_pretrained(name)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {name!r} has no EOS token; the captioner ends captions with one")
    if name == CLIP_BPE and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_causal_lm(
    pretrained: str | None,
    config: Mapping[str, Any] | None,
    tokenizer: Any,
    defaults: Mapping[str, Any] = TINY_GPT2_CONFIG,
    key: str = "model.lm_config",
) -> nn.Module:
    """The causal LM: ``pretrained``'s weights (or only its architecture when weight loading is off or on the
    meta device), else a randomly initialised ``GPT2LMHeadModel`` from ``defaults`` updated by ``config``
    (``GPT2Config`` keys; a None value keeps the default). Vocabulary size and special ids default to the
    tokenizer's; ``key`` names ``config`` in the error for a vocabulary smaller than the tokenizer's.

    A ``config`` with ``model_type`` (``opt``, ``llama``, ...) is any transformers architecture:
    ``AutoConfig.for_model(model_type, **rest)`` (``defaults`` do not apply). With ``pretrained`` set, such a
    config is the architecture built when weights are not loaded (``no_weight_loading()``, the meta device), so
    a summary of a paper-size LM reads no file and needs no network; when they are loaded, the pretrained
    model's own config is used and ``config`` is ignored.

    The random init draws from the global RNG: seed it (in a ``fork_rng``) for the same LM in every process.
    """
    typed = config is not None and config.get("model_type") is not None
    if pretrained:
        if weight_loading_enabled() and torch.empty(0).device.type != "meta":
            return AutoModelForCausalLM.from_pretrained(pretrained)
        if not typed:
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pretrained))
    if typed:
        return _typed_causal_lm(dict(config or {}), tokenizer, key)
    vocab_size = len(tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    options = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad, **defaults}
    options.update({k: v for k, v in dict(config or {}).items() if v is not None})
    options["vocab_size"] = options.get("vocab_size") or vocab_size
    if options["vocab_size"] < vocab_size:
        raise ConfigError(f"{key}.vocab_size {options['vocab_size']} < the tokenizer's {vocab_size}")
    return GPT2LMHeadModel(GPT2Config(**options))


def _special_ids(tokenizer: Any) -> dict[str, int]:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def _typed_causal_lm(config: dict[str, Any], tokenizer: Any, key: str) -> nn.Module:
    """``AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **rest))``; the vocabulary size and
    special ids default to the tokenizer's (None values too)."""
    model_type = str(config.pop("model_type"))
    options = {k: v for k, v in config.items() if v is not None}
    if tokenizer is None:  # counting parameters without the tokenizer files: the config says it all
        if "vocab_size" not in options:
            raise ConfigError(f"{key}.vocab_size is needed to build {model_type} without its tokenizer")
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **options))
    for name, value in _special_ids(tokenizer).items():
        options.setdefault(name, value)
    options.setdefault("vocab_size", len(tokenizer))
    if options["vocab_size"] < len(tokenizer):
        raise ConfigError(f"{key}.vocab_size {options['vocab_size']} < the tokenizer's {len(tokenizer)}")
    try:
        arch = AutoConfig.for_model(model_type, **options)
    except ValueError as exc:
        raise ConfigError(f"{key}.model_type={model_type}: {str(exc).splitlines()[0]}") from None
    return AutoModelForCausalLM.from_config(arch)


def load_causal_lm(
    name: str,
    dtype: str | None = None,
    key: str = "upsampler.model",
    dtype_key: str = "upsampler.dtype",
) -> tuple[nn.Module, Any]:
    """``AutoModelForCausalLM`` and its left-padding ``AutoTokenizer`` (with a pad token), or one ConfigError
    naming ``key`` / ``dtype_key`` (the config keys the user set).

    Left padding keeps every row's last real token at the end, where ``generate`` continues it. With
    ``HF_HUB_OFFLINE`` set only local directories and the Hugging Face cache are read.
    """
    path = Path(name).expanduser()
    if path.exists():
        name = str(path)
    elif _looks_like_path(name):
        raise ConfigError(f"{key}={name}: no such directory (give a save_pretrained folder)")
    options: dict[str, Any] = {"local_files_only": True} if hub_offline() else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, padding_side="left", **options)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype(dtype, dtype_key), **options)
    except (OSError, ValueError) as exc:
        where = (
            "in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
            if hub_offline()
            else "locally or online"
        )
        raise ConfigError(f"{key}={name}: no causal LM found {where}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def torch_dtype(name: str | None, key: str = "upsampler.dtype") -> torch.dtype | str:
    """A torch dtype by name for ``from_pretrained``; None is ``"auto"`` (the checkpoint's own)."""
    if name is None:
        return "auto"
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ConfigError(f"{key}={name} is not a torch dtype (e.g. bfloat16, float16, float32)")
    return getattr(torch, name)


def appends_eos(tokenizer: Any) -> bool:
    """Whether the tokenizer ends every encoded text with EOS (T5-style), which would stop a continuation
    before it starts: callers then encode prompts with ``add_special_tokens=False``."""
    probe = tokenizer("x")["input_ids"]
    return bool(probe) and probe[-1] == tokenizer.eos_token_id


def add_tokens(lm: Any, tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` (e.g. GILL's ``[IMG0]``..``[IMG7]``) to the tokenizer as special tokens, each one id, and
    grow the LM's input and output embeddings to match; the existing rows keep their values. Returns the
    tokens' ids, in order.

    The new rows are initialised like the LM's own weights (from the global RNG: seed it for reproducible rows);
    a frozen LM whose new rows must learn needs them made trainable by the caller.
    """
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(list(tokens))]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"tokens {list(tokens)} must be distinct")
    return ids


def lm_width(lm: nn.Module) -> int:
    """The width of the LM's token embeddings (what a prefix must produce)."""
    return int(lm.get_input_embeddings().embedding_dim)


def lm_hidden_size(lm: nn.Module) -> int:
    """The LM's hidden size (``config.hidden_size``: GPT-2's ``n_embd``, OPT's ``hidden_size``); OPT-350m's
    token embeddings are narrower (``word_embed_proj_dim``, what :func:`lm_width` gives)."""
    return int(lm.config.hidden_size)


def start_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text with ``add_special_tokens=True`` (CLIP's ``<|startoftext|>``;
    none for GPT-2 or ByT5): an LM trained on texts that start with them is prompted with them too."""
    full = list(tokenizer("x")["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def lm_max_positions(lm: nn.Module) -> int | None:
    """The LM's context length (``n_positions`` or ``max_position_embeddings``), None when unbounded."""
    config = lm.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# ------------------------------------------------------------------------------------------------ prefix
def mapper(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    """LayerNorm, then a 2-layer GELU MLP (``hidden > 0``) or one linear map (``hidden == 0``)."""
    if hidden <= 0:
        return nn.Sequential(nn.LayerNorm(dim_in), nn.Linear(dim_in, dim_out))
    return nn.Sequential(
        nn.LayerNorm(dim_in), nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out)
    )


class EmbeddingPrefix(nn.Module):
    """Pooled embedding [B, E] -> ``tokens`` LM tokens [B, tokens, width] (ClipCap's MLP mapper)."""

    def __init__(self, embed_dim: int, width: int, tokens: int, hidden: int) -> None:
        super().__init__()
        self.tokens, self.width = tokens, width
        self.mlp = mapper(embed_dim, hidden, tokens * width)

    def forward(self, embedding: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(embedding).view(embedding.shape[0], self.tokens, self.width)


class PatchPrefix(nn.Module):
    """Final ViT tokens (CLS + patches) [B, N, vision width] -> [B, N, LM width], projected token by token."""

    def __init__(self, vision_width: int, width: int, hidden: int) -> None:
        super().__init__()
        self.mlp = mapper(vision_width, hidden, width)

    def forward(self, embedding: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        if patches is None:
            raise ValueError("prefix=patches needs the CLIP patch tokens")
        return self.mlp(patches)


def embed_ids(lm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Token ids [B, T] -> the LM's input embeddings [B, T, width] (to concatenate after a prefix)."""
    return lm.get_input_embeddings()(ids)


def prefix_lm_logits(
    lm: nn.Module, prefix: torch.Tensor, rows: Sequence[tuple[Sequence[int], int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM on [prefix, row tokens], right-padded to the longest row: (logits [B, P+T, V], targets [B, P+T]).

    ``rows``: per sample, the token ids after the prefix and how many of them lead in untaught (a prompt).
    ``targets[:, t]`` is the token at ``t + 1`` where it is taught (the row's ids after its leading ones),
    ``IGNORE_INDEX`` elsewhere (the prefix, the prompt, padding), so position t's logits predict it.
    """
    device, plen = prefix.device, prefix.shape[1]
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), plen + length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), plen + length), dtype=torch.long)
    for i, (row, prompt_len) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row))
        taught = list(row[prompt_len:])
        labels[i, plen + prompt_len : plen + len(row)] = torch.tensor(taught, dtype=torch.long)
        mask[i, : plen + len(row)] = 1
    embeds = torch.cat([prefix, embed_ids(lm, ids.to(device))], dim=1)
    logits = lm(inputs_embeds=embeds, attention_mask=mask.to(device), use_cache=False).logits
    targets = torch.cat([labels[:, 1:], labels[:, :1].fill_(IGNORE_INDEX)], dim=1)
    return logits, targets.to(device)


# ------------------------------------------------------------------------------------------------ options
def decoding_options(method: str, num_beams: int, top_p: float, temperature: float) -> dict[str, Any]:
    """``generate`` options of one decoding ``method``: ``greedy``; ``beam`` (``num_beams``); ``top_p``
    (nucleus sampling at ``temperature``, no top-k cut)."""
    if method == "greedy":
        return {"do_sample": False, "num_beams": 1}
    if method == "beam":
        if num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {num_beams}")
        return {"do_sample": False, "num_beams": int(num_beams)}
    if method == "top_p":
        if not 0.0 < top_p <= 1.0 or temperature <= 0:
            raise ConfigError(f"top_p must be in (0, 1] and temperature > 0 (got {top_p}, {temperature})")
        return {"do_sample": True, "top_p": float(top_p), "top_k": 0, "temperature": float(temperature)}
    raise ConfigError(f"decoding method must be one of {', '.join(DECODING_METHODS)}, got {method!r}")


def rerank_options(method: str, num_beams: int, rerank: int) -> dict[str, Any]:
    """``generate`` options that return ``rerank`` candidates per input (none for ``rerank`` 0 or 1)."""
    if rerank < 0:
        raise ConfigError(f"rerank must be >= 0 candidates, got {rerank}")
    if rerank <= 1:
        return {}
    if method == "greedy":
        raise ConfigError(
            f"rerank={rerank} needs candidates: use method=beam (the {rerank} best beams) or method=top_p"
        )
    options: dict[str, Any] = {"num_return_sequences": int(rerank)}
    if method == "beam":
        options["num_beams"] = max(int(num_beams), int(rerank))
    return options


def sampling_options(temperature: float) -> dict[str, Any]:
    """0: greedy; > 0: sampling at ``temperature`` with the rest of the LM's own generation config (its
    ``top_k`` / ``top_p`` defaults apply, unlike ``decoding_options("top_p", ...)``)."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature}
    return {"do_sample": False}


# ------------------------------------------------------------------------------------------------ decoding
def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG a seeded decode on ``device`` draws from (for ``fork_rng``)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def seeded_generate(lm: Any, seed: int, **kwargs: Any) -> torch.Tensor:
    """``lm.generate(**kwargs)`` drawing its samples from ``torch.manual_seed(seed)`` in a forked RNG: the same
    inputs and seed give the same ids, and the caller's RNG stream is left as it was."""
    with torch.random.fork_rng(devices=rng_devices(lm.device)):
        torch.manual_seed(seed)
        return lm.generate(**kwargs)


def cut_at_eos(ids: Sequence[int], eos_token_id: int) -> list[int]:
    """The ids before the first EOS (all of them when there is none)."""
    ids = list(ids)
    return ids[: ids.index(eos_token_id)] if eos_token_id in ids else ids


def decode_until_eos(tokenizer: Any, ids: Sequence[int], eos_token_id: int) -> str:
    """The text of the ids before the first EOS, special tokens dropped, stripped."""
    return str(tokenizer.decode(cut_at_eos(ids, eos_token_id), skip_special_tokens=True)).strip()


def first_line(text: str) -> str:
    """The generated continuation up to its first newline, stripped."""
    return text.strip().split("\n", 1)[0].strip()
