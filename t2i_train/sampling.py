"""Sampling as a library: images and interpolation strips into a folder, their manifest, CLIP scores and the
labelled grids a user opens first.

``python -m t2i_train.sample`` (``t2i_train.cli.sample``) parses arguments and calls these; the recipes
(``t2i_train.recipes``) and the training callback (``t2i_train.callbacks.samples``) use the same functions, so
a sample folder and its ``grid.png`` look the same whoever wrote them.

A sample folder holds ``<n>.png`` (native resolution, one per image), ``grid.png`` (the images upscaled for
viewing with their prompts written beside each row, see ``labelled_grid``) and ``manifest.jsonl``: one line per
image, ``{"prompt": ..., "file": "<n>.png", "seed": ..., "batch_seed": ..., "source": "generated"}``. Batches of
``batch_size`` are drawn with a generator seeded with ``batch_seed = seed + n_first``, so the same call writes the
same files.

``sample_to_dir(..., mode=retrieve|auto, index=DIR)`` takes images from a retrieval index instead (a family that
can ``retrieve``, e.g. GILL): each prompt's top hits, read from the source shards the index names
(``read_shard_images``), as stored; ``auto`` lets the family's ``decide`` pick per prompt (docs/sampling.md).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import json
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from t2i_train.errors import ConfigError, DataError
from t2i_train.models.capabilities import require

if TYPE_CHECKING:
    from PIL import Image

    from t2i_train.retrieval import RetrievalHit

GRID_CELL = 128  # px per image in grid.png: small samples are upscaled (nearest) to about this size
GRID_PADDING = 2
GRID_BACKGROUND = 255
GRID_TEXT = 0
MAX_LABEL_LINES_ABOVE = 3
#: ``mode=``: draw every image, take every image from a retrieval index, or let the family decide per prompt
MODES: tuple[str, ...] = ("generate", "retrieve", "auto")
INDEX_HINT = "build one with python -m t2i_train.index checkpoint=... urls=... output=DIR"
MOVED_HINT = (
    "the retrieval index names the shards and keys it was built from: put the shards back where it found them "
    "or rebuild it (python -m t2i_train.index checkpoint=... urls=... output=DIR)"
)


# ------------------------------------------------------------------------------------------------ prompts
def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """The prompts of ``prompts=[...]`` or ``prompts_file=FILE`` (one a line; blank lines and ``#`` comments
    skipped); exactly one of the two must be given."""
    if bool(prompts) == bool(prompts_file):
        raise ConfigError("give exactly one of prompts='[\"a red circle\", ...]' or prompts_file=FILE")
    if prompts:
        return [str(p) for p in prompts]
    path = Path(str(prompts_file)).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompts_file={prompts_file}: no such file")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ConfigError(f"prompts_file={prompts_file} holds no prompts (one per line)")
    return lines


def training_sampling_kwargs(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The ``sampling.kwargs`` the checkpoint's run used for its sample grids ({} if none)."""
    config = ckpt["t2i_config"]
    return dict((config.get("sampling") or {}).get("kwargs") or {})


def generate_options(model: Any) -> list[str] | None:
    """The keyword arguments ``model.generate`` takes besides ``prompts`` and ``generator`` (the
    ``sampling.<arg>`` a user may set); None when it takes any (``**kwargs``)."""
    params = inspect.signature(model.generate).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [name for name in params if name not in ("prompts", "generator")]


def make_upsampler(options: Mapping[str, Any], device: torch.device) -> Any:
    """The ``upsampler`` config group's choice (``kind`` + its options); a causal LM runs on ``device`` unless
    its options name one."""
    from omegaconf import DictConfig, OmegaConf

    from t2i_train.text.upsampler import build_upsampler

    kwargs = dict(
        OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else options
    )
    kind = str(kwargs.pop("kind", "none"))
    if kind == "causal_lm" and kwargs.get("device") is None:
        kwargs["device"] = str(device)
    return build_upsampler(kind, **kwargs)


