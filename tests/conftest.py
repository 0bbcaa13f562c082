"""Shared fixtures: a small shapes dataset written once per session.

Helpers shared by test modules (``ROOT``, ``run_cli``, ``TINY_TRAIN``, ...) live in ``tests/helpers.py``;
``ROOT`` and ``run_cli`` are imported here too for modules that still import them from this file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, run_cli

__all__ = ["ROOT", "run_cli"]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder shared by every test that trains on the (small) synthetic shapes set."""
    path = tmp_path_factory.mktemp("t2i_cache")
    return path


@pytest.fixture(scope="session")
def small_data_overrides(data_cache: Path) -> list[str]:
    """Overrides that make any training config read a 512-sample shapes set from the session cache."""
    return [
        "data.synthetic.count=512",
        "data.synthetic.val_count=64",
        f"data.cache_dir={data_cache}",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.shuffle_buffer=64",
    ]
