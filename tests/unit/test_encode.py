"""Pre-encoding shards (`t2i_train.encode`): the shard-to-shard map, its restart/atomic/rank contract, and
reading the encoded fields back through the data module."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from t2i_train.data.datamodule import ShardDataModule
from t2i_train.data.encode import PreEncode
from t2i_train.data.shard_map import copy_sidecars, map_shards
from t2i_train.data.shards import ShardWriter, write_synthetic_shards
from t2i_train.errors import ConfigError, DataError
from t2i_train.models.vqgan import VQGAN

SIZE = 16


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "shapes"
    write_synthetic_shards(out, count=120, size=SIZE, seed=3, samples_per_shard=40, progress=False)
    return out


@pytest.fixture(scope="module")
def vqgan() -> VQGAN:
    torch.manual_seed(0)
    model = VQGAN(
        base_channels=8, channel_mult=[1, 2, 2], z_channels=8, codebook_size=16, codebook_dim=4, norm_groups=4
    )
    return model.eval()


def shards_of(folder: Path) -> list[str]:
    return [str(p) for p in sorted(folder.glob("*.tar"))]


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def encoder(model: VQGAN) -> PreEncode:
    return PreEncode(model, SIZE, "center_crop", torch.device("cpu"))


def test_output_keeps_every_member_and_adds_the_tokens_of_the_decoded_image(
    shapes: Path, vqgan: VQGAN, tmp_path: Path
) -> None:
    summary = map_shards(shards_of(shapes), tmp_path, encoder(vqgan), batch_size=16, progress=False)
    assert summary.samples == 120 and summary.dropped == 0 and len(summary.written) == 3
    for shard in shards_of(shapes):
        before, after = members(Path(shard)), members(tmp_path / Path(shard).name)
        assert {k: v for k, v in after.items() if not k.endswith(".image_tokens.npy")} == before
        assert len(after) - len(before) == 40
    # the stored tokens are the tokenizer's indices for the images the data module would feed it
    dm = ShardDataModule(train_urls=shards_of(shapes)[0], batch_size=40, num_workers=0, image_size=SIZE)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    stored = members(tmp_path / Path(shards_of(shapes)[0]).name)
    for i, key in enumerate(batch["key"][:5]):
        after_tokens = np.load(io.BytesIO(stored[f"{key}.image_tokens.npy"]))
        assert after_tokens.dtype == np.int16 and after_tokens.shape == (4, 4)
        expected = vqgan.encode_to_indices(batch["image"][i : i + 1])[0]
        assert torch.equal(torch.from_numpy(after_tokens).long(), expected)


def test_datamodule_reads_fields_without_decoding_images(shapes: Path, vqgan: VQGAN, tmp_path: Path) -> None:
    map_shards(shards_of(shapes), tmp_path, encoder(vqgan), progress=False)
    dm = ShardDataModule(
        train_urls=str(tmp_path),
        batch_size=8,
        num_workers=0,
        image_size=SIZE,
        fields=["image_tokens"],
        load_images=False,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "image" not in batch and batch["image_tokens"].shape == (8, 4, 4)
    assert len(batch["caption"]) == 8
    # un-encoded shards: every sample lacks the field, so the shard is reported, not skipped silently
    plain = ShardDataModule(
        train_urls=str(shapes), batch_size=8, num_workers=0, image_size=SIZE, fields=["image_tokens"]
    )
    plain.setup("fit")
    with pytest.raises(DataError, match=r"image_tokens\.npy"):
        next(iter(plain.train_dataloader()))
    with pytest.raises(ConfigError, match="load_images"):
        ShardDataModule(train_urls=str(shapes), load_images=False)


def test_rerun_skips_finished_shards_and_ranks_split_the_work(
    shapes: Path, vqgan: VQGAN, tmp_path: Path
) -> None:
    shards = shards_of(shapes)
    first = map_shards(shards, tmp_path, encoder(vqgan), rank=0, world_size=2, progress=False)
    second = map_shards(shards, tmp_path, encoder(vqgan), rank=1, world_size=2, progress=False)
    assert {p.name for p in first.written} | {p.name for p in second.written} == {
        Path(s).name for s in shards
    }
    assert not {p.name for p in first.written} & {p.name for p in second.written}
    again = map_shards(shards, tmp_path, encoder(vqgan), progress=False)
    assert again.written == [] and len(again.skipped_existing) == 3


def test_a_failure_mid_shard_leaves_no_partial_output(shapes: Path, vqgan: VQGAN, tmp_path: Path) -> None:
    calls = {"n": 0}
    inner = encoder(vqgan)

    def flaky(batch: list[dict[str, Any]]) -> list[Any]:
        calls["n"] += 1
        if calls["n"] == 4:  # second batch of the second shard
            raise KeyboardInterrupt
        return inner(batch)

    with pytest.raises(KeyboardInterrupt):
        map_shards(shards_of(shapes), tmp_path, flaky, batch_size=20, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(shards_of(shapes)[0]).name]
    resumed = map_shards(shards_of(shapes), tmp_path, inner, batch_size=20, progress=False)
    assert len(resumed.skipped_existing) == 1 and len(resumed.written) == 2


def test_corrupt_samples_are_dropped_and_counted_and_a_dead_shard_stops_the_run(
    vqgan: VQGAN, tmp_path: Path
) -> None:
    from PIL import Image

    from t2i_train.data.shards import encode_image

    good = encode_image(Image.new("RGB", (SIZE, SIZE), (200, 0, 0)), "png")
    src = tmp_path / "src"
    with ShardWriter(src, samples_per_shard=10) as writer:
        for i in range(10):
            writer.write({"png": b"garbage" if i in (2, 5) else good, "txt": f"sample {i}"})
    summary = map_shards(shards_of(src), tmp_path / "out", encoder(vqgan), progress=False)
    assert summary.samples == 8 and summary.dropped == 2
    bad = tmp_path / "bad"
    with ShardWriter(bad, samples_per_shard=3) as writer:
        for _ in range(3):
            writer.write({"png": b"garbage", "txt": "x"})
    with pytest.raises(DataError, match="no usable samples"):
        map_shards(shards_of(bad), tmp_path / "out2", encoder(vqgan), progress=False)
    assert not list((tmp_path / "out2").iterdir())
    with pytest.raises(DataError, match="output_dir"):
        map_shards(shards_of(src), src, encoder(vqgan), progress=False)


def test_sidecars_are_copied_once(shapes: Path, tmp_path: Path) -> None:
    copied = copy_sidecars(shards_of(shapes), tmp_path)
    assert {p.name for p in copied} >= {"dataset.json", "prompts_seen.txt"}
    assert copy_sidecars(shards_of(shapes), tmp_path) == []
