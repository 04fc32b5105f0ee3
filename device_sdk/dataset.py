"""The device's own labelled face images, held in memory for a training round.

Images are kept as uint8 RGB ``(N, S, S, 3)`` (what a camera pipeline produces after alignment), labels
are indices into ``identities`` (the device's local people). Nothing here ever leaves the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facefl.data import ImageFolder
from facefl.data.protocol import device_split, load_identities
from facefl.data.synthetic import make_synthetic_dataset

__all__ = ["LocalDataset"]


@dataclass(frozen=True)
class LocalDataset:
    """Aligned face crops of the device's local identities.

    Attributes:
        images: uint8 array (N, S, S, 3), RGB.
        labels: int64 array (N,), each an index into ``identities``.
        identities: the local identity names (stable across rounds: the local classifier is keyed on them).
    """

    images: np.ndarray
    labels: np.ndarray
    identities: tuple[str, ...]

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        labels = np.asarray(self.labels, dtype=np.int64)
        if (
            images.dtype != np.uint8
            or images.ndim != 4
            or images.shape[3] != 3
            or images.shape[1] != images.shape[2]
        ):
            raise ValueError(f"images must be uint8 (N, S, S, 3), got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
        identities = tuple(str(i) for i in self.identities)
        if len(set(identities)) != len(identities):
            raise ValueError("identity names must be distinct")
        if labels.size and (labels.min() < 0 or labels.max() >= len(identities)):
            raise ValueError(f"labels must lie in [0, {len(identities)})")
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "identities", identities)

    # ------------------------------------------------------------------------------- construction

    @classmethod
    def from_arrays(
        cls, images: np.ndarray, labels: np.ndarray, identities: Sequence[str] | None = None
    ) -> LocalDataset:
        """Wrap arrays; ``identities`` defaults to ``"0", "1", ...`` for each label value."""
        labels = np.asarray(labels, dtype=np.int64)
        if identities is None:
            identities = [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
        return cls(images=np.asarray(images), labels=labels, identities=tuple(identities))

    @classmethod
    def synthetic(
        cls, identities: Sequence[int], images_per_identity: int, image_size: int, seed: int = 0
    ) -> LocalDataset:
        """Generated faces of the given synthetic identities (see :mod:`facefl.data.synthetic`).

        Deterministic in its arguments, so a simulated device can regenerate its data in any process.
        """
        images, labels = make_synthetic_dataset(list(identities), images_per_identity, image_size, seed)
        return cls(images=images, labels=labels, identities=tuple(f"id_{int(i):06d}" for i in identities))

    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        image_size: int,
        identities: Sequence[str] | None = None,
        max_images_per_identity: int | None = None,
    ) -> LocalDataset:
        """Read an image folder (``<root>/<identity>/<file>``, see :class:`facefl.data.ImageFolder`),
        resizing each image to ``image_size`` with the shared :class:`facefl.data.Preprocessing`.

        Args:
            identities: only these identity folders, in this order (default: all of them, sorted).
            max_images_per_identity: keep at most this many images of each identity (sorted by name).
        """
        names = list(ImageFolder(root).identities) if identities is None else [str(i) for i in identities]
        images, labels = load_identities(root, names, image_size, max_images_per_identity)
        return cls(images=images, labels=labels, identities=tuple(names))

    # -------------------------------------------------------------------------------------- views

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_identities(self) -> int:
        return len(self.identities)

    def subset(self, indices: np.ndarray | Sequence[int]) -> LocalDataset:
        """The samples at ``indices`` (same identity list, so labels keep their meaning)."""
        idx = np.asarray(indices, dtype=np.int64)
        return LocalDataset(images=self.images[idx], labels=self.labels[idx], identities=self.identities)

    def train_test_split(
        self, test_fraction: float = 0.2, seed: int = 0
    ) -> tuple[LocalDataset, LocalDataset]:
        """Split each identity's images into train and test (:func:`facefl.data.split_train_test`:
        ``round(n * test_fraction)`` test images per identity, at least one image left for training)."""
        train_idx, test_idx = device_split(self.labels, test_fraction, seed, self.identities)
        return self.subset(train_idx), self.subset(test_idx)
