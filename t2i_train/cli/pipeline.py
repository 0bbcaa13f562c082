"""`python -m t2i_train.pipeline [--recipe muse|galip] [--data DIR] [--out DIR] [--<stage> K=V ...]`: a shapes recipe
end to end in one process (`make train` is the muse recipe, `make train-galip` the galip one).

Stages (each the same code as its own CLI, run in one Python process so the ~10 s of imports are paid once):
synthetic shapes shards (when ``DATA/dataset.json`` is missing), then
- muse: ``experiment=shapes_vqgan`` -> held-out PSNR -> pre-encoded tokens (train and val) -> ``experiment=shapes_muse``
  on the tokens;
- galip: ``experiment=shapes_clip`` -> ``experiment=shapes_galip`` through that CLIP;
then samples for the seen and the held-out prompts -> prompt-following scores -> ``OUT/report.json`` and a summary.

Re-running continues where it stopped: training stages resume from their ``last.ckpt`` (a finished one returns
at once), encoding skips finished shards; sampling and scoring are redone. ``--vqgan``/``--muse``/``--clip``/
``--galip`` take train overrides of that stage (``--muse trainer.max_steps=3000``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from t2i_train.cli.common import CONF_DIR, quiet_third_party, user_errors_exit

log = logging.getLogger("t2i_train.pipeline")

SPLITS = ("seen", "heldout")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
        "--recipe", choices=sorted(RECIPES), default="muse", help="muse (make train) or galip"
    )
    for stage in ("vqgan", "muse", "clip", "galip"):
        parser.add_argument(
            f"--{stage}", nargs="*", default=[], metavar="K=V", help=f"overrides of the {stage} stage"
        )
    parser.add_argument("--images-per-prompt", type=int, default=4)
    return parser.parse_args(argv)


def ensure_shapes_data(data: Path, count: int) -> None:
    if (data / "dataset.json").is_file():
        log.info("data: %s (exists)", data)
        return
    from t2i_train.data.shards import write_synthetic_shards

    write_synthetic_shards(data, count=count, val_count=512, holdout_fraction=0.1, seed=0)


def train_stage(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """``python -m t2i_train <overrides> hydra.run.dir=<run_dir> resume=auto``, in this process."""
    from t2i_train.cli.train import train

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"run_dir={run_dir}", "resume=auto"])
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    log.info("training %s into %s", cfg.model._target_.rsplit(".", 1)[-1], run_dir)
    return train(cfg)


def sample_and_score(
    checkpoint: Path, prompts_file: Path, out: Path, images_per_prompt: int
) -> dict[str, Any]:
    from t2i_train.checkpoint import load_family, read_checkpoint
    from t2i_train.cli.evaluate import prompt_following
    from t2i_train.cli.sample import read_prompts, sample_to_dir, training_sampling_kwargs

    ckpt = read_checkpoint(checkpoint)
    model = load_family(checkpoint, ckpt=ckpt)
    prompts = read_prompts(None, str(prompts_file))
    sample_to_dir(model, prompts, out, images_per_prompt, seed=0, sampling=training_sampling_kwargs(ckpt))
    return prompt_following(str(out))


def muse_recipe(args: argparse.Namespace) -> Path:
    """VQGAN -> held-out PSNR -> pre-encoded tokens -> Muse on the tokens; returns Muse's checkpoint."""
    from t2i_train.cli.encode import encode
    from t2i_train.cli.evaluate import reconstruction

    data, out = args.data, args.out
    vq_dir = out / "vqgan"
    train_stage(vq_dir, ["experiment=shapes_vqgan", f"data.train_urls={data}", *args.vqgan])
    vq_ckpt = vq_dir / "checkpoints" / "last.ckpt"
    psnr = reconstruction(str(vq_ckpt), str(data / "val"), output=str(vq_dir / "psnr.json"))
    log.info("VQGAN held-out PSNR %.2f dB", psnr["psnr_db"])
    for split in (".", "val"):
        encode(str(vq_ckpt), str(data / split), str(out / "tokens" / split))
    muse = [
        "experiment=shapes_muse",
        f"data.train_urls={out / 'tokens'}",
        f"data.val_urls={out / 'tokens' / 'val'}",
        "data.fields=[image_tokens]",
        "data.load_images=false",
        f"model.tokenizer_checkpoint={vq_ckpt}",
        "torch_threads=2",  # the data worker only reads tokens: both cores go to the transformer
        *args.muse,
    ]
    train_stage(out / "muse", muse)
    return out / "muse" / "checkpoints" / "last.ckpt"


def galip_recipe(args: argparse.Namespace) -> Path:
    """CLIP (stage 1) -> GALIP through it; returns GALIP's checkpoint."""
    data, out = args.data, args.out
    train_stage(out / "clip", ["experiment=shapes_clip", f"data.train_urls={data}", *args.clip])
    clip_ckpt = out / "clip" / "checkpoints" / "last.ckpt"
    galip = ["experiment=shapes_galip", f"data.train_urls={data}", f"model.clip_checkpoint={clip_ckpt}"]
    train_stage(out / "galip", [*galip, *args.galip])
    return out / "galip" / "checkpoints" / "last.ckpt"


RECIPES = {"muse": muse_recipe, "galip": galip_recipe}


@user_errors_exit
def run(args: argparse.Namespace) -> dict[str, Any]:
    from t2i_train.cli.report import collect, render

    start = time.time()
    ensure_shapes_data(args.data, args.count)
    checkpoint = RECIPES[args.recipe](args)
    for split in SPLITS:
        scores = sample_and_score(
            checkpoint,
            args.data / f"prompts_{split}.txt",
            args.out / f"samples_{split}",
            args.images_per_prompt,
        )
        log.info("prompt following, %s prompts: %.1f%% all three", split, 100 * scores["all"])
    report = collect(args.out, int(time.time() - start), args.recipe)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(render(args.out, report))
    return report


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    run(parse_args(argv))


if __name__ == "__main__":
    main()
