"""Helpers shared by test modules: import them from here, never from another test module.

``tests/conftest.py`` holds the pytest fixtures (and re-exports ``ROOT`` / ``run_cli`` for old imports).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]

#: Overrides that make a training CLI run quick and quiet on CPU (no progress bar, no sample grids).
TINY_TRAIN = [
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.num_workers=0",
    "data.batch_size=8",
    "data.shuffle_buffer=16",
    "sampling.every_n_steps=0",
]


def run_cli(
    *args: str, cwd: Path = ROOT, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <args>`` as a user would; returns the CompletedProcess (never raises on failure)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """The CLI failed as a user error: exit code 2, exactly one ``error:`` line holding ``fragments``, no
    traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def compose_train(overrides: list[str]) -> DictConfig:
    """The training config ``python -m t2i_train <overrides>`` would run (without Hydra's runtime keys)."""
    from hydra import compose, initialize_config_dir

    from t2i_train.cli.common import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def save_tiny_lm(path: Path, n_positions: int = 1024, constant_token: str | None = None) -> Path:
    """A tiny GPT2 over ByT5's byte vocabulary, saved with its tokenizer like a downloaded model.

    ``constant_token``: weights that make every next-token distribution peak on that one character.
    """
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = ByT5Tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    if constant_token is not None:
        (token_id,) = tokenizer(constant_token, add_special_tokens=False)["input_ids"]
        with torch.no_grad():  # final hidden state = ln_f.bias = 1; logits = wte @ 1 (tied head)
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.fill_(1.0)
            model.transformer.wte.weight.zero_()
            model.transformer.wte.weight[token_id] = 1.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tensors_equal(a: Any, b: Any) -> bool:
    """Whether two (nested dict/list of) tensors are bit-identical; non-tensor leaves compare with ``==``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


def save_random_clip(path: Path, init_seed: int = 3) -> Path:
    """A model=clip checkpoint as training writes it (its config and random weights), saved directly."""
    from t2i_train.models.clip import CLIPFamily

    state = {f"model.{k}": v for k, v in CLIPFamily(init_seed=init_seed).state_dict().items()}
    config = {
        "model": {"_target_": "t2i_train.models.clip.CLIPFamily", "init_seed": init_seed},
        "data": {"image_size": 32},
    }
    torch.save({"t2i_config": config, "state_dict": state}, path)
    return path
