"""`python -m t2i_train.sample checkpoint=PATH prompts_file=FILE|prompts='[..]' output_dir=DIR ...`

Writes ``DIR/<n>.png`` for every image, ``DIR/grid.png`` (one row per prompt) and ``DIR/manifest.jsonl`` with
one line per image: ``{"prompt": ..., "file": "<n>.png", "seed": ..., "batch_seed": ...}``. Images are drawn in
batches of ``batch_size``; the generator of each batch is seeded with ``batch_seed = seed + n_first`` so the
same command reproduces the same files. Sampling options default to those the run sampled its grids with
(``sampling.kwargs`` of its training config, stored in the checkpoint); ``sampling.<arg>=value`` overrides them.

``upsampler=template|causal_lm`` (config group ``t2i_train/conf/upsampler``, see ``t2i_train.text.upsampler``) rewrites the
prompts into descriptive captions before they are encoded (DALL-E 3's caption upsampling); each manifest line
then also holds the ``upsampled_prompt`` the image was drawn from, while ``prompt`` stays the user's.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

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
    no_empty_dir_on_error,
    numeric_kinds,
    user_errors_exit,
)
from t2i_train.errors import ConfigError
from t2i_train.text.upsampler import Upsampler, build_upsampler

log = logging.getLogger(__name__)


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    if bool(prompts) == bool(prompts_file):
        raise ConfigError("give exactly one of prompts='[\"a red circle\", ...]' or prompts_file=FILE")
    if prompts:
        return [str(p) for p in prompts]
    path = Path(prompts_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompts_file={prompts_file}: no such file")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ConfigError(f"prompts_file={prompts_file} holds no prompts (one per line)")
    return lines


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sample_to_dir(
    model: Any,
    prompts: list[str],
    output_dir: Path,
    images_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    sampling: dict[str, Any] | None = None,
    grid_columns: int | None = None,
    upsampled: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Generate ``images_per_prompt`` images per prompt into ``output_dir``; returns the manifest lines.

    ``upsampled`` (one per prompt): the texts the images are generated from instead, recorded as
    ``upsampled_prompt`` beside the original ``prompt``.
    """
    if upsampled is not None and len(upsampled) != len(prompts):
        raise ValueError(f"{len(upsampled)} upsampled prompts for {len(prompts)} prompts")
    output_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    texts = prompts if upsampled is None else upsampled
    jobs = [(p, t) for p, t in zip(prompts, texts) for _ in range(images_per_prompt)]
    manifest: list[dict[str, Any]] = []
    images: list[torch.Tensor] = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="sampling", unit="batch"):
        batch = jobs[start : start + batch_size]
        batch_seed = seed + start
        generator = torch.Generator(device=device).manual_seed(batch_seed)
        out = model.generate([t for _, t in batch], generator=generator, **(sampling or {}))
        for i, ((prompt, text), image) in enumerate(zip(batch, out.float().clamp(0, 1).cpu())):
            n = start + i
            save_image(image, output_dir / f"{n}.png")
            line: dict[str, Any] = {"prompt": prompt}
            if upsampled is not None:
                line["upsampled_prompt"] = text
            manifest.append({**line, "file": f"{n}.png", "seed": seed, "batch_seed": batch_seed})
            images.append(image)
    columns = grid_columns or (images_per_prompt if images_per_prompt > 1 else min(8, len(images)))
    save_image(make_grid(torch.stack(images), nrow=columns, padding=1), output_dir / "grid.png")
    write_manifest(manifest, output_dir)
    return manifest


