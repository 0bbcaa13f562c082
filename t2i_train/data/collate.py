"""Decoded samples -> one batch: the configurable ``data.collate`` step of the shard reader.

The reader decodes each sample into ``{caption, meta, key, caption_source, image?, fields?}`` (see
``t2i_train.data.datamodule.SampleDecoder``); ``fields`` holds the arrays of ``data.fields`` (``<field>.npy``
members). ``data.collate`` builds a batch from a list of them. The stream then adds its fault counters
(``skipped``, ``bad_shards``), whatever the collate.

- :class:`DefaultCollate` (the default): lists of captions, metas, keys and caption sources; ``image`` as one
  float tensor [B, 3, H, W] in [-1, 1]; each field stacked into [B, ...] (every sample's array must have the
  same shape).
- :class:`PaddingCollate`: the same, except that the named *sequence* fields (variable-length token sequences,
  e.g. interleaved text + image tokens) are padded to the batch's longest, rounded up to a multiple, each with
  a boolean ``<name>_mask`` (True on real positions); and the named *neighbour* fields (a list of sequences per
  sample, e.g. retrieved neighbours) are kept as per-sample lists of tensors or padded to [B, K, L] with a
  [B, K, L] mask.

Any callable ``samples -> dict`` works (``_target_``, with ``_partial_: true`` for a function), e.g.::

    data.collate._target_=t2i_train.data.collate.PaddingCollate '+data.collate.sequences=[tokens]'
    '+data.collate.pad_to_multiple_of=8'

A collate runs in the data worker processes: keep it a top-level class or function (picklable) and
deterministic (it runs again when a resumed run replays the epoch).

Where a named field is looked up in a sample: its pre-encoded arrays (``data.fields``), then a key a custom
decoder set on the sample, then (for ``json.<path>``) the sample's JSON, e.g. ``json.neighbours`` holding a list
of token-id lists; the batch key is the last part of the name (``neighbours``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from t2i_train.data.transforms import to_batch
from t2i_train.errors import ConfigError, DataError

Samples = list[dict[str, Any]]
Collate = Callable[[Samples], dict[str, Any]]
PADDING_SIDES = ("right", "left")


class DefaultCollate:
    """Lists of the per-sample strings and metas, ``image`` [B, 3, H, W] in [-1, 1], fields stacked."""

    def __call__(self, samples: Samples) -> dict[str, Any]:
        return self.collate(samples, exclude=())

    def collate(self, samples: Samples, exclude: Sequence[str]) -> dict[str, Any]:
        """The default batch of ``samples``, leaving out the fields named in ``exclude``."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        batch: dict[str, Any] = {
            "caption": [s["caption"] for s in samples],
            "meta": [s["meta"] for s in samples],
            "key": [s["key"] for s in samples],
            "caption_source": [s["caption_source"] for s in samples],
        }
        if "image" in samples[0]:
            batch["image"] = to_batch([s["image"] for s in samples])
        for field in samples[0].get("fields", {}):
            if field not in exclude:
                batch[field] = stack_field(field, [s["fields"][field] for s in samples])
        return batch


