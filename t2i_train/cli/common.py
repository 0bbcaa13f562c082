"""Pieces shared by the thin CLI entry points: config location, argument checks, one-line errors."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from t2i_train.errors import T2IError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = (
    "model",
    "loss",
    "data",
    "optimizer",
    "scheduler",
    "strategy",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
    "hparams_search",
)
F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("t2i_train")


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit with ``code``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def user_message(exc: BaseException) -> str:
    """The one line to show for a user-fixable error.

    Exceptions raised in DataLoader workers come back wrapped with the worker's whole traceback; the
    meaningful message is its last line.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def check_group_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Fail with one line when an override names a config-group option that does not exist.

    Hydra's own message for this is a multi-line dump of the search path; users deserve one line.
    """
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key.startswith("override "):
            key = key[len("override ") :].strip()
        key = key.lstrip("/")
        if key not in GROUPS or value in ("", "null"):
            continue
        options = _group_options(conf_dir / key)
        for choice in value.split(","):  # multirun sweeps: model=muse,vqgan
            if choice.strip() and choice.strip() not in options:
                fail(f"unknown {key} '{choice}'; choose one of: {', '.join(sorted(options))}")


def allow_new_keys(argv: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """Rewrite ``prefix.key=value`` as ``++prefix.key=value`` for free-form dict nodes.

    Sampling keyword arguments differ per family, so ``sampling.steps=12`` must work whether or not the config
    already names ``steps`` (Hydra's struct mode would otherwise demand ``+`` or ``++``).
    """
    return [f"++{a}" if "=" in a and a.startswith(prefixes) else a for a in argv]


def _group_options(group_dir: Path) -> set[str]:
    return {str(p.relative_to(group_dir).with_suffix("")) for p in group_dir.rglob("*.yaml")}


def user_errors_exit(fn: F) -> F:
    """Turn T2IError (and the data errors workers re-raise) into one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except T2IError as exc:
            fail(user_message(exc))
        except Exception as exc:
            if "t2i_train.errors." in str(exc):  # a T2IError re-raised by a DataLoader worker
                fail(user_message(exc))
            raise

    return wrapper  # type: ignore[return-value]


def quiet_third_party() -> None:
    """Offline-friendly defaults: wandb offline, no telemetry, no tokenizer fork warnings."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")


def run_shard_job(job: Callable[..., dict[str, Any]], args: dict[str, Any]) -> None:
    """The shard-to-shard CLIs' ``main``: INFO logging, quiet libraries, ``job(**args)`` with user errors as
    one line, and its summary printed as JSON."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    quiet_third_party()
    print(json.dumps(user_errors_exit(job)(**args), indent=2))


def parse_shard_job_args(
    argv: list[str],
    doc: str,
    prog: str,
    allowed: set[str],
    ints: tuple[str, ...] = (),
    floats: tuple[str, ...] = (),
    bools: tuple[str, ...] = (),
    zero_ok: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``key=value`` arguments of the shard-to-shard CLIs (encode, recaption): checked, typed, one line on error.

    ``checkpoint``, ``input_urls`` and ``output_dir`` are required; ``ints`` must be positive (``zero_ok`` ones may
    be 0); ``input_urls='[a,b]'`` becomes a list.
    """
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        sys.exit(0 if argv else 2)
    args: dict[str, Any] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"expected key=value, got '{item}' (see `{prog} --help`)")
        if key not in allowed:
            fail(f"unknown argument '{key}'; arguments: {', '.join(sorted(allowed))}")
        args[key] = value
    for key in ("checkpoint", "input_urls", "output_dir"):
        if key not in args:
            fail(f"missing {key}=... (see `{prog} --help`)")
    for key in set(ints) & set(args):
        if not args[key].isdigit() or (int(args[key]) < 1 and key not in zero_ok):
            fail(f"{key} must be a positive integer, got '{args[key]}'")
        args[key] = int(args[key])
    for key in set(floats) & set(args):
        try:
            args[key] = float(args[key])
        except ValueError:
            fail(f"{key} must be a number, got '{args[key]}'")
    for key in set(bools) & set(args):
        args[key] = args[key].lower() in ("1", "true", "yes")
    if str(args["input_urls"]).startswith("["):
        args["input_urls"] = [u.strip().strip("'\"") for u in args["input_urls"].strip("[]").split(",")]
    return args
