import itertools

import pytest

from facefl.secagg import shamir
from facefl.secagg.shamir import PRIME, ShamirError, Share


def test_hand_checked_polynomial() -> None:
    # f(x) = 7 + 3x over the field: points (1, 10), (2, 13), (3, 16); any two give 7.
    points = [Share(1, 10), Share(2, 13), Share(3, 16)]
    for pair in itertools.combinations(points, 2):
        assert shamir.reconstruct(pair, threshold=2) == 7
    assert shamir.reconstruct(points, threshold=2) == 7


def test_negative_coefficient_wraps_in_the_field() -> None:
    # f(x) = 5 - x: f(1) = 4, f(2) = 3, and f(6) = -1 = PRIME - 1
    assert shamir.reconstruct([Share(2, 3), Share(6, PRIME - 1)], threshold=2) == 5


@pytest.mark.parametrize(("n", "t"), [(1, 1), (3, 2), (5, 3), (9, 5)])
def test_any_threshold_subset_reconstructs(n: int, t: int) -> None:
    secret = bytes(range(32))
    shares = shamir.split_bytes(secret, n=n, threshold=t)
    for subset in itertools.combinations(shares, t):
        assert shamir.reconstruct_bytes(subset, threshold=t) == secret


def test_below_threshold_is_refused_and_a_lower_degree_guess_is_wrong() -> None:
    secret = 123456789
    shares = shamir.split(secret, n=5, threshold=3)
    with pytest.raises(ShamirError, match="need 3 shares"):
        shamir.reconstruct(shares[:2], threshold=3)
    # Interpolating two shares as if the threshold were 2 gives a value other than the secret (the
    # polynomial has degree 2 with overwhelming probability: its top coefficient is random).
    assert shamir.reconstruct(shares[:2], threshold=2) != secret


def test_inconsistent_extra_share_is_detected() -> None:
    shares = shamir.split(42, n=4, threshold=2)
    bad = [*shares[:3], Share(shares[3].x, (shares[3].y + 1) % PRIME)]
    with pytest.raises(ShamirError, match="inconsistent"):
        shamir.reconstruct(bad, threshold=2)


def test_malformed_inputs() -> None:
    with pytest.raises(ShamirError, match="duplicate"):
        shamir.reconstruct([Share(1, 1), Share(1, 2)], threshold=2)
    with pytest.raises(ShamirError):
        shamir.reconstruct([Share(0, 1)], threshold=1)
    with pytest.raises(ShamirError):
        shamir.split(PRIME, n=2, threshold=1)
    with pytest.raises(ShamirError):
        shamir.split(1, n=2, threshold=3)
    with pytest.raises(ShamirError, match="66 bytes"):
        Share.from_bytes(1, b"\x00" * 65)
    with pytest.raises(ShamirError, match="outside"):
        Share.from_bytes(1, b"\xff" * 66)
    with pytest.raises(ShamirError):
        shamir.split_bytes(b"short", n=2, threshold=1)


def test_share_bytes_round_trip() -> None:
    s = shamir.split(99, n=3, threshold=2)[1]
    assert Share.from_bytes(s.x, s.y_bytes()) == s
