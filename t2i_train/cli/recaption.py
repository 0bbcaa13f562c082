"""`python -m t2i_train.recaption checkpoint=CKPT input_urls=SHARDS output_dir=DIR [style=dsc] [key=value ...]`

Recaptions shards with a trained captioner (DALL-E 3's recipe): every sample keeps all its members and gains
the synthetic caption as `<key>.<style>.txt` (`dsc.txt`; `field=NAME` writes `<key>.NAME.txt`). Train on it
with `data.caption_keys=[dsc,txt]` (blend with `data.caption_probs`, e.g. [0.95,0.05] as DALL-E 3 does).

Arguments:
  checkpoint=CKPT     a model=captioner training checkpoint or export folder
  input_urls=SHARDS   shards: a folder, a file, brace notation ('shards/{00000..00099}.tar') or a list
  output_dir=DIR      one output shard per input shard, same names, every original member kept
  style=dsc           the caption style (the captioner's style_prompts: dsc, ssc)
  field=NAME          member name of the new caption (default: the style; written as NAME.txt)
  json_field=NAME     also write the caption into the sample's JSON under NAME
  method=greedy       greedy | beam | top_p
  num_beams=4  top_p=0.9  temperature=1.0  max_new_tokens=N  seed=0
  rerank=K            decode K candidates (beam or top_p) and keep the one the captioner's CLIP matches best
  image_size=N        default: the data.image_size the captioner was trained with
  batch_size=N        images per decoding call (default 64)
  limit=N             recaption only the first N shards (a quick look before the full run)
  device=auto         auto | cpu | cuda | cuda:1 ...
  torch_threads=N     intra-op CPU threads (torch.set_num_threads); default: torch's
  use_ema=true        decode with the EMA weights when the checkpoint has them

Deterministic: each batch decodes from a seed made of `seed` and its first sample's key, so a run restarted
after a kill (finished shards are skipped, outputs are written atomically) writes the same bytes as an
uninterrupted one. Launched with torchrun/srun, each process takes every WORLD_SIZE-th shard. Small files next
to the inputs (dataset.json, prompts_*.txt, img2dataset's parquet/stats) are copied; DIR/recaptioned.json
records the checkpoint and decoding options. The work is done by `t2i_train.data.recaption.recaption`.
"""

from __future__ import annotations

import sys
from typing import Any

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import parse_shard_job_args, run_shard_job
from t2i_train.data.recaption import recaption

INT_ARGS = (
    "image_size",
    "batch_size",
    "num_beams",
    "max_new_tokens",
    "seed",
    "limit",
    "torch_threads",
    "rerank",
)
FLOAT_ARGS = ("top_p", "temperature")
BOOL_ARGS = ("use_ema",)
STR_ARGS = ("checkpoint", "input_urls", "output_dir", "style", "field", "json_field", "method", "device")
ALLOWED = {*STR_ARGS, *INT_ARGS, *FLOAT_ARGS, *BOOL_ARGS}


def parse_args(argv: list[str]) -> dict[str, Any]:
    return parse_shard_job_args(
        argv,
        __doc__,
        "python -m t2i_train.recaption",
        ALLOWED,
        ints=INT_ARGS,
        floats=FLOAT_ARGS,
        bools=BOOL_ARGS,
        zero_ok=("seed", "rerank"),
    )


def main(argv: list[str] | None = None) -> None:
    run_shard_job(recaption, parse_args(apply_trust_argument(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
