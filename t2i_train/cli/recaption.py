"""`python -m t2i_train.recaption checkpoint=CKPT input_urls=SHARDS output_dir=DIR [style=dsc] [key=value ...]`

Recaptions shards with a trained captioner (DALL-E 3's recipe): every sample keeps all its members and gains
the synthetic caption as `<key>.<style>.txt` (`dsc.txt`; `field=NAME` writes `<key>.NAME.txt`). Train on it
with `data.caption_keys=[dsc,txt]` (blend with `data.caption_probs`, e.g. [0.95,0.05] as DALL-E 3 does).

Arguments:
  checkpoint=CKPT     a model=captioner training checkpoint or export folder
  input_urls=SHARDS   shards: a folder, a file, brace notation ('shards/{00000..00099}.tar') or a list
  output_dir=DIR      one output shard per input shard, same names, every original member kept
  style=dsc           the caption style (the captioner's style_prompts: dsc, ssc)
  field=NAME          member name of the new caption (default: the style; written as NAME.txt)
  json_field=NAME     also write the caption into the sample's JSON under NAME
  method=greedy       greedy | beam | top_p
  num_beams=4  top_p=0.9  temperature=1.0  max_new_tokens=N  seed=0
  rerank=K            decode K candidates (beam or top_p) and keep the one the captioner's CLIP matches best
  image_size=N        default: the data.image_size the captioner was trained with
  batch_size=N        images per decoding call (default 64)
  limit=N             recaption only the first N shards (a quick look before the full run)
  device=auto         auto | cpu | cuda | cuda:1 ...
  torch_threads=N     intra-op CPU threads (torch.set_num_threads); default: torch's
  use_ema=true        decode with the EMA weights when the checkpoint has them

Deterministic: each batch decodes from a seed made of `seed` and its first sample's key, so a run restarted
after a kill (finished shards are skipped, outputs are written atomically) writes the same bytes as an
uninterrupted one. Launched with torchrun/srun, each process takes every WORLD_SIZE-th shard. Small files next
to the inputs (dataset.json, prompts_*.txt, img2dataset's parquet/stats) are copied; DIR/recaptioned.json
records the checkpoint and decoding options.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import parse_shard_job_args, run_shard_job
from t2i_train.errors import ConfigError, DataError

log = logging.getLogger("t2i_train.recaption")
INT_ARGS = (
    "image_size",
    "batch_size",
    "num_beams",
    "max_new_tokens",
    "seed",
    "limit",
    "torch_threads",
    "rerank",
)
FLOAT_ARGS = ("top_p", "temperature")
BOOL_ARGS = ("use_ema",)
STR_ARGS = ("checkpoint", "input_urls", "output_dir", "style", "field", "json_field", "method", "device")
ALLOWED = {*STR_ARGS, *INT_ARGS, *FLOAT_ARGS, *BOOL_ARGS}
DECODING = ("method", "num_beams", "top_p", "temperature", "max_new_tokens", "rerank")


def parse_args(argv: list[str]) -> dict[str, Any]:
    return parse_shard_job_args(
        argv,
        __doc__,
        "python -m t2i_train.recaption",
        ALLOWED,
        ints=INT_ARGS,
        floats=FLOAT_ARGS,
        bools=BOOL_ARGS,
        zero_ok=("seed", "rerank"),
    )


class Recaption:
    """The batch transform: decode the images of raw samples, caption them, add ``<field>.txt`` (+ JSON)."""

    def __init__(
        self,
        model: Any,
        image_size: int,
        style: str,
        field: str,
        json_field: str | None,
        decoding: dict[str, Any],
        seed: int,
        device: torch.device,
    ) -> None:
        self.model, self.image_size, self.style, self.device = model, image_size, style, device
        self.member, self.json_field = f"{field}.txt", json_field
        self.decoding, self.seed = decoding, seed
        self.images = 0

    def batch_seed(self, raws: list[dict[str, Any]]) -> int:
        """A seed that depends only on the run's ``seed`` and the batch's first key (not on shard order)."""
        return zlib.crc32(f"{self.seed}/{raws[0]['__key__']}".encode())

    @torch.no_grad()
    def __call__(self, raws: list[dict[str, Any]]) -> list[dict[str, bytes] | str]:
        from t2i_train.data.transforms import SkipSample, decode_image, first_image_key, to_batch

        results: list[dict[str, bytes] | str] = []
        images, slots = [], []
        for raw in raws:
            try:
                data = raw[first_image_key(raw)]
                images.append(decode_image(data, self.image_size, "center_crop", False, random.Random(0)))
                slots.append(len(results))
                results.append({})
            except SkipSample as exc:
                results.append(str(exc))
        if not images:
            return results
        captions = self.model.caption(
            to_batch(images).to(self.device), style=self.style, seed=self.batch_seed(raws), **self.decoding
        )
        for slot, caption in zip(slots, captions, strict=True):
            results[slot] = self._members(raws[slot], caption)
        self.images += len(images)
        return results

    def _members(self, raw: dict[str, Any], caption: str) -> dict[str, bytes]:
        added = {self.member: caption.encode("utf-8")}
        if self.json_field:
            from t2i_train.data.transforms import parse_meta

            meta = parse_meta(raw)
            meta[self.json_field] = caption
            added["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        return added


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_captioner(checkpoint: str, use_ema: bool) -> tuple[Any, dict[str, Any]]:
    from t2i_train.checkpoint import load_family, read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    target = str((ckpt["t2i_config"].get("model") or {}).get("_target_", ""))
    if not target.endswith("captioner.Captioner"):
        family = target.rsplit(".", 1)[-1] or "non-t2i"
        raise ConfigError(
            f"{checkpoint} holds a {family} model, not model=captioner; recaption with a captioner"
        )
    return load_family(checkpoint, use_ema=use_ema, ckpt=ckpt), ckpt


def _check_paths(shards: list[str], output_dir: str) -> None:
    out = Path(output_dir).expanduser().resolve()
    for shard in shards:
        if Path(shard).exists() and Path(shard).resolve().parent == out:
            raise DataError(f"output_dir {output_dir} is the input shards' folder; choose another folder")


def recaption(
    checkpoint: str,
    input_urls: str | list[str],
    output_dir: str,
    style: str = "dsc",
    field: str | None = None,
    json_field: str | None = None,
    method: str = "greedy",
    num_beams: int = 4,
    top_p: float = 0.9,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    rerank: int = 0,
    seed: int = 0,
    image_size: int | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    device: str = "auto",
    use_ema: bool = True,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """Recaption ``input_urls`` into ``output_dir`` (see the module docstring); returns a summary dict."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    from t2i_train.cli.encode import trained_image_size
    from t2i_train.data.datamodule import resolve_urls
    from t2i_train.data.shard_map import copy_sidecars, map_shards, rank_and_world
    from t2i_train.models.captioner import _decoding_options, _rerank_options

    shards = resolve_urls(input_urls)[:limit] if limit else resolve_urls(input_urls)
    _check_paths(shards, output_dir)
    _decoding_options(method, num_beams, top_p, temperature)  # bad options stop before the model loads
    _rerank_options(method, num_beams, rerank)
    model, ckpt = _load_captioner(checkpoint, use_ema)
    if style not in model.style_prompts:
        raise ConfigError(f"style={style!r} is not one of this captioner's: {', '.join(model.style_prompts)}")
    size = image_size or trained_image_size(ckpt) or model.clip.image_size
    dev = _pick_device(device)
    model = model.to(dev).eval()
    decoding = {"method": method, "num_beams": num_beams, "top_p": top_p, "temperature": temperature}
    decoding.update(max_new_tokens=max_new_tokens, rerank=rerank)
    transform = Recaption(model, size, style, field or style, json_field, decoding, seed, dev)
    rank, _ = rank_and_world()
    log.info("recaptioning %d shards (%s, %s) into %s", len(shards), style, method, output_dir)
    start = time.perf_counter()
    summary = map_shards(shards, output_dir, transform, batch_size=batch_size)
    seconds = time.perf_counter() - start
    copied = copy_sidecars(shards, output_dir) if rank == 0 else []
    info = {"checkpoint": str(checkpoint), "style": style, "field": f"{field or style}.txt"}
    info.update({"json_field": json_field, "seed": seed, "image_size": size, **decoding})
    if rank == 0:
        (Path(output_dir) / "recaptioned.json").write_text(json.dumps(info, indent=2))
    log.info("%s", summary.describe())
    return {
        "output_dir": str(output_dir),
        **info,
        "shards_written": len(summary.written),
        "shards_already_done": len(summary.skipped_existing),
        "samples": summary.samples,
        "dropped": summary.dropped,
        "seconds": round(seconds, 1),
        "images_per_second": round(transform.images / seconds, 1) if transform.images else None,
        "copied": [p.name for p in copied],
    }


def main(argv: list[str] | None = None) -> None:
    run_shard_job(recaption, parse_args(apply_trust_argument(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
