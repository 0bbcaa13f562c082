"""GILL (Koh, Fried & Salakhutdinov 2023): a frozen causal LM that captions, retrieves and generates images.

Only small parts train; the LM, the CLIP image encoder, the target text encoder and the image generator stay
frozen, and the generator is never run in training:

- ``img_input`` / ``img_output`` [r, W]: the r new [IMG0..r-1] tokens' input and output embedding rows. They are
  separate parameters spliced in through ``inputs_embeds`` and appended to the frozen LM head's logits (ids
  ``V .. V+r-1``, V = the LM's embedding rows), so FSDP / DeepSpeed shard and checkpoint them like any other
  parameter; after every optimizer step each row is rescaled to the mean norm of the frozen rows
  (``after_optimizer_step``).
- ``visual_prefix``: Linear(CLIP pooled width -> k * W), the k-token image prefix of the captioning pass.
- ``image_retrieval`` (CLIP pooled -> R), ``text_retrieval`` (the LM's last hidden state at [IMG0] -> R, or at
  all r [IMG] positions concatenated with ``retrieval_states=all``: a small frozen LM keeps too little of the
  prompt in one state) and
  ``logit_scale`` (log 1/0.07): the retrieval space, trained with a symmetric InfoNCE.
- ``mapper`` (:class:`GILLMapper`): the r [IMG] hidden states + their input embeddings -> an encoder-decoder
  transformer whose decoder reads ``target_tokens`` learned queries -> ``target_tokens x target_width``, the
  output space of the generator's frozen text encoder (Stable Diffusion's CLIP text encoder in the paper; the
  frozen T5 of our ``diffusion`` family here). Our text encoder pads, and the diffusion UNet masks padding, so
  the mapper also predicts which target positions are real (``mask_head``, one logit per query); SD's 77
  positions are all real and that head then learns "all".
- ``decision``: Dropout(0.5) + Linear(W -> 2) on the [IMG0] state, {retrieve, generate}; trained afterwards with
  the rest frozen, on automatic labels (``t2i_train.gill_decision``).

One training step runs two LM passes per batch (``forward``):

1. captioning: [k visual tokens] + caption -> next-token CE on the caption (with ``concat_prob``, the whole batch
   is two captioned images per sequence: [prefix_i, caption_i, prefix_j, caption_j]);
2. [IMG] pass: caption + [IMG0..r-1] -> CE on [IMG0] after the caption (the later [IMG] tokens are forced at
   inference, never predicted; the caption tokens' CE is constant here, see ``image_pass``); the text retrieval embedding at [IMG0]; the mapper on the [IMG] states,
   distilled to the target encoder's output for the caption. The paper's retrieval and generation passes read
   this same sequence (they share the [IMG] tokens), so one LM pass serves both and its [IMG] CE is weighted
   twice (``loss=gill``: 0.5 + 0.5).

Inference: ``generate(prompts)`` (prompt + [IMG0..r-1] -> mapper -> the frozen diffusion model, CFG as the
diffusion family), ``retrieve(prompts, k, index)`` (a FAISS index of ``embed_images_for_retrieval``, built by
``python -m t2i_train.index``), ``caption(images)``, ``respond(prompts)`` (greedy decoding that may emit [IMG0],
after which [IMG1..r-1] are appended), ``decide(prompts)`` (the decision head's retrieve / generate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from t2i_train.errors import ConfigError, DataError
from t2i_train.losses.cross_entropy import IGNORE_INDEX
from t2i_train.losses.gill import GILLLoss, L2Distill
from t2i_train.models.base import Family

if TYPE_CHECKING:
    from t2i_train.models.clip import FrozenCLIP
    from t2i_train.models.lm import CausalLanguageModel
    from t2i_train.text.base import TextEncoder
    from t2i_train.text.upsampler import Upsampler

#: the decision head's classes, in logit order
DECISIONS: tuple[str, ...] = ("retrieve", "generate")
#: what the text retrieval head reads: the [IMG0] state (the paper) or all r [IMG] states concatenated
RETRIEVAL_STATES: tuple[str, ...] = ("first", "all")


# ------------------------------------------------------------------------------------------------ mapper
class GILLMapper(nn.Module):
    """[IMG] states [B, r, W] -> (target-space tokens [B, Q, D_t], real-position logits [B, Q]).

    Linear W -> d, a pre-norm encoder-decoder transformer (``nn.Transformer``) whose decoder inputs are Q learned
    queries, Linear d -> D_t; the paper's is d=512, 4+4 layers, 4 heads, FFN 2048, Q=77, D_t=768 (31.96M).
    """

    def __init__(
        self,
        in_width: int,
        out_width: int,
        queries: int,
        width: int = 512,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        heads: int = 4,
        ffn: int = 2048,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_width, width)
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.02)
        self.transformer = nn.Transformer(
            d_model=width,
            nhead=heads,
            num_encoder_layers=encoder_layers,
            num_decoder_layers=decoder_layers,
            dim_feedforward=ffn,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.proj_out = nn.Linear(width, out_width)
        self.mask_head = nn.Linear(width, 1)

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src = self.proj_in(states)
        tgt = self.queries.to(src.dtype).expand(src.shape[0], -1, -1)
        out = self.transformer(src, tgt)
        return self.proj_out(out), self.mask_head(out)[..., 0]


@dataclass
class ImagePass:
    """What the caption + [IMG] pass yields: states at the r [IMG] positions [B, r, W], and the logits and
    next-token targets at the taught positions ([N, V + r], [N])."""

    img_states: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


# ------------------------------------------------------------------------------------------------ family
class GILL(Family):
    """A frozen causal LM taught to caption, retrieve and generate images (see the module docstring).

    Args:
        lm: the frozen causal LM: a built ``CausalLanguageModel`` or the arguments of
            ``t2i_train.models.lm.load_frozen_lm`` (``checkpoint`` of a ``model=lm`` run, ``pretrained``,
            ``config``, ``tokenizer``, ``hidden_size``).
        clip: the frozen CLIP image encoder (``t2i_train.models.clip.load_frozen_clip`` node); GILL reads its
            pooled vision features (before the projection: 1024 for ViT-L/14).
        target_encoder: the frozen text encoder whose output the mapper learns (a ``TextEncoder``; the
            ``diffusion`` family's T5 node). Its output is padded or cut to ``target_tokens``.
        generator_checkpoint: a ``model=diffusion`` checkpoint or export, whose UNet draws the images; its
            text encoder must be ``target_encoder`` (same weights). Loaded on the first ``generate``, never in
            training; None: no ``generate``.
        image_tokens: r, the number of [IMG] tokens; ``prefix_tokens``: k, the captioning prefix length.
        retrieval_dim: width of the retrieval space.
        target_tokens: Q, the mapper's queries (the target encoder's sequence length it is trained to).
        mapper: ``GILLMapper`` options (width, encoder_layers, decoder_layers, heads, ffn, dropout).
        concat_prob: probability that a training batch's captioning pass concatenates two examples per row.
        max_caption_tokens: captions are cut to this many tokens in every pass (and in decoding).
        caption_pass_key: ``json.<field>``: the captioning pass reads this field of the sample's JSON (the short
            captions of the shapes set, ``json.caption``: a fifth of the vocabulary-sized logits of the
            descriptive ones, on CPU) instead of the batch caption, which the [IMG] pass keeps; null (the
            paper): the batch caption in both passes. Samples without the field use the batch caption.
        target_rewrite: an ``Upsampler`` or its options (``{kind: template, template_index: 0}``, as conf/upsampler) applied to each caption before the target encoder
            reads it, or None (the paper: the caption itself). The distance is per token, so when captions come
            from several templates the same target position holds different words in different captions and
            the mapper's best guess there is their mean; a fixed-template rewrite (``TemplateUpsampler`` with a
            ``template_index``) lines the positions up. Pre-encoded targets carry the hash of the rewritten text.
        init_seed: initialisation of the trainable parts (identical in every process).
    """

    family_name: ClassVar[str] = "gill"
    accepted_losses: ClassVar[tuple[type[nn.Module], ...]] = (GILLLoss, L2Distill)
    external_paths: ClassVar[tuple[str, ...]] = ("lm.checkpoint", "clip.checkpoint")
    #: the generator is loaded at its first use, never into GILL's own weights: its path survives any rebuild
    resource_paths: ClassVar[tuple[str, ...]] = ("generator_checkpoint",)
    #: external parts that may be replaced without invalidating a trained GILL: any diffusion model whose text
    #: encoder is ``target_encoder`` reads the mapper's output (that encoder is pinned instead, see
    #: ``target_fingerprint``).
    unpinned_parts: ClassVar[tuple[str, ...]] = ("generator",)

    def __init__(
        self,
        lm: CausalLanguageModel | Mapping[str, Any] | None = None,
        clip: FrozenCLIP | Mapping[str, Any] | None = None,
        target_encoder: TextEncoder | None = None,
        generator_checkpoint: str | None = None,
        image_tokens: int = 4,
        prefix_tokens: int = 2,
        retrieval_dim: int = 64,
        target_tokens: int = 56,
        mapper: Mapping[str, Any] | None = None,
        concat_prob: float = 0.5,
        max_caption_tokens: int = 64,
        caption_pass_key: str | None = None,
        retrieval_states: str = "first",
        target_rewrite: Upsampler | Mapping[str, Any] | None = None,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        from t2i_train.models.clip import frozen_clip

        _check_options(image_tokens, prefix_tokens, target_tokens, concat_prob)
        self.image_token_count, self.prefix_tokens = int(image_tokens), int(prefix_tokens)
        self.target_tokens, self.concat_prob = int(target_tokens), float(concat_prob)
        self.max_caption_tokens = int(max_caption_tokens)
        if caption_pass_key is not None and not caption_pass_key.startswith("json."):
            raise ConfigError(
                f"model.caption_pass_key must be json.<field> or null, got {caption_pass_key!r}"
            )
        self.caption_pass_key = caption_pass_key
        if retrieval_states not in RETRIEVAL_STATES:
            raise ConfigError(
                f"model.retrieval_states must be one of {', '.join(RETRIEVAL_STATES)}, got {retrieval_states!r}"
            )
        self.retrieval_states = retrieval_states
        self.lm = _frozen_lm(lm)
        self.freeze("lm", external=bool(getattr(self.lm, "has_weights", False)))
        self.clip = frozen_clip(clip)
        self.freeze("clip", external=self.clip.has_weights)
        if target_encoder is None:
            raise ConfigError(
                "model.target_encoder is required: the text encoder whose space the mapper learns"
            )
        self.target_encoder = target_encoder
        self.target_rewrite = _rewrite(target_rewrite)
        self.freeze("target_encoder", external=bool(getattr(target_encoder, "loaded_pretrained", False)))
        width, vision = self.width, self.clip.width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self._build_trainable(width, vision, int(retrieval_dim), dict(mapper or {}))
        self.register_buffer(
            "target_fingerprint", torch.tensor(_fingerprint(target_encoder), dtype=torch.float64)
        )
        #: the diffusion model, loaded from ``generator_checkpoint`` on first use (``attach_generator``): it is
        #: never run in training, so training neither loads nor holds it
        self.generator: nn.Module | None = None
        self.generator_checkpoint = generator_checkpoint

    def _build_trainable(self, width: int, vision: int, retrieval_dim: int, mapper: dict[str, Any]) -> None:
        rows = self.image_token_count
        frozen_in = self.lm.lm.get_input_embeddings().weight
        frozen_out = self.lm.lm.get_output_embeddings().weight
        self.register_buffer("img_input_norm", frozen_in.detach().float().norm(dim=-1).mean().reshape(()))
        self.register_buffer("img_output_norm", frozen_out.detach().float().norm(dim=-1).mean().reshape(()))
        std = float(getattr(self.lm.lm.config, "initializer_range", 0.02))
        self.img_input = nn.Parameter(torch.randn(rows, width) * std)
        self.img_output = nn.Parameter(torch.randn(rows, width) * std)
        self.renormalize_image_tokens()
        self.visual_prefix = nn.Linear(vision, self.prefix_tokens * width)
        self.image_retrieval = nn.Linear(vision, retrieval_dim)
        read = self.image_token_count if self.retrieval_states == "all" else 1
        self.text_retrieval = nn.Linear(read * width, retrieval_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.mapper = GILLMapper(width, self.target_encoder.dim, self.target_tokens, **mapper)
        # trained afterwards, alone (t2i_train.gill_decision): no gradient in the main stage, which DDP needs
        self.decision = nn.Sequential(nn.Dropout(0.5), nn.Linear(width, len(DECISIONS))).requires_grad_(False)

    def attach_generator(self) -> nn.Module:
        """The frozen diffusion model of ``generator_checkpoint``, loaded once and checked to share
        ``target_encoder`` (the space the mapper writes into)."""
        if self.generator is not None:
            return self.generator
        checkpoint = self.generator_checkpoint
        if not checkpoint:
            raise ConfigError(
                "this GILL has no image generator: set model.generator_checkpoint=<the diffusion checkpoint "
                "whose text encoder is model.target_encoder> (python -m t2i_train.sample: generator_checkpoint=)"
            )
        from t2i_train.checkpoint import load_family

        generator = load_family(checkpoint).to(self.device)
        if not generator.can("generate") or not hasattr(generator, "text_encoder"):
            raise ConfigError(
                f"model.generator_checkpoint {checkpoint} holds model={generator.family_name}; GILL draws through "
                "a diffusion model (model=diffusion) whose text encoder is model.target_encoder"
            )
        mine, theirs = float(self.target_fingerprint), _fingerprint(generator.text_encoder)
        if not math.isclose(mine, theirs, rel_tol=1e-6, abs_tol=1e-6):
            raise ConfigError(
                f"model.generator_checkpoint {checkpoint}: its text encoder is not model.target_encoder (weights "
                f"fingerprint {theirs:.6g} vs {mine:.6g}); the mapper writes into the target encoder's space, so "
                "describe the generator's text encoder in model.target_encoder"
            )
        self.generator = generator
        self.freeze("generator", external=True)
        return generator

    # ---------------------------------------------------------------------------------------- sizes
    @property
    def width(self) -> int:
        return int(self.lm.lm.get_input_embeddings().embedding_dim)

    @property
    def vocab_rows(self) -> int:
        """V: the frozen LM's embedding rows; [IMGi] has id V + i."""
        return int(self.lm.lm.get_input_embeddings().num_embeddings)

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def image_token_ids(self) -> list[int]:
        return [self.vocab_rows + i for i in range(self.image_token_count)]

    @property
    def device(self) -> torch.device:
        return self.img_input.device

    # ---------------------------------------------------------------------------------------- pieces
    def renormalize_image_tokens(self) -> None:
        """Rescale every [IMG] input / output row to the mean norm of the frozen LM's rows (the paper's step)."""
        with torch.no_grad():
            for param, norm in (
                (self.img_input, self.img_input_norm),
                (self.img_output, self.img_output_norm),
            ):
                rows = param.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                param.mul_(norm.to(param.dtype) / rows)

    def after_optimizer_step(self) -> None:
        self.renormalize_image_tokens()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] (ids >= V are [IMG] tokens) -> input embeddings [B, T, W]."""
        table = self.lm.lm.get_input_embeddings()
        is_image = ids >= self.vocab_rows
        base = table(ids.clamp(max=self.vocab_rows - 1))
        image = self.img_input[(ids - self.vocab_rows).clamp(min=0, max=self.image_token_count - 1)]
        return torch.where(is_image[..., None], image.to(base.dtype), base)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., W] -> logits over the LM's vocabulary and the [IMG] tokens [..., V + r]."""
        head = self.lm.lm.get_output_embeddings()
        return torch.cat([head(hidden), hidden @ self.img_output.to(hidden.dtype).T], dim=-1)

    def hidden_states(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The frozen LM's last hidden states (after its final norm) for input embeddings [B, T, W]."""
        out = self.lm.lm.base_model(inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False)
        return out.last_hidden_state

    @torch.no_grad()
    def clip_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1, 1] -> CLIP's pooled vision features [B, vision width] (before projection)."""
        visual = self.clip.model.visual
        x = visual.transformer(visual._embeds(self.clip.preprocess(images)))
        pooled, _ = visual._pool(x)
        return pooled.float()

    def batch_clip_features(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if "clip_image_pooled" in batch:
            return torch.as_tensor(batch["clip_image_pooled"]).to(self.device).float()
        return self.clip_features(batch["image"])

    def caption_ids(self, text: str) -> list[int]:
        """The LM's ids of a caption: its own start token when the tokenizer adds one, no end token, cut to
        ``max_caption_tokens``."""
        ids = list(self.tokenizer(text).input_ids)
        eos = self.tokenizer.eos_token_id
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        return ids[: self.max_caption_tokens]

    def start_ids(self) -> list[int]:
        """The ids the tokenizer puts before any text (its start token; none for GPT-2's)."""
        return self.caption_ids("")

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    # ---------------------------------------------------------------------------------------- target
    def target_texts(self, captions: Sequence[str]) -> list[str]:
        """What the target encoder reads for each caption: ``target_rewrite`` of it, or the caption itself."""
        captions = [str(c) for c in captions]
        return list(self.target_rewrite(captions)) if self.target_rewrite is not None else captions

    @torch.no_grad()
    def encode_target(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The target encoder's output for each caption (after ``target_rewrite``), padded / cut to
        ``target_tokens``: ([B, Q, D_t], [B, Q])."""
        from t2i_train.text.base import pad_condition

        emb, mask = self.target_encoder(self.target_texts(captions))
        emb, mask = pad_condition(emb.float(), mask.bool(), self.target_tokens)
        return emb * mask[..., None], mask

    def pre_encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``clip_image_pooled``: the CLIP features training reads instead of running CLIP."""
        return {"clip_image_pooled": self.clip_features(images)}

    def pre_encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """``gen_target_emb`` / ``gen_target_mask`` (the distillation target) and ``gen_target_hash`` (which
        caption they belong to: training recomputes rows whose caption differs)."""
        emb, mask = self.encode_target(captions)
        hashes = torch.tensor([caption_hash(c) for c in self.target_texts(captions)], dtype=torch.int64)
        return {"gen_target_emb": emb.half(), "gen_target_mask": mask, "gen_target_hash": hashes}

    def batch_target(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The distillation target of a batch: pre-encoded where the stored hash matches the caption, else
        computed by the target encoder."""
        captions = list(batch["caption"])
        if "gen_target_emb" not in batch:
            return self.encode_target(captions)
        emb = torch.as_tensor(batch["gen_target_emb"]).to(self.device).float()
        mask = torch.as_tensor(batch["gen_target_mask"]).to(self.device).bool()
        if tuple(emb.shape[1:]) != (self.target_tokens, self.target_encoder.dim):
            raise DataError(
                f"pre-encoded gen_target_emb has shape {tuple(emb.shape[1:])} but this GILL's target is "
                f"({self.target_tokens}, {self.target_encoder.dim}); re-encode the shards with this model"
            )
        stored = batch.get("gen_target_hash")
        wanted = torch.tensor([caption_hash(c) for c in self.target_texts(captions)], dtype=torch.int64)
        if stored is None:  # shards encoded without hashes: trust them
            return emb * mask[..., None], mask
        stale = torch.as_tensor(stored).cpu().reshape(-1) != wanted
        if bool(stale.any()):
            rows = stale.nonzero()[:, 0].tolist()
            fresh_emb, fresh_mask = self.encode_target([captions[i] for i in rows])
            emb, mask = emb.clone(), mask.clone()
            emb[rows], mask[rows] = fresh_emb.to(emb.dtype), fresh_mask
        return emb * mask[..., None], mask

    # ---------------------------------------------------------------------------------------- training
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The two passes' outputs for ``loss=gill`` (see ``t2i_train.losses.gill``)."""
        captions = [str(c) for c in batch["caption"]]
        features = self.batch_clip_features(batch)
        caption_logits, caption_targets = self.caption_pass(features, self.caption_pass_texts(batch))
        image_pass = self.image_pass(captions)
        mapped, mask_logits = self.map_states(image_pass.img_states)
        target, target_mask = self.batch_target(batch)
        out = {
            "caption_logits": caption_logits,
            "caption_targets": caption_targets,
            "img_logits": image_pass.logits,
            "img_targets": image_pass.targets,
            "text_features": self.text_embedding(image_pass.img_states),
            "image_features": self.image_embedding(features),
            "logit_scale": self.logit_scale.exp().clamp(max=100.0),
            "mapped": mapped,
            "target": target,
            "target_mask": target_mask,
            "mask_logits": mask_logits,
        }
        return out

    def caption_pass_texts(self, batch: Mapping[str, Any]) -> list[str]:
        """The captioning pass's text per sample: ``caption_pass_key`` of its JSON, else the batch caption."""
        captions = [str(c) for c in batch["caption"]]
        if self.caption_pass_key is None:
            return captions
        from t2i_train.data.transforms import read_caption

        metas = batch.get("meta") or [{}] * len(captions)
        picked = [read_caption({}, meta or {}, self.caption_pass_key) for meta in metas]
        return [p if isinstance(p, str) and p.strip() else c for p, c in zip(picked, captions, strict=True)]

    def caption_pass(
        self, features: torch.Tensor, captions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[start] + [k visual tokens] + caption + EOS per row (two such runs per row with ``concat_prob``):
        logits and next-token targets at the taught positions ([N, V + r], [N]).

        The tokenizer's start token (CLIP BPE's, OPT's </s>; GPT-2's none) comes first, as in every sequence the
        LM was trained on; the prefix after it. With the prefix first, the frozen LM reads the prefix where it
        always saw its start token, and the caption CE on shapes stayed ~1 nat higher (measured 2.0 vs 1.0).
        """
        prefix = self.visual_prefix(features).view(len(captions), self.prefix_tokens, self.width)
        start = self.start_ids()
        head = [(start, 0)] if start else []
        pieces = [
            [*head, (prefix[i], None), ([*self.caption_ids(c)[len(start) :], self.eos_token_id], 1)]
            for i, c in enumerate(captions)
        ]
        if self.training and len(captions) > 1 and torch.rand(()) < self.concat_prob:
            pieces = [pieces[i] + pieces[(i + 1) % len(pieces)] for i in range(len(pieces))]
        embeds, mask, targets = self._assemble(pieces, prefix.dtype)
        hidden = self.hidden_states(embeds, mask)
        keep = targets != IGNORE_INDEX
        return self.logits(hidden[keep]), targets[keep]

    def image_pass(self, prompts: Sequence[str], teach: bool = True) -> ImagePass:
        """Caption + [IMG0..r-1] per row: the [IMG] states, and the logits / target of [IMG0] after the caption.

        The paper's CE in this pass also covers the caption tokens, but with the LM and its token rows frozen
        nothing trained reaches them (they precede every [IMG] token), so only the [IMG0] position is scored:
        the same gradient, at a fraction of the vocabulary-sized logits.
        """
        ids = [self.caption_ids(p) for p in prompts]
        pieces = [[(row, 0), (self.image_token_ids, 0)] for row in ids]
        embeds, mask, _ = self._assemble(pieces, self.img_input.dtype)
        hidden = self.hidden_states(embeds, mask)
        starts = torch.tensor([len(row) for row in ids], device=hidden.device)
        index = starts[:, None] + torch.arange(self.image_token_count, device=hidden.device)
        states = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        if not teach:
            empty = hidden.new_zeros((0, self.vocab_rows + self.image_token_count))
            return ImagePass(states, empty, starts.new_zeros((0,)))
        before_img0 = hidden[torch.arange(len(ids), device=hidden.device), starts - 1]
        targets = torch.full_like(starts, self.image_token_ids[0])
        return ImagePass(states, self.logits(before_img0), targets)

    def _assemble(
        self, rows: list[list[tuple[Any, int | None]]], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded input embeddings [B, T, W], attention mask [B, T] and next-token targets [B, T] of rows
        made of pieces: (embedding block [n, W], None) or (token ids, taught: 1 = predict them, 0 = not)."""
        embedded, labels = [], []
        for row in rows:
            blocks, row_labels = [], []
            for piece, taught in row:
                if taught is None:
                    blocks.append(piece.to(dtype))
                    row_labels += [IGNORE_INDEX] * piece.shape[0]
                    continue
                ids = torch.tensor(piece, dtype=torch.long, device=self.device)
                blocks.append(self.embed(ids[None])[0].to(dtype))
                row_labels += list(piece) if taught else [IGNORE_INDEX] * len(piece)
            embedded.append(torch.cat(blocks))
            labels.append([*row_labels[1:], IGNORE_INDEX])  # position t predicts the token at t + 1
        length = max(e.shape[0] for e in embedded)
        embeds = embedded[0].new_zeros((len(rows), length, embedded[0].shape[1]))
        mask = torch.zeros((len(rows), length), dtype=torch.bool, device=self.device)
        targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=self.device)
        for i, (e, lab) in enumerate(zip(embedded, labels, strict=True)):
            embeds[i, : e.shape[0]], mask[i, : e.shape[0]] = e, True
            targets[i, : len(lab)] = torch.tensor(lab, dtype=torch.long, device=self.device)
        return embeds, mask, targets

    def map_states(self, img_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mapper on the [IMG] hidden states plus their input embeddings: ([B, Q, D_t], mask logits [B, Q])."""
        inputs = img_states + self.img_input.to(img_states.dtype)[None]
        mapped, mask_logits = self.mapper(inputs.float())
        return mapped.float(), mask_logits.float()

    def text_embedding(self, img_states: torch.Tensor) -> torch.Tensor:
        """[IMG] states [B, r, W] -> the prompt's retrieval embedding [B, R] from the [IMG0] state (the paper's)
        or, with ``retrieval_states=all``, from all r states side by side."""
        read = img_states.flatten(1) if self.retrieval_states == "all" else img_states[:, 0]
        return F.normalize(self.text_retrieval(read).float(), dim=-1)

    def image_embedding(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_retrieval(features).float(), dim=-1)

    # ---------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def embed_images_for_retrieval(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1, 1] -> L2-normalised retrieval embeddings [B, R] (what the index holds)."""
        return self.image_embedding(self.clip_features(images))

    @torch.no_grad()
    def embed_prompts_for_retrieval(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> L2-normalised retrieval embeddings [B, R] (the text head on the [IMG] states)."""
        return self.text_embedding(self.image_pass(prompts, teach=False).img_states)

    @torch.no_grad()
    def retrieve(self, prompts: list[str], k: int = 1, index: str | None = None) -> list[list[Any]]:
        """The ``k`` best images of the FAISS ``index`` (``python -m t2i_train.index``) for each prompt."""
        from t2i_train.retrieval import retrieve

        return retrieve(self, list(prompts), k, index)

    @torch.no_grad()
    def generation_condition(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + [IMG0..r-1] -> the mapper's target-space tokens [B, Q, D_t] and their mask [B, Q] (the
        positions the mask head calls real; the first one always)."""
        mapped, mask_logits = self.map_states(self.image_pass(list(prompts), teach=False).img_states)
        mask = mask_logits > 0
        mask[:, 0] = True
        return mapped * mask[..., None], mask

    def available(self, capability: str) -> bool:
        """``generate`` needs a generator (``generator_checkpoint``); the rest is always there."""
        if capability == "generate" and self.generator is None and not self.generator_checkpoint:
            return False
        return super().available(capability)

    @torch.no_grad()
    def generate(self, prompts: list[str], **sampling: Any) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1]: the mapper's output as the frozen diffusion model's text condition
        (``sampling``: the diffusion family's options: steps, guidance_scale, sampler, eta, seed)."""
        generator = self.attach_generator()
        emb, mask = self.generation_condition(prompts)
        return generator.generate(list(prompts), condition=(emb, mask), **sampling)

    @torch.no_grad()
    def decide(self, prompts: list[str]) -> list[str]:
        """The decision head's pick per prompt: ``retrieve`` or ``generate``."""
        states = self.image_pass(list(prompts), teach=False).img_states
        picks = self.decision(states[:, 0]).argmax(dim=-1).tolist()
        return [DECISIONS[i] for i in picks]

    @torch.no_grad()
    def caption(self, images: torch.Tensor, max_new_tokens: int | None = None, **_: Any) -> list[str]:
        """Greedy captions of images [B,3,H,W] in [-1, 1] through the visual prefix (the LM frozen)."""
        prefix = self.visual_prefix(self.clip_features(images)).view(
            len(images), self.prefix_tokens, self.width
        )
        start = self.start_ids()
        embeds = prefix
        if start:
            ids = torch.tensor(start, device=self.device)[None].expand(len(images), -1)
            embeds = torch.cat([self.embed(ids).to(prefix.dtype), prefix], dim=1)
        tokens = self._greedy(embeds, max_new_tokens or self.max_caption_tokens, allow_image=False)
        return [self._text(row) for row in tokens]

    @torch.no_grad()
    def respond(self, prompts: list[str], max_new_tokens: int = 32) -> list[dict[str, Any]]:
        """Greedy continuation of each prompt. When the LM emits [IMG0], [IMG1..r-1] are appended (they are never
        decoded on their own) and the row ends. Per prompt: ``text`` (the new words), ``ids`` (the new ids, [IMG]
        ones included), ``image`` (whether it asked for an image) and ``context`` (prompt + text: what
        ``generate`` / ``retrieve`` read to answer with that image)."""
        out = []
        for prompt in prompts:  # one row at a time: rows end at different lengths
            ids = torch.tensor(self.caption_ids(prompt), device=self.device)[None]
            new = self._greedy(self.embed(ids), max_new_tokens, allow_image=True)[0]
            text = self._text(new)
            out.append(
                {
                    "text": text,
                    "ids": new,
                    "image": self.image_token_ids[0] in new,
                    "context": f"{prompt} {text}".strip(),
                }
            )
        return out

    def _greedy(self, embeds: torch.Tensor, max_new_tokens: int, allow_image: bool) -> list[list[int]]:
        """Greedy decoding with the KV cache from input embeddings [B, T, W]; [IMG1..r-1] are masked out, and an
        emitted [IMG0] is followed by the rest of the [IMG] tokens (forced), which ends the row."""
        model = self.lm.lm.base_model
        batch = embeds.shape[0]
        if allow_image and batch != 1:
            raise ValueError("decoding that may emit [IMG] tokens runs one row at a time")
        rows: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        cache, hidden = out.cache, out.last_hidden_state[:, -1]
        banned = self.image_token_ids[1:] if allow_image else self.image_token_ids
        for _ in range(max_new_tokens):
            logits = self.logits(hidden).float()
            logits[:, banned] = float("-inf")
            step = logits.argmax(dim=-1).tolist()
            forced = [[t] if t != self.image_token_ids[0] else list(self.image_token_ids) for t in step]
            for i, ids in enumerate(forced):
                if not done[i]:
                    rows[i] += ids
                    done[i] = ids[0] in (self.eos_token_id, self.image_token_ids[0])
            if all(done):
                break
            width = max(len(ids) for ids in forced)
            feed = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids in forced], device=self.device)
            mask = torch.cat([mask, mask.new_ones((batch, width))], dim=1)
            out = model(inputs_embeds=self.embed(feed), attention_mask=mask, cache=cache, use_cache=True)
            cache, hidden = out.cache, out.last_hidden_state[:, -1]
        return rows

    def _text(self, ids: Sequence[int]) -> str:
        words = []
        for token in ids:
            if token == self.eos_token_id:
                break
            if token < self.vocab_rows:
                words.append(token)
        return str(self.tokenizer.decode(words, skip_special_tokens=True)).strip()

    def clip_scorer(self) -> FrozenCLIP:
        """The frozen CLIP (scores generated against retrieved images for the decision labels)."""
        return self.clip

    # ---------------------------------------------------------------------------------------- checkpoints
    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        key = f"{prefix}target_fingerprint"
        if key in state_dict:
            saved, mine = float(state_dict[key]), float(self.target_fingerprint)
            if not math.isclose(saved, mine, rel_tol=1e-6, abs_tol=1e-6):
                raise ConfigError(
                    f"this GILL checkpoint was trained to a different target text encoder (weights fingerprint "
                    f"{saved:.6g}, the configured one is {mine:.6g}): its mapper writes into that encoder's space; "
                    "set model.target_encoder to the encoder it was trained with"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ------------------------------------------------------------------------------------------------ helpers
def caption_hash(text: str) -> int:
    """A stable 63-bit id of a caption (which caption a pre-encoded target belongs to)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def _fingerprint(module: nn.Module) -> float:
    from t2i_train.checkpoint import weights_fingerprint

    return weights_fingerprint(module)


def _frozen_lm(lm: Any) -> nn.Module:
    from t2i_train.models.lm import CausalLanguageModel, load_frozen_lm

    if isinstance(lm, CausalLanguageModel):
        return lm.eval().requires_grad_(False)
    if lm is None or isinstance(lm, Mapping):
        return load_frozen_lm(**{k: v for k, v in dict(lm or {}).items() if k != "_target_"})
    raise ConfigError(f"model.lm must be an LM config node or a CausalLanguageModel, got {type(lm).__name__}")


def _rewrite(node: Any) -> Upsampler | None:
    from t2i_train.text.upsampler import Upsampler, build_upsampler

    if node is None or isinstance(node, Upsampler):
        return node
    if isinstance(node, Mapping) and "kind" in node:
        options = {str(k): v for k, v in dict(node).items() if k != "kind"}
        return build_upsampler(str(node["kind"]), **options)
    raise ConfigError(
        f"model.target_rewrite must be null or an upsampler node with a kind (conf/upsampler), got {node!r}"
    )


def _check_options(image_tokens: int, prefix_tokens: int, target_tokens: int, concat: float) -> None:
    if image_tokens < 1 or prefix_tokens < 1 or target_tokens < 1:
        raise ConfigError(
            f"model.image_tokens, prefix_tokens and target_tokens must be >= 1 (got {image_tokens}, "
            f"{prefix_tokens}, {target_tokens})"
        )
    if not 0.0 <= concat <= 1.0:
        raise ConfigError(f"model.concat_prob must be in [0, 1], got {concat}")
