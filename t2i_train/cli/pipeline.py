"""`python -m t2i_train.pipeline [--recipe muse|galip|diffusion|dalle3] [--data DIR] [--out DIR] [--<stage> K=V ...]`:
a shapes recipe end to end in one process (`make train` is the muse recipe; `make train-galip`, `make train-diffusion`
and `make train-dalle3` the others).

Stages (each the same code as its own CLI, run in one Python process so the ~10 s of imports are paid once):
synthetic shapes shards (when ``DATA/dataset.json`` is missing), then
- muse: ``experiment=shapes_vqgan`` -> held-out PSNR -> pre-encoded tokens (train and val) -> ``experiment=shapes_muse``
  on the tokens;
- galip: ``experiment=shapes_clip`` -> ``experiment=shapes_galip`` through that CLIP;
- diffusion: ``experiment=shapes_vae`` -> held-out PSNR -> pre-encoded latents -> ``experiment=shapes_diffusion`` on
  the latents and the descriptive captions; its prompts are upsampled to descriptive ones before sampling;
then samples for the seen and the held-out prompts -> prompt-following scores -> ``OUT/report.json`` and a summary.
- dalle3: the DALL-E 3 ablation in miniature (``t2i_train.cli.dalle3``): VAE, CLIP, captioner, recaptioned shards,
  latent diffusion on three caption blends, one table.

Re-running continues where it stopped: training stages resume from their ``last.ckpt`` (a finished one returns
at once), encoding skips finished shards; sampling and scoring are redone. ``--vqgan``/``--muse``/``--clip``/
``--galip``/``--vae``/``--diffusion``/``--captioner`` take train overrides of that stage (``--muse trainer.max_steps=3000``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from t2i_train.checkpoint_io import apply_trust_argument
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
        "--recipe",
        choices=[*sorted(RECIPES), "dalle3"],
        default="muse",
        help="muse (make train), galip, diffusion, dalle3",
    )
    for stage in ("vqgan", "muse", "clip", "galip", "vae", "diffusion", "captioner"):
        parser.add_argument(
            f"--{stage}", nargs="*", default=[], metavar="K=V", help=f"overrides of the {stage} stage"
        )
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument(
        "--blends",
        default="0,0.65,0.95",
        help="dalle3: fractions of synthetic descriptive captions, one diffusion model each (default %(default)s)",
    )
    parser.add_argument(
        "--caption-rerank",
        type=int,
        default=4,
        metavar="K",
        help="dalle3: also score the captioner with beam K + CLIP reranking of the K beams (0: greedy only; "
        "recaptioning is greedy either way)",
    )
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
    checkpoint: Path, prompts_file: Path, out: Path, images_per_prompt: int, descriptive: bool = False
) -> dict[str, Any]:
    """Sample the prompts of ``prompts_file`` and read the images; ``descriptive``: generate from the prompts
    rewritten into full descriptive captions (what a model trained on those expects), scored against the
    short prompt's colour, shape and position."""
    from t2i_train.checkpoint import load_family, read_checkpoint
    from t2i_train.cli.evaluate import prompt_following
    from t2i_train.cli.sample import read_prompts, sample_to_dir, training_sampling_kwargs

    ckpt = read_checkpoint(checkpoint)
    model = load_family(checkpoint, ckpt=ckpt)
    prompts = read_prompts(None, str(prompts_file))
    upsampled = descriptive_prompts(prompts) if descriptive else None
    sampling = training_sampling_kwargs(ckpt)
    sample_to_dir(model, prompts, out, images_per_prompt, seed=0, sampling=sampling, upsampled=upsampled)
    return prompt_following(str(out))


def descriptive_prompts(prompts: list[str]) -> list[str]:
    """Canonical shapes prompts -> the descriptive template's wording of the same combination."""
    from t2i_train.data.synthetic import descriptive_prompt
    from t2i_train.metrics.shapes_reader import parse_prompt

    return [descriptive_prompt(*parse_prompt(p)) for p in prompts]


