"""The server's public face set for FedFR: which images, and the pack devices download once.

An LFW-layout root (with ``pairs.txt``) contributes its public split only (identities of no test fold;
the test folds stay unseen); any other image folder contributes all its identities. The pack is a
safetensors file: ``images`` uint8 (N, S, S, 3) at the model's input size, ``labels`` int32 (N,), and the
identity names in its metadata; the same bytes for every device, so it is cached by its sha256.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from facefl.data.folder import DataError, ImageFolder, load_image
from facefl.data.lfw import PAIRS_FILE, LfwProtocol
from facefl.data.preprocess import Preprocessing

__all__ = ["PublicSet", "decode_pack", "encode_pack", "load_public_set"]


@dataclass(frozen=True)
class PublicSet:
    images: np.ndarray  # uint8 (N, S, S, 3)
    labels: np.ndarray  # int64 (N,), indices into identities
    identities: list[str]

    @property
    def num_identities(self) -> int:
        return len(self.identities)


def load_public_set(root: str | Path, image_size: int) -> PublicSet:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"public set {root} does not exist or is not a directory")
    if (root / PAIRS_FILE).exists():
        listing = LfwProtocol.from_root(root).public_images(1)
        paths, labels, identities = listing.paths, listing.labels, list(listing.identities)
    else:
        folder = ImageFolder(root)
        paths = [p for p, _ in folder.samples]
        labels = np.asarray([y for _, y in folder.samples], np.int64)
        identities = list(folder.identities)
    if len(identities) < 2:
        raise DataError(f"public set {root} needs at least two identities")
    prep = Preprocessing(image_size)
    images = np.stack([prep.to_uint8(load_image(p)) for p in paths])
    return PublicSet(images, np.asarray(labels, np.int64), identities)


def encode_pack(public: PublicSet) -> bytes:
    tensors: dict[str, np.ndarray] = {
        "images": np.ascontiguousarray(public.images, np.uint8),
        "labels": public.labels.astype(np.int32),
    }
    return st_save(tensors, metadata={"identities": json.dumps(public.identities)})


def decode_pack(data: bytes) -> PublicSet:
    """Parse a pack; raises ValueError on anything but the layout :func:`encode_pack` writes."""
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        identities = json.loads(meta["identities"])
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"not a public-set pack: {exc}") from exc
    images, labels = tensors.get("images"), tensors.get("labels")
    if images is None or labels is None or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError("public-set pack must hold uint8 images (N, S, S, 3) and labels (N,)")
    if labels.shape != (len(images),) or (
        len(labels) and (labels.min() < 0 or labels.max() >= len(identities))
    ):
        raise ValueError("public-set pack labels do not match its images and identities")
    return PublicSet(images, labels.astype(np.int64), [str(n) for n in identities])
