"""ShardDataModule: URL forms, splitting, shuffling, caption blending, corrupt data, synthetic cache."""

from __future__ import annotations

import json
import logging
import re
import tarfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import pytest
import torch
from PIL import Image

from t2i_train.data import datamodule as dm_module
from t2i_train.data.datamodule import SampleDecoder, ShardDataModule, ShardStream, resolve_urls
from t2i_train.data.shards import ShardWriter, encode_image, write_folder_shards, write_synthetic_shards
from t2i_train.errors import DataError

SIZE = 16


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 shapes samples in 4 shards of 100."""
    out = tmp_path_factory.mktemp("dm") / "shapes"
    write_synthetic_shards(out, count=400, size=SIZE, seed=2, samples_per_shard=100, progress=False)
    return out


def module(urls: Any, **kwargs: Any) -> ShardDataModule:
    options: dict[str, Any] = {"batch_size": 32, "num_workers": 0, "image_size": SIZE, "shuffle_buffer": 50}
    dm = ShardDataModule(train_urls=urls, **{**options, **kwargs})
    dm.setup("fit")
    return dm


def epoch(loader: Any) -> list[dict[str, Any]]:
    return list(loader)


def keys_of(batches: list[dict[str, Any]]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def png(colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    return encode_image(Image.new("RGB", (SIZE, SIZE), colour), "png")


def write_shard(
    folder: Path, n: int, bad: set[int] = frozenset(), no_caption: set[int] = frozenset()
) -> Path:
    """A shard of ``n`` plain samples; ``bad`` indices get undecodable image bytes."""
    with ShardWriter(folder, samples_per_shard=n + 1) as writer:
        for i in range(n):
            sample: dict[str, Any] = {"png": b"\x89PNG garbage" if i in bad else png(), "json": {"i": i}}
            if i not in no_caption:
                sample["txt"] = f"sample {i}"
            writer.write(sample)
    return writer.shards[0]


def test_batches_follow_the_shared_convention(shapes: Path) -> None:
    batch = next(iter(module(str(shapes)).train_dataloader()))
    assert set(batch) == {"image", "caption", "meta", "key", "skipped", "bad_shards", "caption_source"}
    image = batch["image"]
    assert image.shape == (32, 3, SIZE, SIZE) and image.dtype == torch.float32
    assert -1.0 <= image.min() < image.max() <= 1.0
    assert batch["skipped"].dtype == torch.long and batch["skipped"].ndim == 0 and int(batch["skipped"]) == 0
    assert batch["bad_shards"] == []
    assert batch["caption_source"] == ["txt"] * 32
    for i, (caption, meta) in enumerate(zip(batch["caption"], batch["meta"])):
        assert caption == meta["caption"] and isinstance(batch["key"][i], str)
        # the shape's colour at its centre, scaled to [-1, 1]
        cx, cy = meta["center"]
        y = int(cy + (meta["extent"] / 6 if meta["shape"] == "triangle" else 0))
        expected = torch.tensor(meta["rgb"], dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(image[i, :, y, int(cx)], expected, atol=1e-5)


def test_one_epoch_reads_every_sample_once_in_a_shuffled_order(shapes: Path) -> None:
    keys = keys_of(epoch(module(str(shapes)).train_dataloader()))
    assert sorted(keys) == [f"{i:09d}" for i in range(400)]
    assert keys != sorted(keys)


def test_brace_list_glob_and_directory_urls(shapes: Path) -> None:
    brace = resolve_urls(f"{shapes}/shapes-{{000000..000001}}.tar")
    assert [Path(u).name for u in brace] == ["shapes-000000.tar", "shapes-000001.tar"]
    assert len(keys_of(epoch(module(f"{shapes}/shapes-{{000000..000001}}.tar").train_dataloader()))) == 200
    listed = [str(shapes / "shapes-000002.tar"), str(shapes / "shapes-000003.tar")]
    assert len(keys_of(epoch(module(listed).train_dataloader()))) == 200
    assert len(resolve_urls(f"{shapes}/*.tar")) == 4
    assert resolve_urls(str(shapes)) == sorted(str(p) for p in shapes.glob("*.tar"))


def test_two_workers_see_disjoint_samples(shapes: Path) -> None:
    keys = keys_of(epoch(module(str(shapes), num_workers=2).train_dataloader()))
    assert len(keys) == 400 and len(set(keys)) == 400


def test_ranks_get_disjoint_shards(shapes: Path) -> None:
    urls = resolve_urls(str(shapes))
    seen = []
    for rank in (0, 1):
        stream = ShardStream(urls, SampleDecoder(SIZE), batch_size=10, rank=rank, world_size=2, seed=4)
        seen.append(set(keys_of(list(stream))))
    assert len(seen[0]) == len(seen[1]) == 200 and not seen[0] & seen[1]


def test_epochs_reshuffle_reproducibly(shapes: Path) -> None:
    orders = []
    for _ in range(2):
        loader = module(str(shapes), seed=11).train_dataloader()
        loader.sampler.set_epoch(0)  # what Lightning calls at every epoch start
        first = keys_of(epoch(loader))
        loader.sampler.set_epoch(1)
        orders.append((first, keys_of(epoch(loader))))
    assert orders[0] == orders[1]
    assert orders[0][0] != orders[0][1] and sorted(orders[0][0]) == sorted(orders[0][1])
    other_seed = module(str(shapes), seed=12).train_dataloader()
    other_seed.sampler.set_epoch(0)
    assert keys_of(epoch(other_seed)) != orders[0][0]


def test_resampled_stream_with_fixed_epoch_length(shapes: Path) -> None:
    loader = module(str(shapes), resampled=True, samples_per_epoch=256, batch_size=32).train_dataloader()
    assert len(loader) == 8
    batches = epoch(loader)
    assert len(batches) == 8 and all(len(b["key"]) == 32 for b in batches)


def test_caption_blending_frequencies(shapes: Path) -> None:
    dm = module(
        str(shapes),
        caption_keys=["txt", "json.descriptive"],
        caption_probs=[1, 3],
        samples_per_epoch=2000,
        batch_size=100,
    )
    batches = epoch(dm.train_dataloader())
    sources = Counter(s for b in batches for s in b["caption_source"])
    assert sum(sources.values()) == 2000
    assert abs(sources["json.descriptive"] / 2000 - 0.75) < 0.04
    for b in batches[:3]:
        for caption, source, meta in zip(b["caption"], b["caption_source"], b["meta"]):
            assert caption == (meta["descriptive"] if source == "json.descriptive" else meta["caption"])


def test_json_field_captions_and_fallback_to_next_key(shapes: Path) -> None:
    batch = next(iter(module(str(shapes), caption_keys=["json.descriptive"]).train_dataloader()))
    assert batch["caption"] == [m["descriptive"] for m in batch["meta"]]
    assert batch["caption_source"] == ["json.descriptive"] * 32
    dm = module(str(shapes), caption_keys=["json.no_such_field", "json.alt_text"], caption_probs=[1.0, 0.0])
    batch = next(iter(dm.train_dataloader()))
    assert batch["caption_source"] == ["json.alt_text"] * 32
    assert batch["caption"] == [m["alt_text"] for m in batch["meta"]]


def test_img2dataset_folder_trains_as_it_is(tmp_path: Path) -> None:
    src = tmp_path / "images"
    src.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 30), (30 * i, 80, 200)).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"picture {i}")
    out = tmp_path / "img2dataset"
    write_folder_shards(
        src, out, naming="img2dataset", image_format="jpg", samples_per_shard=4, progress=False
    )
    pd.DataFrame({"key": ["000000000"], "status": ["success"]}).to_parquet(out / "00000.parquet")
    (out / "00000_stats.json").write_text(json.dumps({"count": 4, "successes": 4}))
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "00001.tar",
        "00001_stats.json",
    ]
    dm = module(str(out), batch_size=4)
    batches = epoch(dm.train_dataloader())
    assert sorted(c for b in batches for c in b["caption"]) == [f"picture {i}" for i in range(6)]
    assert batches[0]["image"].shape[-2:] == (SIZE, SIZE)
    assert dm.dataset_dir == out
    assert dm.sample_prompts() == [f"picture {i}" for i in range(4)]  # captions of the first shard


def test_corrupt_samples_are_skipped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_shard(tmp_path, 100, bad={10, 60}, no_caption={30})
    with caplog.at_level(logging.WARNING, logger=dm_module.__name__):
        batches = epoch(module(str(tmp_path), batch_size=16).train_dataloader())
    assert len(keys_of(batches)) == 97
    assert sum(int(b["skipped"]) for b in batches) == 3
    assert "000000010" not in keys_of(batches)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "000000010" in messages and "undecodable image" in messages and "no caption" in messages


def test_too_many_corrupt_samples_stop_with_a_clear_error(tmp_path: Path) -> None:
    write_shard(tmp_path, 100, bad=set(range(0, 100, 10)))
    with pytest.raises(DataError, match=r"of \d+ samples .* raise data.max_skip_rate or fix the shards"):
        epoch(module(str(tmp_path)).train_dataloader())
    # the same error type arrives from a worker process
    loader = module(str(tmp_path), num_workers=1).train_dataloader()
    with pytest.raises(DataError, match="max_skip_rate"):
        epoch(loader)
    loader._iterator._shutdown_workers()  # as Lightning does at teardown (else gc waits ~5 s for it)
    batches = epoch(module(str(tmp_path), max_skip_rate=0.2).train_dataloader())
    assert len(keys_of(batches)) == 90 and sum(int(b["skipped"]) for b in batches) == 10


def test_wholly_corrupt_shard_is_not_skipped_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = write_shard(tmp_path / "good", 60)
    bad = write_shard(tmp_path / "bad", 5, bad=set(range(5)))
    with pytest.raises(DataError, match=r"yielded no usable samples: 5 of 5 samples in it were unreadable"):
        epoch(module([str(good), str(bad)]).train_dataloader())
    not_tar = tmp_path / "junk.tar"
    not_tar.write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(DataError, match=r"not a readable tar file.*set data\.max_bad_shards=N"):
        epoch(module([str(good), str(not_tar)]).train_dataloader())
    with caplog.at_level(logging.WARNING, logger=dm_module.__name__):
        batches = epoch(
            module([str(good), str(bad)], max_bad_shards=-1, max_skip_rate=0.1).train_dataloader()
        )
    assert len(keys_of(batches)) == 60
    assert [u for b in batches for u in b["bad_shards"]] == [str(bad)]
    assert sum(int(b["skipped"]) for b in batches) == 5
    assert any(
        "skipping damaged shard" in r.getMessage() and str(bad) in r.getMessage() for r in caplog.records
    )


def test_missing_or_empty_shards_fail_in_setup(shapes: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope-000000.tar"
    with pytest.raises(DataError, match=re.escape(f"shard {missing} does not exist")):
        module([str(shapes / "shapes-000000.tar"), str(missing)])
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"shard {empty} is empty")):
        module(str(empty))
    empty_tar = tmp_path / "members.tar"
    tarfile.open(empty_tar, "w").close()
    with pytest.raises(DataError, match="is empty"):
        module(str(empty_tar))
    (tmp_path / "no_tars").mkdir()
    with pytest.raises(DataError, match="holds no"):
        module(str(tmp_path / "no_tars"))


def test_pipe_urls_need_allow_pipe(shapes: Path) -> None:
    url = f"pipe:cat {shapes}/shapes-000000.tar"
    with pytest.raises(DataError, match=r"data\.allow_pipe=true"):
        module(url)
    assert len(keys_of(epoch(module(url, allow_pipe=True).train_dataloader()))) == 100


def test_synthetic_set_is_generated_once_into_the_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"count": 120, "size": SIZE, "val_count": 20, "samples_per_shard": 60, "holdout_fraction": 0.1}
    modules = [
        ShardDataModule(
            synthetic=options, cache_dir=str(tmp_path), image_size=SIZE, num_workers=0, batch_size=16
        )
        for _ in range(2)
    ]
    with caplog.at_level(logging.INFO, logger=dm_module.__name__):
        threads = [threading.Thread(target=m.prepare_data) for m in modules]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sum("generating" in r.getMessage() for r in caplog.records) == 1
    root = modules[0].dataset_dir
    assert root is not None and root == modules[1].dataset_dir and root.parent.parent == tmp_path
    assert [p.name for p in root.parent.iterdir() if p.is_dir()] == [root.name]  # no temporaries left
    dm = modules[0]
    dm.setup("fit")
    assert len(keys_of(epoch(dm.train_dataloader()))) == 120
    assert len(keys_of(epoch(dm.val_dataloader()))) == 20
    prompts = dm.sample_prompts()
    assert len(prompts) == 16
    assert prompts[1] in (root / "prompts_heldout.txt").read_text().splitlines()
    assert prompts[0] in (root / "prompts_seen.txt").read_text().splitlines()
    other = ShardDataModule(synthetic={**options, "seed": 1}, cache_dir=str(tmp_path), image_size=SIZE)
    assert other.dataset_dir != root


class _KeyRecorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.keys: list[list[str]] = []

    def on_train_epoch_start(self) -> None:
        self.keys.append([])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.keys[-1].extend(batch["key"])
        return (self.weight * batch["image"].mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_sets_the_epoch_through_persistent_workers(shapes: Path) -> None:
    dm = ShardDataModule(train_urls=str(shapes), num_workers=1, batch_size=50, image_size=SIZE, seed=3)
    model = _KeyRecorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    first, second = model.keys
    assert sorted(first) == sorted(second) and len(first) == 400
    assert first != second
    assert dm._epoch.get() == 1