def muse_recipe(args: argparse.Namespace) -> Path:
    """VQGAN -> held-out PSNR -> pre-encoded tokens -> Muse on the tokens; returns Muse's checkpoint."""
    data, out = args.data, args.out
    splits = {".": data, "val": data / "val"}
    vq_ckpt = autoencoder_and_codes(args, "vqgan", "shapes_vqgan", args.vqgan, splits, out / "tokens")
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


def autoencoder_and_codes(
    args: argparse.Namespace,
    stage: str,
    experiment: str,
    overrides: list[str],
    splits: dict[str, Path],
    codes: Path,
) -> Path:
    """Train a stage-1 autoencoder into ``OUT/<stage>``, record its held-out PSNR (``psnr.json``), pre-encode
    ``splits`` (name -> shard folder) into ``codes/<name>``; returns its checkpoint."""
    from t2i_train.cli.encode import encode
    from t2i_train.cli.evaluate import reconstruction

    stage_dir = args.out / stage
    train_stage(stage_dir, [f"experiment={experiment}", f"data.train_urls={args.data}", *overrides])
    ckpt = stage_dir / "checkpoints" / "last.ckpt"
    psnr = reconstruction(str(ckpt), str(args.data / "val"), output=str(stage_dir / "psnr.json"))
    log.info("%s held-out PSNR %.2f dB", stage.upper(), psnr["psnr_db"])
    for name, folder in splits.items():
        encode(str(ckpt), str(folder), str(codes / name))
    return ckpt


def vae_and_latents(args: argparse.Namespace, splits: dict[str, Path]) -> Path:
    """Train the shapes VAE, record its held-out PSNR, pre-encode ``splits`` (name -> shard folder) into
    ``OUT/latents/<name>``; returns the VAE checkpoint."""
    return autoencoder_and_codes(args, "vae", "shapes_vae", args.vae, splits, args.out / "latents")


def latent_data(latents: Path, vae_ckpt: Path) -> list[str]:
    """Overrides that train a diffusion stage on pre-encoded latents (train and val folders under ``latents``)."""
    return [
        f"data.train_urls={latents / 'train'}",
        f"data.val_urls={latents / 'val'}",
        "data.fields=[latents]",
        "data.load_images=false",
        f"model.vae_checkpoint={vae_ckpt}",
        "torch_threads=2",  # the data worker only reads latents: both cores go to the UNet
    ]


def diffusion_recipe(args: argparse.Namespace) -> Path:
    """VAE -> held-out PSNR -> latents -> diffusion on the descriptive captions; returns its checkpoint."""
    vae_ckpt = vae_and_latents(args, {"train": args.data, "val": args.data / "val"})
    overrides = ["experiment=shapes_diffusion", *latent_data(args.out / "latents", vae_ckpt), *args.diffusion]
    train_stage(args.out / "diffusion", overrides)
    return args.out / "diffusion" / "checkpoints" / "last.ckpt"


RECIPES = {"muse": muse_recipe, "galip": galip_recipe, "diffusion": diffusion_recipe}
#: recipes whose model is trained on descriptive captions: sampled from upsampled prompts
DESCRIPTIVE = {"diffusion"}


@user_errors_exit
def run(args: argparse.Namespace) -> dict[str, Any]:
    from t2i_train.cli.report import collect, render

    start = time.time()
    ensure_shapes_data(args.data, args.count)
    if args.recipe == "dalle3":
        from t2i_train.cli.dalle3 import run_ablation

        return run_ablation(args, start)
    checkpoint = RECIPES[args.recipe](args)
    for split in SPLITS:
        scores = sample_and_score(
            checkpoint,
            args.data / f"prompts_{split}.txt",
            args.out / f"samples_{split}",
            args.images_per_prompt,
            descriptive=args.recipe in DESCRIPTIVE,
        )
        log.info("prompt following, %s prompts: %.1f%% all three", split, 100 * scores["all"])
    report = collect(args.out, int(time.time() - start), args.recipe)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(render(args.out, report))
    return report


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    run(parse_args(apply_trust_argument(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
