"""The margin losses of facefl.losses on tiny tensors with hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facefl import losses
from facefl.algorithms import fedface, fedfr
from facefl.losses import (
    CosFaceHead,
    binary_cosface_loss,
    cosface_logits,
    cosine_similarities,
    margin_onehot,
    pair_margin_loss,
    positive_margin_loss,
    sharpen_cosine,
    spreadout_loss,
)
from facefl.models import CosFaceHead as ModelsCosFaceHead


def test_cosine_similarities_normalize_both_sides() -> None:
    emb = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    weight = torch.tensor([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[0.6, 0.8, 1.4 * r], [0.0, -1.0, -r]])
    torch.testing.assert_close(cosine_similarities(emb, weight), expected)


def test_margin_onehot_subtracts_the_margin_at_the_label_only() -> None:
    cos = torch.tensor([[0.5, 0.25], [0.0, 1.0]])
    # row 0, label 1: 4 * (0.5, 0.25 - 0.5); row 1, label 0: 4 * (0 - 0.5, 1)
    expected = torch.tensor([[2.0, -1.0], [-2.0, 4.0]])
    torch.testing.assert_close(margin_onehot(cos, torch.tensor([1, 0]), 4.0, 0.5), expected)


def test_cosface_logits_hand_computed() -> None:
    logits = cosface_logits(
        torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([0]), 2.0, 0.5
    )
    assert torch.allclose(logits, torch.tensor([[1.0, 0.0]]))


def test_cosface_cross_entropy_hand_computed() -> None:
    # cos = (1, 0), label 0, s = 1, m = 0.5: logits (0.5, 0); CE = log(1 + e^-0.5)
    logits = cosface_logits(torch.tensor([[1.0, 0.0]]), torch.eye(2), torch.tensor([0]), 1.0, 0.5)
    loss = F.cross_entropy(logits, torch.tensor([0]))
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-0.5)), rel=1e-6)


def test_cosface_head_hand_computed() -> None:
    head = CosFaceHead(embedding_dim=2, num_classes=2, scale=10.0, margin=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # rows normalise to e1, e2
    emb = torch.tensor([[0.6, 0.8], [3.0, 4.0]])  # second row is re-normalised by the head
    cos = head.cosine(emb)
    torch.testing.assert_close(cos, torch.tensor([[0.6, 0.8], [0.6, 0.8]]))
    logits = head(emb, torch.tensor([0, 1]))
    # label 0: 10 * (0.6 - 0.5), 10 * 0.8 ; label 1: 10 * 0.6, 10 * (0.8 - 0.5)
    torch.testing.assert_close(logits, torch.tensor([[1.0, 8.0], [6.0, 3.0]]))
    # the head and the function are the one formula
    torch.testing.assert_close(logits, cosface_logits(emb, head.weight, torch.tensor([0, 1]), 10.0, 0.5))


def test_cosface_head_init_from_embeddings_and_errors() -> None:
    head = CosFaceHead(embedding_dim=3, num_classes=2)
    means = torch.tensor([[0.0, 3.0, 4.0], [2.0, 0.0, 0.0]])
    head.init_from_embeddings(means)
    torch.testing.assert_close(head.weight.data, torch.tensor([[0.0, 0.6, 0.8], [1.0, 0.0, 0.0]]))
    assert head.weight.requires_grad
    with pytest.raises(ValueError, match="class_means"):
        head.init_from_embeddings(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="embeddings"):
        head.cosine(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="labels"):
        head(torch.zeros(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError):
        CosFaceHead(3, 0)
    with pytest.raises(ValueError, match="scale"):
        CosFaceHead(3, 2, scale=0.0)
    with pytest.raises(ValueError, match="margin"):
        CosFaceHead(3, 2, margin=-0.1)


def test_sharpen_cosine() -> None:
    out = sharpen_cosine(torch.tensor([-1.0, 0.0, 1.0]), 3.0)
    assert torch.allclose(out, torch.tensor([-1.0, -0.75, 1.0]))
    # t = 1 is the identity on [-1, 1]
    assert torch.allclose(sharpen_cosine(torch.tensor([-0.5, 0.25]), 1.0), torch.tensor([-0.5, 0.25]))


def test_binary_cosface_loss_hand_computed() -> None:
    cos = torch.tensor([[1.0]])
    pos = binary_cosface_loss(cos, torch.tensor([[1.0]]), torch.zeros(1), scale=2.0, margin=0.5, t=1.0)
    assert float(pos) == pytest.approx(0.7 * math.log(1 + math.exp(-1.0)), rel=1e-6)
    neg = binary_cosface_loss(cos * 0, torch.tensor([[0.0]]), torch.zeros(1), scale=1.0, margin=0.0, t=1.0)
    assert float(neg) == pytest.approx(0.3 * math.log(2.0), rel=1e-6)
    # a bias shifts the boundary: a negative at cos 0 with bias -1 pays 0.3 * softplus(-1)
    shifted = binary_cosface_loss(
        torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([-1.0]), scale=1.0, margin=0.0, t=1.0
    )
    assert float(shifted) == pytest.approx(0.3 * math.log(1 + math.exp(-1.0)), rel=1e-6)
    with pytest.raises(ValueError):
        binary_cosface_loss(cos, torch.zeros(1, 2), torch.zeros(1))


def test_positive_margin_loss_hand_computed() -> None:
    w = torch.tensor([1.0, 0.0])
    assert float(positive_margin_loss(torch.tensor([[3.0, 0.0]]), w)) == 0.0
    assert float(positive_margin_loss(torch.tensor([[0.0, 1.0]]), w)) == pytest.approx(0.81)
    assert float(positive_margin_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), w)) == pytest.approx(0.405)


def test_positive_margin_loss_does_not_move_w() -> None:
    w = torch.tensor([1.0, 0.0], requires_grad=True)
    positive_margin_loss(torch.tensor([[0.0, 1.0]], requires_grad=True), w).backward()
    assert w.grad is None


def test_spreadout_loss_hand_computed() -> None:
    assert float(spreadout_loss(torch.tensor([[1.0, 0.0], [2.0, 0.0]]))) == pytest.approx(1.0)
    assert float(spreadout_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))) == 0.0
    assert float(spreadout_loss(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))) == 0.0
    # three rows, one close pair (cos 0.8) and margin 0.5: 2 of 6 ordered pairs pay 0.3^2
    w = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    assert float(spreadout_loss(w, margin=0.5)) == pytest.approx(2 * 0.09 / 6)
    assert float(spreadout_loss(torch.tensor([[1.0, 0.0]]))) == 0.0


def test_the_algorithms_use_these_losses() -> None:
    """One formula: the algorithm modules' names are the functions of facefl.losses, not copies."""
    assert fedfr.cosface_logits is losses.cosface_logits
    assert fedfr.sharpen_cosine is losses.sharpen_cosine
    assert fedfr.dfc_binary_loss is losses.binary_cosface_loss
    assert fedface.positive_loss is losses.positive_margin_loss
    assert fedface.spreadout_loss is losses.spreadout_loss
    assert ModelsCosFaceHead is losses.CosFaceHead


