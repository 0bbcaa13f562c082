"""GILL's decision head (retrieve or generate, per prompt): automatic labels, then the head trained alone.

The paper trained its classifier on human preferences; here the labels are automatic. For each prompt GILL
generates an image and retrieves its top-1 image from an index; the label is ``retrieve`` when the retrieved
image's CLIP score against the prompt is at least the generated one's (ties: retrieve), else ``generate``::

    python -m t2i_train.gill_decision checkpoint=runs/gill/checkpoints/last.ckpt index=bank_index \
        prompts_file=prompts.txt output=runs/gill/decision.ckpt

or ``train_decision_head(checkpoint, index, prompts_file, output)`` from Python (the ``gill`` recipe). Steps:

1. labels (:func:`build_labels`) into ``labels`` (default ``<output>.labels.jsonl``): a header line recording
   what they were made from (checkpoint, index, prompts, scorer and sampling settings), then one line per
   prompt ``{prompt, label, generated_score, retrieved_score, retrieved_key, retrieved_shard}``. A labels file
   made from the same inputs is reused; any other is rebuilt.
2. the [IMG0] states of every prompt, computed once under no_grad (the LM is frozen, so they never change),
   then ``model.decision`` (Dropout + Linear) trained on a seeded train split (:func:`train_head`: AdamW,
   full-batch steps, dropout on, cross-entropy); accuracies on both splits and the held-out majority-class
   baseline (:func:`evaluate_head`).
3. ``output``: a copy of the GILL checkpoint with ``model.decision.*`` replaced (and in ``ema`` where it holds
   them) plus a ``t2i_gill_decision`` record, written atomically; the input checkpoint is not touched.

The launcher is ``t2i_train/cli/gill_decision.py`` (``python -m t2i_train.gill_decision`` runs it, see the end of
this module); docs/gill.md describes the labels and what the numbers mean.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from t2i_train.errors import CheckpointError, ConfigError
from t2i_train.models.gill import DECISIONS

log = logging.getLogger("t2i_train.gill_decision")

RECORD_KEY = "t2i_gill_decision"
LABELS_FORMAT = 1
#: header fields that must match for a labels file to be reused
LABEL_SOURCES = (
    "checkpoint_fingerprint",
    "index_fingerprint",
    "prompts_sha256",
    "scorer",
    "sampling",
    "seed",
)
NO_GENERATOR = (
    "{checkpoint}: this GILL has no image generator, and the labels need one (each prompt's generated image is "
    "scored against its retrieved one): set model.generator_checkpoint=<the diffusion checkpoint whose text "
    "encoder is model.target_encoder> in the GILL run"
)


@dataclass(frozen=True)
class Label:
    """One prompt's automatic label and the two CLIP scores it came from."""

    prompt: str
    label: str
    generated_score: float
    retrieved_score: float
    retrieved_key: str
    retrieved_shard: str


def label_rule(generated_score: float, retrieved_score: float) -> str:
    """``retrieve`` when the retrieved image scores at least the generated one (a tie keeps the cheaper,
    real image), else ``generate``."""
    return "retrieve" if retrieved_score >= generated_score else "generate"


