"""The DALL-E 3 style image captioner: a causal language model conditioned on frozen CLIP image features.

DALL-E 3 (Betker et al. 2023) recaptions its training images with a captioner trained as a language model on
CLIP image embeddings; it first learns short synthetic captions of the main subject (SSC), then descriptive
ones (DSC). The two names stay short in configs and CLIs: ``ssc`` = short synthetic caption (the main subject,
one sentence), ``dsc`` = descriptive synthetic caption (the whole scene: colours, positions, background).
Here both styles are trained jointly and chosen at decoding time by a style prompt:

    [image prefix: P tokens] [style prompt, e.g. "describe:"] [caption tokens] [EOS]

- ``clip``: a frozen CLIP image tower, one config node built by ``t2i_train.models.clip.load_frozen_clip``
  (a ``model=clip`` checkpoint or export in ``clip.checkpoint``, an open_clip ``clip.model_name`` +
  ``clip.pretrained`` tag, or a random tiny CLIP for smoke tests).
- ``prefix`` (trainable): ``prefix="embedding"`` maps the pooled, L2-normalised CLIP image embedding through
  an MLP to ``prefix_tokens`` tokens of the LM's width (ClipCap, Mokady et al. 2021); ``prefix="patches"``
  projects the final ViT tokens (CLS + patches) one by one.
- ``lm``: a transformers causal LM fed through ``inputs_embeds``: ``GPT2LMHeadModel`` from ``lm_config``
  (random init, trained from scratch) or ``lm_pretrained`` (any causal-LM name or folder; ``freeze_lm`` keeps
  it frozen, then only the prefix is trained, as in ClipCap's frozen-GPT-2 variant).
- tokenizer: transformers' byte-level ``ByT5Tokenizer`` (no vocabulary file to download), or the tokenizer of
  ``lm_pretrained``.

Training targets come from the sample's data per style (``style_keys``: ``json.<field>`` from the sample's
JSON, ``caption`` for the caption the data module picked); each sample draws its style with ``style_probs``
(fine-tuning on one style is ``style_probs={dsc: 1.0}``). Only caption tokens and EOS are predicted.
``caption(images, style=...)`` decodes (greedy, beam or nucleus, seeded); the family draws no images.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from t2i_train.errors import ConfigError
from t2i_train.losses.cross_entropy import IGNORE_INDEX, NextTokenCrossEntropy
from t2i_train.models.base import Family
from t2i_train.text.causal_lm import (
    TINY_GPT2_CONFIG,
    EmbeddingPrefix,
    PatchPrefix,
    build_causal_lm,
    build_tokenizer,
    decode_until_eos,
    decoding_options,
    embed_ids,
    lm_max_positions,
    lm_width,
    prefix_lm_logits,
    rerank_options,
    seeded_generate,
)

if TYPE_CHECKING:
    from t2i_train.models.clip import FrozenCLIP

PREFIX_MODES: tuple[str, ...] = ("embedding", "patches")
#: The tiny LM of the shapes world: 4 GPT-2 blocks of width 128 over ByT5's 384 byte-level ids.
TINY_LM_CONFIG: dict[str, Any] = TINY_GPT2_CONFIG
DEFAULT_STYLE_PROMPTS: dict[str, str] = {"ssc": "short:", "dsc": "describe:"}
DEFAULT_STYLE_KEYS: dict[str, str] = {"ssc": "json.caption", "dsc": "json.descriptive"}
DEFAULT_STYLE_PROBS: dict[str, float] = {"ssc": 0.5, "dsc": 0.5}


# ------------------------------------------------------------------------------------------------ family
class Captioner(Family):
    """Image -> caption language model on frozen CLIP features, two caption styles (see the module docstring).

    Args:
        clip: the frozen CLIP, as for GALIP: a ``FrozenCLIP`` (what the node ``clip: {_target_:
            t2i_train.models.clip.load_frozen_clip, checkpoint, model_name, pretrained, config, ...}`` builds)
            or those arguments as a mapping. A checkpoint or pretrained tag makes it an external frozen part
            (left out of training checkpoints, rebuilt from its source).
        prefix: ``embedding`` (pooled embedding -> ``prefix_tokens`` tokens) or ``patches`` (ViT tokens).
        prefix_tokens: tokens of the ``embedding`` prefix; ``prefix_hidden``: the mappers' hidden width (0: a
            linear map).
        prefix_noise: in training, Gaussian noise of this many times the features' RMS is added to the CLIP
            features (CapDec, Nukrai et al. 2022): a smoother mapper that generalises to unseen combinations.
        lm_pretrained: a transformers causal-LM name or folder (its tokenizer too, unless ``tokenizer``);
            null: a GPT-2 from ``lm_config`` (``GPT2Config`` keys over ``TINY_LM_CONFIG``), random init.
        freeze_lm: keep ``lm_pretrained`` frozen (train only the prefix mapper).
        tokenizer: a tokenizer name or folder; null: the LM's, or ByT5's byte-level tokenizer.
        style_prompts: style -> the text placed after the image prefix to ask for that style.
        style_keys: style -> where its training caption is (``json.<field>`` or ``caption``).
        style_probs: style -> the probability a training sample is taught that style.
        max_caption_tokens: captions are cut to this many tokens (EOS included); the default decode length.
        init_seed: random initialisation of the LM and the mapper (identical in every process).
        validation_captions: on the first validation batch, when the samples' JSON carries the shapes world's
            colour/shape/position, this many images are captioned greedily per style and the fraction naming
            all three is logged as ``val/<style>_all`` (``validation_metrics``); 0: off.
        validation_caption_tokens: the decode length of those captions (the shapes captions name their
            attributes in the first sentence; an untrained LM decodes to this limit).
    """

    family_name: ClassVar[str] = "captioner"
    accepted_losses: ClassVar[tuple[type[nn.Module], ...]] = (NextTokenCrossEntropy,)
    block_classes: ClassVar[tuple[type[nn.Module], ...]] = (GPT2Block,)
    external_paths: ClassVar[tuple[str, ...]] = ("clip.checkpoint",)

    def __init__(
        self,
        clip: FrozenCLIP | Mapping[str, Any] | None = None,
        prefix: str = "embedding",
        prefix_tokens: int = 8,
        prefix_hidden: int = 256,
        prefix_noise: float = 0.0,
        lm_pretrained: str | None = None,
        lm_config: dict[str, Any] | None = None,
        freeze_lm: bool = False,
        tokenizer: str | None = None,
        style_prompts: dict[str, str] | None = None,
        style_keys: dict[str, str] | None = None,
        style_probs: dict[str, float] | None = None,
        max_caption_tokens: int = 224,
        init_seed: int = 0,
        validation_captions: int = 32,
        validation_caption_tokens: int = 128,
    ) -> None:
        super().__init__()
        from t2i_train.models.clip import frozen_clip  # open_clip

        if prefix not in PREFIX_MODES:
            raise ConfigError(f"model.prefix must be one of {', '.join(PREFIX_MODES)}, got {prefix!r}")
        if freeze_lm and not lm_pretrained:
            raise ConfigError(
                "model.freeze_lm=true needs model.lm_pretrained (a random LM cannot stay frozen)"
            )
        self.style_prompts = dict(style_prompts or DEFAULT_STYLE_PROMPTS)
        self.style_keys = dict(style_keys or DEFAULT_STYLE_KEYS)
        self.style_probs = _check_styles(self.style_prompts, self.style_keys, style_probs)
        if prefix_noise < 0:
            raise ConfigError(f"model.prefix_noise must be >= 0, got {prefix_noise}")
        self.prefix_mode, self.max_caption_tokens = prefix, int(max_caption_tokens)
        self.prefix_noise = float(prefix_noise)
        self.validation_captions = int(validation_captions)
        self.validation_caption_tokens = int(validation_caption_tokens)
        self.clip = frozen_clip(clip)
        self.freeze("clip", external=self.clip.has_weights)
        self.tokenizer = build_tokenizer(tokenizer or lm_pretrained)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.lm = build_causal_lm(lm_pretrained, lm_config, self.tokenizer)
            self.prefix = self._build_prefix(prefix, prefix_tokens, prefix_hidden)
        if freeze_lm:
            self.freeze("lm", external=True)
        self._style_ids = {s: self._encode(p) for s, p in self.style_prompts.items()}
        self._check_positions()

    def _build_prefix(self, mode: str, tokens: int, hidden: int) -> nn.Module:
        width = lm_width(self.lm)
        if mode == "embedding":
            return EmbeddingPrefix(self.clip.embed_dim, width, tokens, hidden)
        return PatchPrefix(self.clip.width, width, hidden)

    def _check_positions(self) -> None:
        limit = lm_max_positions(self.lm)
        longest = (
            self.prefix_length + max(len(ids) for ids in self._style_ids.values()) + self.max_caption_tokens
        )
        if limit is not None and longest > limit:
            raise ConfigError(
                f"the captioner's sequences reach {longest} tokens (prefix {self.prefix_length} + style prompt "
                f"+ max_caption_tokens {self.max_caption_tokens}) but the LM has {limit} positions; lower "
                "model.max_caption_tokens or raise the LM's n_positions"
            )

    @property
    def prefix_length(self) -> int:
        """Tokens of the image prefix."""
        if self.prefix_mode == "embedding":
            return int(self.prefix.tokens)
        grid = self.clip.image_size // int(self.clip.model.visual.patch_size[0])
        return 1 + grid * grid

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.eos_token_id)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    # ---------------------------------------------------------------------------------------- features
    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B,3,H,W] in [-1, 1] -> (L2-normalised embedding [B, E], final ViT tokens [B, 1+g², width])."""
        visual = self.clip.model.visual
        x = visual.transformer(visual._embeds(self.clip.preprocess(images)))
        pooled, patches = visual._pool(x)  # open_clip's own ln_post + CLS pooling
        embedding = pooled @ visual.proj if visual.proj is not None else pooled
        embedding = nn.functional.normalize(embedding.float(), dim=-1)
        return embedding, torch.cat([pooled[:, None], patches], dim=1).float()

    def prefix_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """The image prefix [B, P, LM width] (trainable mapper on frozen features)."""
        embedding, patches = self.image_features(images)
        if self.training and self.prefix_noise > 0:
            embedding, patches = _noisy(embedding, self.prefix_noise), _noisy(patches, self.prefix_noise)
        dtype = self.lm.get_input_embeddings().weight.dtype
        return self.prefix(embedding, patches).to(dtype)

    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return embed_ids(self.lm, ids)

    # ---------------------------------------------------------------------------------------- training
    def choose_styles(self, batch: Mapping[str, Any]) -> list[str]:
        """One style per sample, drawn with ``style_probs``: from torch's RNG in training (seeded per step by the
        task), from a hash of the sample key in evaluation (so validation loss is reproducible)."""
        count = len(batch["caption"])
        if self.training:
            draws = torch.rand(count).tolist()
        else:
            keys = batch.get("key") or [str(i) for i in range(count)]
            draws = [zlib.crc32(str(k).encode()) / 2**32 for k in keys]
        names, probs = list(self.style_probs), list(self.style_probs.values())
        out = []
        for u in draws:
            total, pick = 0.0, names[-1]
            for name, p in zip(names, probs, strict=True):
                total += p
                if u < total:
                    pick = name
                    break
            out.append(pick)
        return out

    def style_target(self, batch: Mapping[str, Any], index: int, style: str) -> str | None:
        """The training caption of sample ``index`` for ``style`` (None when the sample lacks it)."""
        from t2i_train.data.transforms import read_caption

        key = self.style_keys[style]
        if key == "caption":
            text = batch["caption"][index]
            return text.strip() or None if isinstance(text, str) else None
        metas = batch.get("meta") or [{}] * len(batch["caption"])
        if key.startswith("json."):
            return read_caption({}, metas[index], key)
        raise ConfigError(
            f"model.style_keys.{style}={key!r}: the captioner reads json.<field> or caption (the data module's "
            "pick: set data.caption_keys to choose a shard member)"
        )

    def _sample_tokens(self, batch: Mapping[str, Any], index: int, style: str) -> tuple[list[int], int]:
        """Token ids after the prefix (style prompt + caption + EOS) and how many of them are the prompt.

        A sample without a caption of its style is taught another style of ``style_probs`` (one with a
        positive probability) that it has; with none, only its prompt goes in and nothing is predicted.
        """
        order = [style, *[s for s in self.style_probs if s != style]]
        for name in order:
            text = self.style_target(batch, index, name)
            if text is not None:
                prompt = self._style_ids[name]
                caption = [*self._encode(text)[: self.max_caption_tokens - 1], self.eos_token_id]
                return prompt + caption, len(prompt)
        prompt = self._style_ids[style]
        return list(prompt), len(prompt)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``logits`` [B, T, V] and ``targets`` [B, T] (the next token, IGNORE_INDEX where none is taught).

        The LM runs once per style, each group padded to its own longest row: short (SSC) rows are not
        padded to descriptive lengths, which would nearly double the cost of a mixed batch.
        """
        prefix = self.prefix_embeds(batch["image"])
        styles = self.choose_styles(batch)
        rows = [self._sample_tokens(batch, i, s) for i, s in enumerate(styles)]
        length = prefix.shape[1] + max(len(ids) for ids, _ in rows)
        logits = prefix.new_zeros((len(rows), length, self.lm.config.vocab_size))
        targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=prefix.device)
        for style in dict.fromkeys(styles):
            index = [i for i, s in enumerate(styles) if s == style]
            group_logits, group_targets = self._run_rows(prefix[index], [rows[i] for i in index])
            logits[index, : group_logits.shape[1]] = group_logits.to(logits.dtype)
            targets[index, : group_targets.shape[1]] = group_targets
        return {"logits": logits, "targets": targets}

    def _run_rows(
        self, prefix: torch.Tensor, rows: list[tuple[list[int], int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM on [prefix, row tokens] right-padded to the longest row: (logits, next-token targets)."""
        return prefix_lm_logits(self.lm, prefix, rows, self.pad_token_id)

    # ---------------------------------------------------------------------------------------- decoding
    def _prompt_embeds(self, images: torch.Tensor, style: str) -> torch.Tensor:
        if style not in self._style_ids:
            raise ConfigError(
                f"unknown caption style {style!r}; this captioner knows {', '.join(self._style_ids)}"
            )
        prefix = self.prefix_embeds(images)
        ids = torch.tensor(self._style_ids[style], device=prefix.device).expand(prefix.shape[0], -1)
        return torch.cat([prefix, self._embed_ids(ids)], dim=1)

    @torch.no_grad()
    def caption(
        self,
        images: torch.Tensor,
        style: str = "dsc",
        method: str = "greedy",
        num_beams: int = 4,
        top_p: float = 0.9,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        seed: int = 0,
        rerank: int = 0,
    ) -> list[str]:
        """Captions of images [B,3,H,W] in [-1, 1] in ``style``.

        ``method``: ``greedy``; ``beam`` (``num_beams`` beams; 1 is greedy); ``top_p`` (nucleus sampling at
        ``temperature``, drawn from ``seed``: the same images, seed and batch give the same captions).
        Decoding uses transformers' ``generate`` with the prefix as ``inputs_embeds`` and the KV cache.

        ``rerank=K`` (K >= 2, with ``beam`` or ``top_p``): decode K candidates per image (the K best beams, or
        K samples) and keep the one the frozen CLIP matches best with the image (cosine of the two embeddings;
        the CLIP reads the first ``context_length`` tokens of each). CLIP's text tower composes words it has
        seen in other combinations, so it can tell apart candidates the LM's prefix mapping confuses (the
        shapes world's held-out combinations: see ``t2i_train/conf/experiment/shapes_captioner.yaml``).
        """
        embeds = self._prompt_embeds(images, style)
        options = decoding_options(method, num_beams, top_p, temperature)
        options.update(rerank_options(method, num_beams, rerank))
        ids = seeded_generate(
            self.lm,
            seed,
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            max_new_tokens=max_new_tokens or self.max_caption_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            **options,
        )
        texts = [self._decode(row) for row in ids.tolist()]
        return self._best_by_clip(images, texts, rerank) if rerank > 1 else texts

    @classmethod
    def upgrade_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Configs from before the CLIP was one node (flat ``clip_*`` keys) read as today's."""
        from t2i_train.models.clip import nest_clip_keys

        return nest_clip_keys(super().upgrade_config(config))

    def clip_scorer(self) -> FrozenCLIP:
        """Its frozen CLIP (which also reranks decoding candidates), as a scorer (capability ``clip_scorer``)."""
        return self.clip

    def validation_metrics(self, batch: dict[str, Any], batch_index: int) -> dict[str, float | torch.Tensor]:
        """``<style>_all`` per style on the first validation batch of shapes data: the fraction of
        ``validation_captions`` greedy captions (at most ``validation_caption_tokens`` tokens) that name the
        sample's colour, shape and position (``t2i_train.metrics.caption_accuracy``); other data: none."""
        if batch_index != 0 or self.validation_captions <= 0:
            return {}
        from t2i_train.metrics.caption_accuracy import caption_accuracy, has_attributes

        metas = list(batch.get("meta") or [])[: self.validation_captions]
        if not metas or not all(has_attributes(m) for m in metas):
            return {}
        images = batch["image"][: len(metas)]
        out: dict[str, float | torch.Tensor] = {}
        for style in self.style_probs:
            captions = self.caption(
                images, style=style, method="greedy", max_new_tokens=self.validation_caption_tokens
            )
            out[f"{style}_all"] = caption_accuracy(captions, metas)["all"]
        return out

    def _best_by_clip(self, images: torch.Tensor, texts: list[str], per_image: int) -> list[str]:
        """For each image, the one of its ``per_image`` consecutive candidate ``texts`` CLIP scores highest
        (the first, i.e. the LM's best, on ties)."""
        image_emb = self.clip.encode_image(images).float()
        text_emb = self.clip.encode_text(texts).float().view(len(images), per_image, -1)
        best = (text_emb * image_emb[:, None]).sum(dim=-1).argmax(dim=1).tolist()
        return [texts[i * per_image + j] for i, j in enumerate(best)]

    def _decode(self, ids: Sequence[int]) -> str:
        return decode_until_eos(self.tokenizer, ids, self.eos_token_id)

    @torch.no_grad()
    def sequence_logprob(
        self, images: torch.Tensor, captions: Sequence[str], style: str = "dsc"
    ) -> torch.Tensor:
        """Sum of the log-probabilities of each caption (+ EOS) given its image and the style prompt: [B]."""
        batch = {"image": images, "caption": list(captions), "meta": [{}] * len(captions)}
        saved_keys, saved_probs = self.style_keys, self.style_probs
        self.style_keys, self.style_probs = {style: "caption"}, {style: 1.0}
        try:
            out = self.forward(batch)
        finally:
            self.style_keys, self.style_probs = saved_keys, saved_probs
        logp = out["logits"].float().log_softmax(-1)
        keep = out["targets"] != IGNORE_INDEX
        picked = logp.gather(-1, out["targets"].clamp(min=0)[..., None])[..., 0]
        return (picked * keep).sum(dim=1)


