"""``python -m t2i_train.shards {synthetic,folder,table} ...``: write WebDataset shards (img2dataset layout).

Examples::

    python -m t2i_train.shards synthetic --out data/shapes --count 20000 --size 32 --seed 0 --holdout-fraction 0.1
    python -m t2i_train.shards folder photos/ --out data/photos --resize 256
    python -m t2i_train.shards table captions.parquet --out data/table --image-col path --caption-col text

Bad input (missing folder, unreadable image, missing column, ...) prints one line on stderr and exits with
code 2; no shard of the failed run is left behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from t2i_train.errors import T2IError


def _common(parser: argparse.ArgumentParser, default_prefix: str, default_per_shard: int) -> None:
    parser.add_argument("--out", required=True, help="output folder for the shards (created if missing)")
    parser.add_argument(
        "--samples-per-shard", type=int, default=default_per_shard, help=f"(default {default_per_shard})"
    )
    parser.add_argument(
        "--prefix", default=default_prefix, help="shard names PREFIX-000000.tar (default %(default)s)"
    )
    parser.add_argument(
        "--naming",
        choices=("prefix", "img2dataset"),
        default="prefix",
        help="'prefix': PREFIX-000000.tar; 'img2dataset': 00000.tar (default %(default)s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sources(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        dest="image_format",
        choices=("keep", "png", "jpg", "webp"),
        default="keep",
        help="image encoding in the shards; 'keep' copies the file's bytes (default %(default)s)",
    )
    parser.add_argument(
        "--resize", type=int, default=None, help="resize the shorter side to N and centre-crop to NxN"
    )
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images / missing captions")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m t2i_train.shards",
        description="Write WebDataset shards ({key}.png|jpg + .txt + .json, key = %%09d) like img2dataset.",
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="{synthetic,folder,table}")

    syn = sub.add_parser(
        "synthetic",
        help="render the synthetic shapes world",
        description="Render coloured shapes on a 3x3 grid (see the shapes spec); also writes dataset.json, "
        "prompts_seen.txt and prompts_heldout.txt into --out.",
    )
    _common(syn, "shapes", 500)
    syn.add_argument("--count", type=int, default=20000, help="training samples (default %(default)s)")
    syn.add_argument("--size", type=int, default=32, help="image side in px (default %(default)s)")
    syn.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    syn.add_argument(
        "--holdout",
        action="append",
        default=None,
        metavar="'COLOUR SHAPE POSITION'",
        help="hold this combination out of training (repeatable), e.g. --holdout 'red circle top left'",
    )
    syn.add_argument(
        "--holdout-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction of the 162 combinations, chosen with --seed (default %(default)s)",
    )
    syn.add_argument("--val-count", type=int, default=0, help="also write a validation split to OUT/val/")
    syn.add_argument(
        "--format",
        dest="image_format",
        choices=("png", "jpg", "webp"),
        default="png",
        help="image encoding (default %(default)s; png keeps the exact pixels)",
    )

    folder = sub.add_parser(
        "folder",
        help="a folder of images with same-name .txt captions",
        description="Shard every image (jpg, jpeg, png, webp) found recursively under FOLDER that has a "
        "caption file of the same name with suffix .txt.",
    )
    folder.add_argument("folder", help="folder to scan recursively")
    _common(folder, "shard", 1000)
    _sources(folder)

    table = sub.add_parser(
        "table",
        help="a CSV/TSV/parquet table of image paths and captions",
        description="Shard the rows of a table; relative image paths are resolved against the table's "
        "folder, other columns go into each sample's .json.",
    )
    table.add_argument("table", help="a .csv, .tsv or .parquet file")
    table.add_argument("--image-col", default="image", help="column with image paths (default %(default)s)")
    table.add_argument("--caption-col", default="caption", help="column with captions (default %(default)s)")
    _common(table, "shard", 1000)
    _sources(table)
    return parser


def run(args: argparse.Namespace) -> str:
    """Write the shards ``args`` ask for; returns the summary line."""
    from t2i_train.data import shards

    common: dict[str, Any] = {
        "samples_per_shard": args.samples_per_shard,
        "prefix": args.prefix,
        "naming": args.naming,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
    }
    if args.source == "synthetic":
        summary = shards.write_synthetic_shards(
            args.out,
            count=args.count,
            size=args.size,
            seed=args.seed,
            holdout=args.holdout,
            holdout_fraction=args.holdout_fraction,
            val_count=args.val_count,
            image_format=args.image_format,
            **common,
        )
    else:
        common.update(image_format=args.image_format, resize=args.resize, skip_bad=args.skip_bad)
        if args.source == "folder":
            summary = shards.write_folder_shards(args.folder, args.out, **common)
        else:
            summary = shards.write_table_shards(
                args.table, args.out, image_col=args.image_col, caption_col=args.caption_col, **common
            )
    return summary.describe()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for user-fixable errors)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        print(run(args), flush=True)
    except T2IError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
