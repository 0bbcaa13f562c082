"""Seeded, time-bounded fuzzing of the shard reader.

Small valid shards (with their ``_stats.json``) are damaged in the ways real storage and copies damage them:
tars cut at random offsets (inside headers, inside member data), random bytes in images and in headers,
missing or invalid JSON, missing captions, zero-length members, a sample's members dropped, empty shards,
missing or garbled stats files. Each damaged set is read through the real ShardDataModule loader with
``max_skip_rate=1.0, max_bad_shards=-1``, under a per-case time bound. Nothing may crash or hang, and when
the stats files give every shard's count, the samples trained on plus the samples reported skipped must equal
the samples written.
"""

from __future__ import annotations

import io
import random
import shutil
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from t2i_train.data.datamodule import ShardDataModule
from t2i_train.data.shards import write_synthetic_shards
from t2i_train.errors import DataError

SEED = 20240613
MAX_CASES = 250
MIN_CASES = 40  # the time budget must leave room for at least this many
TIME_BUDGET_S = 15.0
CASE_TIMEOUT_S = 10.0
WORKER_CASE_EVERY = 25  # every n-th case reads through a DataLoader worker process
SHARDS, PER_SHARD, SIZE = 3, 12, 8
TOTAL = SHARDS * PER_SHARD


@dataclass
class Case:
    index: int
    mutations: list[str] = field(default_factory=list)
    count_known: bool = True  # every shard's stats file still gives its sample count
    may_refuse: bool = False  # a mutation the setup check rejects with one DataError line (an empty shard)


# ------------------------------------------------------------------------------------------- mutations
def members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def truncate(shard: Path, offset: int) -> None:
    with open(shard, "r+b") as f:
        f.truncate(offset)


def overwrite(shard: Path, start: int, stop: int, rng: random.Random, count: int) -> None:
    with open(shard, "r+b") as f:
        for _ in range(count):
            f.seek(rng.randrange(start, stop))
            f.write(bytes([rng.randrange(256)]))


def rewrite(shard: Path, edit: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]) -> None:
    """Rewrite the tar with ``edit`` applied to its (name, data) members, in order."""
    with tarfile.open(shard) as tar:
        items = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(shard, "w") as tar:
        for name, data in edit(items):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def pick(items: list[tuple[str, bytes]], rng: random.Random, suffix: str) -> int:
    return rng.choice([i for i, (name, _) in enumerate(items) if name.endswith(suffix)])


def cut_anywhere(shard: Path, rng: random.Random, case: Case) -> None:
    truncate(shard, rng.randrange(1, shard.stat().st_size))


def cut_in_header(shard: Path, rng: random.Random, case: Case) -> None:
    member = rng.choice(members(shard))
    truncate(shard, member.offset + rng.randrange(1, 512))


def cut_in_data(shard: Path, rng: random.Random, case: Case) -> None:
    member = rng.choice([m for m in members(shard) if m.size > 0])
    truncate(shard, member.offset_data + rng.randrange(member.size))


def garble_image(shard: Path, rng: random.Random, case: Case) -> None:
    member = rng.choice([m for m in members(shard) if m.name.endswith(".png")])
    overwrite(shard, member.offset_data, member.offset_data + member.size, rng, rng.randint(1, 16))


def garble_header(shard: Path, rng: random.Random, case: Case) -> None:
    member = rng.choice(members(shard))
    overwrite(shard, member.offset, member.offset + 512, rng, rng.randint(1, 4))


