"""The closing summary of a recipe that trains one text-to-image model (after its stage 1) and samples it:
the stage-1 PSNR when it has one, prompt following of the seen and held-out prompts against the issues'
targets, and where everything went. Every number is read from files under OUT, so the report can be rebuilt
(``python -m t2i_train.cli.report OUT --recipe NAME``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2i_train.recipes.base import Run
from t2i_train.recipes.stages import SPLITS

#: the issues' targets every such recipe shares (each recipe names its own target for seen prompts)
PSNR_TARGET_DB = 25.0
HELDOUT_TARGET = 0.60
SCORE_KEYS = ("all", "colour", "shape", "position", "n")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def check(value: float | None, target: float) -> str:
    if value is None:
        return ""
    return "  (target met)" if value >= target else f"  (target {target:g} not met)"


@dataclass(frozen=True)
class Autoencoder:
    """A stage-1 autoencoder whose held-out PSNR (``OUT/<stage>/psnr.json``) the report shows as ``label``;
    ``codebook``: also its codebook usage (VQ); ``checked``: against ``PSNR_TARGET_DB``; ``codes``: the folder
    under OUT its pre-encoded codes went to."""

    stage: str
    label: str
    codes: str
    codebook: bool = False
    checked: bool = False


@dataclass(frozen=True)
class SampledReport:
    """The report of recipe ``recipe``: stage-1 run folder ``stage1``, the text-to-image model's ``stage2``
    (its prompt-following lines carry that name), ``seen_target`` its target on the seen prompts."""

    recipe: str
    stage1: str
    stage2: str
    seen_target: float
    autoencoder: Autoencoder | None = None

    def collect(self, out: Path, seconds: int | None = None) -> dict[str, Any]:
        report: dict[str, Any] = {"recipe": self.recipe, "seconds": seconds}
        ae = self.autoencoder
        if ae is not None:
            psnr = read_json(out / ae.stage / "psnr.json")
            report[f"{ae.stage}_psnr_db"] = psnr.get("psnr_db")
            if ae.codebook:
                report[f"{ae.stage}_codebook_used"] = (
                    f"{psnr.get('codebook_used')}/{psnr.get('codebook_size')}"
                )
        for split in SPLITS:
            scores = read_json(out / f"samples_{split}" / "eval.json")
            report[split] = {k: scores.get(k) for k in SCORE_KEYS}
        return report

    def render(self, out: Path, report: dict[str, Any]) -> str:
        done = f"{self.recipe} recipe: done" + (
            f" in {report['seconds'] / 60:.1f} min" if report["seconds"] else ""
        )
        lines = ["", done]
        ae = self.autoencoder
        if ae is not None:
            psnr = report[f"{ae.stage}_psnr_db"]
            line = f"  {ae.label} held-out PSNR: {psnr} dB"
            if ae.codebook:
                line += f", codebook {report[f'{ae.stage}_codebook_used']}"
            lines.append(line + (check(psnr, PSNR_TARGET_DB) if ae.checked else ""))
        target = {"seen": self.seen_target, "heldout": HELDOUT_TARGET}
        for split in SPLITS:
            s = report[split]
            lines.append(
                f"  {self.stage2} prompt following, {split} prompts ({s['n']} images): {pct(s['all'])} all three "
                f"(colour {pct(s['colour'])}, shape {pct(s['shape'])}, position {pct(s['position'])})"
                + check(s["all"], target[split])
            )
        stages = (self.stage1, self.stage2)
        lines.append(
            "  checkpoints: " + ", ".join(f"{out}/{stage}/checkpoints/last.ckpt" for stage in stages)
        )
        if ae is not None:
            lines.append(f"  pre-encoded {ae.codes}: {out}/{ae.codes}")
        lines += [
            f"  sample grids: {out}/samples_seen/grid.png, {out}/samples_heldout/grid.png",
            f"  numbers: {out}/report.json",
        ]
        return "\n".join(lines)

    def report(self, run: Run) -> dict[str, Any]:
        """``Recipe.report``: :meth:`collect` of the run's OUT, with the seconds it took."""
        return self.collect(run.out, run.seconds())
