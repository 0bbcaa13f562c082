"""Bad input to the training and sampling CLIs: one `error:` line, exit 2, no traceback, nothing written.

The unit tests cover the pieces (override typos, value types, error unwrapping, rank-0 printing, the held-back
Lightning start-up output, leaving no folder behind); the CLI runs check them end to end.
"""

from __future__ import annotations

import logging
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import hydra
import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf

from t2i_train.callbacks.startup_log import STARTUP, StartupBuffer, StartupLog, startup_log_callback
from t2i_train.cli.common import (
    CONF_DIR,
    check_config_types,
    check_overrides,
    check_values,
    close_keys,
    no_empty_dir_on_error,
    numeric_kinds,
    process_rank,
    startup_guard,
    unknown_key_message,
    user_errors_exit,
    value_fits,
)
from t2i_train.cli.sample import check_generate_options, check_sample_options
from t2i_train.errors import EXIT_USER_ERROR, ConfigError, DataError, TrainingDiverged
from tests.conftest import run_cli

BANNER = (
    "GPU available",
    "TPU available",
    "HPU available",
    "Seed set",
    "Tip:",
    "Trainable params",
    "`Trainer(",
)
RANK_VARS = ("RANK", "LOCAL_RANK", "SLURM_PROCID")
TINY = [
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
    "data.shuffle_buffer=16",
    "sampling.every_n_steps=0",
]


def compose(overrides: list[str]) -> Any:
    with hydra.initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra.compose("train", overrides, return_hydra_config=True)


def one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text[-2000:]
    return lines[0]


def assert_cli_error(proc: Any, message: str) -> None:
    """Exit 2, stderr is exactly one ``error:`` line holding ``message``, no traceback, no Lightning banner."""
    assert proc.returncode == EXIT_USER_ERROR, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    line = one_error_line(proc.stderr)
    assert message in line, line
    assert "Traceback" not in proc.stdout + proc.stderr
    for banner in BANNER:
        assert banner not in proc.stdout + proc.stderr, (banner, proc.stdout[-2000:], proc.stderr[-2000:])


# ----- override typos (composition before Hydra runs)


@pytest.mark.parametrize(
    ("name", "keys", "expected"),
    [
        ("max_stpes", ["max_steps", "max_epochs", "min_steps", "devices"], ["max_steps"]),
        ("LR", ["lr", "betas"], ["lr"]),
        ("batch_sise", ["batch_size", "val_batch_size", "image_size"], ["batch_size"]),
        ("modle", ["model", "mode", "loss"], ["mode", "model"]),  # near-equals: all of them, best first
        ("zzz", ["accelerator", "devices"], []),
    ],
)
def test_close_keys(name: str, keys: list[str], expected: list[str]) -> None:
    assert close_keys(name, keys) == expected


