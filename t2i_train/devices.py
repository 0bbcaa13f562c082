"""Where a command runs: one ``pick_device`` for every entry point and library function that takes ``device=``."""

from __future__ import annotations

import torch


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: the first CUDA device when one is available, else the CPU; any other name (``cpu``, ``cuda``,
    ``cuda:1``, ``mps``, a ``torch.device``) as torch reads it."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