# ------------------------------------------------------------------------------------------------ entry
def train_decision_head(
    checkpoint: str,
    index: str,
    prompts_file: str,
    output: str,
    labels: str | None = None,
    holdout: float = 0.2,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
    clip_scorer: str | None = None,
    sampling: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    device: str = "auto",
) -> dict[str, Any]:
    """Labels, the head trained alone, the new checkpoint (module docstring); returns the summary.

    ``sampling``: ``generate`` options over the run's own ``sampling.kwargs``; ``clip_scorer``: None for GILL's
    own frozen CLIP, else a ``pick_scorer`` spec (a clip checkpoint, ``open_clip:NAME/TAG``).
    """
    from t2i_train.checkpoint import load_family, read_checkpoint
    from t2i_train.devices import pick_device
    from t2i_train.retrieval import RetrievalIndex
    from t2i_train.sampling import pick_scorer, read_prompts, training_sampling_kwargs

    start = time.perf_counter()
    _check_options(checkpoint, output, holdout, steps, lr, batch_size)
    prompts = read_prompts(None, prompts_file)
    bank = RetrievalIndex.load(index)
    ckpt = read_checkpoint(checkpoint)
    model = load_family(checkpoint, ckpt=ckpt).to(pick_device(device))
    check_gill(model, checkpoint)
    options = {**training_sampling_kwargs(ckpt), **dict(sampling or {})}
    labels_path = Path(labels) if labels else Path(f"{output}.labels.jsonl")
    header = labels_header(checkpoint, index, prompts, clip_scorer, options, seed, batch_size)
    rows = read_labels(labels_path, header)
    if rows is None:
        if not model.available("generate"):
            raise ConfigError(NO_GENERATOR.format(checkpoint=checkpoint))
        scorer = pick_scorer(clip_scorer, model, model.device)
        rows = build_labels(model, prompts, bank, scorer, options, seed, batch_size)
        write_labels(labels_path, header, rows)
    states = img0_states(model, prompts, batch_size)
    targets = torch.tensor([DECISIONS.index(row.label) for row in rows], device=states.device)
    train_rows, held_rows = split_indices(len(rows), holdout, seed)
    train_head(model.decision, states[train_rows], targets[train_rows], steps, lr, seed)
    result = evaluate_head(model.decision, states, targets, train_rows, held_rows)
    summary = {
        "labels": len(rows),
        "label_counts": {name: sum(row.label == name for row in rows) for name in DECISIONS},
        "retrieve_share": sum(row.label == "retrieve" for row in rows) / len(rows),
        **result,
        "labels_path": str(labels_path),
        "checkpoint": str(checkpoint),
        "output": str(output),
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "holdout": holdout,
    }
    write_decision_checkpoint(ckpt, output, model.decision, summary)
    log.info("wrote %s (the decision head trained; every other weight as in %s)", output, checkpoint)
    return {**summary, "seconds": round(time.perf_counter() - start, 2)}


def _check_options(checkpoint: str, output: str, holdout: float, steps: int, lr: float, batch: int) -> None:
    """One line for what is wrong before anything is read."""
    if _same_path(checkpoint, output):
        raise ConfigError(
            f"output={output} is the input checkpoint; write the trained head to another file "
            "(the input checkpoint is never modified)"
        )
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"holdout must be in [0, 1) (the held-out share of the prompts), got {holdout}")
    if steps < 1 or batch < 1 or lr <= 0:
        raise ConfigError(f"steps, batch_size and lr must be positive (got {steps}, {batch}, {lr})")


def _same_path(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    first, second = Path(a).expanduser(), Path(b).expanduser()
    if first.exists() and second.exists():
        return first.samefile(second)
    return first.resolve() == second.resolve()


def check_gill(model: Any, checkpoint: str) -> None:
    """A family with a decision head that retrieves and decides (GILL), else a one-line ConfigError."""
    head = getattr(model, "decision", None)
    if not (model.can("decide") and model.can("retrieve") and isinstance(head, nn.Module)):
        raise ConfigError(
            f"{checkpoint} holds model={model.family_name}, which has no retrieve-or-generate decision head; "
            "pass a GILL checkpoint (model=gill)"
        )


# ------------------------------------------------------------------------------------------------ labels
def labels_header(
    checkpoint: str,
    index: str,
    prompts: Sequence[str],
    scorer: str | None,
    sampling: Mapping[str, Any],
    seed: int,
    batch_size: int,
) -> dict[str, Any]:
    """What a labels file is made from: a file whose header differs in ``LABEL_SOURCES`` is rebuilt.

    ``batch_size`` is recorded but not compared: it changes the generator's seeding only through how prompts
    are grouped, and a reused file is not worth rebuilding for it.
    """
    from t2i_train.retrieval import checkpoint_fingerprint

    return {
        "format": LABELS_FORMAT,
        "checkpoint": str(Path(checkpoint).expanduser().resolve()),
        "checkpoint_fingerprint": checkpoint_fingerprint(checkpoint),
        "index": str(Path(index).expanduser().resolve()),
        "index_fingerprint": index_fingerprint(index),
        "prompts": len(prompts),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
        "scorer": scorer,
        "sampling": json.loads(json.dumps(dict(sampling), sort_keys=True, default=str)),
        "seed": seed,
        "batch_size": batch_size,
    }


def index_fingerprint(index: str | os.PathLike[str]) -> str:
    """One hash of an index folder's three finished files (each by ``checkpoint_fingerprint``)."""
    from t2i_train.retrieval import INDEX_FILE, KEYS_FILE, META_FILE, checkpoint_fingerprint

    folder = Path(index).expanduser()
    parts = [checkpoint_fingerprint(folder / name) for name in (META_FILE, KEYS_FILE, INDEX_FILE)]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]


