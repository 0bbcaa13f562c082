"""CM3leon (Yu et al. 2023): one decoder-only transformer over text and image tokens, trained with the CM3
objective, decoding text -> image and image -> text.

Token space (:class:`TokenSpace`): the text tokenizer's ids first, then the frozen VQGAN's codes shifted past
them, then the specials ``<break>`` (between modalities), ``<eod>`` (end of document), ``<eoss>`` (end of a
moved span), ``<mask>`` (the dropped condition of CFG's unconditional stream), ``<pad>``, and the CM3 sentinels
``<sentinel:0..S-1>``.

A training document is ``text <break> image <eod>`` or ``image <break> text <eod>`` (the order drawn per sample,
so one model does both directions). The CM3 objective (:func:`sample_spans`, :func:`cm3_document`): n ~
Poisson(λ) spans (clamped to ``max_spans``; n = 0, a plain causal document, a third of the time at λ = 1), each
inside one modality segment and never overlapping another, are cut out, replaced in place by
``<sentinel:i>`` and appended after the document body as ``<sentinel:i> span <eoss>``; the whole is truncated
to ``max_length``. The loss is next-token CE with weight 0 where the target is a sentinel (``loss=cm3``).

Decoding (``generate``, ``caption``): the prompt's segment and ``<break>`` prefilled into a KV cache, then one
token per step, constrained to the image codes inside an image segment and to the text ids (and ``<eod>``)
inside a text segment. Image decoding runs a conditional and an unconditional stream (the text replaced by
``<mask>``, as in training with ``cond_drop_prob``) in one batch, each row with its own cached keys, and picks
each token by one of ``DECODERS``: ``sample`` (token CFG, temperature, top-k, top-p), ``cd`` (contrastive
decoding CD-K) or ``topp_cd`` (both candidate pools); see :func:`pick_tokens`.

The transformer follows the paper: no biases, no dropout, LayerNorm without affine parameters; learned
absolute positions; the output head shares the token embedding (the paper sizes' 0.37B / 0.79B / 6.72B count
it once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from t2i_train.errors import ConfigError, DataError
from t2i_train.losses.cm3 import CM3Loss
from t2i_train.models.base import Family
from t2i_train.models.stage1 import attach_stage1, warn_random_stage1
from t2i_train.nn.transformer import KVCache, Transformer, TransformerBlock

T = TypeVar("T")
#: how ``generate`` picks an image token (see :func:`pick_tokens`)
DECODERS: tuple[str, ...] = ("sample", "cd", "topp_cd")
SPECIALS: tuple[str, ...] = ("break", "eod", "eoss", "mask", "pad")


# ------------------------------------------------------------------------------------------ token space
@dataclass(frozen=True)
class TokenSpace:
    """Ids: text ``[0, text)``, image codes ``[text, text + image)``, then ``SPECIALS``, then the sentinels."""

    text: int
    image: int
    sentinels: int

    @property
    def image_start(self) -> int:
        return self.text

    def special(self, name: str) -> int:
        return self.text + self.image + SPECIALS.index(name)

    @property
    def break_id(self) -> int:
        return self.special("break")

    @property
    def eod_id(self) -> int:
        return self.special("eod")

    @property
    def eoss_id(self) -> int:
        return self.special("eoss")

    @property
    def mask_id(self) -> int:
        return self.special("mask")

    @property
    def pad_id(self) -> int:
        return self.special("pad")

    @property
    def sentinel_start(self) -> int:
        return self.text + self.image + len(SPECIALS)

    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.sentinels:
            raise ValueError(f"sentinel {i} out of range: this token space has {self.sentinels}")
        return self.sentinel_start + i

    @property
    def size(self) -> int:
        return self.sentinel_start + self.sentinels

    def is_sentinel(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.sentinel_start) & (ids < self.size)

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.image_start) & (ids < self.image_start + self.image)


# ------------------------------------------------------------------------------------------ CM3 objective
def sample_span_count(rate: float, max_spans: int, generator: torch.Generator | None = None) -> int:
    """n ~ Poisson(``rate``), clamped to ``[0, max_spans]``."""
    if rate <= 0 or max_spans <= 0:
        return 0
    n = torch.poisson(torch.tensor([float(rate)]), generator=generator)
    return int(min(n.item(), max_spans))


def sample_spans(
    segments: Sequence[tuple[int, int]], count: int, generator: torch.Generator | None = None
) -> list[tuple[int, int]]:
    """Up to ``count`` non-overlapping spans ``[start, end)``, each inside one segment, sorted by start.

    As metaseq's CM3: ``count²`` candidates (at least 4), each in a segment drawn in proportion to its length
    with two uniform endpoints (a span of at least one token), kept greedily while they overlap none kept so
    far. A span never crosses a segment boundary (CM3leon: never across modalities).
    """
    segments = [(s, e) for s, e in segments if e > s]
    if count <= 0 or not segments:
        return []
    lengths = torch.tensor([float(e - s) for s, e in segments])
    kept: list[tuple[int, int]] = []
    for _ in range(max(4, count * count)):
        seg = int(torch.multinomial(lengths, 1, generator=generator).item())
        start, end = segments[seg]
        a, b = (torch.rand(2, generator=generator) * (end - start)).long().tolist()
        lo, hi = start + min(a, b), start + max(a, b) + 1
        if all(hi <= s or lo >= e for s, e in kept):
            kept.append((lo, hi))
            if len(kept) == count:
                break
    return sorted(kept)


def cm3_layout(
    body: Sequence[T], spans: Sequence[tuple[int, int]], sentinel: Callable[[int], T], eoss: T, eod: T
) -> list[T]:
    """The CM3 arrangement of ``body``: each span replaced in place by ``sentinel(i)`` (i in order of
    position), then ``sentinel(i) span eoss`` for each, then ``eod``. Applied to token ids it is
    :func:`cm3_document`; applied to any per-token values (an image token's grid index) it keeps them in step."""
    out: list[T] = []
    tail: list[T] = []
    position = 0
    for i, (start, end) in enumerate(spans):
        out += [*body[position:start], sentinel(i)]
        tail += [sentinel(i), *body[start:end], eoss]
        position = end
    return [*out, *body[position:], *tail, eod]


def cm3_document(body: Sequence[int], spans: Sequence[tuple[int, int]], space: TokenSpace) -> list[int]:
    """The CM3 form of a document body (without its ``<eod>``): each span replaced in place by
    ``<sentinel:i>`` (i in order of position), then ``<sentinel:i> span <eoss>`` for each, then ``<eod>``."""
    return cm3_layout(body, spans, space.sentinel, space.eoss_id, space.eod_id)


def grid_index(ids: Sequence[int], space: TokenSpace) -> list[int]:
    """Per token, its index within its image (0 for the first code after a non-image token), -1 elsewhere:
    the raster position of every code of a sequence without moved spans (prompts, decoding)."""
    out, run = [], 0
    for token in ids:
        is_image = space.image_start <= token < space.image_start + space.image
        out.append(run if is_image else -1)
        run = run + 1 if is_image else 0
    return out


def cm3_restore(ids: Sequence[int], space: TokenSpace) -> list[int]:
    """The document body a CM3 sequence came from (the inverse of :func:`cm3_document`, up to its ``<eod>``)."""
    ids = list(ids)
    end = ids.index(space.eod_id) if space.eod_id in ids else len(ids)
    ids = ids[:end]
    first = next((i for i, t in enumerate(ids) if t >= space.sentinel_start), None)
    if first is None:
        return ids
    # the in-place sentinels are those before the first moved span, which starts with the first repeated one
    seen: set[int] = set()
    split = len(ids)
    for i, t in enumerate(ids):
        if t >= space.sentinel_start:
            if t in seen:
                split = i
                break
            seen.add(t)
    body, tail = ids[:split], ids[split:]
    spans: dict[int, list[int]] = {}
    i = 0
    while i < len(tail):
        sentinel, j = tail[i], i + 1
        while j < len(tail) and tail[j] != space.eoss_id:
            j += 1
        spans[sentinel] = tail[i + 1 : j]
        i = j + 1
    out: list[int] = []
    for t in body:
        out += spans.get(t, [t]) if t >= space.sentinel_start else [t]
    return out


# ------------------------------------------------------------------------------------------ decoding
def apply_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """``logits`` [B, V] with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def cd_candidates(cond_log_probs: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """CD-K's head: tokens whose conditional probability is at least ``alpha`` times the k-th largest."""
    k = max(1, min(k, cond_log_probs.shape[-1]))
    kth = cond_log_probs.topk(k, dim=-1).values[:, -1:]
    return cond_log_probs >= kth + math.log(alpha)


def pick_tokens(
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    decoder: str = "sample",
    guidance_scale: float = 3.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cd_alpha: float = 0.1,
    cd_k: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from the conditional and unconditional logits [B, V] (V: the allowed tokens).

    - ``sample``: token CFG ``u + s·(c - u)`` on the log-probabilities (``uncond`` None or s = 1: plain ``c``),
      then ``temperature`` (0 = arg-max), ``top_k``, ``top_p``.
    - ``cd`` (contrastive decoding CD-K): among the tokens with ``p_c >= cd_alpha · (cd_k-th largest p_c)``,
      the score ``log p_c - log p_u``; sampled with ``temperature`` (0 = arg-max).
    - ``topp_cd``: the CD-K pool joined with the top-p nucleus of the CFG distribution, scored as ``cd``
      (the paper names the mix without its formula: this is our reading, marked [U] in the spec).
    """
    if decoder not in DECODERS:
        raise ConfigError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    cond_lp = cond.float().log_softmax(-1)
    uncond_lp = uncond.float().log_softmax(-1) if uncond is not None else None
    if decoder == "sample" or uncond_lp is None:
        scores = cond_lp if uncond_lp is None else uncond_lp + guidance_scale * (cond_lp - uncond_lp)
        scores = apply_top_k_top_p(scores, top_k, top_p)
    else:
        pool = cd_candidates(cond_lp, cd_alpha, cd_k)
        if decoder == "topp_cd":
            guided = uncond_lp + guidance_scale * (cond_lp - uncond_lp)
            pool = pool | torch.isfinite(apply_top_k_top_p(guided, None, top_p if top_p else 0.9))
        scores = (cond_lp - uncond_lp).masked_fill(~pool, -math.inf)
    if temperature <= 0:
        return scores.argmax(dim=-1)
    probs = (scores / temperature).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------ decoder
class CM3Decoder(nn.Module):
    """Token + learned position embeddings, a causal pre-norm :class:`Transformer` without biases or affine
    norms, and an output head tied to the token embedding. ``positions`` are explicit, so a left-padded
    prompt's tokens keep the positions they had in training."""

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        image_tokens: int = 0,
        **block: Any,
    ) -> None:
        super().__init__()
        self.max_length = max_length
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_length, dim)
        #: the raster position of an image code within its image (``image_tokens`` > 0), added to its token
        self.image_pos_emb = nn.Embedding(image_tokens, dim) if image_tokens > 0 else None
        self.transformer = Transformer(
            dim, depth, heads, mlp_dim, 0.0, bias=False, norm_affine=False, **block
        )
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids, positions [B, L] -> logits [B, L, vocab]; ``key_mask`` [B, L] (True = real), ``cache`` as
        :class:`Transformer`; ``image_index`` [B, L]: each image code's index in its image, -1 elsewhere."""
        x = self.token_emb(ids) + self.pos_emb(positions.clamp(0, self.max_length - 1))
        if self.image_pos_emb is not None and image_index is not None:
            grid = self.image_pos_emb(image_index.clamp(min=0, max=self.image_pos_emb.num_embeddings - 1))
            x = x + grid * (image_index >= 0)[..., None].to(grid.dtype)
        x = self.transformer(x, self_mask=key_mask, causal=True, cache=cache)
        return x @ self.token_emb.weight.T

    def new_cache(self, max_length: int) -> KVCache:
        return self.transformer.new_cache(max_length)


