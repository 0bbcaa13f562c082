"""The synthetic "shapes" world: one filled shape of a named colour at one of nine positions.

Follows the shared spec (``shapes_spec.md``): a ``size``-px square canvas on RGB (20, 20, 20), six palette
colours, circle / square / upright triangle drawn without anti-aliasing, nominal extent 0.34·size jittered
xU(0.9, 1.1), centres on a 3x3 grid jittered ±0.04·size and kept inside the canvas.

Pixel convention: pixel (i, j) covers [i, i+1) x [j, j+1); a pixel belongs to the shape when its centre
(i+0.5, j+0.5) lies inside. ``center`` in the metadata is the centre of the shape's bounding box; a
triangle's pixel centroid therefore lies extent/6 below it.

This module needs only numpy and PIL (no torch), so the shard CLI starts fast.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from t2i_train.errors import ConfigError

BACKGROUND_RGB: tuple[int, int, int] = (20, 20, 20)
BACKGROUND_NAME = "dark gray"
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (160, 70, 210),
    "cyan": (40, 200, 210),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# name -> (x, y) centre as fractions of the canvas size
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
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)
EXTENT_FRACTION = 0.34
EXTENT_JITTER = (0.9, 1.1)
CENTER_JITTER = 0.04
# bump when rendering or captions change: the data module's cache key includes it
GENERATOR_VERSION = 1

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} in the {position}",
    "{position}: a {colour} {shape}",
    "a {shape}, {colour}, at the {position}",
    "there is a {colour} {shape} in the {position} of the image",
    "a {colour} {shape} located in the {position}",
    "an image of a {colour} {shape} in the {position}",
    "{colour} {shape}, {position}",
)
# alt-text style: terse and always missing at least the position
ALT_TEMPLATES: tuple[str, ...] = (
    "a {shape}",
    "{colour} shape",
    "a shape",
    "a {colour} {shape}",
    "{shape}",
    "an image",
)
DESCRIPTIVE_TEMPLATES: tuple[str, ...] = (
    "A {size_word} solid {colour} {shape} sits in the {position} of the image on a plain {background} "
    "background. The {shape} is about {extent} pixels across on a {size} by {size} pixel canvas, and "
    "nothing else is in the picture.",
    "The image shows a single filled {colour} {shape} in the {position}, drawn with hard edges against a "
    "flat {background} background. It is {size_word}, roughly {extent} of the {size} pixels wide.",
    "On a uniform {background} background, one {size_word} {colour} {shape} is placed in the {position} "
    "of the frame; the {shape} measures about {extent} pixels on a {size}x{size} canvas.",
)


def canonical_prompt(colour: str, shape: str, position: str) -> str:
    """The evaluation prompt for a combination, exactly "a {colour} {shape} in the {position}"."""
    return f"a {colour} {shape} in the {position}"


def descriptive_prompt(colour: str, shape: str, position: str, size: int = 32, template: int = 0) -> str:
    """A full descriptive prompt for a combination: ``DESCRIPTIVE_TEMPLATES[template]`` with a medium-sized
    shape of the nominal extent (the evaluation prompts of the DALL-E 3 recipe and the template upsampler)."""
    _check(colour, shape, position)
    return DESCRIPTIVE_TEMPLATES[template % len(DESCRIPTIVE_TEMPLATES)].format(
        colour=colour,
        shape=shape,
        position=position,
        background=BACKGROUND_NAME,
        size=size,
        extent=round(EXTENT_FRACTION * size),
        size_word="medium-sized",
    )


def combination_name(colour: str, shape: str, position: str) -> str:
    """The "colour shape position" string used in holdout lists, e.g. "red circle top left"."""
    return f"{colour} {shape} {position}"


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (colour, shape, position) triple in a fixed order (6 x 3 x 9 = 162)."""
    return list(itertools.product(COLOURS, SHAPES, POSITION_NAMES))


def parse_combination(text: str) -> tuple[str, str, str]:
    """Parse "colour shape position" (position may be two words) into a triple."""
    parts = text.strip().lower().split()
    if len(parts) >= 3 and parts[0] in PALETTE and parts[1] in SHAPES:
        position = " ".join(parts[2:])
        if position in POSITIONS:
            return parts[0], parts[1], position
    raise ConfigError(
        f"holdout entry {text!r} is not 'colour shape position' "
        f"(colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; positions {', '.join(POSITION_NAMES)})"
    )


