"""The recognizer's model: an ONNX face-embedding file opened in ONNX Runtime, and its identity.

Any ONNX face-embedding model with one float NCHW input ``(N, 3, S, S)`` works. The input size is read
from the model; the preprocessing from its ``facefl.preprocessing`` metadata (written by ``facefl
export``), else the default ``(x / 255 - 0.5) / 0.5`` on RGB (see :mod:`facefl.embedders`). A model is
known by the SHA-256 of its file: gallery embeddings made by another file are stale. A model exported with
``--threshold-set`` also carries a stranger bank (:mod:`facefl.stranger_bank`), read and checked here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facefl.fileio import sha256_file
from facefl.vectors import l2_normalize

from .errors import RecognizerError
from .threshold import DEFAULT_THRESHOLD_KEY

if TYPE_CHECKING:
    from facefl.embedders import OnnxEmbedder

__all__ = ["FaceModel"]


class FaceModel:
    """An opened model file (thread-safe: ONNX Runtime sessions are); RecognizerError when ``path`` is
    missing or is not a usable face-embedding model."""

    def __init__(self, path: Path, *, batch_size: int, threads: int | None) -> None:
        from facefl.data import DataError
        from facefl.embedders import OnnxEmbedder

        if not path.is_file():
            raise RecognizerError(f"model file {path} does not exist")
        try:
            self.embedder: OnnxEmbedder = OnnxEmbedder(path, batch_size=batch_size, threads=threads)
        except (DataError, ValueError) as exc:
            raise RecognizerError(f"cannot use {path} as a face-embedding model: {exc}") from exc
        self.path = path
        self.sha256 = sha256_file(path)
        self.stranger_bank = self._read_stranger_bank()

    def _read_stranger_bank(self) -> np.ndarray | None:
        """The model's stranger bank (unit (n, d) float32), None if it has none; RecognizerError naming
        the file when the bank is malformed or its width is not the model's embedding size."""
        from facefl.stranger_bank import STRANGER_BANK_KEY, decode_stranger_bank

        text = self.embedder.metadata.get(STRANGER_BANK_KEY)
        if text is None:
            return None
        try:
            bank = decode_stranger_bank(text)
        except ValueError as exc:
            raise RecognizerError(f"{self.path}: bad {STRANGER_BANK_KEY} metadata: {exc}") from exc
        width = self.embedder.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and bank.shape[1] != width:
            raise RecognizerError(
                f"{self.path}: the {STRANGER_BANK_KEY} metadata holds {bank.shape[1]}-d embeddings, "
                f"the model outputs {width}-d ones"
            )
        return bank

    @property
    def image_size(self) -> int:
        return self.embedder.image_size

    @property
    def default_threshold(self) -> str | None:
        """The model's ``facefl.default_threshold`` metadata (``facefl export`` writes it), if any."""
        return self.embedder.metadata.get(DEFAULT_THRESHOLD_KEY) or None

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Unit-norm (N, d) float32 embeddings of HxWx3 uint8 face crops (any size: resized)."""
        if not crops:
            return np.zeros((0, 0), dtype=np.float32)
        embedder = self.embedder
        step = embedder.batch_size  # ours, or the model's fixed batch dimension
        pre = embedder.preprocessing  # the model's own preprocessing (facefl.data.Preprocessing)
        parts = [
            embedder.embed_preprocessed(pre.batch(crops[lo : lo + step])) for lo in range(0, len(crops), step)
        ]
        return l2_normalize(np.concatenate(parts))