def upsample_prompts(options: Mapping[str, Any], prompts: list[str], device: torch.device) -> list[str]:
    """``prompts`` rewritten by the upsampler ``options`` describe. The upsampler is dropped before this
    returns, so a large LM and the image model never share the device."""
    upsampler = make_upsampler(options, device)
    upsampled = upsampler(prompts)
    del upsampler
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(upsampled)


# ------------------------------------------------------------------------------------------------ folders
def write_manifest(manifest: list[dict[str, Any]], output_dir: Path) -> None:
    with open(output_dir / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in manifest)


def sample_to_dir(
    model: Any,
    prompts: list[str],
    output_dir: Path,
    images_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    sampling: dict[str, Any] | None = None,
    grid_columns: int | None = None,
    upsampled: list[str] | None = None,
    grid_cell: int = GRID_CELL,
    mode: str = "generate",
    index: str | None = None,
    retrieve_k: int = 1,
) -> list[dict[str, Any]]:
    """Write ``images_per_prompt`` images per prompt into ``output_dir``; returns the manifest lines.

    ``mode``: ``generate`` draws them; ``retrieve`` takes each prompt's top ``images_per_prompt`` hits of
    ``index`` (distinct images, best first), as stored in their shards; ``auto`` asks ``model.decide`` per
    prompt. Every line says its ``source`` (``generated`` | ``retrieved``); retrieved lines name the hit
    (``retrieved_key``, ``retrieved_shard``, ``score``, ``rank``) and the prompt's top ``retrieve_k`` ``hits``;
    ``auto`` lines hold the ``decision``. Everything is checked, decided and read before the first file is
    written. ``upsampled`` (one per prompt): the texts the images are generated from, retrieved for and
    decided on instead, recorded as ``upsampled_prompt`` beside the original ``prompt``. ``grid.png`` has
    ``grid_columns`` images a row (default: ``images_per_prompt``, one row per prompt, or 8 when each prompt
    has one image), each labelled with the user's prompt and upscaled to about ``grid_cell`` px.
    """
    check_mode(model, mode, index)
    if upsampled is not None and len(upsampled) != len(prompts):
        raise ValueError(f"{len(upsampled)} upsampled prompts for {len(prompts)} prompts")
    texts = prompts if upsampled is None else upsampled
    sources = plan_sources(model, prompts, texts, mode)
    retrieved = retrieve_images(model, texts, sources, index, images_per_prompt, retrieve_k)
    output_dir.mkdir(parents=True, exist_ok=True)
    heads = [
        _line_head(p, t, upsampled is not None, s if mode == "auto" else None)
        for p, t, s in zip(prompts, texts, sources)
    ]
    jobs = [
        (i * images_per_prompt + j, i)
        for i, source in enumerate(sources)
        if source == "generate"
        for j in range(images_per_prompt)
    ]
    written = {
        **_write_retrieved(retrieved, heads, images_per_prompt, retrieve_k, output_dir),
        **_write_generated(model, texts, jobs, heads, seed, batch_size, sampling or {}, output_dir),
    }
    manifest = [written[n][0] for n in range(len(written))]
    images = [written[n][1] for n in range(len(written))]
    columns = grid_columns or (images_per_prompt if images_per_prompt > 1 else min(8, len(images)))
    labels = [p for p in prompts for _ in range(images_per_prompt)]
    grid = labelled_grid(grid_images(images, grid_cell), labels, columns, cell=grid_cell)
    save_grid(grid, output_dir / "grid.png")
    write_manifest(manifest, output_dir)
    return manifest


def _write_retrieved(
    retrieved: dict[int, tuple[list[RetrievalHit], list[Image.Image]]],
    heads: list[dict[str, Any]],
    per_prompt: int,
    retrieve_k: int,
    output_dir: Path,
) -> dict[int, tuple[dict[str, Any], Image.Image]]:
    """Image number -> (manifest line, image) of the retrieved images, saved as stored."""
    written = {}
    for i, (hits, pictures) in retrieved.items():
        for j, picture in enumerate(pictures):
            n = i * per_prompt + j
            picture.save(output_dir / f"{n}.png")
            written[n] = ({**heads[i], "file": f"{n}.png", **_hit_fields(hits, j, retrieve_k)}, picture)
    return written


