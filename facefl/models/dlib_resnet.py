"""``dlib-resnet``: the ResNet of dlib's face recognition model (``anet_type`` in dlib's
``examples/dnn_face_recognition_ex.cpp``, the network of ``dlib_face_recognition_resnet_model_v1.dat``).

150x150 RGB chips (dlib's ``get_face_chip`` geometry, padding 0.25), normalised as dlib does it:
``(pixel - [122.782, 117.001, 104.298]) / 256`` (see :data:`DLIB_PREPROCESSING`). Input side to output side:

    stem    conv 7x7/2 32 -> affine -> relu -> max pool 3x3/2                      150 -> 72 -> 35
    level4  3 x residual(32)                                                       35
    level3  residual_down(64)  + 3 x residual(64)                                  17
    level2  residual_down(128) + 2 x residual(128)                                 8
    level1  residual_down(256) + 2 x residual(256)                                 4
    level0  residual_down(256)                                                     2
    fc      global average pool -> linear 256 -> d (no bias), then L2 normalisation (as every facefl backbone)

A residual block is ``relu(shortcut + affine(conv3x3(relu(affine(conv3x3/stride(x))))))``. dlib's batch norm
is stored folded into ``affine`` layers (a per-channel scale and shift), which :class:`Affine` reproduces as
ordinary trainable parameters. Three dlib details matter for matching its output exactly:

- a convolution or pooling with stride 2 has no padding (dlib pads ``k // 2`` only at stride 1);
- the downsampling shortcut is a 2x2/2 average pool of the block input, without a projection;
- the sum of a residual block zero-pads the smaller operand (channels and rows/columns, at the end) up to
  the larger one. At level1 the body is 3x3 and the shortcut 4x4 (at level0: 1x1 and 2x2), so the sum has
  the shortcut's size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facefl.data.preprocess import Preprocessing

IMAGE_SIZE = 150
EMBEDDING_DIM = 128
#: dlib's input_rgb_image_sized<150> means, written in facefl's ``(x / 255 - mean) / std`` form.
DLIB_PIXEL_MEAN = (122.782, 117.001, 104.298)
DLIB_PREPROCESSING = Preprocessing(
    IMAGE_SIZE,
    mean=(DLIB_PIXEL_MEAN[0] / 255.0, DLIB_PIXEL_MEAN[1] / 255.0, DLIB_PIXEL_MEAN[2] / 255.0),
    std=256.0 / 255.0,
)

#: (name, channels, residual_down first?, blocks): dlib's alevel4 .. alevel0, input side first.
LEVELS: tuple[tuple[str, int, bool, int], ...] = (
    ("level4", 32, False, 3),
    ("level3", 64, True, 4),
    ("level2", 128, True, 3),
    ("level1", 256, True, 3),
    ("level0", 256, True, 1),
)

#: Parameter groups (name -> parameter-name prefixes), input side first: the stem, dlib's five residual
#: levels (level4 nearest the input ... level0, keeping dlib's numbering) and the final linear layer.
PARAMETER_GROUPS: dict[str, tuple[str, ...]] = {
    "stem": ("stem.",),
    **{name: (f"{name}.",) for name, _, _, _ in LEVELS},
    "fc": ("fc.",),
}


class Affine(nn.Module):
    """``y = x * weight + bias`` per channel: dlib's ``affine`` layer (batch norm folded, trainable)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Conv2d:
    # dlib's padding rule: k // 2 at stride 1, none otherwise
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2 if stride == 1 else 0)


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` where the smaller operand is zero-padded (channels, rows, columns at the end), as dlib's
    ``add_prev`` does. Shapes are fixed for a given input size, so exported graphs get constant pads."""
    c, h, w = (max(int(a.shape[i]), int(b.shape[i])) for i in (1, 2, 3))

    def grow(t: torch.Tensor) -> torch.Tensor:
        pad = (0, w - int(t.shape[3]), 0, h - int(t.shape[2]), 0, c - int(t.shape[1]))
        return F.pad(t, pad) if any(pad) else t

    return grow(a) + grow(b)


class ResidualBlock(nn.Module):
    """dlib's ``ares`` (stride 1) and ``ares_down`` (stride 2, average-pooled shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = _conv(cin, cout, 3, stride)
        self.affine1 = Affine(cout)
        self.conv2 = _conv(cout, cout, 3, 1)
        self.affine2 = Affine(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = x if self.stride == 1 else F.avg_pool2d(x, 2, 2)
        return F.relu(add_zero_padded(body, shortcut))


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv(3, 32, 7, 2)
        self.affine = Affine(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.affine(self.conv(x))), 3, 2)


class DlibResNet(nn.Module):
    """(N, 3, 150, 150) -> (N, d) unit vectors; with d = 128 it holds dlib's pretrained weights."""

    def __init__(self, embedding_dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.stem = Stem()
        cin = 32
        for name, cout, down, blocks in LEVELS:
            first = ResidualBlock(cin, cout, 2 if down else 1)
            self.add_module(
                name, nn.Sequential(first, *(ResidualBlock(cout, cout, 1) for _ in range(blocks - 1)))
            )
            cin = cout
        self.fc = nn.Linear(cin, embedding_dim, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The unnormalised output (dlib's face descriptor when the weights are dlib's)."""
        x = self.stem(x)
        for name, _, _, _ in LEVELS:
            x = getattr(self, name)(x)
        return self.fc(x.mean(dim=(2, 3)))

    def unnormalized(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding before L2 normalization, as every backbone names it."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=1)
