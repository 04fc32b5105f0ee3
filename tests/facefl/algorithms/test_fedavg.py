import numpy as np
import pytest

from facefl.algorithms.fedavg import WeightedMean, fedavg


def test_weighted_mean_hand_computed() -> None:
    # (1*[1,2] + 3*[5,6]) / 4 = [4, 5]; (1*10 + 3*20) / 4 = 17.5
    out = fedavg(
        [
            ({"w": np.array([1.0, 2.0], np.float32), "b": np.array([10.0], np.float32)}, 1.0),
            ({"w": np.array([5.0, 6.0], np.float32), "b": np.array([20.0], np.float32)}, 3.0),
        ]
    )
    np.testing.assert_allclose(out["w"], [4.0, 5.0])
    np.testing.assert_allclose(out["b"], [17.5])
    assert out["w"].dtype == np.float32


def test_streaming_consumes_a_generator_lazily() -> None:
    seen: list[int] = []

    def gen():
        for i in range(5):
            seen.append(i)
            yield {"w": np.full(3, float(i), np.float32)}, 1.0

    out = fedavg(gen())
    np.testing.assert_allclose(out["w"], np.full(3, 2.0))
    assert seen == [0, 1, 2, 3, 4]


def test_float64_accumulation_keeps_precision() -> None:
    acc = WeightedMean()
    acc.add({"w": np.array([1e8], np.float32)}, 1.0)
    for _ in range(1000):
        acc.add({"w": np.array([1.0], np.float32)}, 1.0)
    # float32 running sums would lose the small terms entirely
    assert acc.result(np.float64)["w"][0] == pytest.approx((1e8 + 1000) / 1001)


def test_mismatches_and_bad_weights_raise() -> None:
    acc = WeightedMean()
    acc.add({"w": np.zeros(2, np.float32)}, 1.0)
    with pytest.raises(ValueError, match="names"):
        acc.add({"v": np.zeros(2, np.float32)}, 1.0)
    with pytest.raises(ValueError, match="shape"):
        acc.add({"w": np.zeros(3, np.float32)}, 1.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="weight"):
            acc.add({"w": np.zeros(2, np.float32)}, bad)
    with pytest.raises(ValueError, match="no updates"):
        WeightedMean().result()


def test_weighted_mean_scales_in_float64_so_large_finite_updates_stay_finite() -> None:
    # NumPy 2 would evaluate float32 * weight in float32 before storing: 1e38 * 10 = inf
    acc = WeightedMean()
    acc.add({"w": np.full(3, 0.001, np.float32)}, 10.0)
    acc.add({"w": np.full(3, 1e38, np.float32)}, 10.0)
    out = acc.result()["w"]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, np.full(3, (0.001 * 10 + 1e38 * 10) / 20), rtol=1e-6)
