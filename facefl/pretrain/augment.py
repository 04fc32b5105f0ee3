"""Pretraining's per-sample augmentation of a normalized batch (flip, zoom / shift / rotation, colour).

Seeded by a torch generator, so that an epoch's augmentation depends only on ``(seed, epoch)``; torch is
imported when called (``facefl --help`` stays fast).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from facefl.pretrain.config import Augmentation

__all__ = ["augment"]


def augment(x: Any, aug: Augmentation, gen: Any, mean: float | np.ndarray, std: float | np.ndarray) -> Any:
    """Apply ``aug`` to a normalised float (N, 3, S, S) tensor, drawing from torch generator ``gen``.

    ``mean`` and ``std`` are the normalisation's (one number, or one per channel in the tensor's order).
    """
    import torch
    import torch.nn.functional as F

    n = x.shape[0]

    def per_channel(value: float | np.ndarray) -> Any:  # (C, 1, 1) broadcasts over (N, C, H, W)
        return torch.from_numpy(np.asarray(value, np.float32)).reshape(-1, 1, 1) if np.ndim(value) else value

    mean_t, std_t = per_channel(mean), per_channel(std)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    if aug.flip > 0:
        mirror = torch.rand(n, generator=gen) < aug.flip
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    if aug.scale > 0 or aug.shift > 0 or aug.rotate > 0:
        zoom = torch.exp(uniform(-aug.scale, aug.scale))
        angle = uniform(-aug.rotate, aug.rotate) * (math.pi / 180.0)
        tx, ty = uniform(-2 * aug.shift, 2 * aug.shift), uniform(-2 * aug.shift, 2 * aug.shift)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if aug.brightness > 0 or aug.contrast > 0 or aug.saturation > 0 or aug.gray > 0:
        p = x * std_t + mean_t  # back to [0, 1] pixel intensities
        if aug.brightness > 0:
            p = p * uniform(1 - aug.brightness, 1 + aug.brightness)[:, None, None, None]
        lum = (0.299 * p[:, 0] + 0.587 * p[:, 1] + 0.114 * p[:, 2]).unsqueeze(1)
        if aug.contrast > 0:
            c = uniform(1 - aug.contrast, 1 + aug.contrast)[:, None, None, None]
            m = lum.mean(dim=(2, 3), keepdim=True)
            p, lum = (p - m) * c + m, (lum - m) * c + m
        if aug.saturation > 0 or aug.gray > 0:
            s = uniform(1 - aug.saturation, 1 + aug.saturation) if aug.saturation > 0 else torch.ones(n)
            if aug.gray > 0:
                s = torch.where(torch.rand(n, generator=gen) < aug.gray, torch.zeros(n), s)
            p = lum + (p - lum) * s[:, None, None, None]
        x = (p.clamp(0.0, 1.0) - mean_t) / std_t
    return x
