"""Shard-to-shard transforms: read every sample of each input shard, add fields, write a new shard.

Used by ``python -m t2i_train.encode`` (pre-encoded ``image_tokens`` / ``latents`` / ...) and meant for
recaptioning too. The contract a cluster job needs:

- one output shard per input shard, with the input's name and every original member of each kept sample
  (keys unchanged); inputs are never modified;
- atomic: an output shard is written to ``<name>.tmp`` and renamed when complete, so a killed run leaves no
  half-written shard, and a re-run skips the shards already finished (restartable);
- distributed: with ``rank``/``world_size`` (default: the ``RANK``/``WORLD_SIZE`` environment of
  torchrun/srun) each process takes every ``world_size``-th shard;
- a sample the transform cannot use is dropped and counted (the first few logged); a shard with no usable
  sample stops the run with a :class:`DataError` rather than being skipped silently.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t2i_train.data.shards import _TarStream
from t2i_train.errors import DataError

log = logging.getLogger(__name__)

RawSample = dict[str, Any]
# A batch of raw samples -> for each sample either the new members {extension: bytes} or a str: why it
# was dropped.
BatchTransform = Callable[[list[RawSample]], list["dict[str, bytes] | str"]]
SIDECAR_SUFFIXES = (".json", ".txt", ".parquet")
WARN_FIRST_DROPS = 5


@dataclass
class MapSummary:
    """What :func:`map_shards` did."""

    written: list[Path] = field(default_factory=list)
    skipped_existing: list[Path] = field(default_factory=list)
    samples: int = 0
    dropped: int = 0

    def describe(self) -> str:
        done = f"{len(self.skipped_existing)} already done, " if self.skipped_existing else ""
        dropped = f"; dropped {self.dropped} unusable samples" if self.dropped else ""
        return f"wrote {len(self.written)} shards ({done}{self.samples} samples){dropped}"


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torchrun's / SLURM's environment, else a single process."""
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, {world_size})")
    return rank, world_size


def output_path(shard: str, output_dir: Path) -> Path:
    return output_dir / Path(shard).name


def read_raw_samples(url: str) -> Iterator[RawSample]:
    """Raw samples (extension -> bytes, plus ``__key__``) of one tar shard, in file order."""
    from t2i_train.data.datamodule import _raw_samples

    yield from _raw_samples(url)


def map_shards(
    shards: Sequence[str],
    output_dir: str | os.PathLike[str],
    transform: BatchTransform,
    *,
    batch_size: int = 64,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> MapSummary:
    """Apply ``transform`` to every sample of ``shards`` (this process's share), writing ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world_size = rank_and_world(rank, world_size)
    for shard in shards:
        if output_path(shard, out).resolve() == Path(shard).resolve():
            raise DataError(f"output_dir {out} is the input shards' folder; choose another folder")
    names = [Path(s).name for s in shards]
    if len(set(names)) != len(names):
        raise DataError("input shards share file names; map each folder into its own output_dir")
    mine = list(shards)[rank::world_size]
    summary = MapSummary()
    bar = _progress(len(mine), progress and rank == 0)
    for shard in mine:
        target = output_path(shard, out)
        if target.exists():
            summary.skipped_existing.append(target)
        else:
            kept, dropped = _map_one(shard, target, transform, batch_size, summary.dropped)
            summary.written.append(target)
            summary.samples += kept
            summary.dropped += dropped
        bar.update(1)
    bar.close()
    return summary


def _map_one(
    shard: str, target: Path, transform: BatchTransform, batch_size: int, dropped_before: int
) -> tuple[int, int]:
    tmp = target.with_name(target.name + ".tmp")
    tar = _TarStream(tmp)
    kept = dropped = 0
    closed = False
    try:
        batch: list[RawSample] = []
        for raw in _read_checked(shard):
            batch.append(raw)
            if len(batch) == batch_size:
                k, d = _write_batch(tar, batch, transform, shard, dropped_before + dropped)
                kept, dropped, batch = kept + k, dropped + d, []
        if batch:
            k, d = _write_batch(tar, batch, transform, shard, dropped_before + dropped)
            kept, dropped = kept + k, dropped + d
        tar.close()
        closed = True
        if kept == 0:
            raise DataError(
                f"shard {shard} yielded no usable samples ({dropped} dropped); fix or remove it from the inputs"
            )
        os.replace(tmp, target)
    except BaseException:
        if not closed:
            tar.close()
        tmp.unlink(missing_ok=True)
        raise
    return kept, dropped


def _read_checked(shard: str) -> Iterator[RawSample]:
    samples = read_raw_samples(shard)
    count = 0
    while True:
        try:
            raw = next(samples)
        except StopIteration:
            return
        except Exception as exc:  # unreadable or truncated tar
            if count == 0:
                raise DataError(
                    f"shard {shard} is not a readable tar file ({type(exc).__name__}: {exc})"
                ) from exc
            raise DataError(
                f"shard {shard} ends early after {count} samples ({type(exc).__name__}: {exc}); "
                "fix or remove it from the inputs"
            ) from exc
        count += 1
        yield raw


def _write_batch(
    tar: _TarStream, batch: list[RawSample], transform: BatchTransform, shard: str, dropped_before: int
) -> tuple[int, int]:
    results = transform(batch)
    if len(results) != len(batch):
        raise RuntimeError(f"shard transform returned {len(results)} results for {len(batch)} samples")
    kept = dropped = 0
    for raw, added in zip(batch, results):
        key = raw["__key__"]
        if isinstance(added, str):
            dropped += 1
            if dropped_before + dropped <= WARN_FIRST_DROPS:
                log.warning("dropping sample %s of %s: %s", key, shard, added)
            continue
        clash = set(added) & {k for k in raw if not k.startswith("__")}
        members = {k: v for k, v in raw.items() if not k.startswith("__") and k not in clash}
        for ext, data in {**members, **added}.items():
            tar.add(f"{key}.{ext}", data if isinstance(data, bytes) else str(data).encode("utf-8"))
        kept += 1
    return kept, dropped


def copy_sidecars(shards: Sequence[str], output_dir: str | os.PathLike[str]) -> list[Path]:
    """Copy the small files next to the input shards (dataset.json, prompts_*.txt, img2dataset's parquet
    and stats) into ``output_dir`` unless already there, so the output folder is a complete dataset."""
    out = Path(output_dir)
    copied = []
    for folder in sorted({Path(s).parent for s in shards if Path(s).exists()}):
        for path in sorted(folder.iterdir()):
            target = out / path.name
            if path.is_file() and path.suffix in SIDECAR_SUFFIXES and not target.exists():
                shutil.copy2(path, target)
                copied.append(target)
    return copied


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="shards", unit="shard", disable=not enabled, dynamic_ncols=True)
