"""`make bench`: speed of the tiny families on this machine, measured side by side in one run.

Prints, for the tiny Muse config: training steps/s at two batch sizes, and parallel-decoding images/s for
several step counts with the ratio to the 12-step default; for the tiny VQGAN: encode+decode images/s; tiny
GALIP's single-pass generation vs tiny Muse's 12-step parallel decoding at 32², images/s and their ratio
(`python benchmarks/run.py galip_vs_muse` runs only that part); tiny latent diffusion's images/s with DDIM 50/20 and
DPM-Solver++ 20/10 steps and their speed-ups over DDIM-50 (`python benchmarks/run.py diffusion`); and per-rank bytes of trainable parameters +
optimizer state of a ~50M-parameter Muse trained by 2 CPU processes under DDP and under FSDP2, with their ratio
(`python benchmarks/run.py memory` runs only that part); and greedy decoding of 256 tokens by a decoder-only
transformer of the shared blocks with and without the KV cache, tokens/s and their ratio (`python
benchmarks/run.py kv_cache`); tiny CM3leon's 64-token images with and without the KV cache and images/s of its
four decoders (`python benchmarks/run.py cm3leon`).
Numbers are wall-clock on whatever this machine is; only the ratios within one run are comparable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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


@torch.no_grad()
def galip_vs_muse_bench(batch_size: int = 16) -> dict[str, float]:
    """Images/s of tiny GALIP's single-pass ``generate`` vs tiny Muse's parallel decoding (its default steps and
    guidance), both 32² and on the same prompts, measured in one run; and their ratio."""
    prompts = ["a red circle in the top left", "a blue square in the center"] * (batch_size // 2)
    out: dict[str, float] = {}
    for name in ("galip", "muse"):
        model, _ = build(name)
        model.eval()
        seconds = timed(lambda model=model: model.generate(prompts, seed=0), repeats=3)
        out[f"{name}_generate_images_per_s_b{batch_size}"] = len(prompts) / seconds
    out["ratio_galip_vs_muse_images_per_s"] = (
        out[f"galip_generate_images_per_s_b{batch_size}"] / out[f"muse_generate_images_per_s_b{batch_size}"]
    )
    return out


def diffusion_samplers_bench(batch_size: int = 16) -> dict[str, float]:
    """Images/s of tiny latent diffusion with DDIM at 50 and 20 steps and DPM-Solver++ at 20 and 10 (CFG on),
    and each one's speed-up over DDIM-50, measured in one run."""
    model, _ = build("diffusion")
    model.latent_scale.fill_(1.0)  # untrained weights: the speed does not depend on them
    model.eval()
    prompts = ["a red circle in the top left"] * batch_size
    out: dict[str, float] = {}
    for sampler, steps in (("ddim", 50), ("ddim", 20), ("dpm_solver", 20), ("dpm_solver", 10)):
        seconds = timed(
            lambda s=sampler, n=steps: model.generate(prompts, steps=n, sampler=s, seed=0), repeats=2
        )
        out[f"diffusion_{sampler}_{steps}_images_per_s_b{batch_size}"] = batch_size / seconds
    base = out[f"diffusion_ddim_50_images_per_s_b{batch_size}"]
    for key in list(out):
        if "ddim_50" not in key:
            out[key.replace("images_per_s", "speedup_vs_ddim50")] = out[key] / base
    return out


@torch.no_grad()
def kv_cache_bench(new_tokens: int = 256, batch_size: int = 4, prompt_tokens: int = 16) -> dict[str, float]:
    """Tokens/s of greedy decoding ``new_tokens`` tokens after a ``prompt_tokens`` prompt with a
    ``CausalTransformerLM`` of the shared blocks (width 256, 4 layers, a 1024-id vocabulary like a VQ codebook),
    with the KV cache (one position per step) and without (the whole sequence every step), in one run; their
    ratio; and whether both decoded the same tokens (1.0 = identical)."""
    from t2i_train.nn.transformer import CausalTransformerLM

    torch.manual_seed(0)
    model = CausalTransformerLM(
        1024, prompt_tokens + new_tokens, dim=256, depth=4, heads=4, mlp_dim=1024
    ).eval()
    prompt = torch.randint(0, 1024, (batch_size, prompt_tokens))
    out: dict[str, float] = {}
    decoded = {}
    for name, use_cache in (("cached", True), ("uncached", False)):
        model.generate_greedy(prompt, 8, use_cache=use_cache)  # warm-up
        start = time.perf_counter()
        decoded[name] = model.generate_greedy(prompt, new_tokens, use_cache=use_cache)
        seconds = time.perf_counter() - start
        out[f"kv_{name}_tokens_per_s_b{batch_size}_n{new_tokens}"] = batch_size * new_tokens / seconds
    out["ratio_kv_cached_vs_uncached_tokens_per_s"] = (
        out[f"kv_cached_tokens_per_s_b{batch_size}_n{new_tokens}"]
        / out[f"kv_uncached_tokens_per_s_b{batch_size}_n{new_tokens}"]
    )
    out["kv_cached_tokens_identical"] = float(torch.equal(decoded["cached"], decoded["uncached"]))
    return out