def _write_generated(
    model: Any,
    texts: list[str],
    jobs: list[tuple[int, int]],
    heads: list[dict[str, Any]],
    seed: int,
    batch_size: int,
    sampling: dict[str, Any],
    output_dir: Path,
) -> dict[int, tuple[dict[str, Any], torch.Tensor]]:
    """Image number -> (manifest line, image) of the generated images (``jobs``: (image number, prompt
    number)); each batch is drawn with a generator seeded with ``seed`` + its first image number."""
    written = {}
    device = next(model.parameters()).device if jobs else None
    for start in tqdm(range(0, len(jobs), batch_size), desc="sampling", unit="batch", disable=not jobs):
        batch = jobs[start : start + batch_size]
        batch_seed = seed + batch[0][0]
        generator = torch.Generator(device=device).manual_seed(batch_seed)
        out = model.generate([texts[i] for _, i in batch], generator=generator, **sampling)
        for (n, i), image in zip(batch, out.float().clamp(0, 1).cpu()):
            save_image(image, output_dir / f"{n}.png")
            line = {**heads[i], "file": f"{n}.png", "seed": seed, "batch_seed": batch_seed}
            written[n] = ({**line, "source": "generated"}, image)
    return written


def _line_head(prompt: str, text: str, upsampled: bool, decision: str | None) -> dict[str, Any]:
    line: dict[str, Any] = {"prompt": prompt}
    if upsampled:
        line["upsampled_prompt"] = text
    if decision is not None:
        line["decision"] = decision
    return line


def _hit_fields(hits: list[RetrievalHit], rank: int, listed: int) -> dict[str, Any]:
    hit = hits[rank]
    top = [{"key": h.key, "shard": h.shard, "score": h.score} for h in hits[:listed]]
    return {
        "source": "retrieved",
        "retrieved_key": hit.key,
        "retrieved_shard": hit.shard,
        "score": hit.score,
        "rank": rank,
        "hits": top,
    }


# ------------------------------------------------------------------------------------------------ modes
def check_mode_options(mode: str, index: str | None) -> None:
    """One line for an unknown ``mode`` or a retrieving mode without ``index`` (no model needed)."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "generate" and not index:
        raise ConfigError(f"mode={mode} needs index=DIR ({INDEX_HINT})")


def check_mode(model: Any, mode: str, index: str | None) -> None:
    """One-line ConfigError when ``model`` cannot sample in ``mode``: ``generate`` needs a model that can
    generate now (``require_generation``), ``retrieve`` one that can ``retrieve``, ``auto`` one that can also
    ``decide`` (whether it can generate is checked once it has decided, see ``plan_sources``)."""
    check_mode_options(mode, index)
    if mode == "generate":
        require_generation(model, "mode=generate")
        return
    require(model, "retrieve", f"mode={mode}")
    if mode == "auto":
        require(model, "decide", "mode=auto")


def require_generation(model: Any, who: str) -> None:
    """``model`` implements ``generate`` and has what it needs now (``Family.available``: a GILL without its
    diffusion generator does not); the ConfigError then says what to set, in the family's own words."""
    require(model, "generate", who)
    if not _available(model, "generate"):
        hint = "; or mode=retrieve index=DIR: it can retrieve" if _can(model, "retrieve") else ""
        raise ConfigError(f"{who}: {unavailable_reason(model)}{hint}")


def _can(model: Any, capability: str) -> bool:
    can = getattr(model, "can", None)
    return bool(can(capability)) if callable(can) else hasattr(model, capability)


def _available(model: Any, capability: str) -> bool:
    available = getattr(model, "available", None)
    return bool(available(capability)) if callable(available) else True


