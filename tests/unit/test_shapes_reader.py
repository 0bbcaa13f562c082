"""The shapes reader, judged on images from a tiny renderer written here from the shared spec.

The renderer deliberately does not use `t2i_train.data.synthetic`: reader and generator must agree
because both follow the spec, not because they share code.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from t2i_train.errors import DataError
from t2i_train.metrics.shapes_reader import (
    evaluate_samples_dir,
    parse_prompt,
    prompt_following,
    read_shape,
)

BACKGROUND = (20, 20, 20)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (160, 70, 210),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
CELLS = {
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
ALL_COMBOS = list(itertools.product(COLOURS, SHAPES, CELLS))


def render(size: int, colour: str, shape: str, position: str, rng: np.random.Generator) -> Image.Image:
    """One shape per the spec: extent 0.34*size*U(0.9,1.1), centre jitter +-0.04*size, no anti-aliasing."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    extent = 0.34 * size * rng.uniform(0.9, 1.1)
    half = extent / 2
    fx, fy = CELLS[position]
    cx = np.clip(fx * size + rng.uniform(-0.04, 0.04) * size, half, size - half)
    cy = np.clip(fy * size + rng.uniform(-0.04, 0.04) * size, half, size - half)
    box = [cx - half, cy - half, cx + half, cy + half]
    draw = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return img


