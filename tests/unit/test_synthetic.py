"""The shapes generator follows the shared spec: colours, geometry, captions, held-out combinations."""

from __future__ import annotations

import random

import numpy as np
import pytest

from t2i_train.data import synthetic
from t2i_train.errors import ConfigError

GRID = {"left": 0, "center": 1, "right": 2}


def _grid_cell(x: float, y: float, size: int) -> tuple[int, int]:
    return int(3 * x / size), int(3 * y / size)


def _expected_cell(position: str) -> tuple[int, int]:
    fx, fy = synthetic.POSITIONS[position]
    return int(3 * fx), int(3 * fy)


def _render(combo: tuple[str, str, str], size: int = 32, seed: int = 0) -> tuple[np.ndarray, dict]:
    image, meta = synthetic.render_scene(*combo, size=size, rng=np.random.default_rng(seed))
    assert image.size == (size, size) and image.mode == "RGB"
    return np.asarray(image), meta


def test_same_seed_same_image_and_different_seed_differs() -> None:
    a, meta_a = _render(("red", "circle", "top left"), seed=3)
    b, meta_b = _render(("red", "circle", "top left"), seed=3)
    c, _ = _render(("red", "circle", "top left"), seed=4)
    assert np.array_equal(a, b) and meta_a == meta_b
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("size", [32, 64])
def test_every_combination_has_the_right_colour_position_and_size(size: int) -> None:
    for i, combo in enumerate(synthetic.all_combinations()):
        colour, shape, position = combo
        pixels, meta = _render(combo, size=size, seed=i)
        # two colours only: no anti-aliasing
        colours = {tuple(p) for p in pixels.reshape(-1, 3)}
        assert colours == {synthetic.BACKGROUND_RGB, synthetic.PALETTE[colour]}
        mask = np.all(pixels == synthetic.PALETTE[colour], axis=-1)
        ys, xs = np.nonzero(mask)
        # centroid (pixel centres) falls in the position's grid cell
        assert _grid_cell(xs.mean() + 0.5, ys.mean() + 0.5, size) == _expected_cell(position), combo
        # centre pixel of the bounding box has the palette colour (triangle: a bit below the box centre)
        cx, cy = meta["center"]
        probe_y = cy + (meta["extent"] / 6 if shape == "triangle" else 0)
        assert tuple(pixels[int(probe_y), int(cx)]) == synthetic.PALETTE[colour]
        # extent 0.34*size jittered by 0.9..1.1, measured on the pixel grid (pixel-centre sampling: within 2 px)
        nominal = synthetic.EXTENT_FRACTION * size
        assert 0.9 * nominal - 1e-9 <= meta["extent"] <= 1.1 * nominal + 1e-9
        width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert abs(width - meta["extent"]) <= 2 and abs(height - meta["extent"]) <= 2
        # inside the canvas
        half = meta["extent"] / 2
        assert half - 1e-3 <= cx <= size - half + 1e-3 and half - 1e-3 <= cy <= size - half + 1e-3


def test_triangle_is_upright_with_apex_at_top() -> None:
    pixels, _ = _render(("blue", "triangle", "center"), size=64)
    mask = np.all(pixels == synthetic.PALETTE["blue"], axis=-1)
    rows = np.nonzero(mask.any(axis=1))[0]
    top, bottom = mask[rows[0]].sum(), mask[rows[-1]].sum()
    assert top <= 2 < bottom
    # the apex column is the horizontal centre of the base
    base = np.nonzero(mask[rows[-1]])[0]
    apex = np.nonzero(mask[rows[0]])[0]
    assert abs(apex.mean() - base.mean()) <= 0.5


def test_jitter_stays_within_spec() -> None:
    size = 96
    for seed in range(40):
        _, meta = _render(("green", "square", "center"), size=size, seed=seed)
        cx, cy = meta["center"]
        assert abs(cx - size / 2) <= 0.04 * size + 1e-6 and abs(cy - size / 2) <= 0.04 * size + 1e-6


def test_captions_name_every_attribute_and_variants_differ() -> None:
    text_rng = random.Random(0)
    rng = np.random.default_rng(0)
    captions, alts = set(), set()
    for _ in range(60):
        _, meta = synthetic.make_sample(("purple", "square", "bottom right"), 32, rng, text_rng)
        for word in ("purple", "square", "bottom right"):
            assert word in meta["caption"]
            assert word in meta["descriptive"]
        assert synthetic.BACKGROUND_NAME in meta["descriptive"]
        assert str(round(meta["extent"])) in meta["descriptive"]
        assert "bottom right" not in meta["alt_text"]  # terse: never all three attributes
        captions.add(meta["caption"])
        alts.add(meta["alt_text"])
        assert meta["background"] == synthetic.BACKGROUND_NAME
    assert len(captions) >= 4 and len(alts) >= 3


def test_center_position_reads_in_the_center() -> None:
    _, meta = synthetic.make_sample(
        ("red", "circle", "center"), 32, np.random.default_rng(0), random.Random(1)
    )
    assert "center" in meta["caption"]
    assert synthetic.canonical_prompt("red", "circle", "center") == "a red circle in the center"


def test_all_combinations_and_canonical_prompt() -> None:
    combos = synthetic.all_combinations()
    assert len(combos) == len(set(combos)) == 6 * 3 * 9
    assert synthetic.canonical_prompt("cyan", "triangle", "top left") == "a cyan triangle in the top left"


def test_holdout_fraction_is_reproducible_and_keeps_every_value_in_training() -> None:
    held = synthetic.select_holdout(holdout_fraction=0.1, seed=7)
    assert held == synthetic.select_holdout(holdout_fraction=0.1, seed=7)
    assert held != synthetic.select_holdout(holdout_fraction=0.1, seed=8)
    assert len(held) == round(0.1 * 162)
    train = synthetic.training_combinations(held)
    assert not set(held) & set(train)
    for axis, values in enumerate((synthetic.COLOURS, synthetic.SHAPES, synthetic.POSITION_NAMES)):
        assert {c[axis] for c in train} == set(values)
    # even a large fraction keeps every value
    train = synthetic.training_combinations(synthetic.select_holdout(holdout_fraction=0.8, seed=0))
    assert {c[2] for c in train} == set(synthetic.POSITION_NAMES)


def test_explicit_holdout_and_bad_entries() -> None:
    held = synthetic.select_holdout(["red circle top left", "Blue Square center"])
    assert held == [("red", "circle", "top left"), ("blue", "square", "center")]
    with pytest.raises(ConfigError, match="colour shape position"):
        synthetic.select_holdout(["red hexagon top"])
    with pytest.raises(ConfigError):
        synthetic.render_scene("magenta", "circle", "top", 32, np.random.default_rng(0))
