"""FedFR (Liu et al., 2022): generic + personalized face recognition with a public face set.

The pieces the device runs each round, as pure functions and one small module:

- :func:`select_hard_negatives`: public images whose cosine to any local image exceeds a threshold,
  picked on the device from a public feature bank it downloads whole (the server never learns which
  public faces resemble the device's people);
- :func:`cosface_logits`: CosFace over the union of local classes (the device's own classifier) and
  public classes (the global model's public classifier), so hard negatives push local identities away
  from the public faces that resemble them;
- :func:`contrastive_loss`: the MOON-style regularizer (positive: the frozen global model of this round;
  negative: the device's previous local model; omitted in the device's first round);
- :class:`DFC`: Decoupled Feature Customization, a converter ``Linear(d, d)`` initialized to identity
  followed by one binary classifier per local identity, trained with :func:`dfc_binary_loss`.

The DFC module and the local classifier stay on the device; the device uploads backbone and public
classifier deltas only. The personalized model is the device's backbone after local training followed by
the converter (see :meth:`DFC.convert`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DFC",
    "PUBLIC_HEAD_KEY",
    "contrastive_loss",
    "cosface_logits",
    "dfc_binary_loss",
    "select_hard_negatives",
    "sharpen_cosine",
]

# Name of the public classifier inside FedFR's global model (next to the backbone tensors).
PUBLIC_HEAD_KEY = "public_head.weight"


def select_hard_negatives(
    local_embeddings: np.ndarray,
    bank_embeddings: np.ndarray,
    threshold: float,
    max_count: int | None = None,
) -> np.ndarray:
    """Indices of bank rows whose cosine to any local embedding exceeds ``threshold``.

    Both inputs are L2-normalized (n, d) and (N, d) arrays. The result is sorted by decreasing maximum
    similarity, so ``max_count`` (a compute bound for small devices) keeps the hardest negatives.
    """
    if local_embeddings.ndim != 2 or bank_embeddings.ndim != 2:
        raise ValueError("embeddings must be 2-D (n, d) arrays")
    if local_embeddings.shape[1] != bank_embeddings.shape[1]:
        raise ValueError(
            f"dimension mismatch: local d={local_embeddings.shape[1]}, bank d={bank_embeddings.shape[1]}"
        )
    if max_count is not None and max_count < 0:
        raise ValueError("max_count must be >= 0")
    if len(local_embeddings) == 0 or len(bank_embeddings) == 0:
        return np.zeros(0, dtype=np.int64)
    best = np.full(len(bank_embeddings), -np.inf, dtype=np.float32)
    local = local_embeddings.astype(np.float32, copy=False)
    for start in range(0, len(bank_embeddings), 8192):  # bounded memory for large banks
        block = bank_embeddings[start : start + 8192].astype(np.float32, copy=False)
        best[start : start + len(block)] = (block @ local.T).max(axis=1)
    picked = np.flatnonzero(best > threshold)
    picked = picked[np.argsort(-best[picked], kind="stable")]
    if max_count is not None:
        picked = picked[:max_count]
    return picked.astype(np.int64)


def cosface_logits(
    embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float, margin: float
) -> torch.Tensor:
    """``scale * (cos(emb, w_c) - margin * [c == label])`` over the rows of ``weight``."""
    cos = F.linear(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1))
    onehot = F.one_hot(labels.long(), weight.shape[0]).to(cos.dtype)
    return scale * (cos - margin * onehot)


def contrastive_loss(
    z: torch.Tensor, z_global: torch.Tensor, z_previous: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """MOON's model-contrastive loss: pull ``z`` toward the global model's embedding, away from the last.

    ``-log(exp(cos(z, z_g)/T) / (exp(cos(z, z_g)/T) + exp(cos(z, z_p)/T)))``, averaged over the batch.
    """
    if not (z.shape == z_global.shape == z_previous.shape):
        raise ValueError("z, z_global and z_previous must have the same shape")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    pos = F.cosine_similarity(z, z_global, dim=1)
    neg = F.cosine_similarity(z, z_previous, dim=1)
    logits = torch.stack([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


def sharpen_cosine(cos: torch.Tensor, t: float) -> torch.Tensor:
    """FedFR's mapping ``g(c) = 2((c + 1)/2)^t - 1``: keeps [-1, 1], sharpens toward -1 for t > 1."""
    return 2.0 * ((cos + 1.0) / 2.0).clamp_min(0.0) ** t - 1.0


def dfc_binary_loss(
    cos: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor,
    *,
    scale: float = 30.0,
    margin: float = 0.4,
    t: float = 3.0,
    pos_weight: float = 0.7,
    neg_weight: float = 0.3,
) -> torch.Tensor:
    """One-vs-rest binary CosFace loss of DFC, averaged over samples and classes.

    ``cos`` (N, C) cosines to each local class, ``targets`` (N, C) in {0, 1}, ``bias`` (C,). A positive
    pays ``pos_weight * softplus(-(s (g(c) - m) + b))``, a negative
    ``neg_weight * softplus(s (g(c) + m) + b)``
    (the margin asks positives to clear the boundary by m and negatives to stay m below it).
    """
    if cos.shape != targets.shape or cos.dim() != 2 or bias.shape != (cos.shape[1],):
        raise ValueError("cos and targets must be (N, C) and bias (C,)")
    g = sharpen_cosine(cos, t)
    y = targets.to(cos.dtype)
    pos = pos_weight * y * F.softplus(-(scale * (g - margin) + bias))
    neg = neg_weight * (1.0 - y) * F.softplus(scale * (g + margin) + bias)
    return (pos + neg).mean()


class DFC(nn.Module):
    """Decoupled Feature Customization: the device's personal converter and binary classifiers.

    ``convert`` maps a backbone embedding to the personalized one (``normalize(converter(e))``); the
    converter starts as the identity so the first personalized model equals the backbone. ``forward``
    returns the binary loss for a batch whose ``labels`` are local class indices, or -1 for public images
    (negatives for every local class).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 30.0,
        margin: float = 0.4,
        t: float = 3.0,
        pos_weight: float = 0.7,
        neg_weight: float = 0.3,
    ) -> None:
        super().__init__()
        if embedding_dim <= 0 or num_classes <= 0:
            raise ValueError("embedding_dim and num_classes must be positive")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.scale, self.margin, self.t = float(scale), float(margin), float(t)
        self.pos_weight, self.neg_weight = float(pos_weight), float(neg_weight)
        self.converter = nn.Linear(embedding_dim, embedding_dim)
        with torch.no_grad():
            self.converter.weight.copy_(torch.eye(embedding_dim))
            self.converter.bias.zero_()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    @torch.no_grad()
    def init_classifiers(self, rows: torch.Tensor) -> None:
        """Start the binary classifiers from the local classifier's rows (C, d)."""
        if rows.shape != self.weight.shape:
            raise ValueError(f"expected rows of shape {tuple(self.weight.shape)}, got {tuple(rows.shape)}")
        self.weight.copy_(F.normalize(rows, dim=1))

    def convert(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.converter(embeddings), dim=1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(self.convert(embeddings), F.normalize(self.weight, dim=1))
        targets = torch.zeros_like(cos)
        local = labels >= 0
        targets[local.nonzero(as_tuple=True)[0], labels[local].long()] = 1.0
        return dfc_binary_loss(
            cos,
            targets,
            self.bias,
            scale=self.scale,
            margin=self.margin,
            t=self.t,
            pos_weight=self.pos_weight,
            neg_weight=self.neg_weight,
        )
