"""Pre-encoding shards with a trained model, so the next stage does not run a frozen encoder in its loop.

A family that can ``pre_encode`` (VQGAN: ``image_tokens``; VAE, CLIP: their own fields) adds
``<key>.<field>.npy`` to every sample from its image; one that can ``pre_encode_captions`` (GILL: its
generation target, a frozen text encoder's output) adds ``<key>.<field>.npy`` from the sample's caption, picked
by ``caption_keys`` as the data module picks it (first key present wins). A family may do either or both; every
original member is kept. ``python -m t2i_train.encode`` (``t2i_train.cli.encode``) parses arguments and calls
``encode`` (a checkpoint); the recipes call it directly, and ``encode_model`` takes a built model.
"""

from __future__ import annotations

import io
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from t2i_train.devices import pick_device
from t2i_train.errors import ConfigError, DataError
from t2i_train.models.capabilities import capabilities

if TYPE_CHECKING:
    from t2i_train.data.shard_map import MapSummary

log = logging.getLogger("t2i_train.encode")

#: the capabilities encode can use: fields from images, fields from captions
ENCODERS = ("pre_encode", "pre_encode_captions")
#: sample keys without a caption listed in the summary (all of them are counted)
LIST_FIRST_UNCAPTIONED = 10


class PreEncode:
    """The batch transform: read each raw sample's caption and decode its image (for the capabilities the model
    has), run ``pre_encode`` / ``pre_encode_captions``, store each field as ``<field>.npy``.

    A sample without a caption (with ``pre_encode_captions``) or an undecodable image (with ``pre_encode``) is
    dropped with its reason; samples without a caption are also counted per shard (``uncaptioned_shard``).
    """

    def __init__(
        self,
        model: Any,
        image_size: int | None,
        resize: str,
        device: torch.device,
        caption_keys: str | Sequence[str] = ("txt",),
    ) -> None:
        from t2i_train.data.transforms import RESIZE_MODES, CaptionPicker

        have = capabilities(model)
        self.encode_images, self.encode_captions = "pre_encode" in have, "pre_encode_captions" in have
        if self.encode_images and (resize not in RESIZE_MODES or resize == "random_crop"):
            raise ConfigError(f"resize must be center_crop or resize (deterministic), got {resize!r}")
        if self.encode_images and image_size is None:
            raise ConfigError("encoding images needs image_size=N")
        self.model, self.resize, self.device = model, resize, device
        self.image_size = image_size or 0  # 0: images are not decoded
        self.caption_keys = caption_key_list(caption_keys)
        self.pick_caption = CaptionPicker(self.caption_keys)  # no probabilities: the first key present wins
        self.rng = random.Random(0)  # CaptionPicker's argument, unused without probabilities
        self.fields: dict[str, dict[str, Any]] = {}
        self.caption_fields: list[str] = []
        #: per shard: samples with / without a caption; the first keys of those without
        self.captioned: Counter[str] = Counter()
        self.uncaptioned: Counter[str] = Counter()
        self.uncaptioned_keys: list[str] = []
        self.last_shard: str | None = None

    @torch.no_grad()
    def __call__(self, raws: list[dict[str, Any]]) -> list[dict[str, bytes] | str]:
        results, captions = self.read_captions(raws)
        todo = [i for i, result in enumerate(results) if not isinstance(result, str)]
        if self.encode_images and todo:
            todo = self.add_image_fields(raws, todo, results)
        if self.encode_captions and todo:
            encoded = self.model.pre_encode_captions([captions[i] for i in todo])
            self.store(encoded, todo, results, from_captions=True)
        return results

    def read_captions(self, raws: list[dict[str, Any]]) -> tuple[list[dict[str, bytes] | str], list[str]]:
        """One result per sample ({} to fill, or why it is dropped) and its caption ("" without captions)."""
        if not self.encode_captions:
            return [{} for _ in raws], [""] * len(raws)
        results: list[dict[str, bytes] | str] = []
        captions: list[str] = []
        for raw in raws:
            caption, result = self.caption_of(raw)
            results.append(result)
            captions.append(caption)
        return results, captions

    def caption_of(self, raw: dict[str, Any]) -> tuple[str, dict[str, bytes] | str]:
        """(the caption the data module would pick, {}), or ("", why not), counted per shard."""
        from t2i_train.data.transforms import SkipSample, parse_meta

        shard = self.last_shard = str(raw.get("__url__", "?"))
        try:
            caption, _ = self.pick_caption(raw, parse_meta(raw), self.rng)
        except SkipSample as exc:
            self.uncaptioned[shard] += 1
            if len(self.uncaptioned_keys) < LIST_FIRST_UNCAPTIONED:
                self.uncaptioned_keys.append(str(raw.get("__key__", "?")))
            return "", str(exc)
        self.captioned[shard] += 1
        return caption, {}

    def add_image_fields(
        self, raws: list[dict[str, Any]], todo: list[int], results: list[dict[str, bytes] | str]
    ) -> list[int]:
        """Decode the images of the samples ``todo``, store their ``pre_encode`` fields; returns the decoded ones."""
        from t2i_train.data.transforms import decode_for_rewrite

        images, slots, decoded = decode_for_rewrite([raws[i] for i in todo], self.image_size, self.resize)
        for i, result in zip(todo, decoded, strict=True):
            results[i] = result
        kept = [todo[slot] for slot in slots]
        if images is not None:
            self.store(self.model.pre_encode(images.to(self.device)), kept, results, from_captions=False)
        return kept

    def store(
        self,
        encoded: Mapping[str, torch.Tensor],
        slots: list[int],
        results: list[dict[str, bytes] | str],
        from_captions: bool,
    ) -> None:
        """Row ``i`` of each field becomes ``<field>.npy`` of the sample in result slot ``slots[i]``."""
        for name, values in encoded.items():
            if from_captions and name in self.fields and name not in self.caption_fields:
                raise ConfigError(f"pre_encode and pre_encode_captions both write the field {name!r}")
            if from_captions and name not in self.caption_fields:
                self.caption_fields.append(name)
            array = to_numpy(values)
            if len(array) != len(slots):
                raise RuntimeError(f"field {name!r} has {len(array)} rows for {len(slots)} samples")
            self.fields[name] = {"dtype": str(array.dtype), "shape": list(array.shape[1:])}
            for row, slot in enumerate(slots):
                results[slot][f"{name}.npy"] = npy_bytes(array[row])  # type: ignore[index]

    def uncaptioned_shard(self) -> str | None:
        """The shard read last, when none of its samples had a caption (the shard the map stopped on)."""
        shard = self.last_shard
        return shard if shard is not None and self.uncaptioned[shard] and not self.captioned[shard] else None


