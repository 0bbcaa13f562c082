"""Pieces shared by the thin CLI entry points: config location, argument checks, one-line errors."""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import itertools
import json
import logging
import os
import re
import shutil
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from t2i_train.errors import EXIT_USER_ERROR, ConfigError, T2IError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
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


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
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

    Hydra's own message for this is a multi-line dump of the search path; users deserve one line. Options in the
    user's config dirs (``T2I_CONFIG_PATH``, ``hydra.searchpath=[...]``) count too.
    """
    register_user_config_path()
    dirs = [conf_dir, *user_config_dirs(argv)]
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
        options = set().union(*(_group_options(d / key) for d in dirs))
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
    if not group_dir.is_dir():
        return set()
    return {str(p.relative_to(group_dir).with_suffix("")) for p in group_dir.rglob("*.yaml")}


def user_errors_exit(fn: F) -> F:
    """Turn user-fixable errors (see ``find_user_error``), however deeply wrapped, into one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            found = find_user_error(exc)
            if found is None:
                raise
            report_user_error(found, exc)

    return wrapper  # type: ignore[return-value]


def is_user_error(exc: BaseException) -> bool:
    """T2IError or Lightning's MisconfigurationException (a bad Trainer argument)."""
    if isinstance(exc, T2IError):
        return True
    return any(
        cls.__name__ == "MisconfigurationException" and cls.__module__.startswith("lightning")
        for cls in type(exc).__mro__
    )


