"""`python -m t2i_train.pipeline [--recipe NAME] [--data DIR] [--out DIR] [--<stage> K=V ...]`: a shapes recipe end
to end in one process (`make train` is the muse recipe; `make train-galip`, `make train-diffusion` and
`make train-dalle3` the others).

Each recipe is a module of ``t2i_train.recipes`` that declares its stages and its report (see that package):
- muse: ``experiment=shapes_vqgan`` -> held-out PSNR -> pre-encoded tokens (train and val) -> ``experiment=shapes_muse``
  on the tokens;
- galip: ``experiment=shapes_clip`` -> ``experiment=shapes_galip`` through that CLIP;
- diffusion: ``experiment=shapes_vae`` -> held-out PSNR -> pre-encoded latents -> ``experiment=shapes_diffusion`` on
  the latents and the descriptive captions; its prompts are upsampled to descriptive ones before sampling;
then samples for the seen and the held-out prompts -> prompt-following scores -> ``OUT/report.json`` and a summary.
- dalle3: the DALL-E 3 ablation in miniature (``t2i_train.recipes.dalle3``): CLIP, captioner, recaptioned shards,
  VAE, latent diffusion on three caption blends, one table.
Every recipe starts with the synthetic shapes shards (made when ``DATA/dataset.json`` is missing).

Re-running continues where it stopped: training stages resume from their ``last.ckpt`` (a finished one returns
at once), encoding skips finished shards; sampling and scoring are redone. ``--<stage> K=V ...`` (``--vqgan``,
``--muse``, ``--clip``, ``--galip``, ``--vae``, ``--diffusion``, ``--captioner``) are train overrides of that stage
(``--muse trainer.max_steps=3000``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import CONF_DIR, console_logging, hydra_argv, quiet_third_party, user_errors_exit
from t2i_train.recipes import DEFAULT, available, get
from t2i_train.recipes.base import Run
from t2i_train.run_state import set_continue_command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    recipes = available()
    parser = argparse.ArgumentParser(
        prog="python -m t2i_train.pipeline",
        description="A shapes recipe end to end in one process: data, stage 1, stage 2, samples, scores.",
    )
    parser.add_argument(
        "--data", type=Path, default=Path("data/shapes32"), help="shapes shards (made if missing)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/make_train"), help="where every stage writes"
    )
    parser.add_argument("--count", type=int, default=20000, help="training samples when the data are made")
    parser.add_argument(
        "--recipe",
        choices=list(recipes),
        default=DEFAULT,
        help="; ".join(f"{name}: {recipe.help}" for name, recipe in recipes.items()),
    )
    stages = dict.fromkeys(stage for recipe in recipes.values() for stage in recipe.training_stages())
    for stage in stages:
        parser.add_argument(
            f"--{stage}", nargs="*", default=[], metavar="K=V", help=f"overrides of the {stage} stage"
        )
    parser.add_argument("--images-per-prompt", type=int, default=4)
    for name, recipe in recipes.items():
        for option in recipe.options:
            kwargs = dict(option.kwargs)
            kwargs["help"] = f"{name}: {kwargs.get('help', '')}"
            parser.add_argument(option.flag, **kwargs)
    return parser.parse_args(argv)


@user_errors_exit
def run(args: argparse.Namespace) -> dict[str, Any]:
    recipe = get(args.recipe)
    options = {k: v for k, v in vars(args).items() if k not in ("data", "out", "recipe")}
    # each stage's train overrides: brace patterns as a user writes them, a grammar error in one line
    for stage in recipe.training_stages():
        options[stage] = hydra_argv(options[stage])
    report, text = recipe.run(Run(data=args.data, out=args.out, conf_dir=CONF_DIR, options=options))
    print(text)
    return report


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    console_logging()
    given = list(sys.argv[1:] if argv is None else argv)
    # a stage stopped by a signal or a lost rank: re-running the pipeline continues it, stage by stage
    set_continue_command(shlex.join(["python", "-m", "t2i_train.pipeline", *given]))
    try:
        run(parse_args(apply_trust_argument(given)))
    finally:
        set_continue_command(None)


if __name__ == "__main__":
    main()
