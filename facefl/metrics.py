"""Face verification (1:1) and identification (1:N) metrics, pure NumPy.

Conventions shared by every function here:

- A *score* is a similarity: higher means "more likely the same person". The decision rule is always
  "accept if score >= threshold", so a threshold of ``+inf`` accepts nothing.
- ``is_same`` is a 1-D array of booleans (or of 0/1 numbers): True marks a genuine pair (same identity),
  False an impostor pair.
- FAR (false accept rate) = accepted impostors / impostors; TAR (true accept rate) = accepted genuine
  pairs / genuine pairs.
- Ties are never split: every candidate threshold is one of the distinct scores (plus ``+inf``), so all
  pairs with a tied score are accepted or rejected together. "FAR <= far" is tested as
  ``false_accepts / impostors <= far + 1e-12``, so a level carrying rounding error (``0.7 - 0.4``)
  still admits 3 false accepts out of 10.
- Scores must be finite; empty inputs, mismatched lengths and (where a metric needs them) a missing class
  raise ``ValueError``.

Verification: :func:`roc_curve`, :func:`roc_auc`, :func:`tar_at_far`, :func:`threshold_at_far`,
:func:`best_accuracy_threshold`, :func:`accuracy_at`, :func:`kfold_verification_accuracy`,
:func:`verification_report`, :func:`cosine_scores`. Open-set identification: :func:`dir_at_far`,
:func:`rank1_accuracy`. The personalized benchmark's per-device report is
:func:`facefl.device_metrics.personalized_report`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from facefl.vectors import l2_normalize

__all__ = [
    "accuracy_at",
    "best_accuracy_threshold",
    "cosine_scores",
    "dir_at_far",
    "far_key",
    "kfold_verification_accuracy",
    "operating_point_at_far",
    "rank1_accuracy",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "threshold_at_far",
    "verification_report",
]

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
IntArray = NDArray[np.int64]

_FAR_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------
# validation helpers


def _scores_1d(scores: ArrayLike, name: str = "scores") -> FloatArray:
    arr = np.asarray(scores)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def _labels_1d(is_same: ArrayLike, n: int) -> BoolArray:
    arr = np.asarray(is_same)
    if arr.ndim != 1:
        raise ValueError(f"is_same must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"is_same has length {arr.shape[0]} but scores has length {n}")
    if arr.dtype == np.bool_:
        return arr.copy()
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"is_same must be boolean or 0/1, got dtype {arr.dtype}")
    if not np.all((arr == 0) | (arr == 1)):
        raise ValueError("is_same must contain only booleans or 0/1 values")
    return arr == 1


def _pairs(scores: ArrayLike, is_same: ArrayLike, need_both: bool = True) -> tuple[FloatArray, BoolArray]:
    s = _scores_1d(scores)
    y = _labels_1d(is_same, s.shape[0])
    if need_both:
        n_pos = int(y.sum())
        if n_pos == 0:
            raise ValueError("no genuine pairs (is_same is all False): both classes are needed")
        if n_pos == y.size:
            raise ValueError("no impostor pairs (is_same is all True): both classes are needed")
    return s, y


def _check_far(far: float) -> float:
    f = float(far)
    if not np.isfinite(f) or f < 0.0 or f > 1.0:
        raise ValueError(f"far must be in [0, 1], got {far!r}")
    return f


def _embeddings_2d(emb: ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(emb)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def _unit_rows(emb: FloatArray, name: str) -> FloatArray:
    """``emb``'s rows L2-normalized (float64); ValueError naming ``name`` for a zero row."""
    zero = np.flatnonzero(np.linalg.norm(emb, axis=1) == 0.0)
    if zero.size:
        raise ValueError(f"{name} has zero vectors (rows {zero[:5].tolist()}): cosine is undefined")
    return l2_normalize(emb, dtype=np.float64)


