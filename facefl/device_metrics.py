"""The personalized benchmark's report: per-device 1:1 TAR@FAR and 1:N DIR@FAR, averaged over devices
(docs/architecture.md, "Evaluation protocol"). Pure NumPy, on top of :mod:`facefl.metrics` (its
conventions hold here: scores are cosine similarities, ties are never split)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from facefl.metrics import (
    _check_far,
    _embeddings_2d,
    _int_labels,
    _unit_rows,
    dir_at_far,
    far_key,
    rank1_accuracy,
    tar_at_far,
)

__all__ = ["OTHERS_ONLY", "personalized_report"]

#: prefix of the report's figures without the strangers, when it has strangers
OTHERS_ONLY = "others_only/"


def personalized_report(
    train_emb: ArrayLike,
    train_identity: ArrayLike,
    train_device: ArrayLike,
    test_emb: ArrayLike,
    test_identity: ArrayLike,
    test_device: ArrayLike,
    fars: Sequence[float] = (1e-2, 1e-3),
    stranger_emb: ArrayLike | None = None,
) -> dict[str, Any]:
    """Per-device personalized metrics, averaged over devices.

    Identities are globally unique integers, each held by exactly one device (checked across train and
    test). Every device that has test images is evaluated (so at least two are needed); each of its test
    identities needs training images.

    For device ``d`` (all scores are cosine similarities):

    - 1:1: pairs of (``d``'s test images) x (ALL devices' test images) without self-pairs (both orders of
      a pair inside ``d`` count); genuine = same identity. ``tar@far=<far>`` via :func:`tar_at_far`.
      ``d`` needs a genuine pair, i.e. an identity with at least two test images.
    - 1:N: the gallery holds every identity of ``d`` with training images: the mean of its L2-normalized
      training embeddings, re-normalized. Probes are ``d``'s test images (genuine) and every other
      device's test images (impostors). ``dir@far=<far>`` via :func:`dir_at_far` and ``rank1`` via
      :func:`rank1_accuracy`.
    - ``stranger_emb`` (optional, (S, D)): faces of people on no device (e.g. the plan's held-out
      identities). They are impostors for every device, in both protocols: 1:1 pairs with each of
      ``d``'s test images, 1:N probes. Without them a device meets only the ~hundreds of other devices'
      test images, so FAR 1e-3 is the single highest impostor score, set by one look-alike. With
      strangers, every metric also comes without them, as ``others_only/<metric>``.

    Returns ``{"tar@far=1e-2": mean over devices, ..., "dir@far=1e-2": ..., "rank1": ..., "devices":
    number of devices (float), "per_device": [{"device": id, "identities": gallery size, "test_images":
    n, <the same metric keys>}, ...]}`` with devices in increasing id order.
    """
    tr = _unit_rows(_embeddings_2d(train_emb, "train_emb"), "train_emb")
    te = _unit_rows(_embeddings_2d(test_emb, "test_emb"), "test_emb")
    if tr.shape[1] != te.shape[1]:
        raise ValueError(f"train_emb has dimension {tr.shape[1]} but test_emb has {te.shape[1]}")
    if stranger_emb is None:
        st = np.zeros((0, te.shape[1]))
    else:
        st = _unit_rows(_embeddings_2d(stranger_emb, "stranger_emb"), "stranger_emb")
        if st.shape[1] != te.shape[1]:
            raise ValueError(f"stranger_emb has dimension {st.shape[1]} but test_emb has {te.shape[1]}")
    tr_id = _int_labels(train_identity, "train_identity", tr.shape[0])
    tr_dev = _int_labels(train_device, "train_device", tr.shape[0])
    te_id = _int_labels(test_identity, "test_identity", te.shape[0])
    te_dev = _int_labels(test_device, "test_device", te.shape[0])
    far_list = [_check_far(f) for f in fars]
    if not far_list:
        raise ValueError("fars is empty")

    # each identity lives on exactly one device
    all_id = np.r_[tr_id, te_id]
    all_dev = np.r_[tr_dev, te_dev]
    pairs = np.unique(np.stack([all_id, all_dev], axis=1), axis=0)
    ids, counts = np.unique(pairs[:, 0], return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"identities on more than one device: {ids[counts > 1][:5].tolist()}")

    # galleries for every training identity at once: mean of normalized embeddings, re-normalized
    gal_ids, inverse = np.unique(tr_id, return_inverse=True)
    sums = np.zeros((gal_ids.size, tr.shape[1]))
    np.add.at(sums, inverse, tr)
    gallery = _unit_rows(sums, "gallery (mean training embedding)")
    gal_dev = np.empty(gal_ids.size, dtype=np.int64)
    gal_dev[inverse] = tr_dev

    missing = np.setdiff1d(te_id, gal_ids)
    if missing.size:
        raise ValueError(f"test identities without training images: {missing[:5].tolist()}")
    devices = np.unique(te_dev)
    if devices.size < 2:
        raise ValueError("personalized evaluation needs test images from at least two devices")

    test_vs_test = te @ te.T
    test_vs_stranger = te @ st.T
    # probes of the 1:N protocol: every test image, then every stranger (never enrolled anywhere)
    probe_vs_gallery = np.concatenate([te, st]) @ gallery.T
    keys_tar = [f"tar@far={far_key(f)}" for f in far_list]
    keys_dir = [f"dir@far={far_key(f)}" for f in far_list]
    per_device: list[dict[str, float]] = []
    for d in devices:
        rows = np.flatnonzero(te_dev == d)
        # 1:1 against all test images, self-pairs removed
        valid = np.ones((rows.size, te.shape[0]), dtype=bool)
        valid[np.arange(rows.size), rows] = False
        scores = np.r_[test_vs_test[rows][valid], test_vs_stranger[rows].ravel()]
        same = np.r_[(te_id[rows][:, None] == te_id[None, :])[valid], np.zeros(rows.size * st.shape[0], bool)]
        if not same.any():
            raise ValueError(
                f"device {int(d)} has no genuine test pair: give one of its identities >= 2 test images"
            )
        entry: dict[str, float] = {
            "device": int(d),
            "identities": 0,
            "test_images": int(rows.size),
        }
        for key, f in zip(keys_tar, far_list, strict=True):
            entry[key] = tar_at_far(scores, same, f)
        others = int(valid.sum())  # the pairs within the devices' test images come first
        # 1:N with the device's enrolled identities; other devices' test images are impostors
        cols = np.flatnonzero(gal_dev == d)
        entry["identities"] = int(cols.size)
        position = {int(i): k for k, i in enumerate(gal_ids[cols])}
        probe_index = np.full(te.shape[0] + st.shape[0], -1, dtype=np.int64)
        probe_index[rows] = [position[int(i)] for i in te_id[rows]]
        sim = probe_vs_gallery[:, cols]
        for key, f in zip(keys_dir, far_list, strict=True):
            entry[key] = dir_at_far(sim, probe_index, f)
        entry["rank1"] = rank1_accuracy(sim, probe_index)
        if st.shape[0]:
            # the same without the strangers (the other devices' test images as the only impostors);
            # strangers are never ranked, so rank-1 is the same
            for key, f in zip(keys_tar, far_list, strict=True):
                entry[f"{OTHERS_ONLY}{key}"] = tar_at_far(scores[:others], same[:others], f)
            for key, f in zip(keys_dir, far_list, strict=True):
                entry[f"{OTHERS_ONLY}{key}"] = dir_at_far(sim[: te.shape[0]], probe_index[: te.shape[0]], f)
            entry[f"{OTHERS_ONLY}rank1"] = entry["rank1"]
        per_device.append(entry)

    metrics = [*keys_tar, *keys_dir, "rank1"]
    if st.shape[0]:
        metrics += [f"{OTHERS_ONLY}{key}" for key in metrics]
    report: dict[str, Any] = {key: float(np.mean([e[key] for e in per_device])) for key in metrics}
    report["devices"] = float(devices.size)
    report["strangers"] = float(st.shape[0])
    report["per_device"] = per_device
    return report