def find_user_error(exc: BaseException) -> BaseException | None:
    """The user-fixable error in ``exc``'s ``__cause__``/``__context__`` chain, unwrapping what wraps it (Hydra's
    InstantiationException, ...); where a user error wraps another, the outer one (the deliberate message).
    Failing that, an error whose text holds a T2IError a DataLoader worker could not re-raise as itself."""
    chain = exception_chain(exc)
    found = next((e for e in chain if is_user_error(e)), None)
    return found or next((e for e in chain if "t2i_train.errors." in str(e)), None)


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc``, then what caused it (``__cause__``, else ``__context__``), and so on inwards."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not e for e in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def process_rank() -> int:
    """This process's global rank from the launcher's environment (RANK, LOCAL_RANK, SLURM_PROCID; else 0)."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 0


def report_user_error(exc: BaseException, raised: BaseException | None = None) -> NoReturn:
    """Exit 2 with ``exc`` as one line; an error every rank raises at once (``collective``) prints on rank 0 only.

    ``raised`` (what wrapped ``exc``) names the config node for messages that do not name it themselves
    (Lightning's: "trainer: `max_steps` must be ...").
    """
    code = int(getattr(exc, "exit_code", EXIT_USER_ERROR))  # e.g. run_state.LostRank: 3
    if getattr(exc, "collective", False) and process_rank() != 0:
        sys.exit(code)
    message = user_message(exc)
    node = re.search(r"full_key: (\S+)", str(raised)) if raised is not None and raised is not exc else None
    if node and not isinstance(exc, T2IError) and f"{node.group(1)}." not in message:
        message = f"{node.group(1)}: {message}"
    fail(message, code)


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
    console_logging()
    quiet_third_party()
    print(json.dumps(user_errors_exit(job)(**args), indent=2))


def console_logging() -> None:
    """INFO lines on the console for the CLIs Hydra does not set logging up for (shard jobs, the pipeline), in the
    format of ``conf/hydra/job_logging/t2i.yaml``: one handler, each Lightning line once, no advertising tips."""
    from t2i_train.callbacks.startup_log import route_library_logs

    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s", datefmt="%H:%M:%S"
    )
    route_library_logs()


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


# ----- the command line as the shell leaves it: brace patterns, a syntax check, the user's config dirs

#: Hydra's flags that take the next argument as their value (that argument is not an override)
_HYDRA_VALUE_FLAGS = frozenset(
    {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
     "--experimental-rerun", "-sc", "--shell-completion"}
)  # fmt: skip
_HYDRA_INFO_CHOICES = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})
#: the environment variable naming extra config dirs (``os.pathsep``-separated), searched after the package's
CONFIG_PATH_ENV = "T2I_CONFIG_PATH"


def hydra_argv(argv: list[str]) -> list[str]:
    """What every Hydra CLI does to its overrides first: brace patterns quoted (``quote_brace_values``), then a
    one-line error for an override Hydra cannot parse (``check_override_syntax``); also makes the user's config
    dirs (``T2I_CONFIG_PATH``) part of Hydra's search path (``register_user_config_path``)."""
    register_user_config_path()
    check_shell_expanded(argv)
    argv = quote_brace_values(argv)
    check_override_syntax(argv)
    return argv


def check_shell_expanded(argv: list[str]) -> None:
    """Fail with one line when adjacent overrides set the same key: what bash makes of an unquoted brace pattern
    (``a=/d/{0..2}.tar`` becomes ``a=/d/0.tar a=/d/1.tar a=/d/2.tar``, and Hydra would silently keep the last).

    ``hydra.*`` keys are left out: Lightning's DDP launcher starts the other ranks with the parent's command plus
    its own ``hydra.run.dir=...``, right after the user's."""
    keys = [(argv[i].partition("=")[0].lstrip("+~"), i) for i in override_positions(argv) if "=" in argv[i]]
    for (key, i), (next_key, j) in itertools.pairwise(keys):
        if key == next_key and j == i + 1 and not key.startswith("hydra."):
            count = sum(1 for k, _ in keys if k == key)
            fail(
                f"{key} is given {count} times in a row; the shell expanded an unquoted brace pattern? Quote it: "
                f"{key}='.../{{00000..00009}}.tar'"
            )


def override_positions(argv: list[str]) -> list[int]:
    """Indices of the arguments that are overrides (not flags, not the value of a flag such as ``--cfg job``)."""
    positions, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("-"):
            skip = arg in _HYDRA_VALUE_FLAGS or (
                arg in ("-i", "--info") and i + 1 < len(argv) and argv[i + 1] in _HYDRA_INFO_CHOICES
            )
            continue
        positions.append(i)
    return positions


def quote_brace_values(argv: list[str]) -> list[str]:
    """Quote brace patterns in override values for Hydra's grammar, which reads ``{`` as the start of a dict.

    ``data.train_urls=/data/{00000..00331}.tar`` (as the shell leaves ``'.../{00000..00331}.tar'``) becomes
    ``data.train_urls='/data/{00000..00331}.tar'``; in a list (``[/a/{0..3}.tar,/b/{0..1}.tar]``), and under
    ``-m`` in a sweep (``a=/x/{0..1}.tar,/y/{0..1}.tar``), each element is quoted on its own; otherwise a comma
    outside the braces stays part of the one value. Overrides Hydra already parses (dicts ``{k: v}``, ``${...}``
    interpolations, quoted values) are left alone, and so is one that quoting would not make parseable, so that
    ``check_override_syntax`` reports it as the user wrote it.
    """
    out = list(argv)
    sweep = any(a in ("-m", "--multirun") for a in argv)
    for i in override_positions(argv):
        arg = argv[i]
        key, sep, value = arg.partition("=")
        if not sep or not _has_brace_pattern(value) or _parses(arg):
            continue
        quoted = f"{key}={_quote_value(value, sweep)}"
        if _parses(quoted):
            out[i] = quoted
    return out


def check_override_syntax(argv: list[str]) -> None:
    """Fail with one line naming the first override Hydra's grammar rejects (Hydra's own report is several lines
    and a stack-trace hint)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for i in override_positions(argv):
        try:
            parser.parse_overrides([argv[i]])
        except Exception as exc:
            reason = next(
                (line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__
            )
            fail(
                f"cannot parse override '{argv[i]}': {reason} (quote a value with special characters: "
                "key='...', inside the shell's quotes: \"key='...'\")"
            )


def _parses(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([override])
    except Exception:
        return False
    return True


def _has_brace_pattern(value: str) -> bool:
    """A ``{`` that does not open a ``${...}`` interpolation."""
    return any(ch == "{" and (i == 0 or value[i - 1] != "$") for i, ch in enumerate(value))


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, braces, parentheses and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _quote_value(value: str, sweep: bool = False) -> str:
    """``value`` with each list element (and, when ``sweep``, each sweep element) that holds a brace pattern
    quoted."""
    if value.startswith("[") and value.endswith("]"):
        return "[" + ",".join(_quote_value(p) for p in _split_top(value[1:-1])) + "]"
    parts = _split_top(value) if sweep else [value]
    if len(parts) > 1:
        return ",".join(_quote_value(p) for p in parts)
    element = value.strip()
    if not _has_brace_pattern(element) or element[:1] in ("'", '"', "[") or element[-1:] == "]":
        return value  # nothing to quote, already quoted, or a list missing a bracket (a real mistake)
    if "'" not in element:
        return f"'{element}'"
    if '"' not in element:
        return f'"{element}"'
    return "'" + element.replace("'", "\\'") + "'"


def user_config_dirs(argv: Sequence[str] = ()) -> list[Path]:
    """The user's config dirs: ``T2I_CONFIG_PATH`` (``os.pathsep``-separated), then ``hydra.searchpath=[...]``
    entries of ``argv`` that are folders (``file://`` or a plain path; ``pkg://`` ones are skipped)."""
    dirs = [Path(d).expanduser() for d in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if d.strip()]
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "hydra.searchpath":
            entries = value.strip().strip("[]")
            for entry in _split_top(entries):
                entry = entry.strip().strip("'\"")
                if entry and not entry.startswith("pkg://"):
                    dirs.append(Path(entry.removeprefix("file://")).expanduser())
    return dirs


def _user_search_path_plugin() -> type:
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class T2IConfigPathPlugin(SearchPathPlugin):
        """Adds the folders of ``T2I_CONFIG_PATH`` to Hydra's config search path, after the package's configs
        (on a name clash the package's config wins; give your own files new names)."""

        def manipulate_search_path(self, search_path: Any) -> None:
            for folder in user_config_dirs():
                search_path.append(provider="t2i-user", path=f"file://{folder.resolve()}")

    T2IConfigPathPlugin.__module__ = __name__
    T2IConfigPathPlugin.__qualname__ = "T2IConfigPathPlugin"
    return T2IConfigPathPlugin


#: the plugin class, made on first use (importing Hydra costs ~0.2 s, which the shard CLIs do not pay)
T2IConfigPathPlugin: Any = None


@functools.cache
def register_user_config_path() -> None:
    """Register the search-path plugin with Hydra (once per process), for ``hydra.main`` and ``hydra.compose``."""
    from hydra.core.plugins import Plugins

    global T2IConfigPathPlugin
    T2IConfigPathPlugin = _user_search_path_plugin()
    Plugins.instance().register(T2IConfigPathPlugin)


# ----- overrides: compose once up front, so a typo is one line that names the closest valid keys


def check_overrides(argv: list[str], config_name: str = "train", conf_dir: Path = CONF_DIR) -> Any:
    """Compose ``config_name`` with ``argv`` (as Hydra will) and check its value types (``check_config_types``),
    failing with one line, before Hydra writes anything; returns the composed config (with its ``hydra`` node),
    or None when ``argv`` holds a flag (--multirun, --help, --cfg, ...) and Hydra's own handling is left alone."""
    if any(arg.startswith("-") for arg in argv):
        return None
    import hydra

    with hydra.initialize_config_dir(str(conf_dir), version_base="1.3"):
        try:
            cfg = hydra.compose(config_name, argv, return_hydra_config=True)
        except Exception as exc:
            fail(composition_message(exc, argv))
    try:
        check_config_types(cfg)
    except ConfigError as exc:
        fail(str(exc))
    return cfg


def composition_message(exc: BaseException, argv: list[str]) -> str:
    """One line for a failed composition: an unknown key with its closest valid keys, else Hydra's condensed."""
    unknown = _unknown_key(exc)
    if unknown is not None:
        full_key, parent = unknown
        override = next((a.split("=", 1)[0].lstrip("+~") for a in argv if _names(a, full_key)), full_key)
        return unknown_key_message(full_key, list(parent), override)
    from hydra.errors import HydraException

    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return (
        text
        if isinstance(exc, HydraException)
        else f"cannot compose the config: {type(exc).__name__}: {text}"
    )


def unknown_key_message(full_key: str, siblings: list[str], override: str | None = None) -> str:
    """``unknown config key trainer.max_stpes; did you mean trainer.max_steps? (...)``."""
    parent, _, name = full_key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    visible = sorted(str(k) for k in siblings if not str(k).startswith("_"))
    matches = close_keys(name, visible)
    if matches:
        hint = f"did you mean {' or '.join(prefix + m for m in matches)}?"
    else:
        known = f"keys: {', '.join(visible)}" if visible else "no keys"
        hint = f"{parent or 'the config'} has {known}"
    return f"unknown config key {full_key}; {hint} (to add a new key on purpose, write +{override or full_key}=...)"


def close_keys(name: str, keys: list[str], n: int = 3, margin: float = 0.1) -> list[str]:
    """The keys closest to ``name`` (difflib ratio >= 0.6 and within ``margin`` of the best), best first; case
    differences do not count."""
    by_lower = {str(k).lower(): str(k) for k in keys}
    scored = [(difflib.SequenceMatcher(None, name.lower(), k).ratio(), k) for k in by_lower]
    scored = sorted((s for s in scored if s[0] >= 0.6), key=lambda s: -s[0])
    return [by_lower[k] for ratio, k in scored[:n] if ratio >= scored[0][0] - margin]


def _unknown_key(exc: BaseException) -> tuple[str, Any] | None:
    """(full key, parent node) of the "Key 'x' is not in struct" error in ``exc``'s chain, if that is the cause."""
    for current in exception_chain(exc):
        parent = getattr(current, "parent_node", None)
        full_key = getattr(current, "full_key", None)
        if full_key and parent is not None and re.search(r"Key '[^']*' (is )?not in", str(current)):
            return str(full_key), parent
    return None


def _names(arg: str, full_key: str) -> bool:
    key = arg.split("=", 1)[0].lstrip("+~")
    return key == full_key or key.startswith(f"{full_key}.")


# ----- value types: what the targets' signatures and the top-level keys declare

#: top-level keys of t2i_train/conf/train.yaml and the types they take (None is always allowed)
TRAIN_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "seed": (int,),
    "ema_decay": (float,),
    "torch_threads": (int,),
    "compile": (bool,),
    "checkpoint.every_n_steps": (int,),
    "checkpoint.keep_last": (int,),
    "sampling.every_n_steps": (int,),
    "sampling.num_prompts": (int,),
}
NUMERIC = (bool, int, float)


def check_config_types(cfg: Any) -> None:
    """Raise ConfigError for the first number/bool setting whose value has the wrong type.

    Checks ``TRAIN_KEY_TYPES`` and, in every node with a ``_target_``, each key whose parameter the target
    annotates as int, float or bool (``Optional``/``Union`` of them too, e.g. torch's ``lr: float | Tensor``).
    Values set directly are checked before interpolations of them, so the message names the key that was set.
    Unresolvable interpolations and ``???`` are left to whoever reads them.
    """
    from omegaconf import DictConfig

    if not isinstance(cfg, DictConfig):
        return
    checks = [("", cfg, {k: v for k, v in TRAIN_KEY_TYPES.items() if _has(cfg, k)})]
    for path, target in target_nodes(cfg):
        hints = param_types(target)
        node = _select(cfg, path)
        wanted = {k: kinds for k in node if (kinds := numeric_kinds(hints.get(str(k)))) is not None}
        checks.append((f"{path}.", node, wanted))
    for interpolated in (False, True):
        for prefix, node, wanted in checks:
            check_values(node, wanted, prefix, interpolated)


def check_values(
    cfg: Any, wanted: Mapping[str, tuple[type, ...]], prefix: str = "", interpolated: bool | None = None
) -> None:
    """Raise ConfigError unless each dotted key of ``wanted`` holds one of its types (or None);
    ``interpolated`` True/False: only the keys whose value is / is not an interpolation."""
    for key, kinds in wanted.items():
        raw = _interpolation(cfg, key)
        if interpolated is not None and interpolated != (raw is not None):
            continue
        value = _value(cfg, key)
        if value is not None and not value_fits(value, kinds):
            shown = repr(value) if isinstance(value, str) else _plain(value)
            via = f" (= {raw})" if raw is not None else ""
            raise ConfigError(f"{prefix}{key}{via} must be {describe_kinds(kinds)}, got {shown}")


def check_minimums(cfg: Any, minimums: Mapping[str, int]) -> None:
    """Raise ConfigError when an integer key (already type-checked) is below its minimum."""
    for key, minimum in minimums.items():
        value = _value(cfg, key)
        if isinstance(value, int) and value < minimum:
            need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f"{key} must be {need}, got {value}")


def value_fits(value: Any, kinds: tuple[type, ...]) -> bool:
    """bool is not an int here, an int is fine where a float is wanted."""
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    if isinstance(value, float):
        return float in kinds
    return False


def describe_kinds(kinds: tuple[type, ...]) -> str:
    if float in kinds:
        return "a number (float)"
    if int in kinds:
        return "an integer (int)" + (" or true/false" if bool in kinds else "")
    return "true or false (bool)"


def numeric_kinds(annotation: Any) -> tuple[type, ...] | None:
    """The numeric types an annotation allows, when it allows nothing a config could hold besides them and None
    (a torch Tensor is tolerated: no YAML value is one); None when the value is not checkable."""
    if annotation is None:
        return None
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    members = tuple(m for m in members if m is not type(None) and not _is_tensor(m))
    if not members or any(m not in NUMERIC for m in members):
        return None
    return members


def _is_tensor(kind: Any) -> bool:
    return getattr(kind, "__name__", "") == "Tensor" and getattr(kind, "__module__", "").startswith("torch")


@functools.cache
def param_types(target: str) -> dict[str, Any]:
    """The annotated parameter types of ``target`` (a class's ``__init__`` or a function); {} if unknown."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:
        return {}
    return callable_param_types(obj.__init__ if isinstance(obj, type) else obj)


def callable_param_types(fn: Any) -> dict[str, Any]:
    """The annotated parameter types of a function or method, as far as they resolve."""
    try:
        return typing.get_type_hints(fn)
    except Exception:
        return _hints_one_by_one(fn)


def _hints_one_by_one(fn: Any) -> dict[str, Any]:
    """Annotations that do resolve, when some (TYPE_CHECKING-only names) do not."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    namespace = getattr(inspect.unwrap(fn), "__globals__", {})
    hints = {}
    for param in params:
        annotation = param.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, dict(namespace))  # as typing.get_type_hints does
            except Exception:
                continue
        if annotation is not inspect.Parameter.empty:
            hints[param.name] = annotation
    return hints


