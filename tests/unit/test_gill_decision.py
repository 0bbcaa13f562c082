"""GILL's decision head (t2i_train.gill_decision, python -m t2i_train.gill_decision): the head trained alone on
[IMG0] states, the label rule, the new checkpoint, the one-line errors, and the whole command on a tiny GILL
whose generator is a tiny diffusion model."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from t2i_train.checkpoint import load_family, read_checkpoint
from t2i_train.cli.gill_decision import main
from t2i_train.gill_decision import (
    evaluate_head,
    label_rule,
    read_labels,
    split_indices,
    train_head,
    write_decision_checkpoint,
)
from t2i_train.models.gill import DECISIONS
from tests.helpers import TINY_TRAIN, compose_train, run_cli, tensors_equal

PROMPTS = [
    "a red circle in the top left",
    "a blue square in the center",
    "a green triangle, bottom right",
    "a yellow circle",
    "a purple square on the left",
    "an orange triangle at the top",
    "a small red square",
    "a big blue circle",
    "a green circle on the right",
    "a yellow triangle in the center",
]
#: the subprocesses' torch threads (see ``one_thread``)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine each op then waits for a
    busy core: 300 head steps took 16 s with 2 threads and 0.07 s with 1, this module 123 s and 61 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ no model
def test_the_head_separates_linearly_separable_states_on_held_out_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(400, generator=generator) < 0.5).long()
    direction = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    states = torch.randn(400, 16, generator=generator) + 3 * (2 * targets - 1)[:, None] * direction
    head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(16, 2))
    train_rows, held_rows = split_indices(len(states), 0.25, seed=0)
    losses = train_head(head, states[train_rows], targets[train_rows], steps=300, lr=1e-2)
    result = evaluate_head(head, states, targets, train_rows, held_rows)
    assert losses[-1] < losses[0] / 4
    assert result["heldout_count"] == 100 and result["train_count"] == 300
    assert result["heldout_accuracy"] >= 0.99 and result["train_accuracy"] >= 0.99
    assert not any(p.requires_grad for p in head.parameters()) and not head.training


def test_dropout_is_on_while_the_head_trains() -> None:
    """With p=1 a head in training mode sees only zeros: its weight gets no gradient (AdamW only decays it,
    under 1% in 50 steps), while its bias learns the majority class."""
    states = torch.tensor([[1.0], [-1.0], [2.0], [-2.0], [3.0]])
    targets = torch.tensor([1, 0, 1, 0, 1])
    head = torch.nn.Sequential(torch.nn.Dropout(1.0), torch.nn.Linear(1, 2))
    train_head(head, states, targets, steps=1, lr=1e-12)
    initial = head[1].weight.clone()
    train_head(head, states, targets, steps=50, lr=1e-2)
    assert torch.allclose(head[1].weight, initial, rtol=0.01)
    assert head[1].bias[1] > head[1].bias[0]


def test_the_baseline_is_the_held_out_majority_class() -> None:
    states, targets = torch.zeros(10, 4), torch.tensor([1] * 9 + [0])
    head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    result = evaluate_head(head, states, targets, torch.arange(0), torch.arange(10))
    assert result["baseline"] == pytest.approx(0.9) and result["baseline_class"] == DECISIONS[1]
    empty = evaluate_head(head, states, targets, torch.arange(10), torch.arange(0))
    assert empty["heldout_accuracy"] is None and empty["baseline"] is None


def test_the_split_is_seeded_disjoint_and_keeps_a_row_on_each_side() -> None:
    train_rows, held_rows = split_indices(10, 0.2, seed=3)
    assert sorted([*train_rows.tolist(), *held_rows.tolist()]) == list(range(10)) and len(held_rows) == 2
    assert torch.equal(held_rows, split_indices(10, 0.2, seed=3)[1])
    assert not torch.equal(held_rows, split_indices(10, 0.2, seed=4)[1])
    assert [len(part) for part in split_indices(2, 0.01, seed=0)] == [1, 1]
    assert [len(part) for part in split_indices(5, 0.0, seed=0)] == [5, 0]


@pytest.mark.parametrize(
    ("generated", "retrieved", "label"),
    [(20.0, 25.0, "retrieve"), (25.0, 20.0, "generate"), (22.5, 22.5, "retrieve"), (0.0, 0.0, "retrieve")],
)
def test_the_label_rule_prefers_retrieval_on_ties(generated: float, retrieved: float, label: str) -> None:
    assert label_rule(generated, retrieved) == label


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gill_decision")


@pytest.fixture(scope="module")
def shards(root: Path) -> Path:
    from t2i_train.data.shards import write_synthetic_shards

    write_synthetic_shards(root / "shards", count=16, size=32, seed=1, samples_per_shard=8, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def generator_ckpt(root: Path) -> Path:
    """A tiny random ``model=diffusion`` checkpoint as training stores it: its default T5 is ``model=gill``'s
    default target_encoder, so GILL draws through it (training it would add ~30 s and nothing to check)."""
    cfg = compose_train(["model=diffusion"])
    node = OmegaConf.to_container(cfg.model, resolve=True)
    model = instantiate(node, _convert_="all")
    model.latent_scale.fill_(1.0)  # as after a first training batch
    path = root / "diffusion.ckpt"
    torch.save(
        {
            "t2i_config": {"model": node},
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def gill_ckpt(root: Path, shards: Path, generator_ckpt: Path) -> Path:
    """A model=gill run of two steps through the training CLI's ``train`` (EMA on, no sample grids), with the
    tiny diffusion model as its generator; two-step sampling is its ``sampling.kwargs``."""
    from t2i_train.training import train

    run_dir = root / "gill_run"
    overrides = [
        "model=gill",
        "data=webdataset",
        *TINY_TRAIN,
        f"data.train_urls={shards}",
        "data.image_size=32",
    ]
    overrides += [f"run_dir={run_dir}", "logger=none", "trainer.max_steps=2", "trainer.limit_val_batches=0"]
    overrides += ["sampling.num_prompts=0", "+sampling.kwargs.steps=2", "ema_decay=0.9"]
    overrides += [f"model.generator_checkpoint={generator_ckpt}"]
    assert train(compose_train(overrides))["global_step"] == 2
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def index(root: Path, gill_ckpt: Path, shards: Path) -> Path:
    from t2i_train.retrieval import build_index

    build_index(str(gill_ckpt), str(shards), root / "index", batch_size=8, device="cpu")
    return root / "index"


@pytest.fixture(scope="module")
def prompts_file(root: Path) -> Path:
    path = root / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ checkpoint
def test_the_new_checkpoint_holds_the_trained_head_and_every_other_weight_unchanged(
    gill_ckpt: Path, tmp_path: Path
) -> None:
    from t2i_train.gill_decision import img0_states

    before = sha256(gill_ckpt)
    ckpt = read_checkpoint(gill_ckpt)
    ckpt["ema"] = {**ckpt["ema"], "decision.1.bias": torch.full((2,), 7.0)}  # a run whose EMA held the head
    model = load_family(gill_ckpt, ckpt=ckpt)
    states = img0_states(model, PROMPTS, batch_size=4)
    targets = torch.tensor([i % 2 for i in range(len(PROMPTS))])
    train_head(model.decision, states, targets, steps=200, lr=5e-2)
    picks = [DECISIONS[i] for i in model.decision(states).argmax(-1).tolist()]
    out = tmp_path / "decision.ckpt"
    write_decision_checkpoint(ckpt, out, model.decision, {"heldout_accuracy": 0.5})

    assert load_family(out).decide(PROMPTS) == picks and len(set(picks)) == 2
    assert sha256(gill_ckpt) == before
    original, written = read_checkpoint(gill_ckpt), read_checkpoint(out)
    assert written["t2i_gill_decision"] == {"heldout_accuracy": 0.5}
    head = {k for k in written["state_dict"] if k.startswith("model.decision.")}
    assert head == {"model.decision.1.weight", "model.decision.1.bias"}
    assert not torch.equal(
        written["state_dict"]["model.decision.1.weight"], original["state_dict"]["model.decision.1.weight"]
    )
    assert tensors_equal(
        {k: v for k, v in written["state_dict"].items() if k not in head},
        {k: v for k, v in original["state_dict"].items() if k not in head},
    )
    assert torch.equal(written["ema"]["decision.1.bias"], model.decision[1].bias)
    assert tensors_equal({k: v for k, v in written["ema"].items() if k != "decision.1.bias"}, original["ema"])
    rest = set(original) - {"state_dict", "ema"}
    assert set(written) - rest == {"state_dict", "ema", "t2i_gill_decision"}
    assert tensors_equal({k: written[k] for k in rest}, {k: original[k] for k in rest})
    assert not list(tmp_path.glob(".*tmp*"))


# ------------------------------------------------------------------------------------------------ end to end
def test_the_command_labels_trains_and_writes_the_checkpoint(
    gill_ckpt: Path, index: Path, prompts_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gill_decision.ckpt"
    args = [f"checkpoint={gill_ckpt}", f"index={index}", f"prompts_file={prompts_file}", f"output={out}"]
    command = [*args, "sampling.guidance_scale=2", "batch_size=4", "steps=100"]
    proc = run_cli("t2i_train.gill_decision", *command, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "labels: 4/10 prompts" in proc.stderr and "head: step 100/100" in proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"decision head: 10 labels, [\d.]+% retrieve; train accuracy [\d.]+% on 8; held-out accuracy [\d.]+% on 2 "
        rf"\(majority baseline (50\.0|100\.0)%, always (retrieve|generate)\); wrote {out} \(labels {out}\.labels\.jsonl\) "
        r"in [\d.]+s(; note: .*)?",
        summary,
    ), summary

    header, *lines = [json.loads(line) for line in Path(f"{out}.labels.jsonl").read_text().splitlines()]
    assert header["prompts"] == 10 and header["sampling"] == {"steps": 2, "guidance_scale": 2}
    assert [line["prompt"] for line in lines] == PROMPTS
    for line in lines:
        assert line["label"] == label_rule(line["generated_score"], line["retrieved_score"])
        assert line["retrieved_shard"].startswith(str(index.parent / "shards"))
    record = read_checkpoint(out)["t2i_gill_decision"]
    assert record["label_counts"] == {d: sum(line["label"] == d for line in lines) for d in DECISIONS}
    assert record["labels_path"] == f"{out}.labels.jsonl" and record["train_count"] == 8
    assert set(load_family(out).decide(PROMPTS)) <= set(DECISIONS)

    changed = {**header, "seed": 1}
    assert read_labels(Path(f"{out}.labels.jsonl"), header) is not None
    assert read_labels(Path(f"{out}.labels.jsonl"), changed) is None


def test_labels_made_from_the_same_inputs_are_reused(
    gill_ckpt: Path, index: Path, prompts_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from t2i_train.gill_decision import train_decision_head

    out, labels = tmp_path / "a.ckpt", tmp_path / "labels.jsonl"
    kwargs: dict[str, Any] = {"index": str(index), "prompts_file": str(prompts_file), "labels": str(labels)}
    first = train_decision_head(
        str(gill_ckpt), output=str(out), device="cpu", batch_size=5, steps=20, **kwargs
    )
    stamp = labels.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="t2i_train.gill_decision"):
        second = train_decision_head(str(gill_ckpt), output=str(out), device="cpu", steps=5, **kwargs)
    assert "reusing 10 labels" in caplog.text and labels.stat().st_mtime_ns == stamp
    assert (
        second["label_counts"] == first["label_counts"]
        and second["heldout_accuracy"] == first["heldout_accuracy"]
    )


# ------------------------------------------------------------------------------------------------ errors
def error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The launcher run in this process: exit 2 and exactly one ``error:`` line, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


@pytest.fixture(scope="module")
def clip_ckpt(root: Path) -> Path:
    from t2i_train.models.clip import CLIPFamily

    state = {f"model.{k}": v for k, v in CLIPFamily(init_seed=3).state_dict().items()}
    config = {
        "model": {"_target_": "t2i_train.models.clip.CLIPFamily", "init_seed": 3},
        "data": {"image_size": 32},
    }
    torch.save({"t2i_config": config, "state_dict": state}, root / "clip.ckpt")
    return root / "clip.ckpt"


@pytest.fixture(scope="module")
def no_generator_ckpt(root: Path, gill_ckpt: Path) -> Path:
    """The tiny GILL as a run without model.generator_checkpoint would have saved it."""
    ckpt = torch.load(gill_ckpt, weights_only=False)
    ckpt["t2i_config"]["model"]["generator_checkpoint"] = None
    ckpt["t2i_external"] = []
    torch.save(ckpt, root / "no_generator.ckpt")
    return root / "no_generator.ckpt"


def test_bad_inputs_are_one_line(
    gill_ckpt: Path,
    index: Path,
    prompts_file: Path,
    clip_ckpt: Path,
    no_generator_ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = sha256(gill_ckpt)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    link = tmp_path / "link.ckpt"
    link.symlink_to(gill_ckpt)
    good = {
        "checkpoint": gill_ckpt,
        "index": index,
        "prompts_file": prompts_file,
        "output": tmp_path / "o.ckpt",
    }

    def argv(**change: Any) -> list[str]:
        return [f"{k}={v}" for k, v in {**good, **change}.items()]

    cases = [
        (argv(checkpoint=tmp_path / "nope.ckpt"), "checkpoint not found"),
        (argv(checkpoint=clip_ckpt), "model=clip, which has no retrieve-or-generate decision head"),
        (argv(index=tmp_path / "no_index"), "does not exist; build it with python -m t2i_train.index"),
        (argv(prompts_file=empty), "holds no prompts"),
        (argv(checkpoint=no_generator_ckpt), "the labels need one"),
        (argv(holdout=1.5), "holdout must be in [0, 1)"),
        (argv(colour="red"), "unknown argument 'colour'"),
        (argv(**{"sampling.seed": 3}), "seed=N"),
        (argv(output=link), "is the input checkpoint"),
    ]
    for args, fragment in cases:
        assert fragment in error_line(args, capsys), args
    assert not (tmp_path / "o.ckpt").exists() and sha256(gill_ckpt) == before
