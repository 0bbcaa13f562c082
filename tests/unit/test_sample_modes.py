"""Sampling modes (t2i_train.sampling: mode=generate|retrieve|auto): images read back from the shards a
retrieval index names (``read_shard_image``), the checks that refuse a mode in one line, and the folders written
in each mode (files as stored, manifest fields, grid) by fake families over real shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from t2i_train.cli.common import CONF_DIR
from t2i_train.cli.sample import check_sample_options
from t2i_train.data.shards import write_synthetic_shards
from t2i_train.errors import ConfigError, DataError
from t2i_train.retrieval import RetrievalHit
from t2i_train.sampling import (
    add_clip_scores,
    check_mode,
    grid_images,
    read_shard_image,
    read_shard_images,
    sample_to_dir,
)

SIZE = 16  # stored image size; the fakes below generate 8x8 images
NO_GENERATOR = "this fake has no image generator: set model.generator_checkpoint=<a diffusion checkpoint>"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("bank")
    write_synthetic_shards(out, count=6, size=SIZE, seed=2, samples_per_shard=3, progress=False)
    return sorted(out.glob("*.tar"))


def stored(shard: Path) -> dict[str, np.ndarray]:
    """key -> the pixels of its PNG member, read with tarfile and PIL directly."""
    with tarfile.open(shard) as tar:
        return {
            m.name.split(".")[0]: np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
            for m in tar.getmembers()
            if m.name.endswith(".png")
        }


def bank(shards: list[Path]) -> list[tuple[str, str]]:
    return [(key, str(shard)) for shard in shards for key in sorted(stored(shard))]


# ------------------------------------------------------------------------------------------------ shards
def test_read_shard_image_is_the_stored_image_unresized(shards: list[Path]) -> None:
    expected = stored(shards[1])
    key = sorted(expected)[2]
    image = read_shard_image(str(shards[1]), key)
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    assert (np.asarray(image) == expected[key]).all()
    several = read_shard_images(str(shards[1]), sorted(expected))
    assert all((np.asarray(several[k]) == expected[k]).all() for k in expected)


def test_a_moved_shard_or_a_missing_key_is_one_data_error(shards: list[Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"shard .*gone\.tar does not exist; .*rebuild it"):
        read_shard_image(str(tmp_path / "gone.tar"), "000000000")
    with pytest.raises(DataError, match=r"holds no sample '999' \(1 of 2 keys missing\)"):
        read_shard_images(str(shards[0]), ["999", sorted(stored(shards[0]))[0]])


def test_an_undecodable_stored_image_is_one_data_error(tmp_path: Path) -> None:
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in {"k1.png": b"not a png", "k1.txt": b"a caption", "k2.txt": b"no image"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"sample k1: its png does not decode"):
        read_shard_image(str(shard), "k1")
    with pytest.raises(DataError, match=r"sample k2: no image"):
        read_shard_image(str(shard), "k2")


# ------------------------------------------------------------------------------------------------ fakes
class FakeFamily(torch.nn.Module):
    """Generates 8x8 noise (``generator``-seeded), retrieves from ``bank`` in order (scores 1, 0.9, ...),
    decides ``generate`` for prompts holding "draw"; ``capabilities`` and ``has_generator`` say which it can."""

    family_name = "fake"

    def __init__(
        self,
        bank: list[tuple[str, str]],
        capabilities: tuple[str, ...] = ("generate", "retrieve", "decide"),
        has_generator: bool = True,
    ) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.bank, self.capabilities, self.has_generator = bank, capabilities, has_generator
        self.generated: list[str] = []

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def available(self, capability: str) -> bool:
        return self.can(capability) and (capability != "generate" or self.has_generator)

    def generate(self, prompts: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.has_generator:
            raise ConfigError(NO_GENERATOR)
        self.generated += prompts
        return torch.rand(len(prompts), 3, 8, 8, generator=generator)

    def retrieve(self, prompts: list[str], k: int = 1, index: str | None = None) -> list[list[RetrievalHit]]:
        offset = {p: 2 * n for n, p in enumerate(prompts)}
        return [
            [
                RetrievalHit(key, shard, 1.0 - 0.1 * r, row)
                for r, (row, (key, shard)) in enumerate(list(enumerate(self.bank))[offset[p] : offset[p] + k])
            ]
            for p in prompts
        ]

    def decide(self, prompts: list[str]) -> list[str]:
        return ["generate" if "draw" in p else "retrieve" for p in prompts]


def lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ checks
@pytest.mark.parametrize(
    ("capabilities", "mode", "index", "message"),
    [
        (
            ("generate", "retrieve"),
            "fetch",
            "ix",
            "mode must be one of generate, retrieve, auto, got 'fetch'",
        ),
        (
            ("generate", "retrieve"),
            "retrieve",
            None,
            "mode=retrieve needs index=DIR (build one with python -m t2i_train.index checkpoint=... urls=... "
            "output=DIR)",
        ),
        (
            ("generate",),
            "retrieve",
            "ix",
            "mode=retrieve needs a model that can retrieve; model=fake can: generate",
        ),
        (("generate", "retrieve"), "auto", "ix", "mode=auto needs a model that can decide; model=fake can: "),
        (
            ("retrieve",),
            "generate",
            None,
            "mode=generate needs a model that can generate; model=fake can: retrieve",
        ),
    ],
)
def test_a_mode_the_model_cannot_sample_in_is_one_line(
    capabilities: tuple[str, ...], mode: str, index: str | None, message: str, tmp_path: Path
) -> None:
    model = FakeFamily([], capabilities)
    with pytest.raises(ConfigError) as caught:
        sample_to_dir(model, ["a"], tmp_path / "out", mode=mode, index=index)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_generate_without_a_generator_gives_the_familys_own_line(tmp_path: Path) -> None:
    model = FakeFamily([], has_generator=False)
    with pytest.raises(ConfigError) as caught:
        check_mode(model, "generate", None)
    assert str(caught.value) == f"mode=generate: {NO_GENERATOR}; or mode=retrieve index=DIR: it can retrieve"


# ------------------------------------------------------------------------------------------------ folders
def test_generated_lines_say_their_source(tmp_path: Path) -> None:
    manifest = sample_to_dir(FakeFamily([]), ["a", "b"], tmp_path, images_per_prompt=2, seed=5, batch_size=3)
    assert [(m["file"], m["batch_seed"], m["source"]) for m in manifest] == [
        ("0.png", 5, "generated"),
        ("1.png", 5, "generated"),
        ("2.png", 5, "generated"),
        ("3.png", 8, "generated"),
    ]
    assert "decision" not in manifest[0] and lines(tmp_path) == manifest


def test_retrieve_writes_the_top_hits_as_stored(shards: list[Path], tmp_path: Path) -> None:
    model = FakeFamily(bank(shards))
    manifest = sample_to_dir(
        model, ["a red circle", "a blue square"], tmp_path, images_per_prompt=2, mode="retrieve", index="ix",
        retrieve_k=3, grid_cell=32,
    )  # fmt: skip
    assert model.generated == [] and lines(tmp_path) == manifest
    assert [m["retrieved_key"] for m in manifest] == [k for k, _ in bank(shards)[:4]]
    assert [m["rank"] for m in manifest] == [0, 1, 0, 1] and manifest[1]["score"] == pytest.approx(0.9)
    assert [h["key"] for h in manifest[3]["hits"]] == [k for k, _ in bank(shards)[2:5]]
    for line in manifest:
        assert line["source"] == "retrieved" and "seed" not in line
        pixels = stored(Path(line["retrieved_shard"]))[line["retrieved_key"]]
        assert (np.asarray(Image.open(tmp_path / line["file"])) == pixels).all()
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    factor = 32 // SIZE  # stored 16 px images, upscaled (nearest) into 32 px cells beside their prompt
    first = grid[2 : 2 + 32 : factor, 2 * 32 + 2 : 2 * 32 + 2 + 32 : factor]
    assert (first == np.asarray(Image.open(tmp_path / "0.png"))).all()


def test_auto_follows_the_decision_per_prompt(shards: list[Path], tmp_path: Path) -> None:
    model = FakeFamily(bank(shards))
    prompts = ["a red circle", "draw a blue square", "a green star"]
    manifest = sample_to_dir(model, prompts, tmp_path, images_per_prompt=2, seed=1, mode="auto", index="ix")
    assert [(m["decision"], m["source"]) for m in manifest] == [
        ("retrieve", "retrieved"),
        ("retrieve", "retrieved"),
        ("generate", "generated"),
        ("generate", "generated"),
        ("retrieve", "retrieved"),
        ("retrieve", "retrieved"),
    ]
    assert model.generated == ["draw a blue square"] * 2 and manifest[2]["batch_seed"] == 1 + 2
    assert Image.open(tmp_path / "2.png").size == (8, 8) and Image.open(tmp_path / "0.png").size == (
        SIZE,
        SIZE,
    )
    assert Image.open(tmp_path / "grid.png").size == (2 * 128 + 2 + 2 * (128 + 2), 2 + 3 * (128 + 2))


def test_auto_picking_generate_without_a_generator_is_one_line_and_writes_nothing(
    shards: list[Path], tmp_path: Path
) -> None:
    model = FakeFamily(bank(shards), has_generator=False)
    sample_to_dir(model, ["a red circle"], tmp_path / "ok", mode="auto", index="ix")  # retrieve only: fine
    with pytest.raises(ConfigError) as caught:
        sample_to_dir(model, ["a", "draw b", "draw c"], tmp_path / "out", mode="auto", index="ix")
    assert str(caught.value) == (
        "mode=auto: the decision head picks generate for 2 of 3 prompts (first: 'draw b'), but "
        f"{NO_GENERATOR}; or sample with mode=retrieve"
    )
    assert not (tmp_path / "out").exists()


def test_an_index_with_fewer_hits_than_images_per_prompt_is_one_line(
    shards: list[Path], tmp_path: Path
) -> None:
    model = FakeFamily(bank(shards)[:2])
    with pytest.raises(ConfigError, match=r"index ix gives 2 images for 'a', fewer than images_per_prompt=3"):
        sample_to_dir(model, ["a"], tmp_path, images_per_prompt=3, mode="retrieve", index="ix")


def test_stored_images_are_fitted_into_the_grid_cell_keeping_their_aspect() -> None:
    wide = Image.new("RGB", (16, 8), (255, 0, 0))  # 2:1, fitted into the generated 8x8: 8x4 on the background
    cells = grid_images([torch.zeros(3, 8, 8), wide], cell=128)
    assert cells.shape == (2, 3, 8, 8) and (cells[0] == 0).all()
    assert (cells[1][:, :2] == 1).all() and (cells[1][:, 6:] == 1).all()
    assert (cells[1][0, 2:6] == 1).all() and (cells[1][1:, 2:6] == 0).all()
    alone = grid_images([Image.new("RGB", (300, 200)), Image.new("RGB", (20, 20))], cell=128)
    assert alone.shape == (2, 3, 128, 128)  # none generated: squares of the largest side, at most the cell


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "fetch"}, "mode must be one of generate, retrieve, auto, got 'fetch'"),
        (
            {"mode": "retrieve"},
            "mode=retrieve needs index=DIR (build one with python -m t2i_train.index checkpoint=... urls=... "
            "output=DIR)",
        ),
        ({"retrieve_k": 0}, "retrieve_k must be a positive integer, got 0"),
        (
            {"mode": "auto", "index": "ix", "interpolate": "z"},
            "interpolate=z draws strips; it takes no mode=auto",
        ),
    ],
)
def test_the_cli_checks_the_mode_before_reading_the_checkpoint(options: dict, message: str) -> None:
    cfg = OmegaConf.load(CONF_DIR / "sample.yaml")
    cfg.pop("defaults")
    with pytest.raises(ConfigError) as caught:
        check_sample_options(OmegaConf.merge(cfg, options))
    assert str(caught.value) == message


class FakeScorer:
    """CLIP-like: an image's embedding is [its side / 100, 1] (normalised), every text's [0, 1]."""

    def __init__(self) -> None:
        self.model = torch.nn.Module()
        self.model.logit_scale = torch.nn.Parameter(torch.zeros(()))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        side = torch.full((len(images),), images.shape[-1] / 100)
        return torch.nn.functional.normalize(torch.stack([side, torch.ones_like(side)], dim=1), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[0.0, 1.0]] * len(texts))


def test_clip_scores_cover_a_folder_of_generated_and_stored_sizes(shards: list[Path], tmp_path: Path) -> None:
    manifest = sample_to_dir(FakeFamily(bank(shards)), ["a", "draw b"], tmp_path, mode="auto", index="ix")
    add_clip_scores(manifest, tmp_path, FakeScorer(), batch_size=4)
    assert [m["clip_score"] for m in lines(tmp_path)] == [
        round(100 / (1 + (SIZE / 100) ** 2) ** 0.5, 4),  # the stored 16 px image
        round(100 / (1 + (8 / 100) ** 2) ** 0.5, 4),  # the generated 8 px one
    ]
