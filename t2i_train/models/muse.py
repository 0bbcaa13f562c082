"""Muse (Chang et al. 2023), base stage: a masked generative transformer over VQ image tokens.

Training: the frozen VQ image tokenizer (``image_tokenizer``, a VQGAN; not the text tokenizer, which lives
inside ``text_encoder``) turns an image into N tokens; a cosine-distributed number of them is
replaced by [MASK] (id = codebook size); the transformer — self-attention over image tokens, cross-attention
to the projected frozen T5 embeddings, MLP — predicts the masked tokens (``MaskedCrossEntropy``). The text
condition is dropped for ``cond_drop_prob`` of the samples so classifier-free guidance works at sampling.

Sampling (MaskGIT parallel decoding): start fully masked; at every step predict all tokens with CFG, sample
each masked one, and re-mask the least confident according to a cosine schedule until the last step has
filled every token.

Architecture notes: the T5 output goes through the trainable linear projection followed by a LayerNorm (as
in open-muse; it made text conditioning learn faster in our tiny runs); learned 2D positions are
factorised into row + column embeddings.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import torch
from torch import nn

from t2i_train.errors import ConfigError, DataError
from t2i_train.losses.masked_ce import MaskedCrossEntropy
from t2i_train.models.base import Family
from t2i_train.models.stage1 import attach_stage1, warn_random_stage1
from t2i_train.nn.guidance import GUIDANCE_SCHEDULES, apply_cfg, guidance_scale_at
from t2i_train.nn.transformer import Transformer, TransformerBlock
from t2i_train.text.base import TextEncoder, pad_condition

log = logging.getLogger(__name__)

COND_DROP_MODES = ("empty", "zero")


# --------------------------------------------------------------------------------------------- schedules
def cosine_mask_counts(u: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Tokens to mask per example: ``max(1, round(cos(π u / 2) · N))`` for ``u ~ U(0, 1)`` (a LongTensor)."""
    ratio = torch.cos(math.pi * u.double() / 2)
    return torch.round(ratio * num_tokens).long().clamp(1, num_tokens)


