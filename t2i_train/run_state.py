"""What a training run leaves for the next one: which checkpoint to resume from, how to resume, what the data
lost, and a one-line account of a distributed run that lost a process.

Kept out of the CLI so the rules are testable on their own and the launcher only reports.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from t2i_train.checkpoint_io import checkpoint_problem
from t2i_train.errors import T2IError

log = logging.getLogger("t2i_train")

DATA_REPORT = "data_report.json"
# text of the errors torch.distributed raises in a survivor when a peer process is gone
LOST_PEER_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "Watchdog caught collective operation timeout",
    "ProcessGroupNCCL is shutting down",
    "Socket Timeout",
)


class LostRank(T2IError):
    """Another process of a distributed run died; the survivors stop with this (exit code 3)."""

    exit_code = 3


# -------------------------------------------------------------------------------------------- resuming
def resume_candidates(run_dir: Path) -> list[Path]:
    """``last.ckpt``, the step checkpoints and Lightning's ``hpc_ckpt_<n>.ckpt``, newest first."""
    checkpoints = run_dir / "checkpoints"
    candidates = [
        checkpoints / "last.ckpt",
        *checkpoints.glob("step_*.ckpt"),
        *run_dir.glob("hpc_ckpt_*.ckpt"),
    ]
    existing = [path for path in candidates if path.exists()]  # sharded checkpoints are folders
    return sorted(existing, key=lambda path: path.stat().st_mtime, reverse=True)


