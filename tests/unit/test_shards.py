"""Shard writers and the ``python -m t2i_train.shards`` CLI: layout, atomicity, holdout, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from t2i_train.cli.shards import main
from t2i_train.data import synthetic
from t2i_train.data.shards import ShardWriter, write_folder_shards, write_synthetic_shards, write_table_shards
from t2i_train.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} in member order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            f = tar.extractfile(member)
            assert f is not None
            samples.setdefault(key, {})[ext] = f.read()
    return samples


def all_samples(folder: Path, pattern: str = "*.tar") -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob(pattern)):
        samples.update(read_shard(shard))
    return samples


def save_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "set"
    write_synthetic_shards(
        out,
        count=700,
        size=16,
        seed=1,
        holdout_fraction=0.2,
        samples_per_shard=300,
        val_count=40,
        progress=False,
    )
    return out


def test_synthetic_layout_dataset_json_and_prompt_files(shapes_dir: Path) -> None:
    shards = sorted(p.name for p in shapes_dir.glob("*.tar"))
    assert shards == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    assert not list(shapes_dir.rglob("*.tmp"))
    samples = all_samples(shapes_dir)
    assert sorted(samples) == [f"{i:09d}" for i in range(700)]
    # balanced shard sizes: 700 in 3 shards of at most 300
    assert sorted(len(read_shard(shapes_dir / s)) for s in shards) == [233, 233, 234]
    first = samples["000000000"]
    assert set(first) == {"png", "txt", "json"}
    meta = json.loads(first["json"])
    assert meta["caption"] == first["txt"].decode()
    for field in ("colour", "shape", "position", "center", "extent", "background", "alt_text", "descriptive"):
        assert field in meta
    assert Image.open(io.BytesIO(first["png"])).size == (16, 16)

    info = json.loads((shapes_dir / "dataset.json").read_text())
    assert info["params"]["count"] == 700 and info["params"]["size"] == 16
    assert info["splits"]["train"]["count"] == 700 and info["splits"]["val"]["count"] == 40
    assert len(info["heldout"]) == round(0.2 * 162)
    held = [synthetic.parse_combination(h) for h in info["heldout"]]
    heldout_prompts = (shapes_dir / "prompts_heldout.txt").read_text().splitlines()
    assert heldout_prompts == [synthetic.canonical_prompt(*c) for c in held]
    seen_prompts = (shapes_dir / "prompts_seen.txt").read_text().splitlines()
    assert len(seen_prompts) == 48 and len(set(seen_prompts)) == 48
    assert not set(seen_prompts) & set(heldout_prompts)
    assert len(list((shapes_dir / "val").glob("*.tar"))) == 1


def test_heldout_combinations_never_appear_in_any_split(shapes_dir: Path) -> None:
    held = {
        tuple(synthetic.parse_combination(h))
        for h in json.loads((shapes_dir / "dataset.json").read_text())["heldout"]
    }
    samples = {**all_samples(shapes_dir), **all_samples(shapes_dir / "val")}
    combos = set()
    for sample in samples.values():
        meta = json.loads(sample["json"])
        combos.add((meta["colour"], meta["shape"], meta["position"]))
    assert combos and not combos & held
    assert len(combos) > 100  # the training combinations are all represented


def test_synthetic_writer_is_deterministic(tmp_path: Path) -> None:
    digests = []
    for name in ("a", "b"):
        write_synthetic_shards(tmp_path / name, count=50, size=16, seed=5, progress=False)
        digests.append(hashlib.sha1((tmp_path / name / "shapes-000000.tar").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_writer_removes_everything_when_interrupted(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, samples_per_shard=2) as writer:
        for i in range(5):
            writer.write({"txt": f"caption {i}"})
        assert len(writer.shards) == 2 and list(tmp_path.glob("*.tmp"))
        raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_mix_with_existing_shards(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, count=10, size=16, progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        write_synthetic_shards(tmp_path, count=10, size=16, progress=False)
    write_synthetic_shards(tmp_path, count=10, size=16, seed=3, progress=False, overwrite=True)


def test_folder_source_recursive_with_captions(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    save_image(src / "a.png", (255, 0, 0))
    (src / "a.txt").write_text("a red thing\n")
    save_image(src / "nested" / "deeper" / "b.jpg", (0, 0, 255), size=(50, 80))
    (src / "nested" / "deeper" / "b.txt").write_text("a blue thing")
    summary = write_folder_shards(src, tmp_path / "out", naming="img2dataset", resize=24, progress=False)
    assert summary.count == 2 and [p.name for p in summary.shards] == ["00000.tar"]
    samples = read_shard(tmp_path / "out" / "00000.tar")
    assert [s["txt"].decode() for s in samples.values()] == ["a red thing", "a blue thing"]
    blue = samples["000000001"]
    assert "jpg" in blue and Image.open(io.BytesIO(blue["jpg"])).size == (24, 24)
    meta = json.loads(blue["json"])
    assert meta["source"] == "nested/deeper/b.jpg" and meta["original_height"] == 80


def test_table_sources_csv_and_parquet_with_relative_paths(tmp_path: Path) -> None:
    images = tmp_path / "tables" / "imgs"
    for i in range(3):
        save_image(images / f"{i}.png", (10 * i, 100, 50))
    frame = pd.DataFrame(
        {
            "path": [f"imgs/{i}.png" for i in range(3)],
            "text": ["zero", "one", "two"],
            "score": [0.5, 0.25, 1.0],
        }
    )
    frame.to_csv(tmp_path / "tables" / "list.csv", index=False)
    frame.to_parquet(tmp_path / "tables" / "list.parquet")
    for name in ("list.csv", "list.parquet"):
        out = tmp_path / f"out-{name}"
        write_table_shards(
            tmp_path / "tables" / name,
            out,
            image_col="path",
            caption_col="text",
            samples_per_shard=2,
            progress=False,
        )
        samples = all_samples(out)
        assert [s["txt"].decode() for s in samples.values()] == ["zero", "one", "two"]
        assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
        meta = json.loads(samples["000000001"]["json"])
        assert meta["score"] == 0.25 and meta["source"] == "imgs/1.png"
        # "keep" stores the original bytes
        assert samples["000000002"]["png"] == (images / "2.png").read_bytes()


def _cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main([*argv, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_cli_synthetic_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["synthetic", "--out", str(tmp_path), "--count", "30", "--size", "16", "--holdout",
                 "red circle top left", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and f"wrote 30 samples in 1 shards to {tmp_path}" in out
    assert (tmp_path / "prompts_heldout.txt").read_text() == "a red circle in the top left\n"


def test_cli_bad_inputs_exit_2_with_one_line_and_no_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, line = _cli(tmp_path, capsys, "folder", str(tmp_path / "missing"), "--out", str(out))
    assert code == 2 and line.startswith("error: ") and "does not exist" in line

    src = tmp_path / "src"
    save_image(src / "good.png", (1, 2, 3))
    (src / "good.txt").write_text("fine")
    (src / "bad.png").write_bytes(b"this is not a png")
    (src / "bad.txt").write_text("broken")
    code, line = _cli(tmp_path, capsys, "folder", str(src), "--out", str(out), "--samples-per-shard", "1")
    assert code == 2 and "cannot read image" in line and "bad.png" in line
    assert not list(out.glob("*.tar*"))  # neither finished shards nor temporaries survive

    code, _ = _cli(tmp_path, capsys, "folder", str(src), "--out", str(out), "--skip-bad")
    assert code == 0 and len(all_samples(out)) == 1

    table = tmp_path / "t.csv"
    pd.DataFrame({"image": ["src/good.png"], "caption": ["x"]}).to_csv(table, index=False)
    code, line = _cli(
        tmp_path, capsys, "table", str(table), "--out", str(tmp_path / "o2"), "--caption-col", "text"
    )
    assert code == 2 and "no column 'text'" in line and "--caption-col" in line
    assert not list((tmp_path / "o2").glob("*.tar*"))


def test_cli_help_documents_every_source() -> None:
    for source in ("synthetic", "folder", "table"):
        with pytest.raises(SystemExit) as exit_info:
            main([source, "--help"])
        assert exit_info.value.code == 0
    proc = subprocess.run(
        [sys.executable, "-m", "t2i_train.shards", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "synthetic" in proc.stdout and "table" in proc.stdout


def test_center_pixel_survives_png_roundtrip(shapes_dir: Path) -> None:
    sample = next(iter(read_shard(shapes_dir / "shapes-000000.tar").values()))
    meta = json.loads(sample["json"])
    pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    cx, cy = meta["center"]
    probe_y = cy + (meta["extent"] / 6 if meta["shape"] == "triangle" else 0)
    assert tuple(pixels[int(probe_y), int(cx)]) == tuple(meta["rgb"])