def random_token_mask(
    counts: torch.Tensor, num_tokens: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Bool mask [B, N] with exactly ``counts[b]`` True positions in row b, chosen uniformly at random."""
    scores = torch.rand(counts.shape[0], num_tokens, generator=generator, device=counts.device)
    ranks = scores.argsort(dim=-1).argsort(dim=-1)
    return ranks < counts[:, None]


def decode_schedule(num_tokens: int, steps: int) -> list[int]:
    """Number of tokens still masked after each of the ``steps`` decoding steps (MaskGIT cosine schedule).

    ``n_t = ⌊N cos(π/2 · (t+1)/T)⌋`` clamped to ``[1, n_{t-1} - 1]`` so every step reveals at least one token
    and keeps at least one for later; the last step is 0: it fills every token. Needs ``steps <= N``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > num_tokens:
        raise ValueError(
            f"steps={steps} exceeds the {num_tokens} image tokens; use at most {num_tokens} steps"
        )
    masked, counts = num_tokens, []
    for t in range(steps - 1):
        n = math.floor(num_tokens * math.cos(math.pi / 2 * (t + 1) / steps))
        masked = min(max(n, 1), masked - 1)
        counts.append(masked)
    return [*counts, 0]


def gumbel_noise(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(shape, device=device, generator=generator).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


# ------------------------------------------------------------------------------------------------ family
class Muse(Family):
    """Muse base transformer with its frozen text encoder and frozen VQ image tokenizer.

    Args:
        text_encoder: frozen ``TextEncoder`` (T5, with its own text tokenizer); its ``dim`` sizes the
            trainable text projection.
        image_tokenizer: frozen VQ image tokenizer (a VQGAN) with ``encode_to_indices(images [-1,1]) ->
            [B,h,w]``, ``decode_indices(idx) -> images [-1,1]``, ``codebook_size`` and ``downsample_factor``.
        image_tokenizer_checkpoint: a ``model=vqgan`` training checkpoint or export whose weights fill
            ``image_tokenizer`` (only while weight loading is enabled).
        image_size: image side in pixels; N = (image_size / downsample_factor)² tokens.
        dim, depth, heads, mlp_dim, dropout, dim_head: transformer size.
        cond_drop_prob: fraction of training samples whose text condition is dropped (for CFG).
        cond_drop_mode: "empty" feeds the encoded empty prompt (open-muse); "zero" feeds zeros.
        gradient_checkpointing: recompute blocks in the backward pass.
    """

    family_name: ClassVar[str] = "muse"
    accepted_losses: ClassVar[tuple[type[nn.Module], ...]] = (MaskedCrossEntropy,)
    block_classes: ClassVar[tuple[type[nn.Module], ...]] = (TransformerBlock,)
    external_paths: ClassVar[tuple[str, ...]] = ("image_tokenizer_checkpoint",)
    #: before the image tokenizer was named for what it is (checkpoints and configs of that time still load)
    renamed_parts: ClassVar[dict[str, str]] = {
        "tokenizer": "image_tokenizer",
        "tokenizer_checkpoint": "image_tokenizer_checkpoint",
        "tokenizer_trained": "image_tokenizer_trained",
    }

    def __init__(
        self,
        text_encoder: TextEncoder,
        image_tokenizer: nn.Module,
        image_size: int = 32,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int = 512,
        dropout: float = 0.0,
        image_tokenizer_checkpoint: str | None = None,
        cond_drop_prob: float = 0.1,
        cond_drop_mode: str = "empty",
        dim_head: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if cond_drop_mode not in COND_DROP_MODES:
            raise ConfigError(
                f"model.cond_drop_mode must be one of {COND_DROP_MODES}, got {cond_drop_mode!r}"
            )
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ConfigError(f"model.cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        self.text_encoder = text_encoder
        self.image_tokenizer = image_tokenizer
        self.image_tokenizer_checkpoint = image_tokenizer_checkpoint
        # persistent flag: True once the image tokenizer holds trained weights (saved with the checkpoint)
        self.register_buffer("image_tokenizer_trained", torch.tensor(False))
        # weights from a pretrained name / stage-1 checkpoint stay out of training checkpoints (see checkpoint.py)
        self.freeze("text_encoder", external=bool(getattr(text_encoder, "loaded_pretrained", False)))
        # the configured VQGAN keeps its architecture and takes the checkpoint's weights (its discriminator, if
        # any, is left behind)
        if attach_stage1(
            self,
            "image_tokenizer",
            image_tokenizer_checkpoint,
            option="image_tokenizer_checkpoint",
            kind="VQGAN",
        ):
            self.image_tokenizer_trained.fill_(True)

        self.codebook_size = int(_required_attr(self.image_tokenizer, "codebook_size"))
        factor = int(_required_attr(self.image_tokenizer, "downsample_factor"))
        if image_size % factor:
            raise ConfigError(
                f"model.image_size={image_size} is not a multiple of the image tokenizer's f={factor}"
            )
        self.image_size = image_size
        self.grid = image_size // factor
        self.num_tokens = self.grid**2
        self.mask_token_id = self.codebook_size
        self.cond_drop_prob = cond_drop_prob
        self.cond_drop_mode = cond_drop_mode

        self.token_emb = nn.Embedding(self.codebook_size + 1, dim)
        # learned 2D positions, factorised: row + column embeddings (a caption's "top"/"left" each name one)
        self.row_emb = nn.Parameter(torch.zeros(self.grid, dim))
        self.col_emb = nn.Parameter(torch.zeros(self.grid, dim))
        self.text_proj = nn.Linear(text_encoder.dim, dim)
        self.text_norm = nn.LayerNorm(dim)
        self.transformer = Transformer(
            dim,
            depth,
            heads,
            mlp_dim,
            dropout,
            cross_attention=True,
            dim_head=dim_head,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.head = nn.Linear(dim, self.codebook_size)
        self._init_weights()

    # ------------------------------------------------------------------------------------------- set-up
    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.row_emb, std=0.02)
        nn.init.trunc_normal_(self.col_emb, std=0.02)
        for module in [self.token_emb, self.text_proj, self.transformer, self.head]:
            for m in module.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_encoder(list(prompts))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1, 1] → token ids [B, N]."""
        idx = self.image_tokenizer.encode_to_indices(images)
        return self._check_tokens(idx)

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, N] → images [B,3,H,W] in [0, 1]."""
        images = self.image_tokenizer.decode_indices(tokens.view(-1, self.grid, self.grid))
        return ((images.float() + 1) / 2).clamp(0, 1)

    def _check_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.reshape(idx.shape[0], -1).long()
        if idx.shape[1] != self.num_tokens:
            raise DataError(
                f"muse expects {self.num_tokens} image tokens ({self.grid}x{self.grid}, image_size="
                f"{self.image_size}) but got {idx.shape[1]}; match data resolution and model.image_size"
            )
        return idx

    def null_condition(self, batch_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The dropped ("unconditional") text condition, ``length`` tokens long."""
        if self.cond_drop_mode == "empty":
            with torch.no_grad():
                return self.text_encoder.null_condition(batch_size, length)
        device = self.text_proj.weight.device
        emb = torch.zeros(batch_size, length, self.text_encoder.dim, device=device)
        mask = torch.zeros(batch_size, length, dtype=torch.bool, device=device)
        mask[:, 0] = True  # one (zero) key, so the cross-attention has something to attend to
        return emb, mask

    def sample_condition_drop(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        """Bool [B]: which samples lose their text condition this step (probability ``cond_drop_prob``)."""
        return torch.rand(batch_size, device=device) < self.cond_drop_prob

    def drop_condition(
        self, emb: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the condition of the rows where ``drop`` is True by the null condition."""
        null_emb, null_mask = self.null_condition(emb.shape[0], emb.shape[1])
        null_emb = null_emb.to(emb.dtype)
        emb = torch.where(drop[:, None, None], null_emb, emb)
        mask = torch.where(drop[:, None], null_mask, mask.bool())
        return emb, mask

    # ---------------------------------------------------------------------------------------- transformer
    def logits(self, tokens: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Token ids [B, N] (with [MASK]s) + text condition → logits [B, N, codebook_size]."""
        positions = (self.row_emb[:, None] + self.col_emb[None, :]).flatten(0, 1)
        x = self.token_emb(tokens) + positions
        context = self.text_norm(self.text_proj(text_emb.to(self.text_proj.weight.dtype)))
        x = self.transformer(x, context=context, context_mask=text_mask.bool())
        return self.head(x)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Training outputs: ``logits`` [B,N,K], ``targets`` [B,N], ``mask`` [B,N] (True = was masked)."""
        if "image_tokens" in batch:
            tokens = self._check_tokens(
                torch.as_tensor(batch["image_tokens"]).to(self.token_emb.weight.device)
            )
        else:
            self._warn_if_untrained_image_tokenizer()
            tokens = self.encode_images(batch["image"])
        if "text_emb" in batch:
            text_emb = batch["text_emb"]
            text_mask = batch.get("text_mask")
            if text_mask is None:
                text_mask = torch.ones(text_emb.shape[:2], dtype=torch.bool, device=text_emb.device)
        else:
            text_emb, text_mask = self.encode_text(batch["caption"])
        batch_size = tokens.shape[0]
        if self.training and self.cond_drop_prob > 0:
            drop = self.sample_condition_drop(batch_size, tokens.device)
            text_emb, text_mask = self.drop_condition(text_emb, text_mask, drop)
        u = torch.rand(batch_size, device=tokens.device)
        mask = random_token_mask(cosine_mask_counts(u, self.num_tokens), self.num_tokens)
        inputs = tokens.masked_fill(mask, self.mask_token_id)
        return {"logits": self.logits(inputs, text_emb, text_mask), "targets": tokens, "mask": mask}

    def _warn_if_untrained_image_tokenizer(self) -> None:
        """Once per instance, in training: is the image tokenizer a trained one?"""
        if self.training and not bool(self.image_tokenizer_trained):
            warn_random_stage1(
                self,
                "image_tokenizer",
                "MUSE IS TRAINING ON A RANDOMLY INITIALISED IMAGE TOKENIZER: set model.image_tokenizer_checkpoint="
                "<vqgan .ckpt> (train one with model=vqgan) or feed pre-encoded image_tokens; generated images "
                "will be noise",
            )

    # ------------------------------------------------------------------------------------------ sampling
    @staticmethod
    def decode_schedule(num_tokens: int, steps: int) -> list[int]:
        return decode_schedule(num_tokens, steps)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        steps: int = 12,
        guidance_scale: float = 3.0,
        guidance_schedule: str = "linear",
        temperature: float = 1.0,
        seed: int | None = None,
        negative_prompts: list[str] | None = None,
        generator: torch.Generator | None = None,
        sample_temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Parallel decoding → images [B,3,H,W] in [0, 1]; see ``generate_tokens`` for the options."""
        tokens = self.generate_tokens(
            prompts,
            steps=steps,
            guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule,
            temperature=temperature,
            seed=seed,
            negative_prompts=negative_prompts,
            generator=generator,
            sample_temperature=sample_temperature,
            top_k=top_k,
        )
        return self.decode_tokens(tokens)

    @torch.no_grad()
    def generate_tokens(
        self,
        prompts: list[str],
        steps: int = 12,
        guidance_scale: float = 3.0,
        guidance_schedule: str = "linear",
        temperature: float = 1.0,
        seed: int | None = None,
        negative_prompts: list[str] | None = None,
        generator: torch.Generator | None = None,
        sample_temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Parallel decoding → token ids [B, N] (every one a codebook entry).

        ``guidance_scale`` is s in ``uncond + s·(cond - uncond)`` (Muse's g = s - 1), ramped over the steps by
        ``guidance_schedule``; ``negative_prompts`` replace the unconditional stream. ``temperature`` scales
        the Gumbel noise added to the confidences, annealed by ``1 - (t+1)/T``. Tokens are sampled from the
        guided distribution sharpened by ``sample_temperature`` (< 1: fewer stray tokens on small models)
        and cut to the ``top_k`` most likely (None: all). ``seed`` (or ``generator``) makes it reproducible.
        """
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ConfigError(
                f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}"
            )
        if sample_temperature <= 0:
            raise ConfigError(f"sample_temperature must be > 0, got {sample_temperature}")
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        was_training = self.training
        self.eval()
        try:
            use_cfg = guidance_scale != 1.0 or negative_prompts is not None
            text, text_mask = self._sampling_condition(list(prompts), negative_prompts, use_cfg)
            ids = torch.full(
                (len(prompts), self.num_tokens), self.mask_token_id, dtype=torch.long, device=text.device
            )
            generator = _generator(generator, seed, ids.device)
            for t, still_masked in enumerate(decode_schedule(self.num_tokens, steps)):
                scale = guidance_scale_at(t, steps, guidance_scale, guidance_schedule) if use_cfg else None
                log_probs = self._sampling_log_probs(ids, text, text_mask, scale, sample_temperature, top_k)
                ids = self._decode_step(
                    ids, log_probs, still_masked, temperature * (1 - (t + 1) / steps), generator
                )
            return ids
        finally:
            self.train(was_training)

    def _sampling_condition(
        self, prompts: list[str], negative_prompts: list[str] | None, use_cfg: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text condition of the conditional stream, followed (with CFG) by the unconditional one."""
        emb, mask = self.encode_text(prompts)
        if not use_cfg:
            return emb, mask
        if negative_prompts is not None:
            neg_emb, neg_mask = self.encode_text(negative_prompts)
        else:
            neg_emb, neg_mask = self.null_condition(len(prompts), emb.shape[1])
        length = max(emb.shape[1], neg_emb.shape[1])
        emb, mask = pad_condition(emb, mask, length)
        neg_emb, neg_mask = pad_condition(neg_emb.to(emb.dtype), neg_mask, length)
        return torch.cat([emb, neg_emb]), torch.cat([mask, neg_mask])

    def _sampling_log_probs(
        self,
        ids: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        scale: float | None,
        sample_temperature: float,
        top_k: int | None,
    ) -> torch.Tensor:
        """Log-probabilities [B, N, K] to sample from: guided (scale not None), tempered, top-k cut."""
        if scale is None:
            logits = self.logits(ids, text, text_mask).float()
        else:
            cond, uncond = self.logits(torch.cat([ids, ids]), text, text_mask).float().chunk(2)
            logits = apply_cfg(cond, uncond, scale)
        logits = logits / sample_temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        return logits.log_softmax(-1)

    def _decode_step(
        self,
        ids: torch.Tensor,
        log_probs: torch.Tensor,
        still_masked: int,
        noise_scale: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Sample every masked token, then re-mask the ``still_masked`` least confident of them."""
        sampled = torch.multinomial(log_probs.exp().flatten(0, 1), 1, generator=generator).view_as(ids)
        unknown = ids == self.mask_token_id
        filled = torch.where(unknown, sampled, ids)
        if still_masked == 0:
            return filled
        confidence = log_probs.gather(-1, sampled[..., None]).squeeze(-1)
        if noise_scale > 0:
            confidence = confidence + noise_scale * gumbel_noise(ids.shape, ids.device, generator)
        confidence = confidence.masked_fill(~unknown, math.inf)  # known tokens stay
        remask = confidence.topk(still_masked, dim=-1, largest=False).indices
        return filled.scatter(1, remask, self.mask_token_id)


def _generator(
    generator: torch.Generator | None, seed: int | None, device: torch.device
) -> torch.Generator | None:
    if generator is not None or seed is None:
        return generator
    return torch.Generator(device=device).manual_seed(seed)


def _required_attr(module: nn.Module, name: str) -> Any:
    if not hasattr(module, name):
        raise ConfigError(
            f"muse's image_tokenizer {type(module).__name__} has no `{name}`; use a VQ image tokenizer (vqgan)"
        )
    return getattr(module, name)
