"""Training as a library: build the task, strategy, callbacks, loggers and trainer from a composed config, and
fit (``train``). ``python -m t2i_train`` (``t2i_train.cli.train``) parses overrides and calls ``train``; the
multi-stage recipes (``t2i_train.recipes``) call it once per stage."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from t2i_train.callbacks.preemption import SaveOnSignal
from t2i_train.callbacks.startup_log import startup_log_callback
from t2i_train.checkpoint import absolute_stage1_paths
from t2i_train.checkpoint_io import (
    AtomicCheckpointIO,
    checkpoint_problem,
    checkpoints_trusted,
    remove_orphaned_temp_files,
)
from t2i_train.errors import EXIT_STOPPED, CheckpointError, ConfigError
from t2i_train.models.base import Family
from t2i_train.run_state import (
    data_summary,
    disarm_child_process_observer,
    gather_data_counts,
    is_lost_peer_error,
    lost_rank_error,
    newest_readable_checkpoint,
    release_process_group,
    resume_command,
    write_data_report,
)

log = logging.getLogger("t2i_train")


def build_task(cfg: DictConfig, model: Family | None = None) -> L.LightningModule:
    """The family's task (``model.task_class``) with its loss, optimizer, schedule and EMA."""
    model = model if model is not None else instantiate(cfg.model, _convert_="all")
    loss = instantiate(cfg.loss, _convert_="all")
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") and "_target_" in cfg.scheduler else None
    task_cls = get_class(model.task_class)
    task = task_cls(
        model=model,
        loss=loss,
        optimizer=instantiate(cfg.optimizer),
        scheduler=scheduler,
        ema_decay=cfg.get("ema_decay"),
        max_nonfinite_steps=int(cfg.get("nonfinite", {}).get("max_consecutive", 5)),
        check_grads_finite=bool(cfg.get("nonfinite", {}).get("check_grads", True)),
        **instantiate(cfg.get("task") or {}, _convert_="all"),
    )
    # stage-1 paths made absolute: checkpoints leave those weights out and name where to read them again
    task.run_config = absolute_stage1_paths(OmegaConf.to_container(cfg, resolve=True))
    task.step_seed = int(cfg.seed)
    if cfg.get("compile"):
        count = model.compile_blocks()
        log.info("torch.compile: %d %s blocks compiled", count, model.family_name)
    return task


GPU_ONLY_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")
FAMILY_POLICY = "family"


def build_strategy(cfg: DictConfig, model: Family | None = None) -> Any:
    """The Lightning strategy of ``cfg.strategy``, with the family's blocks as the FSDP wrap policy."""
    node = cfg.get("strategy") or {"name": "auto"}
    if "_target_" not in node:
        return node.get("name", "auto")
    target = str(node["_target_"]).rsplit(".", 1)[-1]
    check_strategy_fits(target, cfg)
    extra: dict[str, Any] = {}
    if target == "FSDPStrategy" and model is not None:
        blocks = set(model.block_classes)
        for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
            if node.get(key) == FAMILY_POLICY:
                if not blocks:
                    raise ConfigError(
                        f"strategy.{key}=family: model={model.family_name} declares no block classes"
                    )
                extra[key] = blocks
        frozen = list(model.frozen_modules().values())
        if frozen:
            extra["ignored_modules"] = frozen  # frozen encoders: neither sharded nor in the optimizer
    if target == "ModelParallelStrategy" and node.get("data_parallel_size") == "auto":
        # Lightning's "auto" is one data-parallel group per node; FSDP2 here shards over every process
        devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
        tensor_parallel = node.get("tensor_parallel_size", 1)
        if isinstance(devices, int) and isinstance(tensor_parallel, int):
            extra["data_parallel_size"] = devices * int(nodes) // tensor_parallel
    return instantiate(node, **extra, _convert_="all")


