"""`python -m t2i_train.evaluate <metric> key=value ...`: score samples or a stage-1 model.

Metrics:
  prompt_following samples_dir=DIR [output=FILE]
      Reads DIR/manifest.jsonl (written by `python -m t2i_train.sample`) and judges every image with the
      rule-based shapes reader (colour, shape, position). Prints JSON; writes DIR/eval.json unless output= is set.
  reconstruction checkpoint=CKPT urls=SHARDS [image_size=32] [max_images=1024] [batch_size=64] [output=FILE]
      Encodes and decodes images from shards with a stage-1 tokenizer (vqgan) and reports PSNR (dB, images in
      [0, 1]) and codebook usage.

The metrics themselves live in `t2i_train.evaluation`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import fail, user_errors_exit
from t2i_train.evaluation import prompt_following, reconstruction

METRICS = ("prompt_following", "reconstruction")


def parse_args(argv: list[str]) -> tuple[str, dict[str, str]]:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    metric, rest = argv[0], argv[1:]
    if metric not in METRICS:
        fail(f"unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")
    args = {}
    for item in rest:
        if "=" not in item:
            fail(f"expected key=value, got '{item}'")
        key, value = item.split("=", 1)
        args[key] = value
    return metric, args


@user_errors_exit
def run(metric: str, args: dict[str, str]) -> dict[str, Any]:
    if metric == "prompt_following":
        return prompt_following(**args)
    ints = {k: int(v) for k, v in args.items() if k in ("image_size", "max_images", "batch_size")}
    return reconstruction(**{**args, **ints})


def main(argv: list[str] | None = None) -> None:
    metric, args = parse_args(apply_trust_argument(sys.argv[1:] if argv is None else argv))
    try:
        print(json.dumps(run(metric, args), indent=2))
    except TypeError as exc:
        fail(f"bad arguments for {metric}: {exc} (see `python -m t2i_train.evaluate --help`)")


if __name__ == "__main__":
    main()