def degrade(img: Image.Image, rng: np.random.Generator, noise: float, blur: float) -> np.ndarray:
    """Gaussian blur (radius in px) then Gaussian pixel noise (std in 0..255 units)."""
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise, (img.height, img.width, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def canonical(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape} in the {position}"


def _dataset(size: int, seed: int, repeats: int, noise: float = 0.0, blur: float = 0.0):
    rng = np.random.default_rng(seed)
    images, prompts = [], []
    for combo in ALL_COMBOS * repeats:
        img = render(size, *combo, rng)
        images.append(degrade(img, rng, noise, blur) if noise or blur else img)
        prompts.append(canonical(*combo))
    return images, prompts


@pytest.mark.parametrize("size", [16, 32, 64])
def test_clean_images_are_read_correctly(size: int) -> None:
    images, prompts = _dataset(size, seed=size, repeats=2)  # 324 images, every combination twice
    result = prompt_following(images, prompts)
    assert result["n"] == 324
    assert result["all"] >= 0.99, {k: result[k] for k in ("colour", "shape", "position")}


@pytest.mark.parametrize(("size", "noise", "blur"), [(32, 15.0, 0.8), (64, 15.0, 0.8), (32, 25.0, 1.0)])
def test_noisy_blurred_images_are_read_correctly(size: int, noise: float, blur: float) -> None:
    images, prompts = _dataset(size, seed=100 + size, repeats=2 if noise < 20 else 1, noise=noise, blur=blur)
    result = prompt_following(images, prompts)
    assert result["all"] >= 0.95, {k: result[k] for k in ("colour", "shape", "position")}


def test_reads_any_size_and_input_type() -> None:
    rng = np.random.default_rng(3)
    for size, combo in [(24, ("red", "triangle", "top")), (128, ("cyan", "square", "bottom left"))]:
        img = render(size, *combo, rng)
        arr = np.asarray(img)
        tensor = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
        for image in (img, arr, tensor, arr.astype(np.float32) / 255.0):
            reading = read_shape(image)
            assert reading.matches(*combo), (size, type(image), reading)


def test_batch_tensor_input() -> None:
    images, prompts = _dataset(32, seed=5, repeats=1)
    batch = torch.stack([torch.from_numpy(np.asarray(i)).permute(2, 0, 1) for i in images[:20]]) / 255.0
    result = prompt_following(batch, prompts[:20])
    assert result["all"] == 1.0
    assert result["correct"]["all"] == 20 and len(result["readings"]) == 20


def test_specks_do_not_distract() -> None:
    """Specks and small blobs, some of the shape's own colour: the largest component still wins."""
    rng = np.random.default_rng(7)
    arr = np.asarray(render(64, "green", "circle", "right", rng)).copy()
    for y, x in rng.integers(0, 64, size=(25, 2)):
        if (arr[y, x] == BACKGROUND).all():
            arr[y, x] = COLOURS["red"]
    for y, x in [(2, 2), (5, 20), (55, 10), (58, 30)]:  # 3x3 blobs survive a 3x3 median filter
        arr[y : y + 3, x : x + 3] = COLOURS["green"]
    reading = read_shape(arr)
    assert reading.matches("green", "circle", "right"), reading
    assert reading.diagnostics["fill"] == pytest.approx(np.pi / 4, abs=0.05)


def test_holes_are_filled() -> None:
    rng = np.random.default_rng(8)
    arr = np.asarray(render(64, "yellow", "square", "center", rng)).copy()
    arr[29:35, 29:35] = BACKGROUND
    reading = read_shape(arr)
    assert reading.matches("yellow", "square", "center")
    assert reading.diagnostics["fill"] > 0.97


@pytest.mark.parametrize("size", [32, 64])
def test_shape_features_follow_the_geometry(size: int) -> None:
    """Fill ratio near pi/4, 1, 1/2; a triangle narrows to the top, the others do not."""
    rng = np.random.default_rng(9)
    # ideal fills pi/4, 1, 1/2; rasterised at ~11 px (size 32) the edges add up to ~0.2 to a triangle
    fill_range = {"circle": (0.72, 0.9), "square": (0.9, 1.0), "triangle": (0.45, 0.75)}
    for shape in SHAPES:
        for position in ("top left", "center", "bottom"):
            reading = read_shape(render(size, "blue", shape, position, rng))
            diag = reading.diagnostics
            assert fill_range[shape][0] < diag["fill"] <= fill_range[shape][1], diag
            assert (diag["taper"] < 0.45) == (shape == "triangle"), diag
            assert 0.04 < diag["area_frac"] < 0.16, diag
            assert reading.confidence["shape"] > 0.9


@pytest.mark.parametrize("noise", [0.0, 15.0])
def test_empty_image_matches_nothing(noise: float) -> None:
    rng = np.random.default_rng(11)
    blank = degrade(Image.new("RGB", (32, 32), BACKGROUND), rng, noise, 0.0)
    reading = read_shape(blank)
    assert not reading.found and reading.colour is None and reading.shape is None
    assert not any(reading.matches(*combo) for combo in ALL_COMBOS)
    result = prompt_following([blank], [canonical("red", "circle", "center")])
    assert result["all"] == result["colour"] == result["shape"] == result["position"] == 0.0


def test_wrong_colour_and_wrong_position_are_judged_wrong() -> None:
    rng = np.random.default_rng(13)
    img = render(32, "red", "square", "top left", rng)
    prompts = [
        canonical("red", "square", "top left"),
        canonical("purple", "square", "top left"),
        canonical("red", "square", "bottom right"),
        canonical("red", "square", "top"),
        canonical("red", "triangle", "top left"),
    ]
    result = prompt_following([img] * len(prompts), prompts)
    verdicts = [r["correct"] for r in result["readings"]]
    assert [v["all"] for v in verdicts] == [True, False, False, False, False]
    assert [v["colour"] for v in verdicts] == [True, False, True, True, True]
    assert [v["position"] for v in verdicts] == [True, True, False, False, True]
    assert [v["shape"] for v in verdicts] == [True, True, True, True, False]
    assert result["per_prompt"][prompts[0]] == 1.0 and result["per_prompt"][prompts[1]] == 0.0


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red circle in the top left", ("red", "circle", "top left")),
        ("top left: a red circle", ("red", "circle", "top left")),
        ("a circle, red, at the top left", ("red", "circle", "top left")),
        ("there is a red circle in the top left of the image", ("red", "circle", "top left")),
        ("a blue square in the top", ("blue", "square", "top")),
        ("a green triangle in the center", ("green", "triangle", "center")),
        ("A Green Triangle in the Centre", ("green", "triangle", "center")),
        ("a cyan circle, bottom-right", ("cyan", "circle", "bottom right")),
        ("a yellow square on the left", ("yellow", "square", "left")),
        ("purple triangle bottom", ("purple", "triangle", "bottom")),
    ],
)
def test_parse_prompt(prompt: str, expected: tuple[str, str, str]) -> None:
    assert parse_prompt(prompt) == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "a red circle",  # no position
        "a circle in the top left",  # no colour
        "a red thing in the top left",  # no shape
        "a red circle in the top left and a blue circle",  # two colours
        "a bright blue square at the bottom left or right",  # two positions ("bright" is not "right")
        "",
    ],
)
def test_parse_prompt_rejects(prompt: str) -> None:
    with pytest.raises(ValueError):
        parse_prompt(prompt)


