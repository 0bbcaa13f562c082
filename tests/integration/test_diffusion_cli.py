"""The latent-diffusion chain through the real entry points: VAE -> pre-encoded latents -> diffusion on a
caption blend -> sample (with upsampling) -> export; the VAE stays out of the diffusion checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from t2i_train.checkpoint import load_family
from t2i_train.cli.common import CONF_DIR
from t2i_train.data.encode import encode
from t2i_train.data.shards import write_synthetic_shards
from t2i_train.export_folder import export
from t2i_train.training import train
from tests.conftest import run_cli

QUIET = [
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.limit_val_batches=0",
    "sampling.every_n_steps=0",
    "checkpoint.every_n_steps=100",
]


def _train(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return train(compose(config_name="train", overrides=overrides))


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusion")
    write_synthetic_shards(
        root / "data", count=256, val_count=32, holdout_fraction=0.1, samples_per_shard=128
    )
    data = [
        f"data.train_urls={root / 'data'}",
        "data.num_workers=0",
        "data.batch_size=8",
        "data.shuffle_buffer=32",
    ]
    vae_run = root / "vae"
    _train(["experiment=shapes_vae", *data, *QUIET, f"run_dir={vae_run}", "trainer.max_steps=2"])
    vae_ckpt = vae_run / "checkpoints" / "last.ckpt"
    encode(str(vae_ckpt), str(root / "data"), str(root / "latents"), batch_size=64)
    diff_run = root / "diffusion"
    result = _train(
        [
            "experiment=shapes_diffusion",
            *data,
            *QUIET,
            f"run_dir={diff_run}",
            f"data.train_urls={root / 'latents'}",
            "data.fields=[latents]",
            "data.load_images=false",
            "data.caption_keys=[json.descriptive,json.alt_text]",
            "data.caption_probs=[0.75,0.25]",
            f"model.vae_checkpoint={vae_ckpt}",
            "trainer.max_steps=3",
            "logger=csv",
            "trainer.log_every_n_steps=1",
        ]
    )
    return {
        "root": root,
        "vae": vae_ckpt,
        "diffusion": diff_run / "checkpoints" / "last.ckpt",
        "result": result,
    }


def test_latents_are_pre_encoded(chain: dict) -> None:
    info = json.loads((chain["root"] / "latents" / "encoded.json").read_text())
    assert info["family"] == "vae" and info["fields"]["latents"] == {"dtype": "float16", "shape": [4, 8, 8]}


def test_blend_counts_are_logged_and_returned(chain: dict) -> None:
    counts = chain["result"]["caption_counts"]
    assert set(counts) == {"json.descriptive", "json.alt_text"} and sum(counts.values()) == 3 * 8
    assert counts["json.descriptive"] > counts["json.alt_text"]
    metrics = next((chain["root"] / "diffusion").rglob("metrics.csv")).read_text()
    assert "data/caption_json.descriptive" in metrics.splitlines()[0]


def test_vae_is_left_out_of_the_checkpoint_and_rebuilt(chain: dict) -> None:
    ckpt = torch.load(chain["diffusion"], map_location="cpu", weights_only=False)
    assert ckpt["t2i_external"] == ["vae"]
    assert not any(k.startswith("model.vae.") for k in ckpt["state_dict"])
    model = load_family(str(chain["diffusion"]))
    vae = load_family(str(chain["vae"]))
    assert all(torch.equal(a, b) for a, b in zip(model.vae.state_dict().values(), vae.state_dict().values()))
    assert float(model.latent_scale) > 0


def test_sample_with_upsampling_and_export(chain: dict, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    proc = run_cli(
        "t2i_train.sample",
        f"checkpoint={chain['diffusion']}",
        "prompts=[a red circle in the top left]",
        f"output_dir={out}",
        "upsampler=template",
        "sampling.steps=2",
        "sampling.sampler=dpm_solver",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert (
        line["prompt"] == "a red circle in the top left"
        and "red circle" in line["upsampled_prompt"]
        and len(line["upsampled_prompt"]) > 100
    )
    exported = tmp_path / "export"
    export(str(chain["diffusion"]), str(exported))
    again = load_family(str(exported))
    images = again.eval().generate(["a red circle"], steps=2, seed=0)
    assert images.shape == (1, 3, 32, 32)
