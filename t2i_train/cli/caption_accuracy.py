"""`python -m t2i_train.caption_accuracy checkpoint=CKPT [style=dsc] [per_combination=10] [decoding ...]` or
`... shards=DIR [caption_key=dsc]` (also `python -m t2i_train.metrics.caption_accuracy ...`).

``checkpoint=``: a captioner's accuracy (colour, shape, position, all three) on its synthetic set's validation
split and on fresh renders of the held-out combinations; decoding options (``method=beam num_beams=4
rerank=4``, ``seed``) pass through to the captioner's ``caption``. ``shards=``: audits the captions already in
shards (e.g. what ``python -m t2i_train.recaption`` wrote) against each sample's JSON. Prints JSON. The
metric is ``t2i_train.metrics.caption_accuracy``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from t2i_train.checkpoint_io import apply_trust_argument
from t2i_train.cli.common import fail, user_errors_exit
from t2i_train.metrics.caption_accuracy import evaluate_checkpoint, stored_caption_accuracy


def main(argv: list[str] | None = None) -> None:
    """``key=value`` arguments: checkpoint, style, per_combination, batch_size, method, num_beams, rerank, seed."""
    args: dict[str, Any] = {}
    for item in apply_trust_argument(sys.argv[1:] if argv is None else argv):
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"expected key=value, got '{item}'")
        args[key] = int(value) if value.isdigit() else value
    if "shards" in args:
        if set(args) - {"shards", "caption_key"}:
            fail(f"with shards=, only caption_key= is an option (got {', '.join(sorted(args))})")
        shards = args.pop("shards")
        audit = user_errors_exit(stored_caption_accuracy)(shards, **args)
        if not audit["count"]:
            fail(
                f"no sample of {shards} has a '{audit['caption_key']}' caption and colour/shape/position in "
                "its JSON; pass caption_key= (dsc, txt, json.<field>) of shards made from a shapes set"
            )
        print(json.dumps(audit, indent=2))
        return
    if "checkpoint" not in args:
        fail("missing checkpoint=... (a model=captioner checkpoint) or shards=... (captions to audit)")
    print(json.dumps(user_errors_exit(evaluate_checkpoint)(**args), indent=2))


if __name__ == "__main__":
    main()
