"""Gradient inversion: a curious server's best attempt to recover a device's images from its update.

In the style of Geiping et al., "Inverting Gradients -- How easy is it to break privacy in federated
learning?" (NeurIPS 2020): optimise dummy images so that the update they would produce matches the
observed update under cosine distance (:func:`cosine_matching_loss`, which ignores the update's scale, so
the learning rate or a norm clip does not hide anything), plus a total-variation image prior
(:func:`total_variation`), with Adam on the signed gradient, several random restarts, and the restart
with the lowest matching loss kept.

The attacker's knowledge of the device's training is the caller's ``update_fn``: images -> the update
those images would produce (differentiable with respect to the images). :func:`sgd_step_update` builds
it for one plain SGD step on a loss; the benchmark ``benchmarks/privacy_audit.py`` gives it the device's
CosFace loss and measures what the attack recovers under secure aggregation and differential privacy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "InversionConfig",
    "InversionResult",
    "UpdateFn",
    "cosine_matching_loss",
    "invert_update",
    "sgd_step_update",
    "total_variation",
]

#: images (n, C, H, W) -> the update (one tensor per parameter) they would produce, with a graph to them
UpdateFn = Callable[[torch.Tensor], list[torch.Tensor]]


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of (n, C, H, W) images: the mean absolute difference between vertical
    neighbours plus the mean absolute difference between horizontal neighbours (a scalar)."""
    if images.dim() != 4:
        raise ValueError(f"expected (n, C, H, W) images, got shape {tuple(images.shape)}")
    vertical = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs()
    horizontal = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs()
    zero = images.sum() * 0.0  # a 1-pixel side has no neighbours on that axis
    v = vertical.mean() if vertical.numel() else zero
    h = horizontal.mean() if horizontal.numel() else zero
    return v + h


def cosine_matching_loss(
    candidate: Sequence[torch.Tensor], observed: Sequence[torch.Tensor], eps: float = 1e-35
) -> torch.Tensor:
    """``1 - <c, o> / (|c| |o|)`` with ``c`` and ``o`` the concatenations of all tensors (in [0, 2]).

    Zero when the candidate update points exactly the observed way, whatever its scale (a trained model's
    updates can have norms around 1e-9, so ``eps``, which keeps an all-zero update at loss 1, sits near
    float32's smallest normal number rather than at a "small" 1e-12)."""
    if len(candidate) != len(observed) or not candidate:
        raise ValueError(
            f"need the same non-zero number of tensors, got {len(candidate)} and {len(observed)}"
        )
    dot = candidate[0].new_zeros(())
    c_sq = candidate[0].new_zeros(())
    o_sq = candidate[0].new_zeros(())
    for c, o in zip(candidate, observed, strict=True):
        if c.shape != o.shape:
            raise ValueError(f"shape mismatch: candidate {tuple(c.shape)} vs observed {tuple(o.shape)}")
        dot = dot + (c * o).sum()
        c_sq = c_sq + c.pow(2).sum()
        o_sq = o_sq + o.pow(2).sum()
    return 1.0 - dot / (c_sq.sqrt() * o_sq.sqrt()).clamp_min(eps)


def sgd_step_update(
    params: Sequence[torch.nn.Parameter], loss_of: Callable[[torch.Tensor], torch.Tensor], lr: float
) -> UpdateFn:
    """The update ``-lr * grad(loss_of(images))`` of one plain SGD step on ``params``, as an
    :data:`UpdateFn` (with ``create_graph``, so that the attack can differentiate it by the images)."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    plist = list(params)

    def update(images: torch.Tensor) -> list[torch.Tensor]:
        grads = torch.autograd.grad(loss_of(images), plist, create_graph=True)
        return [-lr * g for g in grads]

    return update


@dataclass(frozen=True)
class InversionConfig:
    """The attack's settings (Geiping et al.'s recipe: Adam on signed gradients, the step size divided by
    10 at 3/8, 5/8 and 7/8 of the iterations, pixels kept in their valid range)."""

    iterations: int = 300
    restarts: int = 2
    lr: float = 0.1
    tv_weight: float = 1e-2
    signed_gradients: bool = True
    pixel_bounds: tuple[float, float] = (-1.0, 1.0)  # facefl's (x / 255 - 0.5) / 0.5
    init_std: float = 1.0  # restarts start from N(0, init_std^2) noise, clamped to pixel_bounds
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.restarts < 1:
            raise ValueError(f"iterations and restarts must be >= 1, got {self.iterations}, {self.restarts}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not (self.init_std >= 0 and math.isfinite(self.init_std)):
            raise ValueError(f"init_std must be non-negative and finite, got {self.init_std}")
        if not (self.tv_weight >= 0 and math.isfinite(self.tv_weight)):
            raise ValueError(f"tv_weight must be non-negative and finite, got {self.tv_weight}")
        lo, hi = self.pixel_bounds
        if not lo < hi:
            raise ValueError(f"pixel_bounds must be (low, high) with low < high, got {self.pixel_bounds}")


@dataclass(frozen=True)
class InversionResult:
    images: torch.Tensor  # the best restart's images (n, C, H, W), detached
    matching_loss: float  # its cosine matching loss (without the prior)
    restart_losses: tuple[float, ...]  # every restart's final matching loss, in order


def _matching(update_fn: UpdateFn, images: torch.Tensor, observed: Sequence[torch.Tensor]) -> float:
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        return float(cosine_matching_loss(update_fn(x), observed).detach())


def invert_update(
    update_fn: UpdateFn,
    observed: Sequence[torch.Tensor],
    shape: tuple[int, int, int, int],
    config: InversionConfig = InversionConfig(),
    on_iteration: Callable[[], None] | None = None,
) -> InversionResult:
    """Images of ``shape`` whose update (``update_fn``) best matches ``observed`` (see the module doc).

    Deterministic for a given ``config.seed`` (restart ``r`` starts from Gaussian noise seeded
    ``seed + r``); ``on_iteration`` is called after every optimisation step (progress bars)."""
    target = [o.detach() for o in observed]
    lo, hi = config.pixel_bounds
    milestones = [int(config.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    best: torch.Tensor | None = None
    losses: list[float] = []
    for restart in range(config.restarts):
        gen = torch.Generator().manual_seed(config.seed + restart)
        x = (config.init_std * torch.randn(shape, generator=gen)).clamp_(lo, hi).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=config.lr)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        for _ in range(config.iterations):
            optimizer.zero_grad(set_to_none=True)
            loss = cosine_matching_loss(update_fn(x), target)
            if config.tv_weight > 0:
                loss = loss + config.tv_weight * total_variation(x)
            (grad,) = torch.autograd.grad(loss, [x])
            x.grad = grad.sign() if config.signed_gradients else grad
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
            if on_iteration is not None:
                on_iteration()
        final = _matching(update_fn, x, target)
        losses.append(final)
        if best is None or final <= min(losses):
            best = x.detach().clone()
    assert best is not None  # restarts >= 1
    return InversionResult(images=best, matching_loss=min(losses), restart_losses=tuple(losses))
