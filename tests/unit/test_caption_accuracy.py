"""The caption reader: finds the shapes world's words, longest position phrase first, ambiguity is a miss."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from t2i_train.data.synthetic import all_combinations, make_sample
from t2i_train.metrics.caption_accuracy import caption_accuracy, read_attributes, render_scenes


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a red circle in the top left", ("red", "circle", "top left")),
        ("bottom: a cyan square", ("cyan", "square", "bottom")),
        ("A purple triangle sits in the centre of the image.", ("purple", "triangle", "center")),
        ("Top-Right, green circle", ("green", "circle", "top right")),
        ("a yellow shape on the left", ("yellow", None, "left")),
        ("a red and blue circle at the top", (None, "circle", "top")),
        ("a blue circle in the top left, or the right", ("blue", "circle", None)),
        ("two squares", (None, "square", None)),
        ("", (None, None, None)),
    ],
)
def test_read_attributes(caption: str, expected: tuple[str | None, ...]) -> None:
    read = read_attributes(caption)
    assert (read["colour"], read["shape"], read["position"]) == expected


def test_every_generated_caption_style_reads_back_its_attributes() -> None:
    """The reader parses all the synthetic set's caption and descriptive templates (and ignores 'dark gray')."""
    rng, text_rng = np.random.default_rng(0), random.Random(0)
    for combo in all_combinations():
        for _ in range(3):
            _, meta = make_sample(combo, 32, rng, text_rng)
            for key in ("caption", "descriptive"):
                read = read_attributes(meta[key])
                assert (read["colour"], read["shape"], read["position"]) == combo, meta[key]


def test_caption_accuracy_per_attribute_and_all_three() -> None:
    metas = [{"colour": "red", "shape": "circle", "position": "top left"}] * 4
    captions = [
        "a red circle in the top left",  # all three
        "a red circle in the top",  # wrong position
        "a blue circle in the top left",  # wrong colour
        "a red square in the top left",  # wrong shape
    ]
    scores = caption_accuracy(captions, metas)
    assert scores == {"colour": 0.75, "shape": 0.75, "position": 0.75, "all": 0.25, "count": 4}


def test_render_scenes_gives_images_and_their_json() -> None:
    images, metas = render_scenes([("red", "circle", "top left"), ("blue", "square", "center")], 2, 16)
    assert images.shape == (4, 3, 16, 16) and float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    assert [m["colour"] for m in metas] == ["red", "red", "blue", "blue"]


def test_stored_captions_are_audited_against_their_json(tmp_path: Path) -> None:
    from t2i_train.data.shards import write_synthetic_shards
    from t2i_train.metrics.caption_accuracy import stored_caption_accuracy

    write_synthetic_shards(tmp_path, count=40, samples_per_shard=20)
    txt = stored_caption_accuracy(str(tmp_path), "txt")  # the generator's captions name all three
    assert txt["all"] == 1.0 and txt["count"] == 40 and txt["missing"] == 0
    alt = stored_caption_accuracy(str(tmp_path), "json.alt_text")  # terse alt-text never names the position
    assert alt["position"] == 0.0 and alt["count"] + alt["missing"] == 40
    assert stored_caption_accuracy(str(tmp_path), "dsc")["missing"] == 40
    from t2i_train.cli.caption_accuracy import main

    with pytest.raises(SystemExit) as stop:
        main([f"shards={tmp_path}", "caption_key=dsc"])
    assert stop.value.code != 0
