"""Pre-encoding shards with a trained stage-1 model, so stage 2 does not run the frozen encoder in its loop.

A family that can ``pre_encode`` (VQGAN: ``image_tokens``; VAE, CLIP: their own fields) adds
``<key>.<field>.npy`` to every sample; every original member is kept. ``python -m t2i_train.encode``
(``t2i_train.cli.encode``) parses arguments and calls ``encode``; the recipes call it directly.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2i_train.devices import pick_device
from t2i_train.errors import ConfigError
from t2i_train.models.capabilities import require

log = logging.getLogger("t2i_train.encode")


class PreEncode:
    """The batch transform: decode the images of raw samples, run the family's ``pre_encode``, store ``.npy``."""

    def __init__(self, model: Any, image_size: int, resize: str, device: torch.device) -> None:
        from t2i_train.data.transforms import RESIZE_MODES

        if resize not in RESIZE_MODES or resize == "random_crop":
            raise ConfigError(f"resize must be center_crop or resize (deterministic), got {resize!r}")
        self.model, self.image_size, self.resize, self.device = model, image_size, resize, device
        self.fields: dict[str, dict[str, Any]] = {}

    @torch.no_grad()
    def __call__(self, raws: list[dict[str, Any]]) -> list[dict[str, bytes] | str]:
        from t2i_train.data.transforms import decode_for_rewrite

        images, slots, results = decode_for_rewrite(raws, self.image_size, self.resize)
        if images is None:
            return results
        encoded = self.model.pre_encode(images.to(self.device))
        for name, values in encoded.items():
            array = values.cpu().numpy()
            self.fields[name] = {"dtype": str(array.dtype), "shape": list(array.shape[1:])}
            for row, slot in enumerate(slots):
                results[slot][f"{name}.npy"] = npy_bytes(array[row])  # type: ignore[index]
        return results


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def trained_image_size(checkpoint: dict[str, Any]) -> int | None:
    """The ``data.image_size`` a checkpoint's run trained with (None when it does not say)."""
    size = (checkpoint.get("t2i_config") or {}).get("data", {}).get("image_size")
    return int(size) if size is not None else None


def encode(
    checkpoint: str,
    input_urls: str | list[str],
    output_dir: str,
    image_size: int | None = None,
    resize: str = "center_crop",
    batch_size: int = 256,
    device: str = "auto",
    use_ema: bool = True,
) -> dict[str, Any]:
    """Pre-encode ``input_urls`` into ``output_dir`` (one output shard per input shard, same names; finished
    shards are skipped when re-run; each process of a torchrun/srun launch takes every WORLD_SIZE-th shard;
    small files next to the inputs are copied; ``DIR/encoded.json`` records how the fields were made).
    Returns a summary dict."""
    from t2i_train.checkpoint import load_family, read_checkpoint
    from t2i_train.data.datamodule import resolve_urls
    from t2i_train.data.shard_map import copy_sidecars, map_shards, rank_and_world

    shards = resolve_urls(input_urls)
    ckpt = read_checkpoint(checkpoint)
    size = image_size or trained_image_size(ckpt)
    if size is None:
        raise ConfigError(f"{checkpoint} does not record its data.image_size; pass image_size=N")
    dev = pick_device(device)
    model = load_family(checkpoint, use_ema=use_ema).to(dev).eval()
    require(model, "pre_encode", f"encode checkpoint={checkpoint}")
    transform = PreEncode(model, size, resize, dev)
    rank, _ = rank_and_world()
    start = time.perf_counter()
    log.info(
        "encoding %d shards with %s (%s, %dpx) into %s",
        len(shards),
        checkpoint,
        model.family_name,
        size,
        output_dir,
    )
    summary = map_shards(shards, output_dir, transform, batch_size=batch_size)
    copied = copy_sidecars(shards, output_dir) if rank == 0 else []
    result = {
        "output_dir": str(output_dir),
        "checkpoint": str(checkpoint),
        "family": model.family_name,
        "image_size": size,
        "resize": resize,
        "fields": transform.fields,
        "shards_written": len(summary.written),
        "shards_already_done": len(summary.skipped_existing),
        "samples": summary.samples,
        "dropped": summary.dropped,
        "seconds": round(time.perf_counter() - start, 1),
        "copied": [p.name for p in copied],
    }
    if rank == 0:
        info = {k: result[k] for k in ("checkpoint", "family", "image_size", "resize", "fields")}
        (Path(output_dir) / "encoded.json").write_text(json.dumps(info, indent=2))
    log.info("%s", summary.describe())
    return result
