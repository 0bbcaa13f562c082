"""Data faults a long run meets: truncated shards, huge images, unreadable shards, SIGTERM to data workers,
too few shards for the processes. Each case must be skipped and counted, or stop with one clear line."""

from __future__ import annotations

import io
import logging
import os
import random
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from t2i_train.data import datamodule as dm_module
from t2i_train.data.datamodule import SampleDecoder, ShardDataModule, ShardStream, expected_samples
from t2i_train.data.shards import ShardWriter, encode_image, write_synthetic_shards
from t2i_train.data.transforms import SkipSample
from t2i_train.errors import ConfigError, DataError

SIZE = 16
ROOT = Path(__file__).resolve().parents[2]


def png(colour: tuple[int, int, int] = (20, 200, 10), size: int = SIZE) -> bytes:
    return encode_image(Image.new("RGB", (size, size), colour), "png")


def write_shard(folder: Path, n: int, images: dict[int, bytes] | None = None) -> Path:
    """One shard of ``n`` samples (and its ``_stats.json``); ``images`` replaces the image of some indices."""
    images = images or {}
    with ShardWriter(folder, samples_per_shard=n) as writer:
        for i in range(n):
            writer.write({"png": images.get(i, png()), "txt": f"sample {i}", "json": {"i": i}})
    return writer.shards[0]


def module(urls: Any, **kwargs: Any) -> ShardDataModule:
    options: dict[str, Any] = {"batch_size": 16, "num_workers": 0, "image_size": SIZE, "shuffle_buffer": 20}
    dm = ShardDataModule(train_urls=urls, **{**options, **kwargs})
    dm.setup("fit")
    return dm


def read_all(dm: ShardDataModule) -> tuple[int, int, list[str]]:
    """(samples trained on, samples reported skipped, shards reported damaged) over one epoch."""
    trained = skipped = 0
    bad: list[str] = []
    for batch in dm.train_dataloader():
        trained += len(batch["key"])
        skipped += int(batch["skipped"])
        bad += batch["bad_shards"]
    return trained, skipped, bad


