"""Generic verification evaluation: a held-out pair set, embedded once, scored with facefl.metrics.

A `VerificationSet` comes from an LFW-layout directory (``pairs.txt``: its test folds, 6-10 by default)
or from any image folder (genuine pairs within each identity, as many impostor pairs across identities,
ten folds by identity). Images are decoded once, at the size the model needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from facefl.data import DataError, ImageFolder, Preprocessing, load_image
from facefl.metrics import cosine_scores, verification_report

DEFAULT_TEST_FOLDS = range(6, 11)
MAX_GENUINE_PER_IDENTITY = 10
NUM_FOLDS = 10


class Embedder(Protocol):
    """Anything that maps uint8 images (N, S, S, 3) to L2-normalized embeddings (N, d)."""

    image_size: int

    def embed(self, images: np.ndarray) -> np.ndarray: ...


@dataclass
class VerificationSet:
    name: str
    images: np.ndarray  # (M, S, S, 3) uint8, each distinct image once
    index: np.ndarray  # (P, 2) int64: the two images of each pair
    is_same: np.ndarray  # (P,) bool
    folds: np.ndarray  # (P,) int64

    def __len__(self) -> int:
        return len(self.is_same)

    @classmethod
    def from_dir(
        cls, root: str | Path, image_size: int, test_folds: Iterable[int] = DEFAULT_TEST_FOLDS, seed: int = 0
    ) -> VerificationSet:
        """LFW test folds when ``root/pairs.txt`` exists, else pairs built from the image folder."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"evaluation set directory not found: {root}")
        if (root / "pairs.txt").is_file():
            return cls.from_lfw(root, image_size, test_folds)
        return cls.from_folder(root, image_size, seed=seed)

    @classmethod
    def from_lfw(
        cls, root: Path, image_size: int, test_folds: Iterable[int] = DEFAULT_TEST_FOLDS
    ) -> VerificationSet:
        from facefl.data.lfw import LfwProtocol, pair_arrays, pair_folds

        protocol = LfwProtocol.from_root(root, test_folds=test_folds)
        pairs = protocol.test_pairs
        paths, index, is_same = pair_arrays(pairs)
        return cls(
            f"{root.name} folds {sorted(protocol.test_folds)}",
            _load(paths, image_size),
            index,
            is_same,
            pair_folds(pairs),
        )

    @classmethod
    def from_folder(cls, root: Path, image_size: int, seed: int = 0) -> VerificationSet:
        folder = ImageFolder(root)
        rng = np.random.default_rng(seed)
        labels = np.array([label for _, label in folder.samples], dtype=np.int64)
        by_identity = [np.flatnonzero(labels == k) for k in range(len(folder.identities))]
        identity_fold = rng.permutation(len(folder.identities)) % NUM_FOLDS + 1
        genuine: list[tuple[int, int, int]] = []
        for k, members in enumerate(by_identity):
            candidates = [(int(a), int(b)) for i, a in enumerate(members) for b in members[i + 1 :]]
            rng.shuffle(candidates)
            genuine += [(a, b, int(identity_fold[k])) for a, b in candidates[:MAX_GENUINE_PER_IDENTITY]]
        if not genuine or len(by_identity) < 2:
            raise DataError(f"{root}: need at least two identities and one identity with two images")
        impostor: list[tuple[int, int, int]] = []
        while len(impostor) < len(genuine):
            a, b = rng.integers(0, len(labels), size=2)
            if labels[a] != labels[b]:
                impostor.append((int(a), int(b), int(identity_fold[labels[a]])))
        rows = np.array(genuine + impostor, dtype=np.int64)
        is_same = np.array([True] * len(genuine) + [False] * len(impostor))
        used = np.unique(rows[:, :2])
        remap = np.full(len(labels), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        paths = [folder.samples[i][0] for i in used]
        return cls(root.name, _load(paths, image_size), remap[rows[:, :2]], is_same, rows[:, 2])


def _load(paths: list[Path], image_size: int) -> np.ndarray:
    pre = Preprocessing(image_size)
    return (
        np.stack([pre.to_uint8(load_image(p)) for p in paths])
        if paths
        else np.zeros((0, image_size, image_size, 3), np.uint8)
    )


def evaluate_verification(embedder: Embedder, vset: VerificationSet) -> dict[str, float]:
    """accuracy (threshold from the other folds), accuracy_std, auc, tar@far=1e-2, tar@far=1e-3, pairs."""
    emb = embedder.embed(vset.images)
    scores = cosine_scores(emb[vset.index[:, 0]], emb[vset.index[:, 1]])
    return verification_report(scores, vset.is_same, vset.folds)
