"""Every ``python -m t2i_train...`` line in README.md's (and docs/*.md's) code blocks, pasted into bash as written,
composes.

The lines are split into words by bash itself (quotes, ``$DIR``, ``~``, comments), with placeholder folders for
``$DIR`` and ``$HOME`` (holding the README's own ``~/t2i_configs/experiment/my_run.yaml``). One subprocess then
runs them all in-process: the Hydra CLIs (``t2i_train``, ``.sample``; ``.summary`` takes train overrides) through
their real ``__main__`` with ``--cfg job`` appended (a ``-m`` sweep: its first point, as Hydra has no ``--cfg`` for
sweeps); the others through their own argument parser (nothing runs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PREFIX = "python -m t2i_train"


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def readme_commands(text: str) -> list[str]:
    """Shell lines of the code blocks that run ``python -m t2i_train...``, backslash continuations joined."""
    commands = []
    for language, body in fenced_blocks(text):
        if language not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            if PREFIX in line.split("#", 1)[0]:
                commands.append(line.strip())
    return commands


def user_config_file(text: str) -> tuple[str, str]:
    """(path under ~, text) of the README's example of a user-owned config file."""
    for language, body in fenced_blocks(text):
        first = body.splitlines()[0] if body else ""
        if language == "yaml" and first.startswith("# ~/"):
            return first[len("# ~/") :].strip(), body
    raise AssertionError("README.md has no yaml example of a user-owned config (# ~/...)")


#: README.md first, then the pages it links to in docs/
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = list(dict.fromkeys(c for page in PAGES for c in readme_commands(page.read_text())))

#: bash prints the words each line hands to `python` (and the T2I_CONFIG_PATH it sees); nothing runs
SPLIT = """
python() { printf '%s\\0' "$@"; printf 'T2I_CONFIG_PATH=%s\\0\\n' "${T2I_CONFIG_PATH-}"; }
cd() { :; }
"""

DRIVER = r"""
import contextlib, io, json, runpy, sys
from hydra.core.global_hydra import GlobalHydra

HYDRA = {"t2i_train", "t2i_train.sample"}


def first_point(args):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from t2i_train.cli.common import quote_brace_values

    parser, point = OverridesParser.create(), []
    for arg in quote_brace_values(["-m", *args])[1:]:
        override = parser.parse_overrides([arg])[0]
        if override.is_sweep_override():
            arg = f"{override.get_key_element()}={next(override.sweep_string_iterator())}"
        point.append(arg)
    return point


def check(module, args):
    if module == "t2i_train.summary":  # takes train overrides; compose them as training would
        module = "t2i_train"
    if module in HYDRA:
        if "-m" in args or "--multirun" in args:  # Hydra has no --cfg for sweeps: compose their first point
            args = first_point([a for a in args if a not in ("-m", "--multirun")])
        GlobalHydra.instance().clear()
        sys.argv = [module, *args] + ([] if "--help" in args else ["--cfg", "job"])
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    from t2i_train.checkpoint_io import apply_trust_argument

    name = module.rsplit(".", 1)[-1]
    if module == "t2i_train.shards":
        from t2i_train.cli.shards import build_parser

        build_parser().parse_args(args)
    elif module in {
        f"t2i_train.{n}"
        for n in ("encode", "recaption", "evaluate", "export", "pipeline", "index", "gill_decision", "retrieve")
    }:
        parse_args = getattr(__import__(f"t2i_train.cli.{name}", fromlist=["parse_args"]), "parse_args")
        parse_args(apply_trust_argument(args))
    elif module == "t2i_train.metrics.caption_accuracy":  # key=value options, no separate parser
        __import__(module)
        bad = [a for a in args if "=" not in a]
        if bad:
            raise SystemExit(f"not key=value: {bad}")
    else:
        raise SystemExit(f"test_readme.py does not know how to check {module}")


results = []
for module, args in json.load(sys.stdin):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            check(module, args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except Exception as exc:
            code = 1
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    results.append({"code": code, "stdout": out.getvalue()[-1500:], "stderr": err.getvalue()[-1500:]})
print(json.dumps(results))
"""


def split_like_bash(commands: list[str], env: dict[str, str]) -> list[tuple[list[str], str]]:
    """(argv after ``python``, T2I_CONFIG_PATH) of each line, as bash would pass them."""
    script = SPLIT + "\n".join(commands) + "\n"
    run = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    records = [r for r in run.stdout.split("\n") if r]
    assert len(records) == len(commands), (records, commands)
    split = []
    for record in records:
        words = record.split("\0")[:-1]
        split.append((words[:-1], words[-1].removeprefix("T2I_CONFIG_PATH=")))
    return split


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    home, data = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("dir")
    relative, body = user_config_file(README.read_text())
    (home / relative).parent.mkdir(parents=True)
    (home / relative).write_text(body)
    env = {**os.environ, "HOME": str(home), "DIR": str(data), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("T2I_CONFIG_PATH", None)
    jobs = []
    for words, config_path in split_like_bash(COMMANDS, env):
        assert words[:2] == ["-m", words[1]] and words[1].startswith("t2i_train"), words
        jobs.append((words[1], words[2:], config_path))
    by_config_path: dict[str, list[int]] = {}
    for i, (_, _, config_path) in enumerate(jobs):
        by_config_path.setdefault(config_path, []).append(i)
    found: dict[int, dict[str, object]] = {}
    for config_path, indices in by_config_path.items():  # one driver per T2I_CONFIG_PATH a line sets
        run = subprocess.run(
            [sys.executable, "-c", DRIVER],
            input=json.dumps([jobs[i][:2] for i in indices]),
            capture_output=True, text=True, cwd=data, timeout=900,
            env={**env, "T2I_CONFIG_PATH": config_path} if config_path else env,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        for i, result in zip(indices, json.loads(run.stdout.strip().splitlines()[-1])):
            found[i] = result
    return {COMMANDS[i]: found[i] for i in range(len(COMMANDS))}


def test_the_readme_shows_every_cli() -> None:
    modules = {c.split()[c.split().index("-m") + 1] for c in COMMANDS}
    for cli in ("t2i_train", "t2i_train.sample", "t2i_train.summary", "t2i_train.shards", "t2i_train.encode",
                "t2i_train.evaluate", "t2i_train.pipeline", "t2i_train.recaption", "t2i_train.index",
                "t2i_train.gill_decision", "t2i_train.retrieve"):  # fmt: skip
        assert cli in modules, cli
    assert any("{" in c and "'" in c for c in COMMANDS)  # a quoted brace pattern, as users paste them
    assert any("$DIR" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_composes(command: str, results: dict[str, dict[str, object]]) -> None:
    result = results[command]
    assert result["code"] == 0, f"{command}\n{result['stderr']}\n{result['stdout']}"
