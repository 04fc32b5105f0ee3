"""The personalized benchmark's per-device report: hand-computed tiny cases (with and without strangers),
a brute-force cross-check, and input errors."""

from __future__ import annotations

import numpy as np
import pytest

from facefl.device_metrics import personalized_report
from tests.facefl.naive_metrics import naive_dir, naive_tar_at_far

# personalized_report: 2 devices x 2 identities, 4-D embeddings on the basis vectors e0..e3.
#   device 0: identity 10 (~e0), 11 (~e1); device 1: identity 20 (~e2), 21 (~e3)
#   training: scaled copies of the basis vector -> galleries e0, e1, e2, e3
#   test: 10a=e0 10b=e0 | 11a=e1 11b=e1 | 20a=e2 20b=e2 | 21a=e3 21b=e0 (a bad image that looks like 10)
E = np.eye(4)
TRAIN = np.array([2 * E[0], 3 * E[0], E[1], 0.5 * E[1], E[2], 4 * E[2], 5 * E[3], E[3]])
TRAIN_ID = np.array([10, 10, 11, 11, 20, 20, 21, 21])
TRAIN_DEV = np.array([0, 0, 0, 0, 1, 1, 1, 1])
TEST = np.array([E[0], E[0], E[1], E[1], E[2], E[2], E[3], E[0]])
TEST_ID = np.array([10, 10, 11, 11, 20, 20, 21, 21])
TEST_DEV = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def test_personalized_report_hand_computed() -> None:
    # 1:1, device 0 (rows 10a 10b 11a 11b vs 7 others each = 28 pairs):
    #   genuine 4 pairs at 1.0; impostors: 10a/10b vs 21b at 1.0 (2), the other 22 at 0.0
    #   thresholds inf | 1.0 (TP 4, FAR 2/24=.083) | 0.0 (FAR 1)
    #   far=.25 -> TAR 1;  far=.01 -> only inf -> 0
    # 1:1, device 1: genuine 20a-20b, 20b-20a at 1.0; 21a-21b, 21b-21a at 0.0; impostors: 21b vs 10a/10b
    #   at 1.0 (2), 22 at 0.0 -> far=.25 -> threshold 1.0 -> TAR 2/4 = .5;  far=.01 -> 0
    # 1:N, device 0: gallery [e0, e1]; genuine 10a 10b 11a 11b all correct at 1.0; impostor maxes:
    #   20a 0, 20b 0, 21a 0, 21b 1.0 -> far=.25 (1 of 4) -> threshold 1.0 -> DIR 1; far=.01 -> 0; rank1 1
    # 1:N, device 1: gallery [e2, e3]; 20a 20b 21a correct at 1.0; 21b=e0 ties [0, 0] -> miss;
    #   impostor maxes all 0.0 -> threshold 1.0 for both fars -> DIR 3/4; rank1 3/4
    rep = personalized_report(TRAIN, TRAIN_ID, TRAIN_DEV, TEST, TEST_ID, TEST_DEV, fars=(0.25, 0.01))
    assert rep["tar@far=2.5e-1"] == pytest.approx((1.0 + 0.5) / 2)
    assert rep["tar@far=1e-2"] == pytest.approx(0.0)
    assert rep["dir@far=2.5e-1"] == pytest.approx((1.0 + 0.75) / 2)
    assert rep["dir@far=1e-2"] == pytest.approx((0.0 + 0.75) / 2)
    assert rep["rank1"] == pytest.approx((1.0 + 0.75) / 2)
    assert rep["devices"] == 2.0
    d0, d1 = rep["per_device"]
    assert d0["device"] == 0 and d1["device"] == 1
    assert d0["identities"] == 2 and d0["test_images"] == 4
    assert (d0["tar@far=2.5e-1"], d1["tar@far=2.5e-1"]) == (1.0, 0.5)
    assert (d0["dir@far=1e-2"], d1["dir@far=1e-2"]) == (0.0, 0.75)
    assert (d0["rank1"], d1["rank1"]) == (1.0, 0.75)
    # default fars give the 1e-2 and 1e-3 keys
    default = personalized_report(TRAIN, TRAIN_ID, TRAIN_DEV, TEST, TEST_ID, TEST_DEV)
    assert {"tar@far=1e-2", "tar@far=1e-3", "dir@far=1e-2", "dir@far=1e-3", "rank1", "devices"} <= set(
        default
    )


def _naive_personalized(tr, tr_id, tr_dev, te, te_id, te_dev, far, st=None):  # type: ignore[no-untyped-def]
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    st = np.zeros((0, te.shape[1])) if st is None else st
    tars, dirs, r1s = [], [], []
    for d in np.unique(te_dev):
        scores, same = [], []
        for i in np.flatnonzero(te_dev == d):
            for j in range(len(te)):
                if i != j:
                    scores.append(float(unit(te[i]) @ unit(te[j])))
                    same.append(te_id[i] == te_id[j])
            for stranger in st:
                scores.append(float(unit(te[i]) @ unit(stranger)))
                same.append(False)
        tars.append(naive_tar_at_far(np.array(scores), np.array(same), far))
        ids = np.unique(tr_id[tr_dev == d])
        gallery = np.stack([unit(unit(tr[tr_id == k]).mean(axis=0)) for k in ids])
        sim = unit(np.concatenate([te, st])) @ gallery.T
        truth = np.array(
            [int(np.flatnonzero(ids == k)[0]) if dv == d else -1 for k, dv in zip(te_id, te_dev, strict=True)]
            + [-1] * len(st)
        )
        dirs.append(naive_dir(sim, truth, far))
        gen = truth >= 0
        r1s.append(
            np.mean(
                [
                    sim[p, truth[p]] > np.delete(sim[p], truth[p]).max(initial=-np.inf)
                    for p in np.flatnonzero(gen)
                ]
            )
        )
    return np.mean(tars), np.mean(dirs), np.mean(r1s)


def test_personalized_report_matches_brute_force_on_random_data() -> None:
    rng = np.random.default_rng(11)
    n_dev, per_dev, dim = 3, 3, 5
    ids = np.arange(n_dev * per_dev) + 100
    dev_of = np.repeat(np.arange(n_dev), per_dev)
    centers = rng.standard_normal((ids.size, dim))
    tr_id = np.repeat(ids, 3)
    te_id = np.repeat(ids, 2)
    # varied norms on training embeddings: the gallery averages L2-normalized embeddings
    tr = (centers[tr_id - 100] + 0.8 * rng.standard_normal((tr_id.size, dim))) * rng.uniform(
        0.1, 10, (tr_id.size, 1)
    )
    te = centers[te_id - 100] + 0.8 * rng.standard_normal((te_id.size, dim))
    tr_dev, te_dev = dev_of[tr_id - 100], dev_of[te_id - 100]
    rep = personalized_report(tr, tr_id, tr_dev, te, te_id, te_dev, fars=(0.1,))
    tar, dir_, r1 = _naive_personalized(tr, tr_id, tr_dev, te, te_id, te_dev, 0.1)
    assert rep["tar@far=1e-1"] == pytest.approx(tar)
    assert rep["dir@far=1e-1"] == pytest.approx(dir_)
    assert rep["rank1"] == pytest.approx(r1)
    assert rep["devices"] == 3.0 and len(rep["per_device"]) == 3
    # strangers near the identities' centers: impostors for every device
    st = centers[rng.integers(0, ids.size, 7)] + 0.8 * rng.standard_normal((7, dim))
    rep_st = personalized_report(tr, tr_id, tr_dev, te, te_id, te_dev, fars=(0.1,), stranger_emb=st)
    tar_st, dir_st, r1_st = _naive_personalized(tr, tr_id, tr_dev, te, te_id, te_dev, 0.1, st)
    assert rep_st["tar@far=1e-1"] == pytest.approx(tar_st)
    assert rep_st["dir@far=1e-1"] == pytest.approx(dir_st)
    assert rep_st["rank1"] == pytest.approx(r1_st) == pytest.approx(r1)  # strangers are never ranked
    assert rep_st["strangers"] == 7.0 and rep["strangers"] == 0.0


