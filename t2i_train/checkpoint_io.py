"""Safe checkpoint files: nothing in a checkpoint can run code, and a save is never half-written.

Loading. Every ``.ckpt`` / ``.pt`` is read with ``torch.load(weights_only=True)``: tensors, plain containers and
the few types torch allows, never arbitrary pickled objects (a crafted ``__reduce__`` would otherwise run
``os.system`` the moment the file is opened). The ``.metadata`` pickle of a ``torch.distributed.checkpoint``
folder (FSDP2), which torch reads with plain ``pickle``, is first replayed through an unpickler that only
accepts the checkpoint-metadata classes. A file that needs anything else is refused with one line naming the
first object it wanted and the opt-in for a file you trust: ``trust_checkpoint=true`` on any command line (it
sets ``T2I_TRUST_CHECKPOINT=1``, which spawned ranks inherit). The CLIs also set torch's own
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` for the whole process unless trusted, so third-party code paths inside
Lightning, DCP or DeepSpeed that pass ``weights_only=False`` are restricted too.

Saving. :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the *same folder* as the
target, fsyncs it, renames it over the target and fsyncs the folder, so a kill at any moment leaves either the
old file or the new one, whatever ``$TMPDIR`` is (fsspec's transaction, which Lightning uses by default, writes
the temporary file under ``$TMPDIR`` and falls back to an in-place copy across filesystems). Temporary files
orphaned by a killed save are removed when the next run starts (:func:`remove_orphaned_temp_files`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from t2i_train.errors import CheckpointError

log = logging.getLogger(__name__)

TRUST_ENV = "T2I_TRUST_CHECKPOINT"
TRUST_ARG = "trust_checkpoint"
TORCH_FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
TEMP_MARK = ".tmp-"
_TRUE = ("1", "true", "yes", "on")
_UNSAFE_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
# ``.metadata`` of a torch.distributed.checkpoint folder: the classes torch itself writes there
_DCP_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_DCP_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


# --------------------------------------------------------------------------------------------- trust
def checkpoints_trusted() -> bool:
    """Whether the user opted in to loading checkpoints that hold arbitrary pickled objects."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in _TRUE


def apply_trust_argument(argv: list[str]) -> list[str]:
    """Take ``trust_checkpoint=true|false`` out of a command line and apply it to this process.

    Every CLI calls this first, whatever its own argument syntax. Trusted: ``T2I_TRUST_CHECKPOINT=1`` (inherited
    by spawned ranks). Not trusted (the default): ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, so every ``torch.load`` in
    the process, ours or a library's, refuses pickled code.
    """
    rest = []
    for item in argv:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+~") == TRUST_ARG:
            os.environ[TRUST_ENV] = "1" if value.strip().lower() in _TRUE else "0"
        else:
            rest.append(item)
    if checkpoints_trusted():
        os.environ.pop(TORCH_FORCE_ENV, None)
    else:
        os.environ[TORCH_FORCE_ENV] = "1"
    return rest


@contextlib.contextmanager
def _forced_weights_only(enabled: bool) -> Iterator[None]:
    """``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` for the duration (third-party readers that pass weights_only=False)."""
    previous = os.environ.get(TORCH_FORCE_ENV)
    if enabled:
        os.environ[TORCH_FORCE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TORCH_FORCE_ENV, None)
        else:
            os.environ[TORCH_FORCE_ENV] = previous


def refusal(path: str | Path, detail: str) -> CheckpointError:
    """The one-line refusal of a checkpoint that wants to unpickle something other than plain data."""
    return CheckpointError(
        f"refusing to load {path}: it holds a pickled object that is not plain data ({detail}), and loading it "
        f"could run code from the file; if you trust where it came from, pass {TRUST_ARG}=true"
    )


def _unsafe_detail(exc: BaseException) -> str | None:
    """The global a weights-only load refused, or None when ``exc`` is not such a refusal."""
    text = str(exc)
    match = _UNSAFE_GLOBAL.search(text)
    if match:
        return match.group(1)
    if "Weights only load failed" in text:
        return text.strip().splitlines()[-1][:200]
    return None


# ------------------------------------------------------------------------------------------- loading
def load_torch_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` that never runs pickled code unless the user trusts checkpoints; one-line errors."""
    path = Path(path)
    trusted = checkpoints_trusted()
    try:
        with _forced_weights_only(not trusted):
            return torch.load(path, map_location=map_location, weights_only=not trusted, mmap=mmap)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {path}") from exc
    except Exception as exc:
        detail = None if trusted else _unsafe_detail(exc)
        if detail is not None:
            raise refusal(path, detail) from exc
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        value = super().find_class(module, name) if module in ("torch", *_DCP_METADATA_MODULES) else None
        if module == "torch" and isinstance(value, torch.dtype):
            return value
        if module in _DCP_METADATA_MODULES and isinstance(value, type) and value.__module__ == module:
            return value
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def check_distributed_metadata(folder: str | Path) -> None:
    """Refuse a DCP folder whose ``.metadata`` pickle holds anything but checkpoint metadata (torch reads it
    with plain ``pickle.load``)."""
    path = Path(folder) / ".metadata"
    if checkpoints_trusted():
        return
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{folder} is not a distributed checkpoint (no .metadata inside)") from exc
    except pickle.UnpicklingError as exc:
        raise refusal(path, _unsafe_detail(exc) or str(exc)) from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def restricted_third_party_loads() -> Iterator[None]:
    """Run DCP / DeepSpeed readers (which call ``torch.load(weights_only=False)``) with weights-only forced,
    unless trusted; their refusals become one-line CheckpointErrors."""
    trusted = checkpoints_trusted()
    try:
        with _forced_weights_only(not trusted):
            yield
    except CheckpointError:
        raise
    except Exception as exc:
        detail = None if trusted else _unsafe_detail(exc)
        if detail is not None:
            raise refusal("the checkpoint", detail) from exc
        raise


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be resumed from (unreadable, truncated, unsafe), or None when it loads.

    Files are opened weights-only with ``mmap`` (tensors are not read), so this is cheap even for big
    checkpoints; distributed-checkpoint folders get their ``.metadata`` checked.
    """
    path = Path(path)
    try:
        if path.is_dir():
            check_distributed_metadata(path)
            meta = path / "meta.pt"
            if meta.is_file():
                load_torch_file(meta)
            return None
        if path.stat().st_size == 0:
            return "it is empty (0 bytes: a save that was killed)"
        if not zipfile.is_zipfile(path):
            return "it is not a complete torch checkpoint (truncated or foreign file)"
        load_torch_file(path, mmap=True)
    except CheckpointError as exc:
        return str(exc)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# -------------------------------------------------------------------------------------------- saving
def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened/fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` through a temporary file beside it: fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _is_remote(path: str | Path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with same-folder atomic saves and weights-only loads (module docstring).

    Remote paths (``s3://...``) keep Lightning's fsspec behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or _is_remote(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
        return None

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        if _is_remote(path):
            return super().load_checkpoint(path, map_location, weights_only=not checkpoints_trusted())
        return load_torch_file(path, map_location=map_location or "cpu")


def remove_orphaned_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files killed saves left in ``folder`` (``.<name>.tmp-<pid>-<id>``); returns them.

    Called once at start-up, before this run saves anything.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(f".*{TEMP_MARK}*"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    if removed:
        log.warning("removed %d temporary file(s) left by an interrupted save in %s", len(removed), folder)
    return removed
