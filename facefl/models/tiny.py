"""``tiny``: one linear layer on 4x4 crops, 980 floats with d=20. Not a face model: it exists to measure
the federated protocol itself (server throughput, the Flower comparison) with updates of ~1k floats."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, embedding_dim: int = 20, image_size: int = 4) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.fc = nn.Linear(3 * image_size * image_size, embedding_dim)

    def unnormalized(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before L2 normalization (what a distance-based loss trains)."""
        return self.fc(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.unnormalized(x), dim=1)
