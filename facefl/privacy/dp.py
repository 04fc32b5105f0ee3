"""The DP-FedAvg mechanism (McMahan et al., ICLR 2018) as pure NumPy functions.

A round's released delta is ``(sum_i c_i x_i + N(0, (z C)^2 I)) / n``: every update ``x_i`` is scaled by
``c_i = min(1, C / ||x_i||)`` so that its global L2 norm is at most ``C`` (the clip norm), the ``n``
clipped updates are summed with equal weight, Gaussian noise of standard deviation ``z C`` (``z``: the
noise multiplier) is added to every coordinate of the sum, and the result is divided by ``n``.

Why equal weights: adding or removing one device changes the sum by at most ``C`` in L2 norm, whatever
its data; in a mean weighted by ``num_samples`` a device's share would depend on a number it chose, so
the sensitivity, and with it the noise needed, would not be bounded by ``C``.

What is clipped and noised: every tensor of the update, i.e. every float tensor the device trained
(with a task's ``trainable``, only those), BatchNorm running statistics included: they are computed
from the device's images, so releasing them without noise would leak them. Non-float buffers
(``num_batches_tracked``) are never part of a model or an update (``facefl.models.state_to_numpy``).
Noise can push a running variance below zero, which would make the model's output NaN; clamping it at
zero afterwards (:func:`clamp_running_variances`) is post-processing and costs no privacy.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence

import numpy as np

TensorDict = dict[str, np.ndarray]

#: name suffix of a normalization layer's running variance (PyTorch's BatchNorm buffers)
_RUNNING_VAR = "running_var"


def clip_factor(norm: float, clip_norm: float) -> float:
    """``min(1, C / norm)``: the factor that brings an update of L2 norm ``norm`` within ``C``."""
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm}")
    if not (norm >= 0 and math.isfinite(norm)):
        raise ValueError(f"norm must be a finite number >= 0, got {norm}")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def clip_factors(norms: Sequence[float], clip_norm: float) -> list[float]:
    """One :func:`clip_factor` per update norm."""
    return [clip_factor(float(norm), clip_norm) for norm in norms]


def noise_std_of_mean(clip_norm: float, noise_multiplier: float, reports: int) -> float:
    """Standard deviation of the noise on each coordinate of the released mean: ``z C / n`` (the sum
    carries ``z C``; dividing by ``n`` scales it)."""
    if reports < 1:
        raise ValueError(f"need at least one report, got {reports}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    return noise_multiplier * clip_norm / reports


def secure_rng() -> np.random.Generator:
    """A generator seeded with 128 bits from the operating system's CSPRNG (``secrets``): the noise must
    be unpredictable, so never the task's seed."""
    return np.random.default_rng(secrets.randbits(128))


def add_gaussian_noise(tensors: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> TensorDict:
    """``tensors`` plus independent N(0, std^2) noise on every coordinate, as float32 (new arrays; one
    tensor's noise in memory at a time, so O(largest tensor) beyond the result)."""
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"std must be a finite number >= 0, got {std}")
    out: TensorDict = {}
    for name, value in tensors.items():
        arr = np.array(value, np.float32)  # a copy: the caller's arrays stay as they were
        if std > 0:
            noise = rng.standard_normal(arr.shape, dtype=np.float32)
            noise *= np.float32(std)
            arr += noise
        out[name] = arr
    return out


def clamp_running_variances(weights: Mapping[str, np.ndarray]) -> TensorDict:
    """``weights`` with every running variance clamped at 0 (noise may have made one negative)."""
    return {
        name: np.maximum(value, np.float32(0)) if name.rsplit(".", 1)[-1] == _RUNNING_VAR else value
        for name, value in weights.items()
    }
