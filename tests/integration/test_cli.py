"""The public CLIs as a user runs them: errors are one line + non-zero exit; train -> sample -> manifest."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from t2i_train.data.shards import write_synthetic_shards
from tests.helpers import TINY_TRAIN, assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, count=64, samples_per_shard=32, seed=1, progress=False)
    return out


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _copy_samples(src_tar: Path, dst: Path, corrupt_keys: int = 0, drop_caption_keys: int = 0) -> Path:
    """Copy a shard, making the image of the first ``corrupt_keys`` samples garbage and dropping captions."""
    members: dict[str, bytes] = {}
    with tarfile.open(src_tar) as tar:
        for member in tar.getmembers():
            members[member.name] = tar.extractfile(member).read()
    keys = sorted({name.split(".")[0] for name in members})
    for key in keys[:corrupt_keys]:
        members[f"{key}.png"] = b"not an image at all"
    for key in keys[corrupt_keys : corrupt_keys + drop_caption_keys]:
        members.pop(f"{key}.txt")
    return _write_tar(dst, members)


def test_help_lists_config_groups() -> None:
    proc = run_cli("t2i_train", "--help")
    assert proc.returncode == 0
    for group in (
        "model:",
        "data:",
        "loss:",
        "optimizer:",
        "scheduler:",
        "strategy:",
        "trainer:",
        "experiment:",
    ):
        assert group in proc.stdout


def test_cfg_job_prints_composed_config() -> None:
    proc = run_cli("t2i_train", "model=vqgan", "--cfg", "job")
    assert proc.returncode == 0
    assert "t2i_train.models.vqgan.VQGAN" in proc.stdout and "VQGANLoss" in proc.stdout


def test_unknown_model_is_one_line() -> None:
    assert_one_line_error(
        run_cli("t2i_train", "model=no_such_family"), "unknown model 'no_such_family'", "muse"
    )


def test_loss_the_family_does_not_accept_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("t2i_train", "model=vqgan", "loss=masked_ce", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(proc, "model=vqgan", "loss=masked_ce")


def test_missing_shard_path_is_one_line(tmp_path: Path) -> None:
    urls = f"{tmp_path}/nowhere-{{000000..000003}}.tar"
    proc = run_cli(
        "t2i_train",
        "model=vqgan",
        "data=webdataset",
        f"data.train_urls='{urls}'",
        f"hydra.run.dir={tmp_path / 'run'}",
        *TINY_TRAIN,
    )
    assert_one_line_error(proc, "nowhere-000000.tar")
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_empty_shard_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.tar").write_bytes(b"")
    proc = run_cli(
        "t2i_train",
        "model=vqgan",
        "data=webdataset",
        f"data.train_urls={tmp_path}/empty.tar",
        f"hydra.run.dir={tmp_path / 'run'}",
        *TINY_TRAIN,
    )
    assert_one_line_error(proc, "empty.tar")


def test_corrupt_images_and_missing_captions_are_skipped_and_counted(shards: Path, tmp_path: Path) -> None:
    first = sorted(shards.glob("*.tar"))[0]
    bad = _copy_samples(first, tmp_path / "bad.tar", corrupt_keys=1, drop_caption_keys=1)
    run = tmp_path / "run"
    proc = run_cli(
        "t2i_train",
        "model=vqgan",
        "data=webdataset",
        f"data.train_urls={bad}",
        "data.image_size=32",
        "data.max_skip_rate=0.1",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={run}",
        *TINY_TRAIN,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = (run / "logs" / "metrics.csv").read_text().splitlines()
    column = metrics[0].split(",").index("data/skipped_total")
    assert max(float(r.split(",")[column]) for r in metrics[1:] if r.split(",")[column]) == 2.0


def test_wholly_corrupt_shard_stops_with_one_line(shards: Path, tmp_path: Path) -> None:
    first = sorted(shards.glob("*.tar"))[0]
    bad = _copy_samples(first, tmp_path / "rotten.tar", corrupt_keys=32)
    proc = run_cli(
        "t2i_train",
        "model=vqgan",
        "data=webdataset",
        f"data.train_urls={bad}",
        "data.image_size=32",
        "trainer.max_steps=3",
        f"hydra.run.dir={tmp_path / 'run'}",
        *TINY_TRAIN,
    )
    assert_one_line_error(proc, "rotten.tar")


def test_img2dataset_folder_trains_as_it_is(tmp_path: Path) -> None:
    out = tmp_path / "img2dataset_out"
    write_synthetic_shards(
        out, count=48, samples_per_shard=24, naming="img2dataset", image_format="jpg", progress=False
    )
    assert (out / "00000.tar").is_file()
    (out / "00000_stats.json").write_text(json.dumps({"count": 24, "successes": 24}))
    (out / "00000.parquet").write_bytes(b"PAR1")  # img2dataset writes one beside each tar; it must be ignored
    run = tmp_path / "run"
    proc = run_cli(
        "t2i_train",
        "model=vqgan",
        "data=webdataset",
        f"data.train_urls={out}",
        "data.image_size=32",
        "trainer.max_steps=2",
        f"hydra.run.dir={run}",
        *TINY_TRAIN,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_summary_counts_muse_3b_without_allocating() -> None:
    proc = run_cli("t2i_train.summary", "experiment=muse_3b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert 3.0e9 <= summary["trainable"] <= 3.6e9, summary["trainable"]
    assert summary["components"]["text_encoder"]["frozen"] > 4.0e9  # T5-XXL encoder, counted apart
    assert summary["components"]["text_encoder"]["trainable"] == 0


def test_train_sample_manifest_end_to_end(shards: Path, tmp_path: Path) -> None:
    vq = tmp_path / "vqgan"
    proc = run_cli(
        "t2i_train",
        "model=vqgan",
        "data=webdataset",
        f"data.train_urls={shards}",
        "data.image_size=32",
        "trainer.max_steps=2",
        f"hydra.run.dir={vq}",
        *TINY_TRAIN,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    encoded = tmp_path / "encoded"
    proc = run_cli(
        "t2i_train.encode",
        f"checkpoint={vq}/checkpoints/last.ckpt",
        f"input_urls={shards}",
        f"output_dir={encoded}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert (
        report["fields"] == {"image_tokens": {"dtype": "int16", "shape": [8, 8]}} and report["dropped"] == 0
    )
    assert (encoded / "encoded.json").is_file()
    muse = tmp_path / "muse"
    proc = run_cli(
        "t2i_train",
        "model=muse",
        "data=webdataset",
        f"data.train_urls={encoded}",
        "data.image_size=32",
        "data.fields=[image_tokens]",
        "data.load_images=false",
        f"model.image_tokenizer_checkpoint={vq}/checkpoints/last.ckpt",
        "trainer.max_steps=2",
        f"hydra.run.dir={muse}",
        *TINY_TRAIN,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (muse / ".hydra" / "config.yaml").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle in the top left\n# a comment\na blue square in the center\n")
    out = tmp_path / "samples"
    proc = run_cli(
        "t2i_train.sample",
        f"checkpoint={muse}/checkpoints/last.ckpt",
        f"prompts_file={prompts}",
        f"output_dir={out}",
        "images_per_prompt=2",
        "seed=7",
        "sampling.steps=3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["a red circle in the top left"] * 2 + [
        "a blue square in the center"
    ] * 2
    assert [line["file"] for line in lines] == ["0.png", "1.png", "2.png", "3.png"]
    assert all(line["seed"] == 7 for line in lines)
    assert all((out / line["file"]).is_file() for line in lines) and (out / "grid.png").is_file()
    _assert_labelled_grid(out, rows=2, columns=2)
    proc = run_cli("t2i_train.evaluate", "prompt_following", f"samples_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 0.0 <= json.loads(proc.stdout)["all"] <= 1.0
    # an export samples exactly like the checkpoint it came from
    proc = run_cli("t2i_train.export", f"checkpoint={muse}/checkpoints/last.ckpt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["output_dir"] == str(muse / "export")
    again = tmp_path / "samples_from_export"
    proc = run_cli(
        "t2i_train.sample",
        f"checkpoint={muse}/export",
        f"prompts_file={prompts}",
        f"output_dir={again}",
        "images_per_prompt=2",
        "seed=7",
        "sampling.steps=3",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in lines:
        assert (again / line["file"]).read_bytes() == (out / line["file"]).read_bytes()


def _assert_labelled_grid(out: Path, rows: int, columns: int) -> None:
    """grid.png shows each native 32-px sample upscaled 4x (nearest) to 128 px, its prompt beside its row."""
    import numpy as np
    from PIL import Image

    from t2i_train.sampling import GRID_CELL, GRID_PADDING

    cell, pad, side = GRID_CELL, GRID_PADDING, 2 * GRID_CELL
    sample = np.asarray(Image.open(out / "0.png"))
    assert sample.shape == (32, 32, 3)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (pad + rows * (cell + pad), side + pad + columns * (cell + pad), 3)
    first = grid[pad : pad + cell, side + pad : side + pad + cell]
    assert (first == sample.repeat(4, axis=0).repeat(4, axis=1)).all()
    assert (grid[:, :side] != 255).any(axis=-1).sum() > 50  # the prompts' text


def test_sample_with_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    proc = run_cli(
        "t2i_train.sample",
        f"checkpoint={tmp_path}/none.ckpt",
        "prompts=[a red circle in the top]",
        f"output_dir={tmp_path}/out",
    )
    assert_one_line_error(proc, "none.ckpt")


def test_encode_bad_arguments_are_one_line(shards: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "t2i_train.encode",
        f"checkpoint={tmp_path}/none.ckpt",
        f"input_urls={shards}",
        f"output_dir={tmp_path}/o",
    )
    assert_one_line_error(proc, "none.ckpt")
    proc = run_cli(
        "t2i_train.encode", "checkpoint=x", f"input_urls={shards}", f"output_dir={tmp_path}/o", "colour=red"
    )
    assert_one_line_error(proc, "unknown argument 'colour'")


def test_multirun_with_the_basic_launcher(shards: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "t2i_train",
        "-m",
        "model=vqgan",
        "data=webdataset",
        f"data.train_urls={shards}",
        "data.image_size=32",
        "trainer.max_steps=2",
        "optimizer.lr=1e-4,2e-4",
        f"hydra.sweep.dir={sweep}",
        *TINY_TRAIN,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    from omegaconf import OmegaConf

    lrs = {float(OmegaConf.load(sweep / j / ".hydra" / "config.yaml").optimizer.lr) for j in ("0", "1")}
    assert lrs == {1e-4, 2e-4}


def test_optuna_sweep_minimises_a_logged_metric(tmp_path: Path, small_data_overrides: list[str]) -> None:
    import math

    import yaml

    sweep = tmp_path / "optuna"
    proc = run_cli(
        "t2i_train",
        "-m",
        "hparams_search=muse_optuna",
        "model=muse",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        *small_data_overrides,
        *[o for o in TINY_TRAIN if not o.startswith("data.")],
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "model.cond_drop_prob"}
    assert math.isfinite(float(results["best_value"]))
