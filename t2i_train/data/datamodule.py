"""The one LightningDataModule: WebDataset shards (img2dataset layout) or the embedded synthetic shapes set.

Pipeline per process (built from webdataset's pieces, batching done in the dataset):

    shard list (seeded shuffle per epoch, or ResampledShards) -> split by node -> split by worker
    -> read tar + decode + pick caption (corrupt samples skipped and counted, damaged shards reported)
    -> seeded shuffle buffer -> data.collate (t2i_train.data.collate) -> batches
       {image, caption, meta, key, caption_source, <fields>, skipped, bad_shards}

The collate step is configurable (``data.collate``, a ``_target_`` node): :class:`~t2i_train.data.collate.
DefaultCollate` stacks images and equal-shape fields; :class:`~t2i_train.data.collate.PaddingCollate` pads
variable-length sequences (interleaved text + image tokens) with a mask, and lists of retrieved neighbours.

Data faults, and what each batch reports of them since the previous batch of its worker:

- ``skipped`` (long tensor): samples skipped (undecodable, no caption, over ``max_image_pixels``) plus samples
  lost from a damaged shard when the number it should hold is known (``<shard>_stats.json`` beside a local
  ``<shard>.tar``, field ``successes``: written by img2dataset and by :mod:`t2i_train.data.shards`). Above
  ``max_skip_rate`` of the samples seen by a worker, the run stops with one DataError line.
- ``bad_shards`` (list of str): shards found damaged (unreadable or truncated tar, fewer samples than its
  stats file lists, or no usable sample), each reported and logged once per worker process. A worker
  tolerates ``max_bad_shards`` of them (-1: any number); one more stops the run with one DataError line.

Both limits apply per data worker process (the main process when ``num_workers=0``), as the counts are kept
where the shards are read. The batching holds each full batch until the next sample arrives, so what is
counted after the last sample of a pass still reaches that pass's last batch. Remaining gaps: a worker that
yields no batch at all (every shard it read was unusable) reports nothing, and with a fixed epoch length
(``samples_per_epoch``) counts made after an epoch's last batch arrive with the next epoch's first batch.

Every random choice (shard order, shuffle buffer, caption blending, crops, flips) comes from a seed mixed
from (seed, epoch, rank, worker), so a run is reproducible and each epoch differs. Lightning's fit loop
calls ``set_epoch`` on a DataLoader's sampler at every epoch start; :class:`ShardLoader` forwards that call
into a shared value the worker processes read when the epoch starts.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import tarfile
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from glob import glob
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from t2i_train.data import synthetic as shapes
from t2i_train.data.collate import Collate, DefaultCollate, build_collate
from t2i_train.data.transforms import (
    RESIZE_MODES,
    CaptionPicker,
    SkipSample,
    decode_image,
    first_image_key,
    parse_meta,
    read_array,
)
from t2i_train.errors import ConfigError, DataError, T2IError

log = logging.getLogger(__name__)

MIN_SAMPLES_FOR_RATE = 50
WARN_FIRST_SKIPS = 5
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # well below PIL's decompression-bomb warning (89.5 M pixels)
SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "size": 32,
    "count": 20000,
    "seed": 0,
    "holdout": None,
    "holdout_fraction": 0.1,
    "holdout_seed": None,
    "samples_per_shard": 500,
    "val_count": 512,
    "image_format": "png",
}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):")


# ------------------------------------------------------------------------------------------------ URLs
def is_local(url: str) -> bool:
    match = _SCHEME.match(url)
    return match is None or match.group(1) == "file"


def local_path(url: str) -> Path:
    return Path(re.sub(r"^file://?", "/", url) if url.startswith("file:") else url).expanduser()


def resolve_urls(urls: str | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Expand ``urls`` into shard URLs and check that local ones exist and are not empty.

    Accepts brace notation (``dir/{000000..000099}.tar``), ``::``-joined or list forms, glob patterns and
    directories (every ``*.tar`` inside, e.g. an img2dataset output folder). ``pipe:`` URLs need
    ``allow_pipe``. Raises DataError naming the first missing or empty local shard.
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    result: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(str(item)):
            result.extend(_expand_local(url))
    if not result:
        raise DataError(f"no shards found for {urls!r}")
    for url in result:
        if url.startswith("pipe:") and not allow_pipe:
            raise DataError(
                f"refusing to run shell command URL {url!r}; set data.allow_pipe=true to allow pipe: URLs"
            )
        if is_local(url):
            _check_local_shard(local_path(url))
    return result


def _expand_local(url: str) -> list[str]:
    if not is_local(url):
        return [url]
    path = local_path(url)
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            raise DataError(f"folder {path} holds no *.tar shards")
        return tars
    if any(ch in str(path) for ch in "*?["):
        matches = sorted(glob(str(path)))
        if not matches:
            raise DataError(f"no shards match {url}")
        return matches
    return [str(path)]


def _check_local_shard(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"shard {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(512)
    if not head.strip(b"\0"):
        raise DataError(f"shard {path} is empty")


# ----------------------------------------------------------------------------------------- synthetic cache
def default_cache_dir(cache_dir: str | None = None) -> Path:
    """``cache_dir``, else ``$T2I_CACHE``, else ``~/.cache/t2i_train``."""
    return Path(cache_dir or os.environ.get("T2I_CACHE") or "~/.cache/t2i_train").expanduser()


def synthetic_params(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown data.synthetic option(s) {unknown}; known: {sorted(SYNTHETIC_DEFAULTS)}")
    params = {**SYNTHETIC_DEFAULTS, **options}
    if params["holdout"] is not None:
        params["holdout"] = list(params["holdout"])
    return params


def synthetic_dir(options: dict[str, Any], cache_dir: str | None = None) -> Path:
    """Where the synthetic set for these options lives (a hash of the options in the folder name)."""
    params = synthetic_params(options)
    key = json.dumps({**params, "version": shapes.GENERATOR_VERSION}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    name = f"shapes-{params['size']}px-n{params['count']}-seed{params['seed']}-{digest}"
    return default_cache_dir(cache_dir) / "shapes" / name


def ensure_synthetic(options: dict[str, Any], cache_dir: str | None = None) -> Path:
    """Generate the synthetic set once (file lock + atomic rename, safe for concurrent DDP ranks)."""
    from filelock import FileLock

    from t2i_train.data.shards import write_synthetic_shards

    final = synthetic_dir(options, cache_dir)
    if (final / "dataset.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "dataset.json").is_file():
            return final
        if final.exists():  # an incomplete leftover of a killed run
            shutil.rmtree(final)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        params = synthetic_params(options)
        start = time.perf_counter()
        log.info("generating %d synthetic shapes (%d px) into %s", params["count"], params["size"], final)
        try:
            write_synthetic_shards(tmp, **params, progress=False)
            os.rename(tmp, final)
        except OSError:
            if not (final / "dataset.json").is_file():  # not a concurrent writer on another node
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        log.info("synthetic shapes ready in %.1f s", time.perf_counter() - start)
    return final


# ---------------------------------------------------------------------------------------------- epochs
class SharedEpoch:
    """An epoch number shared with DataLoader worker processes (a ``multiprocessing.Value``).

    -1 means "never set": each new iteration of the dataset in a process then counts as the next epoch.
    """

    def __init__(self, epoch: int = -1) -> None:
        self._value = multiprocessing.Value("i", epoch, lock=False)  # no SemLock: works with fork and spawn

    def set(self, epoch: int) -> None:
        self._value.value = epoch

    def get(self) -> int:
        return int(self._value.value)

    def __getstate__(self) -> dict[str, Any]:
        try:  # shared memory travels only to processes being spawned; elsewhere pass a snapshot
            multiprocessing.context.assert_spawning(self)
            return {"value": self._value}
        except RuntimeError:
            return {"snapshot": self.get()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._value = (
            state["value"] if "value" in state else multiprocessing.Value("i", state["snapshot"], lock=False)
        )


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several ints (stable across processes, unlike ``hash`` of strings)."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


@dataclass
class _RunState:
    """Per-process state of one iteration (epoch pass) of the stream; stages read it."""

    epoch: int = 0
    pass_index: int = 0
    rank: int = 0
    worker: int = 0
    num_workers: int = 1
    local_runs: int = 0
    # fault accounting, cumulative per worker; ``pending*`` = found since the last batch
    seen: int = 0
    skipped: int = 0
    pending: int = 0
    bad_shards: set[str] = dataclasses.field(default_factory=set)
    pending_bad: list[str] = dataclasses.field(default_factory=list)


def _state_worker_seed(state: _RunState) -> int:
    return state.rank * 1000 + state.worker


class _EpochResampledShards(wds.ResampledShards):
    """``wds.ResampledShards`` (deterministic, per rank and worker) whose epoch follows the shared epoch."""

    def __init__(self, urls: list[str], seed: int, state: _RunState) -> None:
        super().__init__(urls, seed=seed, deterministic=True, worker_seed=partial(_state_worker_seed, state))
        self.state = state

    def __iter__(self) -> Iterator[dict[str, str]]:
        self.epoch = self.state.epoch - 1  # the parent increments before use
        return super().__iter__()


class _ShuffleShards(wds.PipelineStage):
    """Shuffle the shard list identically on every rank (seed, epoch, pass) before splitting it."""

    def __init__(self, seed: int, state: _RunState) -> None:
        self.seed, self.state = seed, state

    def run(self, src: Any) -> Iterator[dict[str, str]]:
        shards = list(src)
        random.Random(mix_seed(self.seed, self.state.epoch, self.state.pass_index)).shuffle(shards)
        yield from shards


class _SplitByNode(wds.PipelineStage):
    """Split shards by the rank captured in the main process.

    ``wds.split_by_node`` asks torch.distributed, which is not initialised inside spawned DataLoader
    workers; the rank known when the loader was built is the reliable one. Without one, it is used.
    """

    def __init__(self, rank: int | None, world_size: int | None) -> None:
        self.rank, self.world_size = rank, world_size

    def run(self, src: Any) -> Iterator[Any]:
        if self.rank is None or self.world_size is None:
            return wds.split_by_node(src)
        return islice(src, self.rank, None, self.world_size)


@dataclass
class _ShardTally:
    """What reading one shard gave: samples read (decoded or skipped), usable ones, the first skip reason."""

    read: int = 0
    good: int = 0
    first_reason: str = ""


class _ReadSamples(wds.PipelineStage):
    """Read tar shards into decoded samples; skip and count unusable samples, report damaged shards."""

    def __init__(
        self, decode: SampleDecoder, state: _RunState, seed: int, max_skip_rate: float, max_bad_shards: int
    ) -> None:
        self.decode, self.state, self.seed = decode, state, seed
        self.max_skip_rate, self.max_bad_shards = max_skip_rate, max_bad_shards

    def run(self, src: Any) -> Iterator[dict[str, Any]]:
        st = self.state
        rng = random.Random(mix_seed(self.seed, st.epoch, st.pass_index, st.rank, st.worker, 1))
        for shard in src:
            yield from self._shard(shard["url"], rng)

    def _shard(self, url: str, rng: random.Random) -> Iterator[dict[str, Any]]:
        tally = _ShardTally()
        damage = ""
        raws = _raw_samples(url)
        while True:
            try:
                raw = next(raws)
            except StopIteration:
                break
            except Exception as exc:  # unreadable or truncated tar: only reading errors end up here
                damage = _read_failure(exc, tally.read)
                break
            tally.read += 1
            self.state.seen += 1
            sample = self._decode(url, raw, rng, tally)
            if sample is not None:
                yield sample
        self._end_shard(url, tally, damage)

    def _decode(
        self, url: str, raw: dict[str, Any], rng: random.Random, tally: _ShardTally
    ) -> dict[str, Any] | None:
        try:
            sample = self.decode(raw, rng)
        except SkipSample as exc:
            key = str(raw.get("__key__"))
            tally.first_reason = tally.first_reason or f"{key}: {exc}"
            self._skip(url, key, str(exc))
            sample = None
        else:
            tally.good += 1
        self._check_rate(url)
        return sample

    def _end_shard(self, url: str, tally: _ShardTally, damage: str) -> None:
        """Count the samples a short shard lost (when its stats file says how many it held) and report it."""
        expected = expected_samples(url)
        lost = max(0, expected - tally.read) if expected is not None else 0
        self.state.seen += lost
        self.state.skipped += lost
        self.state.pending += lost
        why = damage or _unusable(tally)
        if not why and lost:
            why = f"it holds {tally.read} of the {expected} samples its stats file lists"
        if why:
            lost_text = f"; {lost} sample{'s' if lost > 1 else ''} lost" if lost else ""
            if expected is None and damage:
                lost_text = "; samples lost: unknown (no <shard>_stats.json beside it)"
            self._bad_shard(url, why + lost_text)
        if lost:
            self._check_rate(url)

    def _skip(self, url: str, key: str, reason: str) -> None:
        st = self.state
        st.skipped += 1
        st.pending += 1
        if st.skipped <= WARN_FIRST_SKIPS:
            log.warning("skipping sample %s in %s: %s", key, url, reason)
            if st.skipped == WARN_FIRST_SKIPS:
                log.warning(
                    "(further skipped samples are counted in the batches' 'skipped' field, not logged)"
                )

    def _check_rate(self, url: str) -> None:
        st = self.state
        if st.seen >= MIN_SAMPLES_FOR_RATE and st.skipped > self.max_skip_rate * st.seen:
            raise DataError(
                f"{st.skipped} of {st.seen} samples read by data worker {st.worker} (rank {st.rank}, now in "
                f"{url}) were unreadable or lost, more than data.max_skip_rate={self.max_skip_rate}; "
                "raise data.max_skip_rate or fix the shards"
            )

    def _bad_shard(self, url: str, why: str) -> None:
        """Count a damaged shard once per worker; stop the run beyond ``max_bad_shards``, else warn."""
        st = self.state
        if url in st.bad_shards:  # read again (a later epoch, or resampled): its lost samples still count
            return
        st.bad_shards.add(url)
        st.pending_bad.append(url)
        where = f"data worker {st.worker} (rank {st.rank})"
        if 0 <= self.max_bad_shards < len(st.bad_shards):
            raise DataError(
                f"damaged shard {url}: {why}; {len(st.bad_shards)} damaged shard(s) in {where}, more than "
                f"data.max_bad_shards={self.max_bad_shards}; set data.max_bad_shards=N (or -1 for no limit) "
                "to skip damaged shards, or fix the shard"
            )
        log.warning(
            "skipping damaged shard %s: %s (%d damaged so far in %s, data.max_bad_shards=%d)",
            url, why, len(st.bad_shards), where, self.max_bad_shards,
        )  # fmt: skip


def _read_failure(exc: Exception, read: int) -> str:
    reason = f"{type(exc).__name__}: {exc}"
    if read == 0:
        return f"it is not a readable tar file ({reason})"
    return f"it is truncated or unreadable after {read} samples ({reason})"


def _unusable(tally: _ShardTally) -> str:
    if tally.good:
        return ""
    if tally.read:
        return (
            f"it yielded no usable samples: {tally.read} of {tally.read} samples in it were unreadable "
            f"(e.g. {tally.first_reason})"
        )
    return "it yielded no usable samples: it holds no samples"


def stats_path(url: str) -> Path | None:
    """``<shard>_stats.json`` beside a local ``<shard>.tar`` (img2dataset's name); None for other URLs."""
    if not is_local(url) or not url.endswith(".tar"):
        return None
    path = local_path(url)
    return path.with_name(path.name[: -len(".tar")] + "_stats.json")


def expected_samples(url: str) -> int | None:
    """How many samples the shard should hold: ``successes`` of its stats file (img2dataset's format, also
    written by :class:`t2i_train.data.shards.ShardWriter`); None when unknown (no stats file, a remote shard,
    or an unreadable stats file, which is logged)."""
    path = stats_path(url)
    if path is None or not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    value = stats.get("successes") if isinstance(stats, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    log.warning("ignoring %s: no non-negative integer 'successes' field", path)
    return None


def _raw_samples(url: str) -> Iterator[dict[str, Any]]:
    stream = wds.gopen(url)
    try:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        yield from wds.tariterators.group_by_keys(files)
    finally:
        stream.close()


class _Shuffle(wds.PipelineStage):
    def __init__(self, bufsize: int, seed: int, state: _RunState) -> None:
        self.bufsize, self.seed, self.state = bufsize, seed, state

    def run(self, src: Any) -> Iterator[Any]:
        if self.bufsize <= 1:
            return iter(src)
        st = self.state
        rng = random.Random(mix_seed(self.seed, st.epoch, st.pass_index, st.rank, st.worker, 2))
        return wds.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=rng)(src)


class _Batch(wds.PipelineStage):
    def __init__(self, batch_size: int, state: _RunState, collate: Collate | None = None) -> None:
        self.batch_size, self.state = batch_size, state
        self.collate = collate if collate is not None else DefaultCollate()

    def run(self, src: Any) -> Iterator[dict[str, Any]]:
        """Batches of ``batch_size`` (the last one may be smaller).

        A full batch is held until the next sample arrives (or the source ends), so skips and damaged
        shards counted after the last sample of the pass are reported in its last batch, not dropped.
        """
        batch: list[dict[str, Any]] = []
        full: list[dict[str, Any]] | None = None
        for sample in src:
            if full is not None:
                yield self._collate(full)
                full = None
            batch.append(sample)
            if len(batch) == self.batch_size:
                full, batch = batch, []
        if full is not None:
            yield self._collate(full)
        if batch:
            yield self._collate(batch)

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """``data.collate`` of the samples, plus the fault counts found since the previous batch."""
        batch = self.collate(samples)
        if not isinstance(batch, dict):
            raise ConfigError(
                f"data.collate returned a {type(batch).__name__}; a collate must return a dict (the batch)"
            )
        st = self.state
        skipped, st.pending = st.pending, 0
        bad_shards, st.pending_bad = st.pending_bad, []
        batch["skipped"] = torch.tensor(skipped, dtype=torch.long)
        batch["bad_shards"] = bad_shards
        return batch


class SampleDecoder:
    """Raw tar sample -> {image, caption, meta, key, caption_source, fields}; SkipSample when unusable.

    ``fields`` names pre-encoded arrays stored as ``<field>.npy`` by ``python -m t2i_train.encode``
    (e.g. ``image_tokens``); with ``load_images=False`` the image is not decoded at all (a stage-2 run on
    pre-encoded shards then spends no data-loading time on pixels). ``max_image_pixels``: images that would
    decode to more pixels are skipped before decoding (None: no limit; see :func:`decode_image`).
    """

    def __init__(
        self,
        image_size: int,
        resize: str = "center_crop",
        random_flip: bool = False,
        caption_keys: Sequence[str] = ("txt",),
        caption_probs: Sequence[float] | None = None,
        fields: Sequence[str] = (),
        load_images: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if resize not in RESIZE_MODES:
            raise ConfigError(f"data.resize must be one of {list(RESIZE_MODES)}, got {resize!r}")
        if not load_images and not fields:
            raise ConfigError("data.load_images=false needs pre-encoded data.fields (e.g. [image_tokens])")
        if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or max_image_pixels < 1):
            raise ConfigError(
                f"data.max_image_pixels must be >= 1 or null (no limit), got {max_image_pixels}"
            )
        self.image_size, self.resize, self.random_flip = image_size, resize, random_flip
        self.max_image_pixels = max_image_pixels
        self.pick_caption = CaptionPicker(caption_keys, caption_probs)
        self.fields, self.load_images = list(fields), load_images

    def __call__(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        meta = parse_meta(raw)
        caption, source = self.pick_caption(raw, meta, rng)
        sample: dict[str, Any] = {
            "caption": caption,
            "meta": meta,
            "key": raw["__key__"],
            "caption_source": source,
        }
        if self.load_images:
            image_key = first_image_key(raw)
            sample["image"] = decode_image(
                raw[image_key], self.image_size, self.resize, self.random_flip, rng, self.max_image_pixels
            )
        if self.fields:
            sample["fields"] = {field: read_array(raw, field) for field in self.fields}
        return sample


class ShardStream(wds.DataPipeline):
    """An IterableDataset of batches over WebDataset shards (see the module docstring).

    ``rank``/``world_size`` split the shards across processes; ``batches_per_worker`` fixes the epoch
    length (the shards are re-read as needed), otherwise an epoch is one pass (infinite when resampled).
    ``max_skip_rate`` and ``max_bad_shards`` (-1: no limit) apply per worker process. ``collate`` turns a list of
    decoded samples into a batch (default :class:`~t2i_train.data.collate.DefaultCollate`).
    """

    def __init__(
        self,
        urls: list[str],
        decoder: SampleDecoder,
        *,
        batch_size: int,
        shuffle_buffer: int = 1000,
        shuffle: bool = True,
        resampled: bool = False,
        seed: int = 0,
        max_skip_rate: float = 0.05,
        max_bad_shards: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        batches_per_worker: int | None = None,
        epoch: SharedEpoch | None = None,
        collate: Collate | None = None,
    ) -> None:
        self.state = _RunState(rank=rank or 0)
        self.epoch = epoch or SharedEpoch()
        self.batches_per_worker = batches_per_worker
        self.num_workers = 1
        if resampled:
            source: list[Any] = [_EpochResampledShards(urls, seed, self.state)]
        else:
            shard_list = wds.SimpleShardList(urls)
            order = [_ShuffleShards(seed, self.state)] if shuffle else []
            source = [shard_list, *order, _SplitByNode(rank, world_size), wds.split_by_worker]
        super().__init__(
            *source,
            _ReadSamples(decoder, self.state, seed, max_skip_rate, max_bad_shards),
            _Shuffle(shuffle_buffer if shuffle else 0, seed, self.state),
            _Batch(batch_size, self.state, collate),
        )
        if batches_per_worker is not None:
            self.with_epoch(nbatches=batches_per_worker)

    def set_epoch(self, epoch: int) -> None:
        """Seed the next iteration's shuffles with ``epoch`` (visible to running worker processes)."""
        self.epoch.set(epoch)

    def iterator1(self) -> Iterator[Any]:
        st = self.state
        shared = self.epoch.get()
        epoch = shared if shared >= 0 else st.local_runs
        st.pass_index = st.pass_index + 1 if (epoch == st.epoch and st.local_runs > 0) else 0
        st.epoch = epoch
        st.local_runs += 1
        info = torch.utils.data.get_worker_info()
        st.worker, st.num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return super().iterator1()

    def __len__(self) -> int:
        """Batches per epoch of this process (all its workers), when the epoch length is fixed."""
        if self.batches_per_worker is None:
            raise TypeError("this stream has no fixed length (set data.samples_per_epoch for one)")
        return self.batches_per_worker * max(1, self.num_workers)


def _identity(batch: Any) -> Any:
    return batch


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGTERM.

    SLURM preemption and ``scancel`` signal the whole process group; a worker that died first would crash
    the main process ("DataLoader worker ... killed by signal: Terminated") before it saves. The main process
    owns shutdown: it stops its workers when it exits (:func:`_stop_workers_at_exit`), and a worker whose
    main process died exits on its own (torch's watchdog checks the parent every 5 s).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_LIVE_ITERATORS: weakref.WeakSet[_MultiProcessingDataLoaderIter] = weakref.WeakSet()
_EXIT_HOOK: list[bool] = []


def _track_workers(iterator: Any) -> None:
    """Remember a worker-backed iterator so that its workers are stopped at interpreter exit.

    Needed because the workers ignore SIGTERM: at exit, torch skips its own worker shutdown and
    multiprocessing ends daemonic children with SIGTERM and then joins them, which would wait forever. The
    hook is registered after torch's and multiprocessing's, so it runs before both (atexit is LIFO).
    """
    if not isinstance(iterator, _MultiProcessingDataLoaderIter):
        return
    _LIVE_ITERATORS.add(iterator)
    if not _EXIT_HOOK:
        atexit.register(_stop_workers_at_exit)
        _EXIT_HOOK.append(True)


def _stop_workers_at_exit() -> None:
    for iterator in list(_LIVE_ITERATORS):
        try:
            iterator._shutdown_workers()  # asks each worker to finish, joins it (5 s at most)
        finally:
            for worker in iterator._workers:
                if worker.is_alive():  # stuck: SIGKILL, as SIGTERM is ignored
                    os.kill(worker.pid, signal.SIGKILL)


class ShardLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` (already batched); forwards ``set_epoch`` to the stream.

    Lightning calls ``sampler.set_epoch(epoch)`` at every epoch start; an IterableDataset's DataLoader has
    no sampler of its own to receive it, so the call is hooked onto the placeholder sampler. Worker
    processes ignore SIGTERM (see :func:`ignore_sigterm`) unless another ``worker_init_fn`` is given.
    """

    def __init__(self, dataset: ShardStream, follow_epoch: bool = True, **kwargs: Any) -> None:
        kwargs.pop("batch_size", None)
        kwargs.setdefault("collate_fn", _identity)  # batches are built in the stream; skip default_convert
        kwargs.setdefault("worker_init_fn", ignore_sigterm)
        super().__init__(dataset, batch_size=None, **kwargs)
        self._skip_next = 0
        #: (batches of the current epoch the training loop has run, whether that epoch ended) as restored from
        #: a checkpoint; set by the data module
        self.resume_position: Callable[[], tuple[int, bool]] | None = None
        if follow_epoch:
            self.sampler.set_epoch = dataset.set_epoch  # type: ignore[attr-defined]

    # Lightning treats a loader with state_dict/load_state_dict as stateful: the state goes into every
    # checkpoint, and on resume load_state_dict is called right before the loader's first iteration.
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.dataset.epoch.get()}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume mid-epoch: the same epoch, minus the batches the checkpointed run already trained on.

        The order of an epoch is a function of (seed, epoch, rank, worker), so replaying it and dropping the
        batches already used puts the stream exactly where it was (they are read again but never reach the
        model). The count comes from the restored training loop (``batches_done``), not from this loader,
        which has always read ahead of the loop.
        """
        done, epoch_finished = self.resume_position() if self.resume_position is not None else (0, False)
        epoch = int(state.get("epoch", -1))
        if epoch_finished:
            # saved on the last batch of an epoch: Lightning closes that epoch without fetching, and the stream
            # made now must be the next epoch's, from its start
            epoch, done = epoch + 1, 0
        if epoch >= 0:
            self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        self._skip_next = done

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        iterator = super().__iter__()
        _track_workers(iterator)
        skip, self._skip_next = self._skip_next, 0
        if skip:
            log.info("resuming mid-epoch: fast-forwarding the data stream past %d batches", skip)
            for _ in islice(iterator, skip):
                pass
        return iterator


# -------------------------------------------------------------------------------------------- the module
class ShardDataModule(L.LightningDataModule):
    """WebDataset shards -> batches ``{image [-1,1], caption, meta, key, skipped, bad_shards, caption_source}``.

    With ``train_urls=None`` and ``synthetic={...}`` the shapes set is generated once into the cache
    (``cache_dir``, ``$T2I_CACHE`` or ``~/.cache/t2i_train``) and used for training, with its small
    validation split for validation. ``max_skip_rate``, ``max_bad_shards`` (-1: no limit) and
    ``max_image_pixels`` (None: no limit) are described in the module docstring. ``collate`` (``data.collate``):
    how decoded samples become a batch, a callable or a ``_target_`` mapping (see :mod:`t2i_train.data.collate`);
    None is :class:`~t2i_train.data.collate.DefaultCollate`.
    """

    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 1,
        image_size: int = 32,
        resize: str = "center_crop",
        random_flip: bool = False,
        caption_keys: list[str] | tuple[str, ...] = ("txt",),
        caption_probs: list[float] | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        max_skip_rate: float = 0.05,
        allow_pipe: bool = False,
        synthetic: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        fields: list[str] | tuple[str, ...] = (),
        load_images: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_bad_shards: int = 0,
        collate: Any = None,
    ) -> None:
        super().__init__()
        if train_urls is None and synthetic is None:
            raise ConfigError("set data.train_urls (WebDataset shards) or data.synthetic (the shapes set)")
        if batch_size < 1 or num_workers < 0 or image_size < 1:
            raise ConfigError("data.batch_size and data.image_size must be >= 1 and data.num_workers >= 0")
        if not 0.0 <= max_skip_rate <= 1.0:
            raise ConfigError(f"data.max_skip_rate must be in [0, 1], got {max_skip_rate}")
        if isinstance(max_bad_shards, bool) or not isinstance(max_bad_shards, int) or max_bad_shards < -1:
            raise ConfigError(
                f"data.max_bad_shards must be an integer >= 0, or -1 for no limit; got {max_bad_shards}"
            )
        self.save_hyperparameters(logger=False)
        self.train_urls, self.val_urls = train_urls, val_urls
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.resampled, self.samples_per_epoch = resampled, samples_per_epoch
        self.seed, self.max_skip_rate, self.allow_pipe = seed, max_skip_rate, allow_pipe
        self.max_bad_shards = max_bad_shards
        self.collate = build_collate(collate)
        self.decoder = SampleDecoder(
            image_size,
            resize,
            random_flip,
            list(caption_keys),
            caption_probs,
            list(fields),
            load_images,
            max_image_pixels,
        )
        self.val_decoder = SampleDecoder(
            image_size,
            "center_crop" if resize == "random_crop" else resize,
            False,
            list(caption_keys),
            caption_probs,
            list(fields),
            load_images,
            max_image_pixels,
        )
        self.synthetic = dict(synthetic) if synthetic is not None and train_urls is None else None
        if synthetic is not None and train_urls is not None:
            log.info("data.train_urls is set: ignoring data.synthetic")
        self.cache_dir = cache_dir
        self._synthetic_dir = synthetic_dir(self.synthetic, cache_dir) if self.synthetic is not None else None
        self.train_shards: list[str] = []
        self.val_shards: list[str] = []
        self._epoch = SharedEpoch()

    # ------------------------------------------------------------------------------------------- setup
    @property
    def dataset_dir(self) -> Path | None:
        """Folder holding dataset.json / prompts_seen.txt / prompts_heldout.txt when there is one.

        For the synthetic set this is its cache folder (created by ``prepare_data``/``setup``); for user
        shards the folder of the first local training shard; None for remote shards.
        """
        if self._synthetic_dir is not None:
            return self._synthetic_dir
        shards = self.train_shards or self._try_resolve(self.train_urls)
        if shards and is_local(shards[0]):
            return local_path(shards[0]).parent
        return None

    def _try_resolve(self, urls: Any) -> list[str]:
        try:
            return resolve_urls(urls, self.allow_pipe) if urls is not None else []
        except T2IError:
            return []

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            ensure_synthetic(self.synthetic, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Resolve and check the shard URLs (generating the synthetic set first if needed)."""
        if self._synthetic_dir is not None:
            root = ensure_synthetic(self.synthetic or {}, self.cache_dir)
            self.train_shards = resolve_urls(str(root))
            val_dir = root / "val"
            if self.val_urls is None and val_dir.is_dir():
                self.val_shards = resolve_urls(str(val_dir))
        else:
            self.train_shards = resolve_urls(self.train_urls, self.allow_pipe)  # type: ignore[arg-type]
        if self.val_urls is not None:
            self.val_shards = resolve_urls(self.val_urls, self.allow_pipe)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the training shuffles (Lightning does this through the loader)."""
        self._epoch.set(epoch)

    # ------------------------------------------------------------------------------------------ loaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, stream: ShardStream, num_workers: int, follow_epoch: bool = True) -> ShardLoader:
        stream.num_workers = num_workers
        return ShardLoader(
            stream,
            follow_epoch=follow_epoch,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def check_world_size(self, world_size: int) -> None:
        """Resolve the training shards and raise DataError when they cannot be split over ``world_size``
        processes (not resampled and fewer shards than processes); call it before spawning them."""
        if not self.train_shards:
            self.setup("fit")
        if not self.resampled and len(self.train_shards) < world_size:
            raise DataError(
                f"{len(self.train_shards)} training shards cannot be split over {world_size} processes; "
                "write more shards or set data.resampled=true"
            )

    def train_dataloader(self) -> ShardLoader:
        if not self.train_shards:
            self.setup("fit")
        rank, world = self._rank_world()
        workers = self.num_workers
        self.check_world_size(world)
        if not self.resampled:
            if world > 1 and self.samples_per_epoch is None:
                log.warning(
                    "ranks may get different numbers of batches per epoch; set data.samples_per_epoch "
                    "(or data.resampled=true) to keep distributed training in step"
                )
            workers = min(workers, max(1, len(self.train_shards) // world))
        per_worker = None
        if self.samples_per_epoch is not None:
            per_worker = math.ceil(self.samples_per_epoch / (world * max(1, workers) * self.batch_size))
        stream = ShardStream(
            self.train_shards,
            self.decoder,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            shuffle=True,
            resampled=self.resampled,
            seed=self.seed,
            max_skip_rate=self.max_skip_rate,
            max_bad_shards=self.max_bad_shards,
            rank=rank,
            world_size=world,
            batches_per_worker=per_worker,
            epoch=self._epoch,
            collate=self.collate,
        )
        loader = self._loader(stream, workers)
        loader.resume_position = self._resume_position
        return loader

    def _resume_position(self) -> tuple[int, bool]:
        """Batches of the current epoch whose training step ran, and whether the epoch had ended, as restored
        from a checkpoint.

        ``processed`` rather than ``completed``: a checkpoint written in ``on_train_batch_end`` (the usual
        case) is taken before Lightning marks that batch completed, and Lightning corrects its own counter
        only after the loader has been restored.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, False
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return int(progress.current.processed), bool(progress.is_last_batch)

    def val_dataloader(self) -> ShardLoader | list[Any]:
        if not self.train_shards:
            self.setup("validate")
        if not self.val_shards:
            return []
        rank, world = self._rank_world()
        if len(self.val_shards) < world:
            rank, world = 0, 1  # too few shards to split: every rank validates on all of them
        stream = ShardStream(
            self.val_shards,
            self.val_decoder,
            batch_size=self.val_batch_size,
            shuffle=False,
            seed=self.seed,
            max_skip_rate=self.max_skip_rate,
            max_bad_shards=self.max_bad_shards,
            rank=rank,
            world_size=world,
            epoch=SharedEpoch(0),
            collate=self.collate,
        )
        return self._loader(stream, min(self.num_workers, max(1, len(self.val_shards) // world)), False)

    # ------------------------------------------------------------------------------------------ prompts
    def sample_prompts(self, limit: int = 16) -> list[str]:
        """Prompts for sample grids: seen and held-out canonical prompts interleaved when the dataset
        folder has prompt files, otherwise the first captions of a local shard."""
        folder = self.dataset_dir
        if folder is not None:
            seen = _read_lines(folder / "prompts_seen.txt")
            held = _read_lines(folder / "prompts_heldout.txt")
            mixed = [p for pair in zip(seen, held) for p in pair]
            mixed += seen[len(mixed) // 2 :] if len(seen) > len(held) else held[len(mixed) // 2 :]
            if mixed:
                return mixed[:limit]
        shards = self.val_shards or self.train_shards or self._try_resolve(self.train_urls)
        local = [s for s in shards if is_local(s)]
        return _captions_from_shard(local_path(local[0]), limit) if local else []


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _captions_from_shard(path: Path, limit: int) -> list[str]:
    captions: list[str] = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".txt") and len(captions) < limit:
                    f = tar.extractfile(member)
                    text = f.read().decode("utf-8", "replace").strip() if f else ""
                    if text:
                        captions.append(text)
                if len(captions) >= limit:
                    break
    except (OSError, tarfile.TarError) as exc:
        print(f"warning: cannot read prompts from {path}: {exc}", file=sys.stderr)
    return captions
