"""Clip, scale and quantize a device's update to integers modulo 2^32 so that the cohort's sum cannot wrap.

Every device clips its delta to L2 norm ``clip_norm``, multiplies it by its weight ``w <= max_weight``,
optionally adds Gaussian noise, and clamps each coordinate to ``[-bound, bound]`` with
``bound = max_weight * clip_norm + NOISE_SIGMAS * noise_stddev`` (a clipped, weighted coordinate is at most
``w * clip_norm`` in absolute value, so the clamp touches only noise beyond NOISE_SIGMAS standard
deviations). It then rounds ``value * scale`` to an integer and keeps it modulo 2^32, with

    scale = (2^31 - 1 - max_devices) / (max_devices * bound)

so that the sum over at most ``max_devices`` devices of values of magnitude ``<= bound * scale + 1/2``
stays below 2^31 in absolute value: read as a signed 32-bit integer it is exact, never wrapped.
Rounding costs at most ``1 / (2 * scale)`` per device and coordinate, so the dequantized sum is within
``devices / (2 * scale)`` of the true sum (:func:`sum_error_bound`).
"""

from __future__ import annotations

import math

import numpy as np

MODULUS_BITS = 32
MODULUS = 1 << MODULUS_BITS
SIGNED_LIMIT = (1 << (MODULUS_BITS - 1)) - 1
NOISE_SIGMAS = 8.0

__all__ = [
    "MODULUS",
    "MODULUS_BITS",
    "NOISE_SIGMAS",
    "clip",
    "coordinate_bound",
    "dequantize",
    "encode_update",
    "plausible_sum",
    "quantization_scale",
    "quantize",
    "sum_error_bound",
]


def coordinate_bound(*, clip_norm: float, max_weight: int, noise_stddev: float) -> float:
    return max_weight * clip_norm + NOISE_SIGMAS * noise_stddev


def quantization_scale(*, max_devices: int, bound: float) -> float:
    if max_devices < 1 or not bound > 0 or not math.isfinite(bound):
        raise ValueError("need max_devices >= 1 and a positive finite bound")
    scale = (SIGNED_LIMIT - max_devices) / (max_devices * bound)
    if not scale > 0:
        raise ValueError("too many devices for 32-bit fixed point")
    return scale


def sum_error_bound(*, devices: int, scale: float) -> float:
    """Largest difference between the dequantized sum of ``devices`` unclamped values and their true sum."""
    return devices / (2.0 * scale)


def clip(values: np.ndarray, clip_norm: float) -> np.ndarray:
    """``values`` scaled down to L2 norm ``clip_norm`` when longer (float64)."""
    v = np.asarray(values, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if not math.isfinite(norm):
        raise ValueError("update is not finite")
    return v * (clip_norm / norm) if norm > clip_norm else v


def quantize(values: np.ndarray, *, scale: float, bound: float) -> np.ndarray:
    """Clamp to ``[-bound, bound]``, round ``value * scale``, and return it modulo 2^32 as uint32."""
    v = np.clip(np.asarray(values, dtype=np.float64), -bound, bound)
    q = np.rint(v * scale).astype(np.int64)
    return (q % MODULUS).astype(np.uint32)


def dequantize(total: np.ndarray, *, scale: float) -> np.ndarray:
    """The signed reading of a wrap-free sum modulo 2^32, divided by ``scale`` (float64)."""
    signed = np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64)
    return signed / scale


def encode_update(
    values: np.ndarray,
    *,
    weight: int,
    clip_norm: float,
    noise_stddev: float,
    scale: float,
    bound: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A device's vector before masking: ``values`` clipped to ``clip_norm``, times ``weight``, plus
    N(0, noise_stddev^2) per coordinate, quantized; the weight appended as the last (exact) element."""
    if weight < 1:
        raise ValueError("weight must be at least 1")
    scaled = clip(values, clip_norm) * weight
    if noise_stddev > 0:
        scaled = scaled + rng.normal(0.0, noise_stddev, size=scaled.shape)
    quantized = quantize(scaled, scale=scale, bound=bound)
    return np.concatenate([quantized, np.array([weight], dtype=np.uint32)])


def plausible_sum(total: np.ndarray, *, devices: int, max_weight: int, scale: float, bound: float) -> bool:
    """Whether an unmasked vector (values, then the total weight) is what ``devices`` honest encodings sum
    to: each value within ``devices * (bound * scale + 1/2)`` and the weight in ``[devices, devices *
    max_weight]``. A mask removed with a wrong share leaves uniform noise, which fails this with
    overwhelming probability (the weight alone: ``devices * max_weight / 2^32``)."""
    signed = np.asarray(total, dtype=np.uint32).view(np.int32)
    weight = int(np.asarray(total, dtype=np.uint32)[-1])
    limit = devices * (bound * scale + 0.5)
    return devices <= weight <= devices * max_weight and bool(
        np.all(np.abs(signed[:-1].astype(np.int64)) <= limit)
    )
