"""Recaptioning shards with a trained captioner (DALL-E 3's recipe): every sample keeps all its members and
gains the synthetic caption as ``<key>.<field>.txt`` (and optionally a JSON field).

``python -m t2i_train.recaption`` (``t2i_train.cli.recaption``) parses arguments and calls ``recaption``; the
recipes call it directly. Deterministic: each batch decodes from a seed made of ``seed`` and its first
sample's key, so a run restarted after a kill writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from t2i_train.devices import pick_device
from t2i_train.errors import CheckpointError, ConfigError, DataError
from t2i_train.models.capabilities import require

log = logging.getLogger("t2i_train.recaption")


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
        from t2i_train.data.transforms import decode_for_rewrite

        images, slots, results = decode_for_rewrite(raws, self.image_size, "center_crop")
        if images is None:
            return results
        captions = self.model.caption(
            images.to(self.device), style=self.style, seed=self.batch_seed(raws), **self.decoding
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


def checkpoint_family(ckpt: dict[str, Any], source: str) -> type:
    """The family class a checkpoint's config builds (its ``model._target_``), imported but not built, so what
    it can do is known before any weight loads."""
    from hydra.utils import get_class

    from t2i_train.models.base import Family

    target = str((ckpt.get("t2i_config", {}).get("model") or {}).get("_target_", ""))
    try:
        cls = get_class(target) if target else None
    except Exception as exc:
        raise CheckpointError(f"{source}: its model _target_ {target!r} cannot be imported ({exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise CheckpointError(f"{source} does not hold a t2i_train model (model._target_={target!r})")
    return cls


def load_captioner(checkpoint: str, use_ema: bool) -> tuple[Any, dict[str, Any]]:
    """A family that can caption, and its checkpoint dict; a one-line error naming what the checkpoint's family
    can do otherwise (checked before its weights load)."""
    from t2i_train.checkpoint import load_family, read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    require(checkpoint_family(ckpt, checkpoint), "caption", f"recaption checkpoint={checkpoint}")
    return load_family(checkpoint, use_ema=use_ema, ckpt=ckpt), ckpt


def check_paths(shards: list[str], output_dir: str) -> None:
    """Refuse to write into the folder the input shards are in."""
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
    """Recaption ``input_urls`` into ``output_dir`` (see the module docstring and ``python -m
    t2i_train.recaption --help``); returns a summary dict."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    from t2i_train.data.datamodule import resolve_urls
    from t2i_train.data.encode import trained_image_size
    from t2i_train.data.shard_map import copy_sidecars, map_shards, rank_and_world
    from t2i_train.text.causal_lm import decoding_options, rerank_options

    shards = resolve_urls(input_urls)[:limit] if limit else resolve_urls(input_urls)
    check_paths(shards, output_dir)
    decoding_options(method, num_beams, top_p, temperature)  # bad options stop before the model loads
    rerank_options(method, num_beams, rerank)
    model, ckpt = load_captioner(checkpoint, use_ema)
    if style not in model.style_prompts:
        raise ConfigError(f"style={style!r} is not one of this captioner's: {', '.join(model.style_prompts)}")
    size = image_size or trained_image_size(ckpt) or model.clip.image_size
    dev = pick_device(device)
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
