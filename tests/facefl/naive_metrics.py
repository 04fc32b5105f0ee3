"""Brute-force references for the metrics: every candidate threshold tried in plain loops."""

from __future__ import annotations

import numpy as np


def naive_tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    best = 0.0
    for t in np.unique(scores):
        acc = scores >= t
        if acc[~same].mean() <= far + 1e-12:
            best = max(best, acc[same].mean())
    return best


def naive_dir(sim: np.ndarray, truth: np.ndarray, far: float) -> float:
    gen = truth >= 0
    imp_max = sim[~gen].max(axis=1)
    best = 0.0
    for t in np.r_[np.unique(sim), np.inf]:
        if (imp_max >= t).mean() > far + 1e-12:
            continue
        hits = 0
        for p in np.flatnonzero(gen):
            others = np.delete(sim[p], truth[p])
            if sim[p, truth[p]] > others.max(initial=-np.inf) and sim[p, truth[p]] >= t:
                hits += 1
        best = max(best, hits / gen.sum())
    return best