def target_nodes(cfg: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(dotted path, ``_target_``) of every node with a ``_target_`` (``hydra`` excluded), without resolving."""
    from omegaconf import DictConfig

    for key in cfg:
        if str(key).startswith("_") or (not path and key == "hydra"):
            continue
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation():
            child_path = f"{path}{key}"
            if "_target_" in child and isinstance(child._get_node("_target_")._value(), str):
                yield child_path, str(child._get_node("_target_")._value())
            yield from target_nodes(child, f"{child_path}.")


def _has(cfg: Any, key: str) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default="__absent__", throw_on_resolution_failure=False) != "__absent__"


def _interpolation(cfg: Any, key: str) -> str | None:
    """The ``${...}`` text of a dotted key whose value is an interpolation, else None."""
    from omegaconf import OmegaConf

    parent, _, last = key.rpartition(".")
    node = _select(cfg, parent) if parent else cfg
    try:
        if node is None or not OmegaConf.is_interpolation(node, last):
            return None
        return str(node._get_node(last)._value())
    except Exception:
        return None


def _value(cfg: Any, key: str) -> Any:
    """The resolved value, or None when it is missing (``???``), absent or cannot be resolved yet."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(cfg, key, throw_on_missing=False, throw_on_resolution_failure=False)
    except Exception:
        return None


def _select(cfg: Any, path: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, path, throw_on_resolution_failure=False)


def _plain(value: Any) -> str:
    from omegaconf import Container, OmegaConf

    if isinstance(value, Container):
        return str(OmegaConf.to_container(value, resolve=False))
    return repr(value)


# ----- leave nothing behind when a run fails before it starts


@contextlib.contextmanager
def no_empty_dir_on_error(path: Path) -> Iterator[None]:
    """On an error, remove ``path`` and the parents it needed if this run created them and they are empty."""
    path = Path(path).absolute()
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for folder in created:  # deepest first; rmdir refuses a folder with anything in it
            try:
                folder.rmdir()
            except OSError:
                break
        raise


@contextlib.contextmanager
def startup_guard(run_dir: Path | None, hydra_subdir: str | None = ".hydra") -> Iterator[None]:
    """Hold Lightning's start-up output (``t2i_train.callbacks.startup_log``) until training starts; on a user
    error before that drop it and, on rank 0, remove ``run_dir`` if it held only Hydra's files when the job
    started and still holds nothing else (so a failed start leaves no run folder behind)."""
    from t2i_train.callbacks.startup_log import STARTUP

    fresh = run_dir is not None and process_rank() == 0 and only_hydra_files(run_dir, hydra_subdir)
    STARTUP.begin()
    try:
        yield
    except BaseException as exc:
        user_error = find_user_error(exc) is not None or (
            isinstance(exc, SystemExit) and exc.code == EXIT_USER_ERROR
        )
        if not user_error or STARTUP.training_started:
            STARTUP.flush()
            raise
        STARTUP.drop()
        if fresh and run_dir is not None and only_hydra_files(run_dir, hydra_subdir, empty_logs=False):
            remove_run_dir(run_dir)
        raise
    STARTUP.flush()


def only_hydra_files(run_dir: Path, hydra_subdir: str | None, empty_logs: bool = True) -> bool:
    """Whether ``run_dir`` holds nothing but Hydra's output subfolder, ``*.log`` files (empty ones when
    ``empty_logs``) and empty folders."""
    if not run_dir.is_dir():
        return False
    for entry in run_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            if entry.name != hydra_subdir and any(p.is_file() or p.is_symlink() for p in entry.rglob("*")):
                return False
        elif not (
            entry.suffix == ".log" and entry.is_file() and (not empty_logs or entry.stat().st_size == 0)
        ):
            return False
    return True


def remove_run_dir(run_dir: Path) -> None:
    """Remove ``run_dir``, then its parents below the working directory that are left empty
    (``outputs/<model>/``)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().resolve()
    for parent in run_dir.resolve().parents:
        if parent == cwd or cwd not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:
            break