def unavailable_reason(model: Any) -> str:
    """Why ``model`` cannot generate now. A family whose ``available("generate")`` is False raises a
    ConfigError naming the missing part from ``generate`` itself, before any work (GILL:
    ``model.generator_checkpoint``), so its message is asked for rather than guessed here."""
    try:
        model.generate([""])
    except ConfigError as exc:
        return str(exc)
    name = getattr(model, "family_name", type(model).__name__)
    return f"model={name} cannot generate images now (it reports generate as unavailable)"


def plan_sources(model: Any, prompts: list[str], texts: list[str], mode: str) -> list[str]:
    """``generate`` or ``retrieve`` per prompt: ``mode`` itself, or (``auto``) ``model.decide(texts)``. A pick
    of ``generate`` by a model that cannot generate now is one line, before anything is written."""
    if mode != "auto":
        return [mode] * len(prompts)
    picks = [str(pick) for pick in model.decide(list(texts))]
    if len(picks) != len(prompts) or not set(picks) <= {"generate", "retrieve"}:
        raise RuntimeError(f"decide() must return retrieve or generate per prompt, got {picks!r}")
    generate = [p for p, pick in zip(prompts, picks) if pick == "generate"]
    if generate and not _available(model, "generate"):
        raise ConfigError(
            f"mode=auto: the decision head picks generate for {len(generate)} of {len(prompts)} prompts (first: "
            f"{generate[0]!r}), but {unavailable_reason(model)}; or sample with mode=retrieve"
        )
    return picks


def retrieve_images(
    model: Any,
    texts: list[str],
    sources: list[str],
    index: str | None,
    images_per_prompt: int,
    retrieve_k: int,
) -> dict[int, tuple[list[RetrievalHit], list[Image.Image]]]:
    """Prompt number -> (its top ``max(images_per_prompt, retrieve_k)`` hits, the stored images of the first
    ``images_per_prompt``), for the prompts whose source is ``retrieve``; each shard is read once."""
    wanted = [i for i, source in enumerate(sources) if source == "retrieve"]
    if not wanted:
        return {}
    if retrieve_k < 1:
        raise ConfigError(f"retrieve_k must be at least 1, got {retrieve_k}")
    found = model.retrieve([texts[i] for i in wanted], k=max(images_per_prompt, retrieve_k), index=index)
    for i, hits in zip(wanted, found):
        if len(hits) < images_per_prompt:
            raise ConfigError(
                f"index {index} gives {len(hits)} images for {texts[i]!r}, fewer than "
                f"images_per_prompt={images_per_prompt}; ask for fewer or index more images"
            )
    pictures = iter(read_hit_images([hit for hits in found for hit in hits[:images_per_prompt]]))
    return {i: (hits, [next(pictures) for _ in range(images_per_prompt)]) for i, hits in zip(wanted, found)}


# ------------------------------------------------------------------------------------------------ shards
def read_hit_images(hits: Sequence[RetrievalHit]) -> list[Image.Image]:
    """The stored image of every hit, in order (each shard is read once)."""
    keys: dict[str, list[str]] = {}
    for hit in hits:
        keys.setdefault(hit.shard, []).append(hit.key)
    images = {shard: read_shard_images(shard, shard_keys) for shard, shard_keys in keys.items()}
    return [images[hit.shard][hit.key] for hit in hits]


def read_shard_image(shard: str, key: str) -> Image.Image:
    """The image of sample ``key`` in the tar ``shard`` (a path or URL, as a ``RetrievalHit`` names it),
    decoded to RGB as stored (no resize)."""
    return read_shard_images(shard, [key])[key]


