"""Command lines as the shell leaves them: brace patterns, grammar errors, the user's config dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from t2i_train.cli.common import (
    CONF_DIR,
    check_group_choices,
    check_override_syntax,
    hydra_argv,
    override_positions,
    quote_brace_values,
    user_config_dirs,
)

ROOT = Path(__file__).resolve().parents[2]


def composed(argv: list[str], config: str = "train") -> object:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config, hydra_argv(argv))


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("data.train_urls=/data/cc3m/{00000..00331}.tar", "data.train_urls='/data/cc3m/{00000..00331}.tar'"),
        ("data.train_urls=/tmp/my data/train-{000000..000009}.tar", "data.train_urls='/tmp/my data/train-{000000..000009}.tar'"),
        ("data.train_urls=/d/{train,val}-{0..9}.tar", "data.train_urls='/d/{train,val}-{0..9}.tar'"),
        ("data.train_urls=[/a/{0..3}.tar,/b/{0..1}.tar]", "data.train_urls=['/a/{0..3}.tar','/b/{0..1}.tar']"),
        ("+data.val_urls=${oc.env:DATA}/{0..3}.tar", "+data.val_urls='${oc.env:DATA}/{0..3}.tar'"),
        ("a=it's-{0..1}", "a=\"it's-{0..1}\""),
        # already valid for Hydra: untouched
        ("data.train_urls='/data/{00000..00331}.tar'", "data.train_urls='/data/{00000..00331}.tar'"),
        ("data.caption_keys=[dsc,txt]", "data.caption_keys=[dsc,txt]"),
        ("+task.extra={k: 1, j: [a, b]}", "+task.extra={k: 1, j: [a, b]}"),
        ("run_dir=${hydra:runtime.output_dir}/x", "run_dir=${hydra:runtime.output_dir}/x"),
        ("'upsampler.template=\"A photo of {prompt}\"'", "'upsampler.template=\"A photo of {prompt}\"'"),
        ("optimizer.lr=1e-4,3e-4", "optimizer.lr=1e-4,3e-4"),
    ],
)  # fmt: skip
def test_quote_brace_values(arg: str, expected: str) -> None:
    assert quote_brace_values([arg]) == [expected]


def test_a_comma_outside_braces_is_a_sweep_only_under_multirun() -> None:
    arg = "data.train_urls=/a/{0..1}.tar,/b/{0..1}.tar"
    assert quote_brace_values([arg]) == ["data.train_urls='/a/{0..1}.tar,/b/{0..1}.tar'"]
    assert quote_brace_values(["-m", arg]) == ["-m", "data.train_urls='/a/{0..1}.tar','/b/{0..1}.tar'"]


def test_flags_and_their_values_are_not_overrides() -> None:
    argv = ["--cfg", "job", "-cn", "x={0..1}", "--info", "searchpath", "a=1", "--multirun", "b=/{0..1}"]
    assert override_positions(argv) == [6, 8]
    assert quote_brace_values(argv)[3] == "x={0..1}"
    assert quote_brace_values(argv)[8] == "b='/{0..1}'"


def test_brace_patterns_compose_to_the_value_the_user_wrote(tmp_path: Path) -> None:
    cfg = composed(
        [
            "data=webdataset",
            f"data.train_urls={tmp_path}/train-{{000000..000009}}.tar",
            "data.val_urls=[/v/{0..1}.tar,/w/{2..3}.tar]",
            "data.caption_keys=[json.descriptive,txt]",
        ]
    )
    assert cfg.data.train_urls == f"{tmp_path}/train-{{000000..000009}}.tar"
    assert list(cfg.data.val_urls) == ["/v/{0..1}.tar", "/w/{2..3}.tar"]
    assert list(cfg.data.caption_keys) == ["json.descriptive", "txt"]
    assert cfg.trainer.max_steps == cfg.scheduler.total_steps  # ${...} interpolations still resolve


@pytest.mark.parametrize(
    "arg",
    ["trainer.max_steps=[1,2", "data.train_urls=[/a/{0..3}.tar", "data.train_urls=/a/{0..3}.tar]", "a=b=c)"],
)
def test_a_real_grammar_mistake_is_one_line(arg: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        check_override_syntax(quote_brace_values([arg]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot parse override '{arg}': ") and err.count("\n") == 1


def test_an_unquoted_brace_pattern_the_shell_expanded_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    expanded = subprocess.run(
        ["bash", "-c", 'printf "%s\\0" data.train_urls=/d/{0..2}.tar trainer.max_steps=2'],
        capture_output=True, text=True, check=True,
    ).stdout.split("\0")[:-1]  # fmt: skip
    assert len(expanded) == 4
    with pytest.raises(SystemExit):
        hydra_argv(expanded)
    err = capsys.readouterr().err
    assert err.startswith("error: data.train_urls is given 3 times in a row") and err.count("\n") == 1
    assert hydra_argv(
        ["data.train_urls=/a", "trainer.max_steps=2", "data.train_urls=/b"]
    )  # not adjacent: fine


def test_lightning_ddp_rank_command_with_its_own_run_dir_is_accepted() -> None:
    """Lightning starts rank 1 with the parent's argv plus ``hydra.run.dir=...`` right after the user's."""
    argv = ["model=muse", "hydra.run.dir=/tmp/run", "hydra.run.dir=/tmp/run"]
    assert hydra_argv(argv) == argv


def user_experiment(folder: Path, name: str = "my_run") -> Path:
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / f"{name}.yaml").write_text(
        "# @package _global_\ndefaults:\n  - shapes_vqgan\ntrainer:\n  max_steps: 7\n"
    )
    return folder


def test_t2i_config_path_adds_a_users_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = user_experiment(tmp_path / "mine")
    monkeypatch.setenv("T2I_CONFIG_PATH", os.pathsep.join([str(tmp_path / "missing"), str(mine)]))
    assert user_config_dirs() == [tmp_path / "missing", mine]
    check_group_choices(["experiment=my_run"])  # accepted: no SystemExit
    cfg = composed(["experiment=my_run"])
    assert cfg.trainer.max_steps == 7 and cfg.model._target_.endswith("VQGAN")


def test_without_it_the_users_experiment_is_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("T2I_CONFIG_PATH", raising=False)
    with pytest.raises(SystemExit):
        check_group_choices(["experiment=my_run"])


def test_hydra_searchpath_override_counts_for_the_group_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("T2I_CONFIG_PATH", raising=False)
    mine = user_experiment(tmp_path / "mine", "other_run")
    argv = [f"hydra.searchpath=[file://{mine}]", "experiment=other_run"]
    assert user_config_dirs(argv) == [mine]
    check_group_choices(argv)
    assert composed(argv).trainer.max_steps == 7


def test_the_train_cli_takes_brace_patterns_and_user_configs_end_to_end(tmp_path: Path) -> None:
    """As pasted into bash: quotes stripped by the shell, $DIR expanded, a user-owned experiment."""
    mine = user_experiment(tmp_path / "mine")
    script = (
        f"{sys.executable} -m t2i_train experiment=my_run data=webdataset "
        """data.train_urls="$DIR/train-{000000..000009}.tar" 'data.val_urls=/data/cc3m/{00000..00331}.tar' --cfg job"""
    )
    env = {**os.environ, "DIR": str(tmp_path / "d"), "T2I_CONFIG_PATH": str(mine), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"train_urls: {tmp_path / 'd'}/train-{{000000..000009}}.tar" in run.stdout
    assert "val_urls: /data/cc3m/{00000..00331}.tar" in run.stdout
    assert "max_steps: 7" in run.stdout


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        ("t2i_train.sample", ["checkpoint=runs/x.ckpt", "output_dir=/out/{0..1}", "--cfg", "job"], "output_dir: /out/{0..1}"),
        ("t2i_train.summary", ["experiment=shapes_vqgan", "data=webdataset", "data.train_urls=/d/{0..3}.tar"], '"family"'),
    ],
)  # fmt: skip
def test_every_hydra_cli_takes_a_brace_pattern(module: str, args: list[str], expected: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert expected in run.stdout


def test_the_train_cli_reports_a_grammar_mistake_in_one_line() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "t2i_train", "trainer.max_steps=[1,2", "--cfg", "job"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.startswith("error: cannot parse override 'trainer.max_steps=[1,2'")
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
