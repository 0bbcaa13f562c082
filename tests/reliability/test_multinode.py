"""Two "nodes" on localhost: one epoch over real shards, split by node and by data worker, trains on every sample
exactly once (checked with the KeyLog audit callback); the strategies' collective timeout reaches Lightning."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tarfile
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from t2i_train.callbacks.data_audit import KeyLog, read_key_log
from t2i_train.cli.common import CONF_DIR
from t2i_train.data.shards import write_synthetic_shards
from t2i_train.training import build_strategy
from tests.conftest import ROOT

SHARDS, PER_SHARD = 8, 16
BATCH = 6  # 32 samples per data worker: 5 full batches and one of 2, so the last partial batch is covered too
NODES = 2
LAUNCH_TIMEOUT = 240
# torch.distributed / SLURM / torchrun variables of an enclosing job would change what Lightning detects
FOREIGN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["run_dir=/tmp/unused", *overrides])


# ------------------------------------------------------------------------------------ collective timeouts
STRATEGY_FILES = sorted(
    p.stem for p in (CONF_DIR / "strategy").glob("*.yaml") if "_target_" in OmegaConf.load(p)
)


@pytest.mark.parametrize("name", [s for s in STRATEGY_FILES if s != "xla"])
def test_every_distributed_strategy_config_sets_a_ten_minute_timeout(name: str) -> None:
    node = compose_train([f"strategy={name}"]).strategy
    assert instantiate(node.timeout) == timedelta(seconds=600)
    assert "timeout" in get_class(node._target_).__init__.__code__.co_varnames  # Lightning takes it


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_build_strategy_passes_the_timeout_as_a_timedelta(name: str) -> None:
    base = ["trainer.accelerator=cpu", f"strategy={name}"]
    assert build_strategy(compose_train(base))._timeout == timedelta(seconds=600)
    longer = build_strategy(compose_train([*base, "strategy.timeout.seconds=1800"]))
    assert longer._timeout == timedelta(minutes=30)


# ------------------------------------------------------------------------------------------------ KeyLog
def test_key_log_lines_are_on_disk_before_teardown_and_a_resumed_run_appends(tmp_path: Path) -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    batch = {"key": ["000000001", "000000002"], "meta": [{}, {}]}
    first = KeyLog(str(tmp_path))
    first.on_train_batch_end(trainer, None, None, batch, 0)  # type: ignore[arg-type]
    first.on_train_batch_end(trainer, None, None, {"key": ["000000003"]}, 1)  # type: ignore[arg-type]
    path = tmp_path / "keys_rank0.jsonl"
    assert [r["keys"] for r in read_key_log(path)] == [batch["key"], ["000000003"]]  # flushed, still open
    resumed = KeyLog(str(tmp_path))  # a killed run never reached teardown; its successor appends
    resumed.on_train_batch_end(trainer, None, None, {"key": ["000000004"]}, 0)  # type: ignore[arg-type]
    resumed.teardown(trainer, None, "fit")  # type: ignore[arg-type]
    with open(path, "a") as f:
        f.write('{"epoch": 0, "st')  # a line cut short by a kill
    records = read_key_log(path)
    assert [r["keys"] for r in records] == [batch["key"], ["000000003"], ["000000004"]]
    assert records[0] == {"epoch": 0, "step": 0, "batch_idx": 0, "keys": batch["key"]}


# ------------------------------------------------------------------------------------------ two nodes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_env(node_rank: int, port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in FOREIGN_ENV and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))
    }
    env.update(
        NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WANDB_MODE="offline",
    )  # fmt: skip
    return env


def node_command(shards: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "t2i_train", "model=muse", "model.dim=32", "model.depth=1", "model.mlp_dim=64",
        "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=1", f"trainer.num_nodes={NODES}",
        "trainer.max_epochs=1", "trainer.max_steps=-1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "sampling.every_n_steps=0", "checkpoint.every_n_steps=1000",
        "logger=none", "callbacks=key_log", f"data.train_urls={shards}", "data.num_workers=2",
        f"data.batch_size={BATCH}", "data.shuffle_buffer=8", "torch_threads=1", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def run_nodes(shards: Path, run_dir: Path) -> list[tuple[int, str]]:
    """Start both node processes at once; (exit code, stderr tail) of each, killing both past the timeout."""
    port = free_port()
    logs = [open(run_dir.parent / f"node{rank}.log", "w+") for rank in range(NODES)]  # noqa: SIM115
    procs = [
        subprocess.Popen(node_command(shards, run_dir), cwd=ROOT, env=node_env(rank, port), stdout=log,
                         stderr=subprocess.STDOUT)
        for rank, log in enumerate(logs)
    ]  # fmt: skip
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    results = []
    for proc, log in zip(procs, logs):
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            code = proc.wait()
        log.seek(0)
        results.append((code, log.read()[-3000:]))
        log.close()
    return results


@pytest.mark.distributed
def test_two_nodes_train_on_every_key_exactly_once_in_an_epoch(tmp_path: Path) -> None:
    summary = write_synthetic_shards(
        tmp_path / "shards", count=SHARDS * PER_SHARD, samples_per_shard=PER_SHARD, progress=False
    )
    assert len(summary.shards) == SHARDS
    written = set(_keys_in_shards(summary.shards))
    assert len(written) == SHARDS * PER_SHARD

    run_dir = tmp_path / "run"
    for rank, (code, output) in enumerate(run_nodes(tmp_path / "shards", run_dir)):
        assert code == 0, f"node {rank} exited {code}:\n{output}"

    per_rank = []
    for rank in range(NODES):
        records = read_key_log(run_dir / "keys" / f"keys_rank{rank}.jsonl")
        assert records and {r["epoch"] for r in records} == {0}
        per_rank.append([key for r in records for key in r["keys"]])
    for rank, keys in enumerate(per_rank):
        assert len(keys) == len(set(keys)), f"rank {rank} trained on some keys twice"
        assert len(keys) == len(written) // NODES, f"rank {rank} got {len(keys)} samples"
    assert not set(per_rank[0]) & set(per_rank[1]), "both ranks trained on the same keys"
    assert set(per_rank[0]) | set(per_rank[1]) == written


def _keys_in_shards(shards: list[Path]) -> list[str]:
    keys = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys.extend(m.name.split(".")[0] for m in tar if m.name.endswith(".txt"))
    return keys