def test_bright_is_not_right() -> None:
    assert parse_prompt("a bright blue square at the bottom left") == ("blue", "square", "bottom left")


def test_evaluate_samples_dir(tmp_path) -> None:
    rng = np.random.default_rng(17)
    combos = ALL_COMBOS[::10]
    with (tmp_path / "manifest.jsonl").open("w") as f:
        for n, combo in enumerate(combos):
            render(32, *combo, rng).save(tmp_path / f"{n}.png")
            f.write(json.dumps({"prompt": canonical(*combo), "file": f"{n}.png", "seed": n}) + "\n")
    result = evaluate_samples_dir(tmp_path)
    assert result["n"] == len(combos) and result["all"] == 1.0
    assert result["readings"][3]["file"] == "3.png" and result["readings"][3]["seed"] == 3

    # A sample that shows the wrong colour lowers the colour accuracy.
    render(32, "blue", "circle", "center", rng).save(tmp_path / "0.png")
    first = json.dumps({"prompt": canonical("red", "circle", "center"), "file": "0.png", "seed": 0})
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    (tmp_path / "manifest.jsonl").write_text("\n".join([first, *lines[1:]]) + "\n")
    assert evaluate_samples_dir(tmp_path)["colour"] == pytest.approx(1 - 1 / len(combos))


def test_evaluate_samples_dir_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="manifest"):
        evaluate_samples_dir(tmp_path)
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"prompt": "a red circle in the top", "file": "0.png"})
    )
    with pytest.raises(DataError, match=r"0\.png"):
        evaluate_samples_dir(tmp_path)


@pytest.mark.parametrize("size", [32, 64])
def test_reader_agrees_with_the_project_generator(size: int) -> None:
    """~300 images from `t2i_train.data.synthetic` (imported only here): the reader gets >= 98%."""
    from t2i_train.data.synthetic import render_scene

    rng = np.random.default_rng(1000 + size)
    images, prompts = [], []
    for colour, shape, position in ALL_COMBOS + ALL_COMBOS[::-1][:138]:  # 300 images
        image, _ = render_scene(colour, shape, position, size=size, rng=rng)
        images.append(image)
        prompts.append(canonical(colour, shape, position))
    result = prompt_following(images, prompts)
    assert result["n"] == 300
    assert result["all"] >= 0.98, {k: result[k] for k in ("colour", "shape", "position")}


def test_parse_prompt_reads_the_generator_captions() -> None:
    """Every caption style that names all three attributes parses back to the scene."""
    import random

    from t2i_train.data.synthetic import make_sample

    rng, text_rng = np.random.default_rng(0), random.Random(0)
    for combo in ALL_COMBOS:
        _, meta = make_sample(combo, 32, rng, text_rng)
        assert parse_prompt(meta["caption"]) == combo, meta["caption"]
        assert parse_prompt(meta["descriptive"]) == combo, meta["descriptive"]
