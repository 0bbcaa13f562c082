"""`python -m t2i_train.cli.report OUT [--seconds N] [--recipe muse|galip|diffusion]`: the closing summary of a
shapes recipe.

Reads what `python -m t2i_train.pipeline` wrote under OUT (`vqgan/psnr.json` for muse, `samples_{seen,heldout}/eval.json`),
prints where everything went and the numbers the issues ask for, and writes them to `OUT/report.json`. The
recipes are those of ``t2i_train.recipes`` whose report is rebuilt from files (``Recipe.from_files``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from t2i_train.recipes import DEFAULT, available


def main(argv: list[str] | None = None) -> None:
    rebuildable = {name: r for name, r in available().items() if r.from_files is not None}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=int, default=None)
    parser.add_argument("--recipe", choices=sorted(rebuildable), default=DEFAULT)
    args = parser.parse_args(argv)
    recipe = rebuildable[args.recipe]
    assert recipe.from_files is not None
    report = recipe.from_files(args.out, args.seconds)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(recipe.render(args.out, report))


if __name__ == "__main__":
    main()
