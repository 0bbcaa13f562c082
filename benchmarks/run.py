"""`make bench`: speed of the tiny families on this machine, measured side by side in one run.

Prints, for the tiny Muse config: training steps/s at two batch sizes, and parallel-decoding images/s for
several step counts with the ratio to the 12-step default; for the tiny VQGAN: encode+decode images/s.
Numbers are wall-clock on whatever this machine is; only the ratios within one run are comparable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from t2i_train.cli.common import CONF_DIR


def build(model: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}"])
    return instantiate(cfg.model, _convert_="all"), instantiate(cfg.loss)


def timed(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def muse_bench() -> dict[str, float]:
    model, loss = build("muse")
    images = torch.rand(64, 3, 32, 32) * 2 - 1
    captions = ["a red circle in the top left"] * 64
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    out: dict[str, float] = {}
    for batch_size in (32, 64):
        batch = {"image": images[:batch_size], "caption": captions[:batch_size]}

        def step(batch=batch) -> None:
            opt.zero_grad()
            loss(model(batch))["loss"].backward()
            opt.step()

        out[f"muse_train_steps_per_s_b{batch_size}"] = 1.0 / timed(step)
    model.eval()
    prompts = captions[:16]
    for steps in (4, 8, 12, 24):
        seconds = timed(lambda steps=steps: model.generate(prompts, steps=steps), repeats=2)
        out[f"muse_decode_images_per_s_T{steps}"] = len(prompts) / seconds
    for steps in (4, 8, 24):
        out[f"ratio_T{steps}_vs_T12"] = (
            out[f"muse_decode_images_per_s_T{steps}"] / out["muse_decode_images_per_s_T12"]
        )
    return out


@torch.no_grad()
def vqgan_bench() -> dict[str, float]:
    model, _ = build("vqgan")
    model.eval()
    images = torch.rand(64, 3, 32, 32) * 2 - 1
    return {"vqgan_reconstruct_images_per_s_b64": 64 / timed(lambda: model.reconstruct(images))}


def main() -> None:
    torch.manual_seed(0)
    results = {"torch_threads": torch.get_num_threads(), **muse_bench(), **vqgan_bench()}
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:10.2f}")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
