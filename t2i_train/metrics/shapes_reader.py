"""An independent, rule-based reader of images from the synthetic "shapes" world.

It judges whether a generated image shows the prompted colour, shape and position. It deliberately
shares no code with the generator (`t2i_train.data.synthetic`): palette, grid and shape definitions
are restated here from the shared spec, so a bug in one cannot hide a bug in the other.

How an image is read:
1. background = the dominant colour of the image border (coarse-binned mode, then the median of the
   border pixels in that bin);
2. candidate foreground = pixels whose distance from the background exceeds a robust threshold (from
   the spread of the border pixels), largest 4-connected component;
3. refinement: with that component's median colour c, a pixel is foreground when its projection on the
   background→c axis is past half way (the 50% level contour, which keeps geometry under blur;
   3x3-median-filtered when the border is noisy); the largest component again, holes filled;
4. colour = nearest palette colour to the component's median colour; position = nearest grid cell to
   the centroid; shape = nearest prototype in a small feature space (fill ratio of the bounding box,
   taper of the width profile, occupancy of the bounding-box corners).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from t2i_train.errors import DataError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (160, 70, 210),
    "cyan": (40, 200, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Grid cell centres as (x, y) fractions of the canvas size.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (1 / 6, 1 / 6),
    "top": (1 / 2, 1 / 6),
    "top right": (5 / 6, 1 / 6),
    "left": (1 / 6, 1 / 2),
    "center": (1 / 2, 1 / 2),
    "right": (5 / 6, 1 / 2),
    "bottom left": (1 / 6, 5 / 6),
    "bottom": (1 / 2, 5 / 6),
    "bottom right": (5 / 6, 5 / 6),
}
POSITION_ALIASES: dict[str, str] = {"centre": "center"}

# Shape prototypes in feature space (fill, taper, top-corner occupancy, bottom-corner occupancy), the
# values of the ideal continuous shapes with 20% corner patches: circle fill pi/4, corners 0.137;
# square all 1; upright triangle fill 1/2, top quarter 1/7 as wide as the bottom quarter, top corners
# empty, bottom corners 3/4 full.
_PROTOTYPES: dict[str, np.ndarray] = {
    "circle": np.array([np.pi / 4, 1.0, 0.137, 0.137]),
    "square": np.array([1.0, 1.0, 1.0, 1.0]),
    "triangle": np.array([0.5, 1 / 7, 0.0, 0.75]),
}
_FEATURE_WEIGHTS = np.array([2.0, 1.0, 0.5, 0.5])  # fill is the sharpest cue between circle and square
_CORNER_FRAC = 0.2  # side of each corner patch, as a fraction of the bounding box
_MIN_AREA_FRAC = 0.01  # components smaller than this fraction of the image are specks, not shapes
_MEDIAN_NOISE = 6.0  # border noise (std, 0..255) above which the foreground is median-filtered
_MIN_THRESHOLD, _MAX_THRESHOLD = 40.0, 110.0  # clamp of the robust foreground threshold (RGB distance)


@dataclass
class Reading:
    """What the reader saw. `colour`/`shape`/`position` are None when nothing was found."""

    colour: str | None
    shape: str | None
    position: str | None
    found: bool
    confidence: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def matches(self, colour: str, shape: str, position: str) -> bool:
        """True when all three attributes agree (never for an empty reading)."""
        return self.found and (self.colour, self.shape, self.position) == (colour, shape, position)


# --------------------------------------------------------------------------------------------- input


def to_rgb_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """Return float32 HWC RGB in [0, 255].

    Accepts a PIL image, a numpy HWC array (uint8 in [0, 255] or float in [0, 1]) or a torch tensor
    CHW (float in [0, 1] or uint8). Grayscale inputs are repeated to three channels.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
            raise ValueError(f"expected a CHW tensor, got shape {tuple(image.shape)}")
        arr = t.permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        arr = image if image.ndim == 3 else image[:, :, None]
    else:
        raise TypeError(f"cannot read an image of type {type(image).__name__}")
    arr = arr[:, :, :3]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0
    return arr.astype(np.float32)


# ----------------------------------------------------------------------------------- mask utilities