def caption_key_list(keys: str | Sequence[str]) -> list[str]:
    """``caption_keys`` as a list: a list, or a string ``json.descriptive,txt`` / ``[json.descriptive,txt]``."""
    if isinstance(keys, str):
        keys = keys.strip().removeprefix("[").removesuffix("]").split(",")
    names = [str(k).strip().strip("'\"") for k in keys]
    names = [k for k in names if k]
    if not names:
        raise ConfigError("caption_keys must name at least one key (e.g. txt, or json.descriptive,txt)")
    return names


def to_numpy(values: torch.Tensor) -> np.ndarray:
    """A field as an array; bfloat16 (which numpy lacks) is stored as float32, losslessly."""
    values = values.detach().cpu()
    return (values.float() if values.dtype == torch.bfloat16 else values).numpy()


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def trained_image_size(checkpoint: dict[str, Any]) -> int | None:
    """The ``data.image_size`` a checkpoint's run trained with (None when it does not say)."""
    size = (checkpoint.get("t2i_config") or {}).get("data", {}).get("image_size")
    return int(size) if size is not None else None


def require_encoder(model: Any, what: str) -> None:
    """ConfigError in ``require``'s words unless ``model`` can ``pre_encode`` or ``pre_encode_captions``."""
    have = capabilities(model)
    if not set(ENCODERS) & set(have):
        name = getattr(model, "family_name", type(model).__name__)
        raise ConfigError(
            f"{what} needs a model that can {' or '.join(ENCODERS)}; model={name} can: {', '.join(have) or 'none'}"
        )


def encode(
    checkpoint: str,
    input_urls: str | list[str],
    output_dir: str,
    image_size: int | None = None,
    resize: str = "center_crop",
    batch_size: int = 256,
    device: str = "auto",
    use_ema: bool = True,
    caption_keys: str | Sequence[str] = ("txt",),
) -> dict[str, Any]:
    """Pre-encode ``input_urls`` into ``output_dir`` with the family of ``checkpoint`` (see ``encode_model``;
    ``image_size`` defaults to the ``data.image_size`` it trained with). Returns a summary dict."""
    from t2i_train.checkpoint import load_family, read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    model = load_family(checkpoint, use_ema=use_ema, ckpt=ckpt)
    return encode_model(
        model,
        input_urls,
        output_dir,
        image_size=image_size or trained_image_size(ckpt),
        resize=resize,
        batch_size=batch_size,
        device=device,
        caption_keys=caption_keys,
        source=str(checkpoint),
    )