def read_shard_images(shard: str, keys: Iterable[str]) -> dict[str, Image.Image]:
    """key -> the image of that sample in ``shard`` (its ``jpg|jpeg|png|webp``, the one the index builder
    embedded), decoded to RGB as stored, in one pass that stops at the last key. DataError when the shard is
    gone or unreadable, a key is not in it or its image does not decode: the index's source shards moved or
    changed since it was built."""
    from t2i_train.data.datamodule import is_local, local_path
    from t2i_train.data.shard_map import _read_checked

    wanted = set(keys)
    if is_local(shard) and not local_path(shard).is_file():
        raise DataError(f"shard {shard} does not exist; {MOVED_HINT}")
    raws: dict[str, dict[str, Any]] = {}
    with contextlib.closing(_read_checked(shard)) as samples:
        for raw in samples:
            if raw["__key__"] in wanted:
                raws[raw["__key__"]] = raw
                if len(raws) == len(wanted):
                    break
    missing = sorted(wanted - raws.keys())
    if missing:
        raise DataError(
            f"shard {shard} holds no sample {missing[0]!r} ({len(missing)} of {len(wanted)} keys missing); "
            f"{MOVED_HINT}"
        )
    return {key: _decode_stored(raw, shard) for key, raw in raws.items()}


def _decode_stored(raw: Mapping[str, Any], shard: str) -> Image.Image:
    from PIL import Image

    from t2i_train.data.transforms import SkipSample, first_image_key

    key, field = raw["__key__"], "image"
    try:
        field = first_image_key(raw)
        with Image.open(io.BytesIO(raw[field])) as image:
            return image.convert("RGB")
    except SkipSample as exc:
        raise DataError(f"shard {shard}, sample {key}: {exc}; {MOVED_HINT}") from exc
    except Exception as exc:
        raise DataError(
            f"shard {shard}, sample {key}: its {field} does not decode ({type(exc).__name__}: {exc})"
        ) from exc


def interpolate_to_dir(
    model: Any,
    prompts: list[str],
    output_dir: Path,
    mode: str,
    steps: int,
    seed: int = 0,
    strips_per_prompt: int = 1,
    grid_cell: int = GRID_CELL,
) -> list[dict[str, Any]]:
    """Interpolation strips (``interpolate=z|text``): ``z`` walks the noise with each prompt fixed
    (``strips_per_prompt`` strips from seeds ``seed, seed+1, ...``); ``text`` walks from each prompt to the next
    with the noise fixed. Writes ``strip_<n>.png`` (one row of ``steps`` images at native resolution),
    ``grid.png`` (one labelled strip per row) and ``manifest.jsonl``; returns its lines."""
    require(model, "interpolate", "interpolate=")
    if mode not in ("z", "text"):
        raise ConfigError(f"interpolate must be z or text, got {mode!r}")
    if steps < 2:
        raise ConfigError(f"steps={steps}: an interpolation strip needs at least 2 images")
    if mode == "text" and len(prompts) < 2:
        raise ConfigError("interpolate=text walks from one prompt to the next: give at least two prompts")
    jobs: list[tuple[str, str | None, int]]
    if mode == "z":
        jobs = [(p, None, seed + k) for p in prompts for k in range(strips_per_prompt)]
    else:
        jobs = [(a, b, seed) for a, b in itertools.pairwise(prompts)]
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest: list[dict[str, Any]] = []
    strips: list[torch.Tensor] = []
    labels: list[str] = []
    for n, (prompt_a, prompt_b, strip_seed) in enumerate(tqdm(jobs, desc="interpolating", unit="strip")):
        strip = model.interpolate(prompt_a, prompt_b, mode=mode, steps=steps, seed=strip_seed).float().cpu()
        save_image(make_grid(strip, nrow=steps, padding=1), output_dir / f"strip_{n}.png")
        line: dict[str, Any] = {
            "prompt": prompt_a,
            "file": f"strip_{n}.png",
            "seed": strip_seed,
            "mode": mode,
            "steps": steps,
        }
        if prompt_b is not None:
            line["prompt_b"] = prompt_b
        manifest.append(line)
        strips.append(strip)
        label = prompt_a if prompt_b is None else f"{prompt_a} -> {prompt_b}"
        labels += [f"{label} (seed {strip_seed})" if mode == "z" else label] * len(strip)
    save_grid(labelled_grid(torch.cat(strips), labels, steps, cell=grid_cell), output_dir / "grid.png")
    write_manifest(manifest, output_dir)
    return manifest


