"""FedFace (Aggarwal et al., 2021): one identity per device, server-side spreadout of class embeddings.

The device holds one identity. Its class embedding ``w`` starts as the mean normalized embedding of its
images under the received model (or is the row the server last spread out for it); local training pulls
the device's embeddings toward the fixed ``w`` with :func:`positive_loss`. The device uploads its backbone
delta and ``w``. The server averages the backbones, then spreads the class embeddings of all devices
apart with a few gradient steps of :func:`spreadout_loss` (:func:`spreadout`), since no device ever sees
another identity to push away from.

Privacy trade-off (the paper's): ``w`` is a template of the device's one person and leaves the device. The
server keeps every device's row and sends each device only its own.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CLASS_EMBEDDING_KEY", "class_embedding", "positive_loss", "spreadout", "spreadout_loss"]

# Extra tensor in a FedFace update, next to the backbone delta.
CLASS_EMBEDDING_KEY = "fedface.class_embedding"


def class_embedding(embeddings: torch.Tensor) -> torch.Tensor:
    """The normalized mean of L2-normalized embeddings (n, d) -> (d,)."""
    if embeddings.dim() != 2 or len(embeddings) == 0:
        raise ValueError("need a non-empty (n, d) batch of embeddings")
    return F.normalize(F.normalize(embeddings, dim=1).mean(0), dim=0)


def positive_loss(embeddings: torch.Tensor, w: torch.Tensor, margin: float = 0.9) -> torch.Tensor:
    """``mean(relu(margin - cos(f(x), w))^2)``: positives only, ``w`` fixed (no gradient to it here)."""
    cos = F.normalize(embeddings, dim=1) @ F.normalize(w.detach(), dim=0)
    return F.relu(margin - cos).pow(2).mean()


def spreadout_loss(w: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean over ordered pairs i != j of ``relu(cos(w_i, w_j) - margin)^2`` for rows of ``w`` (M, d)."""
    m = w.shape[0]
    if m < 2:
        return w.sum() * 0.0
    wn = F.normalize(w, dim=1)
    cos = wn @ wn.T
    off = ~torch.eye(m, dtype=torch.bool, device=w.device)
    return F.relu(cos[off] - margin).pow(2).mean()


def spreadout(w: np.ndarray, *, margin: float = 0.0, steps: int = 10, lr: float = 1.0) -> np.ndarray:
    """Gradient steps of :func:`spreadout_loss` on normalized rows; returns normalized rows (M, d) float32.

    ``lr`` is per row: the gradient of a mean over M(M-1) pairs reaching one row shrinks as 1/M, so the
    step is scaled by M to keep its effect independent of how many devices have joined.
    """
    if w.ndim != 2:
        raise ValueError("class embeddings must be (M, d)")
    if steps < 0 or lr <= 0:
        raise ValueError("steps must be >= 0 and lr > 0")
    param = torch.nn.Parameter(F.normalize(torch.as_tensor(w, dtype=torch.float64), dim=1))
    opt = torch.optim.SGD([param], lr=lr * max(len(w), 1))
    for _ in range(steps):
        opt.zero_grad()
        spreadout_loss(param, margin).backward()
        opt.step()
        with torch.no_grad():
            param.copy_(F.normalize(param, dim=1))
    return param.detach().numpy().astype(np.float32)
