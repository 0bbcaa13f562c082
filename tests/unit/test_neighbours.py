"""Retrieved neighbours (t2i_train.neighbours, `python -m t2i_train.retrieve`): the picking rules, the written
shards, restarts, and the retrieval-augmented CM3leon reading them."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from t2i_train.data.encode import npy_bytes
from t2i_train.data.shard_map import map_shards
from t2i_train.data.shards import write_synthetic_shards
from t2i_train.errors import DataError
from t2i_train.neighbours import drop_words, load_bank, pick_neighbours, prompt_neighbours, write_neighbours
from tests.helpers import compose_train, save_random_clip


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model=clip checkpoint as training writes it (config and random weights), saved directly."""
    return save_random_clip(tmp_path_factory.mktemp("clip") / "last.ckpt")


@pytest.fixture(scope="module")
def token_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shapes shards with an ``image_tokens.npy`` per sample (random codes: the neighbours do not read them)."""
    raw = tmp_path_factory.mktemp("raw") / "shapes"
    write_synthetic_shards(raw, count=24, size=32, seed=1, samples_per_shard=8, progress=False)
    rng = np.random.default_rng(0)
    out = raw.parent / "tokens"

    def add_tokens(batch: list[dict]) -> list[dict[str, bytes]]:
        return [{"image_tokens.npy": npy_bytes(rng.integers(0, 256, (8, 8)))} for _ in batch]

    map_shards(sorted(str(p) for p in raw.glob("*.tar")), out, add_tokens, progress=False)
    return out


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_neighbours_are_never_the_query_and_skip_near_duplicates() -> None:
    scores = np.array([1.0, 0.95, 0.8, 0.7, 0.6])
    rows = np.array([3, 7, 1, 2, 5])
    has_text = np.ones(8, dtype=bool)
    assert pick_neighbours(scores, rows, 3, 2, 0.9, has_text) == ([1, 2], [0.8, 0.7], False)
    has_text[1] = False  # documents with a caption come first
    assert pick_neighbours(scores, rows, 3, 2, 0.9, has_text)[0] == [2, 5]
    # too few pass the filters: the best remaining candidates (never the query) fill in
    assert pick_neighbours(scores, rows, 3, 5, 0.9, np.ones(8, dtype=bool)) == (
        [1, 2, 5, 7],
        [0.8, 0.7, 0.6, 0.95],
        True,
    )


def test_query_words_are_dropped_reproducibly_and_one_always_stays() -> None:
    caption = "a red circle in the top left of the image"
    dropped = drop_words(caption, 0.2, "shard/key")
    assert dropped == drop_words(caption, 0.2, "shard/key") and len(dropped.split()) == 8
    assert drop_words("circle", 0.9, "k") == "circle"


def test_the_written_shards_hold_each_samples_neighbours(
    clip_ckpt: Path, token_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ra"
    summary = write_neighbours(str(clip_ckpt), str(token_shards), out, k=2, batch_size=5)
    assert summary["documents"] == 24 and summary["shards_written"] == 3
    bank = load_bank(out)
    for shard in sorted(out.glob("*.tar")):
        files = members(shard)
        for name in [n for n in files if n.endswith(".json")]:
            key = name[: -len(".json")]
            meta = json.loads(files[name])
            found = meta["neighbours"]
            assert len(found["keys"]) == 2 and [shard.name, key] not in found["keys"]  # never itself
            codes = np.load(__import__("io").BytesIO(files[f"{key}.ra_image_tokens.npy"]))
            rows = [bank.keys.index(tuple(k)) for k in found["keys"]]
            assert np.array_equal(codes, bank.tokens[rows]) and found["captions"] == [
                bank.captions[r] for r in rows
            ]
            assert f"{key}.image_tokens.npy" in files and f"{key}.png" in files  # every input member kept
    # a prompt finds bank documents through the same vectors
    hits = prompt_neighbours(bank, bank.vectors[:3], k=2)
    assert len(hits) == 3 and all(len(c) == 2 and t.shape == (2, 64) for c, t in hits)


def test_a_restarted_run_writes_what_an_uninterrupted_one_does(
    clip_ckpt: Path, token_shards: Path, tmp_path: Path
) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    write_neighbours(str(clip_ckpt), str(token_shards), whole, k=2)
    write_neighbours(str(clip_ckpt), str(token_shards), resumed, k=2)
    first = sorted(resumed.glob("*.tar"))[0]
    first.unlink()  # as if killed before this shard was written, and before one part was embedded
    sorted((resumed / "parts").glob("*.npz"))[-1].unlink()
    summary = write_neighbours(str(clip_ckpt), str(token_shards), resumed, k=2)
    assert summary["shards_written"] == 1 and summary["shards_existing"] == 2
    for shard in sorted(whole.glob("*.tar")):
        assert members(shard) == members(resumed / shard.name)


def test_shards_without_image_tokens_are_one_line(clip_ckpt: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_synthetic_shards(raw, count=4, size=32, seed=1, samples_per_shard=4, progress=False)
    with pytest.raises(DataError, match=r"has no image_tokens\.npy: retrieve reads pre-encoded shards"):
        write_neighbours(str(clip_ckpt), str(raw), tmp_path / "out")


def _ra_model(**options: object):
    overrides = ["model=cm3leon", "model.retrieved_docs=2", "model.max_length=384"]
    return instantiate(
        compose_train([*overrides, *[f"model.{k}={v}" for k, v in options.items()]]).model, _convert_="all"
    )


def _ra_batch(count: int = 4, neighbours: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "image_tokens": torch.randint(0, 256, (count, 64), generator=generator),
        "ra_image_tokens": torch.randint(0, 256, (count, neighbours, 64), generator=generator),
        "caption": ["a red circle in the top left"] * count,
        "meta": [{"neighbours": {"captions": ["a red square", "a blue circle"][:neighbours]}}] * count,
        "key": [f"{i:04d}" for i in range(count)],
    }


def test_retrieved_documents_come_first_and_weigh_alpha() -> None:
    model = _ra_model(span_rate=0.0, text_first_prob=1.0, cond_drop_prob=0.0)
    batch = _ra_batch()
    out = model(batch)
    ids = torch.cat([out["targets"][:, :1] * 0, out["targets"]], dim=1)  # ids[1:] are the targets
    first = model.document(
        model.text_ids("a red square"), model.image_ids(batch["ra_image_tokens"][0, 0]), True
    )[0]
    assert out["targets"][0, : len(first) - 1].tolist() == first[1:]
    prefix = 2 * (64 + 1) + len(model.text_ids("a red square")) + len(model.text_ids("a blue circle")) + 2
    weights = out["weights"][0]
    assert torch.allclose(weights[: prefix - 1], torch.full((prefix - 1,), 0.1))  # α on the retrieved docs
    assert bool((weights[prefix - 1 :][out["targets"][0, prefix - 1 :] != model.space.pad_id] == 1).all())
    assert ids.shape[1] == out["targets"].shape[1] + 1


def test_a_model_with_retrieval_needs_neighbour_fields() -> None:
    model = _ra_model()
    plain = {k: v for k, v in _ra_batch().items() if k != "ra_image_tokens"}
    with pytest.raises(DataError, match=r"needs shards written by python -m t2i_train\.retrieve"):
        model(plain)
    with pytest.raises(DataError, match=r"sample 0000: its neighbours field names 1 captions"):
        model(_ra_batch(neighbours=1))


def test_generation_prepends_each_prompts_neighbours_from_the_bank(
    clip_ckpt: Path, token_shards: Path, tmp_path: Path
) -> None:
    from t2i_train.errors import ConfigError

    out = tmp_path / "ra"
    write_neighbours(str(clip_ckpt), str(token_shards), out, k=2)
    model = _ra_model(retriever_checkpoint=str(clip_ckpt)).eval()
    prompts = ["a red circle in the top left", "a blue square"]
    prefixes = model.prompt_prefixes(prompts, str(out))
    bank = load_bank(out)
    assert all(p.count(model.space.break_id) == 4 for p in prefixes)  # two "text <break> image <break>" docs
    codes = [t - model.space.image_start for t in prefixes[0] if model.space.is_image(torch.tensor(t))]
    assert any(np.array_equal(np.array(codes[:64]), row) for row in bank.tokens)  # a bank document's codes
    tokens = model.generate_tokens(prompts, seed=0, temperature=0, index=str(out))
    assert tokens.shape == (2, 64)
    with pytest.raises(ConfigError, match="trained with retrieved_docs=0"):
        instantiate(compose_train(["model=cm3leon"]).model, _convert_="all").generate_tokens(
            prompts, index=str(out)
        )
    with pytest.raises(ConfigError, match=r"needs model\.retriever_checkpoint"):
        _ra_model().generate_tokens(prompts, index=str(out))
