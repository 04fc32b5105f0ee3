"""The recognizer's decision threshold: fixed, or calibrated on the device's own enrolled faces.

Calibration, for ``target_far``: the impostor scores are the cosines between every pair of enrolled
images of two different people; with ``k = floor(target_far * n)`` of those ``n`` scores, the threshold
lies between the (k+1)-th highest score (rejected) and the k-th (accepted): in the middle of that gap,
and at most :data:`CALIBRATION_MARGIN` above the rejected one, so at most a ``target_far`` share would be
accepted and float noise between embedding paths cannot flip a pair. This is a 1:1 rate: ``identify``
accepts a stranger who reaches the best of several templates, so its stranger rate is higher (a
10-person phone on dlib-resnet: 12.6% of CelebA strangers' images at 1e-3; benchmarks/openset_threshold.py
measures it, and what a threshold chosen on public strangers would give instead). It needs at least
``ceil(1 / target_far)`` impostor pairs (e.g. 1,000 for 1e-3: five people with ten images each give
1,000); with less data the threshold falls back to the model's
``facefl.default_threshold`` metadata if present, else :data:`DEFAULT_THRESHOLD`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "CALIBRATION_MARGIN",
    "DEFAULT_TARGET_FAR",
    "DEFAULT_THRESHOLD",
    "DEFAULT_THRESHOLD_KEY",
    "Threshold",
    "calibrate_threshold",
]

#: Fallback cosine threshold when the model has no ``facefl.default_threshold`` and the gallery is too
#: small to calibrate one. A typical operating point of cosine-trained face models (CosFace/ArcFace
#: genuine pairs mostly score above it, impostors mostly below); calibrate or pass ``threshold=`` for
#: anything that matters.
DEFAULT_THRESHOLD = 0.5
DEFAULT_TARGET_FAR = 1e-3
#: How far above the highest rejected impostor score a calibrated threshold may sit (at most half the gap
#: to the next higher score): far above embedding float noise (~1e-6), far below a meaningful cosine step.
CALIBRATION_MARGIN = 1e-3
DEFAULT_THRESHOLD_KEY = "facefl.default_threshold"  # same key as export.onnx writes


@dataclass(frozen=True)
class Threshold:
    """The decision threshold in force and where it came from."""

    value: float
    source: Literal["fixed", "calibrated", "model default", "default"]
    target_far: float
    impostor_pairs: int  # impostor scores available on the device's data


def calibrate_threshold(
    embeddings: np.ndarray,
    labels: np.ndarray,
    target_far: float,
    fallback: float,
    fallback_source: Literal["model default", "default"],
) -> Threshold:
    """The threshold for ``target_far`` from impostor pairs of (M, d) unit ``embeddings`` (module doc)."""
    labels = np.asarray(labels)
    if len(labels) > 1:
        scores = embeddings @ embeddings.T
        upper = np.triu(np.ones(scores.shape, dtype=bool), k=1)
        impostor = np.sort(scores[upper & (labels[:, None] != labels[None, :])])[::-1]
    else:
        impostor = np.zeros(0, dtype=np.float32)
    n = len(impostor)
    if n == 0 or n < math.ceil(1.0 / target_far):
        return Threshold(float(fallback), fallback_source, target_far, n)
    k = math.floor(target_far * n)  # accepting the k highest impostor scores keeps the share <= target_far
    # The threshold sits in the middle of the gap between the highest rejected score and the lowest
    # accepted one (k >= 1 because n >= 1 / target_far), so that the float noise of another embedding
    # path (batching, another runtime) cannot move a score across it.
    rejected, accepted = float(impostor[k]), float(impostor[k - 1])
    value = rejected + min((accepted - rejected) / 2, CALIBRATION_MARGIN)
    value = float(np.nextafter(np.float32(value), np.float32(np.inf)))  # accept iff score >= value
    return Threshold(value, "calibrated", target_far, n)


def threshold_for(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    fixed: float | None,
    target_far: float,
    model_default: str | None,
) -> Threshold:
    """The threshold in force: ``fixed`` when given, else calibrated on the gallery's ``embeddings``
    (falling back to the model's ``model_default`` metadata, else :data:`DEFAULT_THRESHOLD`)."""
    if fixed is not None:
        return Threshold(fixed, "fixed", target_far, 0)
    if model_default:
        return calibrate_threshold(embeddings, labels, target_far, float(model_default), "model default")
    return calibrate_threshold(embeddings, labels, target_far, DEFAULT_THRESHOLD, "default")
