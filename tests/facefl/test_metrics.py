"""Metrics: hand-computed tiny cases, brute-force and scikit-learn cross-checks, and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facefl import metrics as m
from tests.facefl.naive_metrics import naive_dir, naive_tar_at_far

# Case A: 4 genuine + 4 impostor scores, with a tie across classes at 0.6.
#   genuine  0.9 0.8 0.6 0.3
#   impostor 0.7 0.6 0.2 0.1
# thresholds  inf  0.9  0.8  0.7  0.6  0.3  0.2  0.1
# accepted TP  0    1    2    2    3    4    4    4     -> TAR 0 .25 .5 .5 .75 1 1 1
# accepted FP  0    0    0    1    2    2    3    4     -> FAR 0 0 0 .25 .5 .5 .75 1
# (at 0.6 the genuine 0.6 and impostor 0.6 are accepted together)
A_SCORES = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.6, 0.2, 0.1])
A_SAME = np.array([True, True, True, True, False, False, False, False])


def test_roc_curve_hand_computed_with_cross_class_tie() -> None:
    far, tar, thr = m.roc_curve(A_SCORES, A_SAME)
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1])
    np.testing.assert_array_equal(tar, [0, 0.25, 0.5, 0.5, 0.75, 1, 1, 1])
    np.testing.assert_array_equal(far, [0, 0, 0, 0.25, 0.5, 0.5, 0.75, 1])


def test_roc_curve_accepts_0_1_labels_and_any_order() -> None:
    perm = np.random.default_rng(1).permutation(A_SCORES.size)
    far, tar, thr = m.roc_curve(A_SCORES[perm], A_SAME[perm].astype(int))
    far0, tar0, thr0 = m.roc_curve(A_SCORES, A_SAME)
    np.testing.assert_array_equal(far, far0)
    np.testing.assert_array_equal(tar, tar0)
    np.testing.assert_array_equal(thr, thr0)


def test_auc_counts_ties_as_half() -> None:
    # Mann-Whitney over the 16 (genuine, impostor) pairs:
    #   g0.9 beats 4; g0.8 beats 4; g0.6 beats 0.2, 0.1 and ties 0.6 -> 2.5; g0.3 beats 0.2, 0.1 -> 2
    #   (4 + 4 + 2.5 + 2) / 16 = 12.5 / 16 = 0.78125
    assert m.roc_auc(A_SCORES, A_SAME) == pytest.approx(0.78125)
    # all tied: every pair is a tie -> 0.5
    assert m.roc_auc([0.3, 0.3, 0.3], [True, False, True]) == pytest.approx(0.5)
    # perfectly separated -> 1; perfectly inverted -> 0
    assert m.roc_auc([0.9, 0.8, 0.1], [True, True, False]) == pytest.approx(1.0)
    assert m.roc_auc([0.1, 0.2, 0.9], [True, True, False]) == pytest.approx(0.0)


def test_tar_at_far_hand_computed_cannot_split_a_tie_group() -> None:
    # far=0 -> last threshold with FP=0 is 0.8: TAR 0.5
    assert m.tar_at_far(A_SCORES, A_SAME, 0.0) == 0.5
    assert m.threshold_at_far(A_SCORES, A_SAME, 0.0) == 0.8
    # far=0.25 -> threshold 0.7 (FAR .25, TAR .5); going to 0.6 accepts the tied impostor too (FAR .5),
    # so the genuine 0.6 stays rejected: TAR 0.5, not 0.75
    assert m.tar_at_far(A_SCORES, A_SAME, 0.25) == 0.5
    assert m.threshold_at_far(A_SCORES, A_SAME, 0.25) == 0.7
    assert m.tar_at_far(A_SCORES, A_SAME, 0.3) == 0.5
    # far=0.5 -> the lowest threshold with FAR <= .5 is 0.3: TAR 1
    assert m.tar_at_far(A_SCORES, A_SAME, 0.5) == 1.0
    assert m.threshold_at_far(A_SCORES, A_SAME, 0.5) == 0.3
    assert m.tar_at_far(A_SCORES, A_SAME, 1.0) == 1.0
    assert m.threshold_at_far(A_SCORES, A_SAME, 1.0) == 0.1


def test_tar_at_far_only_inf_qualifies_gives_zero() -> None:
    # genuine 0.9 0.5; impostors 0.9 0.9 0.1 0.1 0.1 (5)
    # thresholds inf (TP0 FP0), 0.9 (TP1 FP2 -> FAR .4), 0.5 (TP2 FP2 -> FAR .4), 0.1 (TP2 FP5)
    scores = [0.9, 0.5, 0.9, 0.9, 0.1, 0.1, 0.1]
    same = [True, True, False, False, False, False, False]
    # far=0.2 allows one false accept, but the top group holds two impostors: only +inf qualifies
    assert m.tar_at_far(scores, same, 0.2) == 0.0
    assert m.threshold_at_far(scores, same, 0.2) == math.inf
    # far=0.4 -> lowest admissible is 0.5: TAR 1
    assert m.tar_at_far(scores, same, 0.4) == 1.0
    assert m.threshold_at_far(scores, same, 0.4) == 0.5


def test_far_comparison_tolerates_float_rounding() -> None:
    # impostors: 3 at .9, 1 at .4, 6 at 0; genuine .95 .9 .3
    # threshold .9 accepts 3 of 10 impostors (FAR .3) and 2 of 3 genuine; .4 would accept 4 impostors.
    # 0.7 - 0.4 is 0.29999999999999993 in floats: FAR .3 must still count as <= it
    scores = np.r_[[0.95, 0.9, 0.3], np.full(3, 0.9), 0.4, np.zeros(6)]
    same = np.r_[np.ones(3, bool), np.zeros(10, bool)]
    assert 0.7 - 0.4 < 0.3
    assert m.tar_at_far(scores, same, 0.7 - 0.4) == pytest.approx(2 / 3)
    assert m.threshold_at_far(scores, same, 0.7 - 0.4) == 0.9


def test_best_accuracy_threshold_and_accuracy_at() -> None:
    # case A, correct = TP + (4 - FP) per threshold:
    #   inf 4 | 0.9 5 | 0.8 6 | 0.7 5 | 0.6 5 | 0.3 6 | 0.2 5 | 0.1 4
    # best 6 first reached at 0.8 (highest wins); next lower distinct score 0.7 -> midpoint 0.75
    t = m.best_accuracy_threshold(A_SCORES, A_SAME)
    assert t == pytest.approx(0.75)
    assert m.accuracy_at(A_SCORES, A_SAME, t) == pytest.approx(6 / 8)
    assert m.accuracy_at(A_SCORES, A_SAME, 0.3) == pytest.approx(6 / 8)
    assert m.accuracy_at(A_SCORES, A_SAME, math.inf) == pytest.approx(0.5)
    # score >= threshold is accepted: 0.6 accepts both tied 0.6 pairs -> 3 TP + 2 TN
    assert m.accuracy_at(A_SCORES, A_SAME, 0.6) == pytest.approx(5 / 8)
    # one class is fine for accuracy_at
    assert m.accuracy_at([0.2, 0.4], [False, False], 0.3) == pytest.approx(0.5)


def test_best_accuracy_threshold_extremes() -> None:
    # correct per threshold: inf 1 | .9 2 | .7 1 | .5 2 | .1 3 -> accepting everything wins -> lowest score
    assert m.best_accuracy_threshold([0.9, 0.5, 0.1, 0.7], [True, True, True, False]) == 0.1
    # correct per threshold: inf 2 | .9 1 | .8 0 | .1 1 -> rejecting everything wins -> +inf
    assert m.best_accuracy_threshold([0.9, 0.8, 0.1], [False, False, True]) == math.inf


def test_kfold_threshold_chosen_on_other_folds_only() -> None:
    # dyadic scores so the midpoints are exact
    # fold 0: genuine .875 .75   impostor .5 .125
    # fold 1: genuine .625 .375  impostor .5625 0
    scores = [0.875, 0.75, 0.5, 0.125, 0.625, 0.375, 0.5625, 0.0]
    same = [True, True, False, False, True, True, False, False]
    folds = [0, 0, 0, 0, 1, 1, 1, 1]
    # fold 0 tested, threshold from fold 1: correct per threshold
    #   inf 2 | .625 3 | .5625 2 | .375 3 | 0 2 -> best .625 (highest), midpoint with .5625 = .59375
    #   on fold 0: .875 acc, .75 acc, .5 rej, .125 rej -> 4/4 = 1.0
    # fold 1 tested, threshold from fold 0:
    #   inf 2 | .875 3 | .75 4 | .5 3 | .125 2 -> best .75, midpoint with .5 = .625
    #   on fold 1: .625 acc (>=), .375 rej (wrong), .5625 rej, 0 rej -> 3/4
    # mean .875, std (population) .125
    mean, std, thr = m.kfold_verification_accuracy(scores, same, folds)
    assert mean == pytest.approx(0.875)
    assert std == pytest.approx(0.125)
    np.testing.assert_array_equal(thr, [0.59375, 0.625])
    # fold labels may be any sortable values, in any order
    mean2, std2, thr2 = m.kfold_verification_accuracy(
        scores[::-1], same[::-1], ["b" if f else "a" for f in folds][::-1]
    )
    assert (mean2, std2) == (mean, std)
    np.testing.assert_array_equal(thr2, thr)


def test_verification_report_keys_and_values() -> None:
    folds = [0, 1, 0, 1, 0, 1, 0, 1]
    rep = m.verification_report(A_SCORES, A_SAME, folds)
    assert list(rep) == ["accuracy", "accuracy_std", "auc", "tar@far=1e-2", "tar@far=1e-3", "pairs"]
    mean, std, _ = m.kfold_verification_accuracy(A_SCORES, A_SAME, folds)
    assert rep["accuracy"] == mean and rep["accuracy_std"] == std
    assert rep["auc"] == pytest.approx(0.78125)
    assert rep["tar@far=1e-2"] == 0.5 and rep["tar@far=1e-3"] == 0.5  # only FAR 0 fits with 4 impostors
    assert rep["pairs"] == 8.0


def test_cosine_scores() -> None:
    a = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    b = np.array([[5.0, 0.0], [-3.0, -4.0], [1.0, 0.0]])
    np.testing.assert_allclose(m.cosine_scores(a, b), [1.0, -1.0, 1 / math.sqrt(2)])
    with pytest.raises(ValueError, match="zero"):
        m.cosine_scores(a, np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="same shape"):
        m.cosine_scores(a, b[:2])
    with pytest.raises(ValueError, match="NaN"):
        m.cosine_scores(a, np.where(b == 5.0, np.nan, b))
    with pytest.raises(ValueError, match="2-D"):
        m.cosine_scores(a[0], b[0])


# Open-set identification, gallery of 2 identities:
#   probe  truth  sims        top-1 score  note
#   p0     0      [.9, .1]    .9           correct
#   p1     1      [.2, .8]    .8           correct
#   p2     0      [.3, .6]    .6           misidentified (top-1 is identity 1)
#   p3     1      [.1, .4]    .4           correct
#   p4     -1     [.7, .5]    .7           impostor
#   p5     -1     [.2, .3]    .3           impostor
#   p6     -1     [.1, .2]    .2           impostor
#   p7     -1     [0, .1]     .1           impostor
SIM = np.array([[.9, .1], [.2, .8], [.3, .6], [.1, .4], [.7, .5], [.2, .3], [.1, .2], [0, .1]])  # fmt: skip
TRUTH = np.array([0, 1, 0, 1, -1, -1, -1, -1])


def test_dir_at_far_hand_computed() -> None:
    # far=.25 allows 1 of 4 impostors: the impostor at .7 is above the threshold, the one at .3 must not be
    #   -> threshold .4: p0, p1, p3 detected and identified; p2 never counts -> 3/4
    assert m.dir_at_far(SIM, TRUTH, 0.25) == 0.75
    # far=0 -> threshold above .7: p0 (.9), p1 (.8) -> 2/4
    assert m.dir_at_far(SIM, TRUTH, 0.0) == 0.5
    # far=.5 allows 2 -> threshold .3 (above .2): still p0, p1, p3 -> 3/4
    assert m.dir_at_far(SIM, TRUTH, 0.5) == 0.75
    assert m.dir_at_far(SIM, TRUTH, 1.0) == 0.75
    assert m.rank1_accuracy(SIM, TRUTH) == 0.75


def test_dir_ties() -> None:
    # a genuine probe tied with another identity for top-1 is a miss
    assert m.rank1_accuracy([[0.5, 0.5], [0.9, 0.1]], [0, 0]) == 0.5
    # a genuine top score tied with the only impostor max cannot be accepted at far=0
    # genuine top scores .7 and .9; the impostor's max is .7
    sim = [[0.7, 0.1], [0.9, 0.0], [0.2, 0.7]]
    assert m.dir_at_far(sim, [0, 0, -1], 0.0) == 0.5  # only the .9 probe: .7 ties the impostor
    assert m.dir_at_far(sim, [0, 0, -1], 1.0) == 1.0
    # with truth 1, probe 0 scores .1 against .7 for identity 0: misidentified, never counted
    assert m.dir_at_far(sim, [1, 0, -1], 1.0) == 0.5


def test_dir_single_gallery_identity() -> None:
    sim = np.array([[0.8], [0.4], [0.6], [0.1]])
    # impostor maxes .6, .1; far=.5 allows one -> threshold above .1: .8 and .4 -> 1.0
    assert m.dir_at_far(sim, [0, 0, -1, -1], 0.5) == 1.0
    # far=0 -> above .6: only .8 -> 0.5
    assert m.dir_at_far(sim, [0, 0, -1, -1], 0.0) == 0.5


def test_random_cross_check_against_brute_force() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(4, 40))
        scores = np.round(rng.random(n), 1)  # many ties
        same = rng.random(n) < 0.5
        same[0], same[1] = True, False
        for far in (0.0, 0.1, 0.3, 1.0):
            assert m.tar_at_far(scores, same, far) == pytest.approx(naive_tar_at_far(scores, same, far))
        sim = np.round(rng.random((n, 3)), 1)
        truth = rng.integers(-1, 3, n)
        truth[0], truth[1] = 0, -1
        for far in (0.0, 0.2, 0.5, 1.0):
            assert m.dir_at_far(sim, truth, far) == pytest.approx(naive_dir(sim, truth, far))


def test_cross_check_against_sklearn_with_ties() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for _ in range(10):
        n = int(rng.integers(10, 300))
        scores = np.round(rng.standard_normal(n), 1)
        same = rng.random(n) < 0.4
        same[0], same[1] = True, False
        scores = scores + same  # informative but overlapping, with ties within and across classes
        far, tar, thr = m.roc_curve(scores, same)
        sk_far, sk_tar, sk_thr = sk.roc_curve(same, scores, drop_intermediate=False)
        np.testing.assert_allclose(far, sk_far)
        np.testing.assert_allclose(tar, sk_tar)
        np.testing.assert_array_equal(thr[1:], sk_thr[1:])
        assert thr[0] == math.inf
        assert m.roc_auc(scores, same) == pytest.approx(sk.roc_auc_score(same, scores))


@pytest.mark.parametrize(
    "fn", [m.roc_curve, m.roc_auc, m.best_accuracy_threshold, lambda s, y: m.tar_at_far(s, y, 0.1)]
)
def test_verification_input_errors(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="both classes"):
        fn([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="both classes"):
        fn([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="length"):
        fn([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="NaN"):
        fn([0.1, np.nan], [True, False])
    with pytest.raises(ValueError, match="NaN or infinite"):
        fn([0.1, np.inf], [True, False])
    with pytest.raises(ValueError, match="1-D"):
        fn([[0.1, 0.2]], [[True, False]])
    with pytest.raises(ValueError, match="0/1"):
        fn([0.1, 0.2], [2, 0])


def test_other_input_errors() -> None:
    with pytest.raises(ValueError, match="far must be"):
        m.tar_at_far(A_SCORES, A_SAME, 1.5)
    with pytest.raises(ValueError, match="far must be"):
        m.threshold_at_far(A_SCORES, A_SAME, -0.1)
    with pytest.raises(ValueError, match="far must be"):
        m.dir_at_far(SIM, TRUTH, float("nan"))
    with pytest.raises(ValueError, match="empty"):
        m.accuracy_at([], [], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        m.accuracy_at([0.1], [True], float("nan"))
    with pytest.raises(ValueError, match="two distinct"):
        m.kfold_verification_accuracy(A_SCORES, A_SAME, np.zeros(8))
    with pytest.raises(ValueError, match="folds must be 1-D"):
        m.kfold_verification_accuracy(A_SCORES, A_SAME, np.zeros(7))
    with pytest.raises(ValueError, match="only one class"):
        m.kfold_verification_accuracy(A_SCORES, A_SAME, [0, 0, 0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="no impostor probes"):
        m.dir_at_far(SIM[:4], TRUTH[:4], 0.1)
    with pytest.raises(ValueError, match="no genuine probes"):
        m.dir_at_far(SIM[4:], TRUTH[4:], 0.1)
    with pytest.raises(ValueError, match="no genuine probes"):
        m.rank1_accuracy(SIM[4:], TRUTH[4:])
    with pytest.raises(ValueError, match="-1"):
        m.rank1_accuracy(SIM, np.r_[TRUTH[:-1], 2])
    with pytest.raises(ValueError, match="integers"):
        m.rank1_accuracy(SIM, TRUTH.astype(float))
    with pytest.raises(ValueError, match="length"):
        m.rank1_accuracy(SIM, TRUTH[:-1])
    with pytest.raises(ValueError, match="NaN"):
        m.dir_at_far(np.where(SIM == 0.9, np.nan, SIM), TRUTH, 0.1)
    with pytest.raises(ValueError, match="2-D"):
        m.rank1_accuracy(SIM[:, 0], TRUTH)
    with pytest.raises(ValueError, match="empty"):
        m.rank1_accuracy(np.zeros((0, 2)), np.zeros(0, dtype=int))
