"""`python -m t2i_train.sample checkpoint=PATH prompts_file=FILE|prompts='[..]' output_dir=DIR ...`

Writes ``DIR/<n>.png`` for every image (native resolution), ``DIR/grid.png`` (the images upscaled for viewing,
each row labelled with its prompt; ``grid_cell=N`` px per image) and ``DIR/manifest.jsonl`` with
one line per image: ``{"prompt": ..., "file": "<n>.png", "seed": ..., "batch_seed": ...}``. Images are drawn in
batches of ``batch_size``; the generator of each batch is seeded with ``batch_seed = seed + n_first`` so the
same command reproduces the same files. Sampling options default to those the run sampled its grids with
(``sampling.kwargs`` of its training config, stored in the checkpoint); ``sampling.<arg>=value`` overrides them.

``upsampler=template|causal_lm`` (config group ``t2i_train/conf/upsampler``, see ``t2i_train.text.upsampler``) rewrites the
prompts into descriptive captions before they are encoded (DALL-E 3's caption upsampling); each manifest line
then also holds the ``upsampled_prompt`` the image was drawn from, while ``prompt`` stays the user's.

``mode=retrieve index=DIR`` (a model that can retrieve, e.g. GILL or CLIP; ``DIR`` from ``python -m t2i_train.index``)
writes each prompt's top ``images_per_prompt`` hits as stored in their shards instead of drawing images;
``mode=auto`` lets the model's decision head pick per prompt (GILL). Manifest lines say ``source:
generated|retrieved``; see docs/sampling.md ("Retrieve or generate (GILL)").

This module parses and checks the arguments; the work is done by ``t2i_train.sampling``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from t2i_train.checkpoint import load_family, read_checkpoint
from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import (
    CONF_DIR,
    allow_new_keys,
    callable_param_types,
    check_minimums,
    check_overrides,
    check_values,
    close_keys,
    fail,
    hydra_argv,
    no_empty_dir_on_error,
    numeric_kinds,
    user_errors_exit,
)
from t2i_train.devices import pick_device
from t2i_train.errors import ConfigError
from t2i_train.sampling import (
    GRID_CELL,
    add_clip_scores,
    check_mode,
    check_mode_options,
    generate_options,
    interpolate_to_dir,
    pick_scorer,
    read_prompts,
    sample_to_dir,
    training_sampling_kwargs,
    upsample_prompts,
    use_generator_checkpoint,
)

log = logging.getLogger(__name__)


def upsampled_prompts(cfg: DictConfig, prompts: list[str]) -> list[str] | None:
    """The upsampled prompts (None for ``upsampler=none``); prints a couple of examples."""
    if cfg.upsampler.kind == "none":
        return None
    if cfg.interpolate:
        raise ConfigError(
            f"upsampler={cfg.upsampler.kind} applies to sampling; interpolate= takes the prompts as they are"
        )
    upsampled = upsample_prompts(cfg.upsampler, prompts, pick_device(cfg.device))
    for short, long in list(zip(prompts, upsampled))[:2]:
        print(f"upsampled {short!r} -> {long!r}")
    return upsampled


def check_upsampler_args(argv: list[str]) -> None:
    """One line for an unknown ``upsampler=`` choice or ``upsampler.<option>`` of the chosen one.

    ``check_group_choices`` covers the training groups only, and Hydra's own messages for these span many lines.
    """
    group = CONF_DIR / "upsampler"
    kinds = sorted(p.stem for p in group.glob("*.yaml"))
    choice, keys = "none", []
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key == "upsampler":
            choice = value
        elif key.startswith("upsampler."):
            keys.append(key[len("upsampler.") :])
    if choice not in kinds:
        fail(f"unknown upsampler '{choice}'; choose one of: {', '.join(kinds)}")
    allowed = [k for k in OmegaConf.load(group / f"{choice}.yaml") if k != "kind"]
    for key in keys:
        if key.split(".")[0] not in allowed:
            known = f"its options: {', '.join(allowed)}" if allowed else "it takes none"
            fail(f"upsampler={choice} has no option '{key}'; {known}")


SAMPLE_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "images_per_prompt": (int,),
    "seed": (int,),
    "batch_size": (int,),
    "steps": (int,),
    "grid_columns": (int,),
    "use_ema": (bool,),
    "clip_score": (bool,),
    "retrieve_k": (int,),
}
SAMPLE_OPTION_MINIMUMS = {"images_per_prompt": 1, "batch_size": 1, "grid_columns": 1, "retrieve_k": 1}


def check_sample_options(cfg: DictConfig) -> None:
    """One line for a bad number or mode, before a checkpoint is read or a folder made."""
    check_values(cfg, SAMPLE_OPTION_TYPES)
    check_minimums(cfg, SAMPLE_OPTION_MINIMUMS)
    if cfg.interpolate not in (None, "z", "text"):
        raise ConfigError(f"interpolate must be z or text, got {cfg.interpolate!r}")
    if cfg.interpolate and cfg.steps < 2:
        raise ConfigError(f"steps={cfg.steps}: an interpolation strip needs at least 2 images")
    check_mode_options(str(cfg.mode), cfg.index)
    if cfg.interpolate and cfg.mode != "generate":
        raise ConfigError(f"interpolate={cfg.interpolate} draws strips; it takes no mode={cfg.mode}")


def check_model(cfg: DictConfig, model: Any) -> None:
    """The model can sample in ``mode`` (``t2i_train.sampling.check_mode``); a checkpoint of a family that
    never draws images gets a line naming it (and ``mode=retrieve`` when it can retrieve)."""
    if cfg.mode == "generate" and not model.can("generate"):
        hint = "; or mode=retrieve index=DIR: it can retrieve" if model.can("retrieve") else ""
        raise ConfigError(
            f"{cfg.checkpoint} is a model={model.family_name} checkpoint, which does not generate images; "
            f"pass a checkpoint of an image family (muse, galip, ...){hint}"
        )
    check_mode(model, str(cfg.mode), cfg.index)


def check_generate_options(model: Any, sampling: dict[str, Any]) -> None:
    """Every ``sampling.<arg>`` is an argument of the family's ``generate()``, of the type it takes."""
    allowed = generate_options(model)
    if allowed is None:
        return
    for key in sampling:
        if key not in allowed:
            close = close_keys(key, allowed)
            hint = f"did you mean sampling.{close[0]}? " if close else ""
            raise ConfigError(
                f"model={model.family_name} has no sampling option '{key}'; {hint}"
                f"its options: {', '.join(allowed) or 'none'}"
            )
    hints = callable_param_types(model.generate)
    wanted = {k: kinds for k in sampling if (kinds := numeric_kinds(hints.get(k))) is not None}
    check_values(OmegaConf.create(sampling), wanted, prefix="sampling.")


