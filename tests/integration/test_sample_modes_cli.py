"""`python -m t2i_train.sample mode=retrieve|auto index=DIR` on a real tiny GILL: trained 2 steps by the training
CLI on synthetic shards, its retrieval index built by `python -m t2i_train.index` over those shards, sampled by the
CLI (files as stored in the shards, manifest fields, one-line errors). Generation goes through a real (random,
tiny) diffusion checkpoint attached as `model.generator_checkpoint`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from t2i_train.checkpoint import read_checkpoint
from t2i_train.data.shards import write_synthetic_shards
from tests.helpers import TINY_TRAIN, assert_one_line_error, compose_train, run_cli

PROMPTS = "prompts=[a red circle in the top left,a blue square in the center]"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bank") / "shapes"
    write_synthetic_shards(out, count=24, size=32, seed=1, samples_per_shard=8, progress=False)
    return out


@pytest.fixture(scope="module")
def diffusion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (random, tiny) model=diffusion checkpoint as training stores it; its T5 is GILL's default
    target_encoder (conf/model/diffusion.yaml and conf/text_encoder/t5_shapes.yaml describe the same one)."""
    node = OmegaConf.to_container(compose_train(["model=diffusion"]).model, resolve=True)
    model = instantiate(node, _convert_="all")
    model.latent_scale.fill_(1.0)  # as after a first training batch
    path = tmp_path_factory.mktemp("diffusion") / "last.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"t2i_config": {"model": node, "data": {"image_size": 32}}, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def gill(shards: Path, diffusion: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GILL trained 2 steps with model.generator_checkpoint=<the diffusion checkpoint> (loaded on first use)."""
    run = tmp_path_factory.mktemp("gill")
    proc = run_cli(
        "t2i_train", "model=gill", "data=webdataset", f"data.train_urls={shards}", "data.image_size=32",
        f"model.generator_checkpoint={diffusion}", "trainer.max_steps=2", f"hydra.run.dir={run}", *TINY_TRAIN,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def index(gill: Path, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "bank_index"
    proc = run_cli("t2i_train.index", f"checkpoint={gill}", f"urls={shards}", f"output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def variant(gill: Path, out: Path, generator: bool, decide: str | None = None) -> Path:
    """The trained checkpoint as if trained without ``model.generator_checkpoint`` (``generator=False``) and/or
    with a decision head that always picks ``decide`` (the head trains in a later stage)."""
    ckpt = read_checkpoint(gill)
    if not generator:
        ckpt["t2i_config"]["model"]["generator_checkpoint"] = None
    if decide is not None:
        bias = ckpt["state_dict"]["model.decision.1.bias"]
        bias.copy_(torch.tensor([10.0, -10.0] if decide == "retrieve" else [-10.0, 10.0]))
    torch.save(ckpt, out)
    return out


def stored_pixels(shards: Path) -> dict[tuple[str, str], np.ndarray]:
    """(shard, key) -> the pixels of the sample's PNG, read with tarfile and PIL."""
    pixels = {}
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    pixels[(str(shard), member.name.split(".")[0])] = np.asarray(image)
    return pixels


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_retrieve_writes_the_stored_images_the_index_names(
    gill: Path, index: Path, shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "retrieved"
    proc = run_cli(
        "t2i_train.sample", f"checkpoint={variant(gill, tmp_path / 'nogen.ckpt', generator=False)}", PROMPTS,
        f"output_dir={out}", "mode=retrieve", f"index={index}", "images_per_prompt=2", "retrieve_k=3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote 4 images (4 retrieved, 0 generated), grid.png and manifest.jsonl to {out}" in proc.stdout
    lines, pixels = manifest(out), stored_pixels(shards)
    assert [line["file"] for line in lines] == ["0.png", "1.png", "2.png", "3.png"]
    for line in lines:
        assert line["source"] == "retrieved" and len(line["hits"]) == 3
        assert line["hits"][line["rank"]]["key"] == line["retrieved_key"]
        expected = pixels[(line["retrieved_shard"], line["retrieved_key"])]  # a key of the shards
        assert (np.asarray(Image.open(out / line["file"])) == expected).all()
    assert lines[0]["retrieved_key"] != lines[1]["retrieved_key"]  # a prompt's images: distinct hits
    assert (out / "grid.png").is_file()


def test_auto_without_a_generator_retrieves_or_says_what_to_set(
    gill: Path, index: Path, tmp_path: Path
) -> None:
    out = tmp_path / "auto"
    common = [PROMPTS, "mode=auto", f"index={index}"]
    retrieving = variant(gill, tmp_path / "retrieve.ckpt", generator=False, decide="retrieve")
    proc = run_cli("t2i_train.sample", f"checkpoint={retrieving}", f"output_dir={out}", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(m["decision"], m["source"]) for m in manifest(out)] == [("retrieve", "retrieved")] * 2
    generating = variant(gill, tmp_path / "generate.ckpt", generator=False, decide="generate")
    proc = run_cli("t2i_train.sample", f"checkpoint={generating}", f"output_dir={tmp_path / 'no'}", *common)
    assert_one_line_error(
        proc, "mode=auto: the decision head picks generate for 2 of 2 prompts", "model.generator_checkpoint",
        "or sample with mode=retrieve",
    )  # fmt: skip
    assert not (tmp_path / "no").exists()


def test_auto_draws_through_the_attached_generator(gill: Path, index: Path, tmp_path: Path) -> None:
    out = tmp_path / "drawn"
    generating = variant(gill, tmp_path / "generate.ckpt", generator=True, decide="generate")
    proc = run_cli(
        "t2i_train.sample", f"checkpoint={generating}", PROMPTS, f"output_dir={out}", "mode=auto",
        f"index={index}", "sampling.steps=2", "seed=3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = manifest(out)
    assert [(m["decision"], m["source"], m["batch_seed"]) for m in lines] == [
        ("generate", "generated", 3)
    ] * 2
    assert Image.open(out / "0.png").size == (32, 32) and (out / "grid.png").is_file()


def test_a_generator_given_on_the_command_line_draws_for_a_gill_trained_without_one(
    gill: Path, diffusion: Path, tmp_path: Path
) -> None:
    bare = variant(gill, tmp_path / "nogen.ckpt", generator=False)
    out = tmp_path / "drawn"
    proc = run_cli(
        "t2i_train.sample", f"checkpoint={bare}", PROMPTS, f"output_dir={out}", f"generator_checkpoint={diffusion}",
        "sampling.steps=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["source"] for m in manifest(out)] == ["generated"] * 2
    proc = run_cli(
        "t2i_train.sample", f"checkpoint={diffusion}", PROMPTS, f"output_dir={tmp_path / 'no'}",
        f"generator_checkpoint={diffusion}",
    )  # fmt: skip
    assert_one_line_error(
        proc, "generator_checkpoint= is for a model that draws through a separate generator"
    )
    assert not (tmp_path / "no").exists()


def test_a_missing_index_is_one_line_before_the_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli(
        "t2i_train.sample", f"checkpoint={tmp_path}/none.ckpt", PROMPTS, f"output_dir={out}", "mode=auto",
        f"index={tmp_path / 'nowhere'}",
    )  # fmt: skip
    assert_one_line_error(proc, "nowhere does not exist; build it with python -m t2i_train.index")
    assert not out.exists()