def test_unknown_key_message_without_a_close_key_lists_the_keys() -> None:
    assert unknown_key_message("trainer.zzz", ["devices", "_target_", "accelerator"], "trainer.zzz.x") == (
        "unknown config key trainer.zzz; trainer has keys: accelerator, devices "
        "(to add a new key on purpose, write +trainer.zzz.x=...)"
    )
    assert "data.synthetic has no keys" in unknown_key_message("data.synthetic.size", [])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer.max_stpes=3"],
            "error: unknown config key trainer.max_stpes; did you mean trainer.max_steps? "
            "(to add a new key on purpose, write +trainer.max_stpes=...)",
        ),
        (["modle=vqgan"], "error: unknown config key modle; did you mean model? "),
        (["trainer.nope.x=1"], "error: unknown config key trainer.nope; trainer has keys: accelerator, "),
        (
            ["callbacks.checkpint.dirpath=x"],
            "error: unknown config key callbacks.checkpint; did you mean callbacks.checkpoint? (to add a new key on "
            "purpose, write +callbacks.checkpint.dirpath=...)",
        ),
        (["hydra.run.dri=x"], "error: unknown config key hydra.run.dri; did you mean hydra.run.dir?"),
        (["foo"], "error: Error parsing override 'foo'; missing EQUAL"),
        (["optimizer.lr=fast"], "error: optimizer.lr must be a number (float), got 'fast'"),
        (["model=muse", "model.dim=[1,2]"], "error: model.dim must be an integer (int), got [1, 2]"),
    ],
)
def test_bad_overrides_are_one_line(
    overrides: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        check_overrides(overrides)
    assert exit_info.value.code == EXIT_USER_ERROR
    assert one_error_line(capsys.readouterr().err).startswith(message)


def test_flags_and_hydra_overrides_are_left_to_hydra(tmp_path: Path) -> None:
    for flags in (["--cfg", "job"], ["-m"], ["--help"], ["--hydra-help"], ["--info"], ["--shell-completion"]):
        assert check_overrides([*flags, "trainer.max_stpes=1"]) is None
    cfg = check_overrides(["model=vqgan", f"hydra.run.dir={tmp_path}", "+trainer.max_time=null"])
    assert cfg.hydra.run.dir == str(tmp_path) and cfg.trainer.max_time is None
    assert not any(tmp_path.iterdir())  # composing writes nothing


# ----- value types


@pytest.mark.parametrize(
    ("annotation", "kinds"),
    [
        (int, (int,)),
        (bool, (bool,)),
        (float | None, (float,)),
        (float | torch.Tensor, (float,)),
        (int | float, (int, float)),
        (int | str, None),
        (typing.get_type_hints(torch.optim.AdamW.__init__)["lr"], (float,)),  # typing.Union[float, Tensor]
        (typing.get_type_hints(L.Trainer.__init__)["max_epochs"], (int,)),  # typing.Optional[int]
        (typing.get_type_hints(L.Trainer.__init__)["devices"], None),  # Union[list[int], str, int]
        (Literal[16, 32], None),
        (list[int], None),
        (str, None),
        (Any, None),
        (None, None),
    ],
)
def test_numeric_kinds(annotation: Any, kinds: tuple[type, ...] | None) -> None:
    assert numeric_kinds(annotation) == kinds


def test_value_fits() -> None:
    assert value_fits(3, (float,)) and value_fits(3.5, (float,)) and value_fits(True, (bool,))
    assert not value_fits(True, (int,)) and not value_fits(True, (float,)) and not value_fits(1, (bool,))
    assert not value_fits(1.5, (int,)) and not value_fits("3", (int,)) and not value_fits([1], (int,))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.lr=fast"], "optimizer.lr must be a number (float), got 'fast'"),
        (
            ["optimizer=sgd", "optimizer.momentum=lots"],
            "optimizer.momentum must be a number (float), got 'lots'",
        ),
        (["seed=abc"], "seed must be an integer (int), got 'abc'"),
        (["ema_decay=slow"], "ema_decay must be a number (float), got 'slow'"),
        (["torch_threads=two"], "torch_threads must be an integer (int), got 'two'"),
        (
            ["checkpoint.every_n_steps=often"],
            "checkpoint.every_n_steps must be an integer (int), got 'often'",
        ),
        (["checkpoint.keep_last=1.5"], "checkpoint.keep_last must be an integer (int), got 1.5"),
        (["sampling.every_n_steps=x"], "sampling.every_n_steps must be an integer (int), got 'x'"),
        # set directly, so named directly (scheduler.total_steps interpolates it)
        (["trainer.max_steps=1.5"], "trainer.max_steps must be an integer (int), got 1.5"),
        (
            ["trainer.enable_progress_bar=3"],
            "trainer.enable_progress_bar must be true or false (bool), got 3",
        ),
        (["data.batch_size=true"], "data.batch_size must be an integer (int), got True"),
        (["scheduler.warmup_steps=x"], "scheduler.warmup_steps must be an integer (int), got 'x'"),
        (["callbacks.progress.refresh_rate=x"], "callbacks.progress.refresh_rate must be an integer (int)"),
        (["model=muse", "model.text_encoder.d_model=big"], "model.text_encoder.d_model must be an integer"),
    ],
)
def test_check_config_types_names_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_config_types(compose(overrides))
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        *[[f"experiment={p.stem}"] for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))],
        *[[f"optimizer={p.stem}"] for p in sorted((CONF_DIR / "optimizer").glob("*.yaml"))],
        *[[f"strategy={p.stem}"] for p in sorted((CONF_DIR / "strategy").glob("*.yaml"))],
        ["optimizer.lr=1", "ema_decay=0.999", "trainer.gradient_clip_val=null", "trainer.max_steps=-1"],
    ],
)
def test_check_config_types_accepts_the_shipped_configs(overrides: list[str]) -> None:
    check_config_types(compose(overrides))


def test_an_interpolated_value_names_its_source() -> None:
    cfg = OmegaConf.create({"a": "x", "b": "${a}", "c": "${hydra:runtime.output_dir}", "d": "???"})
    check_values(cfg, {"c": (int,), "d": (int,)})  # unresolvable and missing values are left alone
    with pytest.raises(ConfigError, match=r"^b \(= \$\{a\}\) must be an integer \(int\), got 'x'$"):
        check_values(cfg, {"b": (int,)})


