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


def test_encode_update_hand_checked() -> None:
    # [3, 4] has norm 5: clipped to norm 1 -> [0.6, 0.8]; weight 2 -> [1.2, 1.6]; scale 10 -> [12, 16]
    v = fixedpoint.encode_update(
        np.array([3.0, 4.0]),
        weight=2,
        clip_norm=1.0,
        noise_stddev=0.0,
        scale=10.0,
        bound=5.0,
        rng=np.random.default_rng(0),
    )
    assert v.dtype == np.uint32 and v.tolist() == [12, 16, 2]


def test_encode_update_noise_path() -> None:
    """Distributed DP: with noise_stddev > 0 each coordinate gets N(0, sigma^2) before quantization."""
    sigma, n = 0.5, 20_000

    def encode(noise: float) -> np.ndarray:
        return fixedpoint.encode_update(
            np.zeros(n), weight=1, clip_norm=1.0, noise_stddev=noise, scale=1000.0, bound=10.0,
            rng=np.random.default_rng(1),
        )  # fmt: skip

    quiet, noisy = encode(0.0), encode(sigma)
    assert quiet[:-1].tolist() == [0] * n
    noise = fixedpoint.dequantize(noisy[:-1], scale=1000.0)
    # the sample standard deviation of 20,000 draws is within 3 % of sigma with overwhelming probability
    assert abs(noise.std() - sigma) < 0.03 * sigma
    assert abs(noise.mean()) < 0.05
    assert noisy[-1] == 1


def test_plausible_sum_hand_checked() -> None:
    # 2 devices, scale 10, bound 1: each value |v| <= 2 * (10 + 0.5) = 21; weight in [2, 2 * 5]
    def plausible(*values: int) -> bool:
        total = (np.array(values, dtype=np.int64) % (1 << 32)).astype(np.uint32)
        return fixedpoint.plausible_sum(total, devices=2, max_weight=5, scale=10.0, bound=1.0)

    assert plausible(21, -21, 0, 10)
    assert not plausible(22, 0, 10)
    assert not plausible(0, -22, 10)
    assert not plausible(0, 0, 11)
    assert not plausible(0, 0, 1)


def test_a_wrong_mask_makes_the_sum_implausible() -> None:
    honest = fixedpoint.encode_update(
        np.full(2000, 0.01), weight=3, clip_norm=1.0, noise_stddev=0.0, scale=1e4, bound=5.0,
        rng=np.random.default_rng(0),
    )  # fmt: skip

    def plausible(total: np.ndarray) -> bool:
        return fixedpoint.plausible_sum(total, devices=1, max_weight=5, scale=1e4, bound=5.0)

    assert plausible(honest)
    leftover = masks.self_mask(b"\x05" * 32, len(honest))  # a self mask removed with a wrong seed
    assert not plausible(honest + leftover)
