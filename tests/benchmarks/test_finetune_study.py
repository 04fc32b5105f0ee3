"""dlib's pairwise metric loss as benchmarks/finetune_study.py computes it, on points with hand-computed
distances (threshold 0.6, margin 0.04: positives pay above 0.56, negatives below 0.64)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.finetune_study import dlib_metric_loss


def test_positives_and_as_many_hardest_negatives() -> None:
    # 1-d points: identity 0 at 0 and 1, identity 1 at 0 and 0.3
    emb = torch.tensor([[0.0], [1.0], [0.0], [0.3]])
    labels = torch.tensor([0, 0, 1, 1])
    # positives: |0-1| = 1 -> 0.44; |0-0.3| = 0.3 -> 0
    # negatives: d(0,2) = 0 -> 0.64; d(0,3) = 0.3 -> 0.34; d(1,2) = 1 -> 0; d(1,3) = 0.7 -> 0
    # two positive pairs, so the two hardest negatives count: (0.44 + 0 + 0.64 + 0.34) / 4
    assert float(dlib_metric_loss(emb, labels)) == pytest.approx(1.42 / 4)


def test_well_separated_identities_cost_nothing() -> None:
    emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.0, 0.2]])
    assert float(dlib_metric_loss(emb, torch.tensor([0, 0, 1, 1]))) == pytest.approx(0.0)


def test_gradient_pulls_a_far_positive_closer() -> None:
    emb = torch.tensor([[0.0], [1.0], [10.0], [11.0]], requires_grad=True)
    dlib_metric_loss(emb, torch.tensor([0, 0, 1, 1])).backward()
    assert emb.grad is not None
    assert float(emb.grad[0, 0]) < 0 < float(emb.grad[1, 0])  # descending moves them together
