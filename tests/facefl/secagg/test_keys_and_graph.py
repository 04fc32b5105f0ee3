import pytest

from facefl.secagg import graph, keys


def test_encrypt_round_trip_and_tamper() -> None:
    a, b = keys.KeyPair.generate(), keys.KeyPair.generate()
    k_ab = keys.derive_key(a.private, b.public, round_id=1, purpose=b"share")
    assert k_ab == keys.derive_key(b.private, a.public, round_id=1, purpose=b"share")
    assert k_ab != keys.derive_key(a.private, b.public, round_id=1, purpose=b"pairwise-mask")
    ct = keys.encrypt(k_ab, b"hello", associated=b"ad")
    assert keys.decrypt(k_ab, ct, associated=b"ad") == b"hello"
    with pytest.raises(keys.KeyError_):
        keys.decrypt(k_ab, ct, associated=b"other")
    with pytest.raises(keys.KeyError_):
        keys.decrypt(k_ab, ct[:-1] + bytes([ct[-1] ^ 1]), associated=b"ad")
    with pytest.raises(keys.KeyError_):
        keys.decrypt(k_ab, b"short", associated=b"ad")


def test_hostile_public_keys() -> None:
    a = keys.KeyPair.generate()
    with pytest.raises(keys.KeyError_):
        keys.derive_key(a.private, b"\x00" * 31, round_id=1, purpose=b"x")
    with pytest.raises(keys.KeyError_):  # the all-zero point gives an all-zero shared secret
        keys.derive_key(a.private, b"\x00" * 32, round_id=1, purpose=b"x")
    assert keys.public_from_private(a.private) == a.public


def test_thresholds() -> None:
    assert [graph.threshold_for(d) for d in (1, 2, 3, 4, 9)] == [1, 2, 2, 3, 5]


def test_small_cohort_is_complete() -> None:
    g = graph.neighbours(["c", "a", "b"], seed=1, max_degree=4)
    assert g == {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}}


def test_large_cohort_is_regular_symmetric_and_seeded() -> None:
    members = [f"d{i:02d}" for i in range(20)]
    g = graph.neighbours(members, seed=7, max_degree=6)
    assert all(len(v) == 6 and m not in v for m, v in g.items())
    assert all(m in g[v] for m, vs in g.items() for v in vs)
    assert g == graph.neighbours(list(reversed(members)), seed=7, max_degree=6)
    assert g != graph.neighbours(members, seed=8, max_degree=6)


def test_graph_refusals() -> None:
    with pytest.raises(ValueError):
        graph.neighbours(["a", "a"], seed=1, max_degree=4)
    with pytest.raises(ValueError):
        graph.neighbours(["a", "b"], seed=1, max_degree=1)