@torch.no_grad()
def cm3leon_decoding_bench(batch_size: int = 4) -> dict[str, float]:
    """Tiny CM3leon (conf/model/cm3leon.yaml, random weights) drawing one 64-token image per prompt: tokens/s
    with the KV cache and without (the whole sequence rerun every token), their ratio, and images/s of each
    decoder (plain sampling, CFG 3, CD-K, TopP-CD), all cached, in one run."""
    model, _ = build("cm3leon")
    model.eval()
    prompts = ["a red circle in the top left", "a blue square in the center"] * (batch_size // 2)
    out: dict[str, float] = {}
    runs = {
        "cached": {"use_cache": True},
        "uncached": {"use_cache": False},
    }
    tokens = {}
    for name, options in runs.items():

        def draw(name: str = name, options: dict = options) -> None:
            tokens[name] = model.generate_tokens(prompts, seed=0, temperature=0, **options)

        seconds = timed(draw, 1)
        out[f"cm3leon_{name}_tokens_per_s_b{batch_size}"] = batch_size * model.num_image_tokens / seconds
    out["ratio_cm3leon_kv_cached_vs_uncached"] = (
        out[f"cm3leon_cached_tokens_per_s_b{batch_size}"]
        / out[f"cm3leon_uncached_tokens_per_s_b{batch_size}"]
    )
    out["cm3leon_cached_tokens_identical"] = float(torch.equal(tokens["cached"], tokens["uncached"]))
    decoders = {
        "no_cfg": {"guidance_scale": 1.0},
        "cfg3": {"guidance_scale": 3.0},
        "cd_k": {"decoder": "cd"},
        "topp_cd": {"decoder": "topp_cd", "top_p": 0.9},
    }
    for name, options in decoders.items():
        seconds = timed(lambda o=options: model.generate(prompts, seed=0, **o), 1)
        out[f"cm3leon_{name}_images_per_s"] = batch_size / seconds
    return out


# ~50M trainable parameters (12 blocks of width 512), frozen tiny T5 and tokenizer
MUSE_50M = ["model.dim=512", "model.depth=12", "model.heads=8", "model.mlp_dim=2048"]


def sharding_memory_bench() -> dict[str, float]:
    """Train one step of a ~50M Muse on 2 CPU processes under DDP and FSDP2; compare per-rank footprints."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("ddp", "fsdp2"):
            run_dir = Path(tmp) / strategy
            command = [
                sys.executable, "-m", "t2i_train", "model=muse", f"strategy={strategy}", "callbacks=memory",
                "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=1", "trainer.limit_val_batches=0",
                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "sampling.every_n_steps=0",
                "data.synthetic.count=256", "data.synthetic.val_count=32", "data.synthetic.samples_per_shard=64", f"data.cache_dir={tmp}/cache",
                "data.num_workers=0", "data.batch_size=4", "logger=none", f"hydra.run.dir={run_dir}", *MUSE_50M,
            ]  # fmt: skip
            done = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
            if done.returncode != 0:
                raise RuntimeError(f"{strategy} run failed:\n{done.stderr[-3000:]}")
            report = json.loads((run_dir / "memory" / "memory_rank0.json").read_text())
            sharded = report["trainable_param_bytes"] + report["optimizer_state_bytes"]
            out[f"{strategy}_rank0_params_plus_optimizer_MB"] = sharded / 2**20
            out[f"{strategy}_rank0_frozen_params_MB"] = report["frozen_param_bytes"] / 2**20
    out["ratio_fsdp2_vs_ddp_params_plus_optimizer"] = (
        out["fsdp2_rank0_params_plus_optimizer_MB"] / out["ddp_rank0_params_plus_optimizer_MB"]
    )
    return out


def main() -> None:
    torch.manual_seed(0)
    if sys.argv[1:] == ["memory"]:
        results = sharding_memory_bench()
    elif sys.argv[1:] == ["galip_vs_muse"]:
        results = galip_vs_muse_bench()
    elif sys.argv[1:] == ["diffusion"]:
        results = diffusion_samplers_bench()
    elif sys.argv[1:] == ["kv_cache"]:
        results = kv_cache_bench()
    elif sys.argv[1:] == ["cm3leon"]:
        results = cm3leon_decoding_bench()
    else:
        results = {
            "torch_threads": torch.get_num_threads(),
            **muse_bench(),
            **vqgan_bench(),
            **galip_vs_muse_bench(),
            **diffusion_samplers_bench(),
            **kv_cache_bench(),
            **cm3leon_decoding_bench(),
            **sharding_memory_bench(),
        }
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:10.2f}")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
