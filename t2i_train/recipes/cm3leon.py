"""``cm3leon`` (``make train-cm3leon``): shapes -> VQGAN -> pre-encoded tokens -> CM3leon on the tokens and the
short captions -> text -> image samples of the seen and held-out prompts -> prompt following -> captions of
held-out renders from the same model (image -> text) -> a decoding table (no CFG, CFG, CD-K, TopP-CD) -> the
retrieval-augmented arm: CLIP -> ``retrieve`` (k=2 neighbours per document) -> CM3leon with the same steps on
the augmented shards -> its samples (neighbours of each prompt prepended) and captions.

Every number lands in ``OUT/report.json`` and one table (``render``)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from t2i_train.recipes.base import Recipe, Run, Stage
from t2i_train.recipes.galip import clip as clip_stage
from t2i_train.recipes.muse import vqgan
from t2i_train.recipes.report import HELDOUT_TARGET, check, pct, read_json
from t2i_train.recipes.stages import DATA_STAGE, SPLITS, last_checkpoint, load_for_sampling, train_stage

log = logging.getLogger("t2i_train.pipeline")

SEEN_TARGET, CAPTION_TARGET = 0.85, 0.70
#: the RA arm's training sequence: 2 neighbours + the query, each <= 48 caption tokens + <break> + 64 codes
RA_MAX_LENGTH = 384
#: the decoding table: name -> sampling options on the unaugmented checkpoint
DECODERS: dict[str, dict[str, Any]] = {
    "no_cfg": {"guidance_scale": 1.0},
    "cfg3": {"guidance_scale": 3.0},
    "cd_k": {"decoder": "cd", "temperature": 0.0},
    "topp_cd": {"decoder": "topp_cd", "top_p": 0.9},
}


def _train(run: Run, name: str, data: Path, extra: list[str]) -> Path:
    overrides = [
        "experiment=shapes_cm3leon",
        f"data.train_urls={data}",
        f"data.val_urls={data / 'val'}",
        "data.load_images=false",
        f"model.image_tokenizer_checkpoint={run.results['vqgan']}",
        "torch_threads=2",  # the data worker only reads tokens: both cores go to the transformer
        *extra,
        *run.overrides(name),
    ]
    train_stage(run, run.out / name, overrides)
    return last_checkpoint(run.out / name)


def cm3leon(run: Run) -> Path:
    """``experiment=shapes_cm3leon`` on the pre-encoded tokens, unaugmented; returns its checkpoint."""
    return _train(run, "cm3leon", run.out / "tokens", ["data.fields=[image_tokens]"])


def retrieve(run: Run) -> Path:
    """Each training and validation document's 2 neighbours by the shapes CLIP, written beside the tokens."""
    from t2i_train.neighbours import write_neighbours

    out = run.out / "tokens_ra"
    for name, folder in {".": run.out / "tokens", "val": run.out / "tokens" / "val"}.items():
        write_neighbours(str(run.results["clip"]), str(folder), out / name, k=2)
    return out


def cm3leon_ra(run: Run) -> Path:
    """The same preset and steps on the augmented shards: ``ra1 <break> ra2 <break> query``, α = 0.1."""
    extra = [
        "data.fields=[image_tokens,ra_image_tokens]",
        "model.retrieved_docs=2",
        f"model.max_length={RA_MAX_LENGTH}",
        f"model.retriever_checkpoint={run.results['clip']}",
    ]
    return _train(run, "cm3leon_ra", run.results["retrieve"], extra)


def _sample(run: Run, checkpoint: Path, prefix: str, **options: Any) -> dict[str, Any]:
    from t2i_train.evaluation import prompt_following
    from t2i_train.sampling import read_prompts, sample_to_dir, training_sampling_kwargs

    model, ckpt = load_for_sampling(checkpoint)
    result = {}
    for split in SPLITS:
        prompts = read_prompts(None, str(run.data / f"prompts_{split}.txt"))
        out = run.out / f"{prefix}_{split}"
        sampling = {**training_sampling_kwargs(ckpt), **options}
        start = time.perf_counter()
        sample_to_dir(model, prompts, out, int(run.option("images_per_prompt", 4)), seed=0, sampling=sampling)
        scores = prompt_following(str(out))
        scores["seconds"] = round(time.perf_counter() - start, 2)
        log.info("%s prompt following, %s prompts: %.1f%% all three", prefix, split, 100 * scores["all"])
        result[split] = scores
    return result


def samples(run: Run) -> dict[str, Any]:
    return _sample(run, run.results["cm3leon"], "samples")


def samples_ra(run: Run) -> dict[str, Any]:
    """The RA model's samples, each prompt's 2 nearest bank documents (by CLIP text embedding) prepended."""
    return _sample(run, run.results["cm3leon_ra"], "samples_ra", index=str(run.results["retrieve"]))


