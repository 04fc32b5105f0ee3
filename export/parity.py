"""Parity of an exported model: cosine between PyTorch and ONNX Runtime embeddings of the same images.

Both sides go through :mod:`facefl.embedders` (hence the same :class:`facefl.data.Preprocessing`), so the
report measures the export itself: graph conversion for fp32 (expected >= 0.9999), plus the quantization
error for int8 (expected >= 0.998).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from facefl.data import Preprocessing

__all__ = ["FP32_MIN_COSINE", "INT8_MIN_COSINE", "ParityReport", "parity_report"]

FP32_MIN_COSINE = 0.9999
INT8_MIN_COSINE = 0.998


@dataclass(frozen=True)
class ParityReport:
    """Per-image cosine of ONNX Runtime vs PyTorch embeddings, summarised."""

    model: str
    images: int
    min_cosine: float
    mean_cosine: float
    threshold: float

    @property
    def passed(self) -> bool:
        """Whether every image's cosine reaches the threshold."""
        return self.min_cosine >= self.threshold

    def format(self) -> str:
        verdict = "ok" if self.passed else f"FAILED (min cosine below {self.threshold})"
        return (
            f"parity {self.model}: {self.images} images, cosine to PyTorch min {self.min_cosine:.6f} "
            f"mean {self.mean_cosine:.6f} (threshold {self.threshold}): {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def parity_report(
    module: nn.Module,
    preprocessing: Preprocessing,
    onnx_model: str | Path,
    images: np.ndarray,
    threshold: float = FP32_MIN_COSINE,
    *,
    threads: int | None = None,
) -> ParityReport:
    """Embed ``images`` ((N, H, W, 3) uint8 RGB) with ``module`` (PyTorch) and ``onnx_model`` (ORT).

    ``module`` is what was exported (e.g. :attr:`export.onnx.ExportSource.module`), in eval mode.
    """
    from facefl.embedders import OnnxEmbedder, TorchEmbedder

    if len(images) == 0:
        raise ValueError("parity needs at least one image")
    reference = TorchEmbedder(module, "", device="cpu", preprocessing=preprocessing).embed(images)
    exported = OnnxEmbedder(onnx_model, threads=threads).embed(images)
    if reference.shape != exported.shape:
        raise ValueError(f"embedding shapes differ: PyTorch {reference.shape}, ONNX {exported.shape}")
    cosines = np.einsum("nd,nd->n", reference, exported) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(exported, axis=1)
    )
    return ParityReport(
        model=Path(onnx_model).name,
        images=len(images),
        min_cosine=float(cosines.min()),
        mean_cosine=float(cosines.mean()),
        threshold=float(threshold),
    )