# ----- user errors however wrapped; collective ones on rank 0 only


def _wrapped(inner: BaseException, full_key: str, explicit: bool = True) -> None:
    """Raise ``inner`` wrapped the way Hydra's instantiate wraps it."""
    try:
        raise inner
    except type(inner) as exc:
        wrapper = RuntimeError(f"Error in call to target 'x':\n{inner!r}\nfull_key: {full_key}")
        if explicit:
            raise wrapper from exc
        raise wrapper  # noqa: B904 - the implicit __context__ chain is what is tested


@pytest.mark.parametrize(
    ("inner", "explicit", "line"),
    [
        (ConfigError("data.batch_size must be >= 1"), True, "error: data.batch_size must be >= 1"),
        (ConfigError("data.batch_size must be >= 1"), False, "error: data.batch_size must be >= 1"),
        (
            MisconfigurationException("`max_steps` must be a non-negative integer or -1. You passed in -5."),
            True,
            "error: trainer: `max_steps` must be a non-negative integer or -1. You passed in -5.",
        ),
    ],
)
def test_wrapped_user_errors_are_one_line(
    inner: BaseException, explicit: bool, line: str, capsys: pytest.CaptureFixture
) -> None:
    full_key = "data" if isinstance(inner, ConfigError) else "trainer"
    with pytest.raises(SystemExit) as exit_info:
        user_errors_exit(_wrapped)(inner, full_key, explicit)
    assert exit_info.value.code == EXIT_USER_ERROR
    assert one_error_line(capsys.readouterr().err) == line


def test_the_outer_of_two_user_errors_is_reported(capsys: pytest.CaptureFixture) -> None:
    def reraise() -> None:
        try:
            raise DataError("shard x.tar is empty")
        except DataError as exc:
            raise ConfigError("data.train_urls: no usable shard; fix data.train_urls") from exc

    with pytest.raises(SystemExit):
        user_errors_exit(reraise)()
    assert (
        one_error_line(capsys.readouterr().err)
        == "error: data.train_urls: no usable shard; fix data.train_urls"
    )


def test_other_errors_keep_their_traceback() -> None:
    def crash() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        user_errors_exit(crash)()


