"""Vector quantizer with a straight-through estimator, usage tracking and dead-code restarts.

Input ``z`` is channel-first ``[B, dim, *spatial]``; every position is replaced by its nearest codebook vector
(squared Euclidean distance, or cosine when ``l2_normalized``). Gradients reach the encoder through the
straight-through estimator ``z + (z_q - z).detach()``; the codebook itself learns from the codebook loss
``|sg(z) - z_q|^2`` and the encoder is pulled towards its codes by the commitment loss ``|z - sg(z_q)|^2``
(weighted by ``beta`` inside ``vq_loss``).

Usage statistics: in training mode the share of positions assigned to each code is tracked as an EMA buffer
(``usage``). Every ``restart_every`` training steps codes whose EMA share is below
``dead_code_threshold / codebook_size`` (a fraction of the uniform share) are re-initialised from encoder
outputs of the current batch, drawn with probability proportional to their quantization error (so the
worst-served regions of feature space get new codes first; the EMA starts at zero, so a code never used
during the first ``restart_every`` steps is dead at the first check). Under torch.distributed the per-code counts are all-reduced, so every
rank sees the same dead set, and the replacement vectors are broadcast from rank 0, so the codebooks stay
identical across ranks. With ``data_init`` the whole codebook is initialised the same way on the first
training step (a cheap k-means++-free start that avoids a mostly-dead codebook).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantizer (VQ-VAE / VQGAN)."""

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        l2_normalized: bool = False,
        dead_code_threshold: float = 0.03,
        restart_every: int = 100,
        usage_decay: float = 0.99,
        data_init: bool = True,
    ) -> None:
        super().__init__()
        if codebook_size < 2 or dim < 1:
            raise ValueError(f"codebook_size must be >= 2 and dim >= 1, got {codebook_size}, {dim}")
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.l2_normalized = l2_normalized
        self.dead_code_threshold = dead_code_threshold
        self.restart_every = restart_every
        self.usage_decay = usage_decay
        self.data_init = data_init
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim))
        nn.init.uniform_(self.codebook, -1.0 / codebook_size, 1.0 / codebook_size)
        #: EMA of the share of positions assigned to each code (sums to ~1).
        self.register_buffer("usage", torch.zeros(codebook_size))
        #: training forward passes seen (drives the restart schedule).
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not data_init))

    # ----------------------------------------------------------------------------------------- pure lookups
    def normalized_codebook(self) -> torch.Tensor:
        book = self.codebook.float()
        return F.normalize(book, dim=-1) if self.l2_normalized else book

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` [N, dim] (already normalised if needed)."""
        return self._nearest_with_error(flat)[0]

    def _nearest_with_error(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-code indices and squared quantization errors for the rows of ``flat``."""
        book = self.normalized_codebook()
        # |z|^2 is the same for every code, so argmin |z - e|^2 = argmin (|e|^2 - 2 z.e).
        distances = book.pow(2).sum(-1) - 2.0 * flat @ book.t()
        best, idx = distances.min(dim=-1)
        return idx, (best + flat.pow(2).sum(-1)).clamp_min(0.0)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for ``indices`` [B, *spatial] as a channel-first tensor [B, dim, *spatial]."""
        vectors = F.embedding(indices, self.normalized_codebook())
        return vectors.movedim(-1, 1)

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.float().movedim(1, -1).reshape(-1, self.dim)
        return F.normalize(flat, dim=-1) if self.l2_normalized else flat

    @torch.no_grad()
    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices [B, *spatial] for ``z`` [B, dim, *spatial], with no side effects."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            idx = self.nearest(self._flatten(z))
        return idx.reshape(z.shape[0], *z.shape[2:])

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantize ``z`` [B, dim, *spatial] -> (z_q with straight-through gradient, indices, terms).

        ``terms`` holds ``codebook_loss``, ``commitment_loss``, ``vq_loss`` (codebook + beta * commitment)
        and the detached statistics ``perplexity``, ``usage_fraction`` (share of codes used in this global
        batch), ``alive_fraction`` (share of codes above the dead threshold in the EMA) and ``restarted``.
        """
        if z.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} channels, got input of shape {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self._flatten(z)
            if self.training and not bool(self.initialized):
                self._initialize_from(flat.detach())
            idx, errors = self._nearest_with_error(flat.detach())
            quantized = F.embedding(idx, self.normalized_codebook())
            codebook_loss = F.mse_loss(quantized, flat.detach())
            commitment_loss = F.mse_loss(flat, quantized.detach())
            straight = flat + (quantized - flat).detach()
            counts = self._counts(idx)
            restarted = self._track_and_restart(counts, flat.detach(), errors) if self.training else 0
        probs = counts / counts.sum().clamp_min(1.0)
        terms = {
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "vq_loss": codebook_loss + self.beta * commitment_loss,
            "perplexity": torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()),
            "usage_fraction": (counts > 0).float().mean(),
            "alive_fraction": (self.usage >= self._dead_share()).float().mean(),
            "restarted": torch.tensor(float(restarted), device=z.device),
        }
        out_shape = (z.shape[0], *z.shape[2:], self.dim)
        z_q = straight.reshape(out_shape).movedim(-1, 1).to(z.dtype)
        return z_q, idx.reshape(z.shape[0], *z.shape[2:]), terms

    # ------------------------------------------------------------------------------- usage and restarts
    def _dead_share(self) -> float:
        return self.dead_code_threshold / self.codebook_size

    @torch.no_grad()
    def _counts(self, idx: torch.Tensor) -> torch.Tensor:
        """Per-code assignment counts over the global batch (all ranks)."""
        counts = torch.bincount(idx, minlength=self.codebook_size).float()
        if self.training and _distributed():
            dist.all_reduce(counts)
        return counts

    @torch.no_grad()
    def _sample_vectors(
        self, flat: torch.Tensor, n: int, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``n`` rows of ``flat`` drawn with probability ~ ``weights`` (uniform when None), without
        replacement when there are enough candidates; rank 0's draw is broadcast so all ranks agree."""
        if weights is None or not bool((weights > 0).any()):
            weights = torch.ones(flat.shape[0], device=flat.device)
        enough = int((weights > 0).sum()) >= n
        rows = torch.multinomial(weights.float(), n, replacement=not enough)
        vectors = flat[rows].contiguous()
        if _distributed():
            dist.broadcast(vectors, src=0)
        return vectors

    @torch.no_grad()
    def _initialize_from(self, flat: torch.Tensor) -> None:
        self.codebook.data.copy_(self._sample_vectors(flat, self.codebook_size).to(self.codebook.dtype))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _track_and_restart(self, counts: torch.Tensor, flat: torch.Tensor, errors: torch.Tensor) -> int:
        share = counts / counts.sum().clamp_min(1.0)
        self.usage.mul_(self.usage_decay).add_(share, alpha=1.0 - self.usage_decay)
        self.steps += 1
        if self.restart_every <= 0 or self.dead_code_threshold <= 0 or int(self.steps) % self.restart_every:
            return 0
        dead = (self.usage < self._dead_share()).nonzero().squeeze(-1)
        if dead.numel() == 0:
            return 0
        self.codebook.data[dead] = self._sample_vectors(flat, dead.numel(), errors).to(self.codebook.dtype)
        self.usage[dead] = 1.0 / self.codebook_size  # grace period before they can be judged dead again
        return int(dead.numel())
