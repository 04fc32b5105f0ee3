"""What an exported face model computes: backbone -> optional converter -> L2 normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EmbeddingGraph"]


class EmbeddingGraph(nn.Module):
    """backbone -> optional converter ``Linear(d, d)`` -> L2 normalisation.

    The generic model has no converter; a FedFR device's personalized model has its DFC converter. The
    final normalisation is part of the graph even though facefl backbones already normalise, because the
    converter changes the norm and a runtime must get unit vectors without knowing the model.
    """

    def __init__(self, backbone: nn.Module, converter: nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.converter = converter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.backbone(x)
        if self.converter is not None:
            embedding = self.converter(embedding)
        return F.normalize(embedding, dim=1)