def test_pair_margin_loss_counts_positives_and_as_many_hardest_negatives() -> None:
    # 1-d points: identity 0 at 0 and 1, identity 1 at 0 and 0.3; threshold 0.6, margin 0.04 (dlib's):
    # positives pay above 0.56: |0-1| = 1 -> 0.44, |0-0.3| -> 0
    # negatives pay below 0.64: d(0,2) = 0 -> 0.64, d(0,3) = 0.3 -> 0.34, d(1,2) = 1 -> 0, d(1,3) = 0.7 -> 0
    # two positive pairs, so the two hardest negatives count: (0.44 + 0 + 0.64 + 0.34) / 4
    emb = torch.tensor([[0.0], [1.0], [0.0], [0.3]])
    assert float(pair_margin_loss(emb, torch.tensor([0, 0, 1, 1]))) == pytest.approx(1.42 / 4)


def test_pair_margin_loss_can_count_every_violating_negative() -> None:
    # 1-d points: identity 0 at 0 and 0.5, identity 1 at 0.1, identity 2 at 0.2 (threshold 0.6, margin 0.04)
    # one positive pair: |0-0.5| = 0.5 < 0.56 -> 0
    # negatives pay below 0.64: d(0,0.1) -> 0.54, d(0,0.2) -> 0.44, d(0.5,0.1) -> 0.24, d(0.5,0.2) -> 0.34,
    # d(0.1,0.2) -> 0.54; dlib's counts the hardest one: (0 + 0.54) / 2; all five violate: (0 + 2.1) / 6
    emb = torch.tensor([[0.0], [0.5], [0.1], [0.2]])
    labels = torch.tensor([0, 0, 1, 2])
    assert float(pair_margin_loss(emb, labels)) == pytest.approx(0.54 / 2)
    assert float(pair_margin_loss(emb, labels, hardest_negatives=False)) == pytest.approx(2.1 / 6)
    # negatives beyond threshold + margin do not count, nor dilute the mean
    far = torch.tensor([[0.0], [1.0], [0.3], [5.0]])  # one positive (0.44), negatives 0.34 (0-0.3) only
    assert float(pair_margin_loss(far, labels, hardest_negatives=False)) == pytest.approx(0.78 / 2)


def test_pair_margin_loss_of_separated_identities_is_zero_and_pulls_far_positives_together() -> None:
    near = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.0, 0.2]])
    assert float(pair_margin_loss(near, torch.tensor([0, 0, 1, 1]))) == pytest.approx(0.0)
    far = torch.tensor([[0.0], [1.0], [10.0], [11.0]], requires_grad=True)
    pair_margin_loss(far, torch.tensor([0, 0, 1, 1])).backward()
    assert far.grad is not None
    assert float(far.grad[0, 0]) < 0 < float(far.grad[1, 0])  # a descent step moves them together


def test_pair_margin_loss_without_positive_pairs_takes_the_hardest_negative() -> None:
    emb = torch.tensor([[0.0], [0.2], [3.0]])  # three identities: negatives 0.44, 0, 0
    assert float(pair_margin_loss(emb, torch.tensor([0, 1, 2]))) == pytest.approx(0.44)
    with pytest.raises(ValueError, match="labels"):
        pair_margin_loss(emb, torch.tensor([0, 1]))