def check_strategy_fits(target: str, cfg: DictConfig) -> None:
    """One clear line instead of a deep Lightning error for strategies this machine cannot run."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if target in GPU_ONLY_STRATEGIES and on_cpu:
        raise ConfigError(
            f"strategy {target} needs GPUs (trainer.accelerator={accelerator}, CUDA available: "
            f"{torch.cuda.is_available()}); on CPU use strategy=ddp or strategy=fsdp2"
        )
    if target == "XLAStrategy" and importlib.util.find_spec("torch_xla") is None:
        raise ConfigError("strategy=xla needs torch_xla (a TPU VM: pip install torch_xla)")


def build_callbacks(cfg: DictConfig, sample_prompts: list[str]) -> list[L.Callback]:
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        if name == "progress" and not cfg.trainer.get("enable_progress_bar", True):
            continue
        if name == "lr_monitor" and not any(
            n and "_target_" in n for n in (cfg.get("logger") or {}).values()
        ):
            continue  # Lightning refuses a LearningRateMonitor without a logger (logger=none)
        extra = {"prompts": sample_prompts} if name == "samples" else {}
        callbacks.append(instantiate(node, **extra, _convert_="all"))
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any] | bool:
    loggers = [
        instantiate(node) for node in (cfg.get("logger") or {}).values() if node and "_target_" in node
    ]
    return loggers or False


def sample_prompts_for(cfg: DictConfig, datamodule: Any) -> list[str]:
    if cfg.sampling.get("prompts"):
        return list(cfg.sampling.prompts)
    prompts = datamodule.sample_prompts() if hasattr(datamodule, "sample_prompts") else []
    return list(prompts)[: cfg.sampling.get("num_prompts", 16)]


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint to continue from: None, an explicit path, or (``auto``) the newest *readable* of the run
    dir's ``checkpoints/last.ckpt``, its step checkpoints and the ``hpc_ckpt_<n>.ckpt`` Lightning writes on
    SLURM's requeue signal (see ``t2i_train.run_state.newest_readable_checkpoint``)."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        newest = newest_readable_checkpoint(run_dir)
        if newest is not None:
            log.info("resuming from %s", newest)
            return str(newest)
        log.info("resume=auto: no checkpoint in %s yet, starting fresh", run_dir / "checkpoints")
        return None
    path = Path(resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"resume={resume}: no such checkpoint file (use resume=auto or a .ckpt path)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(problem if problem.startswith("refusing") else f"resume={resume}: {problem}")
    return str(path)


def last_checkpoint_is_current(trainer: L.Trainer, last: Path) -> bool:
    """Whether ``last.ckpt`` already holds the final step (the periodic save may have landed earlier)."""
    saved = getattr(trainer.checkpoint_callback, "_last_global_step_saved", None)
    return last.exists() and saved == trainer.global_step


def planned_world_size(cfg: DictConfig) -> int | None:
    """Processes the run will have (``trainer.devices`` x ``trainer.num_nodes``), when the config says."""
    devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    if isinstance(devices, int) and isinstance(nodes, int):
        return devices * nodes
    if isinstance(devices, (list, tuple)) and isinstance(nodes, int):
        return len(devices) * nodes
    return None


def check_before_spawn(cfg: DictConfig, datamodule: Any) -> None:
    """Errors that would otherwise be raised once per rank after Lightning starts the processes."""
    world = planned_world_size(cfg)
    if world and world > 1 and hasattr(datamodule, "check_world_size"):
        datamodule.check_world_size(world)


def build_trainer(cfg: DictConfig, task: L.LightningModule, datamodule: Any) -> L.Trainer:
    trainer_overrides: dict[str, Any] = {}
    if not task.automatic_optimization:  # Lightning refuses Trainer-level clipping under manual optimization
        task.gradient_clip_val = cfg.trainer.get("gradient_clip_val")
        trainer_overrides["gradient_clip_val"] = None
    strategy = build_strategy(cfg, task.model)
    if isinstance(strategy, str) or type(strategy).__name__ in ("DDPStrategy", "FSDPStrategy"):
        trainer_overrides["plugins"] = [AtomicCheckpointIO()]  # ModelParallel / DeepSpeed write folders
    return instantiate(
        cfg.trainer,
        **trainer_overrides,
        strategy=strategy,
        # first: prints Lightning's held start-up output once training starts (cli.common holds it until then)
        callbacks=[startup_log_callback(), *build_callbacks(cfg, sample_prompts_for(cfg, datamodule))],
        logger=build_loggers(cfg),
        _convert_="all",
    )


def stopped_by_signal(trainer: L.Trainer) -> str | None:
    """``SIGTERM``/``SIGUSR1`` when the run stopped early on such a signal (and saved), else None."""
    for callback in trainer.callbacks:
        if isinstance(callback, SaveOnSignal) and callback.stopped_by:
            return callback.stopped_by
    return None


def fit(
    trainer: L.Trainer, task: L.LightningModule, datamodule: Any, ckpt_path: str | None, run_dir: Path
) -> None:
    """``trainer.fit`` with a lost peer process turned into one line (``run_state.lost_rank_error``)."""
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not checkpoints_trusted())
    except SIGTERMException:
        return  # SaveOnSignal wrote last.ckpt; train() reports and exits with EXIT_STOPPED
    except Exception as exc:
        if trainer.world_size > 1 and is_lost_peer_error(exc):
            disarm_child_process_observer()
            raise lost_rank_error(exc, trainer, run_dir) from exc
        raise


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg`` and fit; returns where the results are.

    Raises ``SystemExit(EXIT_STOPPED)`` after saving when a stop signal ended the run early.
    """
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    run_dir = Path(cfg.run_dir)
    if rank_zero_only.rank == 0:
        remove_orphaned_temp_files(run_dir / "checkpoints")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    task = build_task(cfg)
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    check_before_spawn(cfg, datamodule)
    ckpt_path = resolve_resume(cfg.get("resume"), run_dir)
    trainer = build_trainer(cfg, task, datamodule)
    fit(trainer, task, datamodule, ckpt_path, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    stopped = stopped_by_signal(trainer)
    if not stopped and not last_checkpoint_is_current(trainer, last):
        trainer.save_checkpoint(last)  # every rank calls it: a collective under sharded strategies
    report = gather_data_counts(task, trainer)
    result = {"run_dir": str(run_dir), "last_checkpoint": str(last), "global_step": trainer.global_step}
    result["caption_counts"] = dict(task.caption_counts)  # training samples per caption key (blending)
    result["data"] = report
    if len(task.caption_counts) > 1:
        log.info("captions used per key: %s", task.caption_counts)
    if trainer.is_global_zero:
        write_data_report(report, run_dir, trainer.global_step)
    if stopped:
        if trainer.is_global_zero:
            log.info(
                "stopped by %s at step %d (%s); checkpoint: %s; continue with: %s",
                stopped, trainer.global_step, data_summary(report), last, resume_command(run_dir),
            )  # fmt: skip
        release_process_group()
        raise SystemExit(EXIT_STOPPED)
    metric = cfg.get("optimized_metric")
    if metric:
        result["optimized_metric"] = read_metric(trainer, metric)
    if trainer.is_global_zero:
        log.info("finished at step %d; %s; checkpoint: %s", trainer.global_step, data_summary(report), last)
    release_process_group()
    return result


def read_metric(trainer: L.Trainer, name: str) -> float:
    """The last logged value of ``name`` (what a sweeper such as Optuna minimises)."""
    metrics = trainer.callback_metrics
    if name not in metrics:
        raise ConfigError(
            f"optimized_metric={name} was never logged; logged metrics: {', '.join(sorted(metrics)) or 'none'}"
        )
    return float(metrics[name])
