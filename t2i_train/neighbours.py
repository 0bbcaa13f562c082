"""Retrieved neighbours for retrieval-augmented training (RA-CM3 / CM3leon), built once, outside the loop.

::

    python -m t2i_train.retrieve checkpoint=runs/clip/checkpoints/last.ckpt urls=tokens/ output=tokens_ra k=2

1. **Embed** (split over the ranks of a torchrun/srun launch, restartable: one finished part per shard): every
   document of ``urls`` (the memory bank; image + caption, and the ``image_tokens`` that ``encode`` wrote) by the
   frozen CLIP (any ``RetrievalEmbedder``): its vector is the mean of the L2-normalised image and text
   embeddings, renormalised. The *query* vector of a document drops ``query_drop`` (20%) of its caption's words
   first (RA-CM3), seeded by its key.
2. **Search** (every rank, after all parts exist): a FAISS inner-product index over the bank; for each document
   the best ``k`` candidates that are not the document itself and whose relevance is at most
   ``max_relevance`` (0.9: near duplicates are skipped). Documents holding both an image and a caption are
   preferred; when fewer than ``k`` pass, the best remaining candidates fill in (counted as ``relaxed``).
3. **Write** new shards into ``output`` (inputs are never modified; atomic and restartable like ``encode``): each
   sample keeps every member and gains ``ra_image_tokens.npy`` ([k, N] image codes of its neighbours) and, in
   its JSON, ``neighbours: {keys, captions, scores}``. A training run then reads them as any pre-encoded field
   (``data.fields=[image_tokens,ra_image_tokens]``), with no lookup at training time. ``bank/`` keeps the index
   and the documents, for retrieval at inference (:func:`load_bank`); ``neighbours.json`` (written last) records
   the settings.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from t2i_train.devices import pick_device
from t2i_train.errors import ConfigError, DataError

log = logging.getLogger("t2i_train.retrieve")

META_FILE, PARTS_DIR, BANK_DIR = "neighbours.json", "parts", "bank"
TOKENS_FIELD = "image_tokens"
RA_FIELD = "ra_image_tokens"
#: candidates searched per document before the filters (more when they remove too many)
SEARCH_DEPTH = 64


@dataclass(frozen=True)
class Bank:
    """The memory bank: document vectors [N, D] (L2-normalised), their image codes [N, T], captions and
    (shard name, key) per row."""

    vectors: np.ndarray
    tokens: np.ndarray
    captions: list[str]
    keys: list[tuple[str, str]]
    has_text: np.ndarray

    def row_of(self) -> dict[tuple[str, str], int]:
        return {key: row for row, key in enumerate(self.keys)}


def drop_words(caption: str, fraction: float, seed: str) -> str:
    """``caption`` without ``fraction`` of its words (at least one kept), chosen by ``seed``."""
    words = caption.split()
    drop = min(round(fraction * len(words)), max(0, len(words) - 1))
    if drop == 0:
        return caption
    gone = set(random.Random(seed).sample(range(len(words)), drop))
    return " ".join(w for i, w in enumerate(words) if i not in gone)


def document_vectors(model: Any, images: torch.Tensor, captions: Sequence[str]) -> np.ndarray:
    """Mean of the L2-normalised image and text embeddings, renormalised: [B, D] float32."""
    with torch.no_grad():
        image = F.normalize(model.embed_images_for_retrieval(images).float(), dim=-1)
        text = F.normalize(model.embed_prompts_for_retrieval(list(captions)).float(), dim=-1)
    return F.normalize(image + text, dim=-1).cpu().numpy().astype(np.float32)


def pick_neighbours(
    scores: np.ndarray, rows: np.ndarray, self_row: int, k: int, max_relevance: float, has_text: np.ndarray
) -> tuple[list[int], list[float], bool]:
    """The ``k`` neighbours of one document from its search results (best first): never itself, relevance at
    most ``max_relevance``, documents with a caption first; (rows, scores, relaxed: the filters let fewer
    than k through and the best remaining candidates filled in)."""
    candidates = [(float(s), int(r)) for s, r in zip(scores, rows) if r >= 0 and r != self_row]
    allowed = [c for c in candidates if c[0] <= max_relevance]
    allowed.sort(key=lambda c: (not bool(has_text[c[1]]), -c[0]))
    chosen = allowed[:k]
    relaxed = len(chosen) < k
    if relaxed:
        taken = {r for _, r in chosen}
        chosen += [c for c in candidates if c[1] not in taken][: k - len(chosen)]
    return [r for _, r in chosen], [s for s, _ in chosen], relaxed


def write_neighbours(
    checkpoint: str,
    urls: str | Sequence[str],
    output: str | os.PathLike[str],
    k: int = 2,
    max_relevance: float = 0.9,
    query_drop: float = 0.2,
    caption_key: str = "txt",
    batch_size: int = 256,
    device: str = "auto",
    merge_wait_s: float = 600.0,
) -> dict[str, Any]:
    """Embed ``urls``, find every document's ``k`` neighbours, write the augmented shards into ``output``."""
    from t2i_train.data.datamodule import local_path, resolve_urls
    from t2i_train.data.shard_map import copy_sidecars, map_shards, rank_and_world
    from t2i_train.retrieval import _load_embedder, _wait_for_parts

    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if not 0.0 <= query_drop < 1.0:
        raise ConfigError(f"query_drop must be in [0, 1), got {query_drop}")
    start = time.perf_counter()
    shards = [str(local_path(u).resolve()) for u in resolve_urls(urls)]
    rank, world = rank_and_world()
    out = Path(output)
    parts = out / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    model, size, settings = _load_embedder(checkpoint, None, "center_crop", True, pick_device(device))
    for shard in shards[rank::world]:
        if not _part_file(parts, shard).is_file():
            _embed_shard(model, shard, parts, size, caption_key, query_drop, batch_size)
    _wait_for_parts(
        parts, shards, merge_wait_s, done=lambda folder, shard: _part_file(folder, shard).is_file()
    )
    bank, queries = _load_parts(parts, shards)
    neighbours, relaxed = _search(bank, queries, k, max_relevance)
    summary = map_shards(shards, out, _augment(bank, neighbours), batch_size=batch_size, progress=rank == 0)
    result = {
        **settings,
        "k": k,
        "max_relevance": max_relevance,
        "query_drop": query_drop,
        "caption_key": caption_key,
        "documents": len(bank.keys),
        "relaxed": relaxed,
        "shards_written": len(summary.written),
        "shards_existing": len(summary.skipped_existing),
    }
    if rank == 0:
        copy_sidecars(shards, out)
        _save_bank(out / BANK_DIR, bank)
        (out / META_FILE).write_text(json.dumps(result, indent=2))
    log.info(
        "neighbours: %d documents, k=%d, %d relaxed; %d shards written into %s",
        len(bank.keys),
        k,
        relaxed,
        len(summary.written),
        out,
    )
    return {**result, "seconds": round(time.perf_counter() - start, 2)}