def interpolate_to_dir(
    model: Any,
    prompts: list[str],
    output_dir: Path,
    mode: str,
    steps: int,
    seed: int = 0,
    strips_per_prompt: int = 1,
) -> list[dict[str, Any]]:
    """Interpolation strips (``interpolate=z|text``): ``z`` walks the noise with each prompt fixed
    (``strips_per_prompt`` strips from seeds ``seed, seed+1, ...``); ``text`` walks from each prompt to the next
    with the noise fixed. Writes ``strip_<n>.png`` (one row of ``steps`` images), ``grid.png`` (one strip per row)
    and ``manifest.jsonl``; returns its lines."""
    if not callable(getattr(model, "interpolate", None)):
        raise ConfigError(f"model={model.family_name} has no interpolation; interpolate= works for galip")
    if mode not in ("z", "text"):
        raise ConfigError(f"interpolate must be z or text, got {mode!r}")
    if steps < 2:
        raise ConfigError(f"steps={steps}: an interpolation strip needs at least 2 images")
    if mode == "text" and len(prompts) < 2:
        raise ConfigError("interpolate=text walks from one prompt to the next: give at least two prompts")
    if mode == "z":
        jobs = [(p, None, seed + k) for p in prompts for k in range(strips_per_prompt)]
    else:
        jobs = [(a, b, seed) for a, b in itertools.pairwise(prompts)]
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest, strips = [], []
    for n, (prompt_a, prompt_b, strip_seed) in enumerate(tqdm(jobs, desc="interpolating", unit="strip")):
        strip = model.interpolate(prompt_a, prompt_b, mode=mode, steps=steps, seed=strip_seed).float().cpu()
        save_image(make_grid(strip, nrow=steps, padding=1), output_dir / f"strip_{n}.png")
        line = {
            "prompt": prompt_a,
            "file": f"strip_{n}.png",
            "seed": strip_seed,
            "mode": mode,
            "steps": steps,
        }
        if prompt_b is not None:
            line["prompt_b"] = prompt_b
        manifest.append(line)
        strips.append(strip)
    save_image(make_grid(torch.cat(strips), nrow=steps, padding=1), output_dir / "grid.png")
    write_manifest(manifest, output_dir)
    return manifest


def add_clip_scores(
    manifest: list[dict[str, Any]], output_dir: Path, scorer: Any, batch_size: int = 64
) -> float:
    """Score every image of a sample folder against its prompt (``clip_score`` in each manifest line);
    returns the mean."""
    from torchvision.io import ImageReadMode, read_image

    from t2i_train.metrics.clip_score import clip_score

    for start in range(0, len(manifest), batch_size):
        lines = manifest[start : start + batch_size]
        images = torch.stack(
            [read_image(str(output_dir / line["file"]), ImageReadMode.RGB).float() / 255 for line in lines]
        )
        scores = clip_score(images, [line["prompt"] for line in lines], scorer)
        for line, score in zip(lines, scores.tolist()):
            line["clip_score"] = round(score, 4)
    write_manifest(manifest, output_dir)
    return sum(line["clip_score"] for line in manifest) / max(1, len(manifest))


def pick_scorer(spec: str | None, model: Any, device: torch.device) -> Any:
    """The CLIP that scores samples: ``clip_scorer=SPEC`` (see ``load_scorer``), else the family's own frozen
    CLIP (GALIP's)."""
    from t2i_train.metrics.clip_score import load_scorer
    from t2i_train.models.clip import FrozenCLIP

    if spec:
        return load_scorer(spec, device)
    own = getattr(model, "clip", None)
    if isinstance(own, FrozenCLIP):
        return own
    raise ConfigError(
        "clip_score=true needs clip_scorer=<clip .ckpt | export folder | open_clip:NAME/TAG> "
        f"(model={getattr(model, 'family_name', '?')} holds no CLIP of its own)"
    )


def write_manifest(manifest: list[dict[str, Any]], output_dir: Path) -> None:
    with open(output_dir / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in manifest)


