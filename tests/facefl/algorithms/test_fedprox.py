import pytest
import torch

from facefl.algorithms.fedprox import proximal_term


def test_proximal_term_hand_computed() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    g = {"w": torch.tensor([0.0, 0.0])}
    term = proximal_term([("w", w)], g, mu=0.5)
    # 0.5 * 0.5 * (1 + 4) = 1.25
    assert term.item() == pytest.approx(1.25)
    term.backward()
    # d/dw mu/2 ||w-g||^2 = mu (w - g)
    torch.testing.assert_close(w.grad, torch.tensor([0.5, 1.0]))


def test_proximal_term_zero_mu_and_missing_names() -> None:
    w = torch.tensor([3.0])
    assert proximal_term([("w", w)], {"w": torch.tensor([1.0])}, mu=0.0).item() == 0.0
    assert proximal_term([("other", w)], {"w": torch.tensor([1.0])}, mu=1.0).item() == 0.0
    with pytest.raises(ValueError):
        proximal_term([("w", w)], {"w": w}, mu=-1.0)
