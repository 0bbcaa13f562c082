"""Write WebDataset shards in img2dataset's layout from a folder, a table or the synthetic generator.

Layout: tar members ``{key}.{png|jpg|webp}``, ``{key}.txt`` and ``{key}.json`` with ``key = %09d``; shards named
``{prefix}-{000000}.tar`` (naming="prefix") or ``00000.tar`` (naming="img2dataset"). Every shard is written to
``*.tmp`` and renamed when complete; if writing fails, every shard of the run is removed, so a failed run
leaves no partial output. Beside each ``<shard>.tar`` goes img2dataset's ``<shard>_stats.json`` with the
number of samples it holds (``count``, ``successes``): the loader counts the samples a truncated shard lost
from it. No torch import here: the CLI starts in well under a second.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from t2i_train.data import synthetic
from t2i_train.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
NAMINGS = ("prefix", "img2dataset")
N_SEEN_PROMPTS = 48
_MTIME = 1_700_000_000  # fixed member mtime: equal inputs give byte-identical shards


@dataclass
class WriteSummary:
    """What a writer produced."""

    out_dir: Path
    shards: list[Path] = field(default_factory=list)
    count: int = 0
    skipped: int = 0
    extra_files: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        extra = f" (+ {', '.join(p.name for p in self.extra_files)})" if self.extra_files else ""
        skipped = f"; skipped {self.skipped} unreadable" if self.skipped else ""
        return f"wrote {self.count} samples in {len(self.shards)} shards to {self.out_dir}{extra}{skipped}"


def stats_name(shard: str) -> str:
    """img2dataset's per-shard stats file name: ``00000.tar`` -> ``00000_stats.json``."""
    return shard[: -len(".tar")] + "_stats.json" if shard.endswith(".tar") else shard + "_stats.json"


def shard_name(index: int, prefix: str = "shard", naming: str = "prefix") -> str:
    """File name of shard ``index``: ``{prefix}-{index:06d}.tar`` or img2dataset's ``{index:05d}.tar``."""
    if naming == "img2dataset":
        return f"{index:05d}.tar"
    return f"{prefix}-{index:06d}.tar"


class ShardWriter:
    """Sequential tar writer with atomic shards; use as a context manager.

    ``write({"png": bytes, "txt": str, "json": dict})`` adds one sample under the next ``%09d`` key. Each
    finished shard gets its ``<shard>_stats.json`` (see :func:`stats_name`). On an exception inside the
    ``with`` block the open ``*.tmp`` and every shard (and stats file) written so far are deleted.
    With ``total`` (the number of samples to come) shard sizes are balanced: they differ by at most one.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        samples_per_shard: int = 1000,
        prefix: str = "shard",
        naming: str = "prefix",
        overwrite: bool = False,
        total: int | None = None,
    ) -> None:
        if naming not in NAMINGS:
            raise ConfigError(f"naming must be one of {NAMINGS}, got {naming!r}")
        if samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.samples_per_shard = samples_per_shard
        self.prefix, self.naming = prefix, naming
        self.shards: list[Path] = []
        self.count = 0
        self._tar: _TarStream | None = None
        self._tmp: Path | None = None
        self._in_shard = 0
        self._sizes = _balanced_sizes(total, samples_per_shard) if total else None
        _prepare_out_dir(self.out_dir, overwrite)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, sample: dict[str, Any]) -> str:
        """Append one sample (extension -> bytes | str | dict); returns its key."""
        if self._tar is None:
            self._open()
        key = f"{self.count:09d}"
        for ext, value in sample.items():
            self._add(f"{key}.{ext}", _to_bytes(value))
        self.count += 1
        self._in_shard += 1
        if self._in_shard >= self._shard_size(len(self.shards)):
            self._finish_shard()
        return key

    def _shard_size(self, index: int) -> int:
        if self._sizes is not None and index < len(self._sizes):
            return self._sizes[index]
        return self.samples_per_shard

    def close(self) -> None:
        if self._tar is not None:
            self._finish_shard()

    def abort(self) -> None:
        """Delete the open temporary file and every shard this writer finished."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        stats = [path.with_name(stats_name(path.name)) for path in self.shards]
        for path in [self._tmp, *self.shards, *stats]:
            if path is not None and path.exists():
                path.unlink()
        self._tmp, self.shards, self.count = None, [], 0

    def _open(self) -> None:
        final = self.out_dir / shard_name(len(self.shards), self.prefix, self.naming)
        self._tmp = final.with_name(final.name + ".tmp")
        self._tar = _TarStream(self._tmp)
        self._in_shard = 0

    def _add(self, name: str, data: bytes) -> None:
        assert self._tar is not None
        self._tar.add(name, data)

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        final = self._tmp.with_name(self._tmp.name[: -len(".tmp")])
        os.replace(self._tmp, final)
        self.shards.append(final)
        self._tar, self._tmp = None, None
        stats = {"count": self._in_shard, "successes": self._in_shard}
        _write_text(final.with_name(stats_name(final.name)), [json.dumps(stats)])


