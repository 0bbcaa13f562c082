"""`python -m t2i_train.cli.report OUT [--seconds N] [--recipe muse|galip]`: the closing summary of a shapes recipe.

Reads what `python -m t2i_train.pipeline` wrote under OUT (`vqgan/psnr.json` for muse, `samples_{seen,heldout}/eval.json`),
prints where everything went and the numbers the issues ask for, and writes them to `OUT/report.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# the issues' targets: Muse >= 90% seen (foundation), GALIP and diffusion >= 85% seen; held-out >= 60%
TARGETS: dict[str, Any] = {
    "psnr_db": 25.0,
    "seen": {"muse": 0.90, "galip": 0.85, "diffusion": 0.85},
    "heldout": 0.60,
}
#: (stage 1, stage 2) run folders of each recipe; the stage 1 with a PSNR file is reported
STAGES = {"muse": ("vqgan", "muse"), "galip": ("clip", "galip"), "diffusion": ("vae", "diffusion")}


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(out: Path, seconds: int | None = None, recipe: str = "muse") -> dict[str, Any]:
    report: dict[str, Any] = {"recipe": recipe, "seconds": seconds}
    if recipe == "muse":
        psnr = _read(out / "vqgan" / "psnr.json")
        report["vqgan_psnr_db"] = psnr.get("psnr_db")
        report["vqgan_codebook_used"] = f"{psnr.get('codebook_used')}/{psnr.get('codebook_size')}"
    if recipe == "diffusion":
        report["vae_psnr_db"] = _read(out / "vae" / "psnr.json").get("psnr_db")
    for split in ("seen", "heldout"):
        scores = _read(out / f"samples_{split}" / "eval.json")
        report[split] = {k: scores.get(k) for k in ("all", "colour", "shape", "position", "n")}
    return report


def render(out: Path, report: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    def check(value: float | None, target: float) -> str:
        return (
            ""
            if value is None
            else ("  (target met)" if value >= target else f"  (target {target:g} not met)")
        )

    recipe = report.get("recipe", "muse")
    done = f"{recipe} recipe: done" + (f" in {report['seconds'] / 60:.1f} min" if report["seconds"] else "")
    lines = ["", done]
    stages = STAGES[recipe]
    if recipe == "muse":
        psnr = report["vqgan_psnr_db"]
        lines.append(
            f"  VQGAN held-out PSNR: {psnr} dB, codebook {report['vqgan_codebook_used']}"
            + check(psnr, TARGETS["psnr_db"])
        )
    if recipe == "diffusion":
        lines.append(f"  VAE held-out PSNR: {report['vae_psnr_db']} dB")
    target = {"seen": TARGETS["seen"][recipe], "heldout": TARGETS["heldout"]}
    for split in ("seen", "heldout"):
        s = report[split]
        lines.append(
            f"  {stages[1]} prompt following, {split} prompts ({s['n']} images): {pct(s['all'])} all three "
            f"(colour {pct(s['colour'])}, shape {pct(s['shape'])}, position {pct(s['position'])})"
            + check(s["all"], target[split])
        )
    lines.append("  checkpoints: " + ", ".join(f"{out}/{stage}/checkpoints/last.ckpt" for stage in stages))
    if recipe in ("muse", "diffusion"):
        lines.append(
            f"  pre-encoded {'tokens' if recipe == 'muse' else 'latents'}: {out}/{'tokens' if recipe == 'muse' else 'latents'}"
        )
    lines += [
        f"  sample grids: {out}/samples_seen/grid.png, {out}/samples_heldout/grid.png",
        f"  numbers: {out}/report.json",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=int, default=None)
    parser.add_argument("--recipe", choices=sorted(STAGES), default="muse")
    args = parser.parse_args(argv)
    report = collect(args.out, args.seconds, args.recipe)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(render(args.out, report))


if __name__ == "__main__":
    main()
