"""CLIP's byte-pair vocabulary as a transformers ``CLIPTokenizer``, built offline from the file open_clip ships.

The tiny configs need a word-level tokenizer that needs no download: with bytes (ByT5) a 200-character
descriptive caption is 200 tokens and "red" spans three of them, which a tiny cross-attention model learns to
read far more slowly than one token per word. The vocabulary is CLIP's (49,408 ids; the same as
``openai/clip-vit-base-patch32``'s tokenizer), rebuilt the way CLIP builds it from its merges list and
written once into the cache folder.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from filelock import FileLock

NAME = "clip_bpe"
VOCAB_SIZE = 49408
_MERGES = VOCAB_SIZE - 256 * 2 - 2  # 48,894 merges: byte tokens, their word-final forms and 2 specials


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _write_files(folder: Path) -> None:
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")[1 : _MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(_bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def _cache_folder() -> Path:
    root = os.environ.get("T2I_CACHE") or Path.home() / ".cache" / "t2i_train"
    return Path(root) / "clip_bpe_tokenizer"


@cache
def clip_bpe_tokenizer() -> Any:
    """CLIP's tokenizer (transformers ``CLIPTokenizer``), from open_clip's bundled merges; no download."""
    from transformers import CLIPTokenizer

    folder = _cache_folder()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "merges.txt").is_file():
            _write_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
