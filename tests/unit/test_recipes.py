"""The recipe registry: every module of ``t2i_train.recipes`` with a ``RECIPE`` is a recipe of
``python -m t2i_train.pipeline``, its stages run in order, its options and stage overrides on the command line;
adding one touches no other file."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

import t2i_train.recipes as recipes
from t2i_train.cli.pipeline import main

TOY = """
from t2i_train.recipes.base import Option, Recipe, Stage


def first(run):
    return {"overrides": run.overrides("toy"), "flavour": run.option("flavour")}


def second(run):
    (run.out / "second.txt").write_text(repr(sorted(run.results)))
    return len(run.results)


RECIPE = Recipe(
    name="toy",
    help="a recipe from a module nothing else names",
    stages=(Stage("toy", first, trains=True), Stage("second", second)),
    report=lambda run: {"recipe": "toy", **run.results["toy"], "before_second": run.results["second"]},
    render=lambda out, report: f"toy recipe: {report['flavour']}",
    options=(Option("--flavour", {"default": "plain", "help": "what the toy tastes of"}),),
    summary_file="toy.md",
)
"""


@pytest.fixture
def toy_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A recipe module in a folder added to the package's path: what a new ``recipes/toy.py`` is."""
    folder = tmp_path / "more_recipes"
    folder.mkdir()
    (folder / "toy.py").write_text(TOY)
    monkeypatch.setattr(recipes, "__path__", [*recipes.__path__, str(folder)])
    recipes.available.cache_clear()
    yield tmp_path / "out"
    sys.modules.pop("t2i_train.recipes.toy", None)
    monkeypatch.undo()
    recipes.available.cache_clear()


def test_the_shapes_recipes_are_found_with_their_training_stages() -> None:
    found = recipes.available()
    assert (
        list(found) == ["cm3leon", "dalle3", "diffusion", "galip", "gill", "muse"]
        and recipes.DEFAULT == "muse"
    )
    assert found["muse"].training_stages() == ["vqgan", "muse"]
    assert found["galip"].training_stages() == ["clip", "galip"]
    assert found["diffusion"].training_stages() == ["vae", "diffusion"]
    assert found["dalle3"].training_stages() == ["clip", "captioner", "vae", "diffusion"]
    assert found["gill"].training_stages() == ["clip", "lm", "vae", "diffusion", "gill"]
    assert found["cm3leon"].training_stages() == ["vqgan", "cm3leon", "clip", "cm3leon_ra"]
    assert all(recipe.stages[0].name == "data" for recipe in found.values())  # the shapes shards first


def test_a_new_recipe_module_is_a_pipeline_recipe(
    toy_recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = toy_recipe
    out.mkdir()
    main(["--recipe", "toy", "--data", str(out / "data"), "--out", str(out), "--toy", "a=1", "b=2"])
    report = json.loads((out / "report.json").read_text())
    assert report == {"recipe": "toy", "overrides": ["a=1", "b=2"], "flavour": "plain", "before_second": 1}
    assert (out / "second.txt").read_text() == "['toy']"  # stages in order, each seeing the earlier results
    assert (
        out / "toy.md"
    ).read_text() == "toy recipe: plain\n" and "toy recipe: plain" in capsys.readouterr().out

    main(["--recipe=toy", f"--out={out}", "--flavour=mint"])  # the recipe's own option
    assert json.loads((out / "report.json").read_text())["flavour"] == "mint"


def test_stage_overrides_take_brace_patterns_as_a_user_writes_them(toy_recipe: Path) -> None:
    out = toy_recipe
    out.mkdir()
    main(["--recipe=toy", f"--out={out}", "--toy", "data.train_urls=/data/cc3m/{00000..00331}.tar"])
    (override,) = json.loads((out / "report.json").read_text())["overrides"]
    (parsed,) = OverridesParser.create().parse_overrides([override])  # what compose() reads
    assert parsed.key_or_group == "data.train_urls" and parsed.value() == "/data/cc3m/{00000..00331}.tar"


def test_an_unknown_recipe_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--recipe", "toy"])
    assert exc.value.code == 2 and "invalid choice: 'toy'" in capsys.readouterr().err