def _noisy(features: torch.Tensor, scale: float) -> torch.Tensor:
    """Gaussian noise of ``scale`` times the features' per-vector RMS (CapDec-style feature noise)."""
    rms = features.square().mean(dim=-1, keepdim=True).sqrt()
    return features + scale * rms * torch.randn_like(features)


def _check_styles(
    prompts: Mapping[str, str], keys: Mapping[str, str], probs: Mapping[str, float] | None
) -> dict[str, float]:
    """Normalised style probabilities; every style needs a prompt and a data key."""
    probs = dict(probs) if probs is not None else {s: DEFAULT_STYLE_PROBS.get(s, 1.0) for s in prompts}
    unknown = sorted(set(probs) - set(prompts)) + sorted(set(probs) - set(keys))
    if not probs or unknown:
        raise ConfigError(
            f"model.style_probs {dict(probs)} must name styles that have style_prompts and style_keys "
            f"({', '.join(sorted(set(prompts) & set(keys)))})"
        )
    if any(p < 0 for p in probs.values()) or sum(probs.values()) <= 0:
        raise ConfigError(f"model.style_probs {dict(probs)} must be non-negative and not all zero")
    if len(set(prompts.values())) < len(prompts) or any(not p for p in prompts.values()):
        raise ConfigError(f"model.style_prompts {dict(prompts)} must be distinct, non-empty texts")
    total = float(sum(probs.values()))
    return {s: p / total for s, p in probs.items() if p > 0}
