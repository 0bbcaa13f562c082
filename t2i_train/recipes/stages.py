"""Stage helpers the recipes share: the shapes data, training a stage in this process, a stage-1 autoencoder
with its held-out PSNR and pre-encoded codes, sampling + prompt-following scores.

Each is the same code as its own CLI (``python -m t2i_train``, ``.encode``, ``.evaluate``, ``.sample``), run in
one Python process so the ~10 s of imports are paid once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from t2i_train.recipes.base import Run, Stage

log = logging.getLogger("t2i_train.pipeline")

#: the prompt files of the shapes set a recipe samples: ``DATA/prompts_<split>.txt``
SPLITS = ("seen", "heldout")


def ensure_shapes_data(data: Path, count: int) -> None:
    """Write the synthetic shapes shards into ``data`` unless ``data/dataset.json`` is there already."""
    if (data / "dataset.json").is_file():
        log.info("data: %s (exists)", data)
        return
    from t2i_train.data.shards import write_synthetic_shards

    write_synthetic_shards(data, count=count, val_count=512, holdout_fraction=0.1, seed=0)


def shapes_data(run: Run) -> None:
    ensure_shapes_data(run.data, int(run.option("count", 20000)))


#: the first stage of every shapes recipe: the data (made when ``DATA/dataset.json`` is missing)
DATA_STAGE = Stage(
    "data", shapes_data, help="synthetic shapes shards, made when DATA/dataset.json is missing"
)


def train_stage(run: Run, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """``python -m t2i_train <overrides> hydra.run.dir=<run_dir> resume=auto``, in this process."""
    from t2i_train.training import train

    with initialize_config_dir(config_dir=str(run.conf_dir), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"run_dir={run_dir}", "resume=auto"])
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    log.info("training %s into %s", cfg.model._target_.rsplit(".", 1)[-1], run_dir)
    return train(cfg)


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def autoencoder_and_codes(
    run: Run, stage: str, experiment: str, splits: dict[str, Path], codes: Path
) -> Path:
    """Train a stage-1 autoencoder into ``OUT/<stage>`` (with the ``--<stage>`` overrides), record its held-out
    PSNR (``psnr.json``), pre-encode ``splits`` (name -> shard folder) into ``codes/<name>``; returns its
    checkpoint."""
    from t2i_train.data.encode import encode
    from t2i_train.evaluation import reconstruction

    stage_dir = run.out / stage
    train_stage(
        run, stage_dir, [f"experiment={experiment}", f"data.train_urls={run.data}", *run.overrides(stage)]
    )
    ckpt = last_checkpoint(stage_dir)
    psnr = reconstruction(str(ckpt), str(run.data / "val"), output=str(stage_dir / "psnr.json"))
    log.info("%s held-out PSNR %.2f dB", stage.upper(), psnr["psnr_db"])
    for name, folder in splits.items():
        encode(str(ckpt), str(folder), str(codes / name))
    return ckpt


def vae_and_latents(run: Run, splits: dict[str, Path]) -> Path:
    """Train the shapes VAE, record its held-out PSNR, pre-encode ``splits`` (name -> shard folder) into
    ``OUT/latents/<name>``; returns the VAE checkpoint."""
    return autoencoder_and_codes(run, "vae", "shapes_vae", splits, run.out / "latents")


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


def descriptive_prompts(prompts: list[str]) -> list[str]:
    """Canonical shapes prompts -> the descriptive template's wording of the same combination."""
    from t2i_train.data.synthetic import descriptive_prompt
    from t2i_train.metrics.shapes_reader import parse_prompt

    return [descriptive_prompt(*parse_prompt(p)) for p in prompts]


def load_for_sampling(checkpoint: Path) -> tuple[Any, dict[str, Any]]:
    """The family of ``checkpoint`` and the checkpoint itself (its training run's sampling options)."""
    from t2i_train.checkpoint import load_family, read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    return load_family(checkpoint, ckpt=ckpt), ckpt


def score_samples(
    model: Any,
    ckpt: dict[str, Any],
    prompts_file: Path,
    out: Path,
    images_per_prompt: int,
    descriptive: bool = False,
    scorer: Any = None,
) -> dict[str, Any]:
    """Sample the prompts of ``prompts_file`` into ``out`` (seed 0, the training run's sampling options) and read
    the images (``eval.json``); ``descriptive``: generate from the prompts rewritten into full descriptive
    captions (what a model trained on those expects), scored against the short prompt's colour, shape and
    position; ``scorer``: also the mean CLIP score (``clip_score``) of the images against the short prompts."""
    from t2i_train.evaluation import prompt_following
    from t2i_train.sampling import add_clip_scores, read_prompts, sample_to_dir, training_sampling_kwargs

    prompts = read_prompts(None, str(prompts_file))
    upsampled = descriptive_prompts(prompts) if descriptive else None
    sampling = training_sampling_kwargs(ckpt)
    manifest = sample_to_dir(
        model, prompts, out, images_per_prompt, seed=0, sampling=sampling, upsampled=upsampled
    )
    scores = prompt_following(str(out))
    if scorer is not None:
        scores["clip_score"] = round(add_clip_scores(manifest, out, scorer), 3)
    return scores


def sample_and_score(
    checkpoint: Path, prompts_file: Path, out: Path, images_per_prompt: int, descriptive: bool = False
) -> dict[str, Any]:
    """:func:`score_samples` of the model in ``checkpoint``."""
    model, ckpt = load_for_sampling(checkpoint)
    return score_samples(model, ckpt, prompts_file, out, images_per_prompt, descriptive=descriptive)


def sample_splits(run: Run, checkpoint: Path, descriptive: bool = False) -> dict[str, dict[str, Any]]:
    """Samples of the seen and the held-out prompts into ``OUT/samples_<split>``, with their scores."""
    result = {}
    for split in SPLITS:
        scores = sample_and_score(
            checkpoint,
            run.data / f"prompts_{split}.txt",
            run.out / f"samples_{split}",
            int(run.option("images_per_prompt", 4)),
            descriptive=descriptive,
        )
        log.info("prompt following, %s prompts: %.1f%% all three", split, 100 * scores["all"])
        result[split] = scores
    return result
