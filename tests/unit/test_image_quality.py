import math

import pytest
import torch

from t2i_train.metrics.image_quality import psnr


def test_psnr_matches_hand_computation() -> None:
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 20 dB at range 1
    y[1, :, :2] += 0.5  # half the pixels off by 0.5: MSE 0.125 -> 10*log10(8) dB
    result = psnr(y, x)
    expected = [20.0, 10 * math.log10(8)]
    assert result.per_image.tolist() == pytest.approx(expected, abs=1e-4)
    assert result.mean == pytest.approx(sum(expected) / 2, abs=1e-4)


def test_psnr_data_range_and_single_image() -> None:
    x = torch.rand(3, 8, 8)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    mse = float(((x - y) ** 2).mean())
    assert psnr(x, y).mean == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)
    # The same images on a [-1, 1] scale with data_range 2 give the same PSNR.
    assert psnr(2 * x - 1, 2 * y - 1, data_range=2.0).mean == pytest.approx(psnr(x, y).mean, abs=1e-3)
    # uint8-scale values with data_range 255.
    assert psnr(255 * x, 255 * y, data_range=255.0).mean == pytest.approx(psnr(x, y).mean, abs=1e-3)


def test_psnr_identical_is_inf_and_shapes_checked() -> None:
    x = torch.rand(2, 3, 4, 4)
    assert math.isinf(psnr(x, x).mean)
    with pytest.raises(ValueError):
        psnr(x, x[:1])