def _part_file(parts: Path, shard: str) -> Path:
    return parts / f"{Path(shard).name}.npz"


def _embed_shard(
    model: Any, shard: str, parts: Path, size: int, caption_key: str, query_drop: float, batch_size: int
) -> None:
    from t2i_train.data.shard_map import _read_checked
    from t2i_train.data.transforms import decode_image, first_image_key, read_array, to_batch

    name = Path(shard).name
    docs, queries, tokens, captions, keys, has_text = [], [], [], [], [], []
    batch: list[tuple[np.ndarray, str, str, np.ndarray]] = []

    def flush() -> None:
        images = to_batch([b[0] for b in batch]).to(_device(model))
        docs.append(document_vectors(model, images, [b[1] for b in batch]))
        dropped = [drop_words(b[1], query_drop, f"{name}/{b[2]}") for b in batch]
        queries.append(document_vectors(model, images, dropped))
        batch.clear()

    for raw in _read_checked(shard):
        key = raw["__key__"]
        try:
            codes = read_array(raw, TOKENS_FIELD)
        except Exception as exc:  # SkipSample: the shards were not pre-encoded
            raise DataError(
                f"sample {key} of {shard} has no {TOKENS_FIELD}.npy: retrieve reads pre-encoded shards; run "
                "python -m t2i_train.encode checkpoint=<vqgan .ckpt> first"
            ) from exc
        caption = raw.get(caption_key, b"")
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        image = decode_image(raw[first_image_key(raw)], size, "center_crop", False, random.Random(0), None)
        batch.append((image, caption, key, codes))
        tokens.append(np.asarray(codes).reshape(-1))
        captions.append(caption)
        keys.append(key)
        has_text.append(bool(caption.strip()))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not keys:
        raise DataError(f"shard {shard} holds no samples; remove it from urls")
    tmp = parts / f"{name}.{os.getpid()}.tmp.npz"
    np.savez(
        tmp,
        docs=np.concatenate(docs),
        queries=np.concatenate(queries),
        tokens=np.stack(tokens),
        captions=np.array(captions, dtype=object).astype(str),
        keys=np.array(keys).astype(str),
        has_text=np.array(has_text),
    )
    os.replace(tmp, _part_file(parts, shard))


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _load_parts(parts: Path, shards: list[str]) -> tuple[Bank, np.ndarray]:
    loaded = [np.load(_part_file(parts, s), allow_pickle=False) for s in shards]
    lengths = {part["tokens"].shape[1] for part in loaded}
    if len(lengths) > 1:
        raise DataError(
            f"the shards' image_tokens have different lengths ({sorted(lengths)}); encode them alike"
        )
    bank = Bank(
        vectors=np.concatenate([p["docs"] for p in loaded]),
        tokens=np.concatenate([p["tokens"] for p in loaded]),
        captions=[str(c) for p in loaded for c in p["captions"]],
        keys=[(Path(s).name, str(key)) for s, p in zip(shards, loaded) for key in p["keys"]],
        has_text=np.concatenate([p["has_text"] for p in loaded]),
    )
    return bank, np.concatenate([p["queries"] for p in loaded])


