"""`python -m t2i_train.encode checkpoint=CKPT input_urls=SHARDS output_dir=DIR [key=value ...]`

Pre-encodes shards with a trained stage-1 model so stage 2 does not run the frozen encoder in its loop:
a VQGAN adds `<key>.image_tokens.npy` to every sample (other stage-1 families add their own fields). Train on
the result with `data.train_urls=DIR data.fields=[image_tokens] data.load_images=false`.

Arguments:
  checkpoint=CKPT     a stage-1 training checkpoint (e.g. runs/vq/checkpoints/last.ckpt)
  input_urls=SHARDS   shards: a folder, a file, brace notation ('shards/{00000..00099}.tar') or a list
  output_dir=DIR      one output shard per input shard, same names, every original member kept
  image_size=N        default: the data.image_size the checkpoint was trained with
  resize=MODE         center_crop (default) | resize
  batch_size=N        images per encoder call (default 256)
  device=auto         auto | cpu | cuda | cuda:1 ...
  use_ema=true        encode with the EMA weights when the checkpoint has them

Finished output shards are skipped when re-run (restartable after a kill); outputs are written atomically.
Launched with torchrun/srun, each process takes every WORLD_SIZE-th shard. Small files next to the inputs
(dataset.json, prompts_*.txt, img2dataset's parquet/stats) are copied, and DIR/encoded.json records how
the fields were made.
"""

from __future__ import annotations

import io
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import parse_shard_job_args, run_shard_job
from t2i_train.errors import ConfigError

log = logging.getLogger("t2i_train.encode")
INT_ARGS = ("image_size", "batch_size")
BOOL_ARGS = ("use_ema",)
ALLOWED = {"checkpoint", "input_urls", "output_dir", "resize", "device", *INT_ARGS, *BOOL_ARGS}


def parse_args(argv: list[str]) -> dict[str, Any]:
    return parse_shard_job_args(
        argv, __doc__, "python -m t2i_train.encode", ALLOWED, ints=INT_ARGS, bools=BOOL_ARGS
    )


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
        from t2i_train.data.transforms import SkipSample, decode_image, first_image_key, to_batch

        results: list[dict[str, bytes] | str] = []
        images, slots = [], []
        for raw in raws:
            try:
                data = raw[first_image_key(raw)]
                images.append(decode_image(data, self.image_size, self.resize, False, random.Random(0)))
                slots.append(len(results))
                results.append({})
            except SkipSample as exc:
                results.append(str(exc))
        if not images:
            return results
        encoded = self.model.pre_encode(to_batch(images).to(self.device))
        for name, values in encoded.items():
            array = values.cpu().numpy()
            self.fields[name] = {"dtype": str(array.dtype), "shape": list(array.shape[1:])}
            for row, slot in enumerate(slots):
                results[slot][f"{name}.npy"] = _npy_bytes(array[row])  # type: ignore[index]
        return results


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def trained_image_size(checkpoint: dict[str, Any]) -> int | None:
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
    """Pre-encode ``input_urls`` into ``output_dir`` (see the module docstring); returns a summary dict."""
    from t2i_train.checkpoint import load_family, read_checkpoint
    from t2i_train.data.datamodule import resolve_urls
    from t2i_train.data.shard_map import copy_sidecars, map_shards, rank_and_world

    shards = resolve_urls(input_urls)
    ckpt = read_checkpoint(checkpoint)
    size = image_size or trained_image_size(ckpt)
    if size is None:
        raise ConfigError(f"{checkpoint} does not record its data.image_size; pass image_size=N")
    model = load_family(checkpoint, use_ema=use_ema).to(_pick_device(device)).eval()
    transform = PreEncode(model, size, resize, _pick_device(device))
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


def main(argv: list[str] | None = None) -> None:
    run_shard_job(encode, parse_args(apply_trust_argument(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
