"""Text -> image retrieval from an external image bank: the FAISS index builder and the search API.

Any family that can ``embed_images_for_retrieval`` and ``embed_prompts_for_retrieval`` (one L2-normalised
space; ``t2i_train.models.capabilities.RetrievalEmbedder``) embeds a bank of shards into an index folder::

    python -m t2i_train.index checkpoint=runs/clip/checkpoints/last.ckpt urls=bank/ output=bank_index

and a family's ``retrieve(prompts, k, index)`` (GILL, CM3leon, CLIP) delegates to :func:`retrieve`::

    hits = model.retrieve(["a red circle"], k=4, index="bank_index")   # [[RetrievalHit(key, shard, ...)]]
    index = RetrievalIndex.load("bank_index")                         # or search embeddings directly
    hits = index.search(model.embed_images_for_retrieval(images), k=1)

The folder (see docs/retrieval.md): ``parts/<shard>.npy`` (float32 [N, D]) + ``.keys.json`` + ``.skipped.json``
per input shard, written atomically so a killed build restarts where it stopped (each rank of a torchrun/srun
launch takes every WORLD_SIZE-th shard); then rank 0 merges them into ``index.faiss`` (inner product),
``keys.jsonl`` (row -> key, shard) and ``index.json`` (written last: its presence means the index is complete).
The index is an external resource: it never goes inside a training checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from t2i_train.devices import pick_device
from t2i_train.errors import ConfigError, DataError
from t2i_train.models.capabilities import require

log = logging.getLogger("t2i_train.index")
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines list every CPU build it tries

FORMAT_VERSION = 1
INDEX_FILE, KEYS_FILE, META_FILE = "index.faiss", "keys.jsonl", "index.json"
PARTS_DIR, BUILD_FILE = "parts", "build.json"
EMBED = "embed_images_for_retrieval"
BUILD_HINT = "python -m t2i_train.index checkpoint=CKPT urls=SHARDS output=DIR"
#: factory=auto: exact search (IndexFlatIP) below this many vectors, an IVF index above
FLAT_LIMIT = 100_000
#: at most this many vectors train a factory index (k-means / PQ codebooks), spread over every part
TRAIN_SAMPLE = 500_000
#: an IVF index searches this many of its lists per query (at most all of them); index.json records it
DEFAULT_NPROBE = 32
#: below this cosine between the querying model's and the builder's probe embeddings, ``retrieve`` warns
PROBE_MIN_COSINE = 0.99
FINGERPRINT_BYTES = 1 << 20


@dataclass(frozen=True)
class RetrievalHit:
    """One retrieved image: sample ``key`` of ``shard``, cosine ``score`` with the query, ``row`` in the index."""

    key: str
    shard: str
    score: float
    row: int


# ------------------------------------------------------------------------------------------------ build
def build_index(
    checkpoint: str,
    urls: str | Sequence[str],
    output_dir: str | os.PathLike[str],
    image_size: int | None = None,
    resize: str = "center_crop",
    batch_size: int = 256,
    device: str = "auto",
    factory: str = "auto",
    use_ema: bool = True,
    merge_wait_s: float = 600.0,
) -> dict[str, Any]:
    """Embed every image of ``urls`` with the family of ``checkpoint`` and index them in ``output_dir``.

    Restartable (finished parts are kept), split over the ranks of a torchrun/srun launch (RANK/WORLD_SIZE);
    rank 0 then waits for the other ranks' parts (a DataError after ``merge_wait_s`` seconds without a new
    one) and merges. ``factory``: ``auto`` (Flat below FLAT_LIMIT vectors, else IVF sized to N) or a FAISS
    factory string such as ``IVF1024,PQ32``. Returns a summary (``merged`` False on the other ranks).
    """
    from t2i_train.data.datamodule import is_local, local_path, resolve_urls
    from t2i_train.data.shard_map import rank_and_world

    start = time.perf_counter()
    _check_resize(resize)
    # local shards by absolute path: keys.jsonl says where each image is, read from any working directory
    found = resolve_urls(urls)
    shards = _unique_names([str(local_path(u).resolve()) if is_local(u) else u for u in found])
    rank, world = rank_and_world()
    model, size, settings = _load_embedder(checkpoint, image_size, resize, use_ema, pick_device(device))
    probe = _embed(model, probe_images(size))
    _check_factory(factory, probe.shape[1])
    parts = Path(output_dir) / PARTS_DIR
    _claim_parts(parts, settings, rank)
    embedded = _embed_parts(model, shards[rank::world], parts, size, resize, batch_size)
    summary = {"output_dir": str(output_dir), **settings, "rank": rank, "world_size": world, **embedded}
    if rank == 0:
        _wait_for_parts(parts, shards, merge_wait_s)
        meta = _merge(Path(output_dir), shards, factory, {**settings, "probe": probe.tolist()})
        summary.update({k: meta[k] for k in ("dim", "count", "factory", "skipped")})
    return {**summary, "merged": rank == 0, "seconds": round(time.perf_counter() - start, 2)}


def _check_resize(resize: str) -> None:
    from t2i_train.data.transforms import RESIZE_MODES

    if resize not in RESIZE_MODES or resize == "random_crop":
        raise ConfigError(f"resize must be center_crop or resize (deterministic), got {resize!r}")


def _unique_names(shards: list[str]) -> list[str]:
    names = [Path(s).name for s in shards]
    if len(set(names)) != len(names):
        raise DataError("input shards share file names; index each folder into its own output")
    return shards


def _load_embedder(
    checkpoint: str, image_size: int | None, resize: str, use_ema: bool, device: torch.device
) -> tuple[Any, int, dict[str, Any]]:
    """The checkpoint's family (it must embed images for retrieval), the image size and the build settings
    that the parts of an output folder must share."""
    from t2i_train.checkpoint import load_family, read_checkpoint
    from t2i_train.data.encode import trained_image_size

    ckpt = read_checkpoint(checkpoint)
    model = load_family(checkpoint, use_ema=use_ema, ckpt=ckpt)
    require(model, EMBED, f"index checkpoint={checkpoint}")
    size = image_size or trained_image_size(ckpt) or getattr(model, "image_size", None)
    if size is None:
        raise ConfigError(f"{checkpoint} does not record its data.image_size; pass image_size=N")
    settings = {
        "checkpoint": str(Path(checkpoint).expanduser().resolve()),
        "checkpoint_fingerprint": checkpoint_fingerprint(checkpoint),
        "family": model.family_name,
        "image_size": int(size),
        "resize": resize,
        "use_ema": bool(use_ema),
    }
    return model.to(device).eval(), int(size), settings


def checkpoint_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 over the size, first and last MiB of each file of a checkpoint (a .ckpt or a folder): cheap on
    multi-GB files, and it changes when the checkpoint is retrained or overwritten (a copy keeps it)."""
    root = Path(path).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root) if root.is_dir() else ''}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(FINGERPRINT_BYTES))
            handle.seek(max(size - FINGERPRINT_BYTES, 0))
            digest.update(handle.read(FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


def probe_images(size: int) -> torch.Tensor:
    """Two fixed images [2, 3, S, S] in [-1, 1] (a colour ramp, a checkerboard). Their embeddings, recorded in
    index.json, identify the image space an index was built in (see ``RetrievalIndex.check_space``)."""
    ramp = torch.linspace(-1.0, 1.0, size)
    across, down = ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size)
    cell = torch.arange(size) // max(size // 4, 1)
    board = ((cell.view(-1, 1) + cell.view(1, -1)) % 2).float() * 2 - 1
    return torch.stack([torch.stack([across, down, -across]), board.expand(3, size, size)])


@torch.no_grad()
def _embed(model: Any, images: torch.Tensor) -> np.ndarray:
    """Images -> float32 [B, D] L2-normalised (renormalised here, so inner product is cosine whatever the
    family returns)."""
    vectors = model.embed_images_for_retrieval(images.to(_device_of(model)))
    return F.normalize(vectors.detach().float(), dim=-1).cpu().numpy()


def _device_of(model: Any) -> torch.device:
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _check_factory(factory: str, dim: int) -> None:
    """Fail before embedding anything when FAISS cannot build ``factory`` for ``dim``-dim vectors."""
    if factory != "auto":
        _new_index(factory, dim)


def _claim_parts(parts: Path, settings: dict[str, Any], rank: int) -> None:
    """Record how the parts are made; refuse to add to parts that another checkpoint or setting made."""
    parts.mkdir(parents=True, exist_ok=True)
    record = parts / BUILD_FILE
    same = ("checkpoint_fingerprint", "image_size", "resize", "use_ema")
    if record.is_file():
        before = json.loads(record.read_text())
        changed = [k for k in same if before.get(k) != settings[k]]
        if changed:
            raise ConfigError(
                f"{parts.parent} holds parts made with other {', '.join(changed)} (checkpoint "
                f"{before.get('checkpoint')}); choose a new output=DIR or delete {parts}"
            )
        return
    _atomic_text(record, json.dumps(settings, indent=2), rank)


def _embed_parts(
    model: Any, shards: list[str], parts: Path, size: int, resize: str, batch_size: int
) -> dict[str, Any]:
    """Embed this rank's shards whose part is not finished yet; the counts (and images/s) of this run."""
    from tqdm import tqdm

    todo = [s for s in shards if not _part_done(parts, s)]
    log.info(
        "%d of this rank's %d parts already done, %d to embed",
        len(shards) - len(todo),
        len(shards),
        len(todo),
    )
    images = skipped = 0
    start = time.perf_counter()
    for shard in tqdm(todo, desc="parts", unit="shard", dynamic_ncols=True, disable=not todo):
        kept, dropped = _embed_shard(model, shard, parts, size, resize, batch_size)
        images, skipped = images + kept, skipped + dropped
    seconds = time.perf_counter() - start
    return {
        "parts_written": len(todo),
        "parts_already_done": len(shards) - len(todo),
        "images_embedded": images,
        "images_skipped": skipped,
        "images_per_s": round(images / seconds, 1) if images else 0.0,
    }


def _part(parts: Path, shard: str, suffix: str) -> Path:
    return parts / f"{Path(shard).name}{suffix}"


def _part_done(parts: Path, shard: str) -> bool:
    """The ``.npy`` is written last, so its presence means the part is complete."""
    return _part(parts, shard, ".npy").is_file()


def _embed_shard(
    model: Any, shard: str, parts: Path, size: int, resize: str, batch_size: int
) -> tuple[int, int]:
    from t2i_train.data.shard_map import _read_checked
    from t2i_train.data.transforms import decode_for_rewrite

    vectors, keys, skipped = [], [], []
    for batch in _batches(_read_checked(shard), batch_size):
        images, slots, results = decode_for_rewrite(batch, size, resize)
        skipped += [
            {"key": r["__key__"], "reason": why} for r, why in zip(batch, results) if isinstance(why, str)
        ]
        if images is not None:
            vectors.append(_embed(model, images))
            keys += [{"key": batch[slot]["__key__"], "shard": shard} for slot in slots]
    if skipped:
        log.warning(
            "shard %s: skipped %d undecodable samples (first %s: %s)",
            shard,
            len(skipped),
            skipped[0]["key"],
            skipped[0]["reason"],
        )
    if not keys:
        raise DataError(
            f"shard {shard} yielded no decodable image ({len(skipped)} skipped); fix or remove it from urls"
        )
    _atomic_text(_part(parts, shard, ".skipped.json"), json.dumps(skipped))
    _atomic_text(_part(parts, shard, ".keys.json"), json.dumps(keys))
    _atomic(_part(parts, shard, ".npy"), lambda tmp: _save_npy(tmp, np.concatenate(vectors)))
    return len(keys), len(skipped)


def _batches(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _wait_for_parts(
    parts: Path, shards: list[str], wait_s: float, done: Callable[[Path, str], bool] | None = None
) -> None:
    """Wait until every rank's parts exist (``done(parts, shard)``, default: this index's ``.npy`` part);
    ``wait_s`` seconds without a new one is a DataError."""
    done = done or _part_done
    missing = [s for s in shards if not done(parts, s)]
    if missing:
        log.info("waiting for the other ranks' %d parts", len(missing))
    since, before = time.monotonic(), len(missing)
    while missing:
        if time.monotonic() - since > wait_s:
            raise DataError(
                f"{len(missing)} parts are still missing (first: {Path(missing[0]).name}) after {wait_s:g}s "
                "without a new one: did a rank stop? Rerun the same command (finished parts are kept)"
            )
        time.sleep(min(2.0, max(wait_s / 10, 0.01)))
        missing = [s for s in missing if not done(parts, s)]
        if len(missing) < before:
            since, before = time.monotonic(), len(missing)


# ------------------------------------------------------------------------------------------------ merge
def resolve_factory(factory: str, count: int) -> str:
    """``auto``: ``Flat`` (exact) below FLAT_LIMIT vectors, else ``IVF<n>,Flat`` with n the power of two
    nearest 4·sqrt(N); any other value is a FAISS factory string, kept as given."""
    if factory != "auto":
        return factory
    if count < FLAT_LIMIT:
        return "Flat"
    return f"IVF{2 ** round(math.log2(4 * math.sqrt(count)))},Flat"


def _new_index(spec: str, dim: int) -> Any:
    import faiss

    if spec == "Flat":
        return faiss.IndexFlatIP(dim)
    try:
        return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError(
            f"FAISS cannot build factory={spec!r} for {dim}-dim vectors ({_first_line(exc)}); "
            "use auto, Flat, IVF1024,Flat, IVF1024,PQ32 (D divisible by 32) or HNSW32"
        ) from exc


def _merge(out: Path, shards: list[str], factory: str, meta: dict[str, Any]) -> dict[str, Any]:
    """All parts, in shard order, into index.faiss + keys.jsonl, then index.json (each written atomically)."""
    import faiss

    parts = out / PARTS_DIR
    vectors = [np.load(_part(parts, s, ".npy"), mmap_mode="r") for s in shards]
    count, dim = sum(len(v) for v in vectors), int(vectors[0].shape[1])
    spec = resolve_factory(factory, count)
    index = _new_index(spec, dim)
    if not index.is_trained:
        _train(index, vectors, spec, count)
    for block in vectors:
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    nprobe = _set_nprobe(index)
    keys = [line for s in shards for line in json.loads(_part(parts, s, ".keys.json").read_text())]
    skipped = sum(len(json.loads(_part(parts, s, ".skipped.json").read_text())) for s in shards)
    _atomic_text(out / KEYS_FILE, "".join(json.dumps(k) + "\n" for k in keys))
    _atomic(out / INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp)))
    meta = {
        "format": FORMAT_VERSION,
        "dim": dim,
        "count": count,
        "factory": spec,
        "requested_factory": factory,
        "nprobe": nprobe,
        "shards": len(shards),
        "skipped": skipped,
        **meta,
    }
    _atomic_text(out / META_FILE, json.dumps(meta, indent=1))
    log.info("index %s: %d vectors of dimension %d (%s), %d samples skipped", out, count, dim, spec, skipped)
    return meta