def _search(
    bank: Bank, queries: np.ndarray, k: int, max_relevance: float
) -> tuple[dict[tuple[str, str], Any], int]:
    import faiss

    index = faiss.IndexFlatIP(bank.vectors.shape[1])
    index.add(np.ascontiguousarray(bank.vectors))
    depth = min(len(bank.keys), max(SEARCH_DEPTH, 4 * k))
    scores, rows = index.search(np.ascontiguousarray(queries), depth)
    found, relaxed = {}, 0
    for row, key in enumerate(bank.keys):
        picked, picked_scores, was_relaxed = pick_neighbours(
            scores[row], rows[row], row, k, max_relevance, bank.has_text
        )
        relaxed += int(was_relaxed)
        found[key] = (picked, picked_scores)
    return found, relaxed


def _augment(bank: Bank, neighbours: dict[tuple[str, str], Any]) -> Any:
    from t2i_train.data.encode import npy_bytes
    from t2i_train.data.transforms import parse_meta

    def transform(batch: list[dict[str, Any]]) -> list[dict[str, bytes] | str]:
        out: list[dict[str, bytes] | str] = []
        for raw in batch:
            key = (Path(str(raw.get("__url__", ""))).name, raw["__key__"])
            if key not in neighbours:
                out.append(
                    f"no neighbours for {key[0]}/{key[1]} (was the shard changed since it was embedded?)"
                )
                continue
            rows, scores = neighbours[key]
            meta = dict(parse_meta(raw))
            meta["neighbours"] = {
                "keys": [list(bank.keys[r]) for r in rows],
                "captions": [bank.captions[r] for r in rows],
                "scores": [round(s, 5) for s in scores],
            }
            out.append({RA_FIELD + ".npy": npy_bytes(bank.tokens[rows]), "json": json.dumps(meta).encode()})
        return out

    return transform


def _save_bank(folder: Path, bank: Bank) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "vectors.npy", bank.vectors)
    np.save(folder / "tokens.npy", bank.tokens)
    (folder / "documents.jsonl").write_text(
        "".join(
            json.dumps({"shard": s, "key": k, "caption": c}) + "\n"
            for (s, k), c in zip(bank.keys, bank.captions)
        )
    )


def load_bank(folder: str | os.PathLike[str]) -> Bank:
    """The memory bank a ``retrieve`` run saved (``<output>/bank``), for retrieval at inference."""
    root = Path(folder)
    root = root / BANK_DIR if (root / BANK_DIR).is_dir() else root
    if not (root / "vectors.npy").is_file():
        raise ConfigError(f"{folder} holds no memory bank; write one with python -m t2i_train.retrieve")
    documents = [json.loads(line) for line in (root / "documents.jsonl").read_text().splitlines()]
    return Bank(
        vectors=np.load(root / "vectors.npy"),
        tokens=np.load(root / "tokens.npy"),
        captions=[d["caption"] for d in documents],
        keys=[(d["shard"], d["key"]) for d in documents],
        has_text=np.array([bool(d["caption"].strip()) for d in documents]),
    )


def prompt_neighbours(
    bank: Bank, prompt_vectors: np.ndarray, k: int, max_relevance: float = 1.0
) -> list[tuple[list[str], np.ndarray]]:
    """Per prompt (its text embedding, L2-normalised), the ``k`` best bank documents: (captions, codes [k, T])."""
    import faiss

    index = faiss.IndexFlatIP(bank.vectors.shape[1])
    index.add(np.ascontiguousarray(bank.vectors))
    scores, rows = index.search(
        np.ascontiguousarray(prompt_vectors.astype(np.float32)), min(len(bank.keys), 4 * k + 8)
    )
    out = []
    for s, r in zip(scores, rows):
        picked, _, _ = pick_neighbours(s, r, -1, k, max_relevance, bank.has_text)
        out.append(([bank.captions[i] for i in picked], bank.tokens[picked]))
    return out
