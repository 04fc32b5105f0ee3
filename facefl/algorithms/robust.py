"""Robust aggregation: update norm clipping and the coordinate-wise trimmed mean (pure NumPy functions).

Norm clipping scales an update whose global L2 norm exceeds ``max_norm`` down to ``max_norm`` (direction
kept), bounding what any single device can move the model; it composes with the streaming weighted mean,
so memory stays O(model).

The coordinate-wise trimmed mean (Yin et al., "Byzantine-robust distributed learning", ICML 2018) drops,
for every coordinate independently, the ``k`` smallest and ``k`` largest of the ``n`` reported values and
averages the remaining ``n - 2k`` (unweighted: a device's sample count is its own claim, and weighting by
it would hand an attacker the trimming). It tolerates up to ``k`` arbitrary reports. Unlike the mean it
cannot be computed in one streaming pass, because every coordinate needs all ``n`` values at once:
holding whole models would cost O(n x model). :func:`trimmed_mean_tensors` therefore works one tensor at
a time, so peak memory is O(n x largest tensor) (plus the result, O(model)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

TensorDict = dict[str, np.ndarray]


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor that brings an update of L2 norm ``norm`` within ``max_norm`` (1.0 when it already is)."""
    if max_norm <= 0 or not math.isfinite(max_norm):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm}")
    if not math.isfinite(norm) or norm < 0:
        raise ValueError(f"norm must be a finite non-negative number, got {norm}")
    return 1.0 if norm <= max_norm else max_norm / norm


def clip_by_norm(tensors: Mapping[str, np.ndarray], max_norm: float, norm: float | None = None) -> TensorDict:
    """``tensors`` scaled so that their global L2 norm is at most ``max_norm`` (float32 copies)."""
    if norm is None:
        norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in tensors.values()))
    scale = clip_scale(norm, max_norm)
    return {k: (np.asarray(v, np.float64) * scale).astype(np.float32) for k, v in tensors.items()}


def trim_count(n: int, trim_fraction: float) -> int:
    """k = floor(trim_fraction * n) values dropped at each end; at least one value always remains."""
    if n < 1:
        raise ValueError("need at least one report")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return math.floor(trim_fraction * n + 1e-9)


def trimmed_mean(values: Sequence[np.ndarray], trim: int) -> np.ndarray:
    """Coordinate-wise mean of ``values`` (same shapes) after dropping the ``trim`` lowest and highest."""
    n = len(values)
    if n == 0:
        raise ValueError("need at least one value")
    if trim < 0 or n - 2 * trim < 1:
        raise ValueError(f"cannot trim {trim} from each end of {n} values")
    stack = np.stack([np.asarray(v, np.float64) for v in values])  # (n, *shape): O(n x tensor)
    if trim:
        stack.sort(axis=0)  # in place, per coordinate
        stack = stack[trim : n - trim]
    return np.asarray(stack.mean(axis=0), np.float32)


def trimmed_mean_tensors(
    names: Iterable[str],
    load: Callable[[int, str], np.ndarray],
    n: int,
    trim: int,
    scales: Sequence[float] | None = None,
) -> TensorDict:
    """Trimmed mean of ``n`` reports, one tensor at a time: ``load(i, name)`` reads report ``i``'s tensor.

    ``scales`` (e.g. clipping factors) multiply each report before trimming. Peak memory is
    O(n x largest tensor), never O(n x model).
    """
    if scales is not None and len(scales) != n:
        raise ValueError("one scale per report")
    out: TensorDict = {}
    for name in names:
        column = [
            np.asarray(load(i, name), np.float64) * (scales[i] if scales is not None else 1.0)
            for i in range(n)
        ]
        out[name] = trimmed_mean(column, trim)
    return out