@hydra.main(config_path=str(CONF_DIR), config_name="sample", version_base="1.3")
@user_errors_exit
def _hydra_main(cfg: DictConfig) -> None:
    check_sample_options(cfg)
    prompts = read_prompts(cfg.prompts, cfg.prompts_file)
    if cfg.mode != "generate":
        from t2i_train.retrieval import RetrievalIndex

        RetrievalIndex.load(cfg.index)  # a missing or unfinished index: one line before the model loads
    ckpt = read_checkpoint(cfg.checkpoint)
    device = pick_device(cfg.device)
    upsampled = upsampled_prompts(cfg, prompts)
    model = load_family(cfg.checkpoint, use_ema=cfg.use_ema, ckpt=ckpt).to(device)
    if cfg.generator_checkpoint:
        use_generator_checkpoint(model, str(cfg.generator_checkpoint))
    check_model(cfg, model)
    scorer = pick_scorer(cfg.clip_scorer, model, device) if cfg.clip_score else None
    sampling = {**training_sampling_kwargs(ckpt), **OmegaConf.to_container(cfg.sampling, resolve=True)}
    if not cfg.interpolate and cfg.mode != "retrieve":
        check_generate_options(model, sampling)
    log.info("sampling with %s", sampling)
    out = Path(cfg.output_dir)
    with no_empty_dir_on_error(out):
        write_samples(cfg, model, prompts, out, sampling, upsampled, scorer)


def write_samples(
    cfg: DictConfig,
    model: Any,
    prompts: list[str],
    out: Path,
    sampling: dict[str, Any],
    upsampled: list[str] | None,
    scorer: Any,
) -> None:
    """The images (or interpolation strips), grid and manifest of a checked command into ``out``."""
    grid_cell = int(OmegaConf.select(cfg, "grid_cell", default=None) or GRID_CELL)
    if cfg.interpolate:
        manifest = interpolate_to_dir(
            model,
            prompts,
            out,
            str(cfg.interpolate),
            int(cfg.steps),
            cfg.seed,
            cfg.images_per_prompt,
            grid_cell=grid_cell,
        )
        print(f"wrote {len(manifest)} interpolation strips, grid.png and manifest.jsonl to {out}")
        return
    manifest = sample_to_dir(
        model,
        prompts,
        out,
        cfg.images_per_prompt,
        cfg.seed,
        cfg.batch_size,
        sampling,
        cfg.grid_columns,
        upsampled,
        grid_cell=grid_cell,
        mode=str(cfg.mode),
        index=cfg.index,
        retrieve_k=int(cfg.retrieve_k),
    )
    print(f"wrote {len(manifest)} images{_sources(manifest)}, grid.png and manifest.jsonl to {out}")
    if scorer is not None:
        mean = add_clip_scores(manifest, out, scorer)
        print(f"mean CLIP score {mean:.2f} over {len(manifest)} images (clip_score in manifest.jsonl)")


def _sources(manifest: list[dict[str, Any]]) -> str:
    """`` (R retrieved, G generated)`` when any image was retrieved, else nothing (the line as it was)."""
    retrieved = sum(1 for line in manifest if line.get("source") == "retrieved")
    return f" ({retrieved} retrieved, {len(manifest) - retrieved} generated)" if retrieved else ""


def main() -> None:
    sys.argv[1:] = hydra_argv(
        apply_trust_argument(sys.argv[1:])
    )  # trust_checkpoint=true; brace patterns quoted
    check_upsampler_args(sys.argv[1:])
    sys.argv[1:] = allow_new_keys(sys.argv[1:], ("sampling.",))
    check_overrides(sys.argv[1:], "sample")  # a typo'd option: one line naming the closest ones
    _hydra_main()


if __name__ == "__main__":
    main()
