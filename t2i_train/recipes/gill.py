"""``gill`` (``make train-gill``): shapes -> CLIP -> LM -> VAE -> latent diffusion -> GILL through all of them ->
a FAISS index of the validation images -> the decision head -> scores.

The scores, all from this one run: prompt following through the GILL path (prompt -> frozen LM -> [IMG] states
-> mapper -> the frozen diffusion model) beside the diffusion model's own (the mapper's loss of fidelity as a
ratio), text -> image R@1 / R@5 over the validation images, GILL's captions of held-out renders, the mapper's
distillation distance and cosine on validation captions, the decision head's held-out accuracy, and prompt
following in ``auto`` mode (the head picks retrieve or generate per prompt) against the two modes alone.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from t2i_train.recipes.base import Recipe, Run, Stage
from t2i_train.recipes.galip import clip as clip_stage
from t2i_train.recipes.report import check, pct, read_json
from t2i_train.recipes.stages import (
    DATA_STAGE,
    SPLITS,
    descriptive_prompts,
    last_checkpoint,
    load_for_sampling,
    sample_splits,
    train_stage,
)

log = logging.getLogger(__name__)

SEEN_TARGET, HELDOUT_TARGET, R1_TARGET, CAPTION_TARGET = 0.85, 0.60, 0.90, 0.70


def lm(run: Run) -> Path:
    overrides = ["experiment=shapes_lm", f"data.train_urls={run.data}", *run.overrides("lm")]
    train_stage(run, run.out / "lm", overrides)
    return last_checkpoint(run.out / "lm")


def vae(run: Run) -> Path:
    from t2i_train.recipes.diffusion import vae as vae_stage

    return vae_stage(run)


def diffusion(run: Run) -> Path:
    from t2i_train.recipes.diffusion import diffusion as diffusion_stage

    return diffusion_stage(run)


def gill(run: Run) -> Path:
    overrides = [
        "experiment=shapes_gill",
        f"data.train_urls={run.data}",
        f"model.lm.checkpoint={run.results['lm']}",
        f"model.clip.checkpoint={run.results['clip']}",
        f"model.generator_checkpoint={run.results['diffusion']}",
    ]
    train_stage(run, run.out / "gill", [*overrides, *run.overrides("gill")])
    return last_checkpoint(run.out / "gill")


def index(run: Run) -> Path:
    """The retrieval bank: the validation images, embedded by GILL's image retrieval head."""
    from t2i_train.retrieval import build_index

    out = run.out / "index"
    build_index(str(run.results["gill"]), str(run.data / "val"), str(out), batch_size=256)
    return out


