"""data.collate: the default batch, PaddingCollate (sequences + masks, neighbour lists), and bad configs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from t2i_train.data.collate import DefaultCollate, PaddingCollate, build_collate
from t2i_train.data.datamodule import ShardDataModule
from t2i_train.data.shards import ShardWriter, encode_image
from t2i_train.errors import ConfigError, DataError
from tests.helpers import assert_one_line_error, compose_train, run_cli

SIZE = 8
N = 24


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def tokens_of(i: int) -> np.ndarray:
    """Sample i's token sequence: 1 + i % 7 ids, 100 * i + position (no 0, the pad value)."""
    return np.arange(1 + i % 7, dtype=np.int64) + 100 * i + 1


def neighbours_of(i: int) -> list[list[int]]:
    """Sample i's retrieved neighbours: i % 3 token lists, of lengths 1, 2."""
    return [[i] + [7] * k for k in range(i % 3)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N samples with a variable-length ``tokens.npy`` and ``neighbours`` in their JSON, 2 shards."""
    out = tmp_path_factory.mktemp("collate")
    png = encode_image(Image.new("RGB", (SIZE, SIZE), (10, 200, 30)), "png")
    with ShardWriter(out, samples_per_shard=N // 2) as writer:
        for i in range(N):
            writer.write(
                {
                    "png": png,
                    "txt": f"caption {i}",
                    "json": {"index": i, "neighbours": neighbours_of(i)},
                    "tokens.npy": npy(tokens_of(i)),
                }
            )
    return out


def sample(i: int, **fields: Any) -> dict[str, Any]:
    return {
        "caption": f"c{i}",
        "meta": {"index": i},
        "key": f"{i:03d}",
        "caption_source": "txt",
        "image": np.full((SIZE, SIZE, 3), 255, dtype=np.uint8),
        "fields": fields,
    }


# ---------------------------------------------------------------------------------------------- default
def test_default_collate_stacks_images_and_equal_fields() -> None:
    batch = DefaultCollate()([sample(i, latents=np.full((4, 2, 2), i, dtype=np.float32)) for i in range(3)])
    assert batch["caption"] == ["c0", "c1", "c2"] and batch["key"] == ["000", "001", "002"]
    assert batch["image"].shape == (3, 3, SIZE, SIZE) and torch.all(batch["image"] == 1.0)
    assert batch["latents"].shape == (3, 4, 2, 2) and batch["latents"][2].eq(2).all()


def test_default_collate_names_the_fix_for_ragged_fields() -> None:
    with pytest.raises(DataError, match=r"'tokens' has different shapes.*PaddingCollate"):
        DefaultCollate()([sample(0, tokens=np.arange(3)), sample(1, tokens=np.arange(5))])


# ------------------------------------------------------------------------------------------------ padding
def test_padding_collate_pads_to_a_multiple_with_a_mask() -> None:
    collate = PaddingCollate(sequences=["tokens"], pad_value=-1, pad_to_multiple_of=4)
    samples = [sample(i, tokens=tokens_of(i), latents=np.zeros(2, np.float32)) for i in (0, 5, 2)]
    batch = collate(samples)
    assert batch["tokens"].shape == (3, 8) and batch["tokens"].dtype == torch.int64  # longest 6 -> 8
    assert batch["tokens_mask"].dtype == torch.bool
    assert batch["tokens_mask"].sum(1).tolist() == [1, 6, 3]
    for row, i in enumerate((0, 5, 2)):
        n = len(tokens_of(i))
        assert batch["tokens"][row, :n].tolist() == tokens_of(i).tolist()
        assert batch["tokens"][row, n:].eq(-1).all() and not batch["tokens_mask"][row, n:].any()
    assert batch["latents"].shape == (3, 2)  # other fields: the default stacking
    assert batch["image"].shape == (3, 3, SIZE, SIZE)


def test_left_padding_and_max_length() -> None:
    collate = PaddingCollate(sequences=["tokens"], padding_side="left", max_length=4, pad_to_multiple_of=2)
    batch = collate([sample(0, tokens=np.arange(1, 7)), sample(1, tokens=np.arange(1, 2))])
    assert batch["tokens"].tolist() == [[3, 4, 5, 6], [0, 0, 0, 1]]  # left: the last 4 kept
    assert batch["tokens_mask"].tolist() == [[True] * 4, [False, False, False, True]]


def test_embedding_sequences_keep_their_width() -> None:
    batch = PaddingCollate(sequences=["emb"])(
        [sample(0, emb=np.ones((2, 5))), sample(1, emb=np.ones((3, 5)))]
    )
    assert batch["emb"].shape == (2, 3, 5) and batch["emb"][0, 2].eq(0).all()
    with pytest.raises(DataError, match="differ beyond their length"):
        PaddingCollate(sequences=["emb"])([sample(0, emb=np.ones((2, 5))), sample(1, emb=np.ones((2, 4)))])


def test_neighbours_padded_or_kept_as_lists() -> None:
    samples = [sample(i) | {"meta": {"nb": neighbours_of(i)}} for i in (2, 0, 1)]
    batch = PaddingCollate(neighbours=["json.nb"], pad_value=-1)(samples)
    assert batch["nb"].shape == (3, 2, 2) and batch["nb_mask"].shape == (3, 2, 2)  # K = 2, L = 2
    assert batch["nb"][0].tolist() == [[2, -1], [2, 7]]
    assert batch["nb_mask"][0].tolist() == [[True, False], [True, True]]
    assert not batch["nb_mask"][1].any()  # no neighbours
    assert batch["nb_mask"][2].tolist() == [[True, False], [False, False]]
    kept = PaddingCollate(neighbours=["json.nb"], pad_neighbours=False)(samples)["nb"]
    assert [len(row) for row in kept] == [2, 0, 1] and kept[0][1].tolist() == [2, 7]


def test_a_missing_field_is_a_data_error() -> None:
    with pytest.raises(DataError, match="has no field 'tokens'"):
        PaddingCollate(sequences=["tokens"])([sample(0)])


# --------------------------------------------------------------------------------------- the data module
def datamodule(shards: Path, collate: Any, **kwargs: Any) -> ShardDataModule:
    options: dict[str, Any] = {"batch_size": 5, "num_workers": 0, "image_size": SIZE, "shuffle_buffer": 8}
    dm = ShardDataModule(train_urls=str(shards), fields=["tokens"], collate=collate, **{**options, **kwargs})
    dm.setup("fit")
    return dm


def check_padded(batch: dict[str, Any], multiple: int) -> None:
    indices = [m["index"] for m in batch["meta"]]
    lengths = [len(tokens_of(i)) for i in indices]
    assert batch["tokens"].shape == (len(indices), -(-max(lengths) // multiple) * multiple)
    assert batch["tokens_mask"].sum(1).tolist() == lengths
    for row, i in enumerate(indices):
        assert batch["tokens"][row, : lengths[row]].tolist() == tokens_of(i).tolist()
        assert batch["tokens"][row, lengths[row] :].eq(0).all()
    count = max(len(neighbours_of(i)) for i in indices)
    assert batch["neighbours"].shape[:2] == (len(indices), count)
    for row, i in enumerate(indices):
        for k, nb in enumerate(neighbours_of(i)):
            assert batch["neighbours"][row, k, : len(nb)].tolist() == nb
            assert batch["neighbours_mask"][row, k].sum() == len(nb)
        assert not batch["neighbours_mask"][row, len(neighbours_of(i)) :].any()
    assert "skipped" in batch and "bad_shards" in batch  # the stream's counters, whatever the collate


def test_datamodule_with_the_padding_collate_from_config(shards: Path, tmp_path: Path) -> None:
    """The composed training config, collate overridden on the command line as a user would."""
    cfg = compose_train(
        [
            "data=webdataset",
            f"data.train_urls={shards}",
            f"data.image_size={SIZE}",
            "data.batch_size=5",
            "data.num_workers=0",
            "data.fields=[tokens]",
            "data.collate._target_=t2i_train.data.collate.PaddingCollate",
            "+data.collate.sequences=[tokens]",
            "+data.collate.neighbours=[json.neighbours]",
            "+data.collate.pad_to_multiple_of=4",
            f"run_dir={tmp_path}",
        ]
    )
    dm = instantiate(cfg.data, _convert_="all")
    assert isinstance(dm.collate, PaddingCollate)
    batches = list(dm.train_dataloader())
    assert sum(len(b["key"]) for b in batches) == N
    for batch in batches:
        check_padded(batch, 4)


def test_padding_collate_in_worker_processes(shards: Path) -> None:
    collate = {"_target_": "t2i_train.data.collate.PaddingCollate", "sequences": ["tokens"],
               "neighbours": ["json.neighbours"], "pad_to_multiple_of": 8}  # fmt: skip
    dm = datamodule(shards, collate, num_workers=2)
    batches = list(dm.train_dataloader())
    assert sorted(k for b in batches for k in b["key"]) == [f"{i:09d}" for i in range(N)]
    for batch in batches:
        check_padded(batch, 8)


def test_default_config_keeps_the_default_collate(shards: Path, tmp_path: Path) -> None:
    cfg = compose_train(["data=webdataset", f"data.train_urls={shards}", f"run_dir={tmp_path}"])
    assert cfg.data.collate._target_ == "t2i_train.data.collate.DefaultCollate"
    assert isinstance(build_collate(cfg.data.collate), DefaultCollate)
    assert type(ShardDataModule(train_urls=str(shards)).collate) is DefaultCollate  # no collate given


def test_ragged_fields_with_the_default_collate_stop_with_the_fix(shards: Path) -> None:
    with pytest.raises(DataError, match="PaddingCollate"):
        list(datamodule(shards, None).train_dataloader())


# -------------------------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize(
    "spec, message",
    [
        ({"_target_": "t2i_train.data.collate.NoSuchCollate"}, "data.collate: cannot build"),
        ({"_target_": "t2i_train.data.collate.PaddingCollate", "sequences": ["t"], "pad_to": 8}, "pad_to"),
        ({"_target_": "t2i_train.data.collate.PaddingCollate"}, "pads nothing"),
        (
            {
                "_target_": "t2i_train.data.collate.PaddingCollate",
                "sequences": ["t"],
                "pad_to_multiple_of": 0,
            },
            ">= 1",
        ),
        (
            {
                "_target_": "t2i_train.data.collate.PaddingCollate",
                "sequences": ["t"],
                "max_length": 6,
                "pad_to_multiple_of": 4,
            },
            "multiple of",
        ),
        (
            {"_target_": "t2i_train.data.collate.PaddingCollate", "sequences": ["t"], "padding_side": "up"},
            "right",
        ),
        ({"sequences": ["t"]}, "needs a _target_"),
        ({"_target_": "builtins.list", "_partial_": True}, "must return a dict"),
        ("PaddingCollate", "must be a _target_ node"),
    ],
)
def test_bad_collate_config_is_a_config_error(spec: Any, message: str, shards: Path) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        next(iter(datamodule(shards, spec).train_dataloader()))
    assert "\n" not in str(info.value)


def test_bad_collate_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    proc = run_cli(
        "t2i_train",
        "data.collate._target_=t2i_train.data.collate.PaddingCollate",
        "+data.collate.pad_to_multiple_of=0",
        "+data.collate.sequences=[tokens]",
        f"data.cache_dir={tmp_path}",
        "data.synthetic.count=8",
        "trainer.max_steps=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert_one_line_error(proc, "data.collate.pad_to_multiple_of must be an integer >= 1")