def _int_labels(values: ArrayLike, name: str, n: int) -> IntArray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has length {arr.shape[0]}, expected {n}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must contain integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def far_key(far: float) -> str:
    """The short text of a FAR used in report keys: ``1e-2`` for 0.01, ``1.5e-3`` for 0.0015."""
    return str(np.format_float_scientific(float(far), trim="-", exp_digits=1))


# ----------------------------------------------------------------------------------------------------
# verification (1:1)


def _roc_counts(scores: FloatArray, labels: BoolArray) -> tuple[FloatArray, IntArray, IntArray]:
    """Candidate thresholds (+inf, then distinct scores decreasing) and accepted positives/negatives."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = labels[order]
    tp = np.cumsum(y, dtype=np.int64)
    fp = np.cumsum(~y, dtype=np.int64)
    # last index of each run of equal scores: accepting a score accepts its whole tie group
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    thresholds = np.r_[np.inf, s[last]]
    zero = np.zeros(1, dtype=np.int64)
    return thresholds, np.r_[zero, tp[last]], np.r_[zero, fp[last]]


def roc_curve(scores: ArrayLike, is_same: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """The full ROC: ``(far, tar, thresholds)``, one entry per candidate threshold.

    ``thresholds[0]`` is ``+inf`` (accept nothing: FAR = TAR = 0); the rest are the distinct scores in
    decreasing order, so the last point is (1, 1). Entry ``i`` is the rate of pairs with
    ``score >= thresholds[i]``; tied scores move together. Needs both classes.
    This equals ``sklearn.metrics.roc_curve(is_same, scores, drop_intermediate=False)``.
    """
    s, y = _pairs(scores, is_same)
    thresholds, tp, fp = _roc_counts(s, y)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return fp / n_neg, tp / n_pos, thresholds


def roc_auc(scores: ArrayLike, is_same: ArrayLike) -> float:
    """Area under the ROC (trapezoid rule over :func:`roc_curve`).

    Equals the Mann-Whitney probability that a random genuine pair scores above a random impostor pair,
    with ties counted 1/2. Needs both classes.
    """
    far, tar, _ = roc_curve(scores, is_same)
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


def _operating_point(scores: FloatArray, labels: BoolArray, far: float, n_pos: int) -> tuple[float, float]:
    """(threshold, TAR) of the lowest candidate threshold whose FAR <= far; TAR over ``n_pos`` positives."""
    thresholds, tp, fp = _roc_counts(scores, labels)
    n_neg = int((~labels).sum())
    ok = np.flatnonzero(fp / n_neg <= far + _FAR_EPS)  # index 0 (+inf, no accepts) always qualifies
    i = int(ok[-1])  # FAR and TAR both grow as the threshold falls: the last admissible is the best
    return float(thresholds[i]), float(tp[i] / n_pos)


def operating_point_at_far(scores: ArrayLike, is_same: ArrayLike, far: float) -> tuple[float, float]:
    """(:func:`threshold_at_far`, :func:`tar_at_far`) from one pass over the ROC."""
    f = _check_far(far)
    s, y = _pairs(scores, is_same)
    return _operating_point(s, y, f, int(y.sum()))


def threshold_at_far(scores: ArrayLike, is_same: ArrayLike, far: float) -> float:
    """The lowest candidate threshold (a score, or ``+inf``) whose FAR <= ``far``.

    This is the operating point of :func:`tar_at_far`. Returns ``+inf`` when even the highest score
    group has too many impostors. Needs both classes.
    """
    return operating_point_at_far(scores, is_same, far)[0]


def tar_at_far(scores: ArrayLike, is_same: ArrayLike, far: float) -> float:
    """The highest TAR over candidate thresholds whose FAR <= ``far`` (0 when only ``+inf`` qualifies).

    A tie group cannot be split: if accepting a tied score would push FAR over ``far``, the whole group
    (including its genuine pairs) stays rejected. Needs both classes.
    """
    return operating_point_at_far(scores, is_same, far)[1]


def accuracy_at(scores: ArrayLike, is_same: ArrayLike, threshold: float) -> float:
    """Fraction of pairs classified correctly by "same if score >= threshold" (one class is fine)."""
    s, y = _pairs(scores, is_same, need_both=False)
    t = float(threshold)
    if np.isnan(t):
        raise ValueError("threshold is NaN")
    return float(np.mean((s >= t) == y))


def best_accuracy_threshold(scores: ArrayLike, is_same: ArrayLike) -> float:
    """A threshold of maximal accuracy on these pairs.

    Candidates are ``+inf`` and the distinct scores; among equally accurate candidates the highest one
    wins. The accuracy of candidate score ``s_i`` holds for every threshold in ``(s_{i+1}, s_i]`` (with
    ``s_{i+1}`` the next lower distinct score), so the returned value is that interval's midpoint
    ``(s_i + s_{i+1}) / 2``, a margin that generalizes better to unseen pairs; when accepting everything
    wins it is the lowest score, and when rejecting everything wins it is ``+inf``. Needs both classes.
    """
    s, y = _pairs(scores, is_same)
    thresholds, tp, fp = _roc_counts(s, y)
    n_neg = int((~y).sum())
    correct = tp + (n_neg - fp)  # accepted genuine + rejected impostors
    i = int(np.argmax(correct))  # first maximum = highest threshold
    if i == 0:
        return float("inf")
    if i == thresholds.size - 1:
        return float(thresholds[i])
    return float((thresholds[i] + thresholds[i + 1]) / 2.0)


def kfold_verification_accuracy(
    scores: ArrayLike, is_same: ArrayLike, folds: ArrayLike
) -> tuple[float, float, FloatArray]:
    """LFW-protocol accuracy: ``(mean, std, thresholds_per_fold)``.

    ``folds[i]`` is the fold label of pair ``i`` (any sortable values; at least two distinct). For each
    fold, in sorted label order, the threshold is :func:`best_accuracy_threshold` on all OTHER folds
    only, and the accuracy is measured on that fold. ``mean``/``std`` are over folds (population std,
    ``ddof=0``, as in the usual LFW code). Needs both classes in every "other folds" subset.
    """
    s, y = _pairs(scores, is_same)
    fold_arr = np.asarray(folds)
    if fold_arr.ndim != 1 or fold_arr.shape[0] != s.shape[0]:
        raise ValueError(f"folds must be 1-D with length {s.shape[0]}, got shape {fold_arr.shape}")
    labels = np.unique(fold_arr)
    if labels.size < 2:
        raise ValueError("folds must contain at least two distinct fold labels")
    accs = np.empty(labels.size)
    thresholds = np.empty(labels.size)
    for k, label in enumerate(labels):
        test = fold_arr == label
        train = ~test
        if y[train].all() or not y[train].any():
            raise ValueError(f"the folds other than {label!r} hold only one class: cannot pick a threshold")
        thresholds[k] = best_accuracy_threshold(s[train], y[train])
        accs[k] = np.mean((s[test] >= thresholds[k]) == y[test])
    return float(accs.mean()), float(accs.std()), thresholds


def verification_report(scores: ArrayLike, is_same: ArrayLike, folds: ArrayLike) -> dict[str, float]:
    """The generic benchmark row: keys ``accuracy``, ``accuracy_std`` (k-fold, see
    :func:`kfold_verification_accuracy`), ``auc``, ``tar@far=1e-2``, ``tar@far=1e-3`` and ``pairs``
    (the number of pairs, as a float)."""
    s, y = _pairs(scores, is_same)
    mean, std, _ = kfold_verification_accuracy(s, y, folds)
    return {
        "accuracy": mean,
        "accuracy_std": std,
        "auc": roc_auc(s, y),
        f"tar@far={far_key(1e-2)}": tar_at_far(s, y, 1e-2),
        f"tar@far={far_key(1e-3)}": tar_at_far(s, y, 1e-3),
        "pairs": float(s.size),
    }


def cosine_scores(emb1: ArrayLike, emb2: ArrayLike) -> FloatArray:
    """Row-wise cosine similarity of two (N, D) embedding arrays -> (N,) float64 in [-1, 1].

    Rows are L2-normalized first; a zero row raises ``ValueError``.
    """
    a = _embeddings_2d(emb1, "emb1")
    b = _embeddings_2d(emb2, "emb2")
    if a.shape != b.shape:
        raise ValueError(f"emb1 and emb2 must have the same shape, got {a.shape} and {b.shape}")
    out: FloatArray = np.einsum("nd,nd->n", _unit_rows(a, "emb1"), _unit_rows(b, "emb2"))
    return np.clip(out, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# open-set identification (1:N)


def _identification(
    similarities: ArrayLike, probe_gallery_index: ArrayLike
) -> tuple[FloatArray, IntArray, BoolArray]:
    """Validated (similarities, index) and, per probe, whether its true identity is the strict top-1."""
    sim = np.asarray(similarities)
    if sim.ndim != 2:
        raise ValueError(f"similarities must be 2-D (probes, gallery), got shape {sim.shape}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"similarities is empty (shape {sim.shape})")
    if sim.dtype == np.bool_ or not np.issubdtype(sim.dtype, np.number):
        raise ValueError(f"similarities must be numeric, got dtype {sim.dtype}")
    simf = sim.astype(np.float64)
    if not np.all(np.isfinite(simf)):
        raise ValueError("similarities contains NaN or infinite values")
    n_probe, n_gallery = simf.shape
    idx = _int_labels(probe_gallery_index, "probe_gallery_index", n_probe)
    if np.any((idx < -1) | (idx >= n_gallery)):
        raise ValueError(f"probe_gallery_index values must be -1 (impostor) or in [0, {n_gallery - 1}]")
    genuine = idx >= 0
    correct = np.zeros(n_probe, dtype=bool)
    rows = np.flatnonzero(genuine)
    if rows.size:
        g = simf[rows]
        true_score = g[np.arange(rows.size), idx[rows]]
        others = g.copy()
        others[np.arange(rows.size), idx[rows]] = -np.inf
        correct[rows] = true_score > others.max(axis=1)  # a tie with another identity is a miss
    return simf, idx, correct


def rank1_accuracy(similarities: ArrayLike, probe_gallery_index: ArrayLike) -> float:
    """Fraction of genuine probes (index >= 0) whose true identity is the top-1 gallery match.

    A tie between the true identity and another one for the top score counts as a miss. Impostor probes
    (index -1) are ignored; at least one genuine probe is needed.
    """
    _, idx, correct = _identification(similarities, probe_gallery_index)
    genuine = idx >= 0
    if not genuine.any():
        raise ValueError("no genuine probes (all probe_gallery_index are -1)")
    return float(correct[genuine].mean())


def dir_at_far(similarities: ArrayLike, probe_gallery_index: ArrayLike, far: float) -> float:
    """Open-set detection-and-identification rate at a false-alarm rate.

    ``similarities`` is (P, G) probe-vs-gallery scores; ``probe_gallery_index[p]`` is the gallery column
    of probe ``p``'s identity, or -1 for an impostor (not enrolled). The threshold ``t`` is the lowest
    candidate (distinct scores, ties unsplit, as in :func:`tar_at_far`) such that the fraction of
    impostor probes whose MAX gallery score is >= ``t`` is <= ``far``. DIR is the fraction of genuine
    probes whose strict top-1 match is their identity and whose score is >= ``t``. Needs at least one
    genuine and one impostor probe.
    """
    f = _check_far(far)
    simf, idx, correct = _identification(similarities, probe_gallery_index)
    genuine = idx >= 0
    n_gen = int(genuine.sum())
    if n_gen == 0:
        raise ValueError("no genuine probes (all probe_gallery_index are -1)")
    if n_gen == idx.size:
        raise ValueError("no impostor probes (no probe_gallery_index is -1)")
    best = simf.max(axis=1)
    hit = genuine & correct  # a misidentified genuine probe can never count, whatever the threshold
    use = hit | ~genuine
    return _operating_point(best[use], hit[use], f, n_gen)[1]