def read_labels(path: Path, header: Mapping[str, Any]) -> list[Label] | None:
    """The labels in ``path`` when its header matches ``header`` (what they would be made from now), else
    None (absent, another source, or unreadable: they are rebuilt, with the reason logged)."""
    if not path.is_file():
        return None
    try:
        lines = path.read_text().splitlines()
        stored = json.loads(lines[0])
        rows = [Label(**json.loads(line)) for line in lines[1:]]
    except (OSError, ValueError, TypeError, IndexError) as exc:
        log.info("labels %s are unreadable (%s): rebuilding them", path, exc)
        return None
    changed = [key for key in LABEL_SOURCES if stored.get(key) != header[key]]
    if stored.get("format") != LABELS_FORMAT or len(rows) != header["prompts"]:
        changed.append("format or count")
    if changed:
        log.info("labels %s were made from another %s: rebuilding them", path, ", ".join(changed))
        return None
    log.info("reusing %d labels from %s (same checkpoint, index, prompts and settings)", len(rows), path)
    return rows


def write_labels(path: Path, header: Mapping[str, Any], rows: Sequence[Label]) -> None:
    """The header line, then one JSON line per label; written to a tmp file and renamed."""
    text = json.dumps(dict(header)) + "\n" + "".join(json.dumps(asdict(row)) + "\n" for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_labels(
    model: Any,
    prompts: Sequence[str],
    index: Any,
    scorer: Any,
    sampling: Mapping[str, Any],
    seed: int = 0,
    batch_size: int = 32,
) -> list[Label]:
    """Generate (``seed + first prompt number`` per batch of ``batch_size``) and retrieve the top-1 image of
    every prompt, score both against it with ``scorer`` and label it (:func:`label_rule`)."""
    from t2i_train.metrics.clip_score import clip_score

    rows: list[Label] = []
    start_time = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        generated = model.generate(batch, seed=seed + start, **sampling).float().clamp(0, 1).cpu()
        hits = [found[0] for found in model.retrieve(batch, k=1, index=index)]
        retrieved = retrieved_images(hits, generated.shape[-1], index)
        generated_scores = clip_score(generated, batch, scorer).tolist()
        retrieved_scores = clip_score(retrieved, batch, scorer).tolist()
        for prompt, hit, gen, ret in zip(batch, hits, generated_scores, retrieved_scores, strict=True):
            rows.append(Label(prompt, label_rule(gen, ret), round(gen, 4), round(ret, 4), hit.key, hit.shard))
        log.info("labels: %d/%d prompts (%.1fs)", len(rows), len(prompts), time.perf_counter() - start_time)
    return rows


def retrieved_images(hits: Sequence[Any], size: int, index: Any) -> torch.Tensor:
    """The stored images of ``hits`` as [B, 3, size, size] in [0, 1], cropped / resized the way the index
    embedded them (its ``resize``), at the generated images' size so CLIP sees both alike."""
    import random

    import numpy as np

    from t2i_train.data.transforms import resize_crop
    from t2i_train.sampling import read_hit_images

    mode = str(index.meta.get("resize", "center_crop"))
    arrays = [np.asarray(resize_crop(image, size, mode, random.Random(0))) for image in read_hit_images(hits)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


# ------------------------------------------------------------------------------------------------ head
@torch.no_grad()
def img0_states(model: Any, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """The [IMG0] hidden state of every prompt [N, W] (float32): the decision head's input. The LM is
    frozen, so these are computed once and the head trains on them alone."""
    chunks = [
        model.image_pass(list(prompts[i : i + batch_size]), teach=False).img_states[:, 0].float()
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(chunks)


def split_indices(count: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of ``range(count)`` cut into (train, held-out); the held-out part is
    ``round(holdout * count)`` rows, at least one when ``holdout > 0`` and at least one row is left to train."""
    held = round(holdout * count)
    if holdout > 0 and count > 1:
        held = min(max(held, 1), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[held:], order[:held]


def train_head(
    head: nn.Module, states: torch.Tensor, targets: torch.Tensor, steps: int, lr: float, seed: int = 0
) -> list[float]:
    """Re-initialise ``head`` (seeded), then ``steps`` full-batch AdamW steps of cross-entropy with its
    dropout active; returns the losses. The head's parameters are left without gradient, as GILL keeps them."""
    with torch.random.fork_rng(devices=_cuda_ids(states.device)):
        torch.manual_seed(seed)
        for module in head.modules():
            if hasattr(module, "reset_parameters") and module is not head:
                module.reset_parameters()
        head.train().requires_grad_(True)
        dtype = next(head.parameters()).dtype
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
        losses = []
        for step in range(steps):
            loss = F.cross_entropy(head(states.to(dtype)).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().item())
            if (step + 1) % max(1, steps // 4) == 0:
                log.info("head: step %d/%d, loss %.4f", step + 1, steps, losses[-1])
    head.eval().requires_grad_(False)
    return losses


def _cuda_ids(device: torch.device) -> list[int]:
    """The CUDA device whose RNG (dropout) ``fork_rng`` must save and restore, if any."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@torch.no_grad()
def accuracy(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Share of rows whose argmax (dropout off) is the target; None for no rows."""
    if len(targets) == 0:
        return None
    dtype = next(head.parameters()).dtype
    picks = head.eval()(states.to(dtype)).argmax(dim=-1)
    return float((picks == targets).float().mean())


def evaluate_head(
    head: nn.Module,
    states: torch.Tensor,
    targets: torch.Tensor,
    train_rows: torch.Tensor,
    held_rows: torch.Tensor,
) -> dict[str, Any]:
    """Train and held-out accuracy, and the held-out majority-class baseline (the accuracy of always
    answering the commonest held-out label: the number the held-out accuracy has to beat)."""
    held = targets[held_rows].tolist()
    majority = Counter(held).most_common(1)[0] if held else None
    return {
        "train_count": len(train_rows),
        "heldout_count": len(held_rows),
        "train_accuracy": accuracy(head, states[train_rows], targets[train_rows]),
        "heldout_accuracy": accuracy(head, states[held_rows], targets[held_rows]),
        "baseline": majority[1] / len(held) if majority else None,
        "baseline_class": DECISIONS[majority[0]] if majority else None,
    }


# ------------------------------------------------------------------------------------------------ output
def write_decision_checkpoint(
    ckpt: dict[str, Any], output: str | os.PathLike[str], head: nn.Module, record: Mapping[str, Any]
) -> None:
    """``ckpt`` (the GILL checkpoint as read) with ``model.decision.*`` replaced by ``head``'s weights, in
    ``state_dict`` and in ``ema`` where it holds them, and ``record`` under ``t2i_gill_decision``, saved
    atomically to ``output``. Every other entry is the same object as read, so it is saved unchanged."""
    from t2i_train.checkpoint_io import atomic_torch_save

    weights = {name: value.detach().cpu().clone() for name, value in head.state_dict().items()}
    state = dict(ckpt["state_dict"])
    missing = [name for name in weights if f"model.decision.{name}" not in state]
    if missing:
        raise CheckpointError(
            f"the checkpoint holds no model.decision.{missing[0]}: is it a GILL checkpoint?"
        )
    for name, value in weights.items():
        state[f"model.decision.{name}"] = value.to(state[f"model.decision.{name}"].dtype)
    out = {**ckpt, "state_dict": state, RECORD_KEY: dict(record)}
    ema = ckpt.get("ema")
    if ema:
        out["ema"] = {
            **ema,
            **{
                f"decision.{n}": v.to(ema[f"decision.{n}"].dtype)
                for n, v in weights.items()
                if f"decision.{n}" in ema
            },
        }
    atomic_torch_save(out, output)


if __name__ == "__main__":  # python -m t2i_train.gill_decision
    # The launcher imports this module, so this module cannot import the launcher (an import circle, see
    # tests/unit/test_imports.py); run as __main__, it is a separate module object and the launcher runs as
    # its own __main__.
    import runpy

    runpy.run_module("t2i_train.cli.gill_decision", run_name="__main__", alter_sys=True)