def stack_field(field: str, arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """Equal-shape arrays -> one tensor [B, ...]; DataError naming the shapes (and the fix) when they differ."""
    shapes = {tuple(np.shape(a)) for a in arrays}
    if len(shapes) > 1:
        raise DataError(
            f"field {field!r} has different shapes within one batch ({', '.join(map(str, sorted(shapes)[:4]))}); "
            f"pad it: data.collate._target_=t2i_train.data.collate.PaddingCollate '+data.collate.sequences=[{field}]'"
        )
    return torch.from_numpy(np.stack(arrays))


def _round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def batch_key(name: str) -> str:
    """The batch key of a field name: ``json.a.b`` -> ``b``; others unchanged."""
    return name.rsplit(".", 1)[-1] if name.startswith("json.") else name


class PaddingCollate(DefaultCollate):
    """:class:`DefaultCollate`, with variable-length sequence fields padded (and masked).

    Args:
        sequences: fields holding one sequence per sample, an array [L_i, ...] (token ids, or [L_i, D]
            embeddings): padded along the first axis into ``<name>`` [B, L, ...] with ``<name>_mask`` [B, L]
            (bool, True on real positions).
        neighbours: fields holding a list of sequences per sample (retrieved neighbours; a 2-D array [K, L_k]
            counts as K sequences): with ``pad_neighbours`` one tensor [B, K, L, ...] (K the batch's largest
            count) and a mask [B, K, L] (False on missing neighbours and padding); otherwise a list (one per
            sample) of lists of tensors, untouched.
        pad_value: the value of padded positions; ``pad_values`` overrides it per field.
        pad_to_multiple_of: L (the longest sequence of the batch) is rounded up to this (e.g. 8 for tensor
            cores); also applies to the neighbours' L.
        max_length: longer sequences are cut to this many positions (from the end on ``padding_side=right``,
            from the start on ``left``); None: no limit. Must be a multiple of ``pad_to_multiple_of``.
        padding_side: ``right`` (real positions first) or ``left`` (real positions last, for decoding).
        mask_suffix: the mask key of field ``x`` is ``x + mask_suffix``.
    """

    def __init__(
        self,
        sequences: Sequence[str] = (),
        neighbours: Sequence[str] = (),
        pad_value: float = 0,
        pad_values: Mapping[str, float] | None = None,
        pad_to_multiple_of: int = 1,
        max_length: int | None = None,
        padding_side: str = "right",
        pad_neighbours: bool = True,
        mask_suffix: str = "_mask",
    ) -> None:
        if isinstance(sequences, str) or isinstance(neighbours, str):
            raise ConfigError("data.collate.sequences and data.collate.neighbours are lists of field names")
        self.sequences, self.neighbours = list(sequences), list(neighbours)
        if not self.sequences and not self.neighbours:
            raise ConfigError(
                "data.collate (PaddingCollate) pads nothing: name the variable-length fields in "
                "data.collate.sequences (e.g. [tokens]) or data.collate.neighbours"
            )
        both = sorted(set(self.sequences) & set(self.neighbours))
        if both:
            raise ConfigError(f"data.collate: {both} named both in sequences and neighbours")
        if (
            isinstance(pad_to_multiple_of, bool)
            or not isinstance(pad_to_multiple_of, int)
            or pad_to_multiple_of < 1
        ):
            raise ConfigError(
                f"data.collate.pad_to_multiple_of must be an integer >= 1, got {pad_to_multiple_of}"
            )
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
            or max_length % pad_to_multiple_of
        ):  # fmt: skip
            raise ConfigError(
                f"data.collate.max_length must be null or a positive multiple of pad_to_multiple_of="
                f"{pad_to_multiple_of}, got {max_length}"
            )
        if padding_side not in PADDING_SIDES:
            raise ConfigError(
                f"data.collate.padding_side must be one of {list(PADDING_SIDES)}, got {padding_side!r}"
            )
        unknown = sorted(set(pad_values or {}) - set(self.sequences) - set(self.neighbours))
        if unknown:
            raise ConfigError(f"data.collate.pad_values names fields that are not padded: {unknown}")
        keys = [batch_key(n) for n in self.sequences + self.neighbours]
        clash = sorted({k for k in keys if keys.count(k) > 1} | {k + mask_suffix for k in keys} & set(keys))
        if clash:
            raise ConfigError(f"data.collate: two padded fields would write the batch key(s) {clash}")
        self.pad_value, self.pad_values = pad_value, dict(pad_values or {})
        self.multiple, self.max_length = pad_to_multiple_of, max_length
        self.padding_side, self.pad_neighbours, self.mask_suffix = padding_side, pad_neighbours, mask_suffix

    def __call__(self, samples: Samples) -> dict[str, Any]:
        names = self.sequences + self.neighbours
        batch = self.collate(samples, exclude=names)
        for name in self.sequences:
            values, mask = self.pad([_as_array(name, field_value(s, name)) for s in samples], name)
            batch[batch_key(name)], batch[batch_key(name) + self.mask_suffix] = values, mask
        for name in self.neighbours:
            lists = [_as_sequences(name, field_value(s, name)) for s in samples]
            key = batch_key(name)
            if self.pad_neighbours:
                batch[key], batch[key + self.mask_suffix] = self.pad_lists(lists, name)
            else:
                batch[key] = [[torch.from_numpy(a) for a in row] for row in lists]
        return batch

    def _cut(self, array: np.ndarray) -> np.ndarray:
        if self.max_length is None or len(array) <= self.max_length:
            return array
        return array[: self.max_length] if self.padding_side == "right" else array[-self.max_length :]

    def _length(self, arrays: Sequence[np.ndarray]) -> int:
        return _round_up(max((len(a) for a in arrays), default=0), self.multiple)

    def pad(self, arrays: Sequence[np.ndarray], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences [L_i, ...] -> (values [B, L, ...], mask [B, L])."""
        arrays = [self._cut(a) for a in arrays]
        trailing = _trailing_shape(name, arrays)
        length = self._length(arrays)
        dtype = np.result_type(*arrays) if arrays else np.int64
        values = np.full(
            (len(arrays), length, *trailing), self.pad_values.get(name, self.pad_value), dtype=dtype
        )
        mask = np.zeros((len(arrays), length), dtype=bool)
        for i, array in enumerate(arrays):
            n = len(array)
            where = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            values[i, where], mask[i, where] = array, True
        return torch.from_numpy(values), torch.from_numpy(mask)

    def pad_lists(
        self, lists: Sequence[Sequence[np.ndarray]], name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample lists of sequences -> (values [B, K, L, ...], mask [B, K, L])."""
        flat = [self._cut(a) for row in lists for a in row]
        count = max((len(row) for row in lists), default=0)
        trailing = _trailing_shape(name, flat)
        length = self._length(flat)
        dtype = np.result_type(*flat) if flat else np.int64
        fill = self.pad_values.get(name, self.pad_value)
        values = np.full((len(lists), count, length, *trailing), fill, dtype=dtype)
        mask = np.zeros((len(lists), count, length), dtype=bool)
        for i, row in enumerate(lists):
            for k, array in enumerate(row):
                array = self._cut(array)
                n = len(array)
                where = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
                values[i, k, where], mask[i, k, where] = array, True
        return torch.from_numpy(values), torch.from_numpy(mask)


def field_value(sample: Mapping[str, Any], name: str) -> Any:
    """A named field of a decoded sample: ``fields[name]``, else ``sample[name]``, else (``json.<path>``) the JSON."""
    fields = sample.get("fields") or {}
    if name in fields:
        return fields[name]
    if name in sample:
        return sample[name]
    if name.startswith("json."):
        value: Any = sample.get("meta") or {}
        for part in name[len("json.") :].split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None:
            return value
    raise DataError(
        f"sample {sample.get('key')!r} has no field {name!r} for data.collate (add it to data.fields to read "
        f"{name}.npy, or name a json.<field> of the sample's JSON)"
    )


def _as_array(name: str, value: Any) -> np.ndarray:
    array = value.numpy() if torch.is_tensor(value) else np.asarray(value)
    if array.ndim == 0:
        raise DataError(f"field {name!r} is a scalar, not a sequence; data.collate.sequences pads sequences")
    if array.dtype == object:
        raise DataError(
            f"field {name!r} is ragged; name it in data.collate.neighbours for lists of sequences"
        )
    return array


def _as_sequences(name: str, value: Any) -> list[np.ndarray]:
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim >= 2:
        return [_as_array(name, row) for row in value]
    if isinstance(value, (list, tuple)):
        return [_as_array(name, row) for row in value]
    raise DataError(f"field {name!r} is not a list of sequences (data.collate.neighbours)")


def _trailing_shape(name: str, arrays: Sequence[np.ndarray]) -> tuple[int, ...]:
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"field {name!r}: sequences differ beyond their length ({sorted(shapes)[:4]})")
    return next(iter(shapes), ())


def build_collate(spec: Any) -> Collate:
    """The collate of ``data.collate``: None (the default), a callable, or a ``_target_`` mapping
    (instantiated here, so a bad one is one ConfigError line naming it)."""
    if spec is None:
        return DefaultCollate()
    if callable(spec):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(f"data.collate must be a _target_ node or null, got {type(spec).__name__} {spec!r}")
    spec = _plain(spec)
    target = spec.get("_target_")
    if not target:
        raise ConfigError(
            "data.collate needs a _target_ (t2i_train.data.collate.DefaultCollate or PaddingCollate, or a "
            "callable of your own)"
        )
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        collate = instantiate(spec, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        detail = str(cause or exc).strip().splitlines()[0]
        raise ConfigError(f"data.collate: cannot build {target} ({detail})") from exc
    if not callable(collate):
        raise ConfigError(
            f"data.collate: {target} built a {type(collate).__name__}, not a callable on samples"
        )
    return collate


def _plain(spec: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(spec, DictConfig):
        return OmegaConf.to_container(spec, resolve=True)  # type: ignore[return-value]
    return dict(spec)
