"""Linear probes of frozen features (t2i_train.metrics.state_probe): they read what is there and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from t2i_train.data.shards import write_synthetic_shards
from t2i_train.metrics.state_probe import gill_state_probes, probe_accuracy
from tests.helpers import compose_train


def test_features_that_hold_the_label_are_read_and_noise_is_not() -> None:
    labels = [("red", "blue", "green")[i % 3] for i in range(300)]
    noise = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    holding = noise.clone()
    holding[:, 0] += torch.tensor([8.0 * ("red", "blue", "green").index(label) for label in labels])
    assert probe_accuracy(holding, labels) > 0.95
    assert probe_accuracy(noise, labels) < 0.6  # chance is 1/3


def test_too_few_rows_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 10 labelled"):
        probe_accuracy(torch.randn(5, 4), ["a"] * 5)


def test_a_gill_is_probed_on_its_lm_states_and_its_clip(tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path, count=60, size=32, seed=2, samples_per_shard=60, progress=False)
    gill = instantiate(compose_train(["model=gill"]).model, _convert_="all").eval()
    result = gill_state_probes(gill, [str(tmp_path)], count=60, batch_size=30)
    assert set(result) == {"img0", "img_all", "clip"}
    for scores in result.values():
        assert set(scores) == {"colour", "shape", "position"} and all(0 <= v <= 1 for v in scores.values())