# ------------------------------------------------------------------------------------------ family
class CM3Leon(Family):
    """CM3leon over a frozen VQGAN's codes and a text tokenizer's ids.

    Args:
        image_tokenizer: the frozen VQ image tokenizer (``model=vqgan``): ``encode_to_indices``,
            ``decode_indices``, ``codebook_size``, ``downsample_factor``.
        image_tokenizer_checkpoint: a ``model=vqgan`` checkpoint or export whose weights fill it.
        image_vocab_size: the codebook size the token space is built for; a VQGAN with another is an error.
        text_tokenizer: a transformers tokenizer name or folder, or null: bytes (ByT5's tokenizer: no download).
            Loaded at its first use, so a summary on the meta device needs no download.
        text_vocab_size: the text ids the token space reserves (the paper's BPE: 56,320, not public); null:
            the tokenizer's length. A tokenizer with more ids is an error.
        image_size: image side in pixels; N = (image_size / f)² image tokens per image.
        dim, depth, heads, mlp_dim: the transformer; ``max_length``: positions (the training sequence length).
        max_text_tokens: captions are cut to this many tokens.
        sentinels, span_rate, max_spans: the CM3 objective (λ of the Poisson span count and its clamp).
        text_first_prob: share of documents ordered text -> image (the rest image -> text).
        cond_drop_prob: share of text -> image documents whose text is replaced by ``<mask>`` (CFG).
        retrieved_docs: retrieval augmentation (RA-CM3): each training sequence is ``ra1 <break> ... raK <break>
            query``, the K neighbours read from the batch (``ra_image_tokens`` and the JSON's ``neighbours``,
            written by ``python -m t2i_train.retrieve``); 0 trains unaugmented (the ablation is this one switch).
        retrieved_weight: α, the loss weight of the retrieved documents' tokens (RA-CM3: 0.1).
        retriever_checkpoint: the frozen CLIP that ``retrieve`` embedded the bank with; ``generate(...,
            index=<retrieve output>)`` embeds prompts with it and prepends their neighbours. Loaded at first
            use, never part of the weights.
        image_positions: add a learned embedding of each image code's raster index within its image (our
            choice [U]: with only absolute sequence positions, a code's place in the image depends on the
            length of the caption before it).
        gradient_checkpointing: recompute blocks in the backward pass.
    """

    family_name: ClassVar[str] = "cm3leon"
    accepted_losses: ClassVar[tuple[type[nn.Module], ...]] = (CM3Loss,)
    block_classes: ClassVar[tuple[type[nn.Module], ...]] = (TransformerBlock,)
    external_paths: ClassVar[tuple[str, ...]] = ("image_tokenizer_checkpoint",)
    resource_paths: ClassVar[tuple[str, ...]] = ("retriever_checkpoint",)

    def __init__(
        self,
        image_tokenizer: nn.Module,
        image_tokenizer_checkpoint: str | None = None,
        image_vocab_size: int = 256,
        text_tokenizer: str | None = None,
        text_vocab_size: int | None = None,
        image_size: int = 32,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int = 512,
        max_length: int = 160,
        max_text_tokens: int = 48,
        sentinels: int = 8,
        span_rate: float = 1.0,
        max_spans: int = 3,
        text_first_prob: float = 0.5,
        cond_drop_prob: float = 0.1,
        retrieved_docs: int = 0,
        retrieved_weight: float = 0.1,
        retriever_checkpoint: str | None = None,
        image_positions: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("text_first_prob", text_first_prob), ("cond_drop_prob", cond_drop_prob)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1], got {value}")
        self.image_tokenizer = image_tokenizer
        self.image_tokenizer_checkpoint = image_tokenizer_checkpoint
        self.register_buffer("image_tokenizer_trained", torch.tensor(False))
        if attach_stage1(
            self,
            "image_tokenizer",
            image_tokenizer_checkpoint,
            option="image_tokenizer_checkpoint",
            kind="VQGAN",
        ):
            self.image_tokenizer_trained.fill_(True)
        codebook = int(getattr(image_tokenizer, "codebook_size", -1))
        if codebook != image_vocab_size:
            raise ConfigError(
                f"the VQGAN's codebook has {codebook} codes but model.image_vocab_size={image_vocab_size}; set "
                f"model.image_vocab_size={codebook} (and image_tokenizer.codebook_size) to the VQGAN's"
            )
        factor = int(getattr(image_tokenizer, "downsample_factor", 0))
        if factor <= 0 or image_size % factor:
            raise ConfigError(f"model.image_size={image_size} is not a multiple of the VQGAN's f={factor}")
        self.image_size, self.grid = image_size, image_size // factor
        self.num_image_tokens = self.grid**2
        self.text_tokenizer_name = text_tokenizer
        self._tokenizer: Any = None
        text_vocab = int(text_vocab_size) if text_vocab_size is not None else len(self.tokenizer)
        self.space = TokenSpace(text_vocab, image_vocab_size, int(sentinels))
        self.max_text_tokens = int(max_text_tokens)
        needed = self.num_image_tokens + 4  # the shortest document: one text token, <break>, image, <eod>
        if max_length < needed:
            raise ConfigError(
                f"model.max_length={max_length} is too short for one image: {self.num_image_tokens} image tokens "
                f"need at least {needed} positions (text, <break>, image, <eod>); raise model.max_length"
            )
        if retrieved_docs < 0 or not 0.0 <= retrieved_weight <= 1.0:
            raise ConfigError(
                f"model.retrieved_docs must be >= 0 and model.retrieved_weight in [0, 1] (got {retrieved_docs}, "
                f"{retrieved_weight})"
            )
        self.retrieved_docs, self.retrieved_weight = int(retrieved_docs), float(retrieved_weight)
        self.retriever_checkpoint = retriever_checkpoint
        self._retriever: Any = None
        needed_all = (self.retrieved_docs + 1) * (self.num_image_tokens + 2) + 2
        if self.retrieved_docs and max_length < needed_all:
            raise ConfigError(
                f"model.max_length={max_length} cannot hold {self.retrieved_docs} retrieved documents and the "
                f"query ({self.num_image_tokens} image tokens each): raise it to at least {needed_all} plus "
                "their captions"
            )
        self.max_length = int(max_length)
        self.span_rate, self.max_spans = float(span_rate), min(int(max_spans), int(sentinels))
        self.text_first_prob, self.cond_drop_prob = float(text_first_prob), float(cond_drop_prob)
        self.decoder = CM3Decoder(
            self.space.size,
            self.max_length,
            dim,
            depth,
            heads,
            mlp_dim,
            image_tokens=self.num_image_tokens if image_positions else 0,
            gradient_checkpointing=gradient_checkpointing,
        )

    @property
    def tokenizer(self) -> Any:
        """The text tokenizer, loaded at first use (its ids must fit the token space's text part)."""
        if self._tokenizer is None:
            tokenizer = _text_tokenizer(self.text_tokenizer_name)
            space = getattr(self, "space", None)
            if space is not None and len(tokenizer) > space.text:
                raise ConfigError(
                    f"the text tokenizer has {len(tokenizer)} ids but model.text_vocab_size={space.text}; raise "
                    "it or set it to null (the tokenizer's own length)"
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    def text_allowed(self, device: torch.device) -> torch.Tensor:
        """Bool [text ids]: the ids a caption may be decoded into (not the tokenizer's specials)."""
        allowed = torch.zeros(self.space.text, dtype=torch.bool, device=device)
        allowed[: len(self.tokenizer)] = True
        special = [i for i in getattr(self.tokenizer, "all_special_ids", []) if i < self.space.text]
        allowed[special] = False
        return allowed

    # ------------------------------------------------------------------------------------ documents
    def text_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(str(text), add_special_tokens=False)["input_ids"][: self.max_text_tokens]
        return ids or [self.space.mask_id]

    def image_ids(self, codes: torch.Tensor) -> list[int]:
        return (codes.reshape(-1).long() + self.space.image_start).tolist()

    def document(
        self, text: list[int], image: list[int], text_first: bool
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """A document body ``a <break> b`` and its two modality segments (spans stay inside one)."""
        first, second = (text, image) if text_first else (image, text)
        body = [*first, self.space.break_id, *second]
        return body, [(0, len(first)), (len(first) + 1, len(body))]

    def _grid(self, text: list[int], image: list[int], text_first: bool) -> list[int]:
        """The grid index of each token of :meth:`document`'s body (-1 off the image)."""
        blank, grid = [-1] * len(text), list(range(len(image)))
        return [*blank, -1, *grid] if text_first else [*grid, -1, *blank]

    def training_sequence(
        self, text: list[int], image: list[int], retrieved: Sequence[tuple[list[int], list[int]]] = ()
    ) -> tuple[list[int], list[int], int]:
        """One sample's training tokens, their grid indices and how many are the retrieved prefix: order drawn
        (the neighbours take the query's), condition dropped (text first), CM3 spans on the query, truncated."""
        text_first = bool(torch.rand(()) < self.text_first_prob)
        if text_first and bool(torch.rand(()) < self.cond_drop_prob):
            text = [self.space.mask_id]
        prefix = self.retrieved_prefix(retrieved, text_first)
        body, segments = self.document(text, image, text_first)
        spans = sample_spans(segments, sample_span_count(self.span_rate, self.max_spans))
        tokens = [*prefix, *cm3_document(body, spans, self.space)][: self.max_length]
        grid = cm3_layout(self._grid(text, image, text_first), spans, lambda _: -1, -1, -1)
        return tokens, [*grid_index(prefix, self.space), *grid][: self.max_length], len(prefix)

    def retrieved_prefix(
        self, retrieved: Sequence[tuple[list[int], list[int]]], text_first: bool
    ) -> list[int]:
        """``ra1 <break> ra2 <break>`` (RA-CM3's layout) from (text ids, image ids) pairs."""
        prefix: list[int] = []
        for text, image in retrieved:
            prefix += [*self.document(text, image, text_first)[0], self.space.break_id]
        return prefix

    def batch_neighbours(self, batch: dict[str, Any], count: int) -> list[list[tuple[list[int], list[int]]]]:
        """Per sample, ``retrieved_docs`` (text ids, image ids) neighbours from ``ra_image_tokens`` [B, K, N]
        and the JSON's ``neighbours.captions``."""
        if not self.retrieved_docs:
            return [[] for _ in range(count)]
        if "ra_image_tokens" not in batch:
            raise DataError(
                f"model.retrieved_docs={self.retrieved_docs} needs shards written by python -m t2i_train.retrieve "
                "(ra_image_tokens.npy) read with data.fields=[image_tokens,ra_image_tokens]; or set "
                "model.retrieved_docs=0 to train unaugmented"
            )
        codes = torch.as_tensor(batch["ra_image_tokens"]).long()
        out = []
        for i in range(count):
            meta = (batch.get("meta") or [{}] * count)[i] or {}
            captions = list((meta.get("neighbours") or {}).get("captions") or [])
            if len(captions) < self.retrieved_docs or codes.shape[1] < self.retrieved_docs:
                key = (batch.get("key") or ["?"] * count)[i]
                raise DataError(
                    f"sample {key}: its neighbours field names {len(captions)} captions and "
                    f"{codes.shape[1]} image-token rows, model.retrieved_docs={self.retrieved_docs} needs that "
                    "many of each; rewrite the shards with python -m t2i_train.retrieve k=<retrieved_docs>"
                )
            out.append(
                [
                    (self.text_ids(captions[j]), self.image_ids(codes[i, j]))
                    for j in range(self.retrieved_docs)
                ]
            )
        return out

    def batch_image_codes(self, batch: dict[str, Any]) -> torch.Tensor:
        if "image_tokens" in batch:
            codes = torch.as_tensor(batch["image_tokens"]).reshape(len(batch["caption"]), -1).long()
        else:
            if self.training and not bool(self.image_tokenizer_trained):
                warn_random_stage1(
                    self,
                    "image_tokenizer",
                    "CM3LEON IS TRAINING ON A RANDOMLY INITIALISED VQGAN: set model.image_tokenizer_checkpoint="
                    "<vqgan .ckpt> or feed pre-encoded image_tokens; generated images will be noise",
                )
            with torch.no_grad():
                codes = self.image_tokenizer.encode_to_indices(batch["image"]).reshape(
                    len(batch["image"]), -1
                )
        if codes.shape[1] != self.num_image_tokens:
            raise DataError(
                f"cm3leon expects {self.num_image_tokens} image tokens ({self.grid}x{self.grid}) but got "
                f"{codes.shape[1]}; match the data resolution and model.image_size"
            )
        return codes

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training outputs for ``loss=cm3``: ``logits`` [B, L, V], ``targets`` [B, L] (the next token),
        ``weights`` [B, L] (0 on padding and sentinel targets)."""
        codes = self.batch_image_codes(batch)
        neighbours = self.batch_neighbours(batch, len(batch["caption"]))
        built = [
            self.training_sequence(self.text_ids(caption), self.image_ids(codes[i]), neighbours[i])
            for i, caption in enumerate(batch["caption"])
        ]
        rows = [row for row, _, _ in built]
        device = self.decoder.token_emb.weight.device
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.space.pad_id, dtype=torch.long)
        grid = torch.full((len(rows), length), -1, dtype=torch.long)
        for i, (row, index, _) in enumerate(built):
            ids[i, : len(row)], grid[i, : len(row)] = torch.tensor(row), torch.tensor(index)
        ids, grid = ids.to(device), grid.to(device)
        positions = torch.arange(length - 1, device=device).expand(len(rows), -1)
        logits = self.decoder(ids[:, :-1], positions, image_index=grid[:, :-1])
        targets = ids[:, 1:]
        weights = ((targets != self.space.pad_id) & ~self.space.is_sentinel(targets)).float()
        if self.retrieved_docs:  # targets inside the retrieved prefix weigh α (target t is token t + 1)
            prefix = torch.tensor([n for _, _, n in built], device=device)
            in_prefix = torch.arange(length - 1, device=device)[None, :] + 1 < prefix[:, None]
            weights = torch.where(in_prefix, weights * self.retrieved_weight, weights)
        return {
            "logits": logits,
            "targets": targets,
            "weights": weights,
            "image_targets": self.space.is_image(targets),
        }

    # ------------------------------------------------------------------------------------ decoding
    def _prefill(self, prefixes: list[list[int]], total: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """Left-padded prefixes run into a new cache: (cache, last logits [B, V], next positions [B])."""
        device = self.decoder.token_emb.weight.device
        length = max(len(p) for p in prefixes)
        if length + total > self.max_length:
            raise ConfigError(
                f"a prompt of {length} tokens + {total} new ones exceeds model.max_length={self.max_length}"
            )
        ids = torch.full((len(prefixes), length), self.space.pad_id, dtype=torch.long)
        grid = torch.full((len(prefixes), length), -1, dtype=torch.long)
        mask = torch.zeros(len(prefixes), length, dtype=torch.bool)
        for i, p in enumerate(prefixes):
            ids[i, length - len(p) :], mask[i, length - len(p) :] = torch.tensor(p), True
            grid[i, length - len(p) :] = torch.tensor(grid_index(p, self.space))
        ids, mask, grid = ids.to(device), mask.to(device), grid.to(device)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        cache = self.decoder.new_cache(length + total)
        logits = self.decoder(ids, positions, key_mask=mask, cache=cache, image_index=grid)[:, -1]
        return cache, logits, positions[:, -1] + 1

    def _step(
        self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, grid: int = -1
    ) -> torch.Tensor:
        """One new token per row at ``positions``; ``grid``: its index in the image being drawn (-1: text)."""
        index = torch.full_like(tokens[:, None], grid)
        return self.decoder(tokens[:, None], positions[:, None], cache=cache, image_index=index)[:, -1]

    @torch.no_grad()
    def generate_tokens(
        self,
        prompts: list[str],
        guidance_scale: float = 3.0,
        decoder: str = "sample",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cd_alpha: float = 0.1,
        cd_k: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        negative_prompts: list[str] | None = None,
        use_cache: bool = True,
        index: str | None = None,
    ) -> torch.Tensor:
        """Text -> image codes [B, N] (see :func:`pick_tokens` for the options). The unconditional stream reads
        ``<mask> <break>`` (or a negative prompt); ``use_cache=False`` reruns the whole sequence every step (the
        same tokens, for tests and the KV-cache benchmark). ``index`` (a ``retrieve`` output, for a model
        trained with ``retrieved_docs``): each prompt's neighbours are prepended to both streams."""
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        was_training = self.training
        self.eval()
        try:
            generator = generator or (torch.Generator().manual_seed(seed) if seed is not None else None)
            guided = decoder != "sample" or guidance_scale != 1.0 or negative_prompts is not None
            retrieved = self.prompt_prefixes(list(prompts), index)
            prefixes = [[*r, *self.text_ids(p), self.space.break_id] for r, p in zip(retrieved, prompts)]
            if guided:
                negatives = negative_prompts or [None] * len(prompts)
                prefixes += [
                    [*r, *(self.text_ids(n) if n else [self.space.mask_id]), self.space.break_id]
                    for r, n in zip(retrieved, negatives)
                ]
            start, end = self.space.image_start, self.space.image_start + self.space.image
            step = self._cached_steps(prefixes) if use_cache else self._uncached_steps(prefixes)
            logits = next(step)
            out = []
            for _ in range(self.num_image_tokens):
                image_logits = logits[:, start:end].float()
                cond, uncond = image_logits.chunk(2) if guided else (image_logits, None)
                codes = pick_tokens(
                    cond,
                    uncond,
                    decoder,
                    guidance_scale,
                    temperature,
                    top_k,
                    top_p,
                    cd_alpha,
                    cd_k,
                    generator=generator,
                )
                out.append(codes)
                tokens = codes + start
                logits = step.send(torch.cat([tokens, tokens]) if guided else tokens)
            return torch.stack(out, dim=1).to(torch.long)
        finally:
            self.train(was_training)

    def _cached_steps(self, prefixes: list[list[int]]) -> Any:
        """Generator: yields the next-token logits; send it the tokens just chosen."""
        cache, logits, positions = self._prefill(prefixes, self.num_image_tokens)
        drawn = 0  # the image codes fed back so far: the next one's grid index
        while True:
            tokens = yield logits
            logits = self._step(cache, tokens, positions, grid=drawn)
            positions, drawn = positions + 1, drawn + 1

    def _uncached_steps(self, prefixes: list[list[int]]) -> Any:
        rows = [list(p) for p in prefixes]
        while True:
            _, logits, _ = self._prefill(rows, 0)
            tokens = yield logits
            for row, token in zip(rows, tokens.tolist(), strict=True):
                row.append(int(token))

    def prompt_prefixes(self, prompts: list[str], index: str | None) -> list[list[int]]:
        """The retrieved prefix of each prompt: its ``retrieved_docs`` nearest documents of ``index`` (by the
        retriever's text embedding), or nothing without an index."""
        if index is None:
            return [[] for _ in prompts]
        if not self.retrieved_docs:
            raise ConfigError(
                "index= prepends retrieved documents, but this model trained with retrieved_docs=0"
            )
        from t2i_train.neighbours import load_bank, prompt_neighbours

        bank = load_bank(index)
        with torch.no_grad():
            vectors = F.normalize(self.retriever().embed_prompts_for_retrieval(prompts).float(), dim=-1)
        found = prompt_neighbours(bank, vectors.cpu().numpy(), self.retrieved_docs)
        return [
            self.retrieved_prefix(
                [(self.text_ids(c), self.image_ids(torch.as_tensor(t))) for c, t in zip(caps, codes)], True
            )
            for caps, codes in found
        ]

    def retriever(self) -> Any:
        """The frozen CLIP of ``retriever_checkpoint``, loaded at first use (never part of the weights)."""
        if self._retriever is None:
            if not self.retriever_checkpoint:
                raise ConfigError(
                    "retrieval at inference needs model.retriever_checkpoint=<the CLIP retrieve embedded with>"
                )
            from t2i_train.checkpoint import load_family

            self._retriever = load_family(self.retriever_checkpoint).eval().requires_grad_(False)
        return self._retriever

    @torch.no_grad()
    def generate(self, prompts: list[str], **sampling: Any) -> torch.Tensor:
        """Text -> images [B, 3, H, W] in [0, 1] through the frozen VQGAN (options: :meth:`generate_tokens`)."""
        codes = self.generate_tokens(list(prompts), **sampling)
        images = self.image_tokenizer.decode_indices(codes.view(-1, self.grid, self.grid))
        return ((images.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def caption(self, images: torch.Tensor, max_new_tokens: int | None = None, **_: Any) -> list[str]:
        """Images in [-1, 1] -> captions: ``image <break>`` then greedy text tokens until ``<eod>``."""
        was_training = self.training
        self.eval()
        try:
            codes = self.image_tokenizer.encode_to_indices(images).reshape(len(images), -1)
            prefixes = [[*self.image_ids(c), self.space.break_id] for c in codes]
            budget = min(max_new_tokens or self.max_text_tokens, self.max_length - len(prefixes[0]))
            cache, logits, positions = self._prefill(prefixes, budget)
            allowed = torch.zeros(self.space.size, dtype=torch.bool, device=logits.device)
            allowed[: self.space.text] = self.text_allowed(logits.device)
            allowed[self.space.eod_id] = True
            rows: list[list[int]] = [[] for _ in prefixes]
            done = torch.zeros(len(prefixes), dtype=torch.bool, device=logits.device)
            for _ in range(budget):
                tokens = logits.float().masked_fill(~allowed, -math.inf).argmax(-1)
                for i, token in enumerate(tokens.tolist()):
                    if not done[i] and token != self.space.eod_id:
                        rows[i].append(token)
                done |= tokens == self.space.eod_id
                if bool(done.all()):
                    break
                logits = self._step(cache, tokens, positions)
                positions = positions + 1
            return [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
        finally:
            self.train(was_training)


def _text_tokenizer(name: str | None) -> Any:
    if name is None:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise ConfigError(
            f"model.text_tokenizer={name!r} could not be loaded ({exc}); name a transformers tokenizer or a "
            "folder holding one, or null for bytes"
        ) from exc