def truncate_member(shard: Path, index: int) -> None:
    """Cut the shard in the middle of the data of member ``index`` (as a copy interrupted mid-file)."""
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[index]
    with open(shard, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------- truncated tar
@pytest.fixture
def truncated(tmp_path: Path) -> Path:
    """200 samples written (3 members each), cut inside sample 50: samples 50..199 are lost."""
    shard = write_shard(tmp_path / "trunc", 200)
    truncate_member(shard, 3 * 50 + 1)
    return shard


def test_truncated_shard_counts_every_lost_sample(truncated: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert expected_samples(str(truncated)) == 200
    with caplog.at_level(logging.WARNING, logger=dm_module.__name__):
        trained, skipped, bad = read_all(module(str(truncated), max_skip_rate=1.0, max_bad_shards=-1))
    assert trained == 50 and skipped == 150 and bad == [str(truncated)]
    warning = next(r.getMessage() for r in caplog.records if "damaged shard" in r.getMessage())
    assert str(truncated) in warning and "after 50 samples" in warning and "150 samples lost" in warning


def test_truncated_shard_trips_the_skip_rate(truncated: Path) -> None:
    with pytest.raises(DataError) as exc:
        read_all(module(str(truncated), max_bad_shards=-1))
    message = one_line(exc)
    assert "150 of 200 samples" in message and "data.max_skip_rate=0.05" in message


def test_truncated_shard_stops_the_run_by_default_naming_it(truncated: Path) -> None:
    with pytest.raises(DataError) as exc:
        read_all(module(str(truncated)))
    message = one_line(exc)
    assert message.startswith(f"damaged shard {truncated}: it is truncated or unreadable after 50 samples")
    assert "150 samples lost" in message
    assert "set data.max_bad_shards=N (or -1 for no limit) to skip damaged shards" in message


def test_without_a_stats_file_the_loss_is_unknown_but_the_shard_still_counts(truncated: Path) -> None:
    truncated.with_name(truncated.name.replace(".tar", "_stats.json")).unlink()
    assert expected_samples(str(truncated)) is None
    trained, skipped, bad = read_all(module(str(truncated), max_bad_shards=-1))
    assert (trained, skipped, bad) == (50, 0, [str(truncated)])
    with pytest.raises(DataError, match="samples lost: unknown"):
        read_all(module(str(truncated)))


def test_a_shard_shorter_than_its_stats_file_is_damaged(tmp_path: Path) -> None:
    shard = write_shard(tmp_path, 60)
    shard.with_name(shard.name.replace(".tar", "_stats.json")).write_text('{"count": 70, "successes": 70}')
    trained, skipped, bad = read_all(module(str(shard), max_skip_rate=0.5, max_bad_shards=-1))
    assert (trained, skipped, bad) == (60, 10, [str(shard)])
    with pytest.raises(DataError, match="holds 60 of the 70 samples its stats file lists; 10 samples lost"):
        read_all(module(str(shard)))


def test_counts_found_after_the_last_sample_reach_the_last_batch(tmp_path: Path) -> None:
    """A pass ending in a damaged shard, with exactly one full batch before it."""
    good = write_shard(tmp_path / "good", 32)
    rotten = write_shard(tmp_path / "rotten", 5, images={i: b"not a png" for i in range(5)})
    stream = ShardStream(
        [str(good), str(rotten)], SampleDecoder(SIZE), batch_size=32, shuffle=False, max_bad_shards=-1
    )
    batches = list(stream)
    assert len(batches) == 1
    assert int(batches[0]["skipped"]) == 5 and batches[0]["bad_shards"] == [str(rotten)]


# ------------------------------------------------------------------------------------------- big images
@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """A 12000x12000 single-colour PNG: 144 M pixels (~430 MB as RGB) in ~18 KB."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000), 0).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def test_huge_image_is_skipped_from_its_header_and_counted(
    huge_png: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shard = write_shard(tmp_path, 40, images={7: huge_png})
    with caplog.at_level(logging.WARNING, logger=dm_module.__name__):
        batches = list(module(str(shard)).train_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 39 and "000000007" not in keys
    assert sum(int(b["skipped"]) for b in batches) == 1
    assert not any(b["bad_shards"] for b in batches)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "000000007" in messages
    assert "image is 12000x12000 = 144000000 pixels, more than data.max_image_pixels=16777216" in messages


def test_pixel_limit_is_checked_before_decoding(huge_png: bytes) -> None:
    decoder = SampleDecoder(SIZE, max_image_pixels=12000 * 12000 - 1)
    start = time.perf_counter()
    with pytest.raises(SkipSample, match=r"12000x12000 .* data\.max_image_pixels=143999999"):
        decoder({"__key__": "k", "png": huge_png, "txt": b"a caption"}, random.Random(0))
    assert time.perf_counter() - start < 0.25  # a full decode of this image takes ~0.5 s and ~430 MB
    at_the_limit = SampleDecoder(SIZE, max_image_pixels=SIZE * SIZE)
    sample = at_the_limit({"__key__": "k", "png": png(), "txt": b"x"}, random.Random(0))
    assert sample["image"].shape == (SIZE, SIZE, 3)


def test_pil_decompression_bomb_guard_is_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = SampleDecoder(SIZE, max_image_pixels=None)
    raw = {"__key__": "k", "png": png(size=64), "txt": b"a caption"}  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # > 2x the limit: PIL raises
    with pytest.raises(SkipSample, match="decompression-bomb guard"):
        decoder(raw, random.Random(0))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: PIL warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SkipSample, match="decompression-bomb guard"):
            decoder(raw, random.Random(0))


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"data\.max_image_pixels"):
        SampleDecoder(SIZE, max_image_pixels=0)
    with pytest.raises(ConfigError, match=r"data\.max_bad_shards"):
        ShardDataModule(train_urls="x.tar", max_bad_shards=-2)


# ----------------------------------------------------------------------------------- unreadable shard
def test_unreadable_shard_stops_by_default_and_is_skipped_with_no_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = write_shard(tmp_path / "good", 40)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(DataError) as exc:
        read_all(module([str(good), str(junk)]))
    message = one_line(exc)
    assert f"damaged shard {junk}: it is not a readable tar file" in message and "max_bad_shards=0" in message
    with caplog.at_level(logging.WARNING, logger=dm_module.__name__):
        trained, skipped, bad = read_all(module([str(good), str(junk)], max_bad_shards=-1))
    assert (trained, skipped, bad) == (40, 0, [str(junk)])
    assert any(f"skipping damaged shard {junk}" in r.getMessage() for r in caplog.records)


def test_max_bad_shards_allows_that_many_per_worker(tmp_path: Path) -> None:
    good = write_shard(tmp_path / "good", 40)
    junk = [tmp_path / f"junk{i}.tar" for i in range(2)]
    for path in junk:
        path.write_bytes(b"\x01" * 2048)
    urls = [str(good), *map(str, junk)]
    trained, _, bad = read_all(module(urls, max_bad_shards=2))
    assert trained == 40 and sorted(bad) == sorted(map(str, junk))
    with pytest.raises(DataError, match=r"2 damaged shard\(s\) in data worker 0 \(rank 0\), more than"):
        read_all(module(urls, max_bad_shards=1))


def test_a_damaged_shard_read_again_is_counted_once_but_loses_samples_each_time(truncated: Path) -> None:
    loader = module(str(truncated), max_skip_rate=1.0, max_bad_shards=1).train_dataloader()
    for epoch in range(2):  # the same worker state (num_workers=0: this process) reads it twice
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert sum(int(b["skipped"]) for b in batches) == 150
        assert [u for b in batches for u in b["bad_shards"]] == ([str(truncated)] if epoch == 0 else [])


# ------------------------------------------------------------------------------------------- SIGTERM
@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "shapes"
    write_synthetic_shards(out, count=200, size=SIZE, seed=3, samples_per_shard=50, progress=False)
    return out


def test_data_workers_ignore_sigterm(shapes: Path) -> None:
    loader = module(str(shapes), num_workers=1, batch_size=10).train_dataloader()
    iterator = iter(loader)
    keys = list(next(iterator)["key"])
    worker = loader._iterator._workers[0]
    os.kill(worker.pid, signal.SIGTERM)  # what scancel / SLURM preemption sends to the process group
    time.sleep(0.3)
    keys += [k for batch in iterator for k in batch["key"]]
    assert worker.is_alive() and sorted(keys) == [f"{i:09d}" for i in range(200)]
    loader._iterator._shutdown_workers()


def test_a_process_with_live_workers_still_exits_promptly(shapes: Path) -> None:
    """Workers ignore SIGTERM, so the exit must not wait on multiprocessing terminating them."""
    script = textwrap.dedent(f"""
        from t2i_train.data.datamodule import ShardDataModule
        dm = ShardDataModule(train_urls={str(shapes)!r}, num_workers=1, batch_size=10, image_size={SIZE})
        loader = dm.train_dataloader()
        next(iter(loader))
        print("pid", loader._iterator._workers[0].pid, flush=True)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    pid = int(proc.stdout.split()[1])
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the worker is gone too


# ------------------------------------------------------------------------------------------ world size
def test_check_world_size(shapes: Path, tmp_path: Path) -> None:
    dm = ShardDataModule(train_urls=str(shapes), num_workers=0, image_size=SIZE)
    dm.check_world_size(4)
    assert len(dm.train_shards) == 4  # resolved by the check
    with pytest.raises(DataError) as exc:
        dm.check_world_size(5)
    assert one_line(exc) == (
        "4 training shards cannot be split over 5 processes; write more shards or set data.resampled=true"
    )
    ShardDataModule(train_urls=str(shapes), resampled=True, image_size=SIZE).check_world_size(5)
    with pytest.raises(DataError, match="does not exist"):
        ShardDataModule(train_urls=str(tmp_path / "none.tar"), image_size=SIZE).check_world_size(1)
