"""The sampling library: labelled grids (size, nearest upscale, prompt text), sample folders (native files, the
grid beside them), capability checks (interpolate, CLIP scorer), one ``pick_device``, and the training callback's
grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from t2i_train.devices import pick_device
from t2i_train.errors import ConfigError
from t2i_train.sampling import (
    GRID_PADDING,
    interpolate_to_dir,
    labelled_grid,
    own_clip_scorer,
    pick_scorer,
    sample_to_dir,
    save_grid,
    upscale_factor,
)

BACKGROUND = 255


def _images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _quantised(images: torch.Tensor) -> np.ndarray:
    """[N,H,W,3] uint8 as ``save_image`` writes the images."""
    return images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _hwc(grid: torch.Tensor) -> np.ndarray:
    return grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_grid_size_for_row_labels_and_cell_labels() -> None:
    # 2 prompts x 3 images: one label per row, written beside it in a 2*cell wide column
    grid = labelled_grid(_images(6), ["a red circle"] * 3 + ["a blue square"] * 3, columns=3, cell=32)
    pad, cell = GRID_PADDING, 32
    assert grid.shape == (3, pad + 2 * (cell + pad), 2 * cell + pad + 3 * (cell + pad))
    # different prompts in one row: each image is labelled above itself, the grid is no wider than the images
    grid = labelled_grid(_images(3), ["one", "two", "three"], columns=3, cell=32)
    assert grid.shape[2] == pad + 3 * (cell + pad)
    assert grid.shape[1] > pad + cell + pad


def test_nearest_upscale_is_exact() -> None:
    images = _images(2, size=8)
    grid = labelled_grid(images, ["x", "x"], columns=2, cell=32, label_width=40)
    assert upscale_factor(8, 8, 32) == 4
    pixels, source = _hwc(grid), _quantised(images)
    for i in range(2):
        x0, y0 = 40 + GRID_PADDING + i * (32 + GRID_PADDING), GRID_PADDING
        cell = pixels[y0 : y0 + 32, x0 : x0 + 32]
        blocks = cell.reshape(8, 4, 8, 4, 3)
        assert (blocks == blocks[:, :1, :, :1]).all()  # every 4x4 block is one colour
        assert (blocks[:, 0, :, 0] == source[i]).all()  # ... the colour of the source pixel


def test_large_images_are_not_shrunk() -> None:
    assert upscale_factor(256, 256, 128) == 1
    assert upscale_factor(32, 48, 128) == 2


def test_prompt_text_is_drawn_in_the_label_area() -> None:
    images = torch.zeros(2, 3, 8, 8)
    grid = _hwc(
        labelled_grid(images, ["a red circle in the top left", ""], columns=1, cell=32, label_width=120)
    )
    row_h = 32 + GRID_PADDING
    label_area = grid[:, :120]
    first, second = label_area[GRID_PADDING : GRID_PADDING + 32], label_area[GRID_PADDING + row_h :]
    assert (first != BACKGROUND).any(axis=-1).sum() > 20  # the prompt's glyphs
    assert not (second != BACKGROUND).any()  # an empty label draws nothing
    above = _hwc(labelled_grid(images, ["first prompt", "second prompt"], columns=2, cell=32))
    text_band = above[GRID_PADDING : GRID_PADDING + 8]
    assert (text_band != BACKGROUND).any(axis=-1).sum() > 10


def test_long_prompts_wrap_and_stay_in_their_column() -> None:
    long = "a very long prompt " * 20
    grid = _hwc(labelled_grid(torch.zeros(1, 3, 8, 8), [long], columns=1, cell=64, label_width=100))
    label_area = grid[:, :100]
    rows_with_ink = np.nonzero((label_area != BACKGROUND).any(axis=(1, 2)))[0]
    assert rows_with_ink.max() - rows_with_ink.min() > 20  # more than one line
    assert rows_with_ink.max() < grid.shape[0]  # cut to the row, not past it


def test_grid_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        labelled_grid(_images(3), ["a", "b"], columns=3)


def test_save_grid_is_pixel_exact(tmp_path: Path) -> None:
    grid = labelled_grid(_images(2), ["a", "a"], columns=2, cell=16)
    save_grid(grid, tmp_path / "grid.png")
    assert (np.asarray(Image.open(tmp_path / "grid.png")) == _hwc(grid)).all()


class FakeGenerator(torch.nn.Module):
    """Generates images that depend on the generator only; can generate, nothing else."""

    family_name = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def can(self, capability: str) -> bool:
        return capability == "generate"

    def generate(self, prompts: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(len(prompts), 3, 8, 8, generator=generator)


def test_sample_folder_keeps_native_files_and_labels_the_grid(tmp_path: Path) -> None:
    model = FakeGenerator()
    prompts = ["a red circle", "a blue square"]
    manifest = sample_to_dir(
        model, prompts, tmp_path, images_per_prompt=2, seed=3, batch_size=3, grid_cell=32
    )
    assert [line["file"] for line in manifest] == ["0.png", "1.png", "2.png", "3.png"]
    # each file is the generated image as save_image writes it: 8x8, byte-identical to writing it directly
    expected = torch.cat(
        [
            model.generate(["p"] * 3, generator=torch.Generator().manual_seed(3)),
            model.generate(["p"], generator=torch.Generator().manual_seed(6)),
        ]
    )
    for n, image in enumerate(expected):
        save_image(image, tmp_path / "expected.png")
        assert (tmp_path / f"{n}.png").read_bytes() == (tmp_path / "expected.png").read_bytes()
        assert Image.open(tmp_path / f"{n}.png").size == (8, 8)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    side = 2 * 32
    assert grid.shape == (
        GRID_PADDING + 2 * (32 + GRID_PADDING),
        side + GRID_PADDING + 2 * (32 + GRID_PADDING),
        3,
    )
    x0, y0 = side + GRID_PADDING, GRID_PADDING
    first = grid[y0 : y0 + 32 : 4, x0 : x0 + 32 : 4]
    assert (first == np.asarray(Image.open(tmp_path / "0.png"))).all()
    assert (grid[:, :side] != BACKGROUND).any()  # the prompts
    lines = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["a red circle"] * 2 + ["a blue square"] * 2


def test_interpolation_needs_the_capability(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a model that can interpolate; model=fake can: generate"):
        interpolate_to_dir(FakeGenerator(), ["a", "b"], tmp_path, "z", 4)


class FakeInterpolator(FakeGenerator):
    def can(self, capability: str) -> bool:
        return capability in ("generate", "interpolate")

    def interpolate(
        self, prompt_a: str, prompt_b: str | None, mode: str, steps: int, seed: int
    ) -> torch.Tensor:
        return torch.rand(steps, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_interpolation_strips_stay_native_and_the_grid_is_labelled(tmp_path: Path) -> None:
    manifest = interpolate_to_dir(FakeInterpolator(), ["a", "b"], tmp_path, "text", 3, seed=1)
    assert manifest == [
        {"prompt": "a", "file": "strip_0.png", "seed": 1, "mode": "text", "steps": 3, "prompt_b": "b"}
    ]
    assert Image.open(tmp_path / "strip_0.png").size == (3 * 8 + 4, 8 + 2)  # make_grid, padding 1
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[0] >= 128 and (grid[:, :256] != BACKGROUND).any()


class FakeScorerSource(FakeGenerator):
    def can(self, capability: str) -> bool:
        return capability in ("generate", "clip_scorer")

    def clip_scorer(self) -> str:
        return "the family's CLIP"


def test_the_scorer_is_asked_for_not_guessed() -> None:
    device = torch.device("cpu")
    assert pick_scorer(None, FakeScorerSource(), device) == "the family's CLIP"
    with pytest.raises(ConfigError, match="model=fake exposes no CLIP scorer"):
        pick_scorer(None, FakeGenerator(), device)
    holder = FakeGenerator()
    holder.clip = torch.nn.Identity()  # a part named clip is not a scorer: only clip_scorer() is asked
    assert own_clip_scorer(holder) is None


def test_pick_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device(torch.device("cpu")) == torch.device("cpu")


class FakeReconstructor(torch.nn.Module):
    family_name = "fake_vq"

    def can(self, capability: str) -> bool:
        return capability == "reconstruct"

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return -images


class FakeTask:
    def __init__(self, model: Any) -> None:
        self.model, self.device = model, torch.device("cpu")

    def sample_images(self, prompts: list[str], generator: torch.Generator, **sampling: Any) -> torch.Tensor:
        return self.model.generate(prompts, generator=generator)


def test_training_callback_draws_labelled_grids(tmp_path: Path) -> None:
    from t2i_train.callbacks.samples import SampleGrid

    callback = SampleGrid(str(tmp_path), prompts=["a red circle", "a blue square"], grid_cell=32)
    grid = callback.make(FakeTask(FakeGenerator()))
    assert grid is not None and grid.shape[2] == GRID_PADDING + 2 * (32 + GRID_PADDING)
    assert (_hwc(grid)[GRID_PADDING : GRID_PADDING + 8] != BACKGROUND).any()  # prompts above the images
    callback._fixed_images = torch.zeros(3, 3, 8, 8)
    grid = callback.make(FakeTask(FakeReconstructor()))
    assert grid is not None and grid.shape[1] == GRID_PADDING + 2 * (
        32 + GRID_PADDING
    )  # inputs, reconstructions
    callback._fixed_images = None
    assert callback.make(FakeTask(FakeReconstructor())) is None
