"""`python -m t2i_train.encode` with a family that can `pre_encode_captions` (GILL's generation target): the
fields are the encoder's output for the caption `caption_keys` picks, samples without one are counted, a shard
without any stops the run with one line, and the image-only path is what it was."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_train.cli.encode import main
from t2i_train.data.encode import caption_key_list, encode_model
from t2i_train.data.shards import ShardWriter, encode_image
from t2i_train.errors import ConfigError, DataError
from t2i_train.models.base import Family
from t2i_train.text.t5 import T5TextEncoder

SIZE = 8
TARGET_LENGTH = 24
#: sample index -> (txt, json.descriptive); None: that caption is absent
CAPTIONS: list[tuple[str | None, str | None]] = [
    ("a red circle", "a small red circle in the top left corner"),
    ("a blue square", None),
    (None, "a green triangle in the centre"),
    (None, None),
    ("a red square", "a large red square at the bottom"),
    (None, None),
]


class CaptionTarget(Family):
    """Test family: GILL's generation target, the tiny T5 of conf/model/diffusion.yaml padded to a fixed length."""

    family_name = "caption_target"

    def __init__(self) -> None:
        super().__init__()
        self.text_encoder = T5TextEncoder(
            tokenizer="clip_bpe", vocab_size=49408, max_length=TARGET_LENGTH, padding="max_length"
        )
        self.freeze("text_encoder")

    @torch.no_grad()
    def pre_encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        emb, mask = self.text_encoder(captions)
        return {"gen_target_emb": emb, "gen_target_mask": mask}


class MeanColour(Family):
    """Test family with image fields only (the VQGAN/VAE/CLIP path)."""

    family_name = "mean_colour"

    @torch.no_grad()
    def pre_encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mean_rgb": images.mean(dim=(2, 3))}


class Both(CaptionTarget):
    family_name = "both"
    pre_encode = MeanColour.pre_encode


class Neither(Family):
    family_name = "neither"


@pytest.fixture(scope="module")
def target() -> CaptionTarget:
    return CaptionTarget().eval()


def image(colour: tuple[int, int, int]) -> bytes:
    return encode_image(Image.new("RGB", (SIZE, SIZE), colour), "png")


def write_shard(folder: Path, captions: list[tuple[str | None, str | None]], prefix: str = "shard") -> Path:
    """One shard; every sample has a JSON, with ``descriptive`` only where given; sample 0's image is garbage."""
    with ShardWriter(folder, samples_per_shard=len(captions), prefix=prefix) as writer:
        for i, (txt, descriptive) in enumerate(captions):
            sample: dict[str, object] = {
                "png": b"garbage" if i == 0 else image((40 * i, 0, 0)),
                "json": {"index": i, **({"descriptive": descriptive} if descriptive else {})},
            }
            if txt is not None:
                sample["txt"] = txt
            writer.write(sample)
    return folder


def members(folder: Path) -> dict[str, bytes]:
    (path,) = sorted(folder.glob("*.tar"))
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def stored_keys(stored: dict[str, bytes]) -> list[str]:
    return sorted({name.split(".", 1)[0] for name in stored})


def test_fields_are_the_encoders_output_for_the_caption_caption_keys_picks(
    target: CaptionTarget, tmp_path: Path
) -> None:
    src = write_shard(tmp_path / "src", CAPTIONS)
    for keys, pick in (("json.descriptive,txt", lambda t, d: d or t), (["txt"], lambda t, d: t)):
        out = tmp_path / f"out_{len(keys)}"
        result = encode_model(target, str(src), str(out), caption_keys=keys, device="cpu", batch_size=4)
        stored = members(out)
        expected = {f"{i:09d}": pick(t, d) for i, (t, d) in enumerate(CAPTIONS) if pick(t, d)}
        # caption-only: no image is decoded, so the garbage image of sample 0 is kept
        assert stored_keys(stored) == sorted(expected) and result["samples"] == len(expected)
        for key, caption in expected.items():
            emb, mask = target.text_encoder([caption])
            assert np.array_equal(npy(stored[f"{key}.gen_target_emb.npy"]), emb[0].numpy())
            assert np.array_equal(npy(stored[f"{key}.gen_target_mask.npy"]), mask[0].numpy())
        assert result["fields"] == {
            "gen_target_emb": {"dtype": "float32", "shape": [TARGET_LENGTH, 64]},
            "gen_target_mask": {"dtype": "bool", "shape": [TARGET_LENGTH]},
        }
        recorded = json.loads((out / "encoded.json").read_text())
        assert recorded["caption_keys"] == caption_key_list(keys) and recorded["image_size"] is None
        assert recorded["caption_fields"] == ["gen_target_emb", "gen_target_mask"]
        original = members(src)  # every original member of a kept sample is kept, unchanged
        assert all(stored[k] == v for k, v in original.items() if k.split(".", 1)[0] in expected)


