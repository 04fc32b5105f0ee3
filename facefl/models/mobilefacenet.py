"""MobileFaceNet (Chen et al., 2018) for 112x112 aligned face crops.

Layout (input 112x112):

    conv3x3 s2, 64          -> 56x56
    depthwise conv3x3, 64   -> 56x56
    bottleneck t=2 c=64  n=5 s=2 -> 28x28
    bottleneck t=4 c=128 n=1 s=2 -> 14x14
    bottleneck t=2 c=128 n=6 s=1
    bottleneck t=4 c=128 n=1 s=2 -> 7x7
    bottleneck t=2 c=128 n=2 s=1
    conv1x1 512
    linear GDConv 7x7 (depthwise, no activation) -> 1x1
    linear 1x1 conv to the embedding (default 128, as in the paper), BatchNorm
    L2 normalisation

Non-linearities are PReLU, implemented as :class:`FastPReLU` so that the ONNX graph is made of plain
Relu/Mul/Sub nodes (see its docstring).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (expansion t, output channels c, repeats n, first stride s) -- Table 1 of the paper.
BOTTLENECK_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


def init_weights(module: nn.Module) -> None:
    """Kaiming (fan-out) convolutions, BatchNorm as identity: the init both backbones share."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FastPReLU(nn.Module):
    """PReLU computed as ``relu(x) - alpha * relu(-x)`` with one slope per channel.

    Why not ``nn.PReLU``: its ONNX export broadcasts a (C,) slope against NCHW input, which exporters
    turn into an Unsqueeze chain or a PRelu node that some runtimes execute slowly (or reject for
    per-channel slopes). This formulation exports as Relu/Neg/Mul/Sub with a (1, C, 1, 1) constant,
    which every runtime fuses well. It is numerically the same function as PReLU, so eager mode uses the
    native kernel and only the exported graph uses the decomposition.
    """

    def __init__(self, num_channels: int, init: float = 0.25) -> None:
        super().__init__()
        self.num_channels = num_channels
        # named ``weight`` with shape (C,) like nn.PReLU so state dicts look familiar.
        self.weight = nn.Parameter(torch.full((num_channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            # Eager training/inference: the native kernel computes the same function; a train step is
            # ~15-20% faster with it (the decomposed form adds four memory passes forward and back).
            return F.prelu(x, self.weight)
        return self.decomposed(x)

    def decomposed(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(x) - alpha * relu(-x)``: the form written into exported graphs."""
        # (1, C, 1, 1) for NCHW, (1, C) for NC: broadcast over every non-channel axis.
        shape = (1, self.num_channels) + (1,) * (x.dim() - 2)
        alpha = self.weight.view(shape)
        return F.relu(x) - alpha * F.relu(-x)

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}"


class ConvBlock(nn.Module):
    """Conv -> BatchNorm -> (optional) FastPReLU. ``linear=True`` drops the activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        linear: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act: nn.Module = nn.Identity() if linear else FastPReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand -> 3x3 depthwise (stride s) -> linear 1x1 project (+ skip)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.block = nn.Sequential(
            ConvBlock(in_channels, hidden, 1),
            ConvBlock(hidden, hidden, 3, stride, 1, groups=hidden),
            ConvBlock(hidden, out_channels, 1, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet backbone: (N, 3, 112, 112) normalised images -> (N, d) unit-norm embeddings."""

    image_size = 112

    def __init__(self, embedding_dim: int = 128) -> None:
        super().__init__()
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        self.embedding_dim = embedding_dim
        self.conv1 = ConvBlock(3, 64, 3, 2, 1)
        self.dw_conv1 = ConvBlock(64, 64, 3, 1, 1, groups=64)
        layers: list[nn.Module] = []
        channels = 64
        for expansion, out_channels, repeats, stride in BOTTLENECK_SETTINGS:
            for i in range(repeats):
                layers.append(Bottleneck(channels, out_channels, stride if i == 0 else 1, expansion))
                channels = out_channels
        self.bottlenecks = nn.Sequential(*layers)
        self.conv2 = ConvBlock(channels, 512, 1)
        # GDConv: a depthwise conv whose kernel covers the whole 7x7 map, so each spatial position gets
        # its own learned weight (unlike global average pooling, which treats centre and border alike).
        final_map = self.image_size // 16
        self.gdconv = ConvBlock(512, 512, final_map, 1, 0, groups=512, linear=True)
        self.embedding = nn.Conv2d(512, embedding_dim, 1, bias=False)
        self.bn = nn.BatchNorm1d(embedding_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self)

    def unnormalized(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before L2 normalization (what a distance-based loss trains)."""
        x = self.dw_conv1(self.conv1(x))
        x = self.bottlenecks(x)
        x = self.gdconv(self.conv2(x))
        return self.bn(self.embedding(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.unnormalized(x), dim=1)
