"""Shared fixtures: a small shapes dataset written once per session, config composition, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
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


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600, env: dict[str, str] | None = None):
    """Run ``python -m <args>`` as a user would; returns the CompletedProcess (never raises on failure)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )
