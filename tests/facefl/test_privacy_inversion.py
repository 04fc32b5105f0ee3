"""facefl.privacy.inversion: the prior and the matching loss on hand-computed tensors, and the attack on a
tiny model (it recovers an image from a plain gradient, and not from a heavily noised one)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facefl.privacy.inversion import (
    InversionConfig,
    cosine_matching_loss,
    invert_update,
    sgd_step_update,
    total_variation,
)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The attack is hundreds of tiny steps: extra threads only contend on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_total_variation_by_hand() -> None:
    x = torch.tensor([[0.0, 1.0], [3.0, 5.0]]).reshape(1, 1, 2, 2)
    # vertical |3 - 0|, |5 - 1| -> mean 3.5; horizontal |1 - 0|, |5 - 3| -> mean 1.5
    assert float(total_variation(x)) == pytest.approx(5.0)
    two = torch.cat([x, torch.zeros_like(x)])  # a flat image halves both means
    assert float(total_variation(two)) == pytest.approx(2.5)
    assert float(total_variation(torch.full((1, 3, 4, 4), 0.7))) == 0.0
    assert float(total_variation(torch.ones(1, 3, 1, 1))) == 0.0  # no neighbours at all
    with pytest.raises(ValueError, match="expected"):
        total_variation(torch.zeros(3, 4, 4))


def test_cosine_matching_loss_by_hand() -> None:
    t = torch.tensor
    assert float(cosine_matching_loss([t([1.0, 0.0])], [t([1.0, 0.0])])) == pytest.approx(0.0)
    assert float(cosine_matching_loss([t([1.0, 0.0])], [t([0.0, 1.0])])) == pytest.approx(1.0)
    assert float(cosine_matching_loss([t([1.0, 0.0])], [t([-2.0, 0.0])])) == pytest.approx(2.0)
    assert float(cosine_matching_loss([t([3.0, 6.0])], [t([1.0, 2.0])])) == pytest.approx(0.0, abs=1e-7)
    # over all tensors at once: c = (1, 1 | 0), o = (1, 0 | 1): 1 - 1 / (sqrt2 sqrt2) = 0.5
    pair = cosine_matching_loss([t([1.0, 1.0]), t([0.0])], [t([1.0, 0.0]), t([1.0])])
    assert float(pair) == pytest.approx(0.5)
    assert float(cosine_matching_loss([t([0.0, 0.0])], [t([1.0, 2.0])])) == pytest.approx(1.0)
    tiny = [t([3e-10, -1e-10]), t([2e-10])]  # a trained model's one-image update can be this small
    assert float(cosine_matching_loss(tiny, [2 * x for x in tiny])) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_matching_loss(tiny, [-x for x in tiny])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="shape"):
        cosine_matching_loss([t([1.0])], [t([1.0, 2.0])])
    with pytest.raises(ValueError, match="same"):
        cosine_matching_loss([t([1.0])], [])


def test_sgd_step_update_is_minus_lr_times_the_gradient() -> None:
    w = nn.Parameter(torch.tensor([2.0, -1.0]))
    update = sgd_step_update([w], lambda x: (x * w).sum() + (w**2).sum(), lr=0.5)
    x = torch.tensor([[1.0, 3.0], [0.5, 0.5]], requires_grad=True)
    (delta,) = update(x)
    # grad = sum of the rows of x + 2 w = (1.5, 3.5) + (4, -2) = (5.5, 1.5)
    assert delta.tolist() == pytest.approx([-2.75, -0.75])
    (dx,) = torch.autograd.grad(delta.sum(), [x])  # differentiable by the images
    assert dx.flatten().tolist() == pytest.approx([-0.5] * 4)
    with pytest.raises(ValueError, match="lr"):
        sgd_step_update([w], lambda x: x.sum(), lr=0.0)


def test_config_refuses_bad_settings() -> None:
    for bad in (
        {"iterations": 0},
        {"restarts": 0},
        {"lr": -1.0},
        {"tv_weight": float("nan")},
        {"init_std": -0.1},
        {"pixel_bounds": (1.0, -1.0)},
    ):
        with pytest.raises(ValueError):
            InversionConfig(**bad)  # type: ignore[arg-type]


class _TinyNet(nn.Module):
    """conv 3->4 (16x16) -> tanh -> linear to 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _setting() -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], object]:
    torch.manual_seed(0)
    model = _TinyNet()
    gen = torch.Generator().manual_seed(1)
    # a smooth image in [-1, 1] (a 4x4 random pattern upsampled), as faces are smooth at this scale
    image = F.interpolate(torch.rand(1, 3, 4, 4, generator=gen) * 2 - 1, size=16, mode="bilinear")
    labels = torch.tensor([0])
    update = sgd_step_update(list(model.parameters()), lambda x: F.cross_entropy(model(x), labels), lr=0.1)
    plain = [u.detach() for u in update(image)]
    norm = float(torch.sqrt(torch.stack([(u**2).sum() for u in plain]).sum()))
    size = sum(u.numel() for u in plain)
    # noise of 10 times the update's norm in total
    noisy = [u + torch.randn(u.shape, generator=gen) * 10 * norm / size**0.5 for u in plain]
    return image, plain, noisy, update


def test_attack_recovers_a_plain_update_and_not_a_noisy_one(one_thread: None) -> None:
    image, plain, noisy, update = _setting()
    config = InversionConfig(iterations=150, restarts=2, lr=0.1, tv_weight=1e-3, seed=0)
    got = invert_update(update, plain, (1, 3, 16, 16), config)  # type: ignore[arg-type]
    one_restart = InversionConfig(iterations=150, restarts=1, lr=0.1, tv_weight=1e-3, seed=0)
    got_noisy = invert_update(update, noisy, (1, 3, 16, 16), one_restart)  # type: ignore[arg-type]
    mse = float(((got.images - image) ** 2).mean())
    mse_noisy = float(((got_noisy.images - image) ** 2).mean())
    mse_gray = float((image**2).mean())  # a mid-grey guess, knowing nothing
    # measured (seeded): mse 5e-4, mse_noisy 0.38, mse_gray 0.16; the margins below are far from both
    assert got.images.shape == (1, 3, 16, 16)
    assert len(got.restart_losses) == 2 and got.matching_loss == min(got.restart_losses)
    assert got.matching_loss < got_noisy.matching_loss
    assert mse < 0.5 * mse_noisy
    assert mse < 0.5 * mse_gray
    assert float(got.images.min()) >= -1.0 and float(got.images.max()) <= 1.0


def test_attack_is_deterministic_for_a_seed(one_thread: None) -> None:
    _, plain, _, update = _setting()
    config = InversionConfig(iterations=5, restarts=1, seed=3)
    a = invert_update(update, plain, (1, 3, 16, 16), config)  # type: ignore[arg-type]
    b = invert_update(update, plain, (1, 3, 16, 16), config)  # type: ignore[arg-type]
    assert torch.equal(a.images, b.images)