def newest_readable_checkpoint(run_dir: Path) -> Path | None:
    """The newest candidate that loads; each unreadable one (a 0-byte file from a killed copy, a truncated
    file) is named in a warning and passed over. A refused unsafe file stops the search: it is an error."""
    for path in resume_candidates(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if problem.startswith("refusing to load"):
            from t2i_train.errors import CheckpointError

            raise CheckpointError(problem)
        log.warning("resume=auto: skipping %s: %s", path, problem)
    return None


#: set by launchers that run training stages themselves (``python -m t2i_train.pipeline``): re-running that
#: command, not ``python -m t2i_train``, is what continues the run
_launcher_command: str | None = None


def set_continue_command(command: str | None) -> None:
    """Make ``resume_command`` answer ``command`` (the launcher's own command line), or the default again."""
    global _launcher_command
    _launcher_command = command


def resume_command(run_dir: Path, argv: list[str] | None = None) -> str:
    """The command that continues this run: the same overrides plus ``resume=auto`` and the run dir (or the
    launcher's command set by ``set_continue_command``)."""
    if _launcher_command is not None and argv is None:
        return _launcher_command
    argv = list(sys.argv[1:] if argv is None else argv)
    keep = [a for a in argv if a.split("=", 1)[0].lstrip("+~") not in ("resume", "hydra.run.dir")]
    return shlex.join(["python", "-m", "t2i_train", *keep, "resume=auto", f"hydra.run.dir={run_dir}"])


# ------------------------------------------------------------------------------------------ lost ranks
def is_lost_peer_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is torch.distributed reporting a peer process gone."""
    import torch.distributed as dist

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, getattr(dist, "DistNetworkError", ())) or any(
            marker in str(exc) for marker in LOST_PEER_MARKERS
        ):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1  # type: ignore[assignment]
    return False


def describe_lost_ranks(trainer: Any) -> str:
    """Which rank is gone, as far as this process can tell.

    Rank 0 started the other local ranks (Lightning's subprocess launcher) and can see which exited; a
    started rank whose parent is gone knows rank 0 died; otherwise it is "another rank".
    """
    world = getattr(trainer, "world_size", 0) or 0
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    procs = getattr(launcher, "procs", None) or []
    dead = []
    for index, proc in enumerate(procs, start=1):
        code = proc.poll()
        if code is not None and code != 0:
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            rank = getattr(trainer, "node_rank", 0) * getattr(trainer, "num_devices", len(procs) + 1) + index
            dead.append(f"rank {rank} ({how})")
    if dead:
        return f"{', '.join(dead)} of {world} died"
    if os.environ.get("LOCAL_RANK", "0") != "0" and os.getppid() == 1:
        return f"rank 0 of {world} died"
    return f"another of the {world} processes stopped"


def disarm_child_process_observer() -> None:
    """Stop Lightning's child-process observer from SIGKILLing this process.

    In a DDP run started by Lightning's subprocess launcher, a thread of rank 0 polls the other ranks every
    5 s and, when one has died, SIGKILLs everything including rank 0 itself. Once rank 0 has seen the loss and
    is reporting it (one line, exit code 3), that kill would land mid-report, so the observer is told it is done.
    """
    import threading

    for thread in threading.enumerate():
        if thread.name == "child-process-observer" and hasattr(thread, "_run"):
            thread._run = lambda: True  # type: ignore[attr-defined]
            thread._finished = True  # type: ignore[attr-defined]


def lost_rank_error(exc: BaseException, trainer: Any, run_dir: Path) -> LostRank:
    """The one-line account of a lost process: who, where the run stands, the command that continues it."""
    newest = resume_candidates(run_dir)
    where = f"the newest checkpoint is {newest[0]}" if newest else "no checkpoint was written yet"
    return LostRank(
        f"{describe_lost_ranks(trainer)} at step {getattr(trainer, 'global_step', '?')} "
        f"({type(exc).__name__}); {where}; continue with: {resume_command(run_dir)}"
    )


# ----------------------------------------------------------------------------------------- data report
def gather_data_counts(task: Any, trainer: Any) -> dict[str, Any]:
    """The data the run trained on and lost, summed over ranks."""
    import torch.distributed as dist

    local = {
        "samples_trained": int(getattr(task, "samples_trained", 0)),
        "samples_skipped": int(getattr(task, "skipped_samples", 0)),
        "bad_shards": list(getattr(task, "bad_shards", [])),
        "nonfinite_steps_skipped": int(getattr(getattr(task, "guard", None), "skipped_total", 0)),
    }
    parts = [local]
    if getattr(trainer, "world_size", 1) > 1 and dist.is_available() and dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    report = {
        "samples_trained": sum(p["samples_trained"] for p in parts),
        "samples_skipped": sum(p["samples_skipped"] for p in parts),
        "bad_shards": sorted({s for p in parts for s in p["bad_shards"]}),
        "nonfinite_steps_skipped": max(p["nonfinite_steps_skipped"] for p in parts),
    }
    seen = report["samples_trained"] + report["samples_skipped"]
    report["skip_rate"] = report["samples_skipped"] / seen if seen else 0.0
    return report


def write_data_report(report: dict[str, Any], run_dir: Path, step: int) -> Path:
    path = run_dir / DATA_REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"global_step": step, **report}, indent=2) + "\n")
    return path


def data_summary(report: dict[str, Any]) -> str:
    """``12,345 samples trained, 3 skipped (0.02%), 1 damaged shard`` for the final log line."""
    text = (
        f"{report['samples_trained']:,} samples trained, {report['samples_skipped']:,} skipped "
        f"({100 * report['skip_rate']:.2f}%)"
    )
    shards = len(report["bad_shards"])
    if shards:
        text += f", {shards} damaged shard{'s' if shards != 1 else ''}"
    if report.get("nonfinite_steps_skipped"):
        text += f", {report['nonfinite_steps_skipped']} non-finite steps skipped"
    return text


def release_process_group() -> None:
    """Destroy the default process group once a run has finished (or stopped) cleanly.

    Lightning leaves it alive; at interpreter exit gloo's worker threads are then torn down during
    finalisation and the process can abort with ``terminate called without an active exception``
    (exit -6) after a run that finished. Not called after a lost peer: there, tearing down could block.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