def _captions(run: Run, stage: str) -> dict[str, Any]:
    from t2i_train.metrics.caption_accuracy import evaluate_checkpoint

    result = evaluate_checkpoint(str(run.results[stage]), per_combination=10)
    (run.out / f"{stage}_captions.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def captions(run: Run) -> dict[str, Any]:
    """Image -> text from the unaugmented model: colour, shape and position read from its captions of renders
    of every combination (held-out ones apart)."""
    return _captions(run, "cm3leon")


def decoding(run: Run) -> dict[str, Any]:
    """Seen prompts through each decoder of one checkpoint: prompt following and images/s."""
    from t2i_train.evaluation import prompt_following
    from t2i_train.sampling import read_prompts, sample_to_dir

    model, _ = load_for_sampling(run.results["cm3leon"])
    prompts = read_prompts(None, str(run.data / "prompts_seen.txt"))
    table = {}
    for name, options in DECODERS.items():
        out = run.out / f"decoding_{name}"
        start = time.perf_counter()
        sample_to_dir(model, prompts, out, 1, seed=0, sampling=options)
        seconds = time.perf_counter() - start
        scores = prompt_following(str(out))
        table[name] = {"all": scores["all"], "images_per_s": round(len(prompts) / seconds, 2), **options}
    (run.out / "decoding.json").write_text(json.dumps(table, indent=2))
    return table


# ------------------------------------------------------------------------------------------------ report
def _loss_curve(run_dir: Path, every: int = 500) -> list[tuple[int, float]]:
    """(step, train/loss) every ``every`` steps from the run's CSV log."""
    import csv

    points: dict[int, float] = {}
    for metrics in sorted(run_dir.glob("**/metrics.csv")):
        with metrics.open() as handle:
            for row in csv.DictReader(handle):
                step, loss = row.get("step"), row.get("train/loss")
                if step and loss and int(step) % every == every - 1:
                    points[int(step) + 1] = round(float(loss), 4)
    return sorted(points.items())


def collect(out: Path, seconds: int | None = None) -> dict[str, Any]:
    report: dict[str, Any] = {"recipe": "cm3leon", "seconds": seconds}
    report["vqgan_psnr_db"] = read_json(out / "vqgan" / "psnr.json").get("psnr_db")
    for arm, prefix in (("plain", "samples"), ("ra", "samples_ra")):
        for split in SPLITS:
            report[f"{arm}_{split}"] = read_json(out / f"{prefix}_{split}" / "eval.json")
        report[f"{arm}_loss"] = _loss_curve(out / ("cm3leon" if arm == "plain" else "cm3leon_ra"))
    report["captions"] = read_json(out / "cm3leon_captions.json")
    report["decoding"] = read_json(out / "decoding.json")
    return report


def report(run: Run) -> dict[str, Any]:
    return collect(run.out, run.seconds())


def render(out: Path, rep: dict[str, Any]) -> str:
    lines = [
        "",
        "cm3leon recipe: done" + (f" in {rep['seconds'] / 60:.1f} min" if rep.get("seconds") else ""),
    ]
    lines.append(f"  VQGAN held-out PSNR: {rep.get('vqgan_psnr_db')} dB")
    targets = {"seen": SEEN_TARGET, "heldout": HELDOUT_TARGET}
    for arm, label in (("plain", "CM3leon"), ("ra", "CM3leon + 2 retrieved")):
        for split in SPLITS:
            s = rep.get(f"{arm}_{split}") or {}
            lines.append(
                f"  {label}, text -> image, {split}: {pct(s.get('all'))} all three (colour {pct(s.get('colour'))}, "
                f"shape {pct(s.get('shape'))}, position {pct(s.get('position'))})"
                + check(s.get("all"), targets[split])
            )
        curve = rep.get(f"{arm}_loss") or []
        if curve:
            lines.append(f"  {label} train loss: " + ", ".join(f"{step}: {loss:.3f}" for step, loss in curve))
    held = (rep.get("captions") or {}).get("heldout", {})
    lines.append(
        f"  image -> text, held-out renders: {pct(held.get('all'))} all three{check(held.get('all'), CAPTION_TARGET)}"
    )
    for name, row in (rep.get("decoding") or {}).items():
        lines.append(f"  decoding {name}: {pct(row.get('all'))} seen, {row.get('images_per_s')} images/s")
    lines.append(f"  numbers: {out}/report.json; checkpoints: {out}/cm3leon, {out}/cm3leon_ra")
    return "\n".join(lines)


RECIPE = Recipe(
    name="cm3leon",
    help="VQGAN -> tokens -> CM3leon (text <-> image) -> samples, captions, decoders -> CLIP -> neighbours -> RA arm",
    stages=(
        DATA_STAGE,
        Stage("vqgan", vqgan, trains=True),
        Stage("cm3leon", cm3leon, trains=True),
        Stage("samples", samples),
        Stage("captions", captions),
        Stage("decoding", decoding),
        Stage("clip", clip_stage, trains=True),
        Stage("retrieve", retrieve),
        Stage("cm3leon_ra", cm3leon_ra, trains=True),
        Stage("samples_ra", samples_ra),
    ),
    report=report,
    render=render,
    from_files=collect,
)
