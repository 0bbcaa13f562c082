"""`python -m t2i_train.sample upsampler=...` on a tiny Muse checkpoint: manifest, images, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t2i_train.cli.sample import check_upsampler_args
from tests.helpers import assert_one_line_error, run_cli, save_tiny_lm

PROMPTS = "prompts=[a red circle in the top left,a dog on a skateboard]"


@pytest.fixture(scope="module")
def muse_ckpt(tmp_path_factory: pytest.TempPathFactory, small_data_overrides: list[str]) -> Path:
    run = tmp_path_factory.mktemp("muse_upsampler")
    proc = run_cli(
        "t2i_train",
        "model=muse",
        "trainer.max_steps=2",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "sampling.every_n_steps=0",
        f"hydra.run.dir={run}",
        *small_data_overrides,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run / "checkpoints" / "last.ckpt"


def _sample(ckpt: Path, out: Path, *extra: str):
    return run_cli(
        "t2i_train.sample",
        f"checkpoint={ckpt}",
        PROMPTS,
        f"output_dir={out}",
        "images_per_prompt=2",
        "sampling.steps=2",
        *extra,
    )


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_template_upsampler_writes_both_prompts_and_draws_from_the_upsampled_one(
    muse_ckpt: Path, tmp_path: Path
) -> None:
    plain, upsampled = tmp_path / "plain", tmp_path / "template"
    assert _sample(muse_ckpt, plain).returncode == 0
    proc = _sample(muse_ckpt, upsampled, "upsampler=template", "upsampler.template_index=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "upsampled 'a red circle in the top left' -> 'A medium-sized solid red circle" in proc.stdout
    assert "1 of 2 prompts" in proc.stderr  # the dog passes through, said once
    lines = _manifest(upsampled)
    assert [line["prompt"] for line in lines] == ["a red circle in the top left"] * 2 + [
        "a dog on a skateboard"
    ] * 2
    long = lines[0]["upsampled_prompt"]
    assert long.startswith("A medium-sized solid red circle sits in the top left of the image")
    assert [line["upsampled_prompt"] for line in lines] == [
        long,
        long,
        "a dog on a skateboard",
        "a dog on a skateboard",
    ]
    assert "upsampled_prompt" not in _manifest(plain)[0]  # upsampler=none keeps the manifest as it was
    # the image model was given the upsampled text: same seed, other image; the pass-through ones are equal
    read = lambda out, n: (out / f"{n}.png").read_bytes()  # noqa: E731
    assert read(upsampled, 0) != read(plain, 0)
    assert read(upsampled, 2) == read(plain, 2) and read(upsampled, 3) == read(plain, 3)


def test_user_template_string_from_the_command_line(muse_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "user"
    proc = _sample(
        muse_ckpt, out, "upsampler=template", 'upsampler.template="A detailed photo of {prompt}, sharp"'
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _manifest(out)[2]["upsampled_prompt"] == "A detailed photo of a dog on a skateboard, sharp"


def test_causal_lm_upsampler_from_a_saved_directory(muse_ckpt: Path, tmp_path: Path) -> None:
    lm = save_tiny_lm(tmp_path / "lm", constant_token="x")
    out = tmp_path / "lm_out"
    proc = _sample(
        muse_ckpt,
        out,
        "upsampler=causal_lm",
        f"upsampler.model={lm}",
        "upsampler.max_new_tokens=5",
        "device=cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line["upsampled_prompt"] for line in _manifest(out)] == ["xxxxx"] * 4


def test_missing_lm_is_one_line(muse_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "none"
    assert_one_line_error(
        _sample(muse_ckpt, out, "upsampler=causal_lm", f"upsampler.model={tmp_path}/no_lm"),
        f"upsampler.model={tmp_path}/no_lm: no such directory",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["upsampler=llm"], "error: unknown upsampler 'llm'; choose one of: causal_lm, none, template"),
        (
            ["upsampler=template", "upsampler.model=gpt2"],
            "error: upsampler=template has no option 'model'; its",
        ),
        (["upsampler.temperature=1"], "error: upsampler=none has no option 'temperature'; it takes none"),
    ],
)
def test_unknown_choice_or_option_is_one_line_before_hydra(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        check_upsampler_args(["checkpoint=x", *args])
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_known_choices_and_options_pass() -> None:
    check_upsampler_args(["upsampler=causal_lm", "upsampler.model=gpt2", "++upsampler.temperature=0.7"])
    check_upsampler_args(["upsampler=template", 'upsampler.template="A photo of {prompt}"', "seed=1"])
