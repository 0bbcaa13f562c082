"""T5 encoder (transformers' ``T5EncoderModel``) behind the ``TextEncoder`` interface.

Two ways to build it:

- ``pretrained="google/t5-v1_1-xxl"`` (or a local directory written by ``save_pretrained``): weights come
  from ``from_pretrained`` — but only while ``t2i_train.models.loading.weight_loading_enabled()``; otherwise (the
  summary CLI on the meta device) the same architecture is built from the explicit dimensions, which must
  therefore describe the pretrained model.
- ``pretrained=None``: a randomly initialised encoder from the explicit dimensions. The weights are drawn
  from a private RNG seeded with ``init_seed``, so every process (and every run) builds the same encoder
  without downloading anything — the tiny configs rely on that.

The tokenizer is made on first use (``ByT5Tokenizer`` for byte vocabularies, which needs no files;
``AutoTokenizer.from_pretrained`` otherwise), so constructing the encoder on the meta device reads nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

from t2i_train.errors import ConfigError
from t2i_train.models.loading import weight_loading_enabled
from t2i_train.text.base import PromptCache, TextEncoder

BYTE_TOKENIZER = "byt5"
#: CLIP's BPE vocabulary (49,408 ids, from open_clip's bundled file): one token per common word, no download
CLIP_BPE = "clip_bpe"


class T5TextEncoder(TextEncoder):
    """Frozen-by-the-family T5 encoder.

    Args:
        pretrained: a transformers name or local directory to load, or None for random weights.
        d_model, d_ff, num_layers, num_heads, d_kv, vocab_size, feed_forward_proj: the architecture (T5Config
            names); used to build random weights, and checked against the pretrained config when loading.
        max_length: prompts are truncated to this many tokens (EOS included).
        init_seed: seed of the random initialisation (pretrained=None).
        tokenizer: "byt5" for the byte tokenizer, "clip_bpe" for CLIP's BPE (set vocab_size=49408), a transformers name, or None (= ``pretrained`` if set, else
            "byt5").
        padding: "longest" (pad to the batch's longest prompt) or "max_length" (fixed shapes).
        dtype: store the (frozen) weights in this dtype, e.g. "bfloat16" halves T5-XXL's 19 GB; None = fp32.
        cache_size: remember the output for this many distinct prompts while the encoder is frozen and in
            eval mode (see :class:`PromptCache`); 0 = off.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        d_model: int = 64,
        d_ff: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        d_kv: int = 16,
        vocab_size: int = 384,
        feed_forward_proj: str = "gated-gelu",
        max_length: int = 64,
        init_seed: int = 0,
        tokenizer: str | None = None,
        padding: str = "longest",
        dtype: str | None = None,
        cache_size: int = 0,
    ) -> None:
        super().__init__()
        if padding not in ("longest", "max_length"):
            raise ConfigError(f"text_encoder.padding must be 'longest' or 'max_length', got {padding!r}")
        dims = dict(
            d_model=d_model,
            d_ff=d_ff,
            num_layers=num_layers,
            num_heads=num_heads,
            d_kv=d_kv,
            vocab_size=vocab_size,
            feed_forward_proj=feed_forward_proj,
        )
        self.pretrained = pretrained
        self.max_length = max_length
        self.padding = padding
        self.tokenizer_name = tokenizer or pretrained or BYTE_TOKENIZER
        self._tokenizer: Any = None
        torch_dtype = _torch_dtype(dtype)
        #: True when the weights came from ``from_pretrained`` (they are then left out of training checkpoints)
        self.loaded_pretrained = bool(pretrained and weight_loading_enabled())
        if self.loaded_pretrained:
            # dropout off: the encoder is a frozen feature extractor, its output must be deterministic
            self.model = T5EncoderModel.from_pretrained(pretrained, dropout_rate=0.0, dtype=torch_dtype)
            _check_dims(pretrained, self.model.config, dims)
        else:
            config = T5Config(**dims, dropout_rate=0.0, is_encoder_decoder=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                self.model = T5EncoderModel(config)
        self.model.to(torch_dtype)
        self.dim = d_model
        self.cache = PromptCache(cache_size) if cache_size > 0 else None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.tokenizer_name == BYTE_TOKENIZER:
                self._tokenizer = ByT5Tokenizer()
            elif self.tokenizer_name == CLIP_BPE:
                from t2i_train.text.clip_bpe import clip_bpe_tokenizer

                self._tokenizer = clip_bpe_tokenizer()
            else:
                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        return self._tokenizer

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] and mask [B, L] (bool) on the encoder's device."""
        out = self.tokenizer(
            list(prompts),
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = self.device
        return out["input_ids"].to(device), out["attention_mask"].to(device).bool()

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        frozen = not self.training and not any(p.requires_grad for p in self.parameters())
        if self.cache is None or not frozen or not prompts:
            return self.encode(prompts)
        pad_to = self.max_length if self.padding == "max_length" else None
        return self.cache(list(prompts), self.encode, pad_to)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder (no cache): embeddings [B, L, dim] (zero on padding) and mask [B, L]."""
        ids, mask = self.tokenize(prompts)
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden * mask[..., None].to(hidden.dtype), mask


def _torch_dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"text_encoder.dtype must name a torch dtype (e.g. bfloat16), got {name!r}")
    return dtype


def _check_dims(name: str, config: T5Config, dims: dict[str, Any]) -> None:
    """The explicit dims are what the meta-device summary uses: insist they describe the loaded model."""
    wrong = {k: (v, getattr(config, k, None)) for k, v in dims.items() if getattr(config, k, None) != v}
    if wrong:
        detail = ", ".join(
            f"{k}: config {mine} vs pretrained {theirs}" for k, (mine, theirs) in wrong.items()
        )
        raise ConfigError(f"text_encoder dims do not match pretrained {name!r} ({detail}); fix the config")
