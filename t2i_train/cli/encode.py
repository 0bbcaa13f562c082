"""`python -m t2i_train.encode checkpoint=CKPT input_urls=SHARDS output_dir=DIR [key=value ...]`

Pre-encodes shards with a trained model so the next stage does not run the frozen encoder in its loop:
a VQGAN adds `<key>.image_tokens.npy` to every sample (other stage-1 families add their own fields). Train on
the result with `data.train_urls=DIR data.fields=[image_tokens] data.load_images=false`. A family that can
pre_encode_captions (GILL: its generation target) adds `<key>.<field>.npy` from each sample's caption instead
or as well; a sample without one is dropped and counted, a shard without any stops the run.

Arguments:
  checkpoint=CKPT     a training checkpoint (e.g. runs/vq/checkpoints/last.ckpt) of a family that can
                      pre_encode (images) and/or pre_encode_captions
  input_urls=SHARDS   shards: a folder, a file, brace notation ('shards/{00000..00099}.tar') or a list
  output_dir=DIR      one output shard per input shard, same names, every original member kept
  image_size=N        default: the data.image_size the checkpoint was trained with (image fields only)
  resize=MODE         center_crop (default) | resize
  batch_size=N        samples per encoder call (default 256)
  device=auto         auto | cpu | cuda | cuda:1 ...
  use_ema=true        encode with the EMA weights when the checkpoint has them
  caption_keys=KEYS   caption fields: where the caption is, as data.caption_keys (first present wins):
                      txt (default), json.descriptive, dsc, ... e.g. caption_keys=json.descriptive,txt

Finished output shards are skipped when re-run (restartable after a kill); outputs are written atomically.
Launched with torchrun/srun, each process takes every WORLD_SIZE-th shard. Small files next to the inputs
(dataset.json, prompts_*.txt, img2dataset's parquet/stats) are copied, and DIR/encoded.json records how
the fields were made. The work is done by `t2i_train.data.encode.encode`.
"""

from __future__ import annotations

import sys
from typing import Any

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import parse_shard_job_args, run_shard_job
from t2i_train.data.encode import encode

INT_ARGS = ("image_size", "batch_size")
BOOL_ARGS = ("use_ema",)
STR_ARGS = ("checkpoint", "input_urls", "output_dir", "resize", "device", "caption_keys")
ALLOWED = {*STR_ARGS, *INT_ARGS, *BOOL_ARGS}


def parse_args(argv: list[str]) -> dict[str, Any]:
    return parse_shard_job_args(
        argv, __doc__, "python -m t2i_train.encode", ALLOWED, ints=INT_ARGS, bools=BOOL_ARGS
    )


def main(argv: list[str] | None = None) -> None:
    run_shard_job(encode, parse_args(apply_trust_argument(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
