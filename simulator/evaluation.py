"""Held-out identification accuracy of a global model (identities no device has seen)."""

from __future__ import annotations

import numpy as np

from facefl.vectors import l2_normalize

__all__ = ["rank1_identification"]


def rank1_identification(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Closed-set rank-1 identification accuracy.

    For every identity, the gallery template is the normalised mean embedding of the first half of its
    images (at least one); the remaining images are probes. A probe is correct when its most similar
    template (cosine) is its own identity's. Chance level is 1 / number of identities.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise ValueError("embeddings must be (N, d) and labels (N,)")
    emb = l2_normalize(emb, dtype=np.float64)
    identities = np.unique(labels)
    templates = []
    probes: list[np.ndarray] = []
    probe_labels: list[np.ndarray] = []
    for k, identity in enumerate(identities):
        idx = np.flatnonzero(labels == identity)
        if len(idx) < 2:
            raise ValueError(f"identity {identity!r} has fewer than two images (gallery + probe needed)")
        half = max(1, len(idx) // 2)
        mean = emb[idx[:half]].mean(axis=0)
        templates.append(l2_normalize(mean, dtype=np.float64))
        probes.append(emb[idx[half:]])
        probe_labels.append(np.full(len(idx) - half, k))
    gallery = np.stack(templates)
    scores = np.concatenate(probes) @ gallery.T
    predicted = scores.argmax(axis=1)
    return float((predicted == np.concatenate(probe_labels)).mean())
