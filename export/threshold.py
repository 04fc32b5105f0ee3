"""The operating threshold stored in an exported model, chosen on a public set at a target FAR.

A phone with three enrolled people has three impostor pairs: far too few to calibrate a threshold for FAR
1e-3 (the Recognizer needs at least 1,000). It then falls back to the threshold in the model's metadata,
which this module picks when the model is exported: the impostor scores are the cosines between images of
different identities of a public set (an LFW-layout folder contributes only its public split, never the test
folds), embedded by the exported ONNX model itself, exactly as a device would. The same embeddings become
the model's stranger bank (:mod:`facefl.stranger_bank`), on which a Recognizer sets its open-set threshold
for its own enrolled people.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.errors import ExportError

if TYPE_CHECKING:
    from facefl.embedders import Embedder

#: The FAR the stored threshold aims at (the Recognizer's default target).
DEFAULT_THRESHOLD_FAR = 1e-3
#: Images of the public set used (spread over identities): 2,000 give ~2 million impostor pairs.
DEFAULT_THRESHOLD_IMAGES = 2000


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    far: float  # the target
    tar: float  # genuine pairs accepted at the threshold
    measured_far: float  # impostor pairs accepted at the threshold
    impostor_pairs: int
    genuine_pairs: int
    images: int
    identities: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        return (
            f"operating threshold {self.threshold:.4f} at FAR {self.far:g} on {self.images} public images "
            f"({self.identities} identities): TAR {self.tar:.4f} over {self.genuine_pairs} genuine pairs, "
            f"FAR {self.measured_far:.2e} over {self.impostor_pairs} impostor pairs"
        )


def spread_sample(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most ``limit`` items of the identities that have two or more, taken round-robin
    (deterministic): each such identity gives its first two images, then each its third, and so on, so
    the sample keeps genuine pairs and as many identities as the limit allows."""
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    values, counts = np.unique(labels, return_counts=True)
    eligible = np.flatnonzero(np.isin(labels, values[counts >= 2]))
    order = eligible[np.argsort(labels[eligible], kind="stable")]
    sorted_labels = labels[order]
    # rank of each item within its label: 0 for the first image of an identity, 1 for the second, ...
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - starts
    # an identity's first two images come together: a small limit still yields genuine pairs
    rounds = np.maximum(rank - 1, 0)
    chosen = order[np.lexsort((sorted_labels, rounds))][:limit]
    return np.sort(chosen)


def operating_point(embeddings: np.ndarray, labels: np.ndarray, far: float) -> OperatingPoint:
    """The lowest threshold whose FAR over all impostor pairs of ``embeddings`` is at most ``far``."""
    from facefl.metrics import operating_point_at_far

    emb = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ExportError("the threshold set needs at least two identities")
    upper = np.triu(np.ones((len(labels), len(labels)), dtype=bool), k=1)
    scores = (emb @ emb.T)[upper]
    same = (labels[:, None] == labels[None, :])[upper]
    n_imp, n_gen = int((~same).sum()), int(same.sum())
    if n_gen == 0:
        raise ExportError("the threshold set has no identity with two images: no genuine pairs")
    if n_imp < int(np.ceil(1.0 / far)):
        raise ExportError(f"{n_imp} impostor pairs are too few to set a threshold at FAR {far:g}")
    threshold, tar = operating_point_at_far(scores, same, far)
    if not np.isfinite(threshold):
        raise ExportError(f"no threshold reaches FAR {far:g} on the threshold set")
    return OperatingPoint(
        threshold=float(threshold),
        far=float(far),
        tar=float(tar),
        measured_far=float((scores[~same] >= threshold).mean()),
        impostor_pairs=n_imp,
        genuine_pairs=n_gen,
        images=len(labels),
        identities=len(np.unique(labels)),
    )


def embed_public_set(
    embedder: Embedder, public_root: str | Path, max_images: int = DEFAULT_THRESHOLD_IMAGES
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, labels) of the spread sample of the public set that an export embeds: its threshold
    set and stranger bank (``benchmarks/openset_threshold.py`` takes the same faces)."""
    from facefl.data.public import load_public_set

    public = load_public_set(public_root, embedder.image_size)
    keep = spread_sample(public.labels, max_images)
    return embedder.embed(public.images[keep]), public.labels[keep]


def threshold_for_model(
    model: str | Path,
    public_root: str | Path,
    far: float = DEFAULT_THRESHOLD_FAR,
    max_images: int = DEFAULT_THRESHOLD_IMAGES,
) -> tuple[OperatingPoint, np.ndarray]:
    """Embed (a spread sample of) the public set with the ONNX ``model``; its operating point at ``far``
    and the embeddings (the model's stranger bank)."""
    from facefl.embedders import OnnxEmbedder

    if not 0.0 < far < 1.0:
        raise ExportError(f"the threshold FAR must be in (0, 1), got {far}")
    embeddings, labels = embed_public_set(OnnxEmbedder(model), public_root, max_images)
    return operating_point(embeddings, labels, far), embeddings