@pytest.mark.parametrize(
    ("env", "exc", "printed"),
    [
        ({}, TrainingDiverged("loss is NaN"), True),
        ({"RANK": "0", "LOCAL_RANK": "1"}, TrainingDiverged("loss is NaN"), True),
        ({"RANK": "1"}, TrainingDiverged("loss is NaN"), False),
        ({"LOCAL_RANK": "1"}, TrainingDiverged("loss is NaN"), False),
        ({"SLURM_PROCID": "3"}, TrainingDiverged("loss is NaN"), False),
        ({"RANK": "1"}, DataError("shard x.tar is empty"), True),  # not collective: each rank says its own
    ],
)
def test_collective_errors_print_on_rank_zero_only(
    env: dict[str, str],
    exc: Exception,
    printed: bool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    for name in RANK_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def raise_it() -> None:
        raise exc

    with pytest.raises(SystemExit) as exit_info:
        user_errors_exit(raise_it)()
    assert exit_info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    if printed:
        assert one_error_line(err) == f"error: {exc}"
    else:
        assert err == ""
    assert process_rank() == int(env.get("RANK") or env.get("LOCAL_RANK") or env.get("SLURM_PROCID") or 0)


# ----- Lightning's start-up output held until training starts


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lightning_log() -> Any:
    logger = logging.getLogger("lightning.pytorch")
    handler, level = _Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_startup_output_is_held_then_flushed_in_order(
    lightning_log: _Collect, capsys: pytest.CaptureFixture
) -> None:
    from rich import get_console

    buffer = StartupBuffer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        buffer.begin()
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
        get_console().print("model summary table")
        warnings.warn("a start-up warning", UserWarning, stacklevel=1)
        assert lightning_log.messages == [] and caught == [] and "summary" not in capsys.readouterr().out
        buffer.flush(training_started=True)
        assert [str(w.message) for w in caught] == ["a start-up warning"]
    assert lightning_log.messages == ["GPU available: False, used: False"]
    assert "model summary table" in capsys.readouterr().out
    assert buffer.training_started and not buffer.active
    logging.getLogger("lightning.pytorch.x").info("later")  # handlers are back
    assert lightning_log.messages[-1] == "later"


def test_dropped_startup_output_is_never_printed(
    lightning_log: _Collect, capsys: pytest.CaptureFixture
) -> None:
    buffer = StartupBuffer()
    buffer.begin()
    logging.getLogger("lightning.fabric.utilities.seed").info("Seed set to 0")
    logging.getLogger("lightning.pytorch.trainer").info("TPU available: False")
    buffer.drop()
    buffer.flush()
    assert lightning_log.messages == [] and capsys.readouterr().out == ""


def test_the_callback_flushes_the_process_buffer(lightning_log: _Collect) -> None:
    assert isinstance(startup_log_callback(), StartupLog)
    STARTUP.begin()
    logging.getLogger("lightning.pytorch.trainer").info("HPU available: False")
    assert lightning_log.messages == []
    startup_log_callback().on_train_start(None, None)  # type: ignore[arg-type]
    assert lightning_log.messages == ["HPU available: False"] and STARTUP.training_started


# ----- nothing left behind


def _hydra_run_dir(root: Path, log_text: str = "") -> Path:
    run = root / "outputs" / "vqgan" / "2024-01-01_00-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / "train.log").write_text(log_text)
    return run


@pytest.mark.parametrize(
    ("error", "extra", "log_text", "env", "removed"),
    [
        (ConfigError("bad"), None, "", {}, True),
        (ConfigError("bad"), "logs", "", {}, True),  # an empty folder a logger made
        (ConfigError("bad"), "checkpoints/last.ckpt", "", {}, False),
        (ConfigError("bad"), None, "an earlier run's log\n", {}, False),
        (ConfigError("bad"), None, "", {"LOCAL_RANK": "1"}, False),
        (RuntimeError("a bug"), None, "", {}, False),
    ],
)
def test_a_failed_start_removes_its_fresh_run_dir(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    extra: str | None,
    log_text: str,
    env: dict[str, str],
    removed: bool,
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in RANK_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    run = _hydra_run_dir(tmp_path, log_text)
    with pytest.raises(type(error)), startup_guard(run, ".hydra"):
        (run / "train.log").write_text("[INFO] generating synthetic shapes\n")
        if extra and extra.endswith(".ckpt"):
            (run / extra).parent.mkdir(parents=True)
            (run / extra).write_bytes(b"weights")
        elif extra:
            (run / extra).mkdir()
        raise error
    assert run.exists() != removed
    assert (tmp_path / "outputs").exists() != removed  # emptied parents below the working dir go too
    assert not STARTUP.active


def test_a_started_run_keeps_its_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = _hydra_run_dir(tmp_path)
    with pytest.raises(TrainingDiverged), startup_guard(run, ".hydra"):
        StartupLog().on_train_start(None, None)  # type: ignore[arg-type]
        raise TrainingDiverged("loss is NaN")
    assert run.exists()


def test_no_empty_dir_is_left_on_error(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), no_empty_dir_on_error(out):
        out.mkdir(parents=True)
        raise RuntimeError("generate failed")
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), no_empty_dir_on_error(tmp_path / "kept"):
        raise RuntimeError("generate failed")
    assert (tmp_path / "kept").is_dir()  # it was there before
    with pytest.raises(RuntimeError), no_empty_dir_on_error(out):
        out.mkdir(parents=True)
        (out / "0.png").write_bytes(b"png")
        raise RuntimeError("generate failed")
    assert (out / "0.png").is_file()  # written images stay
    with no_empty_dir_on_error(tmp_path / "c"):
        (tmp_path / "c").mkdir()
    assert (tmp_path / "c").is_dir()  # no error: nothing removed


# ----- sample options


def _sample_cfg(**options: Any) -> Any:
    base = OmegaConf.load(CONF_DIR / "sample.yaml")
    base.pop("defaults")
    return OmegaConf.merge(base, options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"images_per_prompt": 0}, "images_per_prompt must be a positive integer, got 0"),
        ({"batch_size": -2}, "batch_size must be a positive integer, got -2"),
        ({"grid_columns": 0}, "grid_columns must be a positive integer, got 0"),
        ({"seed": "abc"}, "seed must be an integer (int), got 'abc'"),
        ({"images_per_prompt": 1.5}, "images_per_prompt must be an integer (int), got 1.5"),
        ({"use_ema": "maybe"}, "use_ema must be true or false (bool), got 'maybe'"),
        ({"interpolate": "w"}, "interpolate must be z or text, got 'w'"),
        ({"interpolate": "z", "steps": 1}, "steps=1: an interpolation strip needs at least 2 images"),
    ],
)
def test_check_sample_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_sample_options(_sample_cfg(**options))
    assert str(info.value) == message
    check_sample_options(_sample_cfg(images_per_prompt=2, grid_columns=None, interpolate="text"))


