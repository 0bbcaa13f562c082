"""Text -> image retrieval (`t2i_train.retrieval`): the index of a tiny trained model=clip over small shards,
search, restart, ranks, a trained FAISS factory, and the one-line errors."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from t2i_train.checkpoint import load_family
from t2i_train.data.shards import ShardWriter, encode_image, write_synthetic_shards
from t2i_train.errors import ConfigError, DataError
from t2i_train.models.capabilities import capabilities
from t2i_train.models.clip import CLIPFamily
from t2i_train.retrieval import RetrievalHit, RetrievalIndex, build_index, resolve_factory, retrieve
from tests.helpers import TINY_TRAIN, compose_train

SHARDS, PER_SHARD, BAD = 4, 6, 2  # the bank: 4 shapes shards + 1 with 2 undecodable of 4 samples


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory: pytest.TempPathFactory, small_data_overrides: list[str]) -> Path:
    """A model=clip run of two steps through the training CLI's ``train``."""
    from t2i_train.training import train

    run_dir = tmp_path_factory.mktemp("clip_run")
    overrides = ["model=clip", *TINY_TRAIN, *small_data_overrides, f"run_dir={run_dir}", "logger=none"]
    overrides += ["trainer.max_steps=2", "trainer.limit_val_batches=0"]
    assert train(compose_train(overrides))["global_step"] == 2
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("bank")
    write_synthetic_shards(
        root / "shapes",
        count=SHARDS * PER_SHARD,
        size=32,
        seed=5,
        samples_per_shard=PER_SHARD,
        progress=False,
    )
    from PIL import Image

    good = encode_image(Image.new("RGB", (32, 32), (200, 0, 0)), "png")
    with ShardWriter(root / "odd", samples_per_shard=4) as writer:
        for i in range(4):
            writer.write({"png": b"garbage" if i < BAD else good, "txt": f"odd sample {i}"})
    return [str(root / "shapes"), str(root / "odd")]


