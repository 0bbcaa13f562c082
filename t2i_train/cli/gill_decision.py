"""`python -m t2i_train.gill_decision checkpoint=GILL_CKPT index=DIR prompts_file=FILE output=OUT_CKPT [key=value ...]`

Trains GILL's retrieve-or-generate decision head alone, on automatic labels: for each prompt GILL generates an
image and retrieves its top-1 image from the index; the label is `retrieve` when the retrieved image's CLIP
score against the prompt is at least the generated image's (ties: retrieve), else `generate`. Then the head
(Dropout + Linear on the [IMG0] state) is trained on a train split of the prompts with everything else frozen,
and OUT_CKPT is the GILL checkpoint with that head (`load_family(OUT_CKPT).decide(prompts)` uses it).

Arguments:
  checkpoint=CKPT     a GILL training checkpoint (model=gill) whose run set model.generator_checkpoint
  index=DIR           a retrieval index of the bank (python -m t2i_train.index checkpoint=CKPT urls=... output=DIR)
  prompts_file=FILE   one prompt a line (blank lines and # comments skipped)
  output=OUT_CKPT     the new checkpoint (never the input one); written atomically
  labels=FILE         the labels (default OUT_CKPT.labels.jsonl): reused when made from the same checkpoint,
                      index, prompts and settings (its first line records them), else rebuilt
  holdout=0.2         share of the prompts held out to measure the head (seeded split; 0: none)
  steps=300           full-batch AdamW steps of the head (dropout on)
  lr=1e-2             AdamW learning rate
  seed=0              the split, the head's initialisation and the generation seed (seed + first prompt of
                      each batch)
  clip_scorer=null    null: GILL's own frozen CLIP; else a clip .ckpt / export folder or open_clip:NAME/TAG
  sampling.<arg>=V    generate options over the run's sampling.kwargs (steps, guidance_scale, sampler, eta)
  batch_size=32       prompts per generate / retrieve / LM call
  device=auto         auto | cpu | cuda | cuda:1 ...

Prints progress lines and one summary line (labels, retrieve share, train and held-out accuracy, the held-out
majority-class baseline). The work is done by `t2i_train.gill_decision.train_decision_head`; see docs/gill.md.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import console_logging, fail, quiet_third_party, user_errors_exit
from t2i_train.gill_decision import train_decision_head

PROG = "python -m t2i_train.gill_decision"
REQUIRED = ("checkpoint", "index", "prompts_file", "output")
INT_ARGS = {"steps": 1, "seed": 0, "batch_size": 1}  # name -> smallest value
FLOAT_ARGS = ("holdout", "lr")
ALLOWED = {*REQUIRED, "labels", "clip_scorer", "device", *INT_ARGS, *FLOAT_ARGS}
RESERVED_SAMPLING = ("seed", "generator", "prompts", "condition")


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` arguments as ``train_decision_head`` keywords (``sampling.<arg>`` into ``sampling``);
    one ``error:`` line on a bad one."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    args: dict[str, Any] = {"sampling": {}}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"expected key=value, got '{item}' (see `{PROG} --help`)")
        if key.startswith("sampling."):
            args["sampling"][_sampling_key(key)] = yaml.safe_load(value) if value else None
            continue
        if key not in ALLOWED:
            fail(f"unknown argument '{key}'; arguments: {', '.join(sorted(ALLOWED))}, sampling.<arg>")
        args[key] = _typed(key, value)
    for key in REQUIRED:
        if not args.get(key):
            fail(f"missing {key}=... (see `{PROG} --help`)")
    return args


def _sampling_key(key: str) -> str:
    name = key[len("sampling.") :]
    if name == "seed":
        fail("the generation seed is seed=N (seed + the first prompt of each batch), not sampling.seed")
    if not name or name in RESERVED_SAMPLING:
        fail(f"'{key}' is not a sampling option (steps, guidance_scale, sampler, eta, ...)")
    return name


def _typed(key: str, value: str) -> Any:
    if key in INT_ARGS:
        if not value.isdigit() or int(value) < INT_ARGS[key]:
            fail(f"{key} must be an integer >= {INT_ARGS[key]}, got '{value}'")
        return int(value)
    if key in FLOAT_ARGS:
        try:
            return float(value)
        except ValueError:
            fail(f"{key} must be a number, got '{value}'")
    if value.lower() in ("", "null", "none"):
        return None
    return value


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def describe(summary: dict[str, Any]) -> str:
    """The summary line; says so when one class dominates the labels (the baseline is then the number to
    beat, not 50%)."""
    share = summary["retrieve_share"]
    held = (
        f"held-out accuracy {_pct(summary['heldout_accuracy'])} on {summary['heldout_count']} "
        f"(majority baseline {_pct(summary['baseline'])}, always {summary['baseline_class']})"
        if summary["heldout_count"]
        else "no held-out prompts (holdout=0)"
    )
    line = (
        f"decision head: {summary['labels']} labels, {_pct(share)} retrieve; train accuracy "
        f"{_pct(summary['train_accuracy'])} on {summary['train_count']}; {held}; wrote {summary['output']} "
        f"(labels {summary['labels_path']}) in {summary['seconds']}s"
    )
    if max(share, 1 - share) >= 0.9:
        major = "retrieve" if share >= 0.5 else "generate"
        line += f"; note: {_pct(max(share, 1 - share))} of the labels say {major}, so accuracy says little"
    return line


def main(argv: list[str] | None = None) -> None:
    args = parse_args(apply_trust_argument(sys.argv[1:] if argv is None else argv))
    console_logging()
    quiet_third_party()
    print(describe(user_errors_exit(train_decision_head)(**args)), flush=True)


if __name__ == "__main__":
    main()
