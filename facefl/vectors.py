"""Unit vectors: the one L2 normalization of embeddings in NumPy (PyTorch code uses ``F.normalize``)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

__all__ = ["l2_normalize"]

#: Norms below this count as this (as in ``torch.nn.functional.normalize``): a zero row stays zero.
EPS = 1e-12


def l2_normalize(x: ArrayLike, axis: int = -1, *, dtype: DTypeLike = np.float32) -> np.ndarray:
    """``x / max(||x||, 1e-12)`` along ``axis``, computed and returned in ``dtype`` (float32 unless
    told). Rows of (N, d) embeddings become unit vectors; a zero row stays zero."""
    arr = np.asarray(x, dtype=dtype)
    norms = np.linalg.norm(arr, axis=axis, keepdims=True)
    out: np.ndarray = arr / np.maximum(norms, arr.dtype.type(EPS))
    return out