@pytest.fixture(scope="module")
def built(clip_ckpt: Path, bank: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "bank_index"
    summary = build_index(str(clip_ckpt), bank, out, batch_size=4, device="cpu")
    assert summary["merged"] and summary["parts_written"] == SHARDS + 1
    assert summary["count"] == SHARDS * PER_SHARD + 4 - BAD and summary["skipped"] == BAD
    return out


def shard_images(shard: Path) -> tuple[list[str], torch.Tensor]:
    """The keys and decoded images of a shard, decoded as the index builder does."""
    from t2i_train.data.shard_map import read_raw_samples
    from t2i_train.data.transforms import decode_for_rewrite

    raws = list(read_raw_samples(str(shard)))
    images, slots, _ = decode_for_rewrite(raws, 32, "center_crop")
    assert images is not None
    return [raws[slot]["__key__"] for slot in slots], images


def stored(index_dir: Path) -> tuple[np.ndarray, list[str]]:
    index = RetrievalIndex.load(index_dir)
    vectors = index.faiss_index.reconstruct_n(0, index.count)
    return vectors, (index_dir / "keys.jsonl").read_text().splitlines()


def test_each_image_finds_itself_first_and_prompts_retrieve(
    clip_ckpt: Path, bank: list[str], built: Path
) -> None:
    meta = json.loads((built / "index.json").read_text())
    assert meta["format"] == 1 and meta["dim"] == 64 and meta["count"] == 26 and meta["factory"] == "Flat"
    assert (
        meta["family"] == "clip" and meta["checkpoint"] == str(clip_ckpt.resolve()) and meta["skipped"] == 2
    )
    assert len(meta["checkpoint_fingerprint"]) == 16 and len(meta["probe"]) == 2
    assert [
        e["key"] for e in json.loads((built / "parts" / "shard-000000.tar.skipped.json").read_text())
    ] == [
        "000000000",
        "000000001",
    ]
    model = load_family(clip_ckpt)
    assert model.can("embed_images_for_retrieval") and model.can("retrieve")
    assert {"embed_images_for_retrieval", "retrieve"} <= set(capabilities(model))
    index = RetrievalIndex.load(built)
    assert RetrievalIndex.load(str(built)) is index  # cached per folder
    shard = Path(bank[0]) / "shapes-000002.tar"
    keys, images = shard_images(shard)
    hits = index.search(model.embed_images_for_retrieval(images), k=3)
    for key, found in zip(keys, hits):
        assert isinstance(found[0], RetrievalHit) and found[0].key == key and found[0].shard == str(shard)
        assert found[0].score == pytest.approx(1.0, abs=1e-4) and found[0].score >= found[1].score
    prompts = ["a red circle in the top left", "a blue square in the center"]
    by_model = model.retrieve(prompts, k=30, index=str(built))
    assert [len(h) for h in by_model] == [26, 26]  # k larger than the bank: every image once
    assert by_model == retrieve(model, prompts, 30, index)
    assert all(a.score >= b.score for h in by_model for a, b in itertools.pairwise(h))


def test_a_relative_bank_is_stored_by_absolute_path(
    clip_ckpt: Path, bank: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keys.jsonl says where each image is: readable from another working directory than the build's."""
    shapes = Path(bank[0])
    monkeypatch.chdir(shapes.parent)
    build_index(str(clip_ckpt), ["shapes/shapes-000000.tar"], tmp_path / "rel", batch_size=4, device="cpu")
    monkeypatch.chdir(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "rel" / "keys.jsonl").read_text().splitlines()]
    assert lines and {line["shard"] for line in lines} == {str((shapes / "shapes-000000.tar").resolve())}


def test_restart_recomputes_only_the_missing_part(
    clip_ckpt: Path, bank: list[str], built: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(built, out)
    for name in ("index.faiss", "keys.jsonl", "index.json", "parts/shapes-000001.tar.npy"):
        (out / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.npy")}
    summary = build_index(str(clip_ckpt), bank, out, batch_size=4, device="cpu")
    assert summary["parts_written"] == 1 and summary["parts_already_done"] == SHARDS
    assert summary["images_embedded"] == PER_SHARD
    assert {p: (out / "parts" / p).stat().st_mtime_ns for p in kept} == kept
    vectors, keys = stored(out)
    expected_vectors, expected_keys = stored(built)
    assert keys == expected_keys and np.allclose(vectors, expected_vectors, atol=1e-6)
    assert not list(out.rglob("*.tmp"))


def test_two_ranks_make_the_index_of_one_process(
    clip_ckpt: Path, bank: list[str], built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DataError, match="parts are still missing"):  # rank 0 waits for rank 1's parts
        build_index(str(clip_ckpt), bank, out, device="cpu", merge_wait_s=0.05)
    monkeypatch.setenv("RANK", "1")
    second = build_index(str(clip_ckpt), bank, out, device="cpu")
    assert not second["merged"] and second["parts_written"] == 2 and not (out / "index.json").exists()
    monkeypatch.setenv("RANK", "0")
    first = build_index(str(clip_ckpt), bank, out, device="cpu", merge_wait_s=0.05)
    assert first["merged"] and first["parts_already_done"] == 3 and first["parts_written"] == 0
    vectors, keys = stored(out)
    expected_vectors, expected_keys = stored(built)
    assert keys == expected_keys and np.allclose(vectors, expected_vectors, atol=1e-6)


def test_a_trained_factory_index(clip_ckpt: Path, bank: list[str], tmp_path: Path) -> None:
    assert resolve_factory("auto", 99_999) == "Flat"
    assert resolve_factory("auto", 1_000_000) == "IVF4096,Flat"
    assert resolve_factory("IVF8,PQ8", 10) == "IVF8,PQ8"
    out = tmp_path / "ivf"
    summary = build_index(str(clip_ckpt), bank, out, device="cpu", factory="IVF4,Flat")
    meta = json.loads((out / "index.json").read_text())
    assert summary["factory"] == meta["factory"] == "IVF4,Flat" and meta["nprobe"] == 4
    model = load_family(clip_ckpt)
    keys, images = shard_images(Path(bank[0]) / "shapes-000000.tar")
    hits = RetrievalIndex.load(out).search(model.embed_images_for_retrieval(images), k=1)
    assert [h[0].key for h in hits] == keys  # nprobe = every list: exact
    with pytest.raises(ConfigError, match=r"cannot be trained on 26 vectors.*factory=Flat"):
        build_index(str(clip_ckpt), bank, tmp_path / "big", device="cpu", factory="IVF64,Flat")
    with pytest.raises(ConfigError, match="FAISS cannot build factory='Bogus12'"):
        build_index(str(clip_ckpt), bank, tmp_path / "bogus", device="cpu", factory="Bogus12")
    assert not (tmp_path / "bogus").exists()  # refused before embedding anything


def test_missing_and_broken_indexes_are_one_line(built: Path, tmp_path: Path, clip_ckpt: Path) -> None:
    hint = "python -m t2i_train.index checkpoint=CKPT urls=SHARDS output=DIR"
    with pytest.raises(ConfigError, match=f"{tmp_path}/none does not exist; build it with {hint}"):
        RetrievalIndex.load(tmp_path / "none")
    with pytest.raises(ConfigError, match=r"holds no finished retrieval index \(no index.json"):
        RetrievalIndex.load(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(built, broken)
    (broken / "index.faiss").write_bytes(b"not faiss")
    with pytest.raises(ConfigError, match="is unreadable"):
        RetrievalIndex.load(broken)
    with pytest.raises(ConfigError, match=r"queries of shape \[2, 7\] do not fit index .* 64-dim"):
        RetrievalIndex.load(built).search(torch.randn(2, 7))
    model = load_family(clip_ckpt)
    with pytest.raises(ConfigError, match=f"retrieve needs an index: build one with {hint}"):
        model.retrieve(["a red circle"])
    with pytest.raises(ConfigError, match="k must be a positive"):
        model.retrieve(["a red circle"], k=0, index=str(built))


def test_a_family_that_cannot_embed_is_refused(bank: list[str], built: Path, tmp_path: Path) -> None:
    from t2i_train.models.vqgan import VQGAN

    config = {"_target_": "t2i_train.models.vqgan.VQGAN", "base_channels": 8, "channel_mult": [1, 2],
              "z_channels": 4, "codebook_size": 8, "codebook_dim": 4, "norm_groups": 4}  # fmt: skip
    vqgan = VQGAN(**{k: v for k, v in config.items() if k != "_target_"})
    state = {f"model.{k}": v for k, v in vqgan.state_dict().items()}
    ckpt = tmp_path / "vqgan.ckpt"
    torch.save({"t2i_config": {"model": config, "data": {"image_size": 32}}, "state_dict": state}, ckpt)
    with pytest.raises(
        ConfigError,
        match=r"index checkpoint=.*vqgan.ckpt needs a model that can embed_images_for_retrieval; model=vqgan can: ",
    ):
        build_index(str(ckpt), bank, tmp_path / "out", device="cpu")
    with pytest.raises(ConfigError, match="retrieve needs a model that can embed_images_for_retrieval"):
        retrieve(vqgan, ["a red circle"], 1, built)


def test_an_index_of_another_model_warns_and_its_parts_are_not_mixed(
    clip_ckpt: Path, bank: list[str], built: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "t2i_train.index"):
        assert RetrievalIndex.load(built).check_space(load_family(clip_ckpt)) == pytest.approx(1.0, abs=1e-4)
        assert not caplog.records
        other = CLIPFamily(init_seed=7).eval()
        assert other.retrieve(["a red circle"], k=1, index=str(built))[0][0].row >= 0  # still answers
    assert len(caplog.records) == 1 and "embeds images differently" in caplog.text
    ckpt = torch.load(clip_ckpt, weights_only=True)
    first = next(k for k in ckpt["state_dict"] if k.startswith("model.clip.visual"))
    ckpt["state_dict"][first] += 1.0
    retrained = tmp_path / "retrained.ckpt"
    torch.save(ckpt, retrained)
    out = tmp_path / "mixed"
    shutil.copytree(built, out)
    with pytest.raises(ConfigError, match="holds parts made with other checkpoint_fingerprint"):
        build_index(str(retrained), bank, out, device="cpu")