def training_prompts(run: Run, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct descriptive captions of the training shards (the decision head's prompts)."""
    from t2i_train.data.datamodule import resolve_urls
    from t2i_train.data.shard_map import read_raw_samples
    from t2i_train.data.transforms import parse_meta

    captions: dict[str, None] = {}
    for url in resolve_urls(str(run.data)):
        for raw in read_raw_samples(url):
            text = parse_meta(raw).get("descriptive")
            if isinstance(text, str):
                captions[text] = None
        if len(captions) >= 4 * count:
            break
    pool = list(captions)
    random.Random(seed).shuffle(pool)
    return pool[:count]


def decision(run: Run) -> Path:
    """Automatic labels (retrieved vs generated CLIP score) for training captions, the head trained alone."""
    from t2i_train.gill_decision import train_decision_head

    prompts_file = run.out / "decision_prompts.txt"
    prompts_file.write_text("\n".join(training_prompts(run, int(run.option("decision_prompts", 320)))) + "\n")
    out = run.out / "gill_decision.ckpt"
    summary = train_decision_head(
        checkpoint=str(run.results["gill"]),
        index=str(run.results["index"]),
        prompts_file=str(prompts_file),
        output=str(out),
        labels=str(run.out / "decision_labels.jsonl"),
    )
    (run.out / "decision.json").write_text(json.dumps(summary, indent=2, default=str))
    return out


def samples(run: Run) -> dict[str, Any]:
    """Prompt following: GILL's generate path and the diffusion model's own, seen and held-out prompts."""
    return {
        "gill": sample_splits(run, run.results["decision"], descriptive=True),
        "diffusion": _diffusion_samples(run),
    }


def _diffusion_samples(run: Run) -> dict[str, Any]:
    from t2i_train.recipes.stages import sample_and_score

    result = {}
    for split in SPLITS:
        result[split] = sample_and_score(
            run.results["diffusion"],
            run.data / f"prompts_{split}.txt",
            run.out / f"diffusion_samples_{split}",
            int(run.option("images_per_prompt", 4)),
            descriptive=True,
        )
    return result


def modes(run: Run) -> dict[str, Any]:
    """Seen prompts in ``retrieve`` and ``auto`` mode (the decision head picks per prompt), scored alike."""
    from t2i_train.evaluation import prompt_following
    from t2i_train.sampling import read_prompts, sample_to_dir

    model, _ = load_for_sampling(run.results["decision"])
    prompts = read_prompts(None, str(run.data / "prompts_seen.txt"))
    upsampled = descriptive_prompts(prompts)
    result = {}
    for mode in ("retrieve", "auto"):
        out = run.out / f"samples_seen_{mode}"
        manifest = sample_to_dir(
            model, prompts, out, 1, seed=0, upsampled=upsampled, mode=mode, index=str(run.results["index"])
        )
        scores = prompt_following(str(out))
        scores["retrieved_share"] = sum(1 for m in manifest if m.get("source") == "retrieved") / max(
            1, len(manifest)
        )
        result[mode] = scores
    return result


def scores(run: Run) -> dict[str, Any]:
    """Retrieval recall, captioning of held-out renders, distillation fidelity on validation captions."""
    from t2i_train.metrics.caption_accuracy import evaluate_checkpoint
    from t2i_train.metrics.gill_eval import bank_attributes, distillation_fidelity, retrieval_recall

    model, _ = load_for_sampling(run.results["gill"])
    val = [str(p) for p in sorted((run.data / "val").glob("*.tar"))]
    recall = retrieval_recall(model, str(run.results["index"]), val)
    captions = evaluate_checkpoint(str(run.results["gill"]), per_combination=10)
    val_captions = [combination_prompt for combination_prompt in _val_captions(val)][:256]
    fidelity = distillation_fidelity(model, val_captions)
    result = {
        "retrieval": recall,
        "captioning": captions,
        "distillation": fidelity,
        "bank": len(bank_attributes(val)),
    }
    (run.out / "gill_scores.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _val_captions(urls: list[str]) -> list[str]:
    from t2i_train.data.shard_map import read_raw_samples
    from t2i_train.data.transforms import parse_meta

    out = []
    for url in urls:
        for raw in read_raw_samples(url):
            text = parse_meta(raw).get("descriptive")
            if isinstance(text, str):
                out.append(text)
    return out


# ------------------------------------------------------------------------------------------------ report
def collect(out: Path, seconds: int | None = None) -> dict[str, Any]:
    gill_scores = read_json(out / "gill_scores.json")
    decision_summary = read_json(out / "decision.json")
    report: dict[str, Any] = {"recipe": "gill", "seconds": seconds}
    for split in SPLITS:
        report[f"gill_{split}"] = read_json(out / f"samples_{split}" / "eval.json")
        report[f"diffusion_{split}"] = read_json(out / f"diffusion_samples_{split}" / "eval.json")
        gill_all, diff_all = report[f"gill_{split}"].get("all"), report[f"diffusion_{split}"].get("all")
        report[f"ratio_{split}"] = gill_all / diff_all if gill_all is not None and diff_all else None
    for mode in ("retrieve", "auto"):
        report[f"seen_{mode}"] = read_json(out / f"samples_seen_{mode}" / "eval.json")
    report["retrieval"] = gill_scores.get("retrieval", {})
    report["captioning"] = gill_scores.get("captioning", {})
    report["distillation"] = gill_scores.get("distillation", {})
    report["decision"] = decision_summary
    return report


def report(run: Run) -> dict[str, Any]:
    return collect(run.out, run.seconds())


def render(out: Path, rep: dict[str, Any]) -> str:
    lines = ["", "gill recipe: done" + (f" in {rep['seconds'] / 60:.1f} min" if rep.get("seconds") else "")]
    targets = {"seen": SEEN_TARGET, "heldout": HELDOUT_TARGET}
    for split in SPLITS:
        g, d = rep[f"gill_{split}"], rep[f"diffusion_{split}"]
        ratio = rep[f"ratio_{split}"]
        lines.append(
            f"  prompt following, {split}: GILL path {pct(g.get('all'))}{check(g.get('all'), targets[split])}, "
            f"diffusion alone {pct(d.get('all'))}, ratio {ratio:.2f}"
            if ratio is not None
            else f"  prompt following, {split}: GILL path {pct(g.get('all'))}, diffusion alone {pct(d.get('all'))}"
        )
    r = rep["retrieval"]
    lines.append(
        f"  retrieval over {r.get('bank')} validation images, {r.get('prompts')} prompts: R@1 {pct(r.get('r@1'))}"
        f"{check(r.get('r@1'), R1_TARGET)}, R@5 {pct(r.get('r@5'))}"
    )
    held = (rep["captioning"] or {}).get("heldout", {})
    lines.append(
        f"  captions of held-out renders: {pct(held.get('all'))} all three{check(held.get('all'), CAPTION_TARGET)}"
    )
    dist = rep["distillation"]
    lines.append(
        f"  mapper vs target on {dist.get('captions')} validation captions: distance {dist.get('distance', 0):.3f}, "
        f"cosine {dist.get('cosine', 0):.3f}"
    )
    dec = rep["decision"]
    lines.append(
        f"  decision head: held-out accuracy {pct(dec.get('heldout_accuracy'))} (majority baseline "
        f"{pct(dec.get('baseline'))}, {pct(dec.get('retrieve_share'))} of labels say retrieve)"
    )
    auto, retrieve, seen = rep["seen_auto"], rep["seen_retrieve"], rep["gill_seen"]
    best = max(x for x in (retrieve.get("all"), seen.get("all"), 0.0) if x is not None)
    lines.append(
        f"  seen prompts: auto {pct(auto.get('all'))} vs retrieve {pct(retrieve.get('all'))} / generate "
        f"{pct(seen.get('all'))}{check(auto.get('all'), best - 0.05)}"
    )
    lines.append(
        f"  numbers: {out}/report.json; checkpoints: {out}/gill/checkpoints/last.ckpt, {out}/gill_decision.ckpt"
    )
    return "\n".join(lines)


RECIPE = Recipe(
    name="gill",
    help="CLIP, LM, VAE, diffusion -> GILL -> index -> decision head -> scores (make train-gill)",
    stages=(
        DATA_STAGE,
        Stage("clip", clip_stage, trains=True),
        Stage("lm", lm, trains=True),
        Stage("vae", vae, trains=True),
        Stage("diffusion", diffusion, trains=True),
        Stage("gill", gill, trains=True),
        Stage("index", index),
        Stage("decision", decision),
        Stage("samples", samples),
        Stage("modes", modes),
        Stage("scores", scores),
    ),
    report=report,
    render=render,
    from_files=collect,
)