def _label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels: each pixel of `mask` gets the smallest flat index of its
    component, every other pixel gets h*w. Min-label propagation with pointer jumping (no scipy here).
    """
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce(
            [labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        flat = np.where(mask, neighbours, big).ravel()
        fg = flat < big
        for _ in range(4):  # pointer jumping: follow labels to smaller labels of the same component
            flat[fg] = flat[flat[fg]]
        new = flat.reshape(h, w)
        if np.array_equal(new, labels):
            return labels
        labels = new


def _median3(x: np.ndarray) -> np.ndarray:
    """3x3 median filter (edge-replicated): removes salt-and-pepper specks before thresholding."""
    p = np.pad(x, 1, mode="edge")
    h, w = x.shape
    return np.median(np.stack([p[i : i + h, j : j + w] for i in range(3) for j in range(3)]), axis=0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (empty mask in, empty mask out)."""
    if not mask.any():
        return mask.copy()
    labels = _label_components(mask)
    return labels == int(np.argmax(np.bincount(labels[mask])))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the regions of ~mask that do not reach the image border."""
    outside = np.pad(~mask, 1, constant_values=True)
    labels = _label_components(outside)
    return labels[1:-1, 1:-1] != 0  # the padded frame holds flat index 0


# --------------------------------------------------------------------------------------- the reader


def _border_pixels(img: np.ndarray) -> np.ndarray:
    """Pixels of a ring about 1/16 of the size wide (at least 1 px) around the image."""
    h, w, _ = img.shape
    r = max(1, min(h, w) // 16)
    ring = np.ones((h, w), dtype=bool)
    ring[r : h - r, r : w - r] = False
    return img[ring]


def _estimate_background(border: np.ndarray) -> np.ndarray:
    """Dominant border colour: the most populated 32-level RGB bin, then the median of its pixels."""
    bins = np.clip(border // 32, 0, 7).astype(np.int64)
    codes = bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]
    mode = np.argmax(np.bincount(codes, minlength=512))
    return np.median(border[codes == mode], axis=0)


def _robust_threshold(border: np.ndarray, background: np.ndarray) -> float:
    dist = np.linalg.norm(border - background, axis=1)
    med = float(np.median(dist))
    mad = float(np.median(np.abs(dist - med))) * 1.4826
    return float(np.clip(med + 6.0 * mad + 10.0, _MIN_THRESHOLD, _MAX_THRESHOLD))


def _shape_features(mask: np.ndarray) -> dict[str, float]:
    """Fill ratio of the bounding box, taper (top/bottom quarter widths) and corner occupancy."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    bh, bw = box.shape
    widths = box.sum(axis=1).astype(np.float64)
    q = max(1, round(bh / 4))
    taper = float(widths[:q].mean() / max(widths[-q:].mean(), 1e-6))
    ch, cw = max(1, round(bh * _CORNER_FRAC)), max(1, round(bw * _CORNER_FRAC))
    top = (box[:ch, :cw].mean() + box[:ch, -cw:].mean()) / 2
    bottom = (box[-ch:, :cw].mean() + box[-ch:, -cw:].mean()) / 2
    return {
        "fill": float(box.mean()),
        "taper": min(taper, 2.0),
        "top_corners": float(top),
        "bottom_corners": float(bottom),
        "bbox_aspect": float(bw / bh),
    }


def _classify_shape(features: dict[str, float]) -> tuple[str, float]:
    """Nearest prototype; confidence = softmax weight of the winner at temperature 0.05."""
    x = np.array([features[k] for k in ("fill", "taper", "top_corners", "bottom_corners")])
    d = {name: float(np.sum(_FEATURE_WEIGHTS * (x - p) ** 2)) for name, p in _PROTOTYPES.items()}
    names = list(d)
    logits = -np.array([d[n] for n in names]) / 0.05
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    best = int(np.argmax(probs))
    return names[best], float(probs[best])


def _nearest(table: dict[str, tuple[float, ...]], value: np.ndarray) -> tuple[str, float, float]:
    """Nearest entry by Euclidean distance: (name, distance, margin to the runner-up)."""
    dists = sorted((float(np.linalg.norm(value - np.asarray(v))), k) for k, v in table.items())
    return dists[0][1], dists[0][0], dists[1][0] - dists[0][0]


def _empty_reading(**diagnostics: Any) -> Reading:
    return Reading(colour=None, shape=None, position=None, found=False, diagnostics=diagnostics)