# ------------------------------------------------------------------------------------------------ scores
def add_clip_scores(
    manifest: list[dict[str, Any]], output_dir: Path, scorer: Any, batch_size: int = 64
) -> float:
    """Score every image of a sample folder against its prompt (``clip_score`` in each manifest line);
    returns the mean. Images of different sizes (retrieved ones are stored at their own) are scored in groups
    of one size; the scorer resizes each image to its input on its own, so a score does not depend on them."""
    from torchvision.io import ImageReadMode, read_image

    from t2i_train.metrics.clip_score import clip_score

    for start in range(0, len(manifest), batch_size):
        lines = manifest[start : start + batch_size]
        images = [
            read_image(str(output_dir / line["file"]), ImageReadMode.RGB).float() / 255 for line in lines
        ]
        sizes: dict[tuple[int, ...], list[int]] = {}
        for k, image in enumerate(images):
            sizes.setdefault(tuple(image.shape), []).append(k)
        for group in sizes.values():
            prompts = [lines[k]["prompt"] for k in group]
            scores = clip_score(torch.stack([images[k] for k in group]), prompts, scorer)
            for k, score in zip(group, scores.tolist()):
                lines[k]["clip_score"] = round(score, 4)
    write_manifest(manifest, output_dir)
    return sum(line["clip_score"] for line in manifest) / max(1, len(manifest))


def own_clip_scorer(model: Any) -> Any | None:
    """The CLIP a family exposes for scoring (``model.clip_scorer()``, e.g. GALIP's frozen CLIP), or None."""
    can = getattr(model, "can", None)
    return model.clip_scorer() if callable(can) and can("clip_scorer") else None


def pick_scorer(spec: str | None, model: Any, device: torch.device) -> Any:
    """The CLIP that scores samples: ``clip_scorer=SPEC`` (see ``load_scorer``), else the family's own
    (``model.clip_scorer()``)."""
    from t2i_train.metrics.clip_score import load_scorer

    if spec:
        return load_scorer(spec, device)
    own = own_clip_scorer(model)
    if own is not None:
        return own
    raise ConfigError(
        "clip_score=true needs clip_scorer=<clip .ckpt | export folder | open_clip:NAME/TAG> "
        f"(model={getattr(model, 'family_name', '?')} exposes no CLIP scorer of its own)"
    )


# ------------------------------------------------------------------------------------------------ grids
def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default()


def _line_height(font: Any) -> int:
    _, top, _, bottom = font.getbbox("Agjy|")
    return int(bottom - min(top, 0)) + 2


def wrap_label(text: str, width: int, font: Any, max_lines: int) -> list[str]:
    """``text`` broken into at most ``max_lines`` lines of at most ``width`` px in ``font`` (words longer than
    a line are cut; a label that does not fit ends in ``...``)."""
    if max_lines < 1 or width < 1:
        return []
    per_char = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    chars = max(1, int(width / per_char))
    while True:
        lines = textwrap.wrap(" ".join(text.split()), chars, break_long_words=True) or [""]
        if chars == 1 or all(font.getlength(line) <= width for line in lines):
            break
        chars -= 1
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    return lines