def invalid_json(shard: Path, rng: random.Random, case: Case) -> None:
    def edit(items: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        i = pick(items, rng, ".json")
        items[i] = (items[i][0], rng.choice([b"{not json", b"[1, 2]", b"\xff\xfe", rng.randbytes(20)]))
        return items

    rewrite(shard, edit)


def drop_member(suffix: str) -> Callable[[Path, random.Random, Case], None]:
    def mutate(shard: Path, rng: random.Random, case: Case) -> None:
        rewrite(shard, lambda items: [x for j, x in enumerate(items) if j != pick(items, rng, suffix)])

    return mutate


def zero_length_member(shard: Path, rng: random.Random, case: Case) -> None:
    def edit(items: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        i = rng.randrange(len(items))
        items[i] = (items[i][0], b"")
        return items

    rewrite(shard, edit)


def drop_sample(shard: Path, rng: random.Random, case: Case) -> None:
    def edit(items: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        key = items[pick(items, rng, ".txt")][0].split(".")[0]
        return [x for x in items if x[0].split(".")[0] != key]

    rewrite(shard, edit)


def empty_file(shard: Path, rng: random.Random, case: Case) -> None:
    shard.write_bytes(rng.choice([b"", bytes(1024)]))
    case.may_refuse = True


def stats_of(shard: Path) -> Path:
    return shard.with_name(shard.name.replace(".tar", "_stats.json"))


def drop_stats(shard: Path, rng: random.Random, case: Case) -> None:
    stats_of(shard).unlink()
    case.count_known = False


def garble_stats(shard: Path, rng: random.Random, case: Case) -> None:
    stats_of(shard).write_bytes(rng.choice([b"{", b'{"successes": "many"}', b"[]", rng.randbytes(10)]))
    case.count_known = False


MUTATIONS: dict[str, Callable[[Path, random.Random, Case], None]] = {
    "cut_anywhere": cut_anywhere,
    "cut_in_header": cut_in_header,
    "cut_in_data": cut_in_data,
    "garble_image": garble_image,
    "garble_header": garble_header,
    "invalid_json": invalid_json,
    "drop_json": drop_member(".json"),
    "drop_caption": drop_member(".txt"),
    "drop_image": drop_member(".png"),
    "zero_length_member": zero_length_member,
    "drop_sample": drop_sample,
    "empty_file": empty_file,
    "drop_stats": drop_stats,
    "garble_stats": garble_stats,
}


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class Outcome:
    trained: int = 0
    skipped: int = 0
    bad_shards: list[str] = field(default_factory=list)
    keys: Counter[str] = field(default_factory=Counter)
    refused: str = ""


def read(folder: Path, workers: int, seed: int) -> Outcome:
    options: dict[str, Any] = {"batch_size": 8, "image_size": SIZE, "shuffle_buffer": 10, "seed": seed}
    dm = ShardDataModule(
        train_urls=str(folder), num_workers=workers, max_skip_rate=1.0, max_bad_shards=-1, **options
    )
    outcome = Outcome()
    try:
        dm.setup("fit")
    except DataError as exc:
        outcome.refused = str(exc)
        return outcome
    loader = dm.train_dataloader()
    try:
        for batch in loader:
            outcome.trained += len(batch["key"])
            outcome.skipped += int(batch["skipped"])
            outcome.bad_shards += batch["bad_shards"]
            outcome.keys.update(batch["key"])
    finally:
        if loader._iterator is not None:
            loader._iterator._shutdown_workers()
    return outcome


def bounded(fn: Callable[[], Outcome], timeout: float) -> Outcome:
    """Run ``fn`` in a thread; fail if it takes longer than ``timeout`` (a hang), re-raise what it raised."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"reading took more than {timeout} s (a hang)")
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "pristine"
    write_synthetic_shards(out, count=TOTAL, size=SIZE, seed=5, samples_per_shard=PER_SHARD, progress=False)
    return out


def make_case(index: int, pristine: Path, root: Path, rng: random.Random) -> tuple[Case, Path]:
    case = Case(index)
    folder = root / f"case{index:04d}"
    shutil.copytree(pristine, folder)
    shards = sorted(folder.glob("*.tar"))
    for _ in range(rng.choice([1, 1, 2])):
        name = rng.choice(sorted(MUTATIONS))
        shard = rng.choice(shards)
        if "stats" in name and not stats_of(shard).exists():
            continue
        try:
            MUTATIONS[name](shard, rng, case)
        except (tarfile.TarError, OSError, IndexError, ValueError):  # already too damaged to find its members
            continue
        case.mutations.append(f"{name}({shard.name})")
    return case, folder


def check(case: Case, outcome: Outcome) -> None:
    where = f"case {case.index} {case.mutations}: {outcome}"
    if outcome.refused:
        assert case.may_refuse and "\n" not in outcome.refused and "is empty" in outcome.refused, where
        return
    assert all(n == 1 for n in outcome.keys.values()), where  # no sample trained twice
    assert len(set(outcome.bad_shards)) == len(outcome.bad_shards), where
    if case.count_known:
        assert outcome.trained + outcome.skipped == TOTAL, where
    else:
        assert outcome.trained + outcome.skipped <= TOTAL, where


def test_damaged_shards_never_crash_and_every_sample_is_accounted_for(
    pristine: Path, tmp_path: Path, record_property: Any
) -> None:
    rng = random.Random(SEED)
    start = time.monotonic()
    ran: Counter[str] = Counter()
    for index in range(MAX_CASES):
        if time.monotonic() - start > TIME_BUDGET_S:
            break
        case, folder = make_case(index, pristine, tmp_path, rng)
        workers = 1 if index % WORKER_CASE_EVERY == 0 else 0
        try:
            outcome = bounded(lambda: read(folder, workers, index), CASE_TIMEOUT_S)  # noqa: B023
        except Exception as exc:
            raise AssertionError(
                f"case {index} {case.mutations} crashed: {type(exc).__name__}: {exc}"
            ) from exc
        check(case, outcome)
        ran["cases"] += 1
        ran["refused"] += bool(outcome.refused)
        ran["count_known"] += case.count_known and not outcome.refused
        ran["with_damaged_shards"] += bool(outcome.bad_shards)
        ran["with_skips"] += outcome.skipped > 0
        shutil.rmtree(folder)
    record_property("fuzz", dict(ran))
    print(f"shard fuzz: {dict(ran)} in {time.monotonic() - start:.1f} s")
    assert ran["cases"] >= MIN_CASES, ran
    assert ran["with_damaged_shards"] > 0 and ran["with_skips"] > 0 and ran["refused"] > 0, ran
