"""Identity partitioning across devices and per-identity train/test splits."""

from __future__ import annotations

import numpy as np
import pytest

from facefl.data import partition_identities, split_train_test


def test_partition_is_disjoint_sized_and_deterministic() -> None:
    ids = list(range(100, 150))
    parts = partition_identities(ids, num_devices=6, ids_per_device=8, seed=3)
    assert len(parts) == 6 and all(len(p) == 8 for p in parts)
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == 48 and set(flat) <= set(ids)
    assert parts == partition_identities(ids, 6, 8, seed=3)
    assert parts != partition_identities(ids, 6, 8, seed=4)
    assert all(p == sorted(p) for p in parts)  # input order kept within a device


def test_partition_strings_and_exact_fit() -> None:
    names = ["carol", "alice", "bob", "dave"]
    parts = partition_identities(names, num_devices=2, ids_per_device=2, seed=0)
    assert sorted(n for p in parts for n in p) == sorted(names)
    assert all(isinstance(n, str) for p in parts for n in p)


def test_partition_errors() -> None:
    with pytest.raises(ValueError, match=r"not enough identities: 3 devices x 4 identities = 12 needed, 10"):
        partition_identities(list(range(10)), 3, 4, seed=0)
    with pytest.raises(ValueError, match="positive"):
        partition_identities(list(range(10)), 0, 4, seed=0)
    with pytest.raises(ValueError, match="distinct"):
        partition_identities([1, 1, 2], 1, 2, seed=0)


def test_split_train_test_per_identity() -> None:
    labels = np.repeat(np.arange(5), [10, 10, 4, 1, 7])
    labels = labels[np.random.default_rng(0).permutation(len(labels))]
    train, test = split_train_test(labels, test_fraction=0.3, seed=1)
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    for label, n in zip(range(5), [10, 10, 4, 1, 7], strict=True):
        n_test = int((labels[test] == label).sum())
        assert n_test == min(round(n * 0.3), n - 1)
        assert (labels[train] == label).sum() >= 1
    again = split_train_test(labels, 0.3, seed=1)
    np.testing.assert_array_equal(again[0], train)
    assert not np.array_equal(split_train_test(labels, 0.3, seed=2)[1], test)


def test_split_min_train_and_errors() -> None:
    labels = np.repeat(np.arange(3), 5)
    train, test = split_train_test(labels, 0.8, seed=0, min_train=3)
    assert all((labels[train] == k).sum() == 3 for k in range(3)) and len(test) == 6
    train, test = split_train_test(labels, 0.0, seed=0)
    assert len(test) == 0 and len(train) == 15
    with pytest.raises(ValueError, match="test_fraction"):
        split_train_test(labels, 1.0, seed=0)
    with pytest.raises(ValueError, match="fewer than min_train"):
        split_train_test(labels, 0.2, seed=0, min_train=6)
    with pytest.raises(ValueError, match="1-D"):
        split_train_test(labels.reshape(3, 5), 0.2, seed=0)
    empty_train, empty_test = split_train_test(np.zeros(0, np.int64), 0.5, seed=0)
    assert empty_train.size == 0 and empty_test.size == 0
