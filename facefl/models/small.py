"""A compact CNN for 64x64 crops, sized for fast CPU simulation of many federated devices.

Layout (input 64x64), every conv 3x3 + BatchNorm + FastPReLU:

    stage 1: conv s2 3->c1                        -> 32x32
    stage 2: conv s2 c1->c2, conv c2->c2 (+skip)  -> 16x16
    stage 3: conv s2 c2->c3, conv c3->c3 (+skip)  -> 8x8
    stage 4: conv s2 c3->c4, conv c4->c4 (+skip)  -> 4x4
    linear GDConv 4x4 (depthwise, whole map) -> linear to the embedding -> BatchNorm1d -> L2 normalise

Stride-2 convs instead of pooling keep the op set to what every ONNX runtime handles, and the work is
spent at low resolution, where CPU convolutions are cheapest per useful parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facefl.models.mobilefacenet import ConvBlock, init_weights

DEFAULT_WIDTHS: tuple[int, int, int, int] = (16, 32, 64, 128)


class _ResidualConv(nn.Module):
    """conv3x3 + BN + PReLU with an identity skip: cheap depth that stays easy to optimise."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = ConvBlock(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class SmallFaceNet(nn.Module):
    """(N, 3, 64, 64) normalised images -> (N, d) unit-norm embeddings; about 0.33M parameters."""

    image_size = 64

    def __init__(self, embedding_dim: int = 128, widths: tuple[int, int, int, int] = DEFAULT_WIDTHS) -> None:
        super().__init__()
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        self.embedding_dim = embedding_dim
        c1, c2, c3, c4 = widths
        self.features = nn.Sequential(
            ConvBlock(3, c1, 3, 2, 1),
            ConvBlock(c1, c2, 3, 2, 1),
            _ResidualConv(c2),
            ConvBlock(c2, c3, 3, 2, 1),
            _ResidualConv(c3),
            ConvBlock(c3, c4, 3, 2, 1),
            _ResidualConv(c4),
        )
        final_map = self.image_size // 16
        # GDConv: per-position weights over the final map (a face is spatially structured, so the
        # centre and the border should not be pooled alike).
        self.gdconv = ConvBlock(c4, c4, final_map, 1, 0, groups=c4, linear=True)
        self.embedding = nn.Linear(c4, embedding_dim, bias=False)
        self.bn = nn.BatchNorm1d(embedding_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self)

    def unnormalized(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before L2 normalization (what a distance-based loss trains)."""
        x = self.gdconv(self.features(x)).flatten(1)
        return self.bn(self.embedding(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.unnormalized(x), dim=1)
