"""GALIP on a tiny frozen CLIP: shapes, gradient paths through the frozen ViT, sampling, training, resume, export."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from t2i_train.cli.common import CONF_DIR
from t2i_train.errors import ConfigError
from t2i_train.losses.gan_hinge_magp import GanHingeMAGP
from t2i_train.models.galip import (
    GALIP,
    Affine,
    DBlock,
    GBlock,
    MBlock,
    generator_plan,
    netc_kernels,
)
from t2i_train.models.loading import no_weight_loading

CAPTIONS = ["a red circle in the top left", "a blue square in the center", "a cyan triangle in the bottom"]
SMALL = dict(ngf=4, nz=8, code_channels=8, mid_channels=4, num_mblocks=1, d_channels=16, netc_hidden=8)


@pytest.fixture(scope="module")
def model() -> GALIP:
    torch.manual_seed(0)
    return GALIP(**SMALL)


def batch(n: int = 3) -> dict:
    return {"image": torch.rand(n, 3, 32, 32) * 2 - 1, "caption": (CAPTIONS * n)[:n]}


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


# ------------------------------------------------------------------------------------------- structure
def test_generator_plan_and_netc_kernels() -> None:
    assert generator_plan(64, 224) == ([512, 512, 512, 512, 256, 128, 64], [8, 16, 32, 64, 128, 224])
    assert generator_plan(8, 32) == ([64, 32, 16, 8], [8, 16, 32])
    assert netc_kernels(7) == (4, 4)
    for grid in (1, 2, 4, 7, 14):
        k1, k2 = netc_kernels(grid)
        assert grid - k1 + 1 - k2 + 1 == 1


def test_tiny_shapes_of_every_part(model: GALIP) -> None:
    out = model(batch())
    width, grid, dim = model.clip.width, model.grid, model.clip.embed_dim
    assert (width, grid, dim) == (64, 4, 64)
    assert out["fake"].shape == (3, 3, 32, 32)
    assert out["text_emb"].shape == (3, dim)
    assert out["real_features"].shape == out["fake_features"].shape == (3, 3, width, grid, grid)
    assert out["fake_emb"].shape == (3, dim)
    assert not out["real_features"].requires_grad and out["fake_features"].requires_grad
    h = model.discriminator(out["real_features"])
    assert h.shape == (3, SMALL["d_channels"], grid, grid)
    assert model.netc(h, out["text_emb"]).shape == (3,)
    z = torch.randn(3, model.nz)
    cond = torch.cat([z, out["text_emb"]], 1)
    bridge = model.generator.bridge_features(z, cond)
    assert bridge.shape == (3, width, grid, grid)
    prompts = model.generator.prompts(cond)
    assert prompts.shape == (3, len(model.prompt_blocks), width)
    assert model.clip_map(bridge, prompts).shape == bridge.shape
    assert [b.size for b in model.generator.gblocks] == [8, 16, 32]
    assert {type(b) for b in model.trained_blocks()} == {GBlock, MBlock, DBlock}


def test_clip_features_are_open_clips_own_block_outputs_and_embedding(model: GALIP) -> None:
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    visual = model.clip.model.visual
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        blk.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o))
        for k, blk in enumerate(visual.transformer.resblocks)
    ]
    try:
        with torch.no_grad():
            reference = model.clip.model.encode_image(model.clip.preprocess(images))
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        features, embedding = model.clip_image_features(images)
        taps_only, none = model.clip_image_features(images, with_embedding=False)
    torch.testing.assert_close(embedding, reference)
    assert none is None
    torch.testing.assert_close(taps_only, features)
    for t, block in enumerate(model.d_taps):
        tokens = captured[block][:, 1:]  # no CLS
        torch.testing.assert_close(features[:, t], tokens.transpose(1, 2).reshape(2, 64, 4, 4))


def test_text_embedding_is_the_unnormalised_projected_eot_feature(model: GALIP) -> None:
    e = model.encode_text(CAPTIONS)
    normalised = model.clip.encode_text(CAPTIONS)
    torch.testing.assert_close(torch.nn.functional.normalize(e, dim=-1), normalised)
    assert not torch.allclose(e.norm(dim=-1), torch.ones(3))


def test_prompts_change_the_mapped_features_only_through_the_selected_blocks(model: GALIP) -> None:
    bridge = torch.randn(2, 64, 4, 4)
    p1, p2 = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    with torch.no_grad():
        assert not torch.allclose(model.clip_map(bridge, p1), model.clip_map(bridge, p2))
        p3 = p1.clone()
        p3[:, 1] += 1.0  # the prompt of the last selected block (2) still reaches block 3's output
        assert not torch.allclose(model.clip_map(bridge, p1), model.clip_map(bridge, p3))


def test_fusion_and_d_block_initialisation(model: GALIP) -> None:
    affines = [m for m in model.generator.modules() if isinstance(m, Affine)]
    assert affines
    for a in affines:
        assert torch.all(a.gamma[2].weight == 0) and torch.all(a.gamma[2].bias == 1)
        assert torch.all(a.beta[2].weight == 0) and torch.all(a.beta[2].bias == 0)
    dblocks = [m for m in model.discriminator.modules() if isinstance(m, DBlock)]
    assert len(dblocks) == len(model.d_taps)
    for block in dblocks:
        assert float(block.gamma) == 0.0 and (block.beta is None or float(block.beta) == 0.0)
        assert all(c.bias is None for c in block.convs if isinstance(c, torch.nn.Conv2d))
    assert all(c.bias is None for c in model.netc.net if isinstance(c, torch.nn.Conv2d))


def test_bad_block_indices_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="d_taps"):
        GALIP(**SMALL, d_taps=(0, 4))
    with pytest.raises(ConfigError, match="prompt_blocks"):
        GALIP(**SMALL, prompt_blocks=(2, 1))


# ------------------------------------------------------------------------------------ gradient paths
def test_generator_is_trained_through_the_frozen_clip_which_stays_unchanged() -> None:
    torch.manual_seed(0)
    model = GALIP(**SMALL).train()
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    g_params, d_params = list(model.generator_parameters()), list(model.discriminator_parameters())
    clip_ids = {id(p) for p in model.clip.parameters()}
    assert not ({id(p) for p in g_params} & {id(p) for p in d_params})
    assert {id(p) for p in g_params} | {id(p) for p in d_params} == {
        id(p) for p in model.trainable_parameters()
    }
    assert not clip_ids & {id(p) for p in model.trainable_parameters()}
    opt = torch.optim.Adam(g_params, lr=1e-2)
    out = model(batch())
    GanHingeMAGP().generator_terms(out, model, step=0)["loss"].backward()
    # fc_prompt reaches the loss only through the frozen ViT blocks (the prompt tokens)
    assert model.generator.fc_prompt.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in g_params)
    assert all(p.grad is None for p in model.clip.parameters())
    opt.step()
    assert not model.clip.training
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, clip_before[k]), k


def test_forward_runs_each_clip_trunk_once_per_image_set(model: GALIP) -> None:
    visual = model.clip.model.visual
    calls = []
    hook = visual.conv1.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        model(batch(3))
    finally:
        hook.remove()
    assert calls == [3, 3]  # real images, generated images


# ------------------------------------------------------------------------------------------- sampling
def test_generate_is_in_unit_range_and_deterministic_for_a_seed(model: GALIP) -> None:
    model.eval()
    a = model.generate(CAPTIONS, seed=3)
    assert a.shape == (3, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(model.generate(CAPTIONS, seed=3), a)
    assert not torch.allclose(model.generate(CAPTIONS, seed=4), a)
    g = torch.Generator().manual_seed(3)
    torch.testing.assert_close(model.generate(CAPTIONS, generator=g), a)


def test_interpolation_strips_and_their_endpoints(model: GALIP) -> None:
    model.eval()
    a, b = CAPTIONS[0], CAPTIONS[1]
    strip = model.interpolate(a, mode="z", steps=5, seed=7)
    assert strip.shape == (5, 3, 32, 32) and strip.min() >= 0 and strip.max() <= 1
    g = torch.Generator().manual_seed(7)
    ends = [model.generate([a], generator=g)[0] for _ in range(2)]  # the first and second draws: z0, z1
    torch.testing.assert_close(strip[0], ends[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(strip[-1], ends[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ends[0], model.generate([a], seed=7)[0])
    slerp = model.interpolate(a, mode="z", steps=5, seed=7, spherical=True)
    torch.testing.assert_close(slerp[0], ends[0], atol=1e-5, rtol=1e-4)
    text = model.interpolate([a], [b], mode="text", steps=4, seed=7)
    assert text.shape == (4, 3, 32, 32)
    torch.testing.assert_close(text[0], model.generate([a], seed=7)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text[-1], model.generate([b], seed=7)[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="prompts_b"):
        model.interpolate(a, mode="text")
    with pytest.raises(ValueError, match="mode"):
        model.interpolate(a, b, mode="pixels")


# ------------------------------------------------------------------------------------- paper size
def test_paper_size_parameter_counts_within_two_percent() -> None:
    from t2i_train.model_summary import build_on_meta, summarize
    from tests.helpers import compose_train

    report = summarize(build_on_meta(compose_train(["experiment=galip_coco"])))
    parts = report["components"]
    expected = {"generator": 51.83e6, "discriminator": 28.71e6, "netc": 2.10e6}
    for name, count in expected.items():
        assert parts[name]["trainable"] == pytest.approx(count, rel=0.02), name
    clip = parts["clip"]
    assert clip["frozen_component"] and clip["trainable"] == 0 and clip["frozen"] > 100e6  # ViT-B/32
    assert report["trainable"] == sum(parts[n]["trainable"] for n in expected)


def test_pretrained_clip_is_external_and_random_clip_is_not() -> None:
    with no_weight_loading(), torch.device("meta"):
        paper = GALIP(clip={"model_name": "ViT-B-32", "pretrained": "openai"}, image_size=224)
    assert set(paper.external_modules()) == {"clip"} and set(paper.frozen_modules()) == {"clip"}
    assert paper.grid == 7 and paper.clip.width == 768 and paper.clip.embed_dim == 512
    assert GALIP(**SMALL).external_modules() == {}


def test_random_clip_warns_once_in_training() -> None:
    model = GALIP(**SMALL).train()
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED CLIP.*model.clip.checkpoint="):
        model(batch(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(batch(2))


def test_clip_scorer_is_its_frozen_clip(model: GALIP) -> None:
    assert model.can("clip_scorer") and model.clip_scorer() is model.clip


def test_configs_with_the_old_flat_clip_keys_build_the_same_model() -> None:
    """Checkpoints saved before the CLIP became one node store ``clip_checkpoint`` ... ``clip_init_seed``."""
    from t2i_train.checkpoint import build_from_config, upgrade_model_config
    from t2i_train.models.clip import LEGACY_CLIP_KEYS

    old = {"_target_": "t2i_train.models.galip.GALIP", **SMALL, "clip_checkpoint": None, "clip_model_name": None,
           "clip_pretrained": None, "clip_config": None, "clip_context_length": 32, "clip_init_seed": 3}  # fmt: skip
    config = upgrade_model_config(old)
    assert not set(LEGACY_CLIP_KEYS) & set(config) and config["clip"]["init_seed"] == 3
    torch.manual_seed(0)
    rebuilt = build_from_config(config)
    torch.manual_seed(0)
    today = GALIP(clip={"init_seed": 3}, **SMALL)
    for name, tensor in today.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    assert not torch.equal(
        today.clip.model.visual.conv1.weight, GALIP(**SMALL).clip.model.visual.conv1.weight
    )


# --------------------------------------------------------------------------- training through the CLI
def _overrides(run_dir: Path, small_data_overrides: list[str], steps: int, *extra: str) -> list[str]:
    return [
        "experiment=shapes_galip",
        *small_data_overrides,
        f"run_dir={run_dir}",
        f"trainer.max_steps={steps}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "sampling.every_n_steps=2",
        "sampling.num_prompts=2",
        "checkpoint.every_n_steps=2",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        *(f"model.{k}={v}" for k, v in SMALL.items()),
        *extra,
    ]


def _train(overrides: list[str]) -> dict:
    from t2i_train.training import train

    cfg = compose_train(overrides)
    with open_dict(cfg):
        cfg.sampling.kwargs = {}
    return train(cfg)


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _adam_steps(ckpt: dict) -> list[int]:
    return [int(next(iter(s["state"].values()))["step"]) for s in ckpt["optimizer_states"]]


def test_trains_resumes_both_optimizers_and_exports(tmp_path: Path, small_data_overrides: list[str]) -> None:
    from t2i_train.checkpoint import load_family
    from t2i_train.export_folder import export

    run_dir = tmp_path / "run"
    assert _train(_overrides(run_dir, small_data_overrides, 2))["global_step"] == 2
    first = _ckpt(run_dir)
    assert len(first["optimizer_states"]) == 2 and _adam_steps(first) == [2, 2]  # G and D each stepped twice
    lrs = [s["param_groups"][0]["lr"] for s in first["optimizer_states"]]
    assert lrs == [2e-4, 8e-4]  # optimizer.* for G, task.discriminator_optimizer for NetD+NetC (shapes_galip)
    assert first["optimizer_states"][0]["param_groups"][0]["betas"] == (0.0, 0.9)
    metrics = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0]
    for term in ("d_real", "d_fake", "d_mismatch", "ma_gp", "g_adv", "g_clip_align"):
        assert term in metrics, term
    assert (run_dir / "samples" / "step_0000002.png").is_file()

    result = _train(_overrides(run_dir, small_data_overrides, 4, "resume=auto"))
    assert result["global_step"] == 4
    resumed = _ckpt(run_dir)
    assert _adam_steps(resumed) == [4, 4]  # both optimizer states were restored, then stepped twice more
    moved = resumed["optimizer_states"][1]["state"][0]["exp_avg"]
    assert not torch.equal(moved, first["optimizer_states"][1]["state"][0]["exp_avg"])

    folder = export(str(run_dir / "checkpoints" / "last.ckpt"), output_dir=str(tmp_path / "export"))
    from_ckpt = load_family(run_dir / "checkpoints" / "last.ckpt")
    from_export = load_family(folder["output_dir"])
    assert isinstance(from_export, GALIP)
    torch.testing.assert_close(from_export.generate(CAPTIONS, seed=0), from_ckpt.generate(CAPTIONS, seed=0))


def test_trains_two_steps_in_bf16_mixed(tmp_path: Path, small_data_overrides: list[str]) -> None:
    overrides = _overrides(tmp_path, small_data_overrides, 2, "trainer.precision=bf16-mixed", "logger=none")
    assert _train(overrides)["global_step"] == 2
    state = _ckpt(tmp_path)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_fp16_grad_scaler_with_the_penalty() -> None:
    """Lightning's 16-mixed plugin (GradScaler) around GANTask's two optimizers and the penalty's
    autograd.grad; CPU float16 autocast stands in for CUDA (Lightning maps 16-mixed on CPU to bf16)."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision
    from torch.utils.data import DataLoader

    from t2i_train.gan_task import GANTask

    torch.manual_seed(0)
    model = GALIP(**SMALL)
    task = GANTask(
        model,
        GanHingeMAGP(),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-4, betas=(0.0, 0.9)),
        discriminator_optimizer=lambda p: torch.optim.Adam(p, lr=4e-4, betas=(0.0, 0.9)),
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    data = [batch(4) for _ in range(2)]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(task, DataLoader(data, batch_size=None))
    assert trainer.global_step == 2
    assert scaler._scale is not None and 0 < scaler.get_scale() <= 2.0**10  # the scaler was in the loop
    for part in ("generator.", "discriminator.", "netc."):  # both optimizers stepped (no inf skipped them)
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.startswith(part))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_trains_through_a_trained_clip_checkpoint(tmp_path: Path, small_data_overrides: list[str]) -> None:
    """A stage-1 ``model=clip`` run feeds GALIP's frozen CLIP: external (left out of GALIP's training
    checkpoints, rebuilt from the clip checkpoint on load), but inside the export."""
    from t2i_train.checkpoint import load_family
    from t2i_train.export_folder import export
    from t2i_train.training import train

    clip_dir = tmp_path / "clip"
    clip_cfg = compose_train(
        [
            "model=clip",
            *small_data_overrides,
            f"run_dir={clip_dir}",
            "trainer.max_steps=1",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "trainer.limit_val_batches=0",
            "optimizer.lr=1e-2",
            "scheduler.warmup_steps=0",
            "logger=none",
        ]
    )
    train(clip_cfg)
    clip_ckpt = clip_dir / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "galip"
    overrides = _overrides(
        run_dir, small_data_overrides, 2, f"model.clip.checkpoint={clip_ckpt}", "logger=none"
    )
    assert _train(overrides)["global_step"] == 2
    ckpt = _ckpt(run_dir)
    assert ckpt["t2i_external"] == ["clip"]
    assert not any(k.startswith("model.clip.") for k in ckpt["state_dict"])
    stage1 = load_family(clip_ckpt).clip.state_dict()
    galip = load_family(run_dir / "checkpoints" / "last.ckpt")
    for key, value in galip.clip.model.state_dict().items():
        torch.testing.assert_close(value, stage1[key])
    folder = export(str(run_dir / "checkpoints" / "last.ckpt"), output_dir=str(tmp_path / "export"))
    exported = load_family(folder["output_dir"])
    torch.testing.assert_close(exported.generate(CAPTIONS, seed=1), galip.generate(CAPTIONS, seed=1))
