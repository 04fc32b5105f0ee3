"""Classification heads used to train embedding backbones.

The head is local to a training run (each federated device has its own identities), so it never
travels on the wire; only the backbone does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosFaceHead(nn.Module):
    """Large margin cosine loss head (CosFace / AM-softmax, Wang et al. 2018).

    ``logits = scale * (cos(theta) - margin * onehot(labels))`` where ``cos(theta)`` is the cosine between
    the embedding and each (L2-normalised) class weight row. Feed the logits to cross entropy.
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.4
    ) -> None:
        super().__init__()
        if embedding_dim <= 0 or num_classes <= 0:
            raise ValueError(
                f"embedding_dim and num_classes must be positive, got {embedding_dim}, {num_classes}"
            )
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if margin < 0:
            raise ValueError(f"margin must be non-negative, got {margin}")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.scale = float(scale)
        self.margin = float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, d) embeddings -> (N, C) cosine similarities to each class, no margin."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"expected embeddings of shape (N, {self.embedding_dim}), got {tuple(embeddings.shape)}"
            )
        # Re-normalising the embeddings is cheap and makes the head correct for any backbone.
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings)
        if labels.shape != (cos.shape[0],):
            raise ValueError(f"expected labels of shape ({cos.shape[0]},), got {tuple(labels.shape)}")
        onehot = F.one_hot(labels.long(), self.num_classes).to(cos.dtype)
        return self.scale * (cos - self.margin * onehot)

    @torch.no_grad()
    def init_from_embeddings(self, class_means: torch.Tensor) -> None:
        """Set each class row to that class's mean embedding (normalised).

        Why: a device starting a round from a global backbone already has useful embeddings; starting
        its fresh head at the class centroids avoids spending the (few) local steps on aligning a random
        head, which would otherwise push noisy gradients into the backbone.
        """
        if tuple(class_means.shape) != tuple(self.weight.shape):
            raise ValueError(
                f"class_means must have shape {tuple(self.weight.shape)}, got {tuple(class_means.shape)}"
            )
        self.weight.copy_(F.normalize(class_means.to(self.weight.dtype), dim=1))

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
            f"scale={self.scale}, margin={self.margin}"
        )
