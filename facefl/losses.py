"""The margin losses of face-embedding training, in one place (PyTorch).

Every loss here works on cosines between L2-normalized embeddings and L2-normalized class rows
(:func:`cosine_similarities`), and asks a positive pair to clear the decision boundary by a margin:

- CosFace / AM-softmax (Wang et al., 2018), :func:`cosface_logits` and the trainable head
  :class:`CosFaceHead`: ``scale * (cos - margin * onehot(label))``, fed to cross entropy. Centralized
  pretraining, every device's private head and FedFR's union over local and public classes use it;
- the one-vs-rest binary CosFace of FedFR's DFC (:func:`binary_cosface_loss`, on cosines sharpened by
  :func:`sharpen_cosine`);
- FedFace's positive-only loss toward a fixed class embedding (:func:`positive_margin_loss`) and its
  server-side spreadout of class embeddings (:func:`spreadout_loss`);
- dlib's pairwise metric loss (:func:`pair_margin_loss`), the one exception to cosines: Euclidean
  distances between UNnormalized embeddings inside a batch, no class rows. dlib-resnet was trained with
  it, and fine-tuning that network with it keeps the geometry its weights were made for.

The functions are pure (no state, no device or dtype changes beyond broadcasting) and tested on tiny
tensors with hand-computed answers (``tests/facefl/test_losses.py``); the algorithms in
:mod:`facefl.algorithms` import them from here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CosFaceHead",
    "binary_cosface_loss",
    "cosface_logits",
    "cosine_similarities",
    "margin_onehot",
    "pair_margin_loss",
    "positive_margin_loss",
    "sharpen_cosine",
    "spreadout_loss",
]


def cosine_similarities(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, d) embeddings, (C, d) class rows -> (N, C) cosines (both sides L2-normalized here)."""
    return F.linear(F.normalize(embeddings, dim=1), F.normalize(weight, dim=1))


def margin_onehot(cos: torch.Tensor, labels: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """CosFace's logits from (N, C) cosines: ``scale * (cos - margin * onehot(labels))``."""
    onehot = F.one_hot(labels.long(), cos.shape[1]).to(cos.dtype)
    return scale * (cos - margin * onehot)


def cosface_logits(
    embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float, margin: float
) -> torch.Tensor:
    """``scale * (cos(emb, w_c) - margin * [c == label])`` over the rows of ``weight`` (feed to cross
    entropy with the same labels)."""
    return margin_onehot(cosine_similarities(embeddings, weight), labels, scale, margin)


class CosFaceHead(nn.Module):
    """A trainable CosFace classifier: one (L2-normalized) row per class, :func:`cosface_logits` out.

    The head is local to a training run (each federated device has its own identities), so it never
    travels on the wire; only the backbone does.
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
        return cosine_similarities(embeddings, self.weight)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings)
        if labels.shape != (cos.shape[0],):
            raise ValueError(f"expected labels of shape ({cos.shape[0]},), got {tuple(labels.shape)}")
        return margin_onehot(cos, labels, self.scale, self.margin)

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


def sharpen_cosine(cos: torch.Tensor, t: float) -> torch.Tensor:
    """FedFR's mapping ``g(c) = 2((c + 1)/2)^t - 1``: keeps [-1, 1], sharpens toward -1 for t > 1."""
    return 2.0 * ((cos + 1.0) / 2.0).clamp_min(0.0) ** t - 1.0


def binary_cosface_loss(
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
    """One-vs-rest binary CosFace loss (FedFR's DFC), averaged over samples and classes.

    ``cos`` (N, C) cosines to each class, ``targets`` (N, C) in {0, 1}, ``bias`` (C,). A positive
    pays ``pos_weight * softplus(-(s (g(c) - m) + b))``, a negative
    ``neg_weight * softplus(s (g(c) + m) + b)`` with ``g`` = :func:`sharpen_cosine`
    (the margin asks positives to clear the boundary by m and negatives to stay m below it).
    """
    if cos.shape != targets.shape or cos.dim() != 2 or bias.shape != (cos.shape[1],):
        raise ValueError("cos and targets must be (N, C) and bias (C,)")
    g = sharpen_cosine(cos, t)
    y = targets.to(cos.dtype)
    pos = pos_weight * y * F.softplus(-(scale * (g - margin) + bias))
    neg = neg_weight * (1.0 - y) * F.softplus(scale * (g + margin) + bias)
    return (pos + neg).mean()


def positive_margin_loss(embeddings: torch.Tensor, w: torch.Tensor, margin: float = 0.9) -> torch.Tensor:
    """``mean(relu(margin - cos(f(x), w))^2)`` (FedFace): positives only, ``w`` (d,) fixed (no gradient
    reaches it)."""
    cos = F.normalize(embeddings, dim=1) @ F.normalize(w.detach(), dim=0)
    return F.relu(margin - cos).pow(2).mean()


def spreadout_loss(w: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean over ordered pairs i != j of ``relu(cos(w_i, w_j) - margin)^2`` for rows of ``w`` (M, d)
    (FedFace's server pushes the class embeddings of different devices apart with it)."""
    m = w.shape[0]
    if m < 2:
        return w.sum() * 0.0
    cos = cosine_similarities(w, w)
    off = ~torch.eye(m, dtype=torch.bool, device=w.device)
    return F.relu(cos[off] - margin).pow(2).mean()


def pair_margin_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    threshold: float = 0.6,
    margin: float = 0.04,
    *,
    hardest_negatives: bool = True,
) -> torch.Tensor:
    """dlib's ``loss_metric`` on one batch of (N, d) unnormalized embeddings and (N,) identity labels.

    Each same-identity pair pays ``relu(distance - (threshold - margin))``, each different-identity pair
    ``relu(threshold + margin - distance)``; only the hardest negatives count, as many as there are
    positive pairs (at least one), and the sum is divided by the number of pairs counted. The defaults are
    dlib's (its descriptors match below a Euclidean distance of 0.6). ``hardest_negatives=False`` (not
    dlib's) counts every violating negative pair instead (those with a positive hinge, however many): a
    batch with more close strangers than positive pairs then pushes all of them apart.
    """
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"embeddings (N, d) and labels (N,), got {tuple(embeddings.shape)}, {tuple(labels.shape)}"
        )
    distances = torch.cdist(embeddings, embeddings)
    same = labels[:, None] == labels[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)
    positive = torch.relu(distances - (threshold - margin))[same & upper]
    negative = torch.relu(threshold + margin - distances)[~same & upper]
    if not hardest_negatives:
        violating = negative[negative > 0]
        return (positive.sum() + violating.sum()) / max(positive.numel() + violating.numel(), 1)
    k = min(max(positive.numel(), 1), negative.numel())
    hardest = torch.topk(negative, k).values
    return (positive.sum() + hardest.sum()) / max(positive.numel() + k, 1)
