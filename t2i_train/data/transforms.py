"""Per-sample decoding for the shard reader: image bytes -> [-1, 1] tensor, and caption selection.

A sample that cannot be used raises :class:`SkipSample` with a short reason, so the reader can skip and count it.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from t2i_train.errors import ConfigError

IMAGE_KEYS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
RESIZE_MODES: tuple[str, ...] = ("center_crop", "resize", "random_crop")


class SkipSample(Exception):
    """A sample that cannot be used; the message is the reason logged with its key."""


def decode_image(
    data: bytes, size: int, mode: str, flip: bool, rng: random.Random, max_pixels: int | None = None
) -> np.ndarray:
    """Decode and resize/crop to ``size``x``size``; returns uint8 [size, size, 3] (see :func:`to_batch`).

    Modes: ``center_crop`` (shorter side to ``size``, centre square), ``resize`` (both sides to ``size``,
    aspect not kept), ``random_crop`` (shorter side to ``size``, random square along the longer side).
    ``flip``: horizontal flip with probability 0.5 drawn from ``rng``.
    ``max_pixels``: skip images that would decode to more pixels (checked from the header, before any pixel
    is decoded; a JPEG counts at the reduced scale it is decoded at); None: no limit of ours. PIL's own
    decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) also ends in a skip, never a crash.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size
            check_pixels(img.size, max_pixels)
            img.load()
            image = img if img.mode == "RGB" else img.convert("RGB")
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipSample(f"image refused by PIL's decompression-bomb guard ({exc})") from exc
    except Exception as exc:
        raise SkipSample(f"undecodable image ({type(exc).__name__}: {exc})") from exc
    image = resize_crop(image, size, mode, rng)
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.uint8)


def check_pixels(dims: tuple[int, int], max_pixels: int | None) -> None:
    """SkipSample when an image of ``dims`` (width, height) has more than ``max_pixels`` pixels."""
    width, height = dims
    if max_pixels is not None and width * height > max_pixels:
        raise SkipSample(
            f"image is {width}x{height} = {width * height} pixels, more than "
            f"data.max_image_pixels={max_pixels} (raise it, or null for no limit, to decode such images)"
        )


def resize_crop(image: Image.Image, size: int, mode: str, rng: random.Random) -> Image.Image:
    w, h = image.size
    if mode == "resize":
        return image if (w, h) == (size, size) else image.resize((size, size), Image.BICUBIC)
    scale = size / min(w, h)
    if scale != 1:
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), Image.BICUBIC)
    if (w, h) == (size, size):
        return image
    if mode == "random_crop":
        left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    else:
        left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] arrays -> float tensor [B, 3, H, W] in [-1, 1] (one conversion per batch is far
    cheaper than per-sample tensor ops at small image sizes)."""
    array = torch.from_numpy(np.stack(images))
    return array.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def decode_for_rewrite(
    raws: Sequence[Mapping[str, Any]], image_size: int, resize: str
) -> tuple[torch.Tensor | None, list[int], list[dict[str, bytes] | str]]:
    """Deterministic decode of a batch of raw shard samples for the shard-rewriting jobs (encode, recaption).

    Returns (images [N, 3, S, S] in [-1, 1] or None when none decoded, the result slot of each image, results):
    ``results`` holds one entry per raw sample, an empty dict to fill for a decoded one and the skip reason
    (a string) for one that could not be decoded.
    """
    results: list[dict[str, bytes] | str] = []
    images, slots = [], []
    for raw in raws:
        try:
            data = raw[first_image_key(raw)]
            images.append(decode_image(data, image_size, resize, False, random.Random(0)))
            slots.append(len(results))
            results.append({})
        except SkipSample as exc:
            results.append(str(exc))
    return (to_batch(images) if images else None), slots, results


def parse_meta(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The sample's JSON as a dict ({} when absent or unparsable)."""
    data = raw.get("json")
    if data is None:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def read_caption(raw: Mapping[str, Any], meta: Mapping[str, Any], key: str) -> str | None:
    """Caption under ``key``: a file extension (``txt``), a JSON field (``json.descriptive``, nested ``json.a.b``),
    or a bare name whose ``<name>.txt`` member holds it (``dsc`` reads ``dsc.txt``, written by
    ``python -m t2i_train.recaption``)."""
    if key.startswith("json."):
        value: Any = meta
        for part in key[len("json.") :].split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        text = value if isinstance(value, str) else None
    else:
        data = raw.get(key)
        if data is None:
            data = raw.get(f"{key}.txt")
        if data is None:
            return None
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
        except UnicodeDecodeError:
            return None
    text = text.strip() if text else None
    return text or None


class CaptionPicker:
    """Choose a caption key per sample: the first available one, or randomly with ``probs`` (blending).

    With probabilities, a chosen key that is missing falls back to the next key (in ``keys`` order,
    wrapping around) that is present.
    """

    def __init__(self, keys: Sequence[str], probs: Sequence[float] | None = None) -> None:
        if not keys:
            raise ConfigError("data.caption_keys must name at least one key (e.g. [txt])")
        self.keys = list(keys)
        self.weights: list[float] | None = None
        if probs is not None:
            if len(probs) != len(keys) or any(p < 0 for p in probs) or sum(probs) <= 0:
                raise ConfigError(
                    f"data.caption_probs {list(probs)} must give one non-negative weight per caption key "
                    f"{self.keys}, not all zero"
                )
            total = float(sum(probs))
            self.weights = [p / total for p in probs]

    def __call__(
        self, raw: Mapping[str, Any], meta: Mapping[str, Any], rng: random.Random
    ) -> tuple[str, str]:
        """(caption, key used); raises SkipSample when no key yields a caption."""
        start = 0 if self.weights is None else rng.choices(range(len(self.keys)), self.weights)[0]
        for offset in range(len(self.keys)):
            key = self.keys[(start + offset) % len(self.keys)]
            caption = read_caption(raw, meta, key)
            if caption is not None:
                return caption, key
        raise SkipSample(f"no caption (looked for {', '.join(self.keys)})")


def first_image_key(raw: Mapping[str, Any]) -> str:
    for key in IMAGE_KEYS:
        if raw.get(key) is not None:
            return key
    present = sorted(k for k in raw if not k.startswith("__"))
    raise SkipSample(f"no image (keys {', '.join(IMAGE_KEYS)}; sample has {', '.join(present) or 'nothing'})")


def read_array(raw: Mapping[str, Any], field: str) -> np.ndarray:
    """The pre-encoded ``<field>.npy`` of a sample (written by ``python -m t2i_train.encode``)."""
    data = raw.get(f"{field}.npy")
    if data is None:
        raise SkipSample(
            f"no {field}.npy (data.fields asks for it: write it with `python -m t2i_train.encode "
            "checkpoint=<stage-1 .ckpt> input_urls=... output_dir=...`)"
        )
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise SkipSample(f"unreadable {field}.npy ({type(exc).__name__}: {exc})") from exc