def _balanced_sizes(total: int, per_shard: int) -> list[int]:
    """Split ``total`` into the fewest shards of at most ``per_shard`` whose sizes differ by at most one
    (equal shards give every rank the same number of batches when shards are split across ranks)."""
    count = math.ceil(total / per_shard)
    base, extra = divmod(total, count)
    return [base + (i < extra) for i in range(count)]


class _TarStream:
    """Minimal POSIX ustar writer for regular files.

    ``tarfile.addfile`` spends ~0.1 ms per member building headers, more than rendering a 32 px scene; this
    writes the same format (readable by tarfile, GNU tar and webdataset) several times faster.
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._written = 0

    def add(self, name: str, data: bytes) -> None:
        encoded = name.encode("utf-8")
        if len(encoded) > 100:
            raise DataError(f"tar member name too long for ustar: {name}")
        header = bytearray(512)
        header[0 : len(encoded)] = encoded
        header[100:108] = b"0000644\0"
        header[108:116] = b"0000000\0"
        header[116:124] = b"0000000\0"
        header[124:136] = b"%011o\0" % len(data)
        header[136:148] = b"%011o\0" % _MTIME
        header[148:156] = b"        "
        header[156:157] = b"0"
        header[257:265] = b"ustar\x0000"
        header[265:268] = header[297:300] = b"t2i"
        header[148:156] = b"%06o\0 " % sum(header)
        padding = -len(data) % 512
        self._file.write(bytes(header) + data + bytes(padding))
        self._written += 512 + len(data) + padding

    def close(self) -> None:
        end = 1024 + (-(self._written + 1024) % tarfile.RECORDSIZE)
        self._file.write(bytes(end))
        self._file.close()


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob("*.tar")) + sorted(out_dir.glob("*.tar.tmp"))
    if existing and not overwrite:
        raise DataError(
            f"{out_dir} already holds shards ({existing[0].name}, ...); pass --overwrite to replace them"
        )
    for path in existing:
        path.unlink()
        path.with_name(stats_name(path.name)).unlink(missing_ok=True)


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    elif fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    else:
        image.save(buf, format=PIL_FORMATS[fmt], quality=95)
    return buf.getvalue()


def _progress(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------- synthetic
def write_synthetic_shards(
    out_dir: str | os.PathLike[str],
    *,
    count: int = 20000,
    size: int = 32,
    seed: int = 0,
    holdout: Sequence[str] | None = None,
    holdout_fraction: float = 0.0,
    holdout_seed: int | None = None,
    samples_per_shard: int = 500,
    val_count: int = 0,
    image_format: str = "png",
    prefix: str = "shapes",
    naming: str = "prefix",
    overwrite: bool = False,
    progress: bool = True,
) -> WriteSummary:
    """Render ``count`` training scenes (never a held-out combination) into shards under ``out_dir``.

    Also writes ``dataset.json`` (parameters, counts, held-out combinations), ``prompts_seen.txt`` (canonical
    prompts of up to 48 training combinations, a fixed random subset) and ``prompts_heldout.txt`` (all held-out
    combinations); with ``val_count > 0`` a validation split (same combinations, another seed) goes to
    ``out_dir/val/``.
    """
    if count < 1 or size < 8:
        raise ConfigError(f"synthetic data needs count >= 1 and size >= 8 (got count={count}, size={size})")
    if image_format not in PIL_FORMATS:
        raise ConfigError(f"image_format must be one of {sorted(PIL_FORMATS)}, got {image_format!r}")
    out = Path(out_dir)
    held = synthetic.select_holdout(holdout, holdout_fraction, seed if holdout_seed is None else holdout_seed)
    train_combos = synthetic.training_combinations(held)
    params = {
        "size": size,
        "count": count,
        "seed": seed,
        "holdout_fraction": holdout_fraction,
        "holdout_seed": holdout_seed,
        "samples_per_shard": samples_per_shard,
        "val_count": val_count,
        "image_format": image_format,
        "generator_version": synthetic.GENERATOR_VERSION,
    }
    start = time.perf_counter()
    summary = _write_synthetic_split(
        out,
        train_combos,
        count,
        size,
        seed,
        samples_per_shard,
        image_format,
        prefix,
        naming,
        overwrite,
        progress,
    )
    splits = {"train": {"count": summary.count, "shards": [p.name for p in summary.shards]}}
    if val_count > 0:
        val = _write_synthetic_split(
            out / "val", train_combos, val_count, size, seed + 1_000_003, samples_per_shard, image_format,
            prefix, naming, overwrite, False,
        )  # fmt: skip
        splits["val"] = {"count": val.count, "shards": [f"val/{p.name}" for p in val.shards]}
    seen = sorted(random.Random(seed).sample(train_combos, min(N_SEEN_PROMPTS, len(train_combos))))
    info = {
        "name": "shapes",
        "params": params,
        "splits": splits,
        "heldout": [synthetic.combination_name(*c) for c in held],
        "num_train_combinations": len(train_combos),
        "seconds": round(time.perf_counter() - start, 2),
    }
    extra = [
        _write_text(out / "prompts_seen.txt", [synthetic.canonical_prompt(*c) for c in seen]),
        _write_text(out / "prompts_heldout.txt", [synthetic.canonical_prompt(*c) for c in held]),
        _write_text(out / "dataset.json", [json.dumps(info, indent=2)]),  # last: marks the set complete
    ]
    summary.extra_files = extra
    return summary


def _write_synthetic_split(
    out: Path,
    combos: Sequence[tuple[str, str, str]],
    count: int,
    size: int,
    seed: int,
    samples_per_shard: int,
    image_format: str,
    prefix: str,
    naming: str,
    overwrite: bool,
    progress: bool,
) -> WriteSummary:
    rng = np.random.default_rng(seed)
    text_rng = random.Random(seed)
    picks = rng.integers(0, len(combos), size=count)
    with (
        ShardWriter(
            out,
            samples_per_shard=samples_per_shard,
            prefix=prefix,
            naming=naming,
            overwrite=overwrite,
            total=count,
        ) as writer,
        _progress(count, f"shapes -> {out}", progress) as bar,
    ):
        for pick in picks:
            image, meta = synthetic.make_sample(combos[pick], size, rng, text_rng)
            writer.write(
                {image_format: encode_image(image, image_format), "txt": meta["caption"], "json": meta}
            )
            bar.update(1)
    return WriteSummary(out_dir=out, shards=writer.shards, count=writer.count)


def _write_text(path: Path, lines: Iterable[str]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------- folder and table
@dataclass
class _Item:
    image: Path
    caption: str | None
    extra: dict[str, Any]


def write_folder_shards(
    folder: str | os.PathLike[str], out_dir: str | os.PathLike[str], **options: Any
) -> WriteSummary:
    """Shard every image under ``folder`` (recursively) that has a same-name ``.txt`` caption.

    ``options`` are those of :func:`write_items` (samples_per_shard, image_format, resize, skip_bad, ...).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")

    def items() -> Iterator[_Item]:
        for path in images:
            txt = path.with_suffix(".txt")
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
            yield _Item(path, caption, {"source": str(path.relative_to(root))})

    return write_items(items(), len(images), out_dir, **options)


