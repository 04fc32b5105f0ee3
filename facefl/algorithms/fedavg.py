"""FedAvg (McMahan et al., 2017) as a streaming weighted mean.

The accumulator holds one float64 buffer per tensor, so memory is O(model) whatever the number of
updates: the server feeds updates one at a time as it reads them from the blob store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

TensorDict = dict[str, np.ndarray]


class WeightedMean:
    """Running sum_i w_i * x_i / sum_i w_i over named tensors with identical names and shapes."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._scratch = np.empty(0, np.float64)  # reused: one weighted copy at a time, no per-add temporaries
        self._total_weight = 0.0
        self.count = 0

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        if not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight must be a positive finite number, got {weight}")
        if self._sums and tensors.keys() != self._sums.keys():
            raise ValueError("update tensor names differ from the first update's")
        for name, value in tensors.items():
            arr = np.asarray(value)
            acc = self._sums.get(name)
            if acc is None:
                self._sums[name] = arr.astype(np.float64) * weight
            else:
                if acc.shape != arr.shape:
                    raise ValueError(f"tensor {name!r}: shape {arr.shape} != {acc.shape}")
                if self._scratch.size < arr.size:
                    self._scratch = np.empty(arr.size, np.float64)
                weighted = self._scratch[: arr.size].reshape(arr.shape)
                # dtype=float64 makes NumPy compute in float64: without it NumPy 2 multiplies in the input's
                # float32 and only then stores, so 3e38 * 10 would already be inf
                np.multiply(arr, weight, out=weighted, dtype=np.float64)
                acc += weighted
        self._total_weight += float(weight)
        self.count += 1

    def result(self, dtype: np.dtype | type = np.float32) -> TensorDict:
        if self.count == 0:
            raise ValueError("no updates were added")
        return {name: (acc / self._total_weight).astype(dtype) for name, acc in self._sums.items()}


def fedavg(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> TensorDict:
    """Weighted mean of (tensors, weight) pairs, consumed lazily from any iterable."""
    acc = WeightedMean()
    for tensors, weight in updates:
        acc.add(tensors, weight)
    return acc.result()
