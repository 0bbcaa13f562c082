"""Reading families back from training checkpoints and exported weights.

A training checkpoint is Lightning's ``.ckpt`` with two additions written by the task:
``checkpoint["t2i_config"]`` (the whole resolved Hydra config as plain containers) and, when EMA is on,
``checkpoint["ema"]`` (EMA weights keyed like ``model.state_dict()``).

An export (``python -m t2i_train.export``) is a folder: ``model.safetensors`` (the consolidated weights, EMA
when the run had it), ``config.yaml`` (the resolved config) and ``export.json``. Everything that reads a
checkpoint accepts either form. Nothing here runs code stored in a checkpoint (see ``t2i_train.checkpoint_io``).

A family is rebuilt from its stored config by ``build_from_config`` (a small ``_target_`` resolver), not by
``hydra.utils.instantiate``: model constructors read stage-1 checkpoints through this module, and the model
layer never imports Hydra. Which config keys name stage-1 files is declared by each family
(``Family.external_paths``), not guessed from key names.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from t2i_train.checkpoint_io import check_distributed_metadata, load_torch_file, restricted_third_party_loads
from t2i_train.errors import CheckpointError, ConfigError
from t2i_train.models.base import Family
from t2i_train.models.loading import no_weight_loading

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.yaml"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint folder (FSDP2 / ModelParallelStrategy)
LIGHTNING_META = "meta.pt"  # the non-tensor part Lightning writes beside a distributed checkpoint


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training ``.ckpt`` or an export folder, as a dict with ``t2i_config`` and ``state_dict``."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / EXPORT_WEIGHTS).is_file():
        return read_export(path)
    if path.is_dir() and (path / DCP_METADATA).is_file():
        return read_distributed_checkpoint(path)
    if path.is_dir() and (path / "checkpoint").is_dir():
        return read_deepspeed_checkpoint(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder without {EXPORT_WEIGHTS}; pass a .ckpt file or a folder written by t2i_train.export"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass the path of a .ckpt written by training)")
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or "t2i_config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a t2i_train checkpoint (no t2i_config/state_dict inside)")
    return ckpt


# -------------------------------------------------------------------------------------- config -> family
#: keys of a ``_target_`` node that are not constructor arguments (Hydra's, as far as stored configs use them)
_RESERVED = ("_target_", "_args_", "_partial_", "_convert_", "_recursive_")


def resolve_target(path: str) -> Any:
    """The object a dotted ``_target_`` names (``pkg.module.Class`` or ``pkg.module.Class.method``)."""
    parts = str(path).split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError as exc:
            if exc.name and not ".".join(parts[:split]).startswith(exc.name):
                raise  # the module exists but one of its own imports is missing
            continue
        try:
            for name in parts[split:]:
                obj = getattr(obj, name)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"_target_ {path!r} names nothing importable")


def build_from_config(node: Any) -> Any:
    """Build a stored (plain-container, resolved) config: every dict with ``_target_`` is called with its other
    keys, children first and in key order (as ``hydra.utils.instantiate(node, _convert_="all")`` does, so the
    same global RNG draws happen); other dicts and lists are rebuilt as plain containers."""
    if isinstance(node, dict):
        if "_target_" not in node:
            return {k: build_from_config(v) for k, v in node.items()}
        target = resolve_target(node["_target_"])
        args = [build_from_config(v) for v in node.get("_args_", [])]
        kwargs = {k: build_from_config(v) for k, v in node.items() if k not in _RESERVED}
        if node.get("_partial_"):
            import functools

            return functools.partial(target, *args, **kwargs)
        return target(*args, **kwargs)
    if isinstance(node, (list, tuple)):
        return [build_from_config(v) for v in node]
    return node


def _family_class(node: Any) -> type[Family] | None:
    target = node.get("_target_") if isinstance(node, dict) else None
    if not target:
        return None
    try:
        cls = resolve_target(target)
    except (ConfigError, ImportError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Family) else None


def upgrade_model_config(node: Any) -> Any:
    """A stored model config in today's argument names (``Family.upgrade_config`` of its class)."""
    cls = _family_class(node)
    return cls.upgrade_config(dict(node)) if cls is not None else node


def _map_external_paths(node: Any, change: Callable[[str], str | None], resources: bool = False) -> Any:
    """Copy of a model config with each path its family declares in ``external_paths`` (dotted, from the
    family's own node) replaced by ``change(path)``, and those in ``resource_paths`` too when ``resources``;
    nested families' declarations apply under their node."""
    if isinstance(node, list):
        return [_map_external_paths(v, change, resources) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _map_external_paths(v, change, resources) for k, v in node.items()}
    cls = _family_class(node)
    declared = [*cls.external_paths, *(cls.resource_paths if resources else ())] if cls is not None else []
    for dotted in declared:
        *parents, key = dotted.split(".")
        holder: Any = out
        for name in parents:
            holder = holder.get(name) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and holder[key]:
            holder[key] = change(holder[key])
    return out


def without_stage1_paths(node: Any) -> Any:
    """Copy of a model config with every stage-1 path (``Family.external_paths``) set to None.

    Used when the stage-1 weights are inside the checkpoint's state dict: rebuilding the architecture must
    not require the stage-1 files to still exist.
    """
    return _map_external_paths(node, lambda path: None)


