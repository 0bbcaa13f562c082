"""What a recipe is: named stages run in order over one output folder, then a report.

A recipe module (any module of ``t2i_train.recipes`` that defines ``RECIPE``) builds a :class:`Recipe` from
:class:`Stage` functions; ``python -m t2i_train.pipeline --recipe NAME`` runs them (``t2i_train.recipes.run``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """One recipe run: where the data and outputs are, the user's options and what the stages returned so far.

    ``options`` holds the pipeline's options by name (``images_per_prompt``, a recipe's own options such as
    ``blends``) and, under each training stage's name, that stage's train overrides (``--muse K=V ...``).
    """

    data: Path
    out: Path
    conf_dir: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    start: float = field(default_factory=time.time)
    #: stage name -> what that stage's function returned (a checkpoint path, scores, ...)
    results: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)

    def overrides(self, stage: str) -> list[str]:
        """The user's train overrides of ``stage`` (``--<stage> K=V ...``), applied after the recipe's own."""
        return list(self.options.get(stage) or [])

    def seconds(self) -> int:
        return int(time.time() - self.start)


@dataclass(frozen=True)
class Stage:
    """One step of a recipe. ``run`` does it (and returns what later stages or the report need, stored in
    ``Run.results[name]``); ``trains``: it trains a model and takes ``--<name> K=V ...`` train overrides."""

    name: str
    run: Callable[[Run], Any]
    trains: bool = False
    help: str = ""


@dataclass(frozen=True)
class Option:
    """A command-line option of one recipe (``--blends``): ``flag`` and ``argparse.add_argument`` keywords."""

    flag: str
    kwargs: Mapping[str, Any]

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Recipe:
    """A multi-stage recipe: its ``stages`` in order, then ``report`` (the numbers, written to
    ``OUT/report.json``) and ``render`` (the closing summary printed, and written to ``OUT/<summary_file>`` when
    set). ``from_files``: the report rebuilt from what an earlier run wrote under OUT (``python -m
    t2i_train.cli.report``), for recipes whose numbers all live in files."""

    name: str
    help: str
    stages: Sequence[Stage]
    report: Callable[[Run], dict[str, Any]]
    render: Callable[[Path, dict[str, Any]], str]
    options: Sequence[Option] = ()
    summary_file: str | None = None
    from_files: Callable[[Path, int | None], dict[str, Any]] | None = None

    def training_stages(self) -> list[str]:
        return [stage.name for stage in self.stages if stage.trains]

    def run(self, run: Run) -> tuple[dict[str, Any], str]:
        """Every stage in order, then the report: ``OUT/report.json`` (and ``OUT/<summary_file>``); returns the
        report and its summary text."""
        for stage in self.stages:
            run.results[stage.name] = stage.run(run)
        report = self.report(run)
        (run.out / "report.json").write_text(json.dumps(report, indent=2))
        text = self.render(run.out, report)
        if self.summary_file:
            (run.out / self.summary_file).write_text(text + "\n")
        return report, text