def encode_model(
    model: Any,
    input_urls: str | list[str],
    output_dir: str,
    *,
    image_size: int | None = None,
    resize: str = "center_crop",
    batch_size: int = 256,
    device: str | torch.device = "auto",
    caption_keys: str | Sequence[str] = ("txt",),
    source: str | None = None,
) -> dict[str, Any]:
    """Pre-encode ``input_urls`` into ``output_dir`` with a built ``model`` (one output shard per input shard,
    same names; finished shards are skipped when re-run; each process of a torchrun/srun launch takes every
    WORLD_SIZE-th shard; small files next to the inputs are copied; ``DIR/encoded.json`` records how the fields
    were made). ``image_size`` is needed when the model can ``pre_encode``; ``caption_keys`` is read when it can
    ``pre_encode_captions``; ``source`` (the checkpoint) is recorded and named in errors. Returns a summary."""
    from t2i_train.data.datamodule import resolve_urls
    from t2i_train.data.shard_map import copy_sidecars, rank_and_world

    what = f"encode checkpoint={source}" if source else "encode"
    require_encoder(model, what)
    if "pre_encode" in capabilities(model) and image_size is None:
        raise ConfigError(f"{source or 'the model'} does not record its data.image_size; pass image_size=N")
    shards = resolve_urls(input_urls)
    dev = pick_device(device) if isinstance(device, str) else device
    model = model.to(dev).eval()
    transform = PreEncode(model, image_size, resize, dev, caption_keys)
    rank, _ = rank_and_world()
    start = time.perf_counter()
    log.info("encoding %d shards with %s (%s) into %s", len(shards), source, model.family_name, output_dir)
    summary = map_checked(shards, output_dir, transform, batch_size)
    copied = copy_sidecars(shards, output_dir) if rank == 0 else []
    images = transform.encode_images
    result = {
        "output_dir": str(output_dir),
        "checkpoint": source,
        "family": model.family_name,
        "image_size": image_size if images else None,
        "resize": resize if images else None,
        "fields": transform.fields,
        **caption_summary(transform),
        "shards_written": len(summary.written),
        "shards_already_done": len(summary.skipped_existing),
        "samples": summary.samples,
        "dropped": summary.dropped,
        "seconds": round(time.perf_counter() - start, 1),
        "copied": [p.name for p in copied],
    }
    if rank == 0:
        recorded = (
            "checkpoint",
            "family",
            "image_size",
            "resize",
            "fields",
            "caption_keys",
            "caption_fields",
        )
        info = {k: result[k] for k in recorded if k in result}
        (Path(output_dir) / "encoded.json").write_text(json.dumps(info, indent=2))
    log.info("%s", summary.describe())
    return result


def caption_summary(transform: PreEncode) -> dict[str, Any]:
    """The summary's caption part (empty when the model encodes no captions), logging the samples without one."""
    if not transform.encode_captions:
        return {}
    missing = sum(transform.uncaptioned.values())
    if missing:
        log.warning(
            "%d samples had no caption under caption_keys=%s and were dropped (first: %s)",
            missing,
            ",".join(transform.caption_keys),
            ", ".join(transform.uncaptioned_keys),
        )
    return {
        "caption_keys": transform.caption_keys,
        "caption_fields": transform.caption_fields,
        "no_caption": missing,
        "no_caption_keys": transform.uncaptioned_keys,
    }


def map_checked(shards: list[str], output_dir: str, transform: PreEncode, batch_size: int) -> MapSummary:
    """``map_shards``, with a shard none of whose samples has a caption reported as that (naming the keys)
    rather than as a shard with no usable samples."""
    from t2i_train.data.shard_map import map_shards

    try:
        return map_shards(shards, output_dir, transform, batch_size=batch_size)
    except DataError as exc:
        shard = transform.uncaptioned_shard()
        # only map_shards' end-of-shard "no usable samples" check, not a tar that broke mid-read
        if shard is None or "no usable samples" not in str(exc):
            raise
        raise DataError(
            f"shard {shard}: none of its {transform.uncaptioned[shard]} samples has a caption under "
            f"caption_keys={','.join(transform.caption_keys)}; pass the keys its captions are under "
            "(e.g. caption_keys=json.descriptive,txt) or remove it from the inputs"
        ) from exc
