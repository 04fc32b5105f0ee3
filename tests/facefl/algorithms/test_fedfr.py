import math

import numpy as np
import pytest
import torch

from facefl.algorithms.fedfr import (
    DFC,
    contrastive_loss,
    select_hard_negatives,
)


def test_hard_negatives_threshold_order_and_cap() -> None:
    local = np.array([[1.0, 0.0]], dtype=np.float32)
    bank = np.array([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)  # cosines 0.6, 0, 1
    assert select_hard_negatives(local, bank, 0.5).tolist() == [2, 0]
    assert select_hard_negatives(local, bank, 0.5, max_count=1).tolist() == [2]
    assert select_hard_negatives(local, bank, 0.99).tolist() == [2]
    assert select_hard_negatives(local[:0], bank, 0.5).tolist() == []


def test_hard_negatives_any_local_image_counts() -> None:
    local = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    bank = np.array([[0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    assert select_hard_negatives(local, bank, 0.4).tolist() == [0]


def test_hard_negatives_rejects_mismatched_dims() -> None:
    with pytest.raises(ValueError, match="dimension"):
        select_hard_negatives(np.zeros((1, 2)), np.zeros((3, 4)), 0.4)


def test_contrastive_loss_hand_computed() -> None:
    z = torch.tensor([[1.0, 0.0]])
    loss = contrastive_loss(z, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), temperature=0.5)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    # equidistant positive and negative: log 2
    same = contrastive_loss(z, torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]))
    assert float(same) == pytest.approx(math.log(2.0), rel=1e-6)


def test_dfc_starts_as_identity_and_public_images_are_negatives() -> None:
    torch.manual_seed(0)
    dfc = DFC(4, 2, scale=1.0, margin=0.0, t=1.0, pos_weight=1.0, neg_weight=1.0)
    e = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    assert torch.allclose(dfc.convert(e), e, atol=1e-6)
    dfc.init_classifiers(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[1.0, 0, 0, 0]])
    # a public image (label -1) equal to class 0's row: negative for both, cosines 1 and 0
    expected = (math.log(1 + math.e) + math.log(2.0)) / 2
    assert float(dfc(x, torch.tensor([-1])).detach()) == pytest.approx(expected, rel=1e-6)
    # the same image labelled class 0: positive for 0 (softplus(-1)), negative for 1 (softplus(0))
    expected = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2
    assert float(dfc(x, torch.tensor([0])).detach()) == pytest.approx(expected, rel=1e-6)


def test_dfc_training_lowers_its_loss() -> None:
    torch.manual_seed(0)
    dfc = DFC(8, 3)
    x = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)
    y = torch.randint(-1, 3, (30,))
    opt = torch.optim.SGD(dfc.parameters(), lr=0.1)
    first = float(dfc(x, y))
    for _ in range(50):
        opt.zero_grad()
        dfc(x, y).backward()
        opt.step()
    assert float(dfc(x, y)) < first * 0.8
