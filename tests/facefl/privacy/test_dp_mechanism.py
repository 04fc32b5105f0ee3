"""DP-FedAvg's clipping and noise on tiny arrays with hand-computed answers (the server's composition of
them, privacy.dp_delta, is tested in tests/server_api/test_dp_aggregation.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facefl.privacy import dp


def test_clip_factor_is_min_one_and_c_over_norm() -> None:
    assert dp.clip_factor(5.0, 1.0) == pytest.approx(0.2)
    assert dp.clip_factor(0.5, 1.0) == 1.0
    assert dp.clip_factor(0.0, 1.0) == 1.0
    assert dp.clip_factors([3.0, 1.0, 10.0], 2.0) == pytest.approx([2 / 3, 1.0, 0.2])
    for bad_norm, bad_clip in [(float("nan"), 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, float("inf"))]:
        with pytest.raises(ValueError):
            dp.clip_factor(bad_norm, bad_clip)


def test_noise_std_of_the_mean_is_z_c_over_n() -> None:
    assert dp.noise_std_of_mean(2.0, 1.5, 3) == pytest.approx(1.0)
    assert dp.noise_std_of_mean(2.0, 0.0, 3) == 0.0
    with pytest.raises(ValueError):
        dp.noise_std_of_mean(1.0, 1.0, 0)


def test_noise_has_the_stated_standard_deviation() -> None:
    # 200,000 coordinates: the sample std is within 1% of the true one with overwhelming probability
    # (its relative standard error is 1 / sqrt(2 * 200000) = 0.16%)
    zeros = {"a": np.zeros((400, 250), np.float32), "b": np.zeros(100_000, np.float32)}
    noisy = dp.add_gaussian_noise(zeros, 0.3, dp.secure_rng())
    values = np.concatenate([noisy["a"].ravel(), noisy["b"].ravel()]).astype(np.float64)
    assert values.std() == pytest.approx(0.3, rel=0.01)
    assert abs(values.mean()) < 0.3 * 5 / math.sqrt(values.size)
    assert not np.any(zeros["a"])  # the input is left alone


def test_two_generators_draw_different_noise() -> None:
    zeros = {"a": np.zeros(16, np.float32)}
    a = dp.add_gaussian_noise(zeros, 1.0, dp.secure_rng())["a"]
    b = dp.add_gaussian_noise(zeros, 1.0, dp.secure_rng())["a"]
    assert not np.array_equal(a, b)


def test_running_variances_are_clamped_at_zero_and_nothing_else() -> None:
    weights = {
        "bn.running_var": np.array([-0.1, 0.5], np.float32),
        "bn.running_mean": np.array([-0.1, 0.5], np.float32),
        "conv.weight": np.array([-2.0], np.float32),
    }
    out = dp.clamp_running_variances(weights)
    assert np.array_equal(out["bn.running_var"], [0.0, 0.5])
    assert out["bn.running_mean"] is weights["bn.running_mean"]
    assert out["conv.weight"] is weights["conv.weight"]