def absolute_stage1_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Copy of a run config whose model's existing relative stage-1 paths (``Family.external_paths``) and
    resource paths (``Family.resource_paths``) are made absolute.

    Training checkpoints name their stage-1 sources (their weights are left out, see ``load_family``), so the
    saved config must still find them when sampling runs from another working directory.
    """

    def absolute(path: str) -> str:
        expanded = Path(path).expanduser()
        return str(expanded.resolve()) if expanded.exists() else path

    if not isinstance(config.get("model"), dict):
        return config
    return {**config, "model": _map_external_paths(config["model"], absolute, resources=True)}


def model_state_dict(ckpt: dict[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if use_ema and ckpt.get("ema"):
        state.update(ckpt["ema"])
    return state


def fit_one_element_shapes(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Reshape one-element tensors to the model's shape: FSDP2 runs hold 0-d parameters as [1]
    (``t2i_train.task.promote_scalar_parameters``), a fresh build holds them as scalars."""
    own = dict(model.state_dict(keep_vars=True))
    for key, value in state.items():
        mine = own.get(key)
        if mine is not None and value.numel() == 1 == mine.numel() and value.shape != mine.shape:
            state[key] = value.reshape(mine.shape)
    return state


def load_family(path: str | Path, use_ema: bool = True, ckpt: dict[str, Any] | None = None) -> Family:
    """Rebuild the family stored in a training checkpoint, with its (EMA) weights, in eval mode.

    ``ckpt``: the already-read checkpoint at ``path`` (saves reading a big file twice).

    A checkpoint that holds every weight is rebuilt with weight loading off (nothing downloaded, no stage-1
    file read). One that left its frozen pretrained / stage-1 parts out (``t2i_external``, written by the task)
    rebuilds them from their sources named in the config, which must still be there; an export folder
    (``python -m t2i_train.export``) holds everything and stands alone.
    """
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    model_cfg = upgrade_model_config(ckpt["t2i_config"]["model"])
    cls = _family_class(model_cfg)
    renamed = cls.renamed_parts if cls is not None else {}
    external = [renamed.get(name, name) for name in ckpt.get("t2i_external") or []]
    if external:
        model = _build_with_external_weights(path, model_cfg, external)
        fingerprints = ckpt.get("t2i_external_fingerprint", {})
        check_external_fingerprints(model, {renamed.get(k, k): v for k, v in fingerprints.items()}, path)
    else:
        with no_weight_loading():
            model = build_from_config(without_stage1_paths(model_cfg))
    state = fit_one_element_shapes(model_state_dict(ckpt, use_ema), model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    prefixes = tuple(f"{name}." for name in external)
    missing = [key for key in missing if not key.startswith(prefixes)]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its model config: missing={list(missing)[:5]} unexpected={list(unexpected)[:5]}"
        )
    return model.eval()


def weights_fingerprint(module: torch.nn.Module) -> float:
    """A cheap number that changes when any floating-point weight of ``module`` does (sum + sum of squares)."""
    total = 0.0
    for tensor in module.state_dict().values():
        if tensor.is_floating_point() and tensor.device.type != "meta":
            t = tensor.detach().double()
            total += float(t.sum()) + float(t.square().sum())
    return total


def check_external_fingerprints(model: Family, saved: dict[str, float], source: str | Path) -> None:
    """Raise when a frozen part rebuilt from its source is not the one the run trained with."""
    for name, expected in (saved or {}).items():
        module = getattr(model, name, None)
        if module is None:
            continue
        if not math.isclose(weights_fingerprint(module), expected, rel_tol=1e-6, abs_tol=1e-6):
            raise CheckpointError(
                f"{source}: the frozen {name} loaded from its source differs from the one this run was trained "
                "with (was the stage-1 checkpoint retrained or overwritten?); point the config at the original"
            )


def _build_with_external_weights(path: str | Path, model_cfg: dict[str, Any], external: list[str]) -> Family:
    try:
        return build_from_config(model_cfg)
    except Exception as exc:
        raise CheckpointError(
            f"{path} leaves out its frozen {', '.join(external)} weights, which come from the sources in its "
            f"config, and they could not be loaded ({(str(exc).splitlines() or [type(exc).__name__])[0]}); restore them or use an "
            "export folder (python -m t2i_train.export), which holds every weight"
        ) from exc


def read_export(folder: Path) -> dict[str, Any]:
    """An export folder in the shape of a training checkpoint (weights already EMA where the run had EMA)."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    config_path = folder / EXPORT_CONFIG
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder} has {EXPORT_WEIGHTS} but no {EXPORT_CONFIG}; re-run t2i_train.export"
        )
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    weights = load_file(str(folder / EXPORT_WEIGHTS))
    return {"t2i_config": config, "state_dict": {f"model.{k}": v for k, v in weights.items()}}


def read_distributed_checkpoint(folder: Path) -> dict[str, Any]:
    """A sharded checkpoint folder written under ``strategy=fsdp2``, consolidated on CPU (no process group)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    check_distributed_metadata(folder)
    meta_path = folder / LIGHTNING_META
    meta = load_torch_file(meta_path) if meta_path.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        full_path = Path(tmp) / "full.pt"
        try:
            with restricted_third_party_loads():
                dcp_to_torch_save(str(folder), str(full_path))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read distributed checkpoint {folder}: {exc}") from exc
        full = load_torch_file(full_path)
    checkpoint = {**meta, **full}
    if "t2i_config" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{folder} is not a t2i_train checkpoint (no t2i_config/state_dict inside)")
    return checkpoint


def read_deepspeed_checkpoint(folder: Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint folder (``strategy=deepspeed_stage_*``), consolidated with Lightning's converter."""
    import tempfile

    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.ckpt"
        try:
            with restricted_third_party_loads():
                convert_zero_checkpoint_to_fp32_state_dict(str(folder), str(out))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read DeepSpeed checkpoint {folder}: {exc}") from exc
        checkpoint = load_torch_file(out)
    if "t2i_config" not in checkpoint:
        raise CheckpointError(f"{folder} is not a t2i_train checkpoint (no t2i_config inside)")
    return checkpoint