def read_shape(image: Image.Image | np.ndarray | torch.Tensor) -> Reading:
    """Read colour, shape and position of the single shape in a shapes-world image of any size."""
    img = to_rgb_array(image)
    h, w, _ = img.shape
    border = _border_pixels(img)
    background = _estimate_background(border)
    threshold = _robust_threshold(border, background)
    noise = 1.4826 * float(np.median(np.abs(border - background)))  # robust per-channel std
    diag: dict[str, Any] = {
        "background": background.round(1).tolist(),
        "threshold": threshold,
        "noise": noise,
    }

    coarse = _largest_component(np.linalg.norm(img - background, axis=2) > threshold)
    if coarse.sum() < max(4, _MIN_AREA_FRAC * h * w):
        return _empty_reading(**diag, area_frac=float(coarse.mean()))

    # Refine at the half-way level between background and the shape's own colour.
    axis = np.median(img[coarse], axis=0) - background
    level = ((img - background) @ axis) / max(float(axis @ axis), 1e-6)
    if noise > _MEDIAN_NOISE:  # denoise only noisy images: the median erodes shapes a few px wide
        level = _median3(level)
    mask = _fill_holes(_largest_component(level > 0.5))
    if mask.sum() < max(4, _MIN_AREA_FRAC * h * w):
        return _empty_reading(**diag, area_frac=float(mask.mean()))

    colour_value = np.median(img[mask], axis=0)
    colour, colour_dist, colour_margin = _nearest(PALETTE, colour_value)
    ys, xs = np.nonzero(mask)
    centroid = np.array([(xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h])
    position, _, pos_margin = _nearest(POSITIONS, centroid)
    features = _shape_features(mask)
    shape, shape_conf = _classify_shape(features)

    diag.update(
        features,
        area_frac=float(mask.mean()),
        foreground_share=float(mask.sum() / max(1, (level > 0.5).sum())),
        median_colour=colour_value.round(1).tolist(),
        colour_distance=colour_dist,
        centroid=centroid.round(4).tolist(),
    )
    confidence = {
        # margins relative to the palette spacing (~100) and the grid spacing (1/3)
        "colour": float(np.clip(colour_margin / 100.0, 0.0, 1.0)),
        "position": float(np.clip(pos_margin * 3.0, 0.0, 1.0)),
        "shape": shape_conf,
    }
    return Reading(colour, shape, position, True, confidence, diag)


# ------------------------------------------------------------------------------------------ prompts


def _find_words(text: str, words: Sequence[str]) -> tuple[list[str], str]:
    """Words (longest first, spaces or hyphens between parts) found in text, and the text without them."""
    found = []
    for word in sorted(words, key=len, reverse=True):
        pattern = r"\b" + r"[\s\-]+".join(map(re.escape, word.split())) + r"\b"
        if re.search(pattern, text):
            found.append(word)
            text = re.sub(pattern, " ", text)
    return found, text


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, position) named in a prompt.

    Positions are matched longest first, so "top left" beats "top"; "centre" is read as "center".
    Raises ValueError when an attribute is missing or named more than once with different values.
    """
    text = prompt.lower()
    result = []
    for kind, words in (
        ("colour", list(PALETTE)),
        ("shape", list(SHAPES)),
        ("position", [*POSITIONS, *POSITION_ALIASES]),
    ):
        found, text = _find_words(text, words)
        values = sorted({POSITION_ALIASES.get(f, f) for f in found})
        if len(values) != 1:
            what = "no" if not values else f"several ({', '.join(values)})"
            raise ValueError(f"prompt names {what} {kind}: {prompt!r}")
        result.append(values[0])
    return result[0], result[1], result[2]


# ------------------------------------------------------------------------------------------ metrics

ImageLike = Image.Image | np.ndarray | torch.Tensor


def prompt_following(images: Sequence[ImageLike] | torch.Tensor, prompts: Sequence[str]) -> dict[str, Any]:
    """Accuracy of images against their prompts: per attribute, and `all` (the three together).

    `images` is a sequence of images or a [B,3,H,W] tensor in [0, 1]. Returns accuracies (`colour`,
    `shape`, `position`, `all`), `n`, `correct` counts, `per_prompt` accuracy of `all`, and
    `readings` (one dict per sample with the prompt, the expected and the read attributes).
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    keys = ("colour", "shape", "position", "all")
    correct = dict.fromkeys(keys, 0)
    per_prompt: dict[str, list[int]] = {}
    readings = []
    for image, prompt in zip(images, prompts):
        expected = dict(zip(keys[:3], parse_prompt(prompt)))
        reading = read_shape(image)
        hits = {k: reading.found and getattr(reading, k) == v for k, v in expected.items()}
        hits["all"] = all(hits.values())
        for k in keys:
            correct[k] += int(hits[k])
        per_prompt.setdefault(prompt, []).append(int(hits["all"]))
        readings.append({"prompt": prompt, "expected": expected, **asdict(reading), "correct": hits})
    n = len(prompts)
    result: dict[str, Any] = {k: correct[k] / n if n else float("nan") for k in keys}
    result.update(
        n=n,
        correct=correct,
        per_prompt={p: sum(v) / len(v) for p, v in per_prompt.items()},
        readings=readings,
    )
    return result


def evaluate_samples_dir(directory: str | Path) -> dict[str, Any]:
    """`prompt_following` over a directory written by `python -m t2i_train.sample`.

    Reads `manifest.jsonl` (one `{"prompt", "file", "seed"}` per line) and the PNGs next to it; each
    reading also carries its `file` and `seed`.
    """
    directory = Path(directory)
    manifest = directory / "manifest.jsonl"
    if not manifest.is_file():
        raise DataError(f"no manifest.jsonl in {directory}: point at a directory written by t2i_train.sample")
    entries = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    if not entries:
        raise DataError(f"{manifest} lists no samples")
    images = []
    for entry in entries:
        path = directory / entry["file"]
        if not path.is_file():
            raise DataError(f"{manifest} lists {entry['file']}, which is missing")
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    result = prompt_following(images, [e["prompt"] for e in entries])
    for entry, reading in zip(entries, result["readings"]):
        reading["file"], reading["seed"] = entry["file"], entry.get("seed")
    return result