def _train(index: Any, vectors: list[np.ndarray], spec: str, count: int) -> None:
    """Train on at most TRAIN_SAMPLE vectors: every step-th row of every part (deterministic, all shards)."""
    step = max(1, math.ceil(count / TRAIN_SAMPLE))
    sample = np.ascontiguousarray(np.concatenate([v[::step] for v in vectors]), dtype=np.float32)
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise ConfigError(
            f"factory={spec!r} cannot be trained on {len(sample)} vectors ({_first_line(exc)}); "
            "use fewer IVF lists (about 4*sqrt(N)) or factory=Flat"
        ) from exc


def _set_nprobe(index: Any) -> int | None:
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    ivf.nprobe = min(int(ivf.nlist), DEFAULT_NPROBE)
    return int(ivf.nprobe)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# ----------------------------------------------------------------------------------------- atomic files
def _atomic(path: Path, write: Callable[[Path], Any], tag: int | str | None = None) -> None:
    """``write(tmp)`` then rename onto ``path``: a killed run never leaves a half-written file under ``path``.
    The tmp name holds the process id, so ranks writing the same file never share one."""
    tmp = path.with_name(f"{path.name}.{tag if tag is not None else os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_text(path: Path, text: str, tag: int | str | None = None) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text), tag)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as handle:  # a file object: np.save would append .npy to the tmp name
        np.save(handle, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)


# ----------------------------------------------------------------------------------------------- search
class RetrievalIndex:
    """A finished index folder: the FAISS index (``faiss_index``), row -> (key, shard), and ``meta``
    (index.json). Load with :meth:`load`; search with :meth:`search`."""

    def __init__(
        self, path: Path, faiss_index: Any, keys: list[dict[str, str]], meta: dict[str, Any]
    ) -> None:
        self.path, self.faiss_index, self.keys, self.meta = path, faiss_index, keys, meta
        self._checked: weakref.WeakKeyDictionary[Any, float | None] = weakref.WeakKeyDictionary()

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def count(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RetrievalIndex:
        """The index in folder ``path`` (cached: a rebuilt folder is read again). One-line ConfigError when
        it is missing, unfinished or unreadable."""
        folder = Path(path).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(f"retrieval index {path} does not exist; build it with {BUILD_HINT}")
        missing = [name for name in (META_FILE, INDEX_FILE, KEYS_FILE) if not (folder / name).is_file()]
        if missing:
            raise ConfigError(
                f"{path} holds no finished retrieval index (no {', '.join(missing)}); build it (a stopped "
                f"build: rerun the same command) with {BUILD_HINT}"
            )
        return _load_cached(str(folder), (folder / META_FILE).stat().st_mtime_ns)

    def search(self, query_embeddings: torch.Tensor, k: int = 1) -> list[list[RetrievalHit]]:
        """The ``k`` most similar images (best first) for each query embedding of [B, D]; fewer when the
        index holds fewer."""
        if k < 1:
            raise ConfigError(f"k must be a positive number of images, got {k}")
        queries = torch.as_tensor(query_embeddings).detach().float()
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ConfigError(
                f"queries of shape {list(queries.shape)} do not fit index {self.path} of {self.dim}-dim "
                f"embeddings (built by {self.meta.get('checkpoint')}, model={self.meta.get('family')}); query "
                f"it with a model of that space or rebuild it with {BUILD_HINT}"
            )
        array = np.ascontiguousarray(F.normalize(queries, dim=-1).cpu().numpy())
        scores, rows = self.faiss_index.search(array, min(k, self.count))
        return [
            [self._hit(int(r), float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)
        ]

    def _hit(self, row: int, score: float) -> RetrievalHit:
        entry = self.keys[row]
        return RetrievalHit(key=entry["key"], shard=entry["shard"], score=score, row=row)

    def check_space(self, model: Any) -> float | None:
        """Cosine between ``model``'s embeddings of the probe images and the builder's (None when the model
        cannot embed images). Below PROBE_MIN_COSINE it warns, once per model: the model embeds images
        differently from the checkpoint that built the index (another checkpoint, or trained since), so
        its queries are not in the index's space. A warning, not an error: a query still returns hits."""
        if model in self._checked:
            return self._checked[model]
        cosine = None
        if callable(getattr(model, EMBED, None)) and self.meta.get("probe"):
            mine = _embed(model, probe_images(int(self.meta["image_size"])))
            cosine = float((mine * np.asarray(self.meta["probe"], dtype=np.float32)).sum(-1).min())
            if cosine < PROBE_MIN_COSINE:
                log.warning(
                    "retrieval index %s was built by %s (model=%s, fingerprint %s); model=%s embeds images "
                    "differently (probe cosine %.3f), so its hits are not from its own space: rebuild with %s",
                    self.path,
                    self.meta.get("checkpoint"),
                    self.meta.get("family"),
                    self.meta.get("checkpoint_fingerprint"),
                    getattr(model, "family_name", type(model).__name__),
                    cosine,
                    BUILD_HINT,
                )
        self._checked[model] = cosine
        return cosine


@functools.lru_cache(maxsize=4)
def _load_cached(folder: str, stamp: int) -> RetrievalIndex:
    """``stamp`` (index.json's mtime) is part of the key, so a rebuilt folder is not served stale."""
    import faiss

    path = Path(folder)
    try:
        meta = json.loads((path / META_FILE).read_text())
        keys = [json.loads(line) for line in (path / KEYS_FILE).read_text().splitlines()]
        index = faiss.read_index(str(path / INDEX_FILE))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"retrieval index {folder} is unreadable ({_first_line(exc)}); rebuild it with {BUILD_HINT}"
        ) from exc
    if meta.get("format") != FORMAT_VERSION or index.ntotal != len(keys) or index.d != meta.get("dim"):
        raise ConfigError(
            f"retrieval index {folder} is inconsistent (format {meta.get('format')}, {index.ntotal} vectors of "
            f"dimension {index.d}, {len(keys)} keys); rebuild it with {BUILD_HINT}"
        )
    return RetrievalIndex(path, index, keys, meta)


def retrieve(
    model: Any,
    prompts: Sequence[str],
    k: int = 1,
    index: str | os.PathLike[str] | RetrievalIndex | None = None,
) -> list[list[RetrievalHit]]:
    """A family's ``retrieve``: its ``embed_prompts_for_retrieval`` of ``prompts`` searched in ``index`` (a
    folder from ``python -m t2i_train.index`` or a loaded RetrievalIndex); ``k`` hits per prompt, best first.
    Warns when the index was built in another image space than ``model``'s (``RetrievalIndex.check_space``)."""
    if index is None:
        raise ConfigError(f"retrieve needs an index: build one with {BUILD_HINT} and pass index=DIR")
    require(model, EMBED, "retrieve")
    loaded = index if isinstance(index, RetrievalIndex) else RetrievalIndex.load(index)
    loaded.check_space(model)
    with torch.no_grad():
        queries = model.embed_prompts_for_retrieval(list(prompts))
    return loaded.search(queries, k)