def test_samples_without_a_caption_are_dropped_and_counted(target: CaptionTarget, tmp_path: Path) -> None:
    src = write_shard(tmp_path / "src", CAPTIONS)
    result = encode_model(
        target, str(src), str(tmp_path / "out"), caption_keys="[json.descriptive]", device="cpu"
    )
    missing = [f"{i:09d}" for i, (_, d) in enumerate(CAPTIONS) if d is None]
    assert result["no_caption"] == result["dropped"] == len(missing) == 3
    assert result["no_caption_keys"] == missing
    assert not set(missing) & set(stored_keys(members(tmp_path / "out")))


def test_a_shard_without_any_caption_stops_the_run_with_one_line(
    target: CaptionTarget, tmp_path: Path
) -> None:
    (good,) = write_shard(tmp_path / "src", CAPTIONS).glob("*.tar")
    (bare,) = write_shard(tmp_path / "bare", [(None, None)] * 3, prefix="bare").glob("*.tar")
    inputs = [str(good), str(bare)]
    with pytest.raises(DataError) as info:
        encode_model(target, inputs, str(tmp_path / "out"), caption_keys="json.descriptive,txt", device="cpu")
    message = str(info.value)
    assert "\n" not in message and str(bare) in message and "json.descriptive,txt" in message
    assert "none of its 3 samples has a caption" in message
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar*")) == [good.name]


def test_a_family_may_have_either_capability_or_both_but_not_neither(
    target: CaptionTarget, tmp_path: Path
) -> None:
    src = write_shard(tmp_path / "src", CAPTIONS)
    images = encode_model(MeanColour(), str(src), str(tmp_path / "img"), image_size=SIZE, device="cpu")
    # the image-only path: the summary and encoded.json of before, the undecodable image dropped
    assert not {"caption_keys", "caption_fields", "no_caption"} & set(images)
    assert images["fields"] == {"mean_rgb": {"dtype": "float32", "shape": [3]}} and images["dropped"] == 1
    recorded = json.loads((tmp_path / "img" / "encoded.json").read_text())
    assert set(recorded) == {"checkpoint", "family", "image_size", "resize", "fields"}
    both = Both().eval()
    result = encode_model(both, str(src), str(tmp_path / "both"), image_size=SIZE, device="cpu")
    stored = members(tmp_path / "both")
    kept = [f"{i:09d}" for i, (t, _) in enumerate(CAPTIONS) if t is not None and i != 0]
    assert stored_keys(stored) == kept and result["no_caption"] == 3 and result["dropped"] == 4
    for key in kept:
        assert {f"{key}.mean_rgb.npy", f"{key}.gen_target_emb.npy", f"{key}.gen_target_mask.npy"} <= set(
            stored
        )
    with pytest.raises(
        ConfigError, match=r"needs a model that can pre_encode or pre_encode_captions; model=neither"
    ):
        encode_model(Neither(), str(src), str(tmp_path / "none"), image_size=SIZE, device="cpu")
    with pytest.raises(ConfigError, match="image_size"):
        encode_model(MeanColour(), str(src), str(tmp_path / "nosize"), device="cpu")


def test_the_cli_takes_caption_keys_as_a_list_or_a_comma_string(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr("t2i_train.cli.encode.encode", lambda **args: seen.update(args) or {})
    main(["checkpoint=c", "input_urls=s", "output_dir=o", "caption_keys=json.descriptive,txt"])
    assert seen["caption_keys"] == "json.descriptive,txt"
    assert caption_key_list("json.descriptive,txt") == ["json.descriptive", "txt"]
    assert caption_key_list("[json.descriptive, txt]") == caption_key_list(["json.descriptive", "txt"])
    with pytest.raises(ConfigError, match="caption_keys"):
        caption_key_list("[]")
