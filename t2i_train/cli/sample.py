"""`python -m t2i_train.sample checkpoint=PATH prompts_file=FILE|prompts='[..]' output_dir=DIR ...`

Writes ``DIR/<n>.png`` for every image, ``DIR/grid.png`` (one row per prompt) and ``DIR/manifest.jsonl`` with
one line per image: ``{"prompt": ..., "file": "<n>.png", "seed": ..., "batch_seed": ...}``. Images are drawn in
batches of ``batch_size``; the generator of each batch is seeded with ``batch_seed = seed + n_first`` so the
same command reproduces the same files. Sampling options default to those the run sampled its grids with
(``sampling.kwargs`` of its training config, stored in the checkpoint); ``sampling.<arg>=value`` overrides them.
"""

from __future__ import annotations

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
from t2i_train.cli.common import CONF_DIR, allow_new_keys, user_errors_exit
from t2i_train.errors import ConfigError

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
) -> list[dict[str, Any]]:
    """Generate ``images_per_prompt`` images per prompt into ``output_dir``; returns the manifest lines."""
    output_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    jobs = [p for p in prompts for _ in range(images_per_prompt)]
    manifest: list[dict[str, Any]] = []
    images: list[torch.Tensor] = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="sampling", unit="batch"):
        batch = jobs[start : start + batch_size]
        batch_seed = seed + start
        generator = torch.Generator(device=device).manual_seed(batch_seed)
        out = model.generate(batch, generator=generator, **(sampling or {})).float().clamp(0, 1).cpu()
        for i, (prompt, image) in enumerate(zip(batch, out)):
            n = start + i
            save_image(image, output_dir / f"{n}.png")
            manifest.append({"prompt": prompt, "file": f"{n}.png", "seed": seed, "batch_seed": batch_seed})
            images.append(image)
    columns = grid_columns or (images_per_prompt if images_per_prompt > 1 else min(8, len(images)))
    save_image(make_grid(torch.stack(images), nrow=columns, padding=1), output_dir / "grid.png")
    with open(output_dir / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in manifest)
    return manifest


def training_sampling_kwargs(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The ``sampling.kwargs`` the checkpoint's run used for its sample grids ({} if none)."""
    config = ckpt["t2i_config"]
    return dict((config.get("sampling") or {}).get("kwargs") or {})


@hydra.main(config_path=str(CONF_DIR), config_name="sample", version_base="1.3")
@user_errors_exit
def _hydra_main(cfg: DictConfig) -> None:
    prompts = read_prompts(cfg.prompts, cfg.prompts_file)
    ckpt = read_checkpoint(cfg.checkpoint)
    model = load_family(cfg.checkpoint, use_ema=cfg.use_ema, ckpt=ckpt).to(pick_device(cfg.device))
    sampling = {**training_sampling_kwargs(ckpt), **OmegaConf.to_container(cfg.sampling, resolve=True)}
    log.info("sampling with %s", sampling)
    out = Path(cfg.output_dir)
    manifest = sample_to_dir(
        model, prompts, out, cfg.images_per_prompt, cfg.seed, cfg.batch_size, sampling, cfg.grid_columns
    )
    print(f"wrote {len(manifest)} images, grid.png and manifest.jsonl to {out}")


def main() -> None:
    sys.argv[1:] = allow_new_keys(sys.argv[1:], ("sampling.",))
    _hydra_main()


if __name__ == "__main__":
    main()
