"""`python -m t2i_train.cli.report OUT [--seconds N]`: the closing summary of `make train`.

Reads what the pipeline wrote under OUT (`vqgan/psnr.json`, `samples_{seen,heldout}/eval.json`), prints where
everything went and the numbers the foundation issue asks for, and writes them to `OUT/report.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TARGETS = {"psnr_db": 25.0, "seen": 0.90, "heldout": 0.60}


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def collect(out: Path, seconds: int | None = None) -> dict[str, Any]:
    psnr = _read(out / "vqgan" / "psnr.json")
    report: dict[str, Any] = {"seconds": seconds, "vqgan_psnr_db": psnr.get("psnr_db")}
    report["vqgan_codebook_used"] = f"{psnr.get('codebook_used')}/{psnr.get('codebook_size')}"
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

    lines = ["", "make train: done" + (f" in {report['seconds'] / 60:.1f} min" if report["seconds"] else "")]
    psnr = report["vqgan_psnr_db"]
    lines.append(
        f"  VQGAN held-out PSNR: {psnr} dB, codebook {report['vqgan_codebook_used']}"
        + check(psnr, TARGETS["psnr_db"])
    )
    for split in ("seen", "heldout"):
        s = report[split]
        lines.append(
            f"  Muse prompt following, {split} prompts ({s['n']} images): {pct(s['all'])} all three "
            f"(colour {pct(s['colour'])}, shape {pct(s['shape'])}, position {pct(s['position'])})"
            + check(s["all"], TARGETS[split])
        )
    lines += [
        f"  checkpoints: {out}/vqgan/checkpoints/last.ckpt, {out}/muse/checkpoints/last.ckpt",
        f"  pre-encoded tokens: {out}/tokens; sample grids: {out}/samples_seen/grid.png, {out}/samples_heldout/grid.png",
        f"  numbers: {out}/report.json",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=int, default=None)
    args = parser.parse_args(argv)
    report = collect(args.out, args.seconds)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(render(args.out, report))


if __name__ == "__main__":
    main()
