"""The recognizer's decision threshold: fixed, set on the model's public strangers, or calibrated on the
device's own enrolled faces.

**On strangers (open set)**, when the model carries a stranger bank (:mod:`facefl.stranger_bank`, written
by ``facefl export --threshold-set``): each stranger face is a probe scored against every enrolled
template, exactly as ``identify`` scores it, and with ``k = floor(target_far * n)`` of the ``n`` best
scores accepted, the threshold lies in the gap between the (k+1)-th highest (rejected) and the k-th, by the
rule below. So at most ``target_far`` of the strangers would be identified as someone, and, since a
probe's best score bounds each of its scores, at most that share would be verified as any one person. It
is set again at every enroll and forget (the templates change), works from the first enrolled person
on, and needs ``n >= ceil(1 / target_far)`` (2,000 faces by default for 1e-3). On dlib-resnet's
10-person CelebA phones it rejects 99.1% of strangers' images where the pairwise rule below rejects 87.4%
(``benchmarks/openset_threshold.py``).

**Pairwise**, without a bank, for ``target_far``: the impostor scores are the cosines between every pair of
enrolled images of two different people; with ``k = floor(target_far * n)`` of those ``n`` scores, the
threshold lies between the (k+1)-th highest score (rejected) and the k-th (accepted): in the middle of that
gap, and at most :data:`CALIBRATION_MARGIN` above the rejected one, so at most a ``target_far`` share would
be accepted and float noise between embedding paths cannot flip a pair. This is a 1:1 rate: ``identify``
accepts a stranger who reaches the best of several templates, so its stranger rate is higher (a 10-person
phone on dlib-resnet: 12.6% of CelebA strangers' images at 1e-3), which is why a bank, when present, takes
precedence. It needs at least ``ceil(1 / target_far)`` impostor pairs (e.g. 1,000 for 1e-3: five people with
ten images each give 1,000); with less data the threshold falls back to the model's
``facefl.default_threshold`` metadata if present, else :data:`DEFAULT_THRESHOLD`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import RecognizerError

__all__ = [
    "CALIBRATION_MARGIN",
    "DEFAULT_TARGET_FAR",
    "DEFAULT_THRESHOLD",
    "DEFAULT_THRESHOLD_KEY",
    "Threshold",
    "calibrate_threshold",
    "open_set_threshold",
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
    source: Literal["fixed", "strangers", "calibrated", "model default", "default"]
    target_far: float
    impostor_pairs: int  # impostor pairs among the enrolled images (0 when not computed)
    strangers: int = 0  # stranger faces the threshold was set on ("strangers")


def _in_gap(descending: np.ndarray, target_far: float) -> float:
    """The threshold that accepts at most ``floor(target_far * n)`` of the ``n`` scores (sorted highest
    first; ``n >= 1 / target_far``, so that count k is >= 1): in the middle of the gap between the
    highest rejected score and the lowest accepted one, at most :data:`CALIBRATION_MARGIN` above the
    rejected one, so that the float noise of another embedding path (batching, another runtime) cannot
    move a score across it."""
    k = math.floor(target_far * len(descending))
    rejected, accepted = float(descending[k]), float(descending[k - 1])
    value = rejected + min((accepted - rejected) / 2, CALIBRATION_MARGIN)
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))  # accept iff score >= value


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
    return Threshold(_in_gap(impostor, target_far), "calibrated", target_far, n)


def open_set_threshold(strangers: np.ndarray, templates: np.ndarray, target_far: float) -> Threshold | None:
    """The threshold at which at most ``target_far`` of the (n, d) unit ``strangers`` reach their best
    of the (P, d) unit ``templates`` (module doc); None without templates or with fewer than
    ``ceil(1 / target_far)`` strangers."""
    n = len(strangers)
    if len(templates) == 0 or n == 0 or n < math.ceil(1.0 / target_far):
        return None
    if strangers.shape[1] != templates.shape[1]:
        raise RecognizerError(
            f"the model's stranger bank holds {strangers.shape[1]}-d embeddings, its templates are "
            f"{templates.shape[1]}-d"
        )
    best = np.sort((strangers @ templates.T).max(axis=1))[::-1]
    return Threshold(_in_gap(best, target_far), "strangers", target_far, 0, n)


def threshold_for(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    fixed: float | None,
    target_far: float,
    model_default: str | None,
    templates: np.ndarray | None = None,
    strangers: np.ndarray | None = None,
) -> Threshold:
    """The threshold in force: ``fixed`` when given, else set on the model's ``strangers`` against the
    gallery's ``templates`` when there are enough of both, else calibrated on the gallery's ``embeddings``
    (falling back to the model's ``model_default`` metadata, else :data:`DEFAULT_THRESHOLD`)."""
    if fixed is not None:
        return Threshold(fixed, "fixed", target_far, 0)
    if strangers is not None and templates is not None:
        open_set = open_set_threshold(strangers, templates, target_far)
        if open_set is not None:
            return open_set
    if model_default:
        return calibrate_threshold(embeddings, labels, target_far, float(model_default), "model default")
    return calibrate_threshold(embeddings, labels, target_far, DEFAULT_THRESHOLD, "default")
