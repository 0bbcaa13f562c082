"""What a new user meets first: the package installed without ``-e``, a preset on their own shards, the console.

``test_non_editable_install_trains`` builds the package with pip (no dependencies, no build isolation: they are in
this venv already) into a fresh folder and trains from another directory with only that folder importable, so the
configs must come from the installed package (``t2i_train/conf`` as package data), not from this checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

from t2i_train.data.shards import ShardWriter, encode_image

ROOT = Path(__file__).resolve().parents[2]
QUICK = [
    "trainer.max_steps=2",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.limit_val_batches=0",
    "data.num_workers=0",
    "data.batch_size=4",
    "data.shuffle_buffer=8",
    "sampling.every_n_steps=0",
    "checkpoint.every_n_steps=0",
]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **extra}


def user_shards(folder: Path, count: int = 16, size: int = 32) -> Path:
    """A user's own shards: png + txt per sample, nothing else (no json fields of the synthetic set)."""
    with ShardWriter(folder, samples_per_shard=count // 2) as writer:
        for i in range(count):
            image = Image.new("RGB", (size, size), (20 * (i % 12), 200 - 10 * i, 90))
            writer.write({"png": encode_image(image, "png"), "txt": f"a photo number {i}"})
    return folder


def test_diffusion_preset_trains_on_png_txt_shards(tmp_path: Path) -> None:
    """experiment=shapes_diffusion reads json.descriptive first and falls back to txt on other shards."""
    shards = user_shards(tmp_path / "shards")
    run = subprocess.run(
        [
            sys.executable, "-m", "t2i_train", "experiment=shapes_diffusion", "data=webdataset",
            f"data.train_urls={shards}", "data.image_size=32", f"hydra.run.dir={tmp_path / 'run'}", *QUICK,
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "finished at step 2" in run.stdout + run.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_console_shows_each_lightning_line_once_and_no_tips(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "t2i_train", "experiment=shapes_vqgan", *QUICK, "data.synthetic.count=64",
         "data.synthetic.val_count=8", f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    console = run.stdout + run.stderr
    for message in ("GPU available:", "TPU available:", "Seed set to", "`Trainer.fit` stopped"):
        lines = [line for line in console.splitlines() if message in line]
        assert len(lines) == 1, (message, lines)
        assert re.match(r"\[\d\d:\d\d:\d\d\]\[lightning[.\w]*\]\[INFO\] ", lines[0]), lines[0]  # one format
    assert "Tip" not in console and "litlogger" not in console and "litmodels" not in console
    assert "LeafSpec" not in console  # a library-internal deprecation a user cannot act on


def test_non_editable_install_trains(tmp_path: Path) -> None:
    """pip install (no -e) into a fresh folder, then ``python -m t2i_train`` from another directory trains."""
    target, source = tmp_path / "site", tmp_path / "source"
    # a copy, so the build writes no build/ or egg-info into the checkout (and no stale build/lib is packaged)
    shutil.copytree(ROOT / "t2i_train", source / "t2i_train", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=600, env=_env(PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    assert (target / "t2i_train" / "conf" / "train.yaml").is_file()
    assert (target / "t2i_train" / "conf" / "experiment" / "shapes_vqgan.yaml").is_file()
    assert (target / "t2i_train" / "conf" / "hydra" / "job_logging" / "t2i.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # PYTHONPATH comes before this venv's editable-install finder (a meta-path hook after the path finder), so
    # `t2i_train` is the copy in `target`; -P keeps the working directory off sys.path.
    env = _env(PYTHONPATH=str(target))
    where = subprocess.run(
        [sys.executable, "-P", "-c", "import t2i_train.cli.common as c; print(c.__file__); print(c.CONF_DIR)"],
        cwd=elsewhere, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    module_file, conf_dir = where.stdout.split()
    assert Path(module_file).is_relative_to(target) and Path(conf_dir).is_relative_to(target), where.stdout
    run = subprocess.run(
        [sys.executable, "-P", "-m", "t2i_train", "experiment=shapes_vqgan", *QUICK, "data.synthetic.count=64",
         "data.synthetic.val_count=8", f"data.cache_dir={tmp_path / 'cache'}", "hydra.run.dir=run"],
        cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (elsewhere / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (ROOT / "run").exists()


def test_console_logging_outside_hydra_prints_lightning_lines_once() -> None:
    """The pipeline and the shard CLIs set logging up before Lightning is imported: Lightning then propagates to
    the root *and* keeps its own "INFO: ..." handler on ``lightning``, so each line showed twice."""
    script = """
import logging
from t2i_train.cli.common import console_logging
console_logging()
from lightning.pytorch.utilities.rank_zero import rank_zero_info
rank_zero_info("GPU available: False, used: False")
rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger](https://pypi.org/project/litlogger/)")
"""
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=_env()
    )
    assert run.returncode == 0, run.stderr
    console = run.stdout + run.stderr
    assert console.count("GPU available") == 1, console
    assert "Tip" not in console, console
