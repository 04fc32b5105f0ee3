"""Robust aggregation on tiny tensors with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from facefl.algorithms.robust import clip_by_norm, clip_scale, trim_count, trimmed_mean, trimmed_mean_tensors


def test_clip_scale_and_clip_by_norm() -> None:
    assert clip_scale(2.0, 5.0) == 1.0 and clip_scale(5.0, 5.0) == 1.0
    assert clip_scale(10.0, 5.0) == 0.5
    # global norm of {a: [3], b: [4]} is 5; clipped to 1 -> [0.6], [0.8]
    out = clip_by_norm({"a": np.array([3.0]), "b": np.array([4.0])}, 1.0)
    np.testing.assert_allclose(out["a"], [0.6], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0.8], rtol=1e-6)
    same = clip_by_norm({"a": np.array([0.3, 0.4])}, 1.0)  # norm 0.5: untouched
    np.testing.assert_allclose(same["a"], [0.3, 0.4], rtol=1e-6)
    with pytest.raises(ValueError):
        clip_scale(1.0, 0.0)
    with pytest.raises(ValueError):
        clip_scale(float("nan"), 1.0)


def test_trim_count() -> None:
    assert trim_count(5, 0.2) == 1 and trim_count(4, 0.2) == 0 and trim_count(10, 0.25) == 2
    assert trim_count(3, 0.0) == 0
    with pytest.raises(ValueError):
        trim_count(4, 0.5)


def test_trimmed_mean_drops_extremes_per_coordinate() -> None:
    values = [
        np.array([1.0, 10.0]),
        np.array([2.0, -100.0]),  # an outlier in coordinate 1
        np.array([3.0, 20.0]),
        np.array([1000.0, 30.0]),  # an outlier in coordinate 0
        np.array([4.0, 40.0]),
    ]
    # coordinate 0 sorted: 1 2 3 4 1000 -> drop 1 and 1000 -> mean(2, 3, 4) = 3
    # coordinate 1 sorted: -100 10 20 30 40 -> drop -100 and 40 -> mean(10, 20, 30) = 20
    np.testing.assert_allclose(trimmed_mean(values, 1), [3.0, 20.0])
    np.testing.assert_allclose(trimmed_mean(values, 0), [202.0, 0.0])  # plain mean
    np.testing.assert_allclose(trimmed_mean(values, 2), [3.0, 20.0])  # the median for n = 5
    with pytest.raises(ValueError):
        trimmed_mean(values, 3)


def test_trimmed_mean_tensors_one_tensor_at_a_time_with_scales() -> None:
    reports = [
        {"w": np.array([[1.0, 2.0]]), "b": np.array([0.0])},
        {"w": np.array([[3.0, 4.0]]), "b": np.array([6.0])},
        {"w": np.array([[5.0, 6.0]]), "b": np.array([3.0])},
    ]
    loads: list[tuple[int, str]] = []

    def load(i: int, name: str) -> np.ndarray:
        loads.append((i, name))
        return reports[i][name]

    out = trimmed_mean_tensors(["w", "b"], load, n=3, trim=1, scales=[1.0, 1.0, 0.5])
    # w scaled: [1,2], [3,4], [2.5,3] -> medians [2.5, 3]; b scaled: 0, 6, 1.5 -> median 1.5
    np.testing.assert_allclose(out["w"], [[2.5, 3.0]])
    np.testing.assert_allclose(out["b"], [1.5])
    assert out["w"].dtype == np.float32
    # all reports of one tensor are read before the next tensor: memory O(n x largest tensor)
    assert loads == [(0, "w"), (1, "w"), (2, "w"), (0, "b"), (1, "b"), (2, "b")]