def test_personalized_report_strangers_hand_computed() -> None:
    # the fixture above plus two strangers: s1=e0 (looks like identity 10), s2=-e1
    # 1:1, device 0: 8 more impostor pairs: s1 vs 10a/10b at 1.0, the rest at 0 or -1 -> impostors at
    #   1.0: 4 of 32 (without strangers 2 of 24) -> far=.1: threshold inf -> TAR 0 (without: .083 -> 1)
    # 1:1, device 1: s1 vs 21b=e0 at 1.0 -> 3 of 32 at 1.0 (.094) -> far=.1: TAR .5 (as without)
    # 1:N, device 0: impostor maxes 0, 0, 0, 1 (21b), 1 (s1), 0 (s2) -> far=.25: 2/6 > .25 -> DIR 0
    #   (without: 1/4 -> DIR 1); device 1: every impostor max is 0 -> DIR 3/4, with or without
    strangers = np.array([E[0], -E[1]])
    args = (TRAIN, TRAIN_ID, TRAIN_DEV, TEST, TEST_ID, TEST_DEV, (0.25, 0.1))
    without = personalized_report(*args)
    rep = personalized_report(*args, stranger_emb=strangers)
    assert [d["tar@far=1e-1"] for d in without["per_device"]] == [1.0, 0.5]
    assert [d["tar@far=1e-1"] for d in rep["per_device"]] == [0.0, 0.5]
    assert [d["tar@far=2.5e-1"] for d in rep["per_device"]] == [1.0, 0.5]
    assert [d["dir@far=2.5e-1"] for d in without["per_device"]] == [1.0, 0.75]
    assert [d["dir@far=2.5e-1"] for d in rep["per_device"]] == [0.0, 0.75]
    assert rep["dir@far=1e-1"] == pytest.approx(0.375)
    assert rep["rank1"] == without["rank1"] == pytest.approx((1.0 + 0.75) / 2)
    assert rep["strangers"] == 2.0
    # the report also holds the figures without the strangers, equal to a report that never had them
    for key in ("tar@far=1e-1", "tar@far=2.5e-1", "dir@far=1e-1", "dir@far=2.5e-1", "rank1"):
        assert rep[f"others_only/{key}"] == without[key]
        assert [d[f"others_only/{key}"] for d in rep["per_device"]] == [d[key] for d in without["per_device"]]
    assert not any(k.startswith("others_only/") for k in without)
    with pytest.raises(ValueError, match="stranger_emb has dimension"):
        personalized_report(*args, stranger_emb=np.ones((2, 3)))
    with pytest.raises(ValueError, match="stranger_emb is empty"):
        personalized_report(*args, stranger_emb=np.zeros((0, 4)))
    with pytest.raises(ValueError, match="stranger_emb contains NaN"):
        personalized_report(*args, stranger_emb=np.array([[np.nan, 0, 0, 1.0]]))


def test_personalized_report_errors() -> None:
    args = [TRAIN, TRAIN_ID, TRAIN_DEV, TEST, TEST_ID, TEST_DEV]
    with pytest.raises(ValueError, match="more than one device"):
        personalized_report(TRAIN, TRAIN_ID, TRAIN_DEV, TEST, TEST_ID, np.array([0, 0, 0, 1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="without training images"):
        personalized_report(TRAIN[:6], TRAIN_ID[:6], TRAIN_DEV[:6], *args[3:])
    with pytest.raises(ValueError, match="at least two devices"):
        personalized_report(TRAIN, TRAIN_ID, TRAIN_DEV, TEST[:4], TEST_ID[:4], TEST_DEV[:4])
    with pytest.raises(ValueError, match="no genuine test pair"):
        personalized_report(*args[:3], TEST[[0, 2, 4, 5]], TEST_ID[[0, 2, 4, 5]], TEST_DEV[[0, 2, 4, 5]])
    with pytest.raises(ValueError, match="dimension"):
        personalized_report(np.c_[TRAIN, np.zeros(8)], *args[1:])
    with pytest.raises(ValueError, match="length"):
        personalized_report(TRAIN, TRAIN_ID[:-1], *args[2:])
    with pytest.raises(ValueError, match="integers"):
        personalized_report(TRAIN, TRAIN_ID.astype(float), *args[2:])
    with pytest.raises(ValueError, match="zero"):
        personalized_report(TRAIN, TRAIN_ID, TRAIN_DEV, np.where(TEST == 1.0, 0.0, TEST), *args[4:])
    with pytest.raises(ValueError, match="far"):
        personalized_report(*args, fars=(1.5,))