def read_table(path: Path) -> Any:
    """Read a CSV/TSV or parquet table into a pandas DataFrame."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except Exception as exc:
        raise DataError(f"cannot read table {path}: {type(exc).__name__}: {exc}") from exc
    raise DataError(f"table {path}: unknown format (use .csv, .tsv or .parquet)")


def write_table_shards(
    table: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    image_col: str = "image",
    caption_col: str = "caption",
    **options: Any,
) -> WriteSummary:
    """Shard the rows of a CSV/parquet table of image paths and captions.

    Relative image paths are resolved against the table's folder; the row's other columns go into the
    sample's JSON (like img2dataset's additional columns).
    """
    path = Path(table).expanduser()
    if not path.is_file():
        raise DataError(f"table {path} does not exist")
    frame = read_table(path)
    for col, flag in ((image_col, "--image-col"), (caption_col, "--caption-col")):
        if col not in frame.columns:
            raise DataError(
                f"table {path} has no column {col!r} (columns: {', '.join(map(str, frame.columns))}); set {flag}"
            )
    base = path.parent

    def items() -> Iterator[_Item]:
        for row in frame.to_dict("records"):
            image = Path(str(row[image_col])).expanduser()
            caption = row[caption_col]
            caption = (
                None if caption is None or (isinstance(caption, float) and np.isnan(caption)) else caption
            )
            extra = {k: _jsonable(v) for k, v in row.items() if k not in (image_col, caption_col)}
            extra["source"] = str(row[image_col])
            yield _Item(
                image if image.is_absolute() else base / image, caption and str(caption).strip(), extra
            )

    return write_items(items(), len(frame), out_dir, **options)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)


def write_items(
    items: Iterable[_Item],
    total: int | None,
    out_dir: str | os.PathLike[str],
    *,
    samples_per_shard: int = 1000,
    image_format: str = "keep",
    resize: int | None = None,
    skip_bad: bool = False,
    prefix: str = "shard",
    naming: str = "prefix",
    overwrite: bool = False,
    progress: bool = True,
) -> WriteSummary:
    """Write (image path, caption) items; an unreadable image or missing caption raises DataError.

    ``image_format``: "keep" stores the file's bytes unchanged (unless resized), else "png"/"jpg"/"webp".
    ``resize``: shorter side to this size and centre crop (img2dataset's center_crop), None keeps the size.
    ``skip_bad``: log and skip bad items instead of failing.
    """
    if image_format != "keep" and image_format not in PIL_FORMATS:
        raise ConfigError(f"image format must be keep, jpg, png or webp, got {image_format!r}")
    out = Path(out_dir)
    skipped = 0
    with (
        ShardWriter(
            out, samples_per_shard=samples_per_shard, prefix=prefix, naming=naming, overwrite=overwrite
        ) as writer,
        _progress(total, f"shards -> {out}", progress) as bar,
    ):
        for item in items:
            bar.update(1)
            try:
                sample = _item_sample(item, image_format, resize)
            except DataError as exc:
                if not skip_bad:
                    raise
                skipped += 1
                log.warning("skipping: %s", exc)
                continue
            writer.write(sample)
    if writer.count == 0:
        raise DataError(f"no readable (image, caption) pairs; nothing written to {out}")
    return WriteSummary(out_dir=out, shards=writer.shards, count=writer.count, skipped=skipped)


def _item_sample(item: _Item, image_format: str, resize: int | None) -> dict[str, Any]:
    if not item.caption:
        raise DataError(
            f"no caption for {item.image} (expected a non-empty {item.image.with_suffix('.txt').name})"
        )
    try:
        raw = item.image.read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            source_format = (img.format or "").upper()
            width, height = img.size
            image = img.convert("RGB") if img.mode not in ("RGB", "RGBA", "L") else img.copy()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {item.image}: {type(exc).__name__}: {exc}") from exc
    fmt = image_format
    if fmt == "keep":
        fmt = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(source_format, "png")
    if resize is not None:
        image = center_crop_resize(image, resize)
    if image_format == "keep" and resize is None and source_format in ("JPEG", "PNG", "WEBP"):
        data = raw
    else:
        data = encode_image(image if fmt != "jpg" else image.convert("RGB"), fmt)
    meta = {**item.extra, "caption": item.caption, "width": image.width, "height": image.height}
    meta.update(original_width=width, original_height=height)
    return {fmt: data, "txt": item.caption, "json": meta}


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic), then crop the centre square."""
    w, h = image.size
    scale = size / min(w, h)
    if scale != 1:
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))
