import numpy as np
import pytest

from facefl.secagg import fixedpoint, keys, masks


def test_prg_is_deterministic_and_seed_dependent() -> None:
    a = masks.prg(b"\x01" * 32, 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.array_equal(a, masks.prg(b"\x01" * 32, 1000))
    assert not np.array_equal(a, masks.prg(b"\x02" * 32, 1000))
    assert np.array_equal(masks.prg(b"\x01" * 32, 10), a[:10])  # a prefix of the same stream
    assert not np.array_equal(masks.self_mask(b"\x01" * 32, 10), masks.pairwise_mask(b"\x01" * 32, 10))


def test_pairwise_seeds_agree_and_depend_on_the_round() -> None:
    u, v = keys.KeyPair.generate(), keys.KeyPair.generate()
    s_uv = masks.pairwise_seed(u.private, v.public, round_id=3)
    assert s_uv == masks.pairwise_seed(v.private, u.public, round_id=3)
    assert s_uv != masks.pairwise_seed(u.private, v.public, round_id=4)


def test_pairwise_masks_cancel_exactly_in_integers() -> None:
    ids = ["a", "b", "c", "d"]
    kp = {i: keys.KeyPair.generate() for i in ids}
    x = {i: np.arange(5, dtype=np.uint32) * (k + 1) for k, i in enumerate(ids)}  # a: 0..4, b: 0,2,..
    total = np.zeros(5, dtype=np.uint32)
    for u in ids:
        masked = x[u].copy()
        for v in ids:
            if v != u:
                seed = masks.pairwise_seed(kp[u].private, kp[v].public, round_id=1)
                masked += masks.signed_pairwise_mask(u, v, seed, 5)
        assert not np.array_equal(masked, x[u])
        total += masked
    assert total.tolist() == [0, 10, 20, 30, 40]  # (1 + 2 + 3 + 4) * i


def test_signed_masks_of_a_pair_sum_to_zero_modulo_2_32() -> None:
    seed = b"\x07" * 32
    plus = masks.signed_pairwise_mask("a", "b", seed, 8).astype(np.uint64)
    minus = masks.signed_pairwise_mask("b", "a", seed, 8).astype(np.uint64)
    assert ((plus + minus) % (1 << 32)).tolist() == [0] * 8


def test_quantize_hand_checked() -> None:
    q = fixedpoint.quantize(np.array([1.0, -1.0, 0.26, 100.0]), scale=4.0, bound=2.0)
    assert q.tolist() == [4, (1 << 32) - 4, 1, 8]  # 0.26 * 4 = 1.04 -> 1; 100 clamps to 2 -> 8
    assert fixedpoint.dequantize(q, scale=4.0).tolist() == [1.0, -1.0, 0.25, 2.0]


def test_clip() -> None:
    assert fixedpoint.clip(np.array([3.0, 4.0]), 10.0).tolist() == [3.0, 4.0]
    assert fixedpoint.clip(np.array([3.0, 4.0]), 1.0).tolist() == pytest.approx([0.6, 0.8])
    with pytest.raises(ValueError, match="finite"):
        fixedpoint.clip(np.array([np.nan]), 1.0)


def test_extreme_cohort_sum_does_not_wrap() -> None:
    # Every device at the clamp bound in the same coordinate, both signs: the sum is still exact.
    devices, bound = 50, 3.5
    scale = fixedpoint.quantization_scale(max_devices=devices, bound=bound)
    for sign in (1.0, -1.0):
        q = fixedpoint.quantize(np.array([sign * bound]), scale=scale, bound=bound)
        total = np.zeros(1, dtype=np.uint32)
        for _ in range(devices):
            total += q
        got = fixedpoint.dequantize(total, scale=scale)[0]
        assert abs(got - sign * bound * devices) <= fixedpoint.sum_error_bound(devices=devices, scale=scale)


def test_random_sums_within_the_error_bound() -> None:
    rng = np.random.default_rng(0)
    devices, bound = 10, 2.0
    scale = fixedpoint.quantization_scale(max_devices=devices, bound=bound)
    values = rng.uniform(-bound, bound, size=(devices, 1000))
    total = np.zeros(1000, dtype=np.uint32)
    for row in values:
        total += fixedpoint.quantize(row, scale=scale, bound=bound)
    err = np.abs(fixedpoint.dequantize(total, scale=scale) - values.sum(axis=0))
    assert err.max() <= fixedpoint.sum_error_bound(devices=devices, scale=scale)
    assert err.max() > 0  # quantization really happened


def test_scale_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        fixedpoint.quantization_scale(max_devices=0, bound=1.0)
    with pytest.raises(ValueError):
        fixedpoint.quantization_scale(max_devices=2, bound=float("inf"))