def training_sampling_kwargs(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The ``sampling.kwargs`` the checkpoint's run used for its sample grids ({} if none)."""
    config = ckpt["t2i_config"]
    return dict((config.get("sampling") or {}).get("kwargs") or {})


def make_upsampler(options: DictConfig, device: torch.device) -> Upsampler:
    """The ``upsampler`` config group's choice; a causal LM runs on the sampling device unless told otherwise."""
    kwargs = OmegaConf.to_container(options, resolve=True)
    kind = str(kwargs.pop("kind", "none"))
    if kind == "causal_lm" and kwargs.get("device") is None:
        kwargs["device"] = str(device)
    return build_upsampler(kind, **kwargs)


def upsample_prompts(cfg: DictConfig, prompts: list[str], device: torch.device) -> list[str] | None:
    """The upsampled prompts (None for ``upsampler=none``); prints a couple of examples.

    The upsampler is dropped before the image model loads, so a large LM and the image model never share the
    device.
    """
    if cfg.upsampler.kind == "none":
        return None
    if cfg.interpolate:
        raise ConfigError(
            f"upsampler={cfg.upsampler.kind} applies to sampling; interpolate= takes the prompts as they are"
        )
    upsampler = make_upsampler(cfg.upsampler, device)
    upsampled = upsampler(prompts)
    del upsampler
    if device.type == "cuda":
        torch.cuda.empty_cache()
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
}
SAMPLE_OPTION_MINIMUMS = {"images_per_prompt": 1, "batch_size": 1, "grid_columns": 1}


def check_sample_options(cfg: DictConfig) -> None:
    """One line for a bad number or mode, before a checkpoint is read or a folder made."""
    check_values(cfg, SAMPLE_OPTION_TYPES)
    check_minimums(cfg, SAMPLE_OPTION_MINIMUMS)
    if cfg.interpolate not in (None, "z", "text"):
        raise ConfigError(f"interpolate must be z or text, got {cfg.interpolate!r}")
    if cfg.interpolate and cfg.steps < 2:
        raise ConfigError(f"steps={cfg.steps}: an interpolation strip needs at least 2 images")


def check_generate_options(model: Any, sampling: dict[str, Any]) -> None:
    """Every ``sampling.<arg>`` is an argument of the family's ``generate()``, of the type it takes."""
    params = inspect.signature(model.generate).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [name for name in params if name not in ("prompts", "generator")]
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
    ckpt = read_checkpoint(cfg.checkpoint)
    device = pick_device(cfg.device)
    upsampled = upsample_prompts(cfg, prompts, device)
    model = load_family(cfg.checkpoint, use_ema=cfg.use_ema, ckpt=ckpt).to(device)
    if not model.generates_images():
        raise ConfigError(
            f"{cfg.checkpoint} is a model={model.family_name} checkpoint, which does not generate images; "
            "pass a checkpoint of an image family (muse, galip, ...)"
        )
    scorer = pick_scorer(cfg.clip_scorer, model, device) if cfg.clip_score else None
    sampling = {**training_sampling_kwargs(ckpt), **OmegaConf.to_container(cfg.sampling, resolve=True)}
    if not cfg.interpolate:
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
    if cfg.interpolate:
        manifest = interpolate_to_dir(
            model, prompts, out, str(cfg.interpolate), int(cfg.steps), cfg.seed, cfg.images_per_prompt
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
    )
    print(f"wrote {len(manifest)} images, grid.png and manifest.jsonl to {out}")
    if scorer is not None:
        mean = add_clip_scores(manifest, out, scorer)
        print(f"mean CLIP score {mean:.2f} over {len(manifest)} images (clip_score in manifest.jsonl)")


def main() -> None:
    sys.argv[1:] = apply_trust_argument(sys.argv[1:])  # trust_checkpoint=true (see t2i_train.checkpoint_io)
    check_upsampler_args(sys.argv[1:])
    sys.argv[1:] = allow_new_keys(sys.argv[1:], ("sampling.",))
    check_overrides(sys.argv[1:], "sample")  # a typo'd option: one line naming the closest ones
    _hydra_main()


if __name__ == "__main__":
    main()
