"""Splitting identities across simulated devices and samples into train / test."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T", int, str)


def partition_identities(
    identities: Sequence[T], num_devices: int, ids_per_device: int, seed: int
) -> list[list[T]]:
    """Give each device ``ids_per_device`` identities, disjoint across devices, chosen at random.

    Disjointness models cross-silo / cross-device face recognition: a person's photos live on one phone.
    Deterministic in ``seed``; each device's list keeps the input order of its identities.
    """
    if num_devices <= 0 or ids_per_device <= 0:
        raise ValueError(
            f"num_devices and ids_per_device must be positive, got {num_devices}, {ids_per_device}"
        )
    if len(set(identities)) != len(identities):
        raise ValueError("identities must be distinct")
    needed = num_devices * ids_per_device
    if needed > len(identities):
        raise ValueError(
            f"not enough identities: {num_devices} devices x {ids_per_device} identities = {needed} needed, "
            f"{len(identities)} available"
        )
    order = np.random.default_rng(seed).permutation(len(identities))[:needed]
    out: list[list[T]] = []
    for d in range(num_devices):
        chosen = np.sort(order[d * ids_per_device : (d + 1) * ids_per_device])
        out.append([identities[int(i)] for i in chosen])
    return out


def held_out_count(n: int, test_fraction: float, min_train: int = 1) -> int:
    """How many of an identity's ``n`` images :func:`split_train_test` holds out for testing."""
    return min(round(n * test_fraction), n - min_train)


def split_train_test(
    labels: np.ndarray,
    test_fraction: float,
    seed: int,
    min_train: int = 1,
    label_keys: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-identity split of sample indices into (train, test), both sorted int64 arrays.

    Each identity with n samples puts ``round(n * test_fraction)`` of them in test, but never so many
    that fewer than ``min_train`` remain for training (an identity must be learnable on the device).
    With ``label_keys`` (a stable key per label, e.g. a hash of the identity's name) each identity's
    split depends on ``seed`` and its key only, not on which other identities share the array: the same
    person gets the same test images whether a device holds it alone or with others.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if min_train < 0:
        raise ValueError(f"min_train must be non-negative, got {min_train}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        if len(idx) < min_train:
            raise ValueError(f"identity {label} has {len(idx)} samples, fewer than min_train={min_train}")
        n_test = held_out_count(len(idx), test_fraction, min_train)
        if label_keys is not None:
            idx = np.random.default_rng([seed, int(label_keys[int(label)])]).permutation(idx)
        else:
            idx = rng.permutation(idx)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    if not train:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)
