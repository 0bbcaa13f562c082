"""Captioner -> `python -m t2i_train.recaption` as a user runs them: members kept, inputs untouched, restart
after SIGKILL equals an uninterrupted run, the data module reads the new captions, one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from t2i_train.data.shards import write_synthetic_shards
from tests.helpers import ROOT, TINY_TRAIN, assert_one_line_error, run_cli

TINY_CAPTIONER = [
    "model=captioner",
    "model.lm_config.n_layer=1",
    "model.lm_config.n_embd=32",
    "model.lm_config.n_head=2",
    "model.lm_config.n_positions=128",
    "model.prefix_tokens=2",
    "model.prefix_hidden=32",
    "model.max_caption_tokens=96",
]
# a random tiny captioner never says EOS early: every caption is max_new_tokens long (slow enough to kill)
DECODE = ["max_new_tokens=24", "batch_size=4", "torch_threads=1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recaption")
    data = ["data.synthetic.count=64", "data.synthetic.val_count=16", f"data.cache_dir={root / 'cache'}"]
    run = root / "cap"
    proc = run_cli(
        "t2i_train", *TINY_CAPTIONER, "trainer.max_steps=2", f"hydra.run.dir={run}", *data, *TINY_TRAIN
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = root / "shards"
    write_synthetic_shards(shards, count=48, size=32, seed=7, samples_per_shard=6, progress=False)
    return {"ckpt": run / "checkpoints" / "last.ckpt", "shards": shards, "root": root}


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def recaption(setup: dict[str, Path], out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [f"checkpoint={setup['ckpt']}", f"input_urls={setup['shards']}", f"output_dir={out}", *DECODE]
    return run_cli("t2i_train.recaption", *args, *extra)


def test_keeps_every_member_adds_the_caption_and_leaves_inputs_alone(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    before = digests(setup["shards"])
    out = tmp_path / "out"
    proc = recaption(setup, out, "style=dsc", "json_field=dsc_caption")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digests(setup["shards"]) == before
    inputs = sorted(setup["shards"].glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.tar")) == [p.name for p in inputs]
    assert {"dataset.json", "prompts_seen.txt", "recaptioned.json"} <= {p.name for p in out.iterdir()}
    for shard in inputs:
        original, written = members(shard), members(out / shard.name)
        keys = {name.split(".", 1)[0] for name in original}
        assert set(written) == set(original) | {f"{k}.dsc.txt" for k in keys}
        for name, data in original.items():
            if not name.endswith(".json"):
                assert written[name] == data, name
        for key in keys:
            meta, new = json.loads(written[f"{key}.json"]), json.loads(original[f"{key}.json"])
            assert meta.pop("dsc_caption") == written[f"{key}.dsc.txt"].decode() and meta == new
    assert '"images_per_second"' in proc.stdout


def recaption_here(setup: dict[str, Path], out: Path, **options: object) -> dict[str, object]:
    """The CLI's function in this process (no interpreter start-up: the model loads in a second)."""
    from t2i_train.data.recaption import recaption as run

    threads = torch.get_num_threads()
    try:
        return run(
            str(setup["ckpt"]),
            str(setup["shards"]),
            str(out),
            max_new_tokens=24,
            batch_size=4,
            torch_threads=1,
            **options,
        )
    finally:
        torch.set_num_threads(threads)


def test_restart_after_sigkill_writes_what_an_uninterrupted_run_writes(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    options = {"method": "top_p", "top_p": 0.9, "seed": 5, "field": "syn"}
    killed = tmp_path / "killed"
    args = [f"checkpoint={setup['ckpt']}", f"input_urls={setup['shards']}", f"output_dir={killed}", *DECODE]
    proc = subprocess.Popen(
        [sys.executable, "-m", "t2i_train.recaption", *args, *(f"{k}={v}" for k, v in options.items())],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 240
    while not list(killed.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in killed.glob("*.tar"))
    total = len(list(setup["shards"].glob("*.tar")))
    assert 1 <= len(done) < total, done  # killed after the first finished shard, before the last
    again = recaption_here(setup, killed, **options)
    assert again["shards_already_done"] == len(done) and again["shards_written"] == total - len(done)
    assert not list(killed.glob("*.tmp"))
    whole = tmp_path / "whole"
    recaption_here(setup, whole, **options)
    for shard in sorted(whole.glob("*.tar")):
        assert (killed / shard.name).read_bytes() == shard.read_bytes(), shard.name
    # another seed draws other captions (the seed reaches the sampler)
    other = tmp_path / "other"
    recaption_here(setup, other, **{**options, "seed": 6}, limit=1)
    first = sorted(whole.glob("*.tar"))[0].name
    assert (other / first).read_bytes() != (whole / first).read_bytes()


def test_data_module_reads_the_new_captions_by_bare_name(setup: dict[str, Path], tmp_path: Path) -> None:
    from t2i_train.data.datamodule import ShardDataModule

    out = tmp_path / "out"
    recaption_here(setup, out, limit=1)
    written = members(next(out.glob("*.tar")))
    dm = ShardDataModule(
        train_urls=str(out), batch_size=6, num_workers=0, image_size=32, caption_keys=["dsc", "txt"]
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for key, caption, source in zip(batch["key"], batch["caption"], batch["caption_source"], strict=True):
        assert source == "dsc" and caption == written[f"{key}.dsc.txt"].decode().strip()


def test_bad_input_is_one_line(setup: dict[str, Path], tmp_path: Path) -> None:
    fake = tmp_path / "muse.ckpt"
    torch.save({"t2i_config": {"model": {"_target_": "t2i_train.models.muse.Muse"}}, "state_dict": {}}, fake)
    common = [f"input_urls={setup['shards']}", f"output_dir={tmp_path / 'o'}"]
    proc = run_cli("t2i_train.recaption", f"checkpoint={fake}", *common)
    assert_one_line_error(proc, "needs a model that can caption", "model=muse can: generate")
    ckpt = f"checkpoint={setup['ckpt']}"
    proc = run_cli("t2i_train.recaption", ckpt, f"input_urls={tmp_path}/none", f"output_dir={tmp_path / 'o'}")
    assert_one_line_error(proc, "none")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"output_dir": "SHARDS"}, "input shards' folder"),
        ({"style": "poem"}, "style='poem'"),
        ({"method": "sample"}, "method"),
        ({"rerank": 3}, "rerank=3 needs candidates"),
    ],
)
def test_bad_options_are_user_errors(
    setup: dict[str, Path], tmp_path: Path, options: dict[str, str], message: str
) -> None:
    from t2i_train.data.recaption import recaption as run
    from t2i_train.errors import T2IError

    options = {"output_dir": str(tmp_path / "o"), **options}
    if options["output_dir"] == "SHARDS":
        options["output_dir"] = str(setup["shards"])
    with pytest.raises(T2IError, match=message):
        run(str(setup["ckpt"]), str(setup["shards"]), **options)  # type: ignore[arg-type]