def upscale_factor(height: int, width: int, cell: int) -> int:
    """The integer factor that brings the larger side of a ``height`` x ``width`` image to about ``cell`` px
    (1: never shrink)."""
    return max(1, cell // max(height, width, 1))


def labelled_grid(
    images: torch.Tensor,
    labels: Sequence[str],
    columns: int,
    cell: int = GRID_CELL,
    padding: int = GRID_PADDING,
    label_width: int | None = None,
) -> torch.Tensor:
    """A grid for viewing: ``images`` [N,3,H,W] in [0, 1], ``columns`` a row, each upscaled by an integer factor
    (nearest neighbour, so every pixel becomes an exact block) to about ``cell`` px, on a white background.

    ``labels`` has one text per image. When every row's images share one label (a row per prompt, an
    interpolation strip, inputs vs reconstructions), it is written once beside the row, in a column of
    ``label_width`` px (default ``2 * cell``); otherwise each image gets its label above it. Long labels wrap;
    what does not fit ends in ``...``. Returns [3, H', W'] float in [0, 1] (exact multiples of 1/255), for
    ``save_grid`` or a logger.
    """
    from PIL import Image, ImageDraw

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    n, _, height, width = images.shape
    factor = upscale_factor(height, width, cell)
    pixels = images.detach().float().cpu().clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    pixels = pixels.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    cell_h, cell_w = height * factor, width * factor
    rows = math.ceil(n / columns)
    row_labels = [list(labels[r * columns : (r + 1) * columns]) for r in range(rows)]
    beside = all(len(set(row)) == 1 for row in row_labels)
    font = _font()
    line_h = _line_height(font)
    if beside:
        side = label_width if label_width is not None else 2 * max(cell, cell_w)
        texts = [wrap_label(row[0], side - 2 * padding, font, max(1, cell_h // line_h)) for row in row_labels]
        above = 0
    else:
        side = 0
        texts = [wrap_label(label, cell_w, font, MAX_LABEL_LINES_ABOVE) for label in labels]
        above = max(len(lines) for lines in texts) * line_h + padding
    step_x, step_y = cell_w + padding, cell_h + above + padding
    canvas = Image.new(
        "RGB", (side + padding + columns * step_x, padding + rows * step_y), (GRID_BACKGROUND,) * 3
    )
    draw = ImageDraw.Draw(canvas)
    colour = (GRID_TEXT,) * 3
    for i in range(n):
        r, c = divmod(i, columns)
        x, y = side + padding + c * step_x, padding + r * step_y
        canvas.paste(Image.fromarray(pixels[i].permute(1, 2, 0).numpy()), (x, y + above))
        if not beside:
            for k, line in enumerate(texts[i]):
                draw.text((x, y + k * line_h), line, fill=colour, font=font)
    if beside:
        for r, lines in enumerate(texts):
            top = padding + r * step_y + max(0, (cell_h - len(lines) * line_h) // 2)
            for k, line in enumerate(lines):
                draw.text((padding, top + k * line_h), line, fill=colour, font=font)
    array = np.asarray(canvas, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255)


def grid_images(images: Sequence[torch.Tensor | Image.Image], cell: int = GRID_CELL) -> torch.Tensor:
    """[N,3,H,W] in [0, 1] for ``labelled_grid``: generated images ([3,H,W] tensors) as they are; stored
    (retrieved) images fitted, aspect kept, on the grid background into the generated images' size, or, when
    none was generated, into a square of their largest side, at most ``cell`` px."""
    tensors = [image for image in images if torch.is_tensor(image)]
    if tensors:
        height, width = int(tensors[0].shape[-2]), int(tensors[0].shape[-1])
    else:
        height = width = min(cell, max(max(image.size) for image in images))
    return torch.stack([image if torch.is_tensor(image) else _fit(image, height, width) for image in images])


def _fit(image: Image.Image, height: int, width: int) -> torch.Tensor:
    from PIL import ImageOps

    if image.size != (width, height):
        image = ImageOps.pad(image, (width, height), color=(GRID_BACKGROUND,) * 3)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)


def save_grid(grid: torch.Tensor, path: Path) -> None:
    """Write a ``labelled_grid`` as PNG, pixel for pixel."""
    from PIL import Image

    array = grid.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)


def use_generator_checkpoint(model: Any, path: str) -> None:
    """Draw through the generator at ``path`` (a model with a separate generator, e.g. GILL: it is loaded and
    checked on first use); a family that draws by itself gets one line."""
    if not hasattr(model, "generator_checkpoint"):
        name = getattr(model, "family_name", type(model).__name__)
        raise ConfigError(
            f"generator_checkpoint= is for a model that draws through a separate generator (gill); "
            f"model={name} has none: drop it"
        )
    if not Path(path).exists():
        raise ConfigError(f"generator_checkpoint={path}: no such file or folder")
    model.generator_checkpoint = path
    model.generator = None  # the one it had (if any) is replaced on first use