def select_holdout(
    holdout: Iterable[str] | None = None, holdout_fraction: float = 0.0, seed: int = 0
) -> list[tuple[str, str, str]]:
    """Combinations kept out of training, in ``all_combinations()`` order.

    An explicit ``holdout`` list wins; otherwise ``round(fraction * 162)`` combinations are chosen with
    ``random.Random(seed)`` such that every colour, shape and position still occurs in training.
    """
    combos = all_combinations()
    if holdout:
        chosen = {parse_combination(h) for h in holdout}
        return [c for c in combos if c in chosen]
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    target = round(holdout_fraction * len(combos))
    order = combos.copy()
    random.Random(seed).shuffle(order)
    chosen_set: set[tuple[str, str, str]] = set()
    for combo in order:
        if len(chosen_set) == target:
            break
        remaining = [c for c in combos if c not in chosen_set and c != combo]
        if all({c[i] for c in remaining} == set(values) for i, values in enumerate(_AXES)):
            chosen_set.add(combo)
    return [c for c in combos if c in chosen_set]


_AXES: tuple[tuple[str, ...], ...] = (COLOURS, SHAPES, POSITION_NAMES)


def training_combinations(holdout: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    held = set(holdout)
    return [c for c in all_combinations() if c not in held]


def _check(colour: str, shape: str, position: str) -> None:
    if colour not in PALETTE or shape not in SHAPES or position not in POSITIONS:
        raise ConfigError(f"unknown combination ({colour!r}, {shape!r}, {position!r})")


def _shape_mask(shape: str, size: int, cx: float, cy: float, extent: float) -> np.ndarray:
    """Boolean [size, size] mask (rows = y) of pixels whose centres fall inside the shape."""
    coords = np.arange(size, dtype=np.float64) + 0.5
    px, py = coords[None, :], coords[:, None]
    half = extent / 2
    if shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= half**2
    inside_box = (np.abs(px - cx) <= half) & (np.abs(py - cy) <= half)
    if shape == "square":
        return inside_box
    # upright isosceles triangle: apex (cx, cy - half), base from (cx - half, cy + half) to (cx + half, ...)
    depth = (py - (cy - half)) / extent  # 0 at the apex row, 1 at the base
    return inside_box & (np.abs(px - cx) <= depth * half)


def render_scene(
    colour: str, shape: str, position: str, size: int, rng: np.random.Generator
) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one scene; returns the RGB image and its geometry (center [x, y] px, extent px, ...).

    ``rng`` supplies the jitter (extent factor, then x and y offsets), so equal seeds give equal images.
    """
    _check(colour, shape, position)
    u = rng.random(3).tolist()  # extent factor, x jitter, y jitter
    extent = EXTENT_FRACTION * size * (EXTENT_JITTER[0] + (EXTENT_JITTER[1] - EXTENT_JITTER[0]) * u[0])
    fx, fy = POSITIONS[position]
    half = extent / 2
    cx = min(max(fx * size + (2 * u[1] - 1) * CENTER_JITTER * size, half), size - half)
    cy = min(max(fy * size + (2 * u[2] - 1) * CENTER_JITTER * size, half), size - half)
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND_RGB
    pixels[_shape_mask(shape, size, cx, cy, extent)] = PALETTE[colour]
    meta = {
        "colour": colour,
        "shape": shape,
        "position": position,
        "center": [round(cx, 3), round(cy, 3)],
        "extent": round(extent, 3),
        "size": size,
        "rgb": list(PALETTE[colour]),
        "background": BACKGROUND_NAME,
        "background_rgb": list(BACKGROUND_RGB),
    }
    return Image.frombytes("RGB", (size, size), pixels.tobytes()), meta


def _size_word(extent: float, size: int) -> str:
    ratio = extent / (EXTENT_FRACTION * size)
    if ratio < 0.96:
        return "fairly small"
    return "fairly large" if ratio > 1.04 else "medium-sized"


def make_captions(meta: dict[str, Any], rng: random.Random) -> dict[str, str]:
    """The three caption styles for a rendered scene: ``caption`` (txt), ``alt_text``, ``descriptive``."""
    words = {"colour": meta["colour"], "shape": meta["shape"], "position": meta["position"]}
    descriptive = rng.choice(DESCRIPTIVE_TEMPLATES).format(
        **words,
        background=meta["background"],
        size=meta["size"],
        extent=round(meta["extent"]),
        size_word=_size_word(meta["extent"], meta["size"]),
    )
    return {
        "caption": rng.choice(CAPTION_TEMPLATES).format(**words),
        "alt_text": rng.choice(ALT_TEMPLATES).format(**words),
        "descriptive": descriptive,
    }


def make_sample(
    combo: tuple[str, str, str], size: int, rng: np.random.Generator, text_rng: random.Random
) -> tuple[Image.Image, dict[str, Any]]:
    """Render ``combo`` and attach its captions; the dict is the sample's JSON (``caption`` is the txt)."""
    image, meta = render_scene(*combo, size=size, rng=rng)
    meta.update(make_captions(meta, text_rng))
    return image, meta
