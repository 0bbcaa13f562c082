"""`python -m t2i_train.index checkpoint=CKPT urls=SHARDS output=DIR [key=value ...]`

Builds a text->image retrieval index of an image bank: every image of SHARDS embedded by a model that can
embed images for retrieval (model=clip; GILL, CM3leon), merged into a FAISS inner-product index that
`model.retrieve(prompts, k, index=DIR)` and `t2i_train.retrieval.RetrievalIndex.load(DIR)` search.

Arguments:
  checkpoint=CKPT     a training checkpoint or export folder of a family that embeds images for retrieval
  urls=SHARDS         the bank: a folder, a file, brace notation ('bank/{00000..00099}.tar') or a list
  output=DIR          parts/ (one embeddings file per shard), index.faiss, keys.jsonl, index.json
  factory=auto        auto (exact Flat below 100k images, else IVF sized to N) | a FAISS factory string
                      (IVF1024,PQ32, HNSW32, ...), trained on the embeddings
  image_size=N        default: the data.image_size the checkpoint was trained with
  resize=MODE         center_crop (default) | resize
  batch_size=N        images per embedding call (default 256)
  device=auto         auto | cpu | cuda | cuda:1 ...
  use_ema=true        embed with the EMA weights when the checkpoint has them
  merge_wait_s=600    rank 0: seconds without a new part of another rank before it gives up

Restartable: finished parts are kept and a re-run embeds only the missing ones. Launched with torchrun/srun,
each process takes every WORLD_SIZE-th shard and rank 0 merges once every part exists. Undecodable samples
are skipped and counted (parts/<shard>.skipped.json, index.json). See docs/retrieval.md; the work is done by
`t2i_train.retrieval.build_index`.
"""

from __future__ import annotations

import sys
from typing import Any

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import console_logging, fail, quiet_third_party, user_errors_exit
from t2i_train.retrieval import build_index

PROG = "python -m t2i_train.index"
REQUIRED = ("checkpoint", "urls", "output")
INT_ARGS = ("image_size", "batch_size")
FLOAT_ARGS = ("merge_wait_s",)
BOOL_ARGS = ("use_ema",)
ALLOWED = {*REQUIRED, "factory", "resize", "device", *INT_ARGS, *FLOAT_ARGS, *BOOL_ARGS}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` arguments as ``build_index`` keywords (``output`` -> ``output_dir``); one line on error."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    args: dict[str, Any] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"expected key=value, got '{item}' (see `{PROG} --help`)")
        if key not in ALLOWED:
            fail(f"unknown argument '{key}'; arguments: {', '.join(sorted(ALLOWED))}")
        args[key] = _typed(key, value)
    for key in REQUIRED:
        if key not in args:
            fail(f"missing {key}=... (see `{PROG} --help`)")
    if str(args["urls"]).startswith("["):
        args["urls"] = [u.strip().strip("'\"") for u in args["urls"].strip("[]").split(",")]
    args["output_dir"] = args.pop("output")
    return args


def _typed(key: str, value: str) -> Any:
    if key in INT_ARGS:
        if not value.isdigit() or int(value) < 1:
            fail(f"{key} must be a positive integer, got '{value}'")
        return int(value)
    if key in FLOAT_ARGS:
        try:
            return float(value)
        except ValueError:
            fail(f"{key} must be a number, got '{value}'")
    if key in BOOL_ARGS:
        return value.lower() in ("1", "true", "yes")
    return value


def describe(summary: dict[str, Any]) -> str:
    """The summary line: what the index holds and how fast this process embedded."""
    done = f", {summary['parts_already_done']} parts already done" if summary["parts_already_done"] else ""
    speed = f"{summary['images_embedded']} images embedded at {summary['images_per_s']} images/s{done}"
    if not summary["merged"]:
        return f"rank {summary['rank']}: {speed} in {summary['seconds']}s; rank 0 merges the index"
    skipped = f", {summary['skipped']} skipped" if summary["skipped"] else ""
    return (
        f"indexed {summary['count']} images{skipped} (D={summary['dim']}, factory={summary['factory']}) "
        f"into {summary['output_dir']} in {summary['seconds']}s; {speed}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(apply_trust_argument(sys.argv[1:] if argv is None else argv))
    console_logging()
    quiet_third_party()
    print(describe(user_errors_exit(build_index)(**args)), flush=True)


if __name__ == "__main__":
    main()
