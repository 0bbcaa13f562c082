"""`python -m t2i_train.retrieve checkpoint=CLIP_CKPT urls=SHARDS output=DIR [key=value ...]`

Writes the retrieved neighbours of every training document (retrieval-augmented CM3leon): each document of
SHARDS (pre-encoded by `python -m t2i_train.encode`, so each holds image_tokens.npy) embedded by the frozen CLIP
as the mean of its normalised image and text embeddings, a FAISS inner-product index over them, and for each
document its k best neighbours (never itself, relevance <= max_relevance). The output shards are the inputs
plus ra_image_tokens.npy ([k, N] codes) and a `neighbours` entry in each JSON (keys, captions, scores): train
on them with data.fields=[image_tokens,ra_image_tokens] model.retrieval=true. bank/ keeps the index's
documents for retrieval at inference.

Arguments:
  checkpoint=CKPT     a checkpoint of a family that embeds images and prompts for retrieval (model=clip)
  urls=SHARDS         the memory bank and the documents to augment: a folder, a file, brace notation or a list
  output=DIR          the augmented shards, bank/, parts/ (one embeddings file per shard), neighbours.json
  k=2                 neighbours per document
  max_relevance=0.9   candidates more similar than this (near duplicates) are skipped
  query_drop=0.2      share of the caption's words dropped from a document's query (RA-CM3)
  caption_key=txt     the caption member
  batch_size=N        documents per embedding call (default 256)
  device=auto         auto | cpu | cuda | cuda:1 ...
  merge_wait_s=600    seconds without a new part of another rank before giving up

Restartable: finished parts and output shards are kept. Launched with torchrun/srun, each process embeds and
writes every WORLD_SIZE-th shard. The work is done by `t2i_train.neighbours.write_neighbours`.
"""

from __future__ import annotations

import sys
from typing import Any

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import console_logging, fail, quiet_third_party, user_errors_exit
from t2i_train.neighbours import write_neighbours

PROG = "python -m t2i_train.retrieve"
REQUIRED = ("checkpoint", "urls", "output")
INT_ARGS = ("k", "batch_size")
FLOAT_ARGS = ("max_relevance", "query_drop", "merge_wait_s")
ALLOWED = {*REQUIRED, "caption_key", "device", *INT_ARGS, *FLOAT_ARGS}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` arguments as ``write_neighbours`` keywords; one line on error."""
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
    return value


def main(argv: list[str] | None = None) -> None:
    args = parse_args(apply_trust_argument(sys.argv[1:] if argv is None else argv))
    console_logging()
    quiet_third_party()
    summary = user_errors_exit(write_neighbours)(**args)
    print(
        f"neighbours: {summary['documents']} documents, k={summary['k']} ({summary['relaxed']} relaxed), "
        f"{summary['shards_written']} shards written ({summary['shards_existing']} already there) in "
        f"{summary['seconds']}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