class _Family:
    family_name = "muse"

    def generate(
        self, prompts: list[str], steps: int = 12, guidance_scale: float = 3.0, generator: Any = None
    ) -> None: ...


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (
            {"stpes": 3},
            "model=muse has no sampling option 'stpes'; did you mean sampling.steps? "
            "its options: steps, guidance_scale",
        ),
        (
            {"generator": 1},
            "model=muse has no sampling option 'generator'; its options: steps, guidance_scale",
        ),
        ({"steps": "abc"}, "sampling.steps must be an integer (int), got 'abc'"),
        ({"guidance_scale": "high"}, "sampling.guidance_scale must be a number (float), got 'high'"),
    ],
)
def test_check_generate_options(sampling: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_generate_options(_Family(), sampling)
    assert str(info.value) == message
    check_generate_options(_Family(), {"steps": 3, "guidance_scale": 2})


# ----- end to end, as a user runs them


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["trainer.max_stpes=3"],
            "error: unknown config key trainer.max_stpes; did you mean trainer.max_steps? "
            "(to add a new key on purpose, write +trainer.max_stpes=...)",
        ),
        (  # Hydra wraps the data module's ConfigError
            ["model=vqgan", "data.batch_size=0"],
            "error: data.batch_size and data.image_size must be >= 1 and data.num_workers >= 0",
        ),
        (  # Hydra wraps Lightning's MisconfigurationException, raised after the data was prepared
            ["model=vqgan", "trainer.max_steps=-5"],
            "error: trainer: `max_steps` must be a non-negative integer or -1 (infinite steps). You passed in -5.",
        ),
        (  # a DataError after the Trainer (and its banner) exists
            ["model=vqgan", "data=webdataset", "data.train_urls=/nonexistent/dir"],
            "error: shard /nonexistent/dir does not exist",
        ),
    ],
    ids=["typo", "wrapped-config-error", "wrapped-lightning-error", "after-trainer"],
)
def test_train_bad_input_is_one_line_and_writes_nothing(
    args: list[str], message: str, tmp_path: Path, small_data_overrides: list[str]
) -> None:
    run = tmp_path / "run"
    shards = "data=webdataset" in args  # the synthetic set's options are not the shard reader's
    data = [o for o in small_data_overrides if not (shards and o.startswith("data.synthetic"))]
    proc = run_cli("t2i_train", *data, *TINY, *args, f"hydra.run.dir={run}")
    assert_cli_error(proc, message)
    assert one_error_line(proc.stderr) == message
    assert not run.exists()


def test_sample_options_are_checked_before_the_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    proc = run_cli(
        "t2i_train.sample", f"checkpoint={tmp_path}/none.ckpt", "prompts=[a red circle]", f"output_dir={out}",
        "images_per_prompt=0",
    )  # fmt: skip
    assert_cli_error(proc, "error: images_per_prompt must be a positive integer, got 0")
    assert not out.exists()


@pytest.fixture(scope="module")
def muse_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_data_overrides: list[str]) -> Path:
    """A 2-step tiny Muse run; a valid run still prints Lightning's start-up lines (held, then released)."""
    run = tmp_path_factory.mktemp("muse_run")
    proc = run_cli(
        "t2i_train", "model=muse", "model.dim=32", "model.depth=1", "model.heads=2", "model.mlp_dim=64",
        "trainer.max_steps=2", "trainer.enable_model_summary=false", *small_data_overrides, *TINY,
        f"hydra.run.dir={run}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GPU available" in proc.stdout + proc.stderr
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("images_per_prompt=0", "error: images_per_prompt must be a positive integer, got 0"),
        (
            "sampling.stpes=3",
            "error: model=muse has no sampling option 'stpes'; did you mean sampling.steps? ",
        ),
    ],
    ids=["images_per_prompt", "sampling-typo"],
)
def test_sample_bad_options_with_a_checkpoint(
    muse_checkpoint: Path, option: str, message: str, tmp_path: Path
) -> None:
    out = tmp_path / "new" / "samples"
    proc = run_cli(
        "t2i_train.sample",
        f"checkpoint={muse_checkpoint}",
        "prompts=[a red circle]",
        f"output_dir={out}",
        option,
    )
    assert_cli_error(proc, message)
    assert not (tmp_path / "new").exists()
